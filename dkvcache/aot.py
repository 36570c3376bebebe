"""``compile="aot"`` (what ``compile=True`` means on CPU): the step's forward and head as one graph compiled
ahead of time with AOTInductor and run as a single C++ call.

Why not ``torch.compile`` alone: on a small model every kernel is short, and a ``torch.compile``'d call still
runs Python around its kernels (dynamo's guard check, inductor's wrapper, the runtime's input handling); on
the shipped tiny checkpoints that is as long as the kernels themselves. An AOTInductor package has no Python
between kernels — the CPU counterpart of replaying a CUDA graph.

One package per (batch, length, K/V buffers or not, head settings, commit settings, padded rows or not,
threads): the fed width ``n`` and the candidate width ``m`` are dynamic dimensions (at least 2: the loop pads
narrower sets with scratch entries), so a call builds one package, not one per shape. (Specialising the fed
width measured no faster over a whole step: dual 2.04 vs 2.11 ms, decoded 2.60 vs 2.40 with its bucketed
widths, for 2–5 packages.) With the plain vanilla rule the package also chooses and writes the step's tokens
(:mod:`dkvcache.commit`). A full forward with K/V buffers is fed as ``fed_idx = arange(L)``, which computes
exactly what ``fed_idx=None`` does. The rotary angles of every position come in once per call, and a call
without padded rows gets a package that attends without a mask.

The weights are not copied into a package: it reads the model's own parameters (``user_managed`` constants), so
they stay shared and a large model is never written to disk. The one exception is in memory: while the linear
weights total at most ``MAX_COPY_BYTES``, the package multiplies by in × out copies of them, a layout CPU GEMMs
run faster at a cached step's few rows (:mod:`dkvcache.kn_linear`; dual 1.28 → 1.03 ms a step on the tiny
Dream).

Packages live in memory with the model object and on disk in ``$DKVCACHE_CACHE/aot`` (default
``~/.cache/dkvcache/aot``; ``DKVCACHE_CACHE=off`` disables it), keyed by a hash of the exported program, the torch
version and the CPU's vector ISA, so another process with the same model shapes and settings loads a package in
~2–3 s (mostly the export) instead of building it (~15 s).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkvcache.commit import CommitSettings, step_head_and_commit
from dkvcache.head import HeadSettings, candidate_sources, step_head
from dkvcache.kn_linear import MAX_COPY_BYTES, KNLinear, kn_linears, linear_bytes
from dkvcache.partial_forward import KVBuffers

# "aoti": export + AOTInductor (C++ code generation and compile). Tests may switch to "export": the same
# exported graph run by torch (``ExportedProgram.module()``), which checks the capture without a C++ build.
BACKEND = "aoti"
MIN_WIDTH = 2  # torch.export specialises dimensions of size 0 and 1, so a dynamic width starts at 2


class StepGraph(nn.Module):
    """Forward over the fed positions, then the head at the candidates: what one AOT package computes (the
    candidates' source positions and offsets included). With :class:`CommitSettings` it also chooses and writes
    (:func:`dkvcache.commit.commit`), taking the schedule's count and the threshold/factor value as two more
    inputs."""

    def __init__(self, model: nn.Module, settings: HeadSettings, with_kv: bool,
                 commit_settings: CommitSettings | None = None, all_keys_valid: bool = False) -> None:
        super().__init__()
        self.model = model  # a submodule, so export lifts the weights as named parameters
        self.settings = settings
        self.with_kv = with_kv
        self.commit_settings = commit_settings
        self.all_keys_valid = all_keys_valid

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                fed_idx: torch.Tensor | None, keys: list[torch.Tensor], values: list[torch.Tensor],
                cos: torch.Tensor, sin: torch.Tensor, cand_pos: torch.Tensor, cand_valid: torch.Tensor,
                prompt_length: torch.Tensor, row_seeds: torch.Tensor, noise_step: torch.Tensor,
                count: torch.Tensor | None = None, rule_value: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        kv = KVBuffers.wrap(keys, values) if self.with_kv else None
        hidden = self.model.partial_forward(ids, positions, key_valid, fed_idx=fed_idx, kv=kv, rotary=(cos, sin),
                                            all_keys_valid=self.all_keys_valid)
        source, offsets = candidate_sources(cand_pos, cand_valid, prompt_length, self.settings)
        if self.commit_settings is None:
            return step_head(self.model, hidden, fed_idx, source, cand_valid, offsets, row_seeds, noise_step,
                             self.settings)
        x = ids[: self.settings.batch]  # the sequences (classifier-free guidance appends the unconditional half)
        return step_head_and_commit(self.model, hidden, fed_idx, source, cand_valid, offsets, row_seeds, noise_step,
                                    self.settings, x, cand_pos, count, rule_value, self.commit_settings)


class AOTStep:
    """The step graphs of one model, built on first use per signature and reused across calls."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.backend = BACKEND
        self.runners: dict[tuple, Any] = {}
        self._dir: tempfile.TemporaryDirectory | None = None
        self._weights = _weights_key(model)
        self._kn_copies: dict[int, KNLinear] = {}  # shared by every package (dkvcache.kn_linear)

    def check_weights(self) -> None:
        """Drop every package (and the K × N weight copies) if the model's parameters were replaced, moved or
        changed in place since they were built: the packages hold pointers to them, the copies their values.
        Called once per generate call."""
        key = _weights_key(self.model)
        if key != self._weights:
            self.runners.clear()
            self._kn_copies.clear()
            self._weights = key

    def __call__(self, stats: dict, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                 fed_idx: torch.Tensor | None, kv: KVBuffers | None, rotary: tuple[torch.Tensor, torch.Tensor],
                 cand_pos: torch.Tensor, cand_valid: torch.Tensor, prompt_length: torch.Tensor,
                 row_seeds: torch.Tensor, noise_step: torch.Tensor, settings: HeadSettings,
                 commit_settings: CommitSettings | None = None, count: torch.Tensor | None = None,
                 rule_value: torch.Tensor | None = None, all_keys_valid: bool = False) -> tuple[torch.Tensor, ...]:
        """(logits, decodable, proposals, confidences) of the candidates, K/V buffers updated in place (``rotary``:
        cos/sin of every position, :func:`dkvcache.partial_forward.rotary_cos_sin` of ``positions``); with
        ``commit_settings`` (and ``count``, ``rule_value``): (new sequences, transfer, confidences).
        ``prompt_length``: a 0-d tensor (data, so one package serves every prompt length). ``all_keys_valid``:
        no row is padded (``key_valid`` all True), so the package attends without a mask (its own build)."""
        if kv is not None and fed_idx is None:  # a full forward through the buffers: every position, in order
            fed_idx = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        keys, values = (kv.keys, kv.values) if kv is not None else ([], [])
        # A package's kernels index its inputs with the strides they had when it was built, unchecked at run
        # time: an expanded (stride-0) fed set, as prefix/dual plan it, would make every row read row 0's.
        ids, positions, key_valid, cos, sin, cand_pos, cand_valid, row_seeds = (
            _dense(t) for t in (ids, positions, key_valid, *rotary, cand_pos, cand_valid, row_seeds))
        fed_idx = None if fed_idx is None else _dense(fed_idx)
        args = (ids, positions, key_valid, fed_idx, keys, values, cos, sin, cand_pos, cand_valid, prompt_length,
                row_seeds, noise_step)
        if commit_settings is not None:
            args += (_dense(count), rule_value)
        # inductor writes serial kernels when built at one thread and OpenMP ones for more: a package per count
        signature = (tuple(ids.shape), ids.device, kv is not None, settings, commit_settings, all_keys_valid,
                     torch.get_num_threads())
        runner = self.runners.get(signature)
        if runner is None:
            start = time.perf_counter()
            try:
                runner, loaded = self._build(args, settings, kv is not None, commit_settings, all_keys_valid)
            except Exception as error:  # inductor raises several types (compiler missing, codegen, export)
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise RuntimeError(
                    f"diffusion_generate(compile=True): building the AOT step failed ({type(error).__name__}: "
                    f"{first[:300]}). On CPU it is compiled to C++ and needs a C++ compiler (g++ or clang); "
                    "compile=False runs the same step eagerly") from error
            self.runners[signature] = runner
            stats["compile_s"] = stats.get("compile_s", 0.0) + time.perf_counter() - start
            counter = "loaded_packages" if loaded else "compiled_shapes"
            stats[counter] = stats.get(counter, 0) + 1
        return runner(*args)

    def _build(self, args: tuple, settings: HeadSettings, with_kv: bool, commit_settings: CommitSettings | None,
               all_keys_valid: bool) -> Any:
        graph = StepGraph(self.model, settings, with_kv, commit_settings, all_keys_valid)
        cand = torch.export.Dim("candidates", min=MIN_WIDTH, max=args[0].shape[1])
        fed = {1: torch.export.Dim("fed", min=MIN_WIDTH, max=args[0].shape[1])} if args[3] is not None else None
        kv_spec = [None] * len(args[4])
        dynamic = (None, None, None, fed, kv_spec, kv_spec, None, None, {1: cand}, {1: cand}, None, None, None)
        if commit_settings is not None:
            dynamic += (None, None)
        copies = self._kn_copies if linear_bytes(self.model) <= MAX_COPY_BYTES else None
        with kn_linears(self.model, copies) if copies is not None else nullcontext():
            program = torch.export.export(graph, args, dynamic_shapes=dynamic, strict=False)
            live = {**dict(graph.named_parameters(remove_duplicate=False)),
                    **dict(graph.named_buffers(remove_duplicate=False)), **program.constants}
        if self.backend == "export":
            return program.module(), False
        cached = _cache_path(program, args)
        loaded = cached is not None and cached.exists()
        if loaded:
            path = str(cached)
        else:
            path = self._compile(program, cached)
        runner = torch._inductor.aoti_load_package(path)
        runner.load_constants({name: live[name] for name in runner.get_constant_fqns()}, check_full_update=True,
                              user_managed=True)
        return _FlatCall(runner), loaded

    def _compile(self, program: torch.export.ExportedProgram, cached: Path | None) -> str:
        """Build the package; keep it in the disk cache when there is one (written whole, then renamed, so a
        concurrent reader never sees half a file)."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="dkvcache-aot-")
        path = str(Path(self._dir.name) / f"step{len(self.runners)}.pt2")
        with torch._inductor.config.patch({"aot_inductor.package_constants_in_so": False}):
            path = torch._inductor.aoti_compile_and_package(program, package_path=path)
        if cached is None:
            return path
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.tmp")
            partial.write_bytes(Path(path).read_bytes())
            os.replace(partial, cached)
        except OSError:  # a read-only or full cache directory only costs the next process a rebuild
            pass
        return path


class _FlatCall:
    """Calls a loaded package with its inputs flattened by hand: the packaged model's own ``__call__`` flattens
    and unflattens them with pytree on every call, ~0.1 ms a step on the tiny checkpoints. Our inputs are a
    fixed structure (tensors, an optional fed set, two lists), so their flat order is known."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.loader = getattr(runner, "loader", None)  # torch's loader; if a release renames it, the slow path

    def __call__(self, ids, positions, key_valid, fed_idx, keys, values, *rest) -> list[torch.Tensor]:
        if self.loader is None:
            return self.runner(ids, positions, key_valid, fed_idx, keys, values, *rest)
        flat = [ids, positions, key_valid, *([] if fed_idx is None else [fed_idx]), *keys, *values, *rest]
        return self.loader.boxed_run(flat)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the row-major strides a package's kernels assume (a copy only when it has other strides)."""
    return t if t.is_contiguous() else t.contiguous()


def cache_dir() -> Path | None:
    """Where built packages are kept between processes (None: ``DKVCACHE_CACHE=off``)."""
    root = os.environ.get("DKVCACHE_CACHE")
    if root == "off":
        return None
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dkvcache"
    return Path(root) / "aot"


def _cache_path(program: torch.export.ExportedProgram, args: tuple) -> Path | None:
    """The package file for this exported program: the printed program holds the graph, the shapes, dtypes and
    dynamic ranges of every input and the constants' names (the weights' values are not in a package); the
    inputs' strides, which the kernels are specialised to, and the thread count (serial or OpenMP kernels) are
    added."""
    root = cache_dir()
    if root is None:
        return None
    from torch._inductor import cpu_vec_isa

    flat = [t for arg in args for t in (arg if isinstance(arg, list) else [arg]) if isinstance(t, torch.Tensor)]
    strides = str([t.stride() for t in flat])
    key = "\n".join([str(program), strides, torch.__version__, str(cpu_vec_isa.pick_vec_isa()),
                     f"threads={torch.get_num_threads()}"])
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt2"


def _weights_key(model: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p.dtype, p.device, _writes(p)) for p in model.parameters())


def _writes(t: torch.Tensor) -> int:
    """The tensor's count of in-place writes (load_state_dict, an optimizer step keep its pointer); inference
    tensors (made under ``torch.inference_mode``) keep no count and cannot be written outside it: -1."""
    return -1 if t.is_inference() else t._version


def aot_step(model: nn.Module) -> AOTStep:
    """The model's :class:`AOTStep` (kept on the model as a plain attribute; rebuilt if the backend changed)."""
    existing = getattr(model, "_dkvcache_aot", None)
    if existing is None or existing.backend != BACKEND:
        existing = AOTStep(model)
        object.__setattr__(model, "_dkvcache_aot", existing)
    return existing
