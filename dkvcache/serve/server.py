"""Building a server: load the checkpoint, derive its generation defaults and end tokens, wire the scheduler."""

from __future__ import annotations

import json
import os
from typing import Any

from dkvcache.loading import load_model_and_tokenizer, resolve_model_path
from dkvcache.resolve import resolve
from dkvcache.serve.app import Engine
from dkvcache.serve.protocol import SERVER_ONLY, with_cache_switch
from dkvcache.serve.scheduler import ADMISSIONS, Scheduler

# Keys of a checkpoint's generation_config.json that are diffusion_generate settings (the rest are token ids).
_GENERATION_KEYS = ("max_new_tokens", "steps", "alg", "alg_temp", "eps", "temperature", "top_p", "top_k",
                    "block_length", "threshold", "cache_type")
# Tokens that end an assistant turn in the families' chat formats (the EOS token is always one).
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")


def checkpoint_defaults(path: str) -> dict[str, Any]:
    """The diffusion settings in the checkpoint's generation_config.json (local directory or Hub id)."""
    local = resolve_model_path(path)
    file = os.path.join(local, "generation_config.json")
    if not os.path.isdir(local):
        try:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(path, "generation_config.json")
        except Exception:  # offline or no such file: the family defaults apply
            return {}
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as handle:
        raw = json.load(handle)
    return {k: raw[k] for k in _GENERATION_KEYS if raw.get(k) is not None}


def end_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """EOS plus the end-of-turn tokens this vocabulary has: a row's text ends at the first of them."""
    ids = {model.config.eos_token_id} if getattr(model.config, "eos_token_id", None) is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[name] for name in _END_OF_TURN if name in vocab)
    return ids


def build_engine(model_path: str, dtype: str = "float32", device: str = "cpu", max_batch: int = 8,
                 max_queue: int = 64, request_timeout_s: float | None = 600.0, name: str | None = None,
                 admission: str = "continuous", **generation_defaults: Any) -> Engine:
    """Load ``model_path`` and return the :class:`Engine` ``create_app`` serves (the scheduler is not started).

    ``generation_defaults`` (``diffusion_generate`` keywords) override the checkpoint's generation_config.json;
    each request may override them again. They are checked once here, so a bad default fails at start-up.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if admission not in ADMISSIONS:
        raise ValueError(f"admission={admission!r} is invalid; allowed: {list(ADMISSIONS)}")
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    blocked = sorted(set(generation_defaults) & (SERVER_ONLY - {"max_new_tokens"}))
    if blocked:
        raise ValueError(f"{blocked} cannot be server defaults (they are fixed per checkpoint or in-process only)")
    model, tokenizer = load_model_and_tokenizer(model_path, dtype, device)
    defaults = with_cache_switch({**checkpoint_defaults(model_path), **generation_defaults})
    resolve(model, 1, **defaults)  # a bad default is a start-up error, not a 400 on every request
    scheduler = Scheduler(model, tokenizer, end_token_ids(tokenizer, model), max_batch=max_batch,
                          max_queue=max_queue, admission=admission)
    served = name or os.path.basename(os.path.normpath(model_path))
    return Engine(model=model, tokenizer=tokenizer, scheduler=scheduler, name=served, defaults=defaults,
                  request_timeout_s=request_timeout_s)
