"""One way to open a Dream / LLaDA checkpoint, shared by the benchmark, the arith task, the eval harness and the
example scripts.

:func:`load_model` imports the top-level ``models`` package first (which registers Dream and LLaDA with the
transformers Auto classes), reads ``config.json`` and instantiates our class for its ``model_type``, so a local
checkpoint directory -- the shipped ``assets/tiny-dream`` and ``assets/tiny-llada`` included, whose config.json
carries the original ``auto_map`` -- opens offline and never stops at a ``trust_remote_code`` prompt.
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


def load_model(path_or_id: str | os.PathLike[str], dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", family: str | None = None) -> Any:
    """A Dream or LLaDA model from a checkpoint directory or Hub id, in ``dtype`` on ``device``, in eval mode.

    The class comes from config.json's ``model_type`` (no remote code, works offline on a local directory).
    ``family`` (``"dream"`` / ``"llada"``), when given, must match the checkpoint's. Raises TypeError for a
    checkpoint that is not a Dream/LLaDA model (before reading its weights) and OSError when it cannot be read.
    """
    from transformers import AutoConfig

    classes = model_classes()  # imports ``models`` first: AutoConfig then knows Dream and LLaDA
    torch_dtype = resolve_dtype(dtype)
    local = resolve_model_path(path_or_id)
    config = AutoConfig.from_pretrained(local)
    cls = classes.get(config.model_type)
    if cls is None:
        raise TypeError(f"{os.fspath(path_or_id)!r} is a {config.model_type!r} checkpoint, not a Dream/LLaDA "
                        f"diffusion model (model_type one of {sorted(classes)})")
    if family is not None and cls.diffusion_family != family:
        raise TypeError(f"{os.fspath(path_or_id)!r} is a {cls.diffusion_family} checkpoint; expected {family}")
    model = cls.from_pretrained(local, config=config, dtype=torch_dtype)
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
    return AutoTokenizer.from_pretrained(local)


def load_model_and_tokenizer(path_or_id: str | os.PathLike[str], dtype: str | torch.dtype = "float32",
                             device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(load_model(...), load_tokenizer(...))`` of one checkpoint."""
    return load_model(path_or_id, dtype, device), load_tokenizer(path_or_id)
