"""Fast tests of the benchmark (dkvcache.bench) and the Dream example script on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dkvcache import bench
from models import DreamConfig

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "dream_generate.py"
TINY = ["--vocab", "256", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--batch", "2",
        "--prompt-len", "8", "--gen-len", "8", "--repeats", "1", "--threads", "1"]


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: several torch threads fighting other processes cost ~1 s per call."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_parse_setting_and_values() -> None:
    assert bench.parse_setting("none") == ("none", {})
    assert bench.parse_setting("full:full_logits=True") == ("full", {"full_logits": True})
    label, kwargs = bench.parse_setting("dkv:use_cache=True,cache_type=decoded,cache_steps=4,eps=0.5,top_k=None")
    assert label == "dkv"
    assert kwargs == {"use_cache": True, "cache_type": "decoded", "cache_steps": 4, "eps": 0.5, "top_k": None}
    assert bench.parse_setting("block_length=4") == ("block_length=4", {"block_length": 4})
    with pytest.raises(ValueError):
        bench.parse_kwargs("oops")


def test_preset_defaults_and_overrides() -> None:
    args = bench.resolve_args(["--preset", "small-dream", "--layers", "1", "--setting", "x:full_logits=True"])
    sizes = (args.vocab, args.hidden, args.layers, args.batch, args.prompt_len, args.steps)
    assert sizes == (16384, 384, 1, 8, 192, 64)
    assert args.settings == [("none", {}), ("x", {"full_logits": True})]
    args = bench.resolve_args(["--preset", "foundation", "--replace-settings", "--setting", "none"])
    assert args.settings == [("none", {})] and args.vocab == 152064


def test_random_prompts_avoid_special_ids() -> None:
    config = DreamConfig(vocab_size=300, mask_token_id=299, pad_token_id=298, eos_token_id=298, bos_token_id=297)
    ids = bench.random_prompts(config, 4, 64, seed=0)
    assert ids.shape == (4, 64) and int(ids.max()) < 297


@pytest.mark.parametrize("kind", ["dream", "llada"])
def test_bench_runs_and_writes_json(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "bench.json"
    argv = [*TINY, "--model-kind", kind, "--setting", "none", "--setting", "full:full_logits=True",
            "--json", str(out)]
    threads = torch.get_num_threads()
    assert bench.main(argv) == 0
    assert torch.get_num_threads() == threads  # --threads is undone when main returns
    report = json.loads(out.read_text())
    assert {"environment", "model", "workload", "common", "h", "results"} <= set(report)
    env = report["environment"]
    for key in ("torch", "transformers", "dkvcache", "device", "cpu_threads", "date", "command", "argv"):
        assert key in env
    assert env["argv"] == argv
    assert report["model"]["config"]["vocab_size"] == 256 and report["model"]["kind"] == kind
    none, full = report["results"]
    assert [none["label"], full["label"]] == ["none", "full"]
    for r in (none, full):
        for key in ("wall_time_s", "speedup", "forwards", "tokens_per_forward", "fed_fraction", "ideal_speedup",
                    "efficiency", "cap", "efficiency_vs_cap", "tokens_per_s", "match_first", "stats"):
            assert key in r
    assert none["speedup"] == 1.0
    assert none["fed_fraction"] == 1.0 and full["fed_fraction"] == 1.0
    assert none["forwards"] == 8 and none["match_first"] == 1.0
    assert full["match_first"] == 1.0  # full logits change the cost, never the tokens
    h = report["h"]
    assert report["environment"]["cpu_threads"] == 1
    assert 0.0 <= h["h"] <= 1.0 and h["reference"] == "first setting" and "method" in h
    assert none["cap"] == pytest.approx(1.0)


def test_bench_rejects_unknown_strategy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [*TINY, "--setting", "bad:use_cache=True,cache_type=no-such-cache", "--json", str(tmp_path / "x.json")]
    assert bench.main(argv) == 2
    assert "available cache strategies" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
