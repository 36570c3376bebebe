"""Per-step overhead of every strategy at batch 1: eager vs ``compile=True``, dispatcher calls, host reads.

    python -m dkvcache.overhead                       # the shipped tiny checkpoints, CPU
    python -m dkvcache.bench --overhead [--json F]    # the same

For each checkpoint and strategy: ms per step eager and compiled (``compile=True``: the AOT step on CPU; and
``compile="inductor"``, torch.compile per shape, for comparison; the best of ``--repeats`` rounds after a
warm-up, each round running the three modes in turn; compile time reported apart), the compute floor (the
step's matmuls and attention alone, see :func:`compute_floor_ms`; eager ÷ floor is the most any capture could
gain, floor ÷ compiled how much of it ``compile=True`` reaches), aten calls per step (``torch.profiler``, views
included) and per layer of the model forward, host reads per step (``.item()``, ``.tolist()``,
``bool(tensor)`` … counted with a ``TorchFunctionMode``: each is a device synchronisation on CUDA), the torch
calls a compiled step still issues from Python (the same mode; metadata reads not counted: on a GPU each is a
kernel launch outside the captured graph), and the same counts for a plain transformers ``Qwen2ForCausalLM`` /
``LlamaForCausalLM`` forward of the same size over the whole sequence.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function

from dkvcache import capture
from dkvcache.loading import load_model

STRATEGIES: dict[str, dict[str, Any]] = {
    "none": {},
    "decoded": {"use_cache": True, "cache_type": "decoded", "cache_steps": 4},
    "prefill": {"use_cache": True, "cache_type": "prefill"},
    "pd": {"use_cache": True, "cache_type": "pd", "cache_steps": 4},
    "prefix": {"use_cache": True, "cache_type": "prefix", "block_length": 32},
    "dual": {"use_cache": True, "cache_type": "dual", "block_length": 32},
    "dllm": {"use_cache": True, "cache_type": "dllm"},
    "d2": {"use_cache": True, "cache_type": "d2"},
}
FORWARD_SCOPE = "dkvcache.forward"
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero}


# Tensor metadata reads: no kernel, no dispatch worth counting.
_METADATA = frozenset({"__get__", "size", "dim", "stride", "numel", "is_contiguous", "data_ptr", "element_size",
                       "__len__", "storage_offset", "is_floating_point", "is_complex"})


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host (a device synchronisation on CUDA) and, in
    ``calls``, every torch function issued from Python but metadata reads (on a GPU each is at least a kernel
    launch outside any captured graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.count += 1
        if getattr(func, "__name__", None) not in _METADATA:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """``with count_host_reads() as reads: …; reads.count``."""
    mode = HostReads()
    with mode:
        yield mode


def _aten_counts(fn) -> tuple[int, int]:
    """(all aten calls, aten calls inside the model forwards) of one call of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    return len(aten), sum(_inside_forward(e) for e in aten)


def _inside_forward(event: Any) -> bool:
    """Whether a profiler event ran inside a model forward (a ``FORWARD_SCOPE`` ancestor)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == FORWARD_SCOPE:
            return True
        parent = parent.cpu_parent
    return False


def _min_time(fn, repeats: int) -> float:
    return _min_times([fn], repeats)[0]


def _min_times(fns: list, repeats: int) -> list[float]:
    """The best of ``repeats`` timings of each function, taken in turns (one run of each per round), so a slow
    spell on a shared machine hits every mode alike and the ratios between them stay comparable."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@contextmanager
def recorded_forwards(model: Any) -> Iterator[list[tuple[int, int, int]]]:
    """Record (batch, fed positions, keys) of every partial forward run inside the ``with`` block."""
    shapes: list[tuple[int, int, int]] = []
    forward = model.partial_forward

    def recording(input_ids, positions, key_valid, fed_idx=None, kv=None, **kwargs):
        fed = input_ids.shape[1] if fed_idx is None else fed_idx.shape[1]
        shapes.append((input_ids.shape[0], fed, input_ids.shape[1] + (kv is not None)))
        return forward(input_ids, positions, key_valid, fed_idx=fed_idx, kv=kv, **kwargs)

    object.__setattr__(model, "partial_forward", recording)  # an instance attribute shadows the method
    try:
        yield shapes
    finally:
        object.__delattr__(model, "partial_forward")


def compute_floor_ms(model: Any, batch: int, fed: int, keys: int, repeats: int = 20) -> float:
    """ms of the layer stack's irreducible kernels at one forward shape: every layer's matmuls (each
    ``nn.Linear`` on random (batch, fed, in) inputs, from an in × out copy of its weight: the faster CPU layout,
    :mod:`dkvcache.kn_linear`) and its attention (SDPA, ``fed`` queries over ``keys``). What a step would cost
    with no overhead at all: no norms, rotary, masks, gathers, sampler or Python."""
    heads, kv_heads, head_dim = model.config.num_attention_heads, model._n_kv_heads, model._head_dim
    dtype = next(model.parameters()).dtype
    weights = [m.weight.detach().t().contiguous() for m in model._layers().modules()
               if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[0]: torch.randn(batch, fed, w.shape[0], dtype=dtype) for w in weights}
    q = torch.randn(batch, heads, fed, head_dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, keys, head_dim, dtype=dtype)

    def kernels() -> None:
        for weight in weights:
            torch.matmul(inputs[weight.shape[0]], weight)
        for _ in range(model.num_layers):
            torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=heads != kv_heads)

    kernels()
    return 1000 * _min_time(kernels, repeats)


def floor_ms_per_step(model: Any, shapes: list[tuple[int, int, int]], steps: int) -> float:
    """The compute floor of a run: :func:`compute_floor_ms` of every forward it ran, per step."""
    per_shape = {shape: compute_floor_ms(model, *shape) for shape in set(shapes)}
    return sum(per_shape[shape] for shape in shapes) / steps


def measure(model: Any, ids: torch.Tensor, strategy: str, gen: int, repeats: int) -> dict[str, Any]:
    """One strategy on one model: eager and compiled ms/step, the compute floor, calls, host reads."""
    kwargs = dict(max_new_tokens=gen, steps=gen, alg="maskgit_plus", return_dict_in_generate=True,
                  **STRATEGIES[strategy])

    def run(**extra: Any) -> Any:
        return model.diffusion_generate(ids, **kwargs, **extra)

    with recorded_forwards(model) as shapes:
        warm = run()
    steps = warm.stats["steps"]
    floor = floor_ms_per_step(model, shapes, steps)
    first = run(compile=True)  # compiles every new shape; its compile time is reported apart
    inductor_first = run(compile="inductor") if _default_mode(model) != "inductor" else first
    eager, compiled, inductor = (seconds / steps for seconds in _min_times(
        [run, lambda: run(compile=True), lambda: run(compile="inductor")], repeats))
    with count_host_reads() as reads:
        run()
    with count_host_reads() as compiled_reads:
        run(compile=True)
    total, inside = _aten_counts(run)
    layers = model.num_layers
    return {"strategy": strategy, "steps": steps, "eager_ms_per_step": 1000 * eager,
            "compiled_ms_per_step": 1000 * compiled, "compiled": first.stats["compiled"],
            "compile_s": first.stats["compile_s"], "compiled_shapes": first.stats["compiled_shapes"],
            "speedup_compiled": eager / compiled, "compile_mode": _default_mode(model),
            "inductor_ms_per_step": 1000 * inductor, "inductor_compile_s": inductor_first.stats["compile_s"],
            "speedup_inductor": eager / inductor, "floor_ms_per_step": floor,
            "max_speedup": 1000 * eager / floor, "efficiency_compiled": floor / (1000 * compiled),
            "aten_per_step": total / steps,
            "aten_per_layer": inside / (steps * layers), "host_reads_per_step": reads.count / steps,
            "python_calls_per_step_compiled": compiled_reads.calls / steps,
            "fed_fraction": warm.stats["fed_fraction"]}


def _default_mode(model: Any) -> str | None:
    """What ``compile=True`` means for this model's device ("aot" on CPU)."""
    return capture.mode(True, next(model.parameters()).device)


def transformers_reference(model: Any, length: int) -> dict[str, Any]:
    """The same-size plain transformers model (Qwen2 for Dream, Llama for LLaDA): one forward over ``length``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    c = model.config
    dream = model.diffusion_family == "dream"
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size if dream else c.d_model,
                  intermediate_size=c.intermediate_size if dream else c.mlp_hidden_size,
                  num_hidden_layers=model.num_layers, num_attention_heads=c.num_attention_heads if dream else c.n_heads,
                  num_key_value_heads=c.num_key_value_heads if dream else c.n_kv_heads, attn_implementation="sdpa")
    ref = (Qwen2ForCausalLM(Qwen2Config(**common)) if dream else LlamaForCausalLM(LlamaConfig(**common))).eval()
    ids = torch.randint(0, c.vocab_size, (1, length))

    def forward() -> None:
        with record_function(FORWARD_SCOPE):
            ref.model(input_ids=ids)

    forward()
    total, inside = _aten_counts(forward)
    return {"name": type(ref).__name__, "ms_per_forward": 1000 * _min_time(forward, 20),
            "aten_per_forward": total, "aten_per_layer": inside / model.num_layers}


def run(paths: list[str], prompt: int, gen: int, repeats: int, threads: int) -> dict[str, Any]:
    """Every strategy on every checkpoint; returns the report (also printed as markdown)."""
    from dkvcache.bench import environment

    torch.set_num_threads(threads)
    report: dict[str, Any] = {"environment": environment(torch.device("cpu"), []), "prompt": prompt, "gen": gen,
                              "batch": 1, "threads": threads, "models": {}}
    for path in paths:
        model = load_model(path, dtype="float32")
        special = [getattr(model.config, n, None) or 0 for n in ("mask_token_id", "pad_token_id", "eos_token_id")]
        low = max(special) + 1  # ordinary tokens only (the tiny checkpoints keep their special ids low)
        ids = torch.randint(low, low + 64, (1, prompt), generator=torch.Generator().manual_seed(0))
        rows = []
        with torch.no_grad():
            for strategy in STRATEGIES:
                rows.append(measure(model, ids, strategy, gen, repeats))
                print(_row(rows[-1]), flush=True)
            reference = transformers_reference(model, prompt + gen)
        report["models"][path] = {"rows": rows, "transformers": reference}
        print(_table(path, rows, reference))
    return report


def _row(r: dict[str, Any]) -> str:
    return (f"| {r['strategy']} | {r['eager_ms_per_step']:.2f} | {r['compiled_ms_per_step']:.2f}"
            f"{'' if r['compiled'] else ' (eager)'} | {r['speedup_compiled']:.2f}× | "
            f"{r['inductor_ms_per_step']:.2f} ({r['speedup_inductor']:.2f}×) | {r['floor_ms_per_step']:.2f} | "
            f"{r['max_speedup']:.2f}× | {r['efficiency_compiled']:.2f} | {r['compile_s']:.1f} | "
            f"{r['aten_per_step']:.0f} | {r['aten_per_layer']:.0f} | {r['host_reads_per_step']:.2f} | "
            f"{r['python_calls_per_step_compiled']:.0f} | {r['fed_fraction']:.3f} |")


def _table(path: str, rows: list[dict[str, Any]], reference: dict[str, Any]) -> str:
    head = (f"\n{path}, batch 1:\n\n| strategy | eager ms/step | compiled ms/step | compiled speed-up | "
            "torch.compile ms/step | floor ms/step | eager ÷ floor | floor ÷ compiled | compile s | "
            "aten calls/step | aten calls/layer | host reads/step | compiled: torch calls/step from Python | fed |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref = (f"\ntransformers {reference['name']} of the same size, one forward over the whole sequence: "
           f"{reference['ms_per_forward']:.2f} ms, {reference['aten_per_forward']} aten calls, "
           f"{reference['aten_per_layer']:.0f} per layer")
    return "\n".join([head, *(_row(r) for r in rows), ref])


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m dkvcache.overhead [--model DIR …] [--json FILE]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="checkpoint (default: assets/tiny-dream, assets/tiny-llada)")
    parser.add_argument("--prompt-len", type=int, default=40)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every mode once)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    paths = args.model or ["assets/tiny-dream", "assets/tiny-llada"]
    report = run(paths, args.prompt_len, args.gen_len, args.repeats, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
