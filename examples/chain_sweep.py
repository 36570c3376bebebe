#!/usr/bin/env python3
"""Train several seeds of a chain-task checkpoint side by side, run the yardstick on each, and check the
yardstick's acceptance criteria: per run the signal (``chain_tables.signal``: defaults within 2 points of
vanilla, an aggressive row 15+ below it), per pair of runs the ranking (``chain_tables.compare_groups``).

    python examples/chain_sweep.py --arch llada --seeds 0 1 2 3 --jobs 4 --device cuda --out outputs/sweep \\
        -- --layers 4 --hidden 256 --steps 20000 --batch-size 128
    python examples/chain_sweep.py --arch dream --seeds 0 1 --out outputs/sweep -- --ar-steps 1500   # CPU

Everything after ``--`` goes to ``examples/train_tiny.py`` unchanged (``--task chain``, ``--arch``, ``--seed``,
``--out``, ``--device`` and ``--threads`` are set here). Runs are independent processes, ``--jobs`` at a time,
so one GPU (the tiny models are launch-bound there) or the CPU cores are shared; every process's output goes to
``OUT/<arch>-s<seed>.log``. Writes ``OUT/<arch>-s<seed>/`` (the checkpoint and its ``yardstick.json``) and
``OUT/summary.json``, and prints the summary as markdown. A run whose training fails is reported and left out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dkvcache.tasks import chain_tables  # noqa: E402  (after the path fix, like the other examples)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, choices=["dream", "llada"])
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="one training run per seed")
    ap.add_argument("--out", required=True, help="directory for the checkpoints, logs and summary.json")
    ap.add_argument("--jobs", type=int, default=2, help="processes at a time (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for training and the yardstick")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    ap.add_argument("--limit", type=int, default=None, help="held-out items per yardstick row (default all 300)")
    ap.add_argument("--batch-size", type=int, default=100, help="yardstick batch size (default 100)")
    args = ap.parse_args(own)
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds must be distinct, got {args.seeds}")
    if args.jobs < 1 or args.threads < 1:
        ap.error(f"--jobs and --threads must be >= 1, got {args.jobs} and {args.threads}")
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")
    owned = {"--task", "--arch", "--seed", "--out", "--device", "--threads"}
    if clash := sorted(owned.intersection(a.split("=")[0] for a in train_extra)):
        ap.error(f"set by the sweep, not after '--': {', '.join(clash)}")
    return args, train_extra


def run_all(commands: dict[str, list[str]], logs: dict[str, str], jobs: int) -> dict[str, int]:
    """Run every command (``jobs`` at a time), each writing to its log; the exit code of each."""
    pending, running, codes = list(commands), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            log = open(logs[name], "w", encoding="utf-8")  # noqa: SIM115  (closed when the process ends)
            running[name] = (subprocess.Popen(commands[name], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log)
        done = [name for name, (proc, _) in running.items() if proc.poll() is not None]
        if not done:
            time.sleep(0.2)
        for name in done:
            proc, log = running.pop(name)
            codes[name] = proc.returncode
            log.close()
            print(f"  {name}: exit {codes[name]} ({logs[name]})", flush=True)
    return codes


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per run the signal, per pair the row-group ranking check, over the saved yardstick tables ``runs``."""
    signals = {name: chain_tables.signal(rows) for name, rows in runs.items()}
    pairs = {f"{a} vs {b}": chain_tables.compare_groups(runs[a], runs[b])
             for a, b in itertools.combinations(sorted(runs), 2)}
    return {"signal": signals, "ranking": pairs}


def markdown(summary: dict) -> str:
    lines = ["| run | vanilla | worst default | strongest aggressive | signal |", "|---|---|---|---|---|"]
    for name, sig in summary["signal"].items():
        (worst, w), (strong, s) = sig["worst_default"], sig["strongest_aggressive"]
        lines.append(f"| {name} | {100 * sig['vanilla']:.1f} % | {worst} {0.0 - w:+.1f} | {strong} {0.0 - s:+.1f} | "
                     f"{'met' if sig['met'] else 'not met'} |")
    if summary["ranking"]:
        groups = list(next(iter(summary["ranking"].values())))
        lines += ["", "| pair | " + " | ".join(f"{g}: τ-b / inversions" for g in groups) + " |",
                  "|---|" + "---|" * len(groups)]
        for pair, result in summary["ranking"].items():
            cells = [f"{result[g]['kendall_tau_b']:.2f} / {len(result[g]['inversions'])}" for g in groups]
            lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args, train_extra = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    names = {seed: f"{args.arch}-s{seed}" for seed in args.seeds}
    dirs = {name: os.path.join(args.out, name) for name in names.values()}
    common = ["--device", args.device, "--threads", str(args.threads)]
    train = {name: [sys.executable, os.path.join(ROOT, "examples", "train_tiny.py"), "--task", "chain", "--arch",
                    args.arch, "--seed", str(seed), "--out", dirs[name], *common, *train_extra]
             for seed, name in names.items()}
    print(f"training {len(train)} runs, {args.jobs} at a time:", flush=True)
    codes = run_all(train, {n: dirs[n] + ".log" for n in train}, args.jobs)
    trained = [n for n in train if codes[n] == 0]
    limit = ["--limit", str(args.limit)] if args.limit else []
    tables = {name: [sys.executable, "-m", "dkvcache.tasks.chain", "--model", dirs[name], "--table", "yardstick",
                     "--batch-size", str(args.batch_size), "--save", os.path.join(dirs[name], "yardstick.json"),
                     *common, *limit] for name in trained}
    print(f"yardstick on {len(tables)} checkpoints:", flush=True)
    codes.update({f"{n} yardstick": c for n, c in
                  run_all(tables, {n: dirs[n] + "-yardstick.log" for n in tables}, args.jobs).items()})
    runs = {}
    for name in trained:
        path = os.path.join(dirs[name], "yardstick.json")
        if codes[f"{name} yardstick"] == 0 and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                runs[name] = json.load(f)
    summary = {"arch": args.arch, "train_args": train_extra, "exit_codes": codes, **summarize(runs)}
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=list)
        f.write("\n")
    print("\n" + markdown(summary))
    failed = sorted(set(train) - set(runs))
    if failed:
        print(f"\nleft out (training or yardstick failed, see the logs): {', '.join(failed)}")
    return 0 if runs and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
