"""What examples/dream_generate.py and examples/llada_generate.py share: prompts, loading, the batch loop and the
report (answers cut at EOS, tokens/s by one rule, tokens per forward, fed fraction, peak memory, --compare)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from dkvcache.bench import random_prompts  # noqa: E402
from dkvcache.caches import available_strategies  # noqa: E402
from dkvcache.loading import load_model, load_tokenizer  # noqa: E402


def add_common_flags(p: argparse.ArgumentParser, default_model: Path) -> None:
    """The flags both example scripts take (model, lengths, batching, prompts, dtype/device, --compare)."""
    p.add_argument("--model", default=str(default_model),
                   help=f"checkpoint directory or Hub id (default: the shipped {default_model.name})")
    p.set_defaults(default_model=str(default_model))
    p.add_argument("--seq-len", type=int, default=64, help="tokens to generate (max_new_tokens / gen_length)")
    p.add_argument("--steps", type=int, help="denoising steps (default = seq-len)")
    p.add_argument("--cache-steps", type=int, default=4, help="refresh interval of the cache")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompts-file", help="a .txt file (one prompt per line) or .jsonl ('question' or 'prompt')")
    p.add_argument("--dataset", default="arith", help="built-in prompts when no --prompts-file: 'arith' (the tiny "
                   "task's held-out questions) or 'random' (random ids, no tokenizer needed)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0, help="per-row sampling seeds start here")
    p.add_argument("--compare", action="store_true", help="also run without cache on the same prompts: speed-up")
    p.add_argument("--compile", action="store_true",
                   help="compile=True: the captured step (CPU: AOT-compiled, built once and cached on disk; CUDA: "
                        "CUDA graphs); build time is excluded from the timings")
    p.add_argument("--quiet", action="store_true", help="do not print the answers")


def read_prompts(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    """(questions, gold answers) from --prompts-file or the built-in dataset. Questions are None for random ids;
    answers (GSM8K style, ``#### N``) are None unless every prompt has one (the arith dataset, or a .jsonl with
    an 'answer' field)."""
    if args.prompts_file:
        lines = [x for x in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if x.strip()]
        if not args.prompts_file.endswith(".jsonl"):
            return lines[: args.num_prompts], None
        rows = [json.loads(x) for x in lines][: args.num_prompts]
        answers = [row.get("answer") for row in rows]
        return ([row.get("question", row.get("prompt")) for row in rows],
                answers if all(isinstance(a, str) for a in answers) else None)
    if args.dataset == "arith":
        from dkvcache.tasks.arith import load_jsonl

        rows = load_jsonl(limit=args.num_prompts)
        return [row["question"] for row in rows], [row["answer"] for row in rows]
    if args.dataset == "random":
        return None, None
    raise SystemExit(f"error: --dataset {args.dataset!r} is unknown; allowed: arith, random (or --prompts-file)")


def _random_model(cls: Any, seed: int) -> Any:
    """A small random-init model of ``cls``'s family (when the shipped checkpoint is absent)."""
    from models import DreamConfig, LLaDAConfig

    torch.manual_seed(seed)
    if cls.diffusion_family == "dream":
        return cls(DreamConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, mask_token_id=2047, pad_token_id=2046,
                               eos_token_id=2046, bos_token_id=2046))
    return cls(LLaDAConfig(d_model=128, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=352, vocab_size=2048,
                           embedding_size=2048, mask_token_id=2047, eos_token_id=2046, pad_token_id=2046))


def load(cls: Any, args: argparse.Namespace) -> tuple[Any, Any, torch.device]:
    """(model, tokenizer or None, device). transformers' per-load "Loading weights" bar is silenced: the
    scripts print their own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    path = Path(args.model)
    if args.model == args.default_model and not path.is_dir():
        print(f"note: {path} not found; using a small random-init model (answers are noise)")
        return _random_model(cls, args.seed).to(device=device, dtype=dtype).eval(), None, device
    model = load_model(args.model, dtype=dtype, device=device, family=cls.diffusion_family)
    return model, load_tokenizer(args.model, required=False), device


def encode(tokenizer: Any, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated (when the tokenizer has a template), left-padded ids and attention mask."""
    if getattr(tokenizer, "chat_template", None):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def check_strategy(name: str) -> None:
    """Exit with the list of registered strategies when ``name`` is not one of them."""
    strategies = available_strategies()
    if name not in strategies:
        raise SystemExit(f"error: cache_type={name!r} is not registered; available: {sorted(strategies)}")


def run(model: Any, tokenizer: Any, device: torch.device, prompts: list[str] | None, args: argparse.Namespace,
        kwargs: dict[str, Any], label: str, show: bool, answers: list[str] | None = None) -> dict[str, float]:
    """Generate for every prompt in batches; print answers (when ``show``) and return the totals (with the
    number of correct final answers when gold ``answers`` are given)."""
    from dkvcache.tasks.arith import is_correct

    count = len(prompts) if prompts is not None else args.num_prompts
    tokens = forwards_rows = correct = 0
    fed, seconds = [], 0.0
    for start in tqdm(range(0, count, args.batch_size), desc=label, unit="batch", leave=False, disable=None):
        size = min(args.batch_size, count - start)
        if prompts is not None and tokenizer is not None:
            ids, mask = encode(tokenizer, prompts[start:start + size], device)
        else:
            ids, mask = random_prompts(model.config, size, 32, args.seed + start).to(device), None
        out = model.diffusion_generate(ids, attention_mask=mask, seed=args.seed + start,
                                       return_dict_in_generate=True, **kwargs)
        stats = out.stats
        seconds += stats["wall_time_s"]
        tokens += sum(stats["response_tokens"])
        forwards_rows += stats["forwards"] * size
        fed.append(stats["fed_fraction"])
        for i, (row, n) in enumerate(zip(out.sequences[:, ids.shape[1]:], stats["response_tokens"])):
            answer = tokenizer.decode(row[:n], skip_special_tokens=True) if tokenizer else row[:n].tolist()
            if answers is not None and tokenizer is not None:
                correct += is_correct(answer, answers[start + i])
            if show:  # tqdm.write keeps the batch bar from running into the answers
                question = prompts[start + i] if prompts is not None else "(random prompt ids)"
                tqdm.write(f"\n>>> {question}\n{answer}")
    totals = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
              "tokens_per_forward": tokens / max(forwards_rows, 1), "fed_fraction": sum(fed) / len(fed)}
    if answers is not None and tokenizer is not None:
        totals.update(correct=correct, count=count)
    return totals


def peak_memory(device: torch.device) -> str:
    """Peak GPU memory allocated, or the process's peak RSS on CPU, as text."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def report(label: str, totals: dict[str, float]) -> None:
    """Print one setting's totals on one line."""
    print(f"{label}: {totals['tokens']} response tokens (up to EOS) in {totals['seconds']:.2f} s = "
          f"{totals['tokens_per_s']:.1f} tokens/s, {totals['tokens_per_forward']:.2f} tokens per forward, "
          f"fed fraction {totals['fed_fraction']:.3f}"
          + (f", correct final answers {totals['correct']}/{totals['count']}" if "correct" in totals else ""))


def main_loop(cls: Any, args: argparse.Namespace, kwargs: dict[str, Any], label: str) -> int:
    """Load, run the chosen setting (and no cache with --compare), print the report."""
    model, tokenizer, device = load(cls, args)
    prompts, answers = read_prompts(args)
    if args.compile:
        kwargs = {**kwargs, "compile": True}
        label += ", compiled"
    if prompts is not None and tokenizer is None:
        print("note: no tokenizer in the model directory; using random prompt ids")
        prompts = None
    plain = {k: v for k, v in kwargs.items() if k not in ("use_cache", "cache_type", "cache_steps", "shift_type",
                                                         "window_size")}
    if args.compare:  # warm both settings up on one batch so neither pays first-call costs in the timing
        print("warm-up (untimed): one batch with each setting, so neither pays first-call costs in the timing")
        warm = argparse.Namespace(**{**vars(args), "num_prompts": min(args.batch_size, args.num_prompts)})
        for setting in (kwargs, plain):
            run(model, tokenizer, device, prompts and prompts[: warm.num_prompts], warm, setting, "warm-up", False)
    totals = run(model, tokenizer, device, prompts, args, kwargs, label, show=not args.quiet, answers=answers)
    print()
    report(label, totals)
    if args.compare:
        plain_label = "no cache" + (", compiled" if args.compile else "")
        base = run(model, tokenizer, device, prompts, args, plain, plain_label, show=False, answers=answers)
        report(plain_label, base)
        print(f"speed-up of {label} vs no cache: {base['seconds'] / max(totals['seconds'], 1e-9):.2f}x "
              "(same prompts, same process)")
    print(f"peak memory: {peak_memory(device)}")
    print("fed fraction = positions run through the model ÷ positions a no-cache step would run (lower = more "
          "cached)")
    return 0
