"""``python -m dkvcache.eval`` / ``dkvcache-eval`` / ``accelerate launch -m dkvcache.eval``: parse, print, run.

Arguments are Hydra overrides: ``group=option`` (model, dataset, cache, generation), ``key=value``,
``+key=value`` for keys the yaml does not have. Flags: ``--help``, ``--list`` (options of every group and the
registered cache strategies), ``--cfg`` (print the resolved config and exit).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from dkvcache.eval import config as config_mod

MODULE_PROG = "python -m dkvcache.eval"
USAGE = """usage: {prog} [group=option ...] [key=value ...] [--list] [--cfg] [--help]

  {prog} model=tiny-dream dataset.name=arith dataset.limit=100 cache=decoded
  {prog} dataset.name=gsm8k batch_size=8 seed=1234 cache=prefix generation=vanilla \\
      model=dream-inst generation.threshold=0.9
  accelerate launch -m dkvcache.eval dataset.name=gsm8k model=llada-inst cache=dual
  {prog} dataset.name=gsm8k dataset.path=/data/gsm8k_test.jsonl model.path=/ckpt/llada  # offline

groups: {groups}
Results: <output_dir>/<run_name>/samples.jsonl (appended after every batch; a killed run resumes) and summary.json.
See docs/eval.md for every key and the per-(model, task) defaults.
"""


def prog_name(argv0: str | None = None) -> str:
    """How this process was started, for the usage line: ``dkvcache-eval`` (the console script),
    ``python -m dkvcache.eval`` (``-m``, also under ``accelerate launch -m``), ``python eval.py`` (a script)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    base = os.path.basename(argv0 or "")
    if not base or base in ("-c", "-m") or base.startswith("__main__") or base == "cli.py":
        return MODULE_PROG
    if base.endswith(".py"):
        return f"python {argv0}"
    return base.removesuffix(".exe")


def _groups_text() -> str:
    return "; ".join(f"{g}=" + "|".join(config_mod.group_options(g)) for g in config_mod.GROUPS)


def list_options() -> str:
    """The options of every group, and which cache options have a registered strategy."""
    from dkvcache.caches import available_strategies

    strategies = available_strategies()
    lines = [f"{g}: {', '.join(config_mod.group_options(g))}" for g in config_mod.GROUPS]
    lines.append("registered cache strategies (cache_type: options): " +
                 "; ".join(f"{k}: {', '.join(sorted(v)) or '-'}" for k, v in sorted(strategies.items())))
    try:
        from dkvcache.decoders import decoding_knobs

        lines.append("decodings (generation.decoding: knobs): " +
                     "; ".join(f"{k}: {', '.join(v) or '-'}" for k, v in decoding_knobs().items()))
    except ImportError:
        pass
    missing = []
    for option in config_mod.group_options("cache"):
        cache_type = config_mod.compose([f"cache={option}"])["cache"]["cache_type"]
        if cache_type not in strategies:
            missing.append(f"{option} (needs {cache_type!r})")
    if missing:
        lines.append("cache options whose strategy is not registered yet: " + ", ".join(missing))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); ``prog`` names the command in the usage text
    (default: from ``sys.argv[0]``, see :func:`prog_name`). Returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE.format(prog=prog or prog_name(), groups=_groups_text()))
        return 0
    if "--list" in args:
        print(list_options())
        return 0
    print_only = "--cfg" in args
    overrides = [a for a in args if a != "--cfg"]
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        print(f"dkvcache.eval: unknown flag(s) {flags}; arguments are key=value overrides (see --help)",
              file=sys.stderr)
        return 2
    from dkvcache.eval.datasets import DatasetUnavailable
    from dkvcache.eval.engine import GenerationRejected
    from dkvcache.eval.runner import RunConflict, run

    try:
        cfg = config_mod.load(overrides)
    except config_mod.EvalConfigError as err:
        print(f"dkvcache.eval: {err}", file=sys.stderr)
        return 2
    from dkvcache.eval.dist import init

    dist = init(cfg.get("device")) if not print_only else None
    if dist is None or dist.is_main:
        print(config_mod.to_yaml(cfg), flush=True)
    if print_only:
        return 0
    try:
        summary = run(cfg, dist)
    except (DatasetUnavailable, GenerationRejected, RunConflict, config_mod.EvalConfigError) as err:
        print(f"dkvcache.eval: {err}", file=sys.stderr)
        return 2
    if summary is not None:
        shown = {k: v for k, v in summary.items() if k not in ("config", "versions")}
        print(json.dumps(shown, indent=2, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m dkvcache.eval.cli"))
