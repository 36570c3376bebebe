"""The partial forward: any per-row subset of positions, fed against fresh buffers, equals the full forward."""

from __future__ import annotations

import pytest
import torch

from dkvcache.indexing import ragged_indices, slots_of
from dkvcache.partial_forward import layer_forward, positions_from_mask, rotary_cos_sin
from tests.conftest import left_pad, random_prompts, tiny_dream, tiny_llada

BUILDERS = [tiny_dream, tiny_llada]


def _padded_batch():
    ids, mask = left_pad([random_prompts(1, 14, seed=1)[0], random_prompts(1, 9, seed=2)[0],
                          random_prompts(1, 12, seed=3)[0]])
    key_valid = mask.bool()
    return ids, positions_from_mask(key_valid), key_valid


@pytest.mark.parametrize("builder", BUILDERS)
def test_ragged_subset_equals_full_forward(builder):
    model = builder(layers=3)
    ids, positions, key_valid = _padded_batch()
    batch, length = ids.shape
    with torch.no_grad():
        full = model.partial_forward(ids, positions, key_valid)
        kv = model.allocate_kv(batch, length)
        assert torch.equal(model.partial_forward(ids, positions, key_valid, kv=kv), full)
        gen = torch.Generator().manual_seed(0)
        chosen = (torch.rand(batch, length, generator=gen) < 0.4) & key_valid
        chosen[1] = False  # a row with nothing fed
        chosen[1, -1] = True
        fed_idx, valid = ragged_indices(chosen, pad_value=length)
        assert valid.sum(1).tolist() == chosen.sum(1).tolist() and not valid.all()
        part = model.partial_forward(ids, positions, key_valid, fed_idx=fed_idx, kv=kv)
    expected = full.gather(1, fed_idx.clamp(max=length - 1)[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.allclose(part[valid], expected[valid], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("builder", BUILDERS)
def test_stale_buffers_change_the_result(builder):
    """Buffers filled from other tokens are really read (the approximation every cache makes)."""
    model = builder(layers=2)
    ids, positions, key_valid = _padded_batch()
    batch, length = ids.shape
    other = ids.clone()
    other[:, -3:] = (other[:, -3:] + 7) % 60
    with torch.no_grad():
        kv = model.allocate_kv(batch, length)
        model.partial_forward(other, positions, key_valid, kv=kv)  # stale: built from `other`
        fed_idx = torch.full((batch, 1), length - 1)
        stale = model.partial_forward(ids, positions, key_valid, fed_idx=fed_idx, kv=kv)
        fresh = model.partial_forward(ids, positions, key_valid)[:, -1:]
    assert (stale - fresh).abs().max() > 1e-6


def test_attention_probabilities_on_request():
    model = tiny_dream(layers=2)
    ids, positions, key_valid = _padded_batch()
    batch, length = ids.shape
    probs: list = []
    with torch.no_grad():
        kv = model.allocate_kv(batch, length)
        reference = model.partial_forward(ids, positions, key_valid, kv=kv)
        fed_idx = torch.arange(length - 4, length).expand(batch, -1)
        with_probs = model.partial_forward(ids, positions, key_valid, fed_idx=fed_idx, kv=kv, want_attn_probs=True,
                                           attn_probs_out=probs)
    assert torch.allclose(with_probs, reference[:, -4:], atol=1e-12)
    assert len(probs) == 2 and probs[0].shape == (batch, 4, 4, length + 1)
    assert torch.allclose(probs[0].sum(-1), torch.ones(batch, 4, 4, dtype=torch.float64))
    assert (probs[0][..., :length][~key_valid[:, None, None, :].expand(-1, 4, 4, -1)] == 0).all()
    assert (probs[0][..., length] == 0).all()  # the scratch slot is never attended


def test_layer_hook_replaces_the_block():
    model = tiny_llada(layers=2)
    ids, positions, key_valid = _padded_batch()
    calls = []

    def hook(index, layer, hidden, ctx):
        calls.append(index)
        return layer_forward(layer, hidden, ctx, index)

    with torch.no_grad():
        plain = model.partial_forward(ids, positions, key_valid)
        hooked = model.partial_forward(ids, positions, key_valid, layer_hook=hook)
    assert calls == [0, 1] and torch.equal(plain, hooked)


def test_slots_of_inverts_a_fed_set():
    fed = torch.tensor([[1, 4, 6], [0, 6, 6]])  # row 1: one padding entry (6 = L)
    inverse = slots_of(fed, 6)
    assert inverse.tolist() == [[-1, 0, -1, -1, 1, -1, -1], [0, -1, -1, -1, -1, -1, -1]]


def test_partial_forward_needs_buffers_for_a_subset():
    model = tiny_dream()
    ids, positions, key_valid = _padded_batch()
    with pytest.raises(ValueError, match="kv"):
        model.partial_forward(ids, positions, key_valid, fed_idx=torch.zeros(3, 1, dtype=torch.long))


@pytest.mark.parametrize("builder", BUILDERS)
def test_rotary_tables_give_the_same_forward(builder):
    """cos/sin tables of every position (what the AOT step passes, computed once per call) give the forward that
    computes them from the fed positions: bit for bit, whole sequence and a ragged subset."""
    model = builder(layers=2)
    ids, positions, key_valid = _padded_batch()
    batch, length = ids.shape
    tables = rotary_cos_sin(positions, model._head_dim, model._rope_theta)
    chosen = (torch.rand(batch, length, generator=torch.Generator().manual_seed(4)) < 0.5) & key_valid
    fed_idx, _ = ragged_indices(chosen, pad_value=length)
    with torch.no_grad():
        assert torch.equal(model.partial_forward(ids, positions, key_valid, rotary=tables),
                           model.partial_forward(ids, positions, key_valid))
        assert torch.equal(
            model.partial_forward(ids, positions, key_valid, fed_idx=fed_idx, kv=model.allocate_kv(batch, length),
                                  rotary=tables),
            model.partial_forward(ids, positions, key_valid, fed_idx=fed_idx, kv=model.allocate_kv(batch, length)))


@pytest.mark.parametrize("builder", BUILDERS)
def test_unmasked_attention_when_no_key_is_padding(builder):
    """``all_keys_valid``: an unpadded batch attends without a mask (the scratch slot left out) and gets the
    masked forward's hidden states, whole sequence and a subset through buffers."""
    model = builder(layers=2)
    ids = torch.cat([random_prompts(1, 11, seed=5), random_prompts(1, 11, seed=6)])
    batch, length = ids.shape
    key_valid = torch.ones_like(ids, dtype=torch.bool)
    positions = positions_from_mask(key_valid)
    fed_idx, _ = ragged_indices(torch.rand(batch, length, generator=torch.Generator().manual_seed(7)) < 0.5,
                                pad_value=length)
    with torch.no_grad():
        torch.testing.assert_close(model.partial_forward(ids, positions, key_valid, all_keys_valid=True),
                                   model.partial_forward(ids, positions, key_valid), rtol=0, atol=1e-12)
        for fed in (None, fed_idx):
            unmasked = model.partial_forward(ids, positions, key_valid, fed_idx=fed,
                                             kv=model.allocate_kv(batch, length), all_keys_valid=True)
            masked = model.partial_forward(ids, positions, key_valid, fed_idx=fed, kv=model.allocate_kv(batch, length))
            torch.testing.assert_close(unmasked, masked, rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="all_keys_valid"):
            model.partial_forward(ids, positions, key_valid, all_keys_valid=True, want_attn_probs=True)
