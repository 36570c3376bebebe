"""Checkpoints that must fail clearly and early: the other family's config, no mask_token_id, a truncated
safetensors file, an unknown model_type (never a trust_remote_code prompt).

Every test builds its checkpoint from the shipped tiny ones in tmp_path; a guard turns any attempt to build a
large model into a test failure instead of a 7B allocation.
"""

from __future__ import annotations

import builtins
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from dkvcache import loading
from models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM, modeling_dream, modeling_llada

REPO = Path(__file__).resolve().parents[1]
TINY = {"dream": REPO / "assets" / "tiny-dream", "llada": REPO / "assets" / "tiny-llada"}


@pytest.fixture(autouse=True)
def no_big_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a model wider than the tiny ones is what the checks must prevent: fail instead of allocating."""
    for module, name in ((modeling_dream, "DreamBaseModel"), (modeling_llada, "LLaDAModel")):
        cls = getattr(module, name)
        original = cls.__init__

        def guarded(self, config, _original=original):
            if config.hidden_size > 1024 or config.num_hidden_layers > 8:
                raise AssertionError(f"a {config.hidden_size}-wide, {config.num_hidden_layers}-layer model was "
                                     "being allocated")
            _original(self, config)

        monkeypatch.setattr(cls, "__init__", guarded)


def _copy(family: str, tmp_path: Path, name: str = "ckpt", **edits) -> Path:
    """A copy of the shipped tiny checkpoint with config.json edited (a value of None removes the field)."""
    out = tmp_path / name
    shutil.copytree(TINY[family], out)
    config = json.loads((out / "config.json").read_text())
    for key, value in edits.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


def _raises_fast(exc: type[BaseException], match: str, load) -> BaseException:
    start = time.perf_counter()
    with pytest.raises(exc, match=match) as info:
        load()
    assert time.perf_counter() - start < 5.0
    return info.value


# -- 1. a config of the other family --------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["AutoModel", "AutoModelForCausalLM", "load_model", "DreamModel"])
def test_llada_checkpoint_marked_dream_fails_before_allocating(tmp_path: Path, how: str) -> None:
    """A LLaDA config.json with model_type "Dream" has no hidden_size …: it used to build Dream-7B (OOM)."""
    path = _copy("llada", tmp_path, model_type="Dream")
    load = {"AutoModel": lambda: AutoModel.from_pretrained(path),
            "AutoModelForCausalLM": lambda: AutoModelForCausalLM.from_pretrained(path),
            "load_model": lambda: loading.load_model(path),
            "DreamModel": lambda: DreamModel.from_pretrained(path)}[how]
    err = _raises_fast(ValueError, r"lacks the field\(s\) \['hidden_size'", load)
    assert "d_model" in str(err) and "LLaDAModelLM" in str(err)
    if how == "load_model":
        assert str(path / "config.json") in str(err)


def test_dream_checkpoint_marked_llada_fails_before_allocating(tmp_path: Path) -> None:
    path = _copy("dream", tmp_path, model_type="llada")
    err = _raises_fast(ValueError, r"lacks the field\(s\) \['d_model'", lambda: AutoModel.from_pretrained(path))
    assert "hidden_size" in str(err) and "DreamModel" in str(err)


@pytest.mark.parametrize("cls, other", [(DreamModel, "llada"), (LLaDAModelLM, "dream")])
def test_model_class_on_the_other_familys_directory(cls: type, other: str) -> None:
    """DreamModel.from_pretrained(a LLaDA dir) used to build Dream-7B from the defaults (LLaDA's: AttributeError)."""
    err = _raises_fast(ValueError, "config.json has model_type=", lambda: cls.from_pretrained(TINY[other]))
    assert ("LLaDAModelLM" if other == "llada" else "DreamModel") in str(err)


def test_model_class_rejects_the_other_config_class() -> None:
    config = LLaDAConfig.from_pretrained(TINY["llada"])
    with pytest.raises(TypeError, match="DreamModel needs a DreamConfig, got LLaDAConfig"):
        DreamModel.from_pretrained(TINY["dream"], config=config)


# -- 2. mask_token_id ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["dream", "llada"])
def test_config_without_mask_token_id_fails_at_load(tmp_path: Path, family: str) -> None:
    """It used to load with the 7B checkpoints' id (151666 / 126336), outside the tiny vocabulary."""
    path = _copy(family, tmp_path, mask_token_id=None)
    cls = DreamModel if family == "dream" else LLaDAModelLM
    for load in (lambda: loading.load_model(path), lambda: AutoModel.from_pretrained(path),
                 lambda: cls.from_pretrained(path)):
        _raises_fast(ValueError, r"lacks the field\(s\) \['mask_token_id'\].*MASK token id", load)
    assert cls.from_pretrained(path, mask_token_id=5, dtype=torch.float32).config.mask_token_id == 5  # a keyword


@pytest.mark.parametrize("value, match", [(None, "lacks"), (-1, "an int >= 0"), (192, "outside the vocabulary"),
                                          ("5", "an int >= 0")])
def test_mask_token_id_must_be_an_id_of_the_vocabulary(tmp_path: Path, value, match: str) -> None:
    config = json.loads((TINY["dream"] / "config.json").read_text())
    config["mask_token_id"] = value
    if value is None:
        del config["mask_token_id"]
    path = tmp_path / "config-only"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        DreamConfig.from_pretrained(path)


def test_good_checkpoints_still_load() -> None:
    for family, cls in (("dream", DreamModel), ("llada", LLaDAModelLM)):
        model = loading.load_model(TINY[family])
        assert type(model) is cls and model.config.mask_token_id in (3, 5)
        assert type(AutoModel.from_pretrained(TINY[family])) is cls


# -- 3. truncated safetensors -------------------------------------------------------------------------------
def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    path = _copy("dream", tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) // 2, 5, len(data) - 1):
        weights.write_bytes(data[:cut])
        for load in (lambda: loading.load_model(path), lambda: DreamModel.from_pretrained(path),
                     lambda: AutoModel.from_pretrained(path)):
            _raises_fast(OSError, f"{weights}: truncated", load)


def test_sharded_checkpoint_names_the_truncated_or_missing_shard(tmp_path: Path) -> None:
    loading.load_model(TINY["llada"]).save_pretrained(tmp_path / "sharded", max_shard_size="500KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].write_bytes(shards[1].read_bytes()[:1000])
    _raises_fast(OSError, f"{shards[1]}: truncated", lambda: loading.load_model(tmp_path / "sharded"))
    shards[1].unlink()
    _raises_fast(OSError, f"lists shard.*{shards[1].name}", lambda: LLaDAModelLM.from_pretrained(tmp_path / "sharded"))


# -- 4. unknown model_type: no trust_remote_code prompt -----------------------------------------------------
@pytest.fixture
def no_prompt(monkeypatch: pytest.MonkeyPatch) -> list:
    """transformers asks ``[y/N]`` through input(): record any call (and answer no)."""
    prompts: list = []
    monkeypatch.setattr(builtins, "input", lambda *args: prompts.append(args) or "n")
    return prompts


def test_unknown_model_type_is_a_clear_error_without_a_prompt(tmp_path: Path, no_prompt: list) -> None:
    path = _copy("dream", tmp_path, model_type="mystery")  # config.json keeps its auto_map (remote code)
    err = _raises_fast(TypeError, "model_type='mystery' is not a Dream/LLaDA", lambda: loading.load_model(path))
    assert str(path / "config.json") in str(err) and "'Dream', 'llada'" in str(err)
    _raises_fast(ValueError, "model_type='mystery'; allowed: 'Dream'", lambda: DreamModel.from_pretrained(path))
    assert no_prompt == []


def test_tokenizer_with_only_remote_code_does_not_prompt(tmp_path: Path, no_prompt: list) -> None:
    path = _copy("dream", tmp_path, model_type="mystery")
    tok = json.loads((path / "tokenizer_config.json").read_text())
    tok.update(tokenizer_class="MysteryTokenizer",
               auto_map={"AutoTokenizer": ["tokenization_mystery.MysteryTokenizer", None]})
    (path / "tokenizer_config.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="trust_remote_code"):
        loading.load_tokenizer(path)
    assert no_prompt == []
