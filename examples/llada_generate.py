"""Large-batch LLaDA generation with dKV-Cache or Fast-dLLM, measuring tokens/s.

    python examples/llada_generate.py                                   # shipped tiny LLaDA, arith questions
    python examples/llada_generate.py --decode --cache-steps 8 --compare
    python examples/llada_generate.py --greedy --sampling-alg random --cache-steps 2 --window-size 4
    python examples/llada_generate.py --dual --threshold 0.9 --block-size 32 --compare
    python examples/llada_generate.py --model GSAI-ML/LLaDA-8B-Instruct --dtype bfloat16 --prefix --threshold 0.9

Unlike the original script, --seq-len is the generation length and --steps the number of steps (they were
swapped), --seed is used, and --cache-steps defaults to 4 (0 crashed).
"""

from __future__ import annotations

import argparse
import sys

from generate_common import REPO, add_common_flags, check_strategy, main_loop

from models import LLaDAModelLM

MODES = {"origin": None, "decode": "decoded", "greedy": "greedy", "prefix": "prefix", "dual": "dual"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(p, REPO / "assets" / "tiny-llada")
    mode = p.add_mutually_exclusive_group()
    for flag, name in MODES.items():
        mode.add_argument(f"--{flag}", action="store_true", help=f"cache_type={name!r}" if name else "no cache")
    p.add_argument("--block-size", type=int, help="block_length (default: 32 for --prefix/--dual, else seq-len)")
    p.add_argument("--sampling-alg", default="low_confidence", choices=["low_confidence", "random"],
                   help="remasking (greedy needs random)")
    p.add_argument("--threshold", type=float, help="Fast-dLLM confidence-threshold parallel decoding")
    p.add_argument("--window-size", type=int, default=0, help="greedy: masked neighbours fed per decoded token")
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance scale (no cache only)")
    args = p.parse_args(argv)
    kwargs = {"gen_length": args.seq_len, "steps": args.steps or args.seq_len, "remasking": args.sampling_alg,
              "block_length": args.block_size, "threshold": args.threshold, "cfg_scale": args.cfg}
    name = next((MODES[f] for f in MODES if getattr(args, f)), None)
    label = "no cache"
    if name:
        check_strategy(name)
        kwargs.update(use_cache=True, cache_type=name)
        if name in ("decoded", "greedy"):
            kwargs["cache_steps"] = args.cache_steps
        if name == "greedy":
            kwargs["window_size"] = args.window_size
        label = f"cache {name}"
    if args.threshold is not None:
        label += f" + threshold {args.threshold}"
    return main_loop(LLaDAModelLM, args, kwargs, label)


if __name__ == "__main__":
    sys.exit(main())
