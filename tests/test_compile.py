"""compile=True and the static step: same tokens as eager (AOT and torch.compile), one graph per shape or one AOT
package per call signature, at most one host read per step."""

from __future__ import annotations

import warnings

import pytest
import torch

from dkvcache import aot, capture, overhead
from dkvcache.indexing import bucket, fixed_indices, ragged_indices
from tests.conftest import left_pad, random_prompts, tiny_dream, tiny_llada

pytestmark = pytest.mark.slow  # deselect with -m "not slow" (README)

PROMPTS = [random_prompts(1, 8, seed=51)[0], random_prompts(1, 3, seed=52)[0], random_prompts(1, 6, seed=53)[0]]
MODELS = {"dream": lambda: tiny_dream(seed=11), "llada": lambda: tiny_llada(seed=12)}
CAPTURED = {
    "none": {},
    "decoded": dict(use_cache=True, cache_type="decoded", cache_steps=3),
    "prefill": dict(use_cache=True, cache_type="prefill"),
    "pd": dict(use_cache=True, cache_type="pd", cache_steps=3),
    "prefix": dict(use_cache=True, cache_type="prefix"),
    "dual": dict(use_cache=True, cache_type="dual"),
}
EAGER_ONLY = {"dllm": dict(use_cache=True, cache_type="dllm", kp=3, kr=2), "d2": dict(use_cache=True, cache_type="d2")}
THRESHOLD = {"dream": 0.1, "llada": 0.04}  # rows finish blocks at different steps on these prompts


@pytest.fixture(scope="module")
def models():
    return {family: make() for family, make in MODELS.items()}


@pytest.fixture
def aot_eager(monkeypatch):
    """Graph capture without code generation: the same traced graph in a fraction of inductor's compile time
    (torch.compile: the aot_eager backend; compile="aot": the exported program run by torch, no C++ build)."""
    monkeypatch.setattr(capture, "BACKEND", "aot_eager")
    monkeypatch.setattr(aot, "BACKEND", "export")


def _gen(model, ids, mask=None, **kwargs):
    kwargs = dict(max_new_tokens=12, steps=12, block_length=4, alg="maskgit_plus", return_dict_in_generate=True,
                  **kwargs)
    return model.diffusion_generate(ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("mode", ["aot", "inductor"])
@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("strategy", CAPTURED)
def test_compiled_equals_eager(models, aot_eager, family, strategy, mode):
    """Every capturable strategy, left-padded batch, one token a step and under a threshold."""
    model = models[family]
    ids, mask = left_pad(PROMPTS)
    for extra in ({}, {"threshold": THRESHOLD[family]}):
        eager = _gen(model, ids, mask, **CAPTURED[strategy], **extra)
        compiled = _gen(model, ids, mask, compile=mode, **CAPTURED[strategy], **extra)
        assert torch.equal(eager.sequences, compiled.sequences), extra
        assert compiled.stats["compiled"] and compiled.stats["forwards"] == eager.stats["forwards"]
        assert compiled.stats["fed_positions"] == eager.stats["fed_positions"]  # padding entries never count


@pytest.mark.parametrize("family", MODELS)
def test_aot_step_on_unpadded_prompts(models, aot_eager, family):
    """Prompts of one length: the AOT step is built to attend without a mask, and gives the eager tokens."""
    model = models[family]
    ids = torch.cat([random_prompts(1, 6, seed=61), random_prompts(1, 6, seed=62)])
    for strategy in ("none", "decoded", "dual"):
        for extra in ({}, {"threshold": THRESHOLD[family]}):
            eager = _gen(model, ids, **CAPTURED[strategy], **extra)
            compiled = _gen(model, ids, compile=True, **CAPTURED[strategy], **extra)
            assert torch.equal(eager.sequences, compiled.sequences), (strategy, extra)
    assert any(signature[5] for signature in aot.aot_step(model).runners)  # the unmasked build ran


@pytest.mark.parametrize("family", MODELS)
def test_aot_builds_one_package_per_call_signature(models, aot_eager, family):
    """compile=True on CPU is the AOT step: fed and candidate widths are dynamic, so a call builds one package
    (a cached strategy's full forwards included), a second call with the same shapes and settings none, and a
    strategy with the same signature reuses it; sampling noise is data."""
    model = models[family]
    object.__setattr__(model, "_dkvcache_aot", None)
    ids, mask = left_pad(PROMPTS)
    sampling = dict(temperature=0.8, top_p=0.9, seed=5)
    eager = _gen(model, ids, mask, **sampling, **CAPTURED["dual"])
    first = _gen(model, ids, mask, compile=True, **sampling, **CAPTURED["dual"])
    again = _gen(model, ids, mask, compile=True, **sampling, **CAPTURED["decoded"])
    assert torch.equal(eager.sequences, first.sequences)
    assert torch.equal(_gen(model, ids, mask, **sampling, **CAPTURED["decoded"]).sequences, again.sequences)
    assert first.stats["compiled_shapes"] == 1 and first.stats["compile_s"] > 0
    assert again.stats["compiled_shapes"] == 0 and again.stats["compile_s"] == 0.0
    assert _gen(model, ids, mask, compile=True, **sampling).stats["compiled_shapes"] == 1  # no K/V: its own
    threads = torch.get_num_threads()
    try:  # kernels built for one thread are serial: another thread count gets its own package
        torch.set_num_threads(threads + 1)
        assert _gen(model, ids, mask, compile=True, **sampling, **CAPTURED["dual"]).stats["compiled_shapes"] == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["aot", "inductor"])
@pytest.mark.parametrize("family", MODELS)
def test_compiled_step_chooses_and_writes_for_the_vanilla_rule(models, aot_eager, family, mode):
    """With the plain vanilla rule the compiled step also chooses and writes (dkvcache.commit), under the
    schedule, a threshold and a factor, with classifier-free guidance, and gives the eager tokens; a decoder with
    its own choice, random order, sampled positions or the certainty prior, and dKV greedy's own order keep the
    choice in Python."""
    model = models[family]
    ids, mask = left_pad(PROMPTS)
    base = dict(max_new_tokens=12, steps=12, block_length=4, alg="maskgit_plus", return_dict_in_generate=True)
    dual = CAPTURED["dual"]
    fused = [{**dual}, {**dual, "threshold": THRESHOLD[family]}, {**dual, "factor": 1.5},
             {**dual, "factor": 1.5, "factor_rule": "fast_dllm"}, {"cfg_scale": 1.0}]
    kept = [{**dual, "decoding": "klass"}, {**dual, "alg_temp": 0.5, "seed": 3}, {**dual, "sigma": 2.0}]
    if family == "dream":
        kept.append({**dual, "alg": "origin", "seed": 3})
    else:
        kept.append(dict(use_cache=True, cache_type="greedy", cache_steps=2, seed=4, alg="random"))
    for extra in fused + kept:
        kwargs = {**base, **extra}
        eager = model.diffusion_generate(ids, attention_mask=mask, **kwargs)
        compiled = model.diffusion_generate(ids, attention_mask=mask, compile=mode, **kwargs)
        assert torch.equal(eager.sequences, compiled.sequences), extra
        assert compiled.stats["compiled"] and compiled.stats["compiled_choice"] == (extra in fused), extra


def test_rule_value_compares_as_the_python_float():
    """The threshold/factor fed to a compiled step as a 0-d float64 tensor rounds like the Python float against
    float32 scores, so the choice is the same at the boundary."""
    from dkvcache.commit import rule_value
    from dkvcache.sampling import prefix_count

    scores = torch.tensor([[0.9, 0.30000001192092896, 0.3, 0.2999999]], dtype=torch.float32)
    valid = torch.ones_like(scores, dtype=torch.bool)
    for threshold, factor in ((0.3, None), (None, 1.4), (None, 2.1)):
        value = rule_value(threshold, factor, scores.device)
        as_tensor = prefix_count(scores, valid, value if threshold is not None else None,
                                 value if factor is not None else None)
        assert torch.equal(as_tensor, prefix_count(scores, valid, threshold, factor)), (threshold, factor)


def test_aot_packages_follow_the_weights(models, aot_eager):
    """A package reads the model's parameters in place; replacing them drops the packages built on the old ones."""
    model = tiny_dream(seed=14)
    ids = PROMPTS[0][None]
    _gen(model, ids, compile=True, **CAPTURED["dual"])
    with torch.no_grad():
        model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight * 2)
    rebuilt = _gen(model, ids, compile=True, **CAPTURED["dual"])
    assert rebuilt.stats["compiled_shapes"] == 1
    assert torch.equal(rebuilt.sequences, _gen(model, ids, **CAPTURED["dual"]).sequences)


def test_compile_option_is_checked(models):
    model = models["dream"]
    with pytest.raises(ValueError, match=r"compile='fast' is invalid; allowed: True, False or one of \['aot'"):
        _gen(model, PROMPTS[0][None], compile="fast")
    with pytest.raises(ValueError, match="compile=1 is invalid"):
        _gen(model, PROMPTS[0][None], compile=1)
    assert capture.mode(True, torch.device("cpu")) == "aot" and capture.mode(False, torch.device("cpu")) is None
    assert capture.mode(True, torch.device("cuda")) == "inductor"
    with pytest.raises(ValueError, match="compile='aot' runs on CPU"):
        capture.mode("aot", torch.device("cuda"))


@pytest.mark.parametrize("family", MODELS)
def test_compiled_sampling_equals_eager_without_a_graph_per_step(models, aot_eager, family):
    """compile="inductor": the step's head (logits at the candidates, proposals) is compiled too; under sampling
    its noise coordinate is data, so the whole call compiles one graph per shape, and a second call none."""
    model = models[family]
    ids, mask = left_pad(PROMPTS)
    sampling = dict(temperature=0.8, top_p=0.9, seed=5, use_cache=True, cache_type="dual")
    eager = _gen(model, ids, mask, **sampling)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    first = _gen(model, ids, mask, compile="inductor", **sampling)
    added = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    again = _gen(model, ids, mask, compile="inductor", **sampling)
    assert torch.equal(eager.sequences, first.sequences) and torch.equal(eager.sequences, again.sequences)
    assert 2 <= added == first.stats["compiled_shapes"] < first.stats["steps"]  # forward + head shapes only
    assert again.stats["compiled_shapes"] == 0


def test_one_graph_per_shape_with_kv_buffers(aot_eager):
    """dynamo compiles exactly the shapes the step asks for: nothing left on the K/V buffers between forwards
    (once a cached scatter index) makes it compile a second graph for a shape it already has."""
    torch._dynamo.reset()  # dynamo shares graphs between same-sized models (their weights are inputs): start clean
    model = tiny_dream(seed=13)
    ids, mask = left_pad(PROMPTS)
    decoded = dict(use_cache=True, cache_type="decoded", cache_steps=3)
    for call in range(2):
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        out = _gen(model, ids, mask, compile="inductor", **decoded)
        added = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        assert added == out.stats["compiled_shapes"] and (added >= 3 if call == 0 else added == 0)


@pytest.mark.parametrize("mode", ["aot", "inductor"])
@pytest.mark.parametrize("family", MODELS)
def test_real_backends_compile_the_dual_step(models, family, mode, tmp_path, monkeypatch):
    """The real backends (AOTInductor's C++ package; inductor's code generation) on one strategy per family:
    same tokens, compile time reported apart, and a second call reuses what was compiled."""
    monkeypatch.setenv("DKVCACHE_CACHE", str(tmp_path))  # an empty package cache: this test builds
    model = models[family]
    object.__setattr__(model, "_dkvcache_aot", None)
    ids, mask = left_pad(PROMPTS)  # a padded batch: rows must not read each other's fed set (strides)
    eager = _gen(model, ids, mask, **CAPTURED["dual"])
    first = _gen(model, ids, mask, compile=mode, **CAPTURED["dual"])
    again = _gen(model, ids, mask, compile=mode, **CAPTURED["dual"])
    assert torch.equal(eager.sequences, first.sequences) and torch.equal(eager.sequences, again.sequences)
    assert first.stats["compiled_shapes"] >= 1 and first.stats["compile_s"] > 0
    assert again.stats["compiled_shapes"] == 0 and again.stats["compile_s"] == 0.0
    if mode == "aot":  # another process (here: a fresh model object) loads the package from the disk cache
        assert len(list((tmp_path / "aot").glob("*.pt2"))) == 1
        # the forward, head and choice are one C++ call: Python issues only the step's index ops around it
        with overhead.count_host_reads() as reads:
            counted = _gen(model, ids, mask, compile=mode, **CAPTURED["dual"])
        assert reads.calls < 40 * counted.stats["steps"], reads.calls / counted.stats["steps"]
        object.__setattr__(model, "_dkvcache_aot", None)
        loaded = _gen(model, ids, mask, compile=mode, **CAPTURED["dual"])
        assert loaded.stats["loaded_packages"] == 1 and loaded.stats["compiled_shapes"] == 0
        assert torch.equal(eager.sequences, loaded.sequences)
        # The same package with a ragged fed set that differs between rows (decoded, one 12-token block): it
        # was built from a stride-0 (expanded) fed set, and rows once read row 0's indices.
        single_block = dict(max_new_tokens=12, steps=12, alg="maskgit_plus", **CAPTURED["decoded"])
        eager = model.diffusion_generate(ids, attention_mask=mask, **single_block)
        compiled = model.diffusion_generate(ids, attention_mask=mask, compile=mode, return_dict_in_generate=True,
                                            **single_block)
        assert torch.equal(eager, compiled.sequences) and compiled.stats["compiled_shapes"] == 0
        # Every K/V strategy shares the package; the threshold rule is another one (its value is data, so one
        # build serves every threshold)
        built = 0
        for extra in ({}, {"threshold": THRESHOLD[family]}, {"threshold": 0.5}):
            for strategy in ("decoded", "prefill", "pd", "prefix"):
                compiled = _gen(model, ids, mask, compile=mode, **CAPTURED[strategy], **extra)
                assert torch.equal(_gen(model, ids, mask, **CAPTURED[strategy], **extra).sequences,
                                   compiled.sequences), (strategy, extra)
                built += compiled.stats["compiled_shapes"]
        assert built == 1
        # unpadded rows: a package of its own, attending without a mask
        same_length = torch.cat([random_prompts(1, 6, seed=63), random_prompts(1, 6, seed=64)])
        compiled = _gen(model, same_length, compile=mode, **CAPTURED["decoded"])
        assert torch.equal(_gen(model, same_length, **CAPTURED["decoded"]).sequences, compiled.sequences)
        assert compiled.stats["compiled_shapes"] == 1


def test_static_kv_pool(models):
    """CUDA graphs need the K/V buffers at static addresses: one pooled set per (batch, length), marked static,
    reused (zeroed) by the next call once the previous one gave it back; a call running meanwhile gets its own."""
    model = tiny_dream(seed=15)
    first = capture.step_kv(model, 2, 9)
    assert all(t._dynamo_static_input_type == "unguarded" for t in (*first.keys, *first.values))
    first.keys[0].fill_(1.0)
    meanwhile = capture.step_kv(model, 2, 9)
    assert meanwhile.keys[0].data_ptr() != first.keys[0].data_ptr()
    capture.release_kv(model, first)
    again = capture.step_kv(model, 2, 9)
    assert again.keys[0].data_ptr() == first.keys[0].data_ptr() and not again.keys[0].any()
    assert capture.step_kv(model, 1, 9).keys[0].shape[0] == 1  # another shape: another set


def test_pooled_static_kv_gives_the_eager_tokens(models, aot_eager, monkeypatch):
    """The CUDA path's K/V handling (static-marked, pooled, reused across calls) run on CPU under torch.compile."""
    from dkvcache import generation

    monkeypatch.setattr(generation, "_static_kv", lambda state: state.capture_mode == "inductor")
    model = models["llada"]
    ids, mask = left_pad(PROMPTS)
    eager = _gen(model, ids, mask, **CAPTURED["decoded"])
    for _ in range(2):
        out = _gen(model, ids, mask, compile="inductor", **CAPTURED["decoded"])
        assert torch.equal(eager.sequences, out.sequences)
    assert len(model._dkvcache_kv_pool.free) == 1


def test_aot_build_failure_says_what_is_needed(monkeypatch, tmp_path):
    """No C++ compiler (or any build error): a RuntimeError that names the cause and the way out."""
    monkeypatch.setenv("DKVCACHE_CACHE", str(tmp_path))

    def no_compiler(*args, **kwargs):
        raise FileNotFoundError("g++: not found")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    model = tiny_dream(seed=16)
    with pytest.raises(RuntimeError, match=r"building the AOT step failed \(FileNotFoundError: g\+\+: not found\)"
                                           r".*needs a C\+\+ compiler.*compile=False"):
        _gen(model, PROMPTS[0][None], compile=True, **CAPTURED["dual"])


def test_flat_call_without_torch_loader_uses_the_runner():
    calls = []

    class Runner:  # a loaded package without the ``loader`` attribute the fast path uses
        def __call__(self, *args):
            calls.append(args)
            return ["out"]

    assert aot._FlatCall(Runner())("ids", "pos", "valid", None, [], [], "source") == ["out"]
    assert calls == [("ids", "pos", "valid", None, [], [], "source")]


def test_aot_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("DKVCACHE_CACHE", "off")
    assert aot.cache_dir() is None
    monkeypatch.setenv("DKVCACHE_CACHE", str(tmp_path))
    assert aot.cache_dir() == tmp_path / "aot"
    monkeypatch.delenv("DKVCACHE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert aot.cache_dir() == tmp_path / "xdg" / "dkvcache" / "aot"


@pytest.mark.parametrize("strategy", EAGER_ONLY)
def test_uncapturable_strategies_fall_back_with_a_notice(models, aot_eager, strategy, monkeypatch):
    monkeypatch.setattr(capture, "_NOTICED", set())
    model = models["llada"]
    ids = PROMPTS[0][None]
    with pytest.warns(UserWarning, match=f"running eagerly because cache_type={strategy!r}"):
        out = _gen(model, ids, compile=True, **EAGER_ONLY[strategy])
    assert out.stats["compiled"] is False
    assert torch.equal(out.sequences, _gen(model, ids, **EAGER_ONLY[strategy]).sequences)


@pytest.mark.parametrize("family", MODELS)
def test_layer_stack_traces_into_one_graph(models, family):
    """torch._dynamo captures the whole partial forward with no graph break, with and without K/V buffers."""
    model = models[family]
    length = 10
    ids = torch.randint(0, 60, (2, length))
    positions = torch.arange(length).expand(2, -1)
    valid = torch.ones(2, length, dtype=torch.bool)
    kv = model.allocate_kv(2, length)
    fed = torch.tensor([[3, 4, 5, length], [2, 6, length, length]])
    with torch.no_grad():
        for call in (lambda: model.partial_forward(ids, positions, valid),
                     lambda: model.partial_forward(ids, positions, valid, fed_idx=fed, kv=kv)):
            explained = torch._dynamo.explain(call)()
            assert explained.graph_count == 1 and explained.graph_break_count == 0


# dLLM-Cache branches per layer (verify or not, everything recomputed or not, how many rows): read with the
# step's one synchronisation, not per layer.
HOST_READ_EXTRA = {"dllm": EAGER_ONLY["dllm"], "dllm-verify": dict(EAGER_ONLY["dllm"], rou=0.25),
                   "greedy": dict(use_cache=True, cache_type="greedy", remasking="random"),
                   **{name: dict(decoding=name) for name in ("wino", "eb_sampler", "klass", "ar")}}


@pytest.mark.parametrize("family,strategy", [(f, s) for f in MODELS for s in CAPTURED]
                         + [("llada", "greedy"), ("dream", "dllm"), ("llada", "dllm"), ("dream", "dllm-verify")]
                         + [(f, d) for f in MODELS for d in ("wino", "eb_sampler", "klass", "ar")])
def test_at_most_one_host_read_per_step(models, family, strategy):
    """The step's one synchronisation (the candidate and fed widths) plus a few per call (stats)."""
    kwargs = dict(CAPTURED[strategy] if strategy in CAPTURED else HOST_READ_EXTRA[strategy])
    if strategy == "greedy":
        kwargs.pop("alg", None)
    model = models[family]
    ids, mask = left_pad(PROMPTS)
    with overhead.count_host_reads() as reads:
        out = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=12, steps=12, block_length=4,
                                       return_dict_in_generate=True,
                                       **({"alg": "maskgit_plus"} if strategy != "greedy" else {}), **kwargs)
    # input checks (5), row seeds (1), stats (3; dLLM-Cache's recompute count and WINO's re-mask count one more);
    # everything else is the step's one read
    per_call = 9 + (strategy.startswith("dllm") or strategy == "wino")
    assert reads.count <= out.stats["steps"] + per_call, reads.count


@pytest.mark.parametrize("family", MODELS)
def test_aot_step_computes_the_rotary_tables_once_per_call(models, aot_eager, monkeypatch, family):
    """The AOT step is given cos/sin of every position, computed once per call (with and without classifier-free
    guidance) rather than once per layer inside the package; the tokens stay the eager ones."""
    from dkvcache import generation

    calls = []
    original = generation.rotary_cos_sin
    monkeypatch.setattr(generation, "rotary_cos_sin", lambda *a: calls.append(a[0].shape) or original(*a))
    model = models[family]
    ids, mask = left_pad(PROMPTS)
    for extra in (CAPTURED["decoded"], {"cfg_scale": 1.0}):  # guidance runs without a cache
        calls.clear()
        compiled = _gen(model, ids, mask, compile=True, **extra)
        assert torch.equal(compiled.sequences, _gen(model, ids, mask, **extra).sequences)
        assert calls == [(ids.shape[0] * (2 if "cfg_scale" in extra else 1), ids.shape[1] + 12)], calls


def test_host_read_counter_counts():
    with overhead.count_host_reads() as reads:
        t = torch.arange(4)
        t.tolist(), t[0].item(), bool(t.any())
        t.shape, t.dim(), t.is_contiguous()  # metadata: not calls
    assert reads.count == 3
    assert reads.calls == 6  # arange, tolist, getitem, item, any, bool


def test_bucket_and_fixed_indices():
    assert [bucket(n, 40) for n in (0, 1, 2, 3, 5, 17, 33, 40)] == [0, 1, 2, 4, 8, 32, 40, 40]
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 13, generator=gen) < 0.4
    ragged, valid = ragged_indices(mask, pad_value=13)
    fixed, fixed_valid = fixed_indices(mask, bucket(ragged.shape[1], 13), pad_value=13)
    assert torch.equal(fixed[:, : ragged.shape[1]], ragged) and (fixed[:, ragged.shape[1]:] == 13).all()
    assert torch.equal(fixed_valid[:, : ragged.shape[1]], valid)
    # against a plain per-row reference: a block's mask with its start offset, and a width wider than the mask
    for start, width in ((0, 13), (7, 9), (20, 16)):
        pos, ok = fixed_indices(mask, width, pad_value=99, start=start)
        for row, row_mask in enumerate(mask.tolist()):
            expect = [start + j for j, m in enumerate(row_mask) if m][:width]
            expect += [99] * (width - len(expect))
            assert pos[row].tolist() == expect and ok[row].tolist() == [p != 99 for p in expect]


def test_recorded_forward_shapes_and_floor(models):
    """The floor replays the shapes the run really fed: no cache feeds every position each step; dual feeds
    the whole sequence at each block's first step, then the block (plus, for Dream, the position before it)."""
    for family, model in models.items():
        ids = PROMPTS[0][None]
        length = ids.shape[1] + 12
        with overhead.recorded_forwards(model) as shapes:
            out = _gen(model, ids)
        assert shapes == [(1, length, length)] * out.stats["forwards"]
        with overhead.recorded_forwards(model) as shapes:
            out = _gen(model, ids, **CAPTURED["dual"])
        fed = 4 + (family == "dream")
        assert shapes == ([(1, length, length + 1)] + [(1, fed, length + 1)] * 3) * 3, shapes
        assert "partial_forward" not in vars(model)  # the recording is undone
        assert 0 < overhead.compute_floor_ms(model, 1, fed, length + 1, repeats=2)


def test_overhead_report_runs(models, aot_eager):
    row = overhead.measure(models["dream"], PROMPTS[0][None], "dual", gen=32, repeats=1)
    assert row["compiled"] and row["aten_per_step"] > row["aten_per_layer"] > 0
    assert row["floor_ms_per_step"] > 0 and row["max_speedup"] > 0 and row["efficiency_compiled"] > 0
    assert 0 < row["host_reads_per_step"] <= 2 and 0 < row["fed_fraction"] < 1
    assert row["python_calls_per_step_compiled"] > 0  # (the exported graph runs in Python here; real build below)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert overhead.measure(models["dream"], PROMPTS[0][None], "dllm", gen=32, repeats=1)["compiled"] is False


@pytest.mark.parametrize("family", MODELS)
def test_aot_step_with_one_token_blocks(models, aot_eager, family):
    """A 1-token block is narrower than the AOT step's minimum candidate width (2): the candidate set is padded
    past the block and still gives the eager tokens."""
    model = models[family]
    ids, mask = left_pad(PROMPTS)
    kwargs = dict(max_new_tokens=4, steps=4, block_length=1, alg="maskgit_plus", return_dict_in_generate=True)
    eager = model.diffusion_generate(ids, attention_mask=mask, **kwargs)
    compiled = model.diffusion_generate(ids, attention_mask=mask, compile=True, **kwargs)
    assert torch.equal(eager.sequences, compiled.sequences) and compiled.stats["compiled_choice"]
