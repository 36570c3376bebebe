"""The chain task's accuracy-vs-speed table: every strategy and decoder at its defaults and at one aggressive
setting, on the same held-out items in one process, with a Wilson 95 % interval per row.

    python -m dkvcache.tasks.chain --model assets/tiny-llada-chain --table yardstick --plot llada.png

The first row is vanilla decoding (one token a step, no cache), the speed-up reference. ``compare`` checks that
two checkpoints (two training seeds) rank the rows the same way::

    python -m dkvcache.tasks.chain --model A --table yardstick --save a.json
    python -m dkvcache.tasks.chain --model B --table yardstick --save b.json
    python -m dkvcache.tasks.chain_tables a.json b.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

TABLES = ("yardstick",)
RANDOM_ORDER = "(random order)"  # rows decoding in a random order; measured against vanilla in that order


def is_reference(label: str) -> bool:
    """Vanilla decoding rows (no cache, one token a step): what the strategies are measured against."""
    return label.startswith("vanilla")


# Row groups of the two-seed check (by the row labels of the yardstick table): which rows rank the same way.
_CACHE_WORDS = ("dKV", "Fast-dLLM", "dLLM-Cache", "d2Cache")
ROW_GROUPS: dict[str, Any] = {
    "all rows": lambda label: True,
    "the defaults (no !)": lambda label: not label.startswith("!"),
    "one token a step with a cache, and vanilla": lambda label: "threshold" not in label and (
        is_reference(label) or any(word in label for word in _CACHE_WORDS)),
    "without a cache": lambda label: not any(word in label for word in _CACHE_WORDS),
}


def _yardstick(family: str, gen: int) -> list[tuple[str, dict]]:
    """(label, overrides): each strategy/decoder at its defaults, then its aggressive setting (marked "!")."""
    cache = {"use_cache": True}
    prob = {"alg": "maskgit_plus"} if family == "dream" else {}  # thresholds need a probability score
    block = {"block_length": 32, **prob}
    rows: list[tuple[str, dict]] = [
        ("vanilla (one token a step)", {}),
        (f"! steps {gen // 4} (4 tokens a step)", {"steps": gen // 4}),
        ("dKV decoded, cache_steps 4", {**cache, "cache_type": "decoded", "cache_steps": 4}),
        (f"! dKV decoded, cache_steps {gen} (never refreshed)",
         {**cache, "cache_type": "decoded", "cache_steps": gen}),
        ("dKV prefill", {**cache, "cache_type": "prefill"}),
        ("dKV pd, cache_steps 4", {**cache, "cache_type": "pd", "cache_steps": 4}),
        (f"! dKV pd, cache_steps {gen} (never refreshed)", {**cache, "cache_type": "pd", "cache_steps": gen}),
    ]
    if family == "dream":  # the original's shift rule: caches a still-MASK position once its right neighbour is set
        rows.append(("! dKV decoded, cache_steps 4, shift 'un' (the original's)",
                     {**cache, "cache_type": "decoded", "cache_steps": 4, "shift_type": "un"}))
    if family == "llada":  # Greedy needs random remasking: its reference is vanilla in that order (as in its paper)
        greedy = {**cache, "cache_type": "greedy", "remasking": "random", "seed": 0}
        rows += [(f"vanilla {RANDOM_ORDER}", {"remasking": "random", "seed": 0}),
                 ("dKV greedy, cache_steps 2 (random order)", {**greedy, "cache_steps": 2}),
                 ("! dKV greedy, cache_steps 8 (random order)", {**greedy, "cache_steps": 8})]
    rows += [
        ("Fast-dLLM prefix, block 32", {**cache, "cache_type": "prefix", **block}),
        ("Fast-dLLM dual, block 32", {**cache, "cache_type": "dual", **block}),
        ("Fast-dLLM dual + threshold 0.9", {**cache, "cache_type": "dual", **block, "threshold": 0.9}),
        ("! Fast-dLLM dual + threshold 0.3", {**cache, "cache_type": "dual", **block, "threshold": 0.3}),
        ("dLLM-Cache kp 50, kr 2, rou 0.25", {**cache, "cache_type": "dllm", "kp": 50, "kr": 2, "rou": 0.25}),
        (f"! dLLM-Cache kp {gen}, kr {gen}, rou 0 (never refreshed)",
         {**cache, "cache_type": "dllm", "kp": gen, "kr": gen, "rou": 0.0}),
        ("d2Cache (defaults)", {**cache, "cache_type": "d2", **prob}),
        ("! d2Cache current_k 8 + threshold 0.5",
         {**cache, "cache_type": "d2", **prob, "current_k": 8, "threshold": 0.5}),
    ]
    mg = {"alg": "maskgit_plus"}
    for name, opts in (("pc_sampler", {}), ("klass", {}), ("eb_sampler", {}), ("ar", {})):
        rows += [(f"decoder {name} (defaults)", {**mg, "decoding": name, **opts}),
                 (f"! decoder {name} + threshold 0.3", {**mg, "decoding": name, **opts, "threshold": 0.3})]
    rows[-3] = ("! decoder eb_sampler, gamma 1.0", {**mg, "decoding": "eb_sampler", "gamma": 1.0})
    rows += [("decoder wino (0.7, 0.9)", {**mg, "decoding": "wino"}),
             ("! decoder wino (0.3, 0.5)", {**mg, "decoding": "wino", "wide_in_thres": 0.3,
                                            "narrow_out_thres": 0.5})]
    return rows


def table_settings(name: str, family: str, gen_length: int) -> list[tuple[str, dict]]:
    """(label, diffusion_generate overrides) rows of table ``name``; the arith tables' names work too."""
    if family not in ("dream", "llada"):
        raise ValueError(f"family must be 'dream' or 'llada', got {family!r}")
    if name == "yardstick":
        return _yardstick(family, gen_length)
    from dkvcache.tasks import arith_tables

    return arith_tables.table_settings(name, family, gen_length)


def pc_table_from_train_split(tokenizer: Any, vocab_size: int, items: int = 5000, seed: int = 0) -> Any:
    """PC-sampler's unigram table for the chain task: ``items`` train-split questions and answers."""
    from dkvcache.tasks import arith_tables, chain

    return arith_tables.pc_table_from_train_split(tokenizer, vocab_size, items, seed, task=chain)


def run(model: Any, tokenizer: Any, rows: Sequence[dict], table: str | None, family: str, overrides: dict,
        batch_size: int = 100, show: int = 0, as_json: bool = False, label: str = "") -> list[dict]:
    """Evaluate every setting of ``table`` (or the defaults alone) on ``rows``, printing one line per setting."""
    from dkvcache.tasks import chain

    settings = table_settings(table, family, chain.GEN_LENGTH) if table else [("run", {})]
    if table:  # untimed warm-up, so the first row's wall time (the speed-up reference) is not inflated
        chain.evaluate(model, tokenizer, rows[:2], batch_size=2,
                       **chain.merge_kwargs(family, {**settings[0][1], **overrides}))
    pc_table, results = None, []
    for name, setting in settings:
        kwargs = chain.merge_kwargs(family, {**setting, **overrides})
        if kwargs.get("decoding") == "pc_sampler" and kwargs.get("pc_frequencies") is None:
            if pc_table is None:  # built once, from train-split text only
                pc_table = pc_table_from_train_split(tokenizer, model.config.vocab_size)
            kwargs["pc_frequencies"] = pc_table
        start = time.perf_counter()
        result = chain.evaluate(model, tokenizer, rows, batch_size=batch_size, **kwargs)
        shown = {k: (v if isinstance(v, (str, int, float, bool, list, type(None))) else f"<{type(v).__name__}>")
                 for k, v in kwargs.items()}
        result.update(setting=name, kwargs=shown, eval_s=time.perf_counter() - start)
        result["ci95"] = wilson(result["correct"], result["n"])
        results.append(result)
        print(f"[{label}] {name}: {shown}")
        print(f"  accuracy {result['accuracy']:.4f} ({result['correct']}/{result['n']}) "
              f"CI [{result['ci95'][0]:.3f}, {result['ci95'][1]:.3f}]  tokens/s {result['tokens_per_s']:.1f}  "
              f"tokens/forward {result['tokens_per_forward']:.3f}  fed {result['fed_fraction']:.2f}", flush=True)
        for p in result["predictions"][:show]:
            print(f"  {'OK ' if p['correct'] else 'BAD'} {p['question']!r} -> {p['prediction']!r}")
        if as_json:
            print(json.dumps({k: v for k, v in result.items() if k != "predictions"}))
    return results


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default)."""
    if n <= 0:
        raise ValueError(f"need at least one item, got n={n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, {n}], got {correct}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def reference(results: list[dict], index: int) -> dict:
    """The row that row ``index`` is measured against: vanilla decoding in the same order. That is the first row,
    except for a random-order row (dKV-Greedy needs random remasking) when the run has a random-order vanilla
    row -- the dKV-Cache paper compares Greedy with its "Base (random)" too."""
    if RANDOM_ORDER in results[index]["setting"] and not is_reference(results[index]["setting"]):
        for row in results:
            if row["setting"] == f"vanilla {RANDOM_ORDER}":
                return row
    return results[0]


def markdown(results: list[dict]) -> str:
    """Accuracy with its Wilson 95 % interval, drop vs its reference row (:func:`reference`), speed-up vs the first
    row, tokens/forward, tokens/s, fed."""
    base = results[0]["wall_time_s"]
    lines = ["| setting | accuracy (95 % CI) | Δ pts | speed-up | tokens/forward | tokens/s | fed |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results):
        lo, hi = r.get("ci95") or wilson(r["correct"], r["n"])
        speedup = base / r["wall_time_s"] if r["wall_time_s"] > 0 else float("nan")
        drop = 100 * (r["accuracy"] - reference(results, i)["accuracy"])
        lines.append(f"| {r['setting']} | {100 * r['accuracy']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] "
                     f"({r['correct']}/{r['n']}) | {drop:+.1f} | {speedup:.2f}× | "
                     f"{r['tokens_per_forward']:.2f} | {r['tokens_per_s']:.0f} | {r['fed_fraction']:.2f} |")
    return "\n".join(lines)


def compare(first: list[dict], second: list[dict]) -> dict:
    """Do two runs of the same table (two training seeds) rank the rows the same way?

    A pair of rows is *separated* in a run when their Wilson intervals do not overlap. The ranking agrees when no
    pair separated in one run is ordered the other way round in the other (an inversion); Kendall's tau-b over
    all rows is reported as well. Only the rows both runs have are compared (a table may have gained rows).
    """
    first, second = common_rows(first, second)
    a = [r["accuracy"] for r in first]
    b = [r["accuracy"] for r in second]
    inversions, separated = [], 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            for run_x, run_y in ((first, second), (second, first)):
                x_i, x_j = run_x[i], run_x[j]
                (lo_i, hi_i), (lo_j, hi_j) = (wilson(x_i["correct"], x_i["n"]), wilson(x_j["correct"], x_j["n"]))
                if lo_i > hi_j or lo_j > hi_i:
                    separated += 1
                    sign = (x_i["accuracy"] > x_j["accuracy"]) - (x_i["accuracy"] < x_j["accuracy"])
                    other = (run_y[i]["accuracy"] > run_y[j]["accuracy"]) - (run_y[i]["accuracy"] <
                                                                             run_y[j]["accuracy"])
                    if other == -sign:
                        inversions.append((first[i]["setting"], first[j]["setting"]))
    return {"kendall_tau_b": kendall_tau_b(a, b), "separated_pairs": separated,
            "inversions": sorted(set(inversions)), "same_ranking": not inversions}


def signal(results: list[dict], max_default_loss: float = 2.0, min_aggressive_loss: float = 15.0,
           min_items: int = 300, min_vanilla: float = 0.9) -> dict:
    """The yardstick's signal criteria on one run (its first row is vanilla): enough items, vanilla accuracy at
    least ``min_vanilla``, every default row (no ``!``) within ``max_default_loss`` points of its reference
    (:func:`reference`; the vanilla rows are references, not strategies), and at least one aggressive row
    (``!``) ``min_aggressive_loss`` or more points below it."""
    if not results or not is_reference(results[0]["setting"]):
        raise ValueError("the run's first row must be vanilla decoding (the reference)")
    base = results[0]["accuracy"]
    drops = [(r["setting"], 100 * (reference(results, i)["accuracy"] - r["accuracy"]))
             for i, r in enumerate(results) if not is_reference(r["setting"])]
    defaults = [d for d in drops if not d[0].startswith("!")] or [("(none)", 0.0)]
    aggressive = [d for d in drops if d[0].startswith("!")] or [("(none)", 0.0)]
    worst_default = max(defaults, key=lambda d: d[1])
    strongest = max(aggressive, key=lambda d: d[1])
    items = min(r["n"] for r in results)
    checks = {"items": items >= min_items, "vanilla": base >= min_vanilla,
              "defaults": worst_default[1] <= max_default_loss, "aggressive": strongest[1] >= min_aggressive_loss}
    return {"items": items, "vanilla": base,
            "defaults_over": [d for d in defaults if d[1] > max_default_loss],
            "worst_default": worst_default, "strongest_aggressive": strongest, "checks": checks,
            "met": all(checks.values())}


def common_rows(first: list[dict], second: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows of two runs that have the same setting label, in the first run's order."""
    by_label = {r["setting"]: r for r in second}
    shared = [r for r in first if r["setting"] in by_label]
    if len(shared) < 2:
        raise ValueError("the two runs must share at least two rows (the same setting labels)")
    return shared, [by_label[r["setting"]] for r in shared]


def compare_groups(first: list[dict], second: list[dict]) -> dict[str, dict]:
    """:func:`compare` on every :data:`ROW_GROUPS` subset of the rows (the group's row count added as ``rows``)."""
    first, second = common_rows(first, second)
    out = {}
    for name, keep in ROW_GROUPS.items():
        a = [r for r in first if keep(r["setting"])]
        out[name] = {"rows": len(a), **compare(a, [r for r in second if keep(r["setting"])])}
    return out


def kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either list handled) of two equally long lists."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = (a[i] > a[j]) - (a[i] < a[j]), (b[i] > b[j]) - (b[i] < b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom else float("nan")


def save(results: list[dict], path: str) -> None:
    """The rows of a table run, without the predictions, as JSON (for :func:`compare`)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump([{k: v for k, v in r.items() if k != "predictions"} for r in results], f, indent=1)
        f.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dkvcache.tasks.chain_tables A.json B.json``: the two-seed ranking check of two saved runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        raise ValueError("usage: python -m dkvcache.tasks.chain_tables FIRST.json SECOND.json")
    runs = []
    for path in argv:
        with open(path, encoding="utf-8") as f:
            runs.append(json.load(f))
    result = compare(*runs)
    print("| setting | first | second |\n|---|---|---|")
    for a, b in zip(*common_rows(*runs), strict=True):
        print(f"| {a['setting']} | {100 * a['accuracy']:.1f} % | {100 * b['accuracy']:.1f} % |")
    print(f"\nKendall tau-b {result['kendall_tau_b']:.3f}; {result['separated_pairs']} pair orderings separated "
          f"(non-overlapping Wilson intervals) in one run; inversions in the other: "
          f"{len(result['inversions'])}")
    for pair in result["inversions"][:10]:
        print(f"  inverted: {pair[0]} vs {pair[1]}")
    print("same ranking" if result["same_ranking"] else "ranking differs")
    print("\n| rows compared | rows | Kendall tau-b | inversions |\n|---|---|---|---|")
    for name, group in compare_groups(*runs).items():
        print(f"| {name} | {group['rows']} | {group['kendall_tau_b']:.2f} | {len(group['inversions'])} |")
    print("\nsignal per run (defaults lose <= 2 points, an aggressive row >= 15, >= 300 items, vanilla >= 90 %):")
    for path, run in zip(argv, runs, strict=True):
        sig = signal(run)
        over = ", ".join(f"{name} -{loss:.1f}" for name, loss in sig["defaults_over"]) or "none"
        print(f"  {path}: {'met' if sig['met'] else 'not met'} -- {sig['items']} items, vanilla "
              f"{100 * sig['vanilla']:.1f} %, defaults over 2 points: {over}; strongest aggressive: "
              f"{sig['strongest_aggressive'][0]} -{sig['strongest_aggressive'][1]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
