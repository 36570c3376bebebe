"""The tiny checkpoints trained on the chain task (assets/tiny-{dream,llada}-chain): offline loading, size, a
vanilla accuracy floor, the yardstick table CLI and the eval harness on the chain dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import models  # noqa: F401  (Auto registrations)
from dkvcache.tasks import chain, chain_tables

pytestmark = pytest.mark.slow  # deselect with -m "not slow" (README)

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"dream": ROOT / "assets" / "tiny-dream-chain", "llada": ROOT / "assets" / "tiny-llada-chain"}


@pytest.fixture(scope="module", params=["dream", "llada"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def test_files_and_size(family: str) -> None:
    path = MODELS[family]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "train_log.jsonl"):
        assert (path / name).is_file(), name
    assert sum(f.stat().st_size for f in path.iterdir()) <= 10 * 1024 * 1024


def test_loads_offline_and_passes_a_vanilla_floor(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModel.from_pretrained(MODELS[family], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODELS[family])
    assert model.diffusion_family == family
    rows = chain.load_jsonl(limit=20)
    result = chain.evaluate(model, tokenizer, rows, batch_size=20, **chain.default_generation_kwargs(family))
    assert result["accuracy"] >= 0.8, result["predictions"][:3]


def test_dream_dkv_default_shift_keeps_the_paths() -> None:
    """Dream's default shift rule ('un_right') keeps dKV decoded at vanilla accuracy on the chain checkpoint; the
    original's 'un' (a still-MASK position cached once its right neighbour is decoded) loses paths."""
    model, tokenizer = chain.arith.load_model(str(MODELS["dream"]))
    rows = chain.load_jsonl(limit=40)
    common = {**chain.default_generation_kwargs("dream"), "use_cache": True, "cache_type": "decoded",
              "cache_steps": 4}
    default = chain.evaluate(model, tokenizer, rows, batch_size=40, **common)
    original = chain.evaluate(model, tokenizer, rows, batch_size=40, **common, shift_type="un")
    assert default["correct"] == 40, [p for p in default["predictions"] if not p["correct"]][:2]
    assert original["correct"] <= 36


def test_yardstick_cli_runs_every_row(family: str, capsys: pytest.CaptureFixture) -> None:
    assert chain.main(["--model", str(MODELS[family]), "--table", "yardstick", "--limit", "2",
                       "--batch-size", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("| setting |"):].strip().splitlines()
    settings = chain_tables.table_settings("yardstick", family, chain.GEN_LENGTH)
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:]] == [label for label, _ in settings]
    assert "| 1.00× |" in lines[2]


def test_eval_harness_runs_the_chain_dataset(tmp_path: Path) -> None:
    pytest.importorskip("hydra", reason="the eval extras are not installed")
    pytest.importorskip("math_verify", reason="the eval extras are not installed")
    from dkvcache.eval import config as C
    from dkvcache.eval import records, runner

    cfg = C.load(["model=tiny-llada-chain", f"model.path={MODELS['llada']}", "dataset=chain", "dataset.limit=4",
                  "batch_size=4", f"output_dir={tmp_path}", "threads=1", "progress=false"])
    assert cfg["dataset"]["gen_length"] == chain.GEN_LENGTH
    summary = runner.run(cfg, log=lambda *_: None)
    samples = records.read_records(os.path.join(summary["run_dir"], records.SAMPLES))
    assert [s["id"] for s in samples] == [f"chain-{i:04d}" for i in range(4)] and summary["complete"]
    model, tokenizer = chain.arith.load_model(str(MODELS["llada"]))
    reference = chain.evaluate(model, tokenizer, chain.load_jsonl(limit=4), batch_size=4, **C.generate_kwargs(cfg))
    assert [s["score"] for s in samples] == [float(p["correct"]) for p in reference["predictions"]]


def test_train_script_takes_the_chain_task(tmp_path: Path) -> None:
    """``--task chain``: the task's vocabulary in the tokenizer, its 32-token window, its held-out items."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "examples" / "train_tiny.py")
    train_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny)
    args = train_tiny.parse_args(["--arch", "dream", "--out", "x", "--task", "chain"])
    assert (args.layers, args.lr, args.steps) == (3, 2e-3, 4000)  # the chain recipe
    assert train_tiny.parse_args(["--arch", "dream", "--out", "x"]).task == "arith"  # old commands unchanged
    threads = torch.get_num_threads()
    try:
        train_tiny.main(["--task", "chain", "--arch", "llada", "--out", str(tmp_path), "--steps", "2",
                         "--batch-size", "4", "--hidden", "32", "--layers", "1", "--heads", "2", "--warmup", "1",
                         "--log-every", "1", "--eval-limit", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    row = chain.load_jsonl(limit=1)[0]
    ids = tokenizer(row["question"], add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == row["question"]
    assert "moves" in tokenizer.get_vocab() and "apples" not in tokenizer.get_vocab()
    assert json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[0])["step"] == 1

    # --init continues from that checkpoint: its weights, not a fresh init (lr 0: the weights stay as loaded)
    more = tmp_path / "continued"
    try:
        train_tiny.main(["--task", "chain", "--arch", "llada", "--out", str(more), "--init", str(tmp_path),
                         "--steps", "1", "--batch-size", "2", "--lr", "0", "--warmup", "1", "--no-eval",
                         "--threads", "1", "--seed", "5"])
    finally:
        torch.set_num_threads(threads)
    first, second = (AutoModel.from_pretrained(path).state_dict() for path in (tmp_path, more))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(SystemExit):  # a Dream --init of a LLaDA checkpoint is refused
        train_tiny.main(["--task", "chain", "--arch", "dream", "--out", str(tmp_path / "x"), "--init",
                         str(tmp_path), "--steps", "1", "--no-eval", "--threads", "1"])


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_grow_layers_starts_as_the_same_function(arch: str) -> None:
    """``--grow-layers N``: N identity blocks interleaved after the first N; the grown model's logits equal the
    original's before any training, and the new blocks are really new (zero output projections)."""
    import importlib.util

    from tests.conftest import tiny_dream, tiny_llada

    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "examples" / "train_tiny.py")
    train_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny)
    model = (tiny_llada if arch == "llada" else tiny_dream)(layers=3, seed=3)
    grown = train_tiny.grow_layers(model, arch, 2)
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert len(grown._layers()) == 5
        assert torch.allclose(model(ids).logits, grown(ids).logits, rtol=0, atol=1e-12)
    new_block = grown._layers()[1]
    assert all(not new_block.get_submodule(n).weight.any() for n in train_tiny.OUTPUT_PROJECTIONS[arch])
    assert torch.equal(grown._layers()[2].state_dict()[next(iter(model._layers()[1].state_dict()))],
                       next(iter(model._layers()[1].state_dict().values())))
    with pytest.raises(SystemExit):
        train_tiny.grow_layers(model, arch, 4)  # more than one new block per old one
    with pytest.raises(SystemExit):
        train_tiny.parse_args(["--arch", arch, "--out", "x", "--grow-layers", "2"])  # needs --init


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_grow_mlp_starts_as_the_same_function(arch: str) -> None:
    """``--grow-mlp W``: every MLP widened to W units; the old units keep their weights, the new ones write
    nothing (zero output columns) but are trainable (random input rows), so the logits are unchanged."""
    import importlib.util

    from tests.conftest import tiny_dream, tiny_llada

    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "examples" / "train_tiny.py")
    train_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny)
    model = (tiny_llada if arch == "llada" else tiny_dream)(layers=2, seed=3)
    old_width = model.config.intermediate_size
    grown = train_tiny.grow_mlp(model, arch, 3 * old_width)
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert grown.config.intermediate_size == 3 * old_width
        assert torch.allclose(model(ids).logits, grown(ids).logits, rtol=0, atol=1e-12)
    out_name = train_tiny.MLP_OUTPUTS[arch]
    for old_block, new_block in zip(model._layers(), grown._layers(), strict=True):
        out_old, out_new = (b.get_submodule(out_name).weight for b in (old_block, new_block))
        assert torch.equal(out_new[:, :old_width], out_old) and not out_new[:, old_width:].any()
        inputs = [n for n, p in new_block.named_parameters() if p.shape[0] == 3 * old_width]
        assert inputs and all(new_block.get_parameter(n)[old_width:].abs().sum() > 0 for n in inputs)
    with pytest.raises(SystemExit):
        train_tiny.grow_mlp(model, arch, old_width)  # not wider
    with pytest.raises(SystemExit):
        train_tiny.parse_args(["--arch", arch, "--out", "x", "--grow-mlp", "512"])  # needs --init


def test_commit_trace_leaves_the_output_alone_and_sees_every_state() -> None:
    """chain_trace reads each step through the generation hook: the paths are the ones evaluate scores, a decoder
    that never re-masks commits each of the nine states exactly once, and vanilla decoding never commits a wrong
    one (the shipped LLaDA is 100 % right)."""
    from dkvcache.tasks import chain_trace

    model, tokenizer = chain.arith.load_model(str(MODELS["llada"]))
    rows = chain.load_jsonl(limit=40)
    for extra in ({}, {"alg": "maskgit_plus", "decoding": "eb_sampler"}):
        kwargs = chain.merge_kwargs("llada", extra)
        traced = chain_trace.trace(model, tokenizer, rows, batch_size=20, **kwargs)
        scored = chain.evaluate(model, tokenizer, rows, batch_size=20, **kwargs)
        assert traced.correct_rows == [p["correct"] for p in scored["predictions"]]
        assert len(traced.commits) == len(rows) * len(chain_trace.STATE_OFFSETS) and traced.remasked == 0
        assert sorted((c.row, c.state) for c in traced.commits) == [
            (r, s) for r in range(len(rows)) for s in range(len(chain_trace.STATE_OFFSETS))]
        assert all(c.ahead == 0 for c in traced.commits if c.state == 0)
        assert all(1 <= c.ahead <= c.state for c in traced.commits if c.state > 0)
        if not extra:
            assert all(c.right for c in traced.commits) and all(traced.correct_rows)
        else:  # EB-sampler commits several states a step: some composed several moves ahead
            assert max(c.ahead for c in traced.commits) >= 3
            for first in traced.first_errors():  # its errors are the most uncertain state of a many-state step
                assert first.most_uncertain and first.states_this_step > 1 and first.entropy > 0.01
    text = chain_trace.summary(traced)
    assert text.startswith("| distance ahead |") and f"/{len(rows)} paths right" in text
