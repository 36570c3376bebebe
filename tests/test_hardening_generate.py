"""Hostile or careless arguments to diffusion_generate: each is refused before any compute with a message that
names the argument (each of these reached torch, or silently produced garbage, before)."""

from __future__ import annotations

import warnings

import pytest
import torch

from dkvcache import resolve as resolve_mod
from tests.conftest import PAD, tiny_dream, tiny_llada

IDS = torch.tensor([[1, 2, 3]])


@pytest.fixture(scope="module")
def models():
    return {"dream": tiny_dream(), "llada": tiny_llada()}


def _no_forward(model, monkeypatch):
    """Fail the test if the model is run at all: the error must come before compute."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran before the bad argument was refused")

    monkeypatch.setattr(model, "partial_forward", forbidden)


@pytest.mark.parametrize("family", ["dream", "llada"])
@pytest.mark.parametrize("ids,match", [
    (torch.tensor([[1, 2, 64]]), "token id 64"),  # = vocab size
    (torch.tensor([[1, 2, 10_000]]), "token id 10000"),
    (torch.tensor([[-1, 2, 3]]), "token id -1"),
])
def test_token_ids_outside_the_vocabulary(models, monkeypatch, family, ids, match):
    _no_forward(models[family], monkeypatch)
    with pytest.raises(ValueError, match=match):
        models[family].diffusion_generate(ids, max_new_tokens=4, steps=4)


def test_bad_id_in_a_padded_position(models, monkeypatch):
    """Pads are embedded too, so an out-of-range id there is refused as well (it used to raise IndexError)."""
    _no_forward(models["dream"], monkeypatch)
    ids = torch.tensor([[999, 1, 2], [4, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="padded positions included"):
        models["dream"].diffusion_generate(ids, attention_mask=mask, max_new_tokens=4, steps=4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask_token_id=500), "mask_token_id=500"),
    (dict(eos_token_id=-2), "eos_token_id=-2"),
    (dict(eos_token_id=64), "eos_token_id=64"),
    (dict(pad_token_id=70), "pad_token_id=70"),
])
def test_special_ids_outside_the_vocabulary(models, monkeypatch, kwargs, match):
    _no_forward(models["dream"], monkeypatch)
    with pytest.raises(ValueError, match=match):
        models["dream"].diffusion_generate(IDS, max_new_tokens=4, steps=4, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(temperature=3.4e38), "temperature"),  # overflowed float32 logits: all MASK before
    (dict(temperature=float("nan")), "temperature"),
    (dict(alg="maskgit_plus", threshold=float("nan")), "threshold"),
])
def test_non_finite_or_overflowing_numbers(models, monkeypatch, kwargs, match):
    _no_forward(models["dream"], monkeypatch)
    with pytest.raises(ValueError, match=match):
        models["dream"].diffusion_generate(IDS, max_new_tokens=4, steps=4, **kwargs)


def test_non_finite_cfg_scale(models, monkeypatch):
    _no_forward(models["llada"], monkeypatch)
    with pytest.raises(ValueError, match="cfg_scale=inf"):  # returned empty text before
        models["llada"].diffusion_generate(IDS, gen_length=4, steps=4, cfg_scale=float("inf"))


@pytest.mark.parametrize("seed,error", [(2**70, ValueError), (-1, ValueError), (["a"], TypeError), (1.5, TypeError),
                                        (True, TypeError), ([1, 2**64], ValueError)])
def test_seed_must_say_what_it_takes(models, monkeypatch, seed, error):
    _no_forward(models["dream"], monkeypatch)
    with pytest.raises(error, match=r"seed.*\[0, 2\*\*63\)"):
        models["dream"].diffusion_generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), max_new_tokens=4, steps=4,
                                           seed=seed)


def test_gamma_may_be_infinite(models):
    """The one documented infinite knob: EB-sampler's gamma=inf decodes the whole block per step."""
    out = models["dream"].diffusion_generate(IDS, max_new_tokens=4, steps=4, decoding="eb_sampler",
                                             gamma=float("inf"), return_dict_in_generate=True)
    assert out.stats["forwards"] == 1 and (out.sequences != 63).all()


def test_length_beyond_the_trained_positions_warns_once(monkeypatch):
    model = tiny_dream()
    model.config.max_position_embeddings = 5
    monkeypatch.setattr(resolve_mod, "_WARNED_LENGTH", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.diffusion_generate(IDS, max_new_tokens=4, steps=4)
        model.diffusion_generate(IDS, max_new_tokens=4, steps=4)
    messages = [str(w.message) for w in caught if "positions this model was trained for" in str(w.message)]
    assert len(messages) == 1 and "= 7 exceeds the 5" in messages[0]


def test_progress_bar(models, capsys):
    """progress=True: a tqdm bar over the steps (stderr); off by default, so library calls print nothing."""
    models["dream"].diffusion_generate(IDS, max_new_tokens=4, steps=4)
    assert capsys.readouterr().err == ""
    models["dream"].diffusion_generate(IDS, max_new_tokens=4, steps=4, progress=True)
    assert "denoising" in capsys.readouterr().err
    with pytest.raises(TypeError, match="progress"):
        models["dream"].diffusion_generate(IDS, max_new_tokens=4, steps=4, progress="yes")


def test_pad_id_itself_is_fine(models):
    ids = torch.tensor([[PAD, 1, 2], [4, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = models["dream"].diffusion_generate(ids, attention_mask=mask, max_new_tokens=4, steps=4)
    assert out.shape == (2, 7)
