"""Model + tokenizer + generation settings: prompts in, completions and per-row statistics out.

Shared by the eval runner and the lm-eval adapter. Prompts are tokenized one by one (chat-templated text
without added special tokens, raw text with the tokenizer's own), optionally BOS-prefixed at the id level (never
twice), left-padded into a batch, generated with per-row seeds, and cut at the first end-of-sequence or
end-of-turn token before decoding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from dkvcache.loading import DTYPES, load_config, load_model_and_tokenizer

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")


class GenerationRejected(ValueError):
    """diffusion_generate refused the configured keywords (before any compute)."""


@contextlib.contextmanager
def _naming_model_path(path: str) -> Iterator[None]:
    """Prefix a loading error with ``model.path`` (and the offline hint for OSError), keeping its type."""
    try:
        yield
    except OSError as err:
        raise OSError(f"could not load model.path={path!r}: {err}\nOffline? Download the checkpoint elsewhere and pass "
                      "model.path=/local/dir (Hub layout: config.json, safetensors, tokenizer files).") from err
    except (TypeError, ValueError) as err:  # the base type: subclasses may not take a message alone
        raise (TypeError if isinstance(err, TypeError) else ValueError)(f"model.path={path!r}: {err}") from err


def load_model(path: str, dtype: str = "bfloat16", device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of ``model.path`` through :mod:`dkvcache.loading` (no remote code)."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is invalid; allowed: {sorted(DTYPES)}")
    with _naming_model_path(path):
        return load_model_and_tokenizer(path, DTYPES[dtype], device)


class _ConfigOnlyModel:
    """What :func:`dkvcache.resolve.resolve` reads of a model (family, config, embedding rows), from config.json
    alone: the generation settings are checked before the weights are loaded."""

    def __init__(self, config: Any, family: str) -> None:
        self.config, self.diffusion_family = config, family
        rows = getattr(config, "padded_vocab_size", None) or config.vocab_size
        self._embedding = SimpleNamespace(weight=SimpleNamespace(shape=(rows, config.hidden_size)))

    def get_input_embeddings(self) -> Any:
        return self._embedding


def check_generation(model: Any, gen_kwargs: dict, prompt_length: int = 1) -> None:
    """GenerationRejected when ``diffusion_generate`` would refuse ``gen_kwargs`` on ``model`` (no compute)."""
    from dkvcache.resolve import resolve

    kwargs = {**gen_kwargs, "return_dict_in_generate": True}
    try:
        resolve(model, prompt_length, **kwargs)
    except (ValueError, TypeError) as err:
        raise GenerationRejected(f"diffusion_generate rejects the configured generation/cache settings: {err}\n"
                                 f"(keywords: {kwargs})") from err


def precheck(path: str, gen_kwargs: dict) -> None:
    """Before any weight is read: ``model.path``'s config.json (a Dream/LLaDA checkpoint with the fields it needs)
    and the generation/cache settings against it. Raises what :func:`load_model` raises, or GenerationRejected."""
    with _naming_model_path(path):
        config, cls = load_config(path)
    stand_in = _ConfigOnlyModel(config, cls.diffusion_family)
    try:
        check_generation(stand_in, gen_kwargs)
    except AttributeError:  # resolve reads more of a model than the stand-in has: Engine.check runs after loading
        return


@dataclass
class Batch:
    """One generate call: token ids after the prompt (cut at the first stop id), per-row stats, the raw stats."""

    completions: list[list[int]]
    response_tokens: list[int]
    stats: dict = field(default_factory=dict)


class Engine:
    """Generates completions for prompt texts with fixed ``diffusion_generate`` keywords."""

    def __init__(self, model: Any, tokenizer: Any, gen_kwargs: dict, add_bos_token: bool = False) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.gen_kwargs = dict(gen_kwargs)
        self.add_bos_token = add_bos_token
        config = model.config
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        vocab = tokenizer.get_vocab()
        self.stop_ids = {self.eos_id} | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        self.stop_ids.discard(None)
        self._checked = False

    @property
    def family(self) -> str:
        return self.model.diffusion_family

    def check(self, prompt_length: int = 1) -> None:
        """GenerationRejected when the configured keywords are refused (before any compute or write)."""
        check_generation(self.model, self.gen_kwargs, prompt_length)

    def encode(self, text: str, chat: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=not chat)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _cut(self, row: list[int]) -> list[int]:
        for i, t in enumerate(row):
            if t in self.stop_ids:
                return row[:i]
        return row

    def generate(self, prompts: list[list[int]], seeds: list[int] | None = None, **overrides: Any) -> Batch:
        """Left-pad ``prompts`` into one batch and run ``diffusion_generate``."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        kwargs = {**self.gen_kwargs, **overrides, "return_dict_in_generate": True}
        if seeds is not None:
            kwargs["seed"] = list(seeds)
        device = self.model.device
        try:
            out = self.model.diffusion_generate(ids.to(device), attention_mask=mask.to(device), **kwargs)
        except (ValueError, TypeError) as err:
            if self._checked:
                raise
            raise GenerationRejected(f"diffusion_generate rejected the configured generation/cache settings: {err}"
                                     f"\n(keywords: { {k: v for k, v in kwargs.items() if k != 'seed'} })") from err
        self._checked = True
        rows = out.sequences[:, width:].tolist()
        stats = dict(out.stats or {})
        return Batch([self._cut(r) for r in rows], list(stats.get("response_tokens", [len(r) for r in rows])), stats)
