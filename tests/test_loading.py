"""Loading and saving in the exact Hub layouts, Auto-class registration, dtype arguments, tokenizers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from models import DreamConfig, DreamModel, DreamTokenizer, LLaDAConfig, LLaDAModelLM
from tests.conftest import random_prompts, tiny_dream, tiny_llada

DREAM_LAYER_KEYS = {
    "input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "self_attn.o_proj.weight",
    *(f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")),
}
LLADA_LAYER_KEYS = {f"{n}.weight" for n in ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out",
                                            "ff_proj", "up_proj", "ff_out")}


def test_state_dict_keys_are_the_hub_names():
    dream_keys = set(tiny_dream(layers=2).state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{k}" for i in range(2) for k in DREAM_LAYER_KEYS}
    assert dream_keys == expected
    llada_keys = set(tiny_llada(layers=2).state_dict())
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    expected |= {f"model.transformer.blocks.{i}.{k}" for i in range(2) for k in LLADA_LAYER_KEYS}
    assert llada_keys == expected


@pytest.mark.parametrize("builder", [tiny_dream, tiny_llada])
def test_save_load_round_trip_sharded(builder, tmp_path):
    model = builder()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    again = type(model).from_pretrained(tmp_path, dtype=torch.float64)
    ids = random_prompts(2, 8)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_parity_checkpoints_load_with_no_missing_keys(parity_checkpoints):
    for cls, name in ((DreamModel, "tiny-dream"), (LLaDAModelLM, "tiny-llada")):
        model, info = cls.from_pretrained(parity_checkpoints / name, dtype=torch.float64, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        stored = load_file(parity_checkpoints / name / "model.safetensors")
        assert set(stored) == set(model.state_dict())
        assert model.dtype == torch.float64


def test_auto_classes_without_trust_remote_code(parity_checkpoints):
    """config.json carries the original auto_map pointing at files that do not exist; registration wins."""
    for name, cls, cfg_cls in (("tiny-dream", DreamModel, DreamConfig), ("tiny-llada", LLaDAModelLM, LLaDAConfig)):
        path = parity_checkpoints / name
        assert "auto_map" in json.loads((path / "config.json").read_text())
        assert isinstance(AutoConfig.from_pretrained(path), cfg_cls)
        assert type(AutoModel.from_pretrained(path, dtype="float32")) is cls
        assert type(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)) is cls


def test_dtype_and_deprecated_torch_dtype(parity_checkpoints):
    path = parity_checkpoints / "tiny-dream"
    assert DreamModel.from_pretrained(path).dtype == torch.bfloat16  # transformers 5 default: the stored dtype
    assert DreamModel.from_pretrained(path, dtype=torch.float32).dtype == torch.float32
    assert DreamModel.from_pretrained(path, torch_dtype=torch.float64).dtype == torch.float64


def test_llada_config_aliases_and_checks():
    config = LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=2, n_layers=3, mlp_hidden_size=96)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.num_hidden_layers, config.head_dim) == (64, 4, 2, 3, 16)
    with pytest.raises(ValueError, match="block_type"):
        LLaDAConfig(block_type="sequential")
    with pytest.raises(ValueError, match="n_kv_heads"):
        LLaDAConfig(n_heads=4, n_kv_heads=3)


def _write_dream_tokenizer_files(path) -> None:
    """A miniature Qwen2-style byte-level BPE in the files the Hub Dream repos ship (vocab.json + merges.txt)."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab["he"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\nh e\n")
    special = {"<|endoftext|>": len(vocab), "<|mask|>": len(vocab) + 1}
    config = {"tokenizer_class": "DreamTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer",
              None]}, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False}
                                       for t, i in special.items()}}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_dream_tokenizer_loads_hub_layout_offline(parity_checkpoints, tmp_path):
    import shutil

    shutil.copy(parity_checkpoints / "tiny-dream" / "config.json", tmp_path / "config.json")
    _write_dream_tokenizer_files(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tokenizer, DreamTokenizer)
    ids = tokenizer("hehe")["input_ids"]
    assert tokenizer.decode(ids) == "hehe" and len(ids) == 2  # the "he" merge applied
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"


def test_device_map_and_gradients(parity_checkpoints):
    model = LLaDAModelLM.from_pretrained(parity_checkpoints / "tiny-llada", dtype=torch.float32, device_map="cpu")
    assert model.device.type == "cpu"
    small = tiny_dream()
    ids = random_prompts(2, 6)
    loss = small(ids).logits.logsumexp(-1).mean()
    loss.backward()  # the plain forward is differentiable (training, log-likelihoods)
    assert small.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("first,second", [("dkvcache", "models"), ("models", "dkvcache"),
                                          ("dkvcache.generation", "models.modeling_llada")])
def test_no_import_cycle(first, second):
    import subprocess
    import sys

    code = f"import {first}, {second}; import dkvcache; print(dkvcache.DreamModel.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "DreamModel", out.stderr
