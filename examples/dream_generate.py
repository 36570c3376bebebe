"""Generate answers with a Dream model, with or without a dKV-Cache strategy, and print speed statistics.

    python examples/dream_generate.py                                   # assets/tiny-dream, or a random model
    python examples/dream_generate.py --model /path/to/Dream-v0-Instruct-7B --dtype bfloat16 --decode
    python examples/dream_generate.py --prompts-file questions.jsonl --batch-size 4 --pd --cache-steps 8

With a tokenizer in the model directory the prompts go through the chat template and answers are decoded (cut at
EOS); without one, random prompt ids are used and the generated ids are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from dkvcache.bench import random_prompts  # noqa: E402
from dkvcache.caches import available_strategies  # noqa: E402
from models import DreamConfig, DreamModel  # noqa: E402  (importing models registers the Auto classes)

DEFAULT_MODEL = REPO / "assets" / "tiny-dream"
DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
]
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
CACHE_FLAGS = {"prefill": "prefill", "decode": "decoded", "pd": "pd"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"checkpoint directory (default {DEFAULT_MODEL} if present, else random init)")
    p.add_argument("--seq-len", type=int, default=64, help="max_new_tokens")
    p.add_argument("--steps", type=int, help="denoising steps (default = seq-len)")
    p.add_argument("--sampling-alg", default="entropy", help="alg: origin, maskgit_plus, topk_margin, entropy")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--prefill", action="store_true", help="cache_type='prefill' (prompt cached)")
    cache.add_argument("--decode", action="store_true", help="cache_type='decoded' (decoded tokens cached)")
    cache.add_argument("--pd", action="store_true", help="cache_type='pd' (prompt + decoded)")
    p.add_argument("--cache-steps", type=int, default=4, help="refresh interval of the cache")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--prompts-file", help="a .txt file (one prompt per line) or .jsonl ('question' or 'prompt')")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def read_prompts(path: str | None) -> list[str]:
    """Prompts from a .txt (one per line) or .jsonl file, else two built-in questions."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in lines]
        return [row.get("question", row.get("prompt")) for row in rows]
    return lines


def load_model(args: argparse.Namespace, dtype: torch.dtype) -> tuple[DreamModel, Any]:
    """(model, tokenizer or None): the checkpoint, or a small random-init Dream when there is none."""
    path = Path(args.model) if args.model else DEFAULT_MODEL
    if args.model and not path.is_dir():
        raise SystemExit(f"error: --model {path} is not a directory")
    if not path.is_dir():
        print(f"note: {DEFAULT_MODEL} not found; using a small random-init Dream model (answers are noise)")
        torch.manual_seed(args.seed)
        config = DreamConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, mask_token_id=2047, pad_token_id=2046,
                             eos_token_id=2046, bos_token_id=2045)
        return DreamModel(config).to(dtype), None
    model = DreamModel.from_pretrained(str(path), dtype=dtype)
    # transformers 5 builds an *empty* tokenizer from a directory without vocabulary files, so look for them.
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        print(f"note: no tokenizer files in {path}; using random prompt ids")
        return model, None
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(str(path))


def encode(tokenizer: Any, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated (when the tokenizer has a template), left-padded ids and attention mask."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = prompts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def cache_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """diffusion_generate kwargs of the chosen cache flag; None (after printing why) if it is not registered."""
    flag = next((f for f in CACHE_FLAGS if getattr(args, f)), None)
    if flag is None:
        return {}
    name, strategies = CACHE_FLAGS[flag], available_strategies()
    if name not in strategies:
        listing = ", ".join(f"{n} ({', '.join(sorted(o)) or 'no options'})" for n, o in sorted(strategies.items()))
        print(f"error: --{flag} needs cache_type={name!r}, which is not registered; available: {listing}",
              file=sys.stderr)
        return None
    wanted = {"cache_steps": args.cache_steps, "shift_type": "un"}
    return {"use_cache": True, "cache_type": name, **{k: v for k, v in wanted.items() if k in strategies[name]}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra = cache_kwargs(args)
    if extra is None:
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model, tokenizer = load_model(args, getattr(torch, args.dtype))
    model = model.to(device).eval()
    prompts = read_prompts(args.prompts_file)
    total_tokens, total_forwards, fed, seconds = 0, 0, [], 0.0
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start: start + args.batch_size]
        if tokenizer is not None:
            ids, mask = encode(tokenizer, chunk, device)
        else:
            ids, mask = random_prompts(model.config, len(chunk), 32, args.seed + start).to(device), None
        begin = time.perf_counter()
        out = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=args.seq_len,
                                       steps=args.steps or args.seq_len, alg=args.sampling_alg, temperature=0.0,
                                       seed=args.seed, return_dict_in_generate=True, **extra)
        seconds += time.perf_counter() - begin
        stats = out.stats
        total_tokens += sum(stats["response_tokens"])
        total_forwards += stats["forwards"] * len(chunk)
        fed.append(stats["fed_fraction"])
        for prompt, row, n in zip(chunk, out.sequences[:, ids.shape[1]:], stats["response_tokens"]):
            answer = tokenizer.decode(row[:n], skip_special_tokens=True) if tokenizer else row[:n].tolist()
            print(f"\n>>> {prompt if tokenizer else '(random prompt ids)'}\n{answer}")
    cache = extra.get("cache_type", "none")
    print(f"\ncache {cache}: {total_tokens} tokens in {seconds:.2f} s = {total_tokens / seconds:.1f} tokens/s, "
          f"{total_tokens / max(total_forwards, 1):.2f} tokens per forward, fed fraction "
          f"{sum(fed) / len(fed):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
