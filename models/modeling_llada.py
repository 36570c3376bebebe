"""LLaDA as a drop-in model class: Hub checkpoint layout (OLMo key names), bidirectional, ``diffusion_generate``.

    from models.modeling_llada import LLaDAModelLM
    model = LLaDAModelLM.from_pretrained("GSAI-ML/LLaDA-8B-Instruct", dtype=torch.bfloat16)
    out = model.diffusion_generate(input_ids, gen_length=128, steps=128, block_length=32)

Unlike the original, left padding is honoured (attention mask + per-row positions) and GQA works.
Parameter names are the Hub's: ``model.transformer.wte.weight``, ``model.transformer.blocks.{i}.q_proj.weight`` …
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
from models.configuration_llada import LLaDAConfig


class LLaDALlamaBlock(nn.Module):
    """One "llama" block with LLaDA's names: ``ff_proj`` is the SiLU gate, ``up_proj`` the linear branch."""

    rotate_in_model_dtype = False  # LLaDA rotates in float32 (rope_full_precision) and casts back

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, hd = config.d_model, config.head_dim
        qkv_bias = config.include_qkv_bias
        self.head_dim = hd
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.ff_out = nn.Linear(config.intermediate_size, d, bias=False)

    def mlp_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.ff_norm(h)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def project_v(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(x)

    def project_out(self, attn: torch.Tensor) -> torch.Tensor:
        return self.attn_out(attn)


class LLaDAPreTrainedModel(CheckedLoadingMixin, PreTrainedModel):
    config_class = LLaDAConfig
    config: LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]
    _supports_sdpa = True


class LLaDAModel(nn.Module):
    """``transformer = {wte, blocks, ln_f, ff_out}``: the ``model.transformer.`` prefix of the Hub keys."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        modules = {
            "wte": nn.Embedding(config.padded_vocab_size, config.d_model),
            "blocks": nn.ModuleList([LLaDALlamaBlock(config) for _ in range(config.n_layers)]),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.transformer = nn.ModuleDict(modules)


@dataclass
class LLaDAOutput(ModelOutput):
    """Output of the plain forward: logits (B, L, V); position j predicts token j (no shift)."""

    logits: torch.Tensor | None = None


class LLaDAModelLM(LLaDAPreTrainedModel, PartialForwardMixin, DiffusionGenerationMixin):
    """LLaDA masked-diffusion LM with dkvcache's diffusion generation."""

    diffusion_family = "llada"

    def __init__(self, config: LLaDAConfig) -> None:
        if not isinstance(config, LLaDAConfig):
            raise TypeError(f"LLaDAModelLM needs a LLaDAConfig, got {type(config).__name__} (model_type "
                            f"{getattr(config, 'model_type', None)!r})")
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    # -- hooks for PartialForwardMixin -------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["wte"](ids)

    def _layers(self) -> nn.ModuleList:
        return self.model.transformer["blocks"]

    def _final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["ln_f"](h)

    def _lm_head(self, h: torch.Tensor) -> torch.Tensor:
        if self.config.weight_tying:
            return F.linear(h, self.model.transformer["wte"].weight)
        return self.model.transformer["ff_out"](h)

    # -- transformers conventions ------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer["wte"]

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer["wte"] = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return None if self.config.weight_tying else self.model.transformer["ff_out"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> LLaDAOutput:
        """Plain bidirectional forward; differentiable. With ``attention_mask=None`` every token is attended and
        positions are 0..L-1, as in the original; with a mask, pad keys are hidden and positions start at each
        row's first real token."""
        return LLaDAOutput(logits=self._plain_logits(input_ids, attention_mask, position_ids))
