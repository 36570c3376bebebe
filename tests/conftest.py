"""Shared fixtures: tiny random float64 Dream/LLaDA models built in the tests, and the parity fixtures path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models  # noqa: F401  (registers the Auto classes)
from models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM

# Tiny models: one thread is fastest and keeps timings sane when other processes share the 2 cores.
torch.set_num_threads(1)

VOCAB = 64
MASK, PAD = 63, 62  # Dream: bos = eos = pad = 62; LLaDA: eos = pad = 62, its own mask 63
PARITY_DIR = Path(__file__).resolve().parents[2] / "shared" / "parity"


@pytest.fixture(autouse=True, scope="session")
def _private_aot_cache(tmp_path_factory):
    """compile=True packages built by the tests go to a temporary directory, never the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DKVCACHE_CACHE", str(tmp_path_factory.mktemp("dkvcache-cache")))
        yield


def tiny_dream(layers: int = 2, seed: int = 0, kv_heads: int = 2) -> DreamModel:
    """A float64 Dream with GQA and a spread of logits large enough for well-separated confidences."""
    config = DreamConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, mask_token_id=MASK, pad_token_id=PAD,
                         bos_token_id=PAD, eos_token_id=PAD, rope_theta=10000.0)
    return _randomize(DreamModel(config), seed)


def tiny_llada(layers: int = 2, seed: int = 0, kv_heads: int = 2) -> LLaDAModelLM:
    config = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=kv_heads, n_layers=layers, mlp_hidden_size=64,
                         vocab_size=VOCAB, embedding_size=VOCAB, mask_token_id=MASK, eos_token_id=PAD,
                         pad_token_id=PAD, rope_theta=500000.0)
    return _randomize(LLaDAModelLM(config), seed)


def _randomize(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm" in name.split(".")[-2]:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(1.5 * torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.double().eval()


def random_prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, PAD, (batch, length), generator=gen)


def left_pad(rows: list[torch.Tensor], pad_id: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D prompts into (B, P) ids and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.fixture(scope="session")
def dream() -> DreamModel:
    return tiny_dream()


@pytest.fixture(scope="session")
def llada() -> LLaDAModelLM:
    return tiny_llada()


@pytest.fixture(scope="session")
def parity_checkpoints(tmp_path_factory) -> Path:
    """The parity checkpoints written by ../shared/parity/make_tiny.py (skips without ../shared)."""
    if not (PARITY_DIR / "make_tiny.py").exists():
        pytest.skip("../shared/parity is not present (it is beside development and CI checkouts only)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny", PARITY_DIR / "make_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("parity")
    module.main([str(out)])
    return out
