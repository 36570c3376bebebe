"""Dream-v0 as a drop-in model class: Hub checkpoint layout, bidirectional attention, ``diffusion_generate``.

    from models.modeling_dream import DreamModel
    model = DreamModel.from_pretrained("Dream-org/Dream-v0-Instruct-7B", dtype=torch.bfloat16)
    out = model.diffusion_generate(input_ids, attention_mask=mask, max_new_tokens=256, steps=256,
                                   use_cache=True, cache_type="decoded", cache_steps=4, shift_type="un")

Parameter names are exactly the Hub's (``model.layers.{i}.self_attn.q_proj.weight``, ``lm_head.weight`` …).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from dkvcache.generation import DiffusionGenerationMixin
from dkvcache.partial_forward import PartialForwardMixin, RMSNorm
from models.checkpoint import CheckedLoadingMixin
from models.configuration_dream import DreamConfig


class DreamAttention(nn.Module):
    """Projections of one attention sublayer (q/k/v with bias, o without)."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * head_dim, config.hidden_size, bias=False)


class DreamMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    """One pre-norm block; the shared partial-forward code calls the small methods below."""

    rotate_in_model_dtype = True  # Dream casts cos/sin to the model dtype before rotating

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.self_attn = DreamAttention(config)
        self.mlp = DreamMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attn_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.input_layernorm(h)

    def mlp_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.post_attention_layernorm(h)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.self_attn.q_proj(x), self.self_attn.k_proj(x), self.self_attn.v_proj(x)

    def project_v(self, x: torch.Tensor) -> torch.Tensor:
        return self.self_attn.v_proj(x)

    def project_out(self, attn: torch.Tensor) -> torch.Tensor:
        return self.self_attn.o_proj(attn)


class DreamPreTrainedModel(CheckedLoadingMixin, PreTrainedModel):
    config_class = DreamConfig
    config: DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True


class DreamBaseModel(DreamPreTrainedModel):
    """Embeddings, decoder layers and the final norm (the ``model.`` prefix of the Hub keys)."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DreamDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()


@dataclass
class DreamModelOutput(ModelOutput):
    """Output of the plain forward: logits (B, L, V) at every position (position j predicts token j+1)."""

    logits: torch.Tensor | None = None


class DreamModel(DreamPreTrainedModel, PartialForwardMixin, DiffusionGenerationMixin):
    """Dream language model (base + untied ``lm_head``) with dkvcache's diffusion generation."""

    diffusion_family = "dream"

    def __init__(self, config: DreamConfig) -> None:
        if not isinstance(config, DreamConfig):
            raise TypeError(f"DreamModel needs a DreamConfig, got {type(config).__name__} (model_type "
                            f"{getattr(config, 'model_type', None)!r})")
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # -- hooks for PartialForwardMixin -------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def _layers(self) -> nn.ModuleList:
        return self.model.layers

    def _final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.norm(h)

    def _lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    # -- transformers conventions ------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> DreamModelOutput:
        """Plain bidirectional forward; differentiable. ``attention_mask`` (B, L) 0/1 hides pad keys and, when
        ``position_ids`` is None, shifts positions so a left-padded row sees the same positions as unpadded."""
        return DreamModelOutput(logits=self._plain_logits(input_ids, attention_mask, position_ids))
