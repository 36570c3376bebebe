"""The eval loop: load, batch by prompt length, generate, score, append records after every batch, summarize.

Resuming: the samples already in the run directory (any rank's) are skipped, so a killed run started again with
the same config (same ``run_name``) finishes with exactly one record per sample. Under accelerate the batches
are formed over all remaining items (longest prompts first) and dealt round-robin to the ranks, so every batch
holds the same prompts as in a one-process run; rank 0 merges the shards and writes ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from dkvcache.eval import config as config_mod
from dkvcache.eval import datasets, prompts, records, scoring
from dkvcache.eval.dist import Dist, init
from dkvcache.eval.engine import Engine, load_model, precheck
from dkvcache.eval.summary import summarize


class RunConflict(RuntimeError):
    """The run directory holds samples of a different config, or another run is writing it."""


def make_batches(indices: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """``indices`` sorted by prompt length (longest first, then dataset order), cut into batches."""
    ordered = sorted(indices, key=lambda i: (-lengths[i], i))
    return [ordered[k: k + batch_size] for k in range(0, len(ordered), batch_size)]


def prepare_run_dir(run_dir: str, cfg: dict) -> None:
    """Create the run directory, refuse to mix configs, honour ``overwrite``, write config.yaml."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, records.CONFIG)
    if cfg.get("overwrite"):
        records.clear(run_dir)
    elif os.path.exists(path):
        from omegaconf import OmegaConf

        previous = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if config_mod.config_hash(previous) != config_mod.config_hash(cfg) and records.read_all(run_dir):
            raise RunConflict(f"{run_dir} holds samples of a different config (its config.yaml); resuming would mix "
                              "them. Pass overwrite=true to discard them, or another run_name.")
    with open(path, "w", encoding="utf-8") as f:
        f.write(config_mod.to_yaml(cfg))


def _progress(iterable: Any, enabled: bool, total: int) -> Any:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="eval", unit="batch", dynamic_ncols=True)


class Evaluation:
    """Everything a run needs once the model is loaded: items, prompts, token ids, the engine."""

    def __init__(self, cfg: dict, engine: Engine, items: list[dict] | None = None) -> None:
        self.cfg, self.engine = cfg, engine
        self.task = cfg["dataset"]["name"]
        self.items = items if items is not None else datasets.load_items(cfg["dataset"])
        chat = cfg["model"]["kind"] != "base"
        tokenizer = engine.tokenizer
        self.prompts = [prompts.build_prompt(self.task, it, cfg["dataset"]["n_shot"], chat, tokenizer)
                        for it in self.items]
        self.ids = [engine.encode(p.text, chat) for p in self.prompts]

    def run_batch(self, batch: list[int], rank: int) -> list[dict]:
        """Generate, decode, score one batch; the records to append."""
        seed = int(self.cfg.get("seed") or 0)
        out = self.engine.generate([self.ids[i] for i in batch], seeds=[seed + i for i in batch])
        texts = [prompts.cut_at_stop(self.engine.decode(c), self.prompts[i].stop)
                 for i, c in zip(batch, out.completions)]
        items = [self.items[i] for i in batch]
        scores = scoring.score_batch(self.task, items, texts, [self.prompts[i].prefix for i in batch],
                                     self.cfg.get("scoring"))
        stats = out.stats
        seconds = float(stats.get("wall_time_s", 0.0)) / len(batch)
        return [{
            "id": item["id"], "index": i, "prompt": self.prompts[i].text, "completion": text, "score": score,
            "metrics": metrics, "seconds": seconds, "response_tokens": int(tokens),
            "forwards": int(stats.get("forwards", 0)), "fed_fraction": float(stats.get("fed_fraction", 1.0)),
            "prompt_tokens": len(self.ids[i]), "batch_size": len(batch), "rank": rank,
        } for i, item, text, (score, metrics), tokens in zip(batch, items, texts, scores, out.response_tokens)]


def run(cfg: dict, dist: Dist | None = None, log: Any = print) -> dict | None:
    """Evaluate a resolved config. Returns the summary on rank 0 (None on the other ranks).

    Everything that can refuse the run is checked before anything is written: the dataset (not empty, readable),
    model.path's config.json and the generation/cache settings against it (before the weights are loaded), the
    settings again against the loaded model, then rank 0 takes the run directory's lock (RunConflict when another
    run holds it) and checks the directory's config (RunConflict when it differs).
    """
    import torch

    dist = dist or init(cfg.get("device"))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    run_dir = os.path.join(cfg.get("output_dir") or "outputs", cfg["run_name"])
    items = datasets.load_items(cfg["dataset"])  # before the model: a missing dataset fails fast
    gen_kwargs = config_mod.generate_kwargs(cfg)
    precheck(cfg["model"]["path"], gen_kwargs)  # config.json only: a refused combination fails before the weights
    model, tokenizer = load_model(cfg["model"]["path"], cfg["model"].get("dtype", "bfloat16"), dist.device)
    engine = Engine(model, tokenizer, gen_kwargs, bool(cfg["model"].get("add_bos_token")))
    ev = Evaluation(cfg, engine, items)
    engine.check(max(len(x) for x in ev.ids))  # against the loaded model, still before anything is written
    with contextlib.ExitStack() as held:
        state: tuple[str, Any] = ("", None)
        if dist.is_main:  # rank 0 locks and prepares the directory and reads what is done; every rank gets the answer
            try:
                held.enter_context(records.run_lock(run_dir))
                prepare_run_dir(run_dir, cfg)
                state = ("ok", set(records.read_all(run_dir)))
            except (RunConflict, records.RunLocked) as err:
                state = ("conflict", str(err))
        state = dist.broadcast(state)
        if state[0] == "conflict":
            raise RunConflict(state[1])
        return _evaluate(cfg, dist, ev, run_dir, state[1], log)


def _evaluate(cfg: dict, dist: Dist, ev: Evaluation, run_dir: str, done: set, log: Any) -> dict | None:
    """The batches not ``done`` yet, then (rank 0) the merge and the summary."""
    todo = [i for i, it in enumerate(ev.items) if it["id"] not in done]
    batches = make_batches(todo, [len(x) for x in ev.ids], int(cfg["batch_size"]))
    mine = batches[dist.rank::dist.world]
    if cfg.get("max_batches"):
        mine = mine[: int(cfg["max_batches"])]
    if dist.is_main:
        log(f"[dkvcache.eval] {run_dir}: {len(ev.items)} items, {len(done & {it['id'] for it in ev.items})} done, "
            f"{len(todo)} to do in {len(batches)} batches over {dist.world} process(es)")
    name = records.SAMPLES if dist.world == 1 else records.shard_name(dist.rank)
    writer = records.RecordWriter(os.path.join(run_dir, name))
    start = time.perf_counter()
    for batch in _progress(mine, bool(cfg.get("progress")) and dist.is_main, len(mine)):
        writer.append(ev.run_batch(batch, dist.rank))
    dist.barrier()
    if not dist.is_main:
        return None
    merged = records.merge(run_dir, order=[it["id"] for it in ev.items])
    wanted = {it["id"] for it in ev.items}
    summary = summarize([r for r in merged if r["id"] in wanted], cfg, dist.device, dist.world)
    summary["n_items"] = len(ev.items)
    summary["complete"] = summary["n"] == len(ev.items)
    summary["eval_wall_s_this_invocation"] = time.perf_counter() - start
    summary["run_dir"] = run_dir
    with open(os.path.join(run_dir, records.SUMMARY), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary
