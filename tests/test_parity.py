"""The samplers and dKV-Cache variants reproduce the original implementations token for token
(../shared/parity: horseee/dKV-Cache and ML-GSAI/LLaDA run in float64 on tiny checkpoints in the Hub layouts)."""

from __future__ import annotations

import pytest

from tests.parity import cases, load_reference, run_setting

pytestmark = pytest.mark.slow  # deselect with -m "not slow" (README)

CASES = cases()


@pytest.fixture(scope="module")
def parity_models(parity_checkpoints):
    from tests.parity import checkpoint

    return {kind: checkpoint(parity_checkpoints, kind) for kind in ("dream", "llada")}


@pytest.mark.parametrize("kind,setting", CASES, ids=[f"{k}:{s['id']}" for k, s in CASES])
def test_parity(parity_models, kind, setting):
    out = run_setting(parity_models[kind], load_reference(kind), setting)
    assert out.sequences.tolist() == setting["output_ids"]
    if setting.get("cache_ratio") is not None:  # our fed fraction is the original's cache_ratio
        assert out.stats["fed_fraction"] == pytest.approx(setting["cache_ratio"], abs=1e-12)


def test_parity_covers_every_variant(parity_checkpoints):
    tags = {tag for _, s in CASES for tag in s["tags"]}
    assert {"vanilla", "decoded", "un_right", "prefill", "pd", "greedy", "cfg"} <= tags
    assert len(CASES) >= 60


def test_reference_crashes_are_fixed_or_rejected(parity_models):
    """Where the reference crashed we either work (alg_temp > 0, 'decoded' in the PD module) or raise a
    ValueError naming the argument (cache_steps=0, unknown cache_type)."""
    reference = load_reference("dream")
    by_id = {s["id"]: s for s in reference["settings"]}
    works = run_setting(parity_models["dream"], reference, by_id["S1/maskgit_plus/vanilla/alg_temp0.5"])
    assert (works.sequences != reference["special_ids"]["mask"]).all()
    for bad, name in (("S1/entropy/decoded-un-cs0", "cache_steps"), ("S1/entropy/bogus-cache-type", "cache_type")):
        with pytest.raises(ValueError, match=name):
            run_setting(parity_models["dream"], reference, by_id[bad])
