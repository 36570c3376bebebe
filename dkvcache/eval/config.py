"""Compose the eval config from the YAML groups in ``dkvcache/configs`` (Hydra's compose API) and resolve it.

Composition: ``configs/eval.yaml`` + one option per group (``model=``, ``dataset=``, ``cache=``, ``generation=``)
+ ``key=value`` overrides, all in Hydra's override grammar (``+key=value`` adds a key the yaml does not have).
``dataset.name=X`` without ``dataset=`` also selects the group option X (the d2Cache framework's spelling).

Resolution (:func:`resolve`) fills what the yaml leaves ``null``, in this order of precedence (highest first):
explicit ``generation.*`` values (a preset such as ``generation=dyna`` or the command line), the cache's
``generation_defaults``, the model's ``generation_defaults``/``block_length``, the dataset's ``gen_length``;
``steps`` defaults to ``gen_length``. Then it checks the cache against the registered strategies and derives a
deterministic ``run_name``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
GROUPS = ("model", "dataset", "cache", "generation")
CACHE_RESERVED = ("name", "cache_type", "generation_defaults")
GENERATION_RESERVED = ("strategy", "gen_length")
# Keys that do not change any sample's output, so a run can be resumed with other values of them.
RESUME_INDEPENDENT = ("run_name", "output_dir", "overwrite", "max_batches", "threads", "progress", "batch_size",
                      "dataset.limit", "scoring.workers")
# Tasks the dLLM-Cache table of d2Cache's gen_args covers (dllm_preset=auto).
DLLM_PRESET_TASKS = ("gsm8k", "humaneval", "math-500", "mbpp")


class EvalConfigError(ValueError):
    """A config that cannot run: the message names the key and the allowed values."""


def group_options(group: str) -> list[str]:
    """The options of a config group (the yaml file names)."""
    folder = os.path.join(CONFIG_DIR, group)
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def normalize_overrides(overrides: Sequence[str]) -> list[str]:
    """Add ``dataset=X`` for a lone ``dataset.name=X`` (the d2Cache command line), keep everything else."""
    out = list(overrides)
    has_group = any(o.split("=", 1)[0].lstrip("+~") == "dataset" for o in out)
    if not has_group:
        for o in out:
            key, _, value = o.partition("=")
            if key.lstrip("+") == "dataset.name" and value:
                out.insert(0, f"dataset={value}")
                break
    return out


def compose(overrides: Sequence[str] = ()) -> dict:
    """The composed (unresolved) config as a plain dict. Raises EvalConfigError on a bad override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None, job_name="dkvcache_eval"):
            cfg = hydra_compose(config_name="eval", overrides=normalize_overrides(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise EvalConfigError(f"{err}\n(groups: " + "; ".join(f"{g}: {', '.join(group_options(g))}" for g in GROUPS)
                              + ")") from err
    return OmegaConf.to_container(cfg, resolve=True)


def _fill(target: dict, defaults: dict | None) -> None:
    for key, value in (defaults or {}).items():
        if target.get(key) is None:
            target[key] = value


def _int_setting(gen: dict, key: str) -> None:
    value = gen.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise EvalConfigError(f"generation.{key}={value!r} is invalid; allowed: an int >= 1")


def _resolve_generation(cfg: dict) -> None:
    model, data, cache, gen = cfg["model"], cfg["dataset"], cfg["cache"], cfg["generation"]
    if gen.get("gen_length") is None:
        gen["gen_length"] = data["gen_length"]
    _fill(gen, cache.get("generation_defaults"))
    decoding = gen.get("decoding") or "vanilla"
    if gen.get("alg") is None and (decoding != "vanilla" or any(gen.get(k) for k in ("threshold", "factor", "sigma"))):
        gen["alg"] = "maskgit_plus"  # these compare probabilities; Fast-dLLM's Dream "confidence_threshold"
    _fill(gen, model.get("generation_defaults"))
    if gen.get("block_length") is None:
        gen["block_length"] = model.get("block_length")
    if gen.get("block_length") in (None, "gen_length", "full"):
        gen["block_length"] = gen["gen_length"]  # one block (explicit, so the printed config says so)
    if gen.get("steps") is None:
        gen["steps"] = gen["gen_length"]
    for key in ("gen_length", "steps", "block_length"):
        _int_setting(gen, key)
    length, block = gen["gen_length"], gen["block_length"]
    if block > length:
        gen["block_length"] = block = length
    if length % block:
        raise EvalConfigError(f"generation.block_length={block} must divide generation.gen_length={length}")
    if gen["steps"] % (length // block):
        raise EvalConfigError(f"generation.steps={gen['steps']} must be a multiple of the number of blocks "
                              f"({length // block} = gen_length {length} / block_length {block})")


def _resolve_cache(cfg: dict, strategies: dict[str, frozenset[str]]) -> None:
    cache, model, data = cfg["cache"], cfg["model"], cfg["dataset"]
    cache_type = cache.get("cache_type")
    if cache_type not in strategies:
        raise EvalConfigError(
            f"cache={cache.get('name')!r} needs the cache strategy {cache_type!r}, which is not registered in this "
            f"dkvcache; registered strategies: {sorted(strategies)} (cache= options: "
            f"{', '.join(group_options('cache'))})")
    if cache.get("dllm_preset") == "auto":
        known = model.get("kind") in ("base", "inst") and data["name"] in DLLM_PRESET_TASKS
        cache["dllm_preset"] = f"{model['kind']}/{data['name']}" if known else None
    accepted = strategies[cache_type]
    stray = sorted(k for k, v in cache.items() if k not in CACHE_RESERVED and v is not None and k not in accepted)
    if stray:
        raise EvalConfigError(f"cache.{stray[0]} is not an option of the {cache_type!r} strategy; its options: "
                              f"{sorted(accepted)}")


def _resolve_dataset(cfg: dict) -> None:
    data, kind = cfg["dataset"], cfg["model"].get("kind")
    if data.get("n_shot") is None:
        data["n_shot"] = int((data.get("n_shot_by_kind") or {}).get(kind, 0))
    limit = data.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvalConfigError(f"dataset.limit={limit!r} is invalid; allowed: an int >= 1 or null")


def _drop(cfg: dict, dotted: str) -> None:
    node, *path = dotted.split(".")
    if not path:
        cfg.pop(node, None)
    elif isinstance(cfg.get(node), dict):
        _drop(cfg[node], ".".join(path))


def config_hash(cfg: dict) -> str:
    """Hash of everything that changes a sample's output (not batch size, limit, paths of the output…)."""
    relevant = copy.deepcopy(cfg)
    for key in RESUME_INDEPENDENT:
        _drop(relevant, key)
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def default_run_name(cfg: dict) -> str:
    parts = (cfg["model"]["name"], cfg["dataset"]["name"], cfg["cache"]["name"], cfg["generation"]["strategy"])
    return "-".join(str(p) for p in parts) + "-" + config_hash(cfg)


def resolve(cfg: dict, strategies: dict[str, frozenset[str]] | None = None) -> dict:
    """Fill the null defaults, check the cache and name the run. Returns a new dict."""
    if strategies is None:
        from dkvcache.caches import available_strategies

        strategies = available_strategies()
    cfg = copy.deepcopy(cfg)
    _resolve_dataset(cfg)
    _resolve_generation(cfg)
    _resolve_cache(cfg, strategies)
    batch = cfg.get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise EvalConfigError(f"batch_size={batch!r} is invalid; allowed: an int >= 1")
    if not cfg.get("run_name"):
        cfg["run_name"] = default_run_name(cfg)
    return cfg


def load(overrides: Sequence[str] = ()) -> dict:
    """Compose and resolve: the config a run uses."""
    return resolve(compose(overrides))


def generate_kwargs(cfg: dict) -> dict[str, Any]:
    """The ``diffusion_generate`` keywords of a resolved config (generation + cache), nulls dropped."""
    gen, cache = cfg["generation"], cfg["cache"]
    kwargs = {k: v for k, v in gen.items() if k not in GENERATION_RESERVED and v is not None}
    kwargs["max_new_tokens"] = gen["gen_length"]
    if kwargs.get("decoding") == "vanilla":
        del kwargs["decoding"]  # the default; not passed, so versions without decoders accept it
    if cache["cache_type"] != "none":
        kwargs["use_cache"] = True
        kwargs["cache_type"] = cache["cache_type"]
        kwargs.update({k: v for k, v in cache.items() if k not in CACHE_RESERVED and v is not None})
    return kwargs


def to_yaml(cfg: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(cfg))
