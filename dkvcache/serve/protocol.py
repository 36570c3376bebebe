"""The OpenAI request bodies the server accepts, and their translation into ``diffusion_generate`` settings.

OpenAI fields map as: ``max_tokens`` → ``max_new_tokens``, ``temperature``, ``top_p``, ``seed`` (per request),
``stop`` (applied to the text). Any other top-level field (the OpenAI client's ``extra_body``) is a
``diffusion_generate`` keyword — ``cache_type``, ``threshold``, ``block_length``, ``steps``, ``cache_steps`` … —
except those that only make sense in-process (hooks, history, token ids), which are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Keywords a client may not set: callbacks, in-process outputs, the checkpoint's own token ids, the server's knobs.
SERVER_ONLY = frozenset({
    "generation_tokens_hook_func", "generation_logits_hook_func", "generator", "output_history",
    "return_dict_in_generate", "progress", "compile", "num_return_sequences", "mask_token_id", "pad_token_id",
    "eos_token_id", "eot_token_id", "eos_early_stop", "full_logits", "input_ids", "attention_mask", "inputs",
    "max_new_tokens", "gen_length", "max_length",
})
# Orders whose scores are not probabilities: a threshold/factor request drops such a server default.
RANK_ONLY_ALGS = ("origin", "entropy")
# OpenAI fields we accept but do not implement must keep their neutral value.
NEUTRAL = {"n": 1, "logprobs": None, "echo": False, "presence_penalty": 0, "frequency_penalty": 0,
           "best_of": None, "logit_bias": None, "suffix": None, "top_logprobs": None}
# OpenAI fields that change nothing here.
IGNORED = frozenset({"user", "stream_options", "response_format", "tools", "tool_choice", "parallel_tool_calls",
                     "metadata", "store", "service_tier"})


def with_cache_switch(settings: dict[str, Any]) -> dict[str, Any]:
    """Naming a cache is asking for it: ``cache_type`` other than "none" turns ``use_cache`` on unless given."""
    if settings.get("cache_type") not in (None, "none") and "use_cache" not in settings:
        settings = {**settings, "use_cache": True}
    return settings


class RequestError(ValueError):
    """A bad request: ``param`` names the offending field (the server answers 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    stream: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise RequestError("stop: at most 4 non-empty strings", "stop")
        return tuple(stops)

    def diffusion_settings(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The server defaults overridden by this request's fields (seed and stop apart)."""
        settings = dict(defaults)
        extra = dict(self.model_extra or {})
        for name, neutral in NEUTRAL.items():
            value = extra.pop(name, neutral)
            if value != neutral and value is not None:
                raise RequestError(f"{name}={value!r} is not supported by this server (only {neutral!r})", name)
        for name in IGNORED:
            extra.pop(name, None)
        for name in extra:
            if name in SERVER_ONLY:
                raise RequestError(f"{name} is set by the server and cannot be given in a request", name)
        if ({"threshold", "factor"} & set(extra)) and "alg" not in extra and settings.get("alg") in RANK_ONLY_ALGS:
            del settings["alg"]  # as in diffusion_generate: a parallel rule without an alg compares probabilities
        settings.update(extra)
        tokens = self.max_completion_tokens or self.max_tokens
        if tokens is not None:
            settings["max_new_tokens"] = tokens
        if self.temperature is not None:
            settings["temperature"] = self.temperature
        if self.top_p is not None:
            settings["top_p"] = None if self.top_p == 1 else self.top_p
        return with_cache_switch(settings)


class CompletionRequest(_Common):
    """``POST /v1/completions``: a text prompt (or one list of token ids)."""

    prompt: str | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    """``POST /v1/chat/completions``: messages rendered with the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
