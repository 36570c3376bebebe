"""The vanilla samplers reproduce the original implementations' outputs token for token (../shared/parity)."""

from __future__ import annotations

import pytest

from tests.parity import checkpoint, load_reference, run_setting, settings

CASES = [("dream", s) for s in settings("dream", "vanilla")] + [("llada", s) for s in settings("llada", "vanilla")]


@pytest.fixture(scope="module")
def parity_models(parity_checkpoints):
    return {kind: checkpoint(parity_checkpoints, kind) for kind in ("dream", "llada")}


@pytest.mark.parametrize("kind,setting", CASES, ids=[f"{k}:{s['id']}" for k, s in CASES])
def test_vanilla_parity(parity_models, kind, setting):
    reference = load_reference(kind)
    ours = run_setting(parity_models[kind], reference, setting)
    assert ours.tolist() == setting["output_ids"]


def test_parity_cases_exist(parity_checkpoints):
    assert len(CASES) >= 7  # dream: 3 algs S1 + E2; llada: S1, upstream, E2, cfg


def test_reference_crash_alg_temp_now_works(parity_models):
    """The reference crashed on alg_temp > 0 (multinomial over -inf); ours samples positions."""
    reference = load_reference("dream")
    setting = next(s for s in reference["settings"] if s["id"] == "S1/maskgit_plus/vanilla/alg_temp0.5")
    out = run_setting(parity_models["dream"], reference, setting)
    assert (out != reference["special_ids"]["mask"]).all()
    assert out.shape == (1, 32)
