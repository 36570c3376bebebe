"""Fast tests of the benchmark (dkvcache.bench) and the Dream example script on tiny random models."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dkvcache import bench
from models import DreamConfig, DreamModel

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


def _tiny_dream_dir(path: Path, with_tokenizer: bool) -> Path:
    torch.manual_seed(0)
    config = DreamConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, mask_token_id=319, pad_token_id=0,
                         eos_token_id=0, bos_token_id=0)
    DreamModel(config).save_pretrained(path)
    if with_tokenizer:
        from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
        from tokenizers import models as tok_models

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


def test_dream_generate_script_exits_zero(tmp_path: Path) -> None:
    model_dir = _tiny_dream_dir(tmp_path / "tiny-dream", with_tokenizer=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"question": q}) for q in ["What is the capital?", "Paris?", "Hi"]))
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--model", str(model_dir), "--seq-len", "8",
                           "--batch-size", "2", "--prompts-file", str(prompts)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "What is the capital?" in proc.stdout and "tokens/s" in proc.stdout
    assert "fed fraction 1.000" in proc.stdout


def test_dream_generate_without_tokenizer_and_missing_cache(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            one_thread: None) -> None:
    spec = importlib.util.spec_from_file_location("dream_generate_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model_dir = _tiny_dream_dir(tmp_path / "no-tok", with_tokenizer=False)
    assert example.main(["--model", str(model_dir), "--seq-len", "8", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "random prompt ids" in out and "tokens per forward" in out
    if "decoded" not in example.available_strategies():
        assert example.main(["--model", str(model_dir), "--decode"]) == 2
        assert "available" in capsys.readouterr().err


def test_dream_generate_random_fallback(tmp_path: Path, capsys: pytest.CaptureFixture, one_thread: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("dream_generate_example_fallback", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(example, "DEFAULT_MODEL", tmp_path / "absent")
    assert example.main(["--seq-len", "8", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "random-init Dream model" in out and out.count("(random prompt ids)") == 2
