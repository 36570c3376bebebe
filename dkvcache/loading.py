"""One way to open a Dream / LLaDA checkpoint, shared by the benchmark, the arith task, the eval harness and the
example scripts.

:func:`load_model` imports the top-level ``models`` package first (which registers Dream and LLaDA with the
transformers Auto classes), reads ``config.json`` and instantiates our class for its ``model_type``, so a local
checkpoint directory -- the shipped ``assets/tiny-dream`` and ``assets/tiny-llada`` included, whose config.json
carries the original ``auto_map`` -- opens offline and never stops at a ``trust_remote_code`` prompt: every call
into transformers passes ``trust_remote_code=False``, and a ``model_type`` other than Dream's or LLaDA's is a
TypeError before transformers looks at ``auto_map``. The config is checked (:mod:`models.checkpoint`) before any
weight is allocated, and a truncated safetensors file is an OSError that names it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                                  "float64": torch.float64}
# Files a tokenizer can be built from: transformers 5 builds an *empty* tokenizer from a directory without them.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def resolve_model_path(path: str | os.PathLike[str]) -> str:
    """A local directory (as given, or relative to the repository for the shipped tiny checkpoints) or a Hub id."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    in_repo = os.path.join(REPO_ROOT, path)
    if not os.path.isabs(path) and os.path.isdir(in_repo):
        return in_repo
    return path


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` → ``torch.bfloat16`` (one of :data:`DTYPES`); ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: {sorted(DTYPES)}")
    return DTYPES[dtype]


def model_classes() -> dict[str, type]:
    """``config.model_type`` → our model class (importing ``models`` registers them with the Auto classes)."""
    import models

    return {models.DreamConfig.model_type: models.DreamModel, models.LLaDAConfig.model_type: models.LLaDAModelLM}


def load_config(path_or_id: str | os.PathLike[str]) -> tuple[Any, type]:
    """``(config, model class)`` of a checkpoint from its config.json alone (no weights, no remote code).

    TypeError when ``model_type`` is not Dream's or LLaDA's (before transformers looks at ``auto_map``, so no
    ``trust_remote_code`` prompt), ValueError naming config.json when a field is missing or of the other family
    (see :mod:`models.checkpoint`), OSError when config.json cannot be read.
    """
    from transformers import PreTrainedConfig

    classes = model_classes()
    local = resolve_model_path(path_or_id)
    where = os.path.join(local, "config.json") if os.path.isdir(local) else f"{os.fspath(path_or_id)} (config.json)"
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(local)
    except (ValueError, UnicodeDecodeError) as err:  # transformers: "... is not a valid JSON file"
        raise OSError(f"{where}: not a readable config.json ({err})") from err
    model_type = config_dict.get("model_type")
    cls = classes.get(model_type)
    if cls is None:
        raise TypeError(f"{where}: model_type={model_type!r} is not a Dream/LLaDA diffusion model; allowed: "
                        f"{sorted(classes)} (no remote code is run)")
    try:
        config = cls.config_class.from_dict(config_dict)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return config, cls


def load_model(path_or_id: str | os.PathLike[str], dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", family: str | None = None) -> Any:
    """A Dream or LLaDA model from a checkpoint directory or Hub id, in ``dtype`` on ``device``, in eval mode.

    The class comes from config.json's ``model_type`` (no remote code, works offline on a local directory).
    ``family`` (``"dream"`` / ``"llada"``), when given, must match the checkpoint's. Raises, before reading any
    weight: TypeError for a checkpoint that is not a Dream/LLaDA model, ValueError for a config.json that lacks a
    field (``mask_token_id`` …) or holds the other family's fields, OSError when it cannot be read (a truncated
    safetensors file included, named).
    """
    torch_dtype = resolve_dtype(dtype)
    local = resolve_model_path(path_or_id)
    config, cls = load_config(local)
    if family is not None and cls.diffusion_family != family:
        raise TypeError(f"{os.fspath(path_or_id)!r} is a {cls.diffusion_family} checkpoint; expected {family}")
    model = cls.from_pretrained(local, config=config, dtype=torch_dtype, trust_remote_code=False)
    return model.to(device).eval()


def load_tokenizer(path_or_id: str | os.PathLike[str], required: bool = True) -> Any | None:
    """The checkpoint's tokenizer (through the Auto classes ``models`` registers).

    A local directory without tokenizer files (:data:`TOKENIZER_FILES`) gives None when not ``required`` and
    OSError when it is (transformers would otherwise build an empty tokenizer).
    """
    from transformers import AutoTokenizer

    model_classes()  # registers the tokenizer classes
    local = resolve_model_path(path_or_id)
    if os.path.isdir(local) and not any(os.path.isfile(os.path.join(local, n)) for n in TOKENIZER_FILES):
        if required:
            raise OSError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {local!r}")
        return None
    return AutoTokenizer.from_pretrained(local, trust_remote_code=False)


def load_model_and_tokenizer(path_or_id: str | os.PathLike[str], dtype: str | torch.dtype = "float32",
                             device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(load_model(...), load_tokenizer(...))`` of one checkpoint."""
    return load_model(path_or_id, dtype, device), load_tokenizer(path_or_id)
