"""Helpers to replay the reference-parity fixtures of ../shared/parity (see its README) through our API."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import PARITY_DIR

# Tags we do not compare token for token: `rng` results depend on consuming torch's global generator exactly
# like the reference (we draw noise per row, by design); `quirk` ones are reference bugs we fix.
EXCLUDED_TAGS = {"rng", "quirk"}


def load_reference(kind: str) -> dict:
    return json.loads((PARITY_DIR / f"ref-{kind}.json").read_text())


def settings(kind: str, tag: str) -> list[dict]:
    """Settings of ``kind`` carrying ``tag``, where the reference ran and the result is comparable."""
    path = PARITY_DIR / f"ref-{kind}.json"
    if not path.exists():
        return []
    return [s for s in load_reference(kind)["settings"]
            if tag in s["tags"] and s["status"] == "ok" and not EXCLUDED_TAGS & set(s["tags"])]


def run_setting(model, reference: dict, setting: dict) -> torch.Tensor:
    batch = reference["batches"][setting["batch"]]
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"]) if setting["api_attention_mask"] else None
    torch.manual_seed(setting["seed"])
    out = model.diffusion_generate(ids, attention_mask=mask, **setting["api_kwargs"])
    return out.sequences if hasattr(out, "sequences") else out


def checkpoint(parity_checkpoints: Path, kind: str):
    from models import DreamModel, LLaDAModelLM

    cls = DreamModel if kind == "dream" else LLaDAModelLM
    return cls.from_pretrained(parity_checkpoints / f"tiny-{kind}", dtype=torch.float64).eval()
