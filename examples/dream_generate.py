"""Large-batch Dream generation with dKV-Cache, measuring tokens/s (the original flags keep their meaning).

    python examples/dream_generate.py                                  # shipped tiny Dream, arith questions
    python examples/dream_generate.py --decode --cache-steps 4 --compare
    python examples/dream_generate.py --model Dream-org/Dream-v0-Instruct-7B --dtype bfloat16 --decode \
        --prompts-file questions.txt --batch-size 16 --seq-len 256

Prints the answers (cut at EOS), tokens/s (response tokens up to the first EOS), tokens per forward, fed fraction
and peak memory.
"""

from __future__ import annotations

import argparse
import sys

from generate_common import REPO, add_common_flags, check_strategy, main_loop

from models import DreamModel

CACHE_FLAGS = {"prefill": "prefill", "decode": "decoded", "pd": "pd"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(p, REPO / "assets" / "tiny-dream")
    p.add_argument("--sampling-alg", default="entropy", help="alg: origin, maskgit_plus, topk_margin, entropy")
    cache = p.add_mutually_exclusive_group()
    for flag, name in CACHE_FLAGS.items():
        cache.add_argument(f"--{flag}", action="store_true", help=f"cache_type={name!r}")
    p.add_argument("--shift-type", default="un_right", choices=["un", "un_right"],
                   help="dKV shift rule (default un_right; un = the original's)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float)
    args = p.parse_args(argv)
    kwargs = {"max_new_tokens": args.seq_len, "steps": args.steps or args.seq_len, "alg": args.sampling_alg,
              "temperature": args.temperature, "top_p": args.top_p}
    flag = next((f for f in CACHE_FLAGS if getattr(args, f)), None)
    label = "no cache"
    if flag:
        check_strategy(CACHE_FLAGS[flag])
        kwargs.update(use_cache=True, cache_type=CACHE_FLAGS[flag])
        if flag != "prefill":
            kwargs.update(cache_steps=args.cache_steps, shift_type=args.shift_type)
        label = f"cache {CACHE_FLAGS[flag]}"
    return main_loop(DreamModel, args, kwargs, label)


if __name__ == "__main__":
    sys.exit(main())
