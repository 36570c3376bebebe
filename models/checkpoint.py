"""Checks of a checkpoint made before anything is allocated: its config.json fields and its safetensors files.

A config.json of the wrong family (a LLaDA checkpoint marked ``"model_type": "Dream"``, or ``DreamModel``
pointed at a LLaDA directory) would otherwise fill the missing fields with the 7B defaults and allocate a 7B model
before failing; a config.json without ``mask_token_id`` would silently use the 7B checkpoints' id. A truncated
safetensors file would fail inside the Rust reader with a message that does not name the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

MASK_HINT = "the diffusion MASK token id: 151666 for Dream-v0, 126336 for LLaDA-8B"


def check_config_dict(config_dict: Mapping[str, Any], kwargs: Mapping[str, Any], class_name: str,
                      model_type: str, required: Sequence[str], other: tuple[str, str, Sequence[str]],
                      vocab_field: str) -> None:
    """ValueError unless ``config_dict`` (a checkpoint's config.json, plus the ``from_pretrained`` keyword
    overrides ``kwargs``) is a config of ``model_type`` with every ``required`` field and a usable mask_token_id.

    ``other`` = (model_type, class name, distinctive fields) of the other family, named in the message when the
    config looks like one of its checkpoints.
    """
    other_type, other_class, other_fields = other
    given = {**config_dict, **{k: v for k, v in kwargs.items() if v is not None}}
    found_type = config_dict.get("model_type")
    hint = (f"; it is a {other_type!r} checkpoint: load it with {other_class} (or dkvcache.loading.load_model / "
            "AutoModel, which pick the class from model_type)")
    if found_type is not None and found_type != model_type:
        raise ValueError(f"{class_name}: config.json has model_type={found_type!r}; allowed: {model_type!r}"
                         + (hint if found_type == other_type else ""))
    missing = [name for name in required if name not in given]
    if missing:
        foreign = [name for name in other_fields if name in given]
        looks_other = (f"; it has {foreign}, fields of a {other_type!r} config" + hint) if foreign else ""
        raise ValueError(f"{class_name}: config.json (model_type={found_type!r}) lacks the field(s) {missing}, "
                         f"which a {model_type!r} config.json must set (the 7B defaults would build the wrong "
                         f"model){looks_other}" + (f"; mask_token_id is {MASK_HINT}" if "mask_token_id" in missing
                                                   else ""))
    mask, vocab = given.get("mask_token_id"), given.get(vocab_field)
    if isinstance(mask, bool) or not isinstance(mask, int) or mask < 0:
        raise ValueError(f"{class_name}: config.json has mask_token_id={mask!r}; allowed: an int >= 0 ({MASK_HINT})")
    if isinstance(vocab, int) and not isinstance(vocab, bool) and mask >= vocab:
        raise ValueError(f"{class_name}: config.json has mask_token_id={mask}, outside the vocabulary "
                         f"({vocab_field}={vocab}); allowed: 0 <= mask_token_id < {vocab_field}")


def safetensors_files(directory: str) -> list[str]:
    """The safetensors files ``from_pretrained`` reads from a local directory (sharded or not), as paths.

    OSError naming the index when it is unreadable or lists a shard that is not there.
    """
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise OSError(f"{index}: not a readable safetensors index ({type(err).__name__}: {err}); expected "
                          'JSON with a "weight_map" of tensor name -> shard file') from err
        paths = [os.path.join(directory, n) for n in names]
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise OSError(f"{index} lists shard(s) that are not in {directory}: {absent}; download them again")
        return paths
    single = os.path.join(directory, "model.safetensors")
    return [single] if os.path.isfile(single) else []


def check_safetensors_file(path: str) -> None:
    """OSError naming ``path`` unless its header parses and its size is exactly header + tensor data (a file cut
    short by an interrupted download or a full disk fails here, not inside the reader)."""
    size = os.path.getsize(path)
    again = "; download or save it again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise OSError(f"{path}: truncated safetensors file ({size} bytes, shorter than its 8-byte header "
                          f"length){again}")
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            raise OSError(f"{path}: truncated or corrupt safetensors file (its header says {length} header bytes, "
                          f"the file has {size} bytes in all){again}")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise OSError(f"{path}: not a safetensors file (unreadable header: {type(err).__name__}: {err})") from err
    if 8 + length + end != size:
        state = "truncated" if 8 + length + end > size else "corrupt (trailing bytes)"
        raise OSError(f"{path}: {state} safetensors file: header and tensors take {8 + length + end} bytes, the "
                      f"file has {size}{again}")


def check_checkpoint_dir(path: Any, subfolder: str = "", variant: str | None = None) -> None:
    """Check the safetensors files of a local checkpoint directory (Hub ids and variants are left to
    transformers)."""
    try:
        directory = os.path.join(os.fspath(path), subfolder or "")
    except TypeError:
        return
    if variant or not os.path.isdir(directory):
        return
    for file in safetensors_files(directory):
        check_safetensors_file(file)


class CheckedLoadingMixin:
    """``from_pretrained`` that checks the safetensors files of a local directory first and names the file when
    the reader fails anyway."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        from safetensors import SafetensorError

        check_checkpoint_dir(pretrained_model_name_or_path, kwargs.get("subfolder", ""), kwargs.get("variant"))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as err:
            raise OSError(f"{pretrained_model_name_or_path}: a safetensors file of this checkpoint could not be "
                          f"read ({err}); download it again") from err
