"""Eval harness edges: empty and malformed datasets, concurrent merges and runs of one run directory, refused
combinations that must write nothing, the ``cache=d2`` alias, the command name in ``--help``."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra", reason="the eval extras (pip install -e '.[eval]') are not installed")
pytest.importorskip("math_verify", reason="the eval extras (pip install -e '.[eval]') are not installed")

from dkvcache.eval import cli, records, runner  # noqa: E402
from dkvcache.eval import config as C  # noqa: E402
from dkvcache.eval import datasets as D  # noqa: E402
from dkvcache.eval.engine import GenerationRejected  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _cli(capsys: pytest.CaptureFixture, out: Path, *overrides: str) -> tuple[int, str]:
    code = cli.main(["model=tiny-dream", f"output_dir={out}", "progress=false", "threads=1", "device=cpu",
                     *overrides])
    return code, capsys.readouterr().err


# -- 5. an empty dataset --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_dataset_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture, text: str) -> None:
    """It used to run 0 items and exit 0 with an empty summary."""
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(text)
    code, err = _cli(capsys, tmp_path / "out", "dataset=gsm8k", f"dataset.path={data}")
    assert code == 2 and f"dataset.path={str(data)!r} has no items" in err
    assert not (tmp_path / "out").exists()


# -- 6. malformed JSONL ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, where, what", [
    (b'{"question": "q", "answer": "#### 1"}\n"just a string"\n', ":2:", "a JSON string, not an object"),
    (b'[1, 2]\n', ":1:", "a JSON array, not an object"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff\xfe"}\n', ":2:", "not UTF-8"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": \n', ":2:", "not a JSON line"),
])
def test_bad_jsonl_line_names_the_file_and_line(tmp_path: Path, content: bytes, where: str, what: str) -> None:
    data = tmp_path / "gsm8k.jsonl"
    data.write_bytes(content)
    with pytest.raises(D.DatasetUnavailable) as info:
        D.load_items({"name": "gsm8k", "path": str(data)})
    assert f"{data}{where}" in str(info.value) and what in str(info.value)


def test_dataset_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(D.DatasetUnavailable, match="is a directory; allowed: a JSONL file"):
        D.load_items({"name": "gsm8k", "path": str(tmp_path)})
    with pytest.raises(D.DatasetUnavailable, match=f"{tmp_path}: is a directory"):
        D.read_jsonl(str(tmp_path))


# -- 7. one run directory, two processes ------------------------------------------------------------------------
ROUNDS, SHARDS, PER_SHARD = 12, 3, 200


def _merge_rounds(run_dirs: list[str], barrier) -> None:
    for run_dir in run_dirs:
        barrier.wait(timeout=30)
        records.merge(run_dir)


def test_two_processes_merging_one_run_keep_every_record(tmp_path: Path) -> None:
    """merge() used one fixed samples.jsonl.tmp: two merging processes lost records or crashed."""
    run_dirs = []
    for r in range(ROUNDS):
        run_dir = tmp_path / f"run{r}"
        run_dir.mkdir()
        for rank in range(SHARDS):
            recs = [{"id": f"s{rank}-{i}", "index": rank * PER_SHARD + i, "completion": "x" * 200}
                    for i in range(PER_SHARD)]
            records.RecordWriter(str(run_dir / records.shard_name(rank))).append(recs)
        run_dirs.append(str(run_dir))
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_merge_rounds, args=(run_dirs, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for run_dir in run_dirs:
        merged = records.read_records(os.path.join(run_dir, records.SAMPLES))
        assert len(merged) == SHARDS * PER_SHARD == len({r["id"] for r in merged})
        left = sorted(n for n in os.listdir(run_dir) if not n.startswith("."))
        assert left == [records.SAMPLES], left  # no shard, no temporary file


def _hold_run_lock(run_dir: str, locked, release) -> None:
    with records.run_lock(run_dir):
        locked.set()
        release.wait(timeout=60)


def test_second_run_with_the_same_run_name_is_refused_while_the_first_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = ("dataset.limit=1", "run_name=shared", "generation.gen_length=8")
    run_dir = tmp_path / "out" / "shared"
    ctx = multiprocessing.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()
    first = ctx.Process(target=_hold_run_lock, args=(str(run_dir), locked, release))  # the first run, in progress
    first.start()
    try:
        assert locked.wait(timeout=30)
        code, err = _cli(capsys, tmp_path / "out", *overrides)
        assert code == 2 and "in use by another dkvcache.eval run" in err and f"pid {first.pid}" in err
        assert not (run_dir / records.SAMPLES).exists() and not (run_dir / records.CONFIG).exists()
    finally:
        release.set()
        first.join(timeout=30)
        if first.is_alive():
            first.kill()
    assert first.exitcode == 0
    code, _ = _cli(capsys, tmp_path / "out", *overrides)  # once the first is done, the run goes ahead
    assert code == 0 and len(records.read_records(str(run_dir / records.SAMPLES))) == 1


# -- 8. a refused combination writes nothing ----------------------------------------------------------------------
def test_refused_combination_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """cache=dual generation=wino used to fail at the first batch, after writing outputs/<run>/config.yaml."""
    code, err = _cli(capsys, tmp_path / "out", "cache=dual", "generation=wino")
    assert code == 2 and "decoding='wino'" in err and "cache_type='dual'" in err
    assert not (tmp_path / "out").exists()


def test_refused_combination_fails_before_the_weights_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the settings were checked")

    monkeypatch.setattr(runner, "load_model", no_weights)
    cfg = C.load(["cache=dual", "generation=wino", f"output_dir={tmp_path}", "device=cpu"])
    with pytest.raises(GenerationRejected, match="wino"):
        runner.run(cfg, log=lambda *_: None)
    assert not any(tmp_path.iterdir())


# -- 9. cache=d2 -----------------------------------------------------------------------------------------------
def test_cache_d2_is_the_d2cache_preset(capsys: pytest.CaptureFixture) -> None:
    """d2 is a registered strategy but cache=d2 was a Hydra error ("Could not find 'cache/d2'")."""
    assert C.load(["cache=d2"]) == C.load(["cache=d2cache"])
    assert C.load(["cache=d2", "cache.current_k=16"])["cache"]["current_k"] == 16
    assert cli.main(["--cfg", "cache=d2"]) == 0
    assert "cache_type: d2" in capsys.readouterr().out


# -- 10. the command name in --help ---------------------------------------------------------------------------
def _help(cmd: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()[0]


def test_help_names_the_command_it_was_started_as(capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`dkvcache-eval --help` used to print `usage: python -m dkvcache.eval`."""
    assert _help([sys.executable, "-m", "dkvcache.eval"]).startswith("usage: python -m dkvcache.eval [")
    script = Path(sys.executable).parent / "dkvcache-eval"
    if script.exists():
        assert _help([str(script)]).startswith("usage: dkvcache-eval [")
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/dkvcache-eval", "--help"])
    assert cli.main() == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dkvcache-eval [") and "\n  dkvcache-eval model=tiny-dream" in out
    assert "python -m dkvcache.eval model=" not in out
