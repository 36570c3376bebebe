"""Unigram frequency tables for PC-sampler: load one (tensor or JSON), build one from a text corpus, and the CLI.

``python -m dkvcache.unigram --tokenizer DIR --text FILE --out FILE.json`` (also ``python -m dkvcache.decoders``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch


def load_unigram_table(source: torch.Tensor | str | os.PathLike, vocab_size: int) -> torch.Tensor:
    """Unigram frequencies (vocab_size,) float64 from a tensor, or from a JSON file holding either the
    reference's ``{"num_token": N, "p_baseline_dict": {id: count}}`` or ``{id: count}`` (N = their sum,
    an optional "num_token" overriding it). Unseen tokens get 1/N."""
    if isinstance(source, torch.Tensor):
        table = source.detach().to("cpu", torch.float64)
        if table.dim() != 1 or not torch.isfinite(table).all() or (table < 0).any() or (table > 1).any():
            raise ValueError("diffusion_generate: pc_frequencies must be a 1-D tensor of frequencies in [0, 1] "
                             "(count / total); build one with dkvcache.unigram.build_unigram_table")
        return table
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"diffusion_generate: pc_frequencies={path!r} is not a file")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    counts = data.get("p_baseline_dict", {k: v for k, v in data.items() if k != "num_token"})
    total = data.get("num_token", sum(counts.values()))
    ids = torch.tensor([int(k) for k in counts], dtype=torch.long)
    if total <= 0 or (ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size)):
        raise ValueError(f"diffusion_generate: pc_frequencies file {path!r} has token ids outside "
                         f"[0, {vocab_size}) or no tokens")
    table = torch.full((vocab_size,), 1.0 / total, dtype=torch.float64)
    table[ids] = torch.tensor([float(v) for v in counts.values()], dtype=torch.float64) / total
    return table


def build_unigram_table(tokenizer: Any, text_path: str | os.PathLike, vocab_size: int | None = None,
                        json_path: str | os.PathLike | None = None) -> torch.Tensor:
    """Unigram frequencies (vocab,) of the tokenizer's ids over a text file (line by line, no special
    tokens): count / total, unseen tokens 1 / total. With ``json_path`` also saved in the reference's format
    ``{"num_token": N, "p_baseline_dict": {id: count}}`` (loadable as ``pc_frequencies=json_path``)."""
    counts: Counter = Counter()
    with open(text_path, encoding="utf-8") as handle:
        for line in handle:
            counts.update(tokenizer(line, add_special_tokens=False)["input_ids"])
    total = sum(counts.values())
    if total == 0:
        raise ValueError(f"build_unigram_table: {text_path!r} holds no tokens")
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump({"num_token": total, "p_baseline_dict": {str(k): v for k, v in sorted(counts.items())}},
                      handle)
    size = vocab_size or max(len(tokenizer), max(counts) + 1)
    if max(counts) >= size:
        raise ValueError(f"build_unigram_table: token id {max(counts)} is outside vocab_size={size}")
    table = torch.full((size,), 1.0 / total, dtype=torch.float64)
    table[list(counts)] = torch.tensor(list(counts.values()), dtype=torch.float64) / total
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dkvcache.unigram --tokenizer DIR --text FILE --out FILE.json``: a PC-sampler table."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (a Hub layout)")
    parser.add_argument("--text", required=True, help="a plain-text corpus file")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    import models  # noqa: F401  (registers DreamTokenizer)

    table = build_unigram_table(AutoTokenizer.from_pretrained(args.tokenizer), args.text, json_path=args.out)
    print(f"wrote {args.out} (vocab {table.shape[0]})")


if __name__ == "__main__":
    main()
