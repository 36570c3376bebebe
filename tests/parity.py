"""Helpers to replay the reference-parity fixtures of ../shared/parity (see its README) through our API."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import PARITY_DIR

# Not compared token for token: `quirk` settings are reference bugs we fix (Dream's broken 'right' shift), and
# `rng` settings depend on consuming torch's global generator exactly like the reference, while we draw noise
# per row by design — except greedy, whose only randomness is the per-block order the fixtures record.
EXCLUDED_TAGS = {"rng", "quirk"}
PARITY_TAGS = ("vanilla", "decoded", "prefill", "pd", "greedy")


def load_reference(kind: str) -> dict:
    return json.loads((PARITY_DIR / f"ref-{kind}.json").read_text())


def _comparable(setting: dict) -> bool:
    if setting["status"] != "ok" or "quirk" in setting["tags"]:
        return False
    return "rng" not in setting["tags"] or bool(setting.get("greedy_block_orders"))


def cases() -> list[tuple[str, dict]]:
    """(model kind, setting) for every comparable setting of the fixtures (empty without ../shared)."""
    out = []
    for kind in ("dream", "llada"):
        if (PARITY_DIR / f"ref-{kind}.json").exists():
            out += [(kind, s) for s in load_reference(kind)["settings"]
                    if _comparable(s) and set(PARITY_TAGS) & set(s["tags"])]
    return out


def run_setting(model, reference: dict, setting: dict):
    """Our DiffusionOutput for a fixture setting (greedy gets the recorded per-block orders injected)."""
    batch = reference["batches"][setting["batch"]]
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"]) if setting["api_attention_mask"] else None
    kwargs = dict(setting["api_kwargs"], return_dict_in_generate=True)
    if setting.get("greedy_block_orders"):
        kwargs["greedy_block_orders"] = setting["greedy_block_orders"]
    torch.manual_seed(setting["seed"])
    return model.diffusion_generate(ids, attention_mask=mask, **kwargs)


def checkpoint(parity_checkpoints: Path, kind: str):
    from models import DreamModel, LLaDAModelLM

    cls = DreamModel if kind == "dream" else LLaDAModelLM
    return cls.from_pretrained(parity_checkpoints / f"tiny-{kind}", dtype=torch.float64).eval()
