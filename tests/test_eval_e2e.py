"""End to end: the eval harness on a tiny checkpoint and the shipped tiny task, resume after a kill, two processes
under accelerate, and the lm-eval adapter on a local task.

Quality-bearing tests use assets/tiny-dream when it exists (its scores must equal dkvcache.tasks.arith's own
evaluation), else a random tiny Dream; the mechanics tests (resume, kill, accelerate) always use a 1-layer random
model with the task's tokenizer, which keeps them fast.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("hydra", reason="the eval extras (pip install -e '.[eval]') are not installed")
pytest.importorskip("math_verify", reason="the eval extras (pip install -e '.[eval]') are not installed")

from dkvcache.eval import config as C  # noqa: E402
from dkvcache.eval import records, runner  # noqa: E402
from dkvcache.tasks import arith  # noqa: E402

pytestmark = pytest.mark.slow  # deselect with -m "not slow" (README)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "assets" / "tiny-dream"


def _small_random_dream(tokenizer_dir: Path, out: Path) -> None:
    """A 1-layer random Dream with the tokenizer (and special ids) of ``tokenizer_dir``: fast mechanics tests."""
    from models import DreamConfig, DreamModel

    big = json.loads((tokenizer_dir / "config.json").read_text())
    config = DreamConfig(vocab_size=big["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         mask_token_id=big["mask_token_id"], bos_token_id=big["bos_token_id"],
                         eos_token_id=big["eos_token_id"], pad_token_id=big["pad_token_id"])
    DreamModel(config).eval().save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", "generation_config.json", "model.safetensors") \
                and not f.name.endswith(".jsonl"):
            shutil.copy(f, out / f.name)


def _built_dream(out: Path) -> None:
    """Without the shipped checkpoint: examples/train_tiny.py's tokenizer and config, random weights."""
    script = REPO / "examples" / "train_tiny.py"
    if not script.exists():
        pytest.skip("neither assets/tiny-dream nor examples/train_tiny.py is present")
    spec = importlib.util.spec_from_file_location("train_tiny_for_eval", script)
    train_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny)
    tokenizer = train_tiny.build_tokenizer("dream")
    sizes = SimpleNamespace(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64, rope_theta=10000.0)
    train_tiny.make_model("dream", train_tiny.make_config("dream", tokenizer, sizes)).save_pretrained(out)
    train_tiny.save_tokenizer(tokenizer, str(out))


def _shipped() -> bool:
    return (SHIPPED / "config.json").exists() and (SHIPPED / "model.safetensors").exists()


@pytest.fixture(scope="module")
def fast_dream(tmp_path_factory) -> SimpleNamespace:
    """A small random tiny-dream-like checkpoint (chat template, the task's tokenizer): the mechanics tests."""
    out = tmp_path_factory.mktemp("fast-dream")
    if _shipped():
        _small_random_dream(SHIPPED, out)
    else:
        _built_dream(out)
    return SimpleNamespace(path=str(out), trained=False)


@pytest.fixture(scope="module")
def tiny_dream(fast_dream: SimpleNamespace) -> SimpleNamespace:
    """The shipped trained checkpoint when present, else the fast random one."""
    return SimpleNamespace(path=str(SHIPPED), trained=True) if _shipped() else fast_dream


def _overrides(ckpt: SimpleNamespace, out: Path, *extra: str) -> list[str]:
    return ["model=tiny-dream", f"model.path={ckpt.path}", "dataset=arith", f"output_dir={out}", "threads=1",
            "progress=false", *extra]


def _samples(run_dir: str) -> list[dict]:
    return records.read_records(os.path.join(run_dir, records.SAMPLES))


def test_eval_two_cache_settings(tiny_dream: SimpleNamespace, tmp_path: Path) -> None:
    summaries = {}
    for cache in ("none", "decoded"):
        cfg = C.load(_overrides(tiny_dream, tmp_path, f"cache={cache}", "dataset.limit=4", "batch_size=4"))
        summary = runner.run(cfg, log=lambda *_: None)
        samples = _samples(summary["run_dir"])
        assert [s["index"] for s in samples] == [0, 1, 2, 3]
        for s in samples:
            assert {"id", "prompt", "completion", "score", "seconds", "response_tokens", "forwards",
                    "fed_fraction"} <= set(s)
            assert s["forwards"] > 0 and 0 < s["fed_fraction"] <= 1 and 0 <= s["response_tokens"] <= 64
        for key in ("accuracy", "tokens_per_s", "tokens_per_forward", "latency_s", "fed_fraction", "config",
                    "versions", "environment"):
            assert summary[key] is not None, key
        assert summary["complete"] and summary["n"] == 4 and summary["versions"]["torch"]
        on_disk = json.loads(Path(summary["run_dir"], records.SUMMARY).read_text())
        assert on_disk["accuracy"] == summary["accuracy"] and on_disk["config"]["cache"]["cache_type"] == cache
        summaries[cache] = summary
    assert summaries["none"]["fed_fraction"] == 1.0 > summaries["decoded"]["fed_fraction"]
    assert summaries["none"]["run_name"] != summaries["decoded"]["run_name"]


def test_matches_the_tiny_task_evaluator(tiny_dream: SimpleNamespace, tmp_path: Path) -> None:
    """Same prompts, same keywords, batch 1: the harness scores exactly what dkvcache.tasks.arith scores."""
    cfg = C.load(_overrides(tiny_dream, tmp_path, "dataset.limit=2", "batch_size=1"))
    summary = runner.run(cfg, log=lambda *_: None)
    model, tokenizer = arith.load_model(tiny_dream.path)
    rows = arith.load_jsonl(limit=2)
    reference = arith.evaluate(model, tokenizer, rows, batch_size=1, **C.generate_kwargs(cfg))
    assert [s["score"] for s in _samples(summary["run_dir"])] == [float(p["correct"]) for p in
                                                                   reference["predictions"]]


def test_resume_skips_done_samples_and_a_torn_line(fast_dream: SimpleNamespace, tmp_path: Path) -> None:
    base = _overrides(fast_dream, tmp_path / "a", "dataset.limit=5", "batch_size=2")
    first = runner.run(C.load([*base, "max_batches=1"]), log=lambda *_: None)
    assert first["n"] == 2 and not first["complete"]
    path = Path(first["run_dir"], records.SAMPLES)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "arith-0004", "index": 4, "completion": "tor')  # a writer killed mid-line
    final = runner.run(C.load(base), log=lambda *_: None)
    samples = _samples(final["run_dir"])
    assert sorted(s["id"] for s in samples) == [f"arith-{i:04d}" for i in range(5)] and final["complete"]
    fresh = runner.run(C.load(_overrides(fast_dream, tmp_path / "b", "dataset.limit=5", "batch_size=2")),
                       log=lambda *_: None)
    assert [s["completion"] for s in samples] == [s["completion"] for s in _samples(fresh["run_dir"])]
    with pytest.raises(runner.RunConflict):
        runner.run(C.load([*base, f"run_name={final['run_name']}", "seed=7"]), log=lambda *_: None)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def test_kill_and_resume_leaves_one_line_per_sample(fast_dream: SimpleNamespace, tmp_path: Path) -> None:
    overrides = _overrides(fast_dream, tmp_path, "dataset.limit=20", "batch_size=1")
    run_dir = os.path.join(tmp_path, C.load(overrides)["run_name"])
    proc = subprocess.Popen([sys.executable, "-m", "dkvcache.eval", *overrides], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and len(_samples(run_dir)) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(_samples(run_dir))
    assert 2 <= done_before < 20
    final = runner.run(C.load([*overrides, "batch_size=4"]), log=lambda *_: None)  # batch size may change
    ids = [s["id"] for s in _samples(final["run_dir"])]
    assert ids == [f"arith-{i:04d}" for i in range(20)] and final["complete"]


def test_two_processes_under_accelerate_match_one(fast_dream: SimpleNamespace, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    overrides = _overrides(fast_dream, tmp_path / "two", "dataset.limit=4", "batch_size=1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dkvcache.eval",
           *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=dict(_env(), ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                          timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "two" / C.load(overrides)["run_name"]
    two = _samples(str(run_dir))
    summary = json.loads((run_dir / records.SUMMARY).read_text())
    assert summary["environment"]["num_processes"] == 2 and summary["complete"]
    assert {s["rank"] for s in two} == {0, 1} and not list(run_dir.glob("samples.rank*.jsonl"))
    one = _samples(runner.run(C.load(_overrides(fast_dream, tmp_path / "one", "dataset.limit=4", "batch_size=1")),
                              log=lambda *_: None)["run_dir"])
    keys = ("id", "completion", "score", "response_tokens", "forwards")
    assert [[s[k] for k in keys] for s in two] == [[s[k] for k in keys] for s in one]


def test_lm_eval_adapter_on_a_local_task(tiny_dream: SimpleNamespace, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from dkvcache.eval.lm_eval_adapter import DkvcacheLM

    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arith.load_jsonl(limit=4)))
    (tmp_path / "toy.yaml").write_text(f"""task: dkv_toy_arith
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer.split('#### ')[-1]}}}}"
generation_kwargs: {{until: ["<|im_end|>"], max_gen_toks: 64}}
filter_list:
  - name: strict
    filter: [{{function: regex, regex_pattern: "#### (-?[0-9]+)"}}, {{function: take_first}}]
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
metadata: {{version: 1.0}}
""")
    lm = DkvcacheLM(model="tiny-dream", pretrained=tiny_dream.path, cache="dual", threshold=0.9, device="cpu",
                    batch_size=2, mc_num=8, mc_batch_size=4)
    out = simple_evaluate(model=lm, tasks=["dkv_toy_arith"], apply_chat_template=True, bootstrap_iters=0,
                          log_samples=True,
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    score = out["results"]["dkv_toy_arith"]["exact_match,strict"]
    assert 0.0 <= score <= 1.0
    responses = [s["resps"][0][0] for s in sorted(out["samples"]["dkv_toy_arith"], key=lambda s: s["doc_id"])]
    # the same prompts, settings and batches through the harness give the same completions
    harness = runner.run(C.load(_overrides(tiny_dream, tmp_path / "h", "cache=dual", "generation.threshold=0.9",
                                           "dataset.limit=4", "batch_size=2")), log=lambda *_: None)
    assert responses == [s["completion"] for s in _samples(harness["run_dir"])]
    ll = lm.loglikelihood([SimpleNamespace(args=("Tom has 2 figs and 3 limes.", " 5"))])
    assert len(ll) == 1 and math.isfinite(ll[0][0]) and ll[0][0] < 0 and ll[0][1] is False
    with pytest.raises(NotImplementedError):
        lm.loglikelihood_rolling([])
