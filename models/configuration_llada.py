"""Configuration of LLaDA models, with the OLMo-style field names of the Hub's config.json."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from models.checkpoint import check_config_dict

# What a LLaDA config.json must set: their defaults are LLaDA-8B's, wrong for any other checkpoint.
REQUIRED_FIELDS = ("vocab_size", "d_model", "n_heads", "n_layers", "mask_token_id")
DREAM_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


class LLaDAConfig(PreTrainedConfig):
    """Config of ``GSAI-ML/LLaDA-8B-{Base,Instruct}`` (model_type "llada").

    Field names are the checkpoint's own (``d_model``, ``n_heads``, ``n_kv_heads``, ``n_layers``,
    ``mlp_hidden_size`` …); ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads`` and
    ``num_hidden_layers`` are read-only aliases. Defaults are LLaDA-8B's. Fields of the OLMo config that do
    not change the computation of a "llama" block (dropouts, init_*, precision, flash_attention …) are kept
    but ignored; fields that would change it and are not implemented are rejected with a clear error.
    A checkpoint's config.json (:meth:`from_dict`, used by ``from_pretrained`` and the Auto classes) must have
    ``model_type`` "llada" (or none) and set :data:`REQUIRED_FIELDS`; otherwise ValueError, before any weight is
    allocated.
    """

    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_ratio: int = 4,
        mlp_hidden_size: int | None = 12288,
        activation_type: str = "silu",
        block_type: str = "llama",
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        max_sequence_length: int = 4096,
        rope: bool = True,
        rope_theta: float = 500000.0,
        rope_full_precision: bool = True,
        layer_norm_type: str = "rms",
        rms_norm_eps: float = 1e-5,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        attention_layer_norm: bool = False,
        alibi: bool = False,
        weight_tying: bool = False,
        scale_logits: bool = False,
        input_emb_norm: bool = False,
        multi_query_attention: bool | None = None,
        block_group_size: int = 1,
        init_std: float = 0.02,
        mask_token_id: int = 126336,
        eos_token_id: int = 126081,
        pad_token_id: int = 126081,
        bos_token_id: int | None = None,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> None:
        self.d_model = d_model
        self.n_heads = n_heads
        if n_kv_heads is None:
            n_kv_heads = 1 if multi_query_attention else n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_hidden_size
        self.activation_type = activation_type
        self.block_type = block_type
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.max_sequence_length = max_sequence_length
        self.rope = rope
        self.rope_theta = rope_theta
        self.rope_full_precision = rope_full_precision
        self.layer_norm_type = layer_norm_type
        self.rms_norm_eps = rms_norm_eps
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.attention_layer_norm = attention_layer_norm
        self.alibi = alibi
        self.weight_tying = weight_tying
        self.scale_logits = scale_logits
        self.input_emb_norm = input_emb_norm
        self.multi_query_attention = multi_query_attention
        self.block_group_size = block_group_size
        self.init_std = init_std
        self.mask_token_id = mask_token_id
        self.use_cache = use_cache
        self._check_supported()
        kwargs.setdefault("tie_word_embeddings", weight_tying)
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        vocab = "embedding_size" if config_dict.get("embedding_size") else "vocab_size"
        check_config_dict(config_dict, kwargs, cls.__name__, cls.model_type, REQUIRED_FIELDS,
                          ("Dream", "DreamModel", DREAM_FIELDS), vocab)
        return super().from_dict(config_dict, **kwargs)

    def _check_supported(self) -> None:
        wanted = {"activation_type": "silu", "block_type": "llama", "layer_norm_type": "rms", "rope": True,
                  "alibi": False, "scale_logits": False, "input_emb_norm": False, "attention_layer_norm": False,
                  "include_bias": False, "block_group_size": 1}
        for name, allowed in wanted.items():
            if getattr(self, name) != allowed:
                raise ValueError(f"LLaDAConfig: {name}={getattr(self, name)!r} is not supported by this "
                                 f"implementation; allowed: {allowed!r} (as in LLaDA-8B)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LLaDAConfig: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    # Standard names, read-only, so generic code (and accelerate's device maps) can size things.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.n_kv_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def intermediate_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        return self.embedding_size if self.embedding_size is not None else self.vocab_size
