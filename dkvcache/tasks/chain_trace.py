"""Where a decoder goes wrong on the chain task: every state it commits, how far ahead of the written path it was
and how uncertain the model was about it.

    python -m dkvcache.tasks.chain_trace --model assets/tiny-llada-chain alg=maskgit_plus decoding=eb_sampler

A state's *distance ahead* is the number of moves between it and the nearest state already written to its left
when it was committed (the start counts as written: the prompt gives it): 1 is the state after a written one;
d > 1 means the model composed d moves in one forward; 0 is the start itself (a copy). The trace reads every
step through the generation hook (``generation_tokens_hook_func``: the sequences after the step and that step's
logits), so it works for every decoder and cache and leaves the output unchanged (decoders that re-mask, WINO,
show it as ``remasked``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dkvcache.tasks import arith, chain

# Response offsets of the states: the start, then every second token (each move digit precedes its state).
STATE_OFFSETS = tuple([0] + [2 + 2 * i for i in range(chain.MOVES)])


@dataclass
class Commit:
    """One state written by one step."""

    row: int
    step: int
    state: int  # 0 = the start
    ahead: int  # moves from the nearest written state to its left (the prompt's start counts as written)
    right: bool
    entropy: float  # nats, of the model's distribution at that position in that step
    states_this_step: int  # states the row committed in the same step
    most_uncertain: bool  # the highest-entropy state the row committed in that step


@dataclass
class Trace:
    """One run: every committed state, the states a decoder took back, and whether each row's path was right."""

    commits: list[Commit] = field(default_factory=list)
    remasked: int = 0  # states a decoder took back (WINO)
    correct_rows: list[bool] = field(default_factory=list)

    def first_errors(self) -> list[Commit]:
        """The first wrong commitment of every row that committed one."""
        seen, out = set(), []
        for c in sorted(self.commits, key=lambda c: (c.row, c.step, c.state)):
            if not c.right and c.row not in seen:
                seen.add(c.row)
                out.append(c)
        return out


class _Recorder:
    """The generation hook: compares each step's sequences with the previous ones. Each ``diffusion_generate``
    call (one batch) starts with a call at ``step=None``: its initial sequences, whose first MASK is the
    response's start (prompts hold none)."""

    def __init__(self, result: Trace, gold: list[list[int]], mask_id: int) -> None:
        self.result, self.gold, self.mask_id = result, gold, mask_id
        self.first_row, self.batch, self.offsets, self.previous = 0, 0, None, None

    def __call__(self, step: int | None, x: Any, logits: Any) -> Any:
        import torch

        if step is None or logits is None:  # a new batch: the initial sequences
            self.first_row += self.batch
            self.batch = x.shape[0]
            width = int((x[0] == self.mask_id).nonzero()[0])
            self.offsets = torch.tensor(STATE_OFFSETS, device=x.device) + width
            self.previous = x.clone()
            return x
        before, after = self.previous[:, self.offsets].cpu(), x[:, self.offsets].cpu()
        entropy = torch.special.entr(logits[:, self.offsets].double().softmax(-1)).sum(-1).cpu()
        for row in range(x.shape[0]):
            was = (before[row] != self.mask_id).tolist()
            now = (after[row] != self.mask_id).tolist()
            self.result.remasked += sum(w and not n for w, n in zip(was, now))
            new = [i for i in range(len(STATE_OFFSETS)) if now[i] and not was[i]]
            if new:
                self._record(self.first_row + row, int(step), new, was, after[row], entropy[row])
        self.previous = x.clone()
        return x

    def _record(self, row: int, step: int, new: list[int], was: list[bool], tokens: Any, entropy: Any) -> None:
        top = max(new, key=lambda i: float(entropy[i]))
        for i in new:
            known = max([0] + [k for k in range(1, i) if was[k]])  # the prompt gives the start
            right = int(tokens[i]) == self.gold[row][STATE_OFFSETS[i]]
            self.result.commits.append(Commit(row, step, i, i - known, right, float(entropy[i]), len(new),
                                              i == top))


def trace(model: Any, tokenizer: Any, rows: Sequence[dict], batch_size: int = 100, **gen_kwargs: Any) -> Trace:
    """Generate ``rows`` with ``gen_kwargs`` through :func:`dkvcache.tasks.chain.evaluate` (its batching and
    scoring) and record every committed state (see the module docstring)."""
    if "generation_tokens_hook_func" in gen_kwargs:
        raise ValueError("generation_tokens_hook_func is the trace's own hook; pass the other settings only")
    result = Trace()
    gold = [tokenizer(r["answer"], add_special_tokens=False)["input_ids"] for r in rows]
    hook = _Recorder(result, gold, model.config.mask_token_id)
    scored = chain.evaluate(model, tokenizer, rows, batch_size=batch_size, generation_tokens_hook_func=hook,
                            **gen_kwargs)
    result.correct_rows = [p["correct"] for p in scored["predictions"]]
    return result


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def summary(result: Trace) -> str:
    """Markdown: commitments by distance ahead, then the rows' first errors."""
    lines = ["| distance ahead | states committed | wrong | a row's first wrong | median entropy (right) | "
             "median entropy (wrong) |", "|---|---|---|---|---|---|"]
    first = result.first_errors()
    for d in sorted({c.ahead for c in result.commits}):
        at = [c for c in result.commits if c.ahead == d]
        right = [c.entropy for c in at if c.right]
        wrong = [c.entropy for c in at if not c.right]
        cells = [f"{_median(v):.2g}" if v else "-" for v in (right, wrong)]
        firsts = sum(c.ahead == d for c in first)
        lines.append(f"| {d} | {len(at)} | {len(wrong)} | {firsts} | {cells[0]} | {cells[1]} |")
    n, ok = len(result.correct_rows), sum(result.correct_rows)
    lines += ["", f"{ok}/{n} paths right; {len(first)} rows committed a wrong state"
                  + (f", {result.remasked} states re-masked" if result.remasked else "") + "."]
    if first:
        top = sum(c.most_uncertain and c.states_this_step > 1 for c in first)
        ahead = sorted(c.ahead for c in first)
        lines.append(f"First wrong state of each such row: distance ahead {ahead[0]}-{ahead[-1]} (median "
                     f"{_median(ahead)}), entropy median {_median([c.entropy for c in first]):.2g} nats; in {top} "
                     f"of {len(first)} it was the most uncertain of several states its step committed.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dkvcache.tasks.chain_trace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a chain checkpoint (e.g. assets/tiny-llada-chain)")
    ap.add_argument("--limit", type=int, default=100, help="held-out items to trace (default 100)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args, rest = ap.parse_known_args(argv)
    if args.limit < 1 or args.batch_size < 1:
        raise ValueError(f"--limit and --batch-size must be positive, got {args.limit} and {args.batch_size}")
    overrides = arith.parse_overrides(rest)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = arith.load_model(args.model)
    kwargs = chain.merge_kwargs(model.diffusion_family, overrides)
    result = trace(model, tokenizer, chain.load_jsonl(limit=args.limit), batch_size=args.batch_size, **kwargs)
    print(f"{args.model}, {kwargs}:\n")
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
