"""The shared command-line value parser and checkpoint loader (dkvcache.cli_values, dkvcache.loading)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dkvcache import bench, loading
from dkvcache.cli_values import parse_value
from dkvcache.tasks import arith

REPO = Path(__file__).resolve().parents[1]
TINY_DREAM = REPO / "assets" / "tiny-dream"


@pytest.mark.parametrize("text,expected", [
    ("True", True), ("false", False), ("TRUE", True), ("None", None), ("none", None), ("null", None),
    ("8", 8), ("-3", -3), ("0.9", 0.9), ("1e-3", 1e-3), ("dual", "dual"), (" decoded ", "decoded"),
    ("[1,2]", [1, 2]), ('{"a": 1}', {"a": 1}), ("[oops", "[oops"), ("maskgit_plus", "maskgit_plus"),
])
def test_parse_value(text: str, expected: object) -> None:
    got = parse_value(text)
    assert got == expected and type(got) is type(expected)


def test_one_parser_everywhere() -> None:
    assert bench.parse_value is parse_value and arith.parse_value is parse_value
    assert bench.parse_kwargs("a=True,b=none,c=8,d=0.5,e=dual") == arith.parse_overrides(
        ["a=True", "b=none", "c=8", "d=0.5", "e=dual"]) == {"a": True, "b": None, "c": 8, "d": 0.5, "e": "dual"}


def test_load_model_from_the_shipped_checkpoint(tmp_path: Path) -> None:
    model = loading.load_model(TINY_DREAM, dtype="float32")
    assert model.diffusion_family == "dream" and model.dtype == torch.float32 and not model.training
    assert loading.load_model("assets/tiny-dream", dtype=torch.float64).dtype == torch.float64  # repo-relative
    with pytest.raises(TypeError, match="expected llada"):
        loading.load_model(TINY_DREAM, family="llada")
    with pytest.raises(ValueError, match="dtype"):
        loading.load_model(TINY_DREAM, dtype="float8")
    assert loading.load_tokenizer(TINY_DREAM) is not None
    model.save_pretrained(tmp_path)  # weights and config only, no tokenizer files
    assert loading.load_tokenizer(tmp_path, required=False) is None
    with pytest.raises(OSError, match="no tokenizer"):
        loading.load_tokenizer(tmp_path)


def test_bench_matrix_opens_the_shipped_tiny_dream_in_a_fresh_process(tmp_path: Path) -> None:
    """Regression: bench's loader never imported ``models``, so a fresh process stopped at transformers'
    trust_remote_code check on the shipped checkpoints (the test session itself has ``models`` imported)."""
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install dkvcache[bench])")
    cmd = [sys.executable, "-m", "dkvcache.bench_matrix", "tiny-dream", "--batches", "1", "--repeats", "1",
           "--threads", "1", "--steps", "2", "--only", "none", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "tiny-dream.json").read_text())
    [row] = summary["batches"]["1"]
    assert row["label"] == "none" and row["forwards"] == 2
