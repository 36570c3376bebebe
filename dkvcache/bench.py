"""Side-by-side speed benchmark of ``diffusion_generate`` settings: one process, same weights, same prompts.

    python -m dkvcache.bench --preset foundation
    python -m dkvcache.bench --preset small-dream --setting "dkv:use_cache=True,cache_type=decoded,cache_steps=4"
    dkvcache-bench --model-kind llada --vocab 4096 --hidden 256 --layers 4 --setting none --setting "..."

Every setting gets one warm-up run, then ``--repeats`` timed runs; the minimum wall time is reported. The first
setting is the baseline of every speed-up. Columns: wall time, speed-up, forwards, tokens per forward, fed
fraction (share of the no-cache positions actually fed), ideal speed-up 1/fed, efficiency = speed-up / ideal,
and, with h = share of a no-cache run spent outside the transformer forward (LM head, sampling, loop), the cap
1/(fed·(1-h)+h) that a cache feeding ``fed`` of the positions can reach, and efficiency vs that cap.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import dkvcache
from dkvcache import caches
from dkvcache.cli_values import parse_value
from dkvcache.loading import load_model
from dkvcache.resolve import resolve

BASE_DEFAULTS: dict[str, Any] = {
    "model_kind": "dream", "vocab": 4096, "hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2,
    "intermediate": None, "batch": 4, "prompt_len": 64, "gen_len": 64, "steps": None, "block_length": None,
    "common": "alg=entropy,temperature=0.0", "repeats": 3,
}
PRESETS: dict[str, dict[str, Any]] = {
    # No-cache Dream with logits only at the still-masked candidates vs the original's full (B, L, V) logits.
    "foundation": {"model_kind": "dream", "vocab": 152064, "hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2,
                   "batch": 4, "prompt_len": 64, "gen_len": 64, "steps": 64,
                   "settings": ["none", "full-logits:full_logits=True"]},
    # Design sizing for the cache strategies; add them with --setting.
    "small-dream": {"model_kind": "dream", "vocab": 16384, "hidden": 384, "layers": 6, "heads": 6, "kv_heads": 2,
                    "batch": 8, "prompt_len": 192, "gen_len": 64, "steps": 64, "settings": ["none"]},
}
H_METHOD = ("h = 1 - F/T. T: min wall time of a no-cache generate call with full_logits=False (the first setting "
            "when it is one, else an extra run with the common kwargs only). F: min over repeats of `steps` "
            "back-to-back model.partial_forward calls on the full (batch, prompt+gen) input without K/V buffers, "
            "i.e. exactly the no-cache step's forward. So h is everything else: final norm + LM head at the "
            "candidates, sampling, transfer choice and loop bookkeeping. cap = 1/(fed*(1-h)+h).")


def parse_kwargs(text: str) -> dict[str, Any]:
    """'a=1,b=True,c=x' → {'a': 1, 'b': True, 'c': 'x'} (values by :func:`dkvcache.cli_values.parse_value`);
    an empty string → {}."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r} in {text!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """'label:key=val,…' or 'key=val,…' (label = the text) or 'label' (no extra kwargs)."""
    head, sep, tail = text.partition(":")
    if sep and "=" not in head:
        return head.strip() or tail, parse_kwargs(tail)
    if "=" not in text:
        return text.strip(), {}
    return text, parse_kwargs(text)


def special_ids(kind: str, vocab: int) -> dict[str, int]:
    """Special token ids of a random-init model: the real checkpoints' when the vocab is big enough, else the top."""
    if kind == "dream" and vocab > 151666:
        return {"mask_token_id": 151666, "pad_token_id": 151643, "eos_token_id": 151643, "bos_token_id": 151643}
    if kind == "llada" and vocab > 126348:
        return {"mask_token_id": 126336, "pad_token_id": 126081, "eos_token_id": 126081}
    ids = {"mask_token_id": vocab - 1, "pad_token_id": vocab - 2, "eos_token_id": vocab - 2}
    return {**ids, "bos_token_id": vocab - 3} if kind == "dream" else ids


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A local checkpoint (``--model``) or a random-init Dream/LLaDA model sized by the flags."""
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    if args.model:
        return load_model(args.model, dtype=dtype, device=args.device)
    # Random init directly on the target device and dtype: an 8B model built on CPU in float32 first would take
    # minutes and 32 GB of host memory.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = _random_model(args)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _random_model(args: argparse.Namespace) -> torch.nn.Module:
    from models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM

    inter = args.intermediate or -(-int(2.75 * args.hidden) // 32) * 32
    ids = special_ids(args.model_kind, args.vocab)
    if args.model_kind == "dream":
        config = DreamConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=inter,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, **ids)
        model = DreamModel(config)
    else:
        config = LLaDAConfig(d_model=args.hidden, n_heads=args.heads, n_kv_heads=args.kv_heads,
                             n_layers=args.layers, mlp_hidden_size=inter, vocab_size=args.vocab,
                             embedding_size=args.vocab, **ids)
        model = LLaDAModelLM(config)
    return model


def random_prompts(config: Any, batch: int, length: int, seed: int) -> torch.Tensor:
    """(batch, length) random ids avoiding every special id (below the lowest one when that leaves ≥ 256 ids)."""
    specials = {getattr(config, n, None) for n in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id")}
    specials.discard(None)
    vocab = config.vocab_size
    pool = torch.arange(vocab)
    if specials and min(specials) >= 256:
        pool = pool[: min(specials)]
    pool = pool[~torch.isin(pool, torch.tensor(sorted(specials), dtype=torch.long))]
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (batch, length), generator=gen)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_min(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[list[float], Any]:
    """One warm-up call, then ``repeats`` timed calls; returns (all wall times, the last result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, result


def forward_only_time(model: Any, prompts: torch.Tensor, gen_len: int, steps: int, repeats: int) -> float:
    """Min wall time of ``steps`` no-cache partial forwards over the full (B, prompt+gen) input (see H_METHOD)."""
    mask_id = model.config.mask_token_id
    x = torch.cat([prompts, prompts.new_full((prompts.shape[0], gen_len), mask_id)], 1).to(model.device)
    positions = torch.arange(x.shape[1], device=x.device).expand_as(x).contiguous()
    key_valid = torch.ones_like(x, dtype=torch.bool)

    @torch.no_grad()
    def run() -> None:
        for _ in range(steps):
            model.partial_forward(x, positions, key_valid)

    return min(time_min(run, repeats, x.device)[0])


def is_no_cache(kwargs: dict[str, Any]) -> bool:
    """A plain no-cache run with logits only where needed (a valid reference for h)."""
    return (not kwargs.get("use_cache", False) and kwargs.get("cache_type", "none") in ("none", None)
            and not kwargs.get("full_logits", False))


def check_setting(model: Any, prompt_len: int, kwargs: dict[str, Any]) -> None:
    """Resolve and validate a setting's arguments as ``diffusion_generate`` does first, without any compute."""
    resolve(model, prompt_len, **kwargs)


def run_setting(model: Any, prompts: torch.Tensor, kwargs: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Warm-up + timed runs of one setting: min wall time, the last run's stats (identical across runs but for
    its own wall time) and its sequences."""
    def call() -> Any:
        return model.diffusion_generate(prompts, return_dict_in_generate=True, **kwargs)

    times, out = time_min(call, repeats, model.device)
    wall = min(times)
    stats = dict(out.stats)
    tokens = sum(stats["response_tokens"])
    return {"wall_time_s": wall, "wall_median_s": sorted(times)[len(times) // 2], "wall_times_s": times,
            "forwards": stats["forwards"], "tokens_per_forward": stats["tokens_per_forward"],
            "fed_fraction": stats["fed_fraction"], "tokens_per_s": tokens / wall, "stats": stats,
            "sequences": out.sequences.cpu()}


def derive(results: list[dict[str, Any]], h: float | None, prompt_len: int) -> None:
    """Add speed-up vs the first setting, ideal speed-up, efficiency, cap and agreement with the first setting."""
    base = results[0]
    first_gen = base["sequences"][:, prompt_len:]
    for r in results:
        fed = r["fed_fraction"]
        r["speedup"] = base["wall_time_s"] / r["wall_time_s"]
        r["ideal_speedup"] = 1.0 / fed if fed > 0 else float("inf")
        r["efficiency"] = r["speedup"] / r["ideal_speedup"]
        r["cap"] = None if h is None else 1.0 / (fed * (1 - h) + h)
        r["efficiency_vs_cap"] = None if h is None else r["speedup"] / r["cap"]
        gen = r.pop("sequences")[:, prompt_len:]
        r["match_first"] = float((gen == first_gen).float().mean()) if gen.shape == first_gen.shape else None


COLUMNS = [("setting", "label", "{}"), ("wall s", "wall_time_s", "{:.3f}"), ("speed-up", "speedup", "{:.2f}x"),
           ("fwd", "forwards", "{}"), ("tok/fwd", "tokens_per_forward", "{:.2f}"), ("fed", "fed_fraction", "{:.3f}"),
           ("ideal", "ideal_speedup", "{:.2f}x"), ("eff", "efficiency", "{:.2f}"), ("cap", "cap", "{:.2f}x"),
           ("eff/cap", "efficiency_vs_cap", "{:.2f}"), ("tok/s", "tokens_per_s", "{:.1f}"),
           ("match", "match_first", "{:.3f}")]


def format_table(results: list[dict[str, Any]]) -> str:
    """An aligned text table of the results."""
    rows = [[title for title, _, _ in COLUMNS]]
    for r in results:
        rows.append(["-" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    """Versions, device, threads, date and command line."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"dkvcache": dkvcache.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
            "device_name": name, "cpu_threads": torch.get_num_threads(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, "-m", "dkvcache.bench", *argv]), "argv": argv}


def build_parser() -> argparse.ArgumentParser:
    """The ``dkvcache-bench`` command line (unset flags stay None; :func:`resolve_args` fills them)."""
    p = argparse.ArgumentParser(prog="dkvcache-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults that explicit flags override")
    p.add_argument("--list-strategies", action="store_true", help="print registered cache strategies and exit")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="local checkpoint directory (from_pretrained); else random init")
    m.add_argument("--model-kind", choices=["dream", "llada"])
    for flag in ("--vocab", "--hidden", "--layers", "--heads", "--kv-heads", "--intermediate"):
        m.add_argument(flag, type=int)
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    m.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    w = p.add_argument_group("workload")
    for flag in ("--batch", "--prompt-len", "--gen-len", "--steps", "--block-length", "--repeats"):
        w.add_argument(flag, type=int)
    s = p.add_argument_group("settings")
    s.add_argument("--setting", action="append", default=[], metavar="LABEL:K=V,…",
                   help="a setting (repeatable); appended to the preset's settings")
    s.add_argument("--replace-settings", action="store_true", help="drop the preset's settings")
    s.add_argument("--common", help=f"kwargs for every setting (default {BASE_DEFAULTS['common']!r})")
    s.add_argument("--no-h", action="store_true", help="skip measuring h (the logits+sampling share)")
    p.add_argument("--json", help="output path (default outputs/bench/<timestamp>.json; '-' = do not write)")
    return p


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse flags and fill what is unset from the preset, then from BASE_DEFAULTS."""
    args = build_parser().parse_args(argv)
    preset = dict(PRESETS.get(args.preset or "", {}))
    preset_settings = preset.pop("settings", [])
    for key, value in {**BASE_DEFAULTS, **preset}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.steps = args.steps or args.gen_len
    settings = ([] if args.replace_settings else list(preset_settings)) + list(args.setting)
    parsed: list[tuple[str, dict[str, Any]]] = []
    for text in settings or ["none"]:
        label, kwargs = parse_setting(text)
        if label not in [existing for existing, _ in parsed]:
            parsed.append((label, kwargs))
    args.settings = parsed
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dkvcache.bench`` / ``dkvcache-bench``. Returns the exit status.

    ``--overhead [options]`` runs :mod:`dkvcache.overhead` (per-step overhead, eager vs compiled) instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--overhead" in argv:
        from dkvcache import overhead

        overhead.main([a for a in argv if a != "--overhead"])
        return 0
    args = resolve_args(argv)
    strategies = caches.available_strategies()
    if args.list_strategies:
        for name, options in sorted(strategies.items()):
            print(f"{name}: {', '.join(sorted(options)) or '(no options)'}")
        return 0
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_bench(args, sys.argv[1:] if argv is None else list(argv))
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests); leave no global change behind


def run_bench(args: argparse.Namespace, argv: list[str]) -> int:
    """Build the model and prompts, run every setting, print the table and write the JSON report."""
    strategies = caches.available_strategies()
    common = {"max_new_tokens": args.gen_len, "steps": args.steps, "block_length": args.block_length,
              "seed": args.seed, **parse_kwargs(args.common)}
    model = build_model(args)
    prompts = random_prompts(model.config, args.batch, args.prompt_len, args.seed).to(model.device)
    source = args.model or f"{args.model_kind} (random init)"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {source}, {n_params / 1e6:.1f}M params, {args.dtype}, {model.device}, "
          f"{torch.get_num_threads()} threads; batch {args.batch}, prompt {args.prompt_len}, "
          f"gen {args.gen_len}, steps {args.steps}, block {args.block_length or args.gen_len}")
    for label, extra in args.settings:  # fail before any timing, not after minutes of earlier settings
        try:
            check_setting(model, args.prompt_len, {**common, **extra})
        except (ValueError, TypeError) as err:
            listing = "; ".join(f"{n} ({', '.join(sorted(o)) or '-'})" for n, o in sorted(strategies.items()))
            print(f"error: setting {label!r} {extra}: {err}\navailable cache strategies: {listing}", file=sys.stderr)
            return 2
    results = []
    for label, extra in args.settings:
        r = run_setting(model, prompts, {**common, **extra}, args.repeats)
        print(f"  {label}: {r['wall_time_s']:.3f} s (min of {args.repeats})", flush=True)
        results.append({"label": label, "kwargs": extra, **r})

    h_info: dict[str, Any] = {"method": H_METHOD, "h": None}
    if not args.no_h:
        ref = next((r for r in results[:1] if is_no_cache(r["kwargs"])), None)
        total = ref["wall_time_s"] if ref else run_setting(model, prompts, common, args.repeats)["wall_time_s"]
        fwd = forward_only_time(model, prompts, args.gen_len, args.steps, args.repeats)
        h_info.update(h=max(0.0, 1.0 - fwd / total), forward_time_s=fwd, no_cache_time_s=total,
                      reference="first setting" if ref else "extra no-cache run (common kwargs)")
    derive(results, h_info["h"], args.prompt_len)

    print()
    print(format_table(results))
    if h_info["h"] is not None:
        print(f"\nh = {h_info['h']:.3f} (forward-only {h_info['forward_time_s']:.3f} s of no-cache "
              f"{h_info['no_cache_time_s']:.3f} s; {h_info['reference']}); cap = 1/(fed*(1-h)+h)")
    report = {
        "environment": environment(model.device, argv),
        "model": {"source": args.model or "random-init", "kind": model.diffusion_family, "dtype": args.dtype,
                  "parameters": n_params, "config": model.config.to_dict()},
        "workload": {"batch": args.batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                     "steps": args.steps, "block_length": args.block_length, "repeats": args.repeats,
                     "warmup": 1, "seed": args.seed, "preset": args.preset, "padding": False},
        "common": common, "h": h_info, "results": results,
    }
    if args.json != "-":
        path = Path(args.json or f"outputs/bench/{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
