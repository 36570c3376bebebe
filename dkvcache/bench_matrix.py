"""Named benchmark matrices: model config × every registered strategy × batch sizes, with JSON and PNG plots.

    python -m dkvcache.bench_matrix tiny-dream --batches 1 8           # the shipped checkpoint (speed only)
    python -m dkvcache.bench_matrix small-llada --batches 1 8          # CPU-sized, random init
    python -m dkvcache.bench_matrix llada-8b --batches 1 16 --steps 32  # GPU: real config, bf16, random init

Each batch size is one side-by-side run of ``dkvcache.bench`` (same weights, same prompts, warm-up, min of
repeats), so every speed-up is a ratio measured in one process. Strategies come from the registry, each with its
documented default knobs; a strategy that does not apply to the model family (e.g. ``greedy`` on Dream) is
skipped and listed. Writes ``<out>/<matrix>.json`` and ``<out>/<matrix>-speedup.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dkvcache import caches
from dkvcache.bench import main as bench_main

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Model configs: the shipped tiny checkpoints, CPU-sized random init per the design (the no-cache baseline takes
# minutes) and the real 7B/8B shapes (GPU).
MATRICES: dict[str, dict[str, Any]] = {
    "tiny-dream": {"model": str(ASSETS / "tiny-dream"), "model_kind": "dream", "prompt_len": 64, "gen_len": 64,
                   "dtype": "float32"},
    "tiny-llada": {"model": str(ASSETS / "tiny-llada"), "model_kind": "llada", "prompt_len": 64, "gen_len": 64,
                   "dtype": "float32"},
    "small-dream": {"model_kind": "dream", "vocab": 16384, "hidden": 384, "layers": 6, "heads": 6, "kv_heads": 2,
                    "prompt_len": 192, "gen_len": 64, "dtype": "float32"},
    "small-llada": {"model_kind": "llada", "vocab": 16384, "hidden": 384, "layers": 6, "heads": 6, "kv_heads": 6,
                    "prompt_len": 192, "gen_len": 64, "dtype": "float32"},
    "dream-7b": {"model_kind": "dream", "vocab": 152064, "hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4,
                 "intermediate": 18944, "prompt_len": 256, "gen_len": 256, "dtype": "bfloat16"},
    "llada-8b": {"model_kind": "llada", "vocab": 126464, "hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32,
                 "intermediate": 12288, "prompt_len": 256, "gen_len": 256, "dtype": "bfloat16"},
}
# Documented default knobs per strategy (README); strategies registered later fall back to their own defaults.
STRATEGY_SETTINGS: dict[str, str] = {
    "decoded": "use_cache=True,cache_type=decoded,cache_steps=4",
    "prefill": "use_cache=True,cache_type=prefill",
    "pd": "use_cache=True,cache_type=pd,cache_steps=4",
    "greedy": "use_cache=True,cache_type=greedy,cache_steps=2,remasking=random",
    "prefix": "use_cache=True,cache_type=prefix",
    "dual": "use_cache=True,cache_type=dual",
    "dllm": "use_cache=True,cache_type=dllm,kp=50,kr=2,rou=0.25",
}


def strategy_settings(kind: str) -> tuple[list[str], list[str]]:
    """(bench --setting strings for every registered strategy that applies to ``kind``, skipped names)."""
    settings, skipped = ["none"], []
    for name in sorted(caches.available_strategies()):
        if name == "none":
            continue
        if name == "greedy" and kind != "llada":
            skipped.append(name)
            continue
        settings.append(f"{name}:{STRATEGY_SETTINGS.get(name, f'use_cache=True,cache_type={name}')}")
    return settings, skipped


def plot(results: dict[int, list[dict[str, Any]]], title: str, path: Path) -> None:
    """Speed-up and efficiency per strategy vs batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    batches = sorted(results)
    labels = [r["label"] for r in results[batches[0]]]
    for label in labels:
        rows = [next(r for r in results[b] if r["label"] == label) for b in batches]
        axes[0].plot(batches, [r["speedup"] for r in rows], marker="o", label=label)
        axes[1].plot(batches, [r["efficiency"] for r in rows], marker="o", label=label)
    for ax, name in zip(axes, ("speed-up vs no cache (×)", "efficiency = speed-up / (1 / fed)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dkvcache.bench_matrix``: one bench run per batch size, then JSON and plot."""
    p = argparse.ArgumentParser(prog="python -m dkvcache.bench_matrix", description=__doc__.split("\n\n")[0])
    p.add_argument("matrix", choices=sorted(MATRICES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, help="denoising steps (default = gen length)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="outputs/bench")
    p.add_argument("--only", nargs="+", help="strategy labels to keep (default: every registered one)")
    p.add_argument("--extra", action="append", default=[], metavar="LABEL:K=V,…",
                   help="an extra setting after the registered ones (repeatable), e.g. "
                        "'dllm-gsm8k:use_cache=True,cache_type=dllm,dllm_preset=gsm8k'")
    args = p.parse_args(argv)
    config = MATRICES[args.matrix]
    settings, skipped = strategy_settings(config["model_kind"])
    if args.only:
        settings = [s for s in settings if s.split(":")[0] in set(args.only) | {"none"}]
    settings += args.extra
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in config.items()]
    # Dream's usual confidence is entropy; LLaDA keeps its default (low_confidence) so greedy can ask for random.
    dream = config["model_kind"] == "dream"
    flags.append("--common=" + ("alg=entropy,temperature=0.0" if dream else "temperature=0.0"))
    results: dict[int, list[dict[str, Any]]] = {}
    for batch in args.batches:
        path = out / f"{args.matrix}-b{batch}.json"
        bench_argv = [*flags, f"--batch={batch}", f"--repeats={args.repeats}", f"--json={path}",
                      *[f"--setting={s}" for s in settings]]
        if args.steps:
            bench_argv.append(f"--steps={args.steps}")
        if args.threads:
            bench_argv.append(f"--threads={args.threads}")
        print(f"== {args.matrix}, batch {batch}", flush=True)
        if bench_main(bench_argv) != 0:
            return 2
        results[batch] = json.loads(path.read_text())["results"]
    summary = {"matrix": args.matrix, "config": config, "skipped": skipped, "batches": results}
    (out / f"{args.matrix}.json").write_text(json.dumps(summary, indent=2, default=str))
    source = "checkpoint" if "model" in config else "random init"
    plot(results, f"{args.matrix}: {config['model_kind']} {source}, prompt {config['prompt_len']}, "
                  f"gen {config['gen_len']}", out / f"{args.matrix}-speedup.png")
    print(f"wrote {out / (args.matrix + '.json')} and {out / (args.matrix + '-speedup.png')}"
          + (f"; skipped (not for this model): {skipped}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
