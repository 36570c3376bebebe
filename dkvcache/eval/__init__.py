"""Evaluation harness: gsm8k, math-500, humaneval, mbpp and the tiny task, for every model and cache strategy.

``python -m dkvcache.eval [group=option ...] [key=value ...]`` (also ``dkvcache-eval`` and
``accelerate launch -m dkvcache.eval``). Config groups live in ``dkvcache/configs`` (see docs/eval.md).

Modules: config (compose + resolve), datasets, fewshot, prompts, engine (model + generate), scoring, programs
(code post-processing), sandbox (code execution), records (resumable JSONL), summary, dist (accelerate), runner,
cli, lm_eval_adapter (lm-evaluation-harness model "dkvcache").
"""

from __future__ import annotations

from typing import Any


def main(argv: Any = None) -> int:
    from dkvcache.eval.cli import main as cli_main

    return cli_main(argv)


def evaluate(overrides: list[str] | tuple[str, ...] = ()) -> dict | None:
    """Compose + resolve ``overrides`` and run; the summary (rank 0) or None."""
    from dkvcache.eval.config import load
    from dkvcache.eval.runner import run

    return run(load(overrides))


__all__ = ["evaluate", "main"]
