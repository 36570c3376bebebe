"""The example scripts and the benchmark matrices run as documented (tiny models, a few tokens)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import DreamConfig, DreamModel
from tests.conftest import tiny_llada

pytestmark = pytest.mark.slow  # deselect with -m "not slow" (README)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _tiny_dream_dir(path: Path) -> Path:
    """A tiny random Dream with a small byte-level BPE tokenizer and a ChatML template, in the Hub layout."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    torch.manual_seed(0)
    config = DreamConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, mask_token_id=319, pad_token_id=0,
                         eos_token_id=0, bos_token_id=0)
    DreamModel(config).save_pretrained(path)
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is the capital of France? Paris is the capital."] * 4, trainer)
    tok.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "DreamTokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "chat_template": template}))
    return path


def test_dream_generate_with_tokenizer_prompts_and_compare(tmp_path: Path) -> None:
    model_dir = _tiny_dream_dir(tmp_path / "tiny-dream")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"question": q}) for q in ["What is the capital?", "Paris?", "Hi"]))
    out = _script("dream_generate.py", "--model", str(model_dir), "--seq-len", "8", "--batch-size", "2",
                  "--prompts-file", str(prompts), cwd=tmp_path).stdout
    assert "What is the capital?" in out and "tokens/s" in out and "fed fraction 1.000" in out
    proc = _script("dream_generate.py", "--model", str(model_dir), "--seq-len", "8", "--decode", "--compare",
                   "--dataset", "random", "--num-prompts", "2", "--quiet", cwd=tmp_path)
    out = proc.stdout
    assert "cache decoded" in out and "speed-up of cache decoded vs no cache" in out and "peak memory" in out
    # what a new user needs to read the report: the warm-up is untimed, fed fraction defined, no stray bars
    assert "warm-up (untimed)" in out and "fed fraction = positions run through the model" in out
    assert "Loading weights" not in proc.stdout + proc.stderr and "batch/s" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("flags, label", [
    (["--dual", "--threshold", "0.5", "--block-size", "4"], "cache dual + threshold 0.5"),
    (["--greedy", "--sampling-alg", "random", "--window-size", "2"], "cache greedy"),
    (["--decode", "--cache-steps", "2"], "cache decoded"),
    (["--origin"], "no cache"),
])
def test_llada_generate_modes(tmp_path: Path, flags: list[str], label: str) -> None:
    tiny_llada().float().save_pretrained(tmp_path / "tiny-llada")
    out = _script("llada_generate.py", "--model", str(tmp_path / "tiny-llada"), "--seq-len", "8",
                  "--dataset", "random", "--num-prompts", "3", "--batch-size", "2", *flags, cwd=tmp_path).stdout
    # the report line of the chosen setting: at most 3 prompts × 8 tokens counted (up to EOS, which a random model
    # may write anywhere), and a fed fraction that shows whether the cache skipped work
    line = re.search(rf"^{re.escape(label)}: (\d+) response tokens \(up to EOS\) in [0-9.]+ s = [0-9.]+ tokens/s, "
                     r"([0-9.]+) tokens per forward, fed fraction ([0-9.]+)$", out, re.MULTILINE)
    assert line is not None, out
    tokens, per_forward, fed = int(line[1]), float(line[2]), float(line[3])
    assert 0 <= tokens <= 3 * 8 and 0 <= per_forward <= 8
    assert (fed == 1.0) if label == "no cache" else (0 < fed < 1.0)


def test_bench_matrix_writes_json_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install dkvcache[bench])")
    from dkvcache import bench_matrix

    monkeypatch.setitem(bench_matrix.MATRICES, "unit", {
        "model_kind": "llada", "vocab": 128, "hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2,
        "prompt_len": 8, "gen_len": 16, "dtype": "float32"})
    assert bench_matrix.main(["unit", "--batches", "1", "2", "--repeats", "1", "--threads", "1", "--out",
                              str(tmp_path), "--only", "decoded", "dual",
                              "--extra", "dual-t:use_cache=True,cache_type=dual,threshold=0.5"]) == 0
    summary = json.loads((tmp_path / "unit.json").read_text())
    labels = [r["label"] for r in summary["batches"]["1"]]
    assert labels == ["none", "decoded", "dual", "dual-t"] and (tmp_path / "unit-speedup.png").stat().st_size > 0


@pytest.mark.parametrize("script,flags", [("dream_generate.py", ["--decode"]), ("llada_generate.py", ["--dual"])])
def test_default_model_is_the_shipped_checkpoint_and_answers_right(tmp_path: Path, script: str,
                                                                   flags: list[str]) -> None:
    out = _script(script, "--num-prompts", "2", "--batch-size", "2", "--quiet", *flags, cwd=tmp_path).stdout
    assert "not found" not in out and "random" not in out
    assert "correct final answers 2/2" in out


def test_bench_matrix_on_the_shipped_tiny_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install dkvcache[bench])")
    from dkvcache import bench_matrix

    assert bench_matrix.main(["tiny-llada", "--batches", "2", "--repeats", "1", "--threads", "1", "--steps", "16",
                              "--out", str(tmp_path), "--only", "dual"]) == 0
    summary = json.loads((tmp_path / "tiny-llada.json").read_text())
    rows = summary["batches"]["2"]
    assert [r["label"] for r in rows] == ["none", "dual"] and rows[1]["fed_fraction"] < 1.0
    assert summary["config"]["model"].endswith("tiny-llada")
