"""The AOT step's K × N weight copies: the same products, the model's modules put back, rebuilt when a weight
changes in place, and left out for models whose linear weights are large."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dkvcache import aot
from dkvcache.kn_linear import KNLinear, kn_linears, linear_bytes
from tests.conftest import left_pad, random_prompts, tiny_dream, tiny_llada


@pytest.mark.parametrize("bias", [True, False])
def test_kn_linear_computes_the_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(7, 5, bias=bias).double()
    kn = KNLinear(linear)
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    assert kn.weight_kn.shape == (7, 5) and kn.weight_kn.is_contiguous()
    assert kn.bias is linear.bias  # shared, not copied
    torch.testing.assert_close(kn(x), linear(x), rtol=0, atol=1e-12)


def test_kn_linears_swaps_every_linear_and_puts_the_originals_back():
    model = tiny_dream()
    before = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    copies: dict[int, KNLinear] = {}
    with kn_linears(model, copies):
        inside = dict(model.named_modules())
        assert all(isinstance(inside[name], KNLinear) for name in before)
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert len(copies) == len(before)
    assert {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)} == before
    made = dict(copies)
    with pytest.raises(RuntimeError, match="inside"), kn_linears(model, copies):
        raise RuntimeError("inside")
    assert {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)} == before
    assert copies == made  # reused, not rebuilt
    assert linear_bytes(model) == sum(m.weight.numel() * 8 for m in before.values())


def _gen(model, ids, mask, **kwargs):
    return model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=8, steps=8, block_length=4,
                                    alg="maskgit_plus", use_cache=True, cache_type="dual",
                                    return_dict_in_generate=True, **kwargs).sequences


@pytest.mark.slow
@pytest.mark.parametrize("make", [tiny_dream, tiny_llada])
def test_aot_step_follows_in_place_weight_updates(monkeypatch, make):
    """The copies hold the weights' values: an in-place update (what load_state_dict does) must rebuild them."""
    monkeypatch.setattr(aot, "BACKEND", "export")
    model = make(seed=21)
    ids, mask = left_pad([random_prompts(1, 6, seed=22)[0], random_prompts(1, 3, seed=23)[0]])
    assert torch.equal(_gen(model, ids, mask), _gen(model, ids, mask, compile=True))
    assert aot.aot_step(model)._kn_copies  # the package was built on the copies
    before = _gen(model, ids, mask)
    with torch.no_grad():
        state = {name: -value for name, value in model.state_dict().items() if name.endswith("proj.weight")}
        model.load_state_dict(state, strict=False)  # copies in place: the pointers do not change
    eager = _gen(model, ids, mask)
    assert not torch.equal(eager, before)  # the update changes the output, so a stale copy would show
    assert torch.equal(eager, _gen(model, ids, mask, compile=True))


@pytest.mark.slow
def test_large_models_keep_their_linear_layers(monkeypatch):
    monkeypatch.setattr(aot, "BACKEND", "export")
    monkeypatch.setattr(aot, "MAX_COPY_BYTES", 0)
    model = tiny_dream(seed=24)
    ids, mask = left_pad([random_prompts(1, 5, seed=25)[0]])
    assert torch.equal(_gen(model, ids, mask), _gen(model, ids, mask, compile=True))
    assert not aot.aot_step(model)._kn_copies
