"""lm-evaluation-harness model ``dkvcache``: any Dream/LLaDA checkpoint with any cache strategy.

lm-eval 0.4.x has no entry-point group for models, so the class registers itself when this module is imported;
``python -m dkvcache.lm_eval …`` imports it and runs lm-eval's own CLI (as the anchors' eval scripts do)::

    python -m dkvcache.lm_eval --model dkvcache \\
        --model_args model=tiny-dream,cache=dual,threshold=0.9,batch_size=8 --tasks gsm8k

``model_args``: ``model`` (a ``configs/model`` option, default tiny-dream), ``pretrained`` (= model.path),
``cache`` and ``generation`` (group options), ``batch_size``, ``dtype``, ``device``, ``seed``, ``mc_num`` and
``mc_batch_size`` (log-likelihood), and any generation or cache key (``gen_length``, ``steps``,
``block_length``, ``threshold``, ``cache_steps``, … ; other ``diffusion_generate`` keywords are added as new
generation keys). Without ``gen_length`` each request's ``max_gen_toks`` is used (rounded up to a multiple of the
block length); the text is cut at the request's ``until`` strings. Sampling settings come from the config, not
from the task's ``do_sample``/``temperature``.

``loglikelihood``: the Monte-Carlo estimate of LLaDA's ``eval_llada.py`` (``mc_num`` masked copies; row j of a
minibatch masks ``round(linspace(k, k+(b-1)T/b, b))`` target tokens wrapped into [1, T], loss = CE over masked
tokens / (count/T)); Dream reads position j's prediction at j−1. ``is_greedy`` is always False.
``loglikelihood_rolling`` raises NotImplementedError.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dkvcache.eval import config as config_mod
from dkvcache.eval.dist import init
from dkvcache.eval.engine import Engine, load_model
from dkvcache.eval.prompts import cut_at_stop

_OWN_ARGS = ("model", "pretrained", "cache", "generation", "batch_size", "dtype", "device", "seed", "mc_num",
             "mc_batch_size", "max_batch_size")
_PROBE_LENGTH = 1 << 20


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def build_overrides(model: str, cache: str, generation: str, pretrained: str | None, dtype: str | None,
                    extra: dict[str, Any]) -> list[str]:
    """Hydra overrides for the model_args: generation/cache keys in place, unknown keys added to generation."""
    overrides = [f"model={model}", f"cache={cache}", f"generation={generation}"]
    if pretrained:
        overrides.append(f"model.path={pretrained}")
    if dtype:
        overrides.append(f"model.dtype={dtype}")
    base = config_mod.compose(overrides)
    for key, value in extra.items():
        if key in base["generation"]:
            overrides.append(f"generation.{key}={_override_value(value)}")
        elif key in base["cache"]:
            overrides.append(f"cache.{key}={_override_value(value)}")
        else:
            overrides.append(f"+generation.{key}={_override_value(value)}")
    return overrides


@register_model("dkvcache")
class DkvcacheLM(LM):
    """lm-eval ``LM`` over :class:`dkvcache.eval.engine.Engine`."""

    def __init__(self, model: str = "tiny-dream", pretrained: str | None = None, cache: str = "none",
                 generation: str = "vanilla", batch_size: int | str = 1, dtype: str | None = None,
                 device: str | None = None, seed: int = 1234, mc_num: int = 128, mc_batch_size: int = 32,
                 max_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.cfg = config_mod.compose(build_overrides(model, cache, generation, pretrained, dtype, kwargs))
        self.user_gen_length = self.cfg["generation"].get("gen_length")
        self.block_length()  # fails early on a bad cache / generation setting
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's --device default is "cuda"; without CUDA take accelerate's (cpu)
        self.dist = init(device)
        self._rank, self._world_size, self._device = self.dist.rank, self.dist.world, self.dist.device
        self.model, self.tokenizer = load_model(self.cfg["model"]["path"], self.cfg["model"]["dtype"], self._device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.seed, self.mc_num, self.mc_batch_size = int(seed), int(mc_num), int(mc_batch_size)
        self.add_bos = bool(self.cfg["model"].get("add_bos_token"))
        self._engines: dict[int, Engine] = {}
        self._templated = False

    # -- distributed primitives lm-eval's evaluator calls ---------------------------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> Any:
        if self._world_size == 1:
            return [obj]
        from accelerate.utils import gather_object

        gathered = gather_object([obj])
        return gathered if self._rank == dst else None

    def barrier(self) -> None:
        self.dist.barrier()

    # -- chat templates ------------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(self.cfg["model"]["path"]).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self._templated = True
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # -- generation ----------------------------------------------------------------------------------------------
    def _with_length(self, length: int, steps_from_config: bool = True) -> dict:
        cfg = copy.deepcopy(self.cfg)
        cfg["dataset"]["gen_length"] = cfg["generation"]["gen_length"] = length
        if not steps_from_config:
            cfg["generation"]["steps"] = None
        return config_mod.resolve(cfg)

    def block_length(self) -> int | None:
        """The block length the config resolves to (None: one block), probed with a huge power-of-two length."""
        probe = self._with_length(_PROBE_LENGTH, steps_from_config=False)["generation"].get("block_length")
        return None if probe in (None, _PROBE_LENGTH) else int(probe)

    def resolved(self, max_gen_toks: int) -> dict:
        """The resolved config for requests of ``max_gen_toks`` (unless gen_length was given)."""
        length = int(self.user_gen_length or max_gen_toks)
        block = self.block_length()
        if not self.user_gen_length and block and length % block:
            length = math.ceil(length / block) * block
        return self._with_length(length)

    def engine(self, max_gen_toks: int) -> Engine:
        if max_gen_toks not in self._engines:
            kwargs = config_mod.generate_kwargs(self.resolved(max_gen_toks))
            self._engines[max_gen_toks] = Engine(self.model, self.tokenizer, kwargs, self.add_bos)
        return self._engines[max_gen_toks]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        prepared = []
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prepared.append((n, context, until, int(gen_kwargs.get("max_gen_toks", 256))))
        results: list[str] = [""] * len(prepared)
        groups: dict[int, list[tuple[int, str, list[str], int]]] = {}
        for p in prepared:
            groups.setdefault(p[3], []).append(p)
        bar = tqdm(total=len(prepared), disable=disable_tqdm or self._rank != 0, desc="dkvcache generate_until")
        for max_gen, group in groups.items():
            engine = self.engine(max_gen)
            encoded = [(p, engine.encode(p[1], self._templated)) for p in group]
            encoded.sort(key=lambda e: -len(e[1]))
            for start in range(0, len(encoded), self.batch_size):
                chunk = encoded[start: start + self.batch_size]
                out = engine.generate([ids for _, ids in chunk], seeds=[self.seed + p[0] for p, _ in chunk])
                for (p, _), completion in zip(chunk, out.completions):
                    results[p[0]] = cut_at_stop(engine.decode(completion), p[2])
                bar.update(len(chunk))
        bar.close()
        return results

    # -- likelihoods ---------------------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer(context + continuation, add_special_tokens=not self._templated)["input_ids"]
        ctx = self.tokenizer(context, add_special_tokens=not self._templated)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if self.add_bos and bos is not None and (not ctx or ctx[0] != bos):
            ctx, whole = [bos, *ctx], [bos, *whole]
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def mc_loglikelihood(self, prefix: list[int], target: list[int], generator: torch.Generator) -> float:
        """LLaDA's Monte-Carlo estimate of log p(target | prefix) (``mc_num`` masked copies)."""
        device, mask_id = self.model.device, self.model.config.mask_token_id
        shift = getattr(self.model, "diffusion_family", "llada") == "dream"
        seq = torch.tensor(prefix + target, dtype=torch.long, device=device)
        p, t = len(prefix), len(target)
        b = max(1, min(self.mc_batch_size, self.mc_num))
        rounds = max(1, self.mc_num // b)
        total = 0.0
        for _ in range(rounds):
            k = int(torch.randint(1, t + 1, (1,), generator=generator))
            counts = torch.linspace(k, k + (b - 1) * t / b, b).round().long()
            counts = (counts - 1) % t + 1
            x = seq.repeat(b, 1)
            masked = torch.zeros((b, len(seq)), dtype=torch.bool, device=device)
            for row in range(b):
                chosen = torch.randperm(t, generator=generator)[: int(counts[row])] + p
                masked[row, chosen.to(device)] = True
            x[masked] = mask_id
            logits = self.model(x).logits.float()
            if shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            ce = torch.nn.functional.cross_entropy(logits[masked], seq.repeat(b, 1)[masked], reduction="none")
            per_row = torch.zeros(b, device=device).index_add_(0, masked.nonzero()[:, 0], ce)
            total += float((per_row / (counts.to(device).float() / t)).sum() / b)
        return -total / rounds

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        generator = torch.Generator().manual_seed(self.seed)
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            if not ctx:
                ctx = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                       else self.tokenizer.eos_token_id]
            out.append((self.mc_loglikelihood(ctx, cont, generator) if cont else 0.0, False))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("dkvcache: loglikelihood_rolling (perplexity tasks) is not implemented for "
                                  "diffusion models; use generate_until or loglikelihood tasks")
