"""Configuration of Dream-v0 models (a Qwen2.5-style bidirectional decoder), with the Hub's field names."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from models.checkpoint import check_config_dict

# What a Dream config.json must set: their defaults are Dream-7B's, wrong for any other checkpoint.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "mask_token_id")
LLADA_FIELDS = ("d_model", "n_heads", "n_layers", "n_kv_heads", "mlp_hidden_size", "block_type")


class DreamConfig(PreTrainedConfig):
    """Config of ``Dream-org/Dream-v0-{Base,Instruct}-7B``; defaults are the original class defaults.

    ``mask_token_id`` is the diffusion MASK token (151666 for the Hub models). Everything the loader needs is in
    the checkpoint's config.json; unknown extra fields (``auto_map``, ``sliding_window`` …) are kept as is.
    A checkpoint's config.json (:meth:`from_dict`, used by ``from_pretrained`` and the Auto classes) must have
    ``model_type`` "Dream" (or none) and set :data:`REQUIRED_FIELDS`; otherwise ValueError, before any weight is
    allocated.
    """

    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 22016,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = False,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = 4096,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        mask_token_id: int = 151666,
        pad_token_id: int = 151643,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        if rope_scaling:
            raise ValueError(f"DreamConfig: rope_scaling={rope_scaling!r} is not supported (the Dream-v0 "
                             "checkpoints use plain RoPE); allowed: None")
        if hidden_act != "silu":
            raise ValueError(f"DreamConfig: hidden_act={hidden_act!r} is not supported; allowed: 'silu'")
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        check_config_dict(config_dict, kwargs, cls.__name__, cls.model_type, REQUIRED_FIELDS,
                          ("llada", "LLaDAModelLM", LLADA_FIELDS), "vocab_size")
        return super().from_dict(config_dict, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
