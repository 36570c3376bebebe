"""Named accuracy-vs-speed tables on the tiny task: every setting on the same held-out items, in one process.

    python -m dkvcache.tasks.arith --model assets/tiny-llada --table fast-dllm --limit 100

Each table starts with the task's vanilla decoding (no cache), the reference for the speed-up column (wall time
of generation only, summed over batches). Settings that do not apply to a model family are left out of its
table. The rows are the knobs the README discusses, plus one deliberately aggressive setting per table so the
table shows where accuracy breaks (the signal check).
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

TABLES = ("signal", "dkv", "fast-dllm", "dllm", "d2", "decoders")


def _signal(family: str, gen: int) -> list[tuple[str, dict]]:
    """Vanilla, other orders, fewer steps, then the most aggressive setting of every cache family."""
    alg = _probability_alg(family)
    if family == "dream":
        rows = [
            ("vanilla entropy, steps=64", {}),
            ("maskgit_plus, steps=64", {"alg": "maskgit_plus"}),
            ("origin (random order), steps=64", {"alg": "origin", "seed": 0}),
            ("entropy, steps=16 (4 tokens a step)", {"steps": gen // 4}),
            ("entropy, steps=4 (16 tokens a step)", {"steps": gen // 16}),
            ("entropy, steps=2 (32 tokens a step)", {"steps": gen // 32}),
        ]
    else:
        rows = [
            ("vanilla low_confidence, block 32, steps=64", {}),
            ("random remasking, block 32, steps=64", {"remasking": "random", "seed": 0}),
            ("low_confidence, block 32, steps=16 (4 tokens a step)", {"steps": gen // 4}),
            ("low_confidence, block 32, steps=4 (16 tokens a step)", {"steps": gen // 16}),
            ("low_confidence, block 32, steps=2 (a block a step)", {"steps": gen // 32}),
        ]
    return rows + [
        (f"dKV decoded, cache_steps {gen} (never refreshed)",
         {"use_cache": True, "cache_type": "decoded", "cache_steps": gen}),
        ("dKV pd, cache_steps 4", {"use_cache": True, "cache_type": "pd", "cache_steps": 4}),
        (f"dLLM kp {gen}, kr {gen}, rou 0 (never refreshed)",
         {"use_cache": True, "cache_type": "dllm", "kp": gen, "kr": gen, "rou": 0.0}),
        ("Fast-dLLM dual, block 32, threshold 0.3",
         {"use_cache": True, "cache_type": "dual", "block_length": 32, "threshold": 0.3, **alg}),
        ("d2, current_k 8, threshold 0.9",
         {"use_cache": True, "cache_type": "d2", "current_k": 8, "threshold": 0.9, **alg}),
    ]


def _dkv(family: str, gen: int) -> list[tuple[str, dict]]:
    cache = {"use_cache": True}
    if family == "dream":
        return [
            ("none (vanilla)", {}),
            ("decoded, un, cache_steps 4", {**cache, "cache_type": "decoded", "cache_steps": 4, "shift_type": "un"}),
            ("decoded, un_right, cache_steps 4",
             {**cache, "cache_type": "decoded", "cache_steps": 4, "shift_type": "un_right"}),
            ("decoded, un, cache_steps 16", {**cache, "cache_type": "decoded", "cache_steps": 16}),
            (f"decoded, un, cache_steps {gen} (never refreshed)",
             {**cache, "cache_type": "decoded", "cache_steps": gen}),
            ("prefill", {**cache, "cache_type": "prefill"}),
            ("pd, cache_steps 4", {**cache, "cache_type": "pd", "cache_steps": 4}),
        ]
    return [
        ("none (vanilla, low_confidence)", {}),
        ("decoded, cache_steps 4", {**cache, "cache_type": "decoded", "cache_steps": 4}),
        ("decoded, cache_steps 8", {**cache, "cache_type": "decoded", "cache_steps": 8}),
        ("decoded, cache_steps 32 (never refreshed in a block)", {**cache, "cache_type": "decoded",
                                                                    "cache_steps": 32}),
        ("prefill", {**cache, "cache_type": "prefill"}),
        ("pd, cache_steps 4", {**cache, "cache_type": "pd", "cache_steps": 4}),
        ("none, remasking random", {"remasking": "random", "seed": 0}),
        ("greedy, cache_steps 2, window 0", {**cache, "cache_type": "greedy", "cache_steps": 2,
                                             "remasking": "random", "seed": 0}),
        ("greedy, cache_steps 2, window 4", {**cache, "cache_type": "greedy", "cache_steps": 2, "window_size": 4,
                                             "remasking": "random", "seed": 0}),
    ]


def _probability_alg(family: str) -> dict:
    """Threshold/factor and sigma compare probabilities: Dream's default entropy score does not qualify."""
    return {"alg": "maskgit_plus"} if family == "dream" else {}


def _fast_dllm(family: str, gen: int) -> list[tuple[str, dict]]:
    block = {"block_length": 32, **_probability_alg(family)}
    prefix = {"use_cache": True, "cache_type": "prefix", **block}
    dual = {"use_cache": True, "cache_type": "dual", **block}
    return [
        ("none (vanilla)", {}),
        ("none, block 32" + (", maskgit_plus" if family == "dream" else ""), dict(block)),
        ("none, block 32, threshold 0.9", {**block, "threshold": 0.9}),
        ("prefix", prefix),
        ("dual", dual),
        ("prefix + threshold 0.9", {**prefix, "threshold": 0.9}),
        ("dual + threshold 0.9", {**dual, "threshold": 0.9}),
        ("dual + threshold 0.7", {**dual, "threshold": 0.7}),
        ("dual + factor 1.0", {**dual, "factor": 1.0}),
        ("dual + threshold 0.3 (aggressive)", {**dual, "threshold": 0.3}),
    ]


def _dllm(family: str, gen: int) -> list[tuple[str, dict]]:
    cache = {"use_cache": True, "cache_type": "dllm"}
    return [
        ("none (vanilla)", {}),
        ("dllm kp 50, kr 2, rou 0.25", {**cache, "kp": 50, "kr": 2, "rou": 0.25}),
        ("dllm kp 50, kr 4, rou 0.25", {**cache, "kp": 50, "kr": 4, "rou": 0.25}),
        ("dllm kp 50, kr 8, rou 0.1", {**cache, "kp": 50, "kr": 8, "rou": 0.1}),
        ("dllm preset gsm8k", {**cache, "dllm_preset": "gsm8k"}),
        (f"dllm kp {gen}, kr {gen}, rou 0 (never refreshed)", {**cache, "kp": gen, "kr": gen, "rou": 0.0}),
    ]


def _d2(family: str, gen: int) -> list[tuple[str, dict]]:
    alg = _probability_alg(family)
    d2 = {"use_cache": True, "cache_type": "d2", **alg}
    rows = [("none (vanilla)", {})]
    if family == "dream":
        rows.append(("none, maskgit_plus", dict(alg)))
    return rows + [
        ("none + sigma 10 (certainty prior)", {**alg, "sigma": 10.0}),
        ("d2 (defaults)", d2),
        ("d2 + sigma 10", {**d2, "sigma": 10.0}),
        ("d2, current_k 8", {**d2, "current_k": 8}),
        ("d2, frozen confidence (published)", {**d2, "d2_frozen_confidence": True}),
        ("d2, current_k 8 + threshold 0.9", {**d2, "current_k": 8, "threshold": 0.9}),
    ]


def _decoders(family: str, gen: int) -> list[tuple[str, dict]]:
    mg = {"alg": "maskgit_plus"}
    return [
        ("vanilla (task default)", {}),
        ("vanilla, maskgit_plus", dict(mg)),
        ("vanilla, maskgit_plus, threshold 0.9", {**mg, "threshold": 0.9}),
        ("pc_sampler (clip_alpha 10)", {**mg, "decoding": "pc_sampler"}),
        ("klass (defaults)", {**mg, "decoding": "klass"}),
        ("klass + threshold 0.9", {**mg, "decoding": "klass", "threshold": 0.9}),
        ("eb_sampler (gamma 0.001)", {**mg, "decoding": "eb_sampler"}),
        ("eb_sampler (gamma 0.1)", {**mg, "decoding": "eb_sampler", "gamma": 0.1}),
        ("ar", {**mg, "decoding": "ar"}),
        ("ar + threshold 0.9", {**mg, "decoding": "ar", "threshold": 0.9}),
        ("wino (0.7, 0.9)", {**mg, "decoding": "wino"}),
    ]


_BUILDERS = {"signal": _signal, "dkv": _dkv, "fast-dllm": _fast_dllm, "dllm": _dllm, "d2": _d2,
             "decoders": _decoders}


def table_settings(name: str, family: str, gen_length: int) -> list[tuple[str, dict]]:
    """(label, diffusion_generate overrides) rows of table ``name`` for ``family`` ("dream" or "llada")."""
    if name not in _BUILDERS:
        raise ValueError(f"table must be one of {', '.join(TABLES)}; got {name!r}")
    if family not in ("dream", "llada"):
        raise ValueError(f"family must be 'dream' or 'llada', got {family!r}")
    return _BUILDERS[name](family, gen_length)


def pc_table_from_train_split(tokenizer: Any, vocab_size: int, items: int = 5000, seed: int = 0,
                              task: Any = None) -> Any:
    """PC-sampler's unigram table for a tiny task (``task``: its module, default arith): ``items`` train-split
    questions and answers."""
    from dkvcache.decoders import build_unigram_table
    from dkvcache.tasks import arith

    rng = random.Random(seed)
    sample = [(task or arith).sample_item(rng, "train") for _ in range(items)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(f"{it.question}\n{it.answer}" for it in sample) + "\n")
        return build_unigram_table(tokenizer, path, vocab_size)


def markdown(results: list[dict]) -> str:
    """The table: accuracy, speed-up vs the first row, tokens/forward, tokens/s, fed fraction."""
    base = results[0]["wall_time_s"]
    lines = ["| setting | accuracy | speed-up | tokens/forward | tokens/s | fed |", "|---|---|---|---|---|---|"]
    for r in results:
        speedup = base / r["wall_time_s"] if r["wall_time_s"] > 0 else float("nan")
        fed = "-" if r.get("fed_fraction") is None else f"{r['fed_fraction']:.2f}"
        count = f" ({r['correct']}/{r['n']})" if "correct" in r and "n" in r else ""
        lines.append(f"| {r['setting']} | {100 * r['accuracy']:.1f} %{count} | {speedup:.2f}× | "
                     f"{r['tokens_per_forward']:.2f} | {r['tokens_per_s']:.0f} | {fed} |")
    return "\n".join(lines)


def plot(results: list[dict], title: str, path: str) -> None:
    """Accuracy vs tokens/s, one labelled point per setting (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(results):
        ax.scatter(r["tokens_per_s"], 100 * r["accuracy"], s=30, color=f"C{i % 10}")
        ax.annotate(r["setting"], (r["tokens_per_s"], 100 * r["accuracy"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s (response tokens up to EOS; log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
