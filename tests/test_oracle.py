"""Our models against transformers' own Qwen2 / Llama run bidirectionally on the same weights (an oracle we did
not write). transformers 5: ``is_causal=False`` in the config makes them bidirectional."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.conftest import left_pad, random_prompts, tiny_dream, tiny_llada


def _norms_in_float64(oracle) -> None:
    """transformers' RMSNorm casts to float32 even for float64 models; ours keeps float64 (at least float32).
    Give the oracle's norms the same float64 arithmetic so the comparison can be exact."""
    for module in oracle.modules():
        if type(module).__name__.endswith("RMSNorm"):
            def forward(h, m=module):
                return m.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
            module.forward = forward


def _qwen2_from_dream(model) -> Qwen2ForCausalLM:
    c = model.config
    config = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                         tie_word_embeddings=False, is_causal=False, attn_implementation="sdpa")
    oracle = Qwen2ForCausalLM(config).double().eval()
    missing, unexpected = oracle.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    _norms_in_float64(oracle)
    return oracle


def _llama_from_llada(model) -> LlamaForCausalLM:
    c = model.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                         rms_norm_eps=c.rms_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                         tie_word_embeddings=False, is_causal=False, attn_implementation="sdpa")
    oracle = LlamaForCausalLM(config).double().eval()
    renames = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm", "q_proj": "self_attn.q_proj",
               "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
               "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
    state = {}
    for key, value in model.state_dict().items():
        if key == "model.transformer.wte.weight":
            state["model.embed_tokens.weight"] = value
        elif key == "model.transformer.ln_f.weight":
            state["model.norm.weight"] = value
        elif key == "model.transformer.ff_out.weight":
            state["lm_head.weight"] = value
        else:
            _, _, _, index, name, _ = key.split(".")
            state[f"model.layers.{index}.{renames[name]}.weight"] = value
    missing, unexpected = oracle.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    _norms_in_float64(oracle)
    return oracle


def test_dream_matches_qwen2_bidirectional():
    model = tiny_dream(layers=3, seed=1)
    oracle = _qwen2_from_dream(model)
    ids = random_prompts(2, 12, seed=3)
    with torch.no_grad():
        ours, ref = model(ids).logits, oracle(ids).logits
    assert torch.allclose(ours, ref, atol=1e-10, rtol=1e-10), (ours - ref).abs().max()
    # the oracle really is bidirectional: changing the last token changes position 0
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 60
    with torch.no_grad():
        assert (oracle(changed).logits[:, 0] - ref[:, 0]).abs().max() > 1e-6


def test_llada_matches_llama_bidirectional():
    model = tiny_llada(layers=3, seed=2)
    oracle = _llama_from_llada(model)
    ids = random_prompts(2, 12, seed=4)
    with torch.no_grad():
        ours, ref = model(ids).logits, oracle(ids).logits
    assert torch.allclose(ours, ref, atol=1e-10, rtol=1e-10), (ours - ref).abs().max()


def test_padded_forward_matches_oracle_with_padding_mask():
    """With a left-padding mask both models equal the oracle fed the same 2-D mask and per-row positions."""
    rows = [random_prompts(1, 10, seed=5)[0], random_prompts(1, 6, seed=6)[0]]
    ids, mask = left_pad(rows)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for model in (tiny_dream(seed=3), tiny_llada(seed=4)):
        oracle = _qwen2_from_dream(model) if model.diffusion_family == "dream" else _llama_from_llada(model)
        with torch.no_grad():
            ours = model(ids, attention_mask=mask).logits
            ref = oracle(ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        assert torch.allclose(ours[real], ref[real], atol=1e-10, rtol=1e-10)
