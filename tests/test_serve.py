"""The OpenAI-compatible server, driven by the official ``openai`` client over loopback.

Runs the shipped tiny Dream checkpoint in float64, so "identical to its single run" is exact: a request's text
must not change when it joins a busy batch at any point.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest
import torch
import uvicorn

from dkvcache.serve import build_engine, create_app
from dkvcache.serve.loadtest import free_port, start_server
from dkvcache.serve.protocol import CompletionRequest, RequestError
from dkvcache.tasks import arith

MODEL = "assets/tiny-dream"
QUESTIONS = [row["question"] for row in arith.load_jsonl(limit=8)]
# Four blocks of 16: requests arriving mid-way join at the next of three boundaries.
MULTI_BLOCK = {"block_length": 16}


class LiveServer:
    """uvicorn in a thread on a free loopback port (the same engine object stays reachable for checks)."""

    def __init__(self, model: str = MODEL, **engine_kwargs) -> None:
        self.engine = build_engine(model, dtype="float64", **engine_kwargs)
        self.port = free_port()
        config = uvicorn.Config(create_app(self.engine), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="local", max_retries=0, **kwargs)

    def wait_idle(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            load = self.engine.scheduler.load()
            if load["running"] == 0 and load["groups"] == 0 and load["queued"] == 0:
                return load
            time.sleep(0.05)
        raise AssertionError(f"server still busy: {self.engine.scheduler.load()}")


@pytest.fixture(scope="module")
def live():
    with LiveServer(max_batch=8) as server:
        yield server


def _chat_ids(engine, question: str) -> list[int]:
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def single_run_text(engine, question: str, seed: int, **settings) -> str:
    """What ``diffusion_generate`` gives this prompt alone (batch 1), cut at the first end token."""
    ids = _chat_ids(engine, question)
    kwargs = CompletionRequest(prompt="-", **settings).diffusion_settings(engine.defaults)  # the server's mapping
    out = engine.model.diffusion_generate(torch.tensor([ids]), seed=seed, **kwargs)
    tokens = out[0, len(ids):].tolist()
    ends = engine.scheduler.end_ids
    cut = next((i for i, t in enumerate(tokens) if t in ends), len(tokens))
    return engine.tokenizer.decode(tokens[:cut], skip_special_tokens=True)


def test_models_and_health(live):
    client = live.client()
    assert [m.id for m in client.models.list().data] == ["tiny-dream"]
    with urllib.request.urlopen(f"http://127.0.0.1:{live.port}/health", timeout=5) as response:
        health = json.load(response)
    assert health["status"] == "ok" and {"running", "queued", "groups"} <= set(health)


def test_chat_answers_and_reports_usage(live):
    client = live.client()
    question = QUESTIONS[0]
    reply = client.chat.completions.create(model="tiny-dream", messages=[{"role": "user", "content": question}],
                                           seed=3)
    text = reply.choices[0].message.content
    assert text == single_run_text(live.engine, question, seed=3)
    assert arith.is_correct(text, arith.load_jsonl(limit=1)[0]["answer"])
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage.model_dump()
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] == len(_chat_ids(live.engine, question))
    assert usage["forwards"] == 64 and usage["tokens_per_forward"] == pytest.approx(usage["completion_tokens"] / 64)


def test_completion_with_diffusion_knobs(live):
    client = live.client()
    reply = client.completions.create(model="tiny-dream", prompt="Tom has 7 apples", max_tokens=32, seed=1,
                                      extra_body={"cache_type": "dual", "threshold": 0.9, "block_length": 16})
    usage = reply.usage.model_dump()
    assert usage["forwards"] < 32  # the threshold decoded several tokens per forward
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streaming_sends_each_block_and_matches_the_whole(live):
    client = live.client()
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    whole = client.chat.completions.create(model="m", messages=messages, seed=5, extra_body=MULTI_BLOCK)
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model="m", messages=messages, seed=5, stream=True,
                                                extra_body=MULTI_BLOCK):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        usage = chunk.usage or usage
    assert len(pieces) >= 2, "one text chunk per finished block"
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == "stop" and usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_cut_the_text(live):
    client = live.client()
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           stop=["#"])
    assert "#" not in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"


def test_concurrent_requests_equal_their_single_runs(live):
    """Sampling with per-request seeds, staggered arrivals: every request joins a busy batch somewhere."""
    live.wait_idle()
    settings = {**MULTI_BLOCK, "temperature": 0.7}
    jobs = [(QUESTIONS[i % len(QUESTIONS)], 100 + i) for i in range(10)]
    expected = [single_run_text(live.engine, q, seed, **settings) for q, seed in jobs]
    before = dict(live.engine.scheduler.counters)
    client = live.client()

    def ask(index: int) -> str:
        time.sleep(0.15 * index)  # arrive while earlier requests are mid-way
        question, seed = jobs[index]
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                               seed=seed, temperature=0.7, extra_body=MULTI_BLOCK)
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, range(len(jobs))))
    assert got == expected
    counters = live.engine.scheduler.counters
    assert counters["joined_running"] > before["joined_running"], "no request joined a running batch"
    assert counters["max_rows"] >= 2


POOLED = [
    {"block_length": 16},  # no cache
    {"cache_type": "dual", "block_length": 16},
    {"cache_type": "prefix", "block_length": 16, "threshold": 0.9},  # rows finish blocks at different steps
]
GAPS = [0.1, 0.05, 0.01]  # a threshold decodes a request in a few steps: arrivals must be closer to overlap


def _staggered(server: LiveServer, jobs: list[tuple[str, int]], settings: dict, gap: float = 0.1) -> list[str]:
    client = server.client()

    def ask(index: int) -> str:
        time.sleep(gap * index)  # arrive while earlier requests are mid-way
        question, seed = jobs[index]
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                               seed=seed, extra_body=settings)
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(ask, range(len(jobs))))


@pytest.mark.parametrize(("settings", "gap"), list(zip(POOLED, GAPS, strict=True)),
                         ids=["none", "dual", "prefix-threshold"])
def test_pooled_requests_equal_their_single_runs(live, settings, gap):
    """Greedy settings share one batch re-formed at every block boundary: joins, leaves and right padding."""
    live.wait_idle()
    jobs = [(QUESTIONS[i % len(QUESTIONS)], i) for i in range(8)]
    expected = [single_run_text(live.engine, q, seed, **settings) for q, seed in jobs]
    before = dict(live.engine.scheduler.counters)
    assert _staggered(live, jobs, settings, gap) == expected
    counters = live.engine.scheduler.counters
    assert counters["joined_running"] > before["joined_running"], "no request joined a running batch"
    assert counters["groups_started"] - before["groups_started"] < len(jobs), "requests were not pooled"


def test_pooled_batches_of_the_same_shape_reuse_the_kv_buffers(live):
    """A lone request keeps its batch shape from block to block: the next batch takes over the K/V buffers."""
    before = live.wait_idle()["kv_reused"]
    settings = {"cache_type": "dual", "block_length": 16}
    text = live.client().chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTIONS[2]}],
                                                 seed=0, extra_body=settings).choices[0].message.content
    assert text == single_run_text(live.engine, QUESTIONS[2], 0, **settings)
    assert live.wait_idle()["kv_reused"] > before


def test_pooled_llada_requests_equal_their_single_runs():
    with LiveServer("assets/tiny-llada", max_batch=8, max_new_tokens=64, steps=64) as server:
        settings = {"cache_type": "dual", "block_length": 16}
        jobs = [(QUESTIONS[i % len(QUESTIONS)], i) for i in range(6)]
        expected = [single_run_text(server.engine, q, seed, **settings) for q, seed in jobs]
        assert _staggered(server, jobs, settings) == expected
        assert server.engine.scheduler.counters["joined_running"] > 0


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"extra_body": {"block_length": 7}}, "block_length"),
    ({"temperature": -1}, "temperature"),
    ({"extra_body": {"cache_type": "bogus"}}, "cache_type"),
    ({"extra_body": {"output_history": True}}, "output_history"),
    ({"extra_body": {"n": 2}}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"steps": 3, "block_length": 16}}, "steps"),
])
def test_bad_parameters_are_400_naming_the_field(live, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        live.client().completions.create(model="m", prompt="hi", **kwargs)
    error = caught.value.body
    assert error["param"] == param, error
    assert param in error["message"]


def test_protocol_maps_openai_fields():
    body = CompletionRequest(prompt="x", max_tokens=32, temperature=0.5, top_p=1.0, threshold=0.9,
                             cache_type="dual")
    settings = body.diffusion_settings({"alg": "entropy", "steps": 64})
    assert settings == {"steps": 64, "max_new_tokens": 32, "temperature": 0.5, "top_p": None, "threshold": 0.9,
                        "cache_type": "dual", "use_cache": True}  # a threshold without alg drops "entropy"
    with pytest.raises(RequestError, match="stop"):
        CompletionRequest(prompt="x", stop=["a", "b", "c", "d", "e"]).stop_strings()


def test_queue_full_is_429_with_retry_after():
    with LiveServer(max_batch=1, max_queue=1) as server:
        client = server.client()

        def ask(_):
            try:
                client.completions.create(model="m", prompt="Tom has 7 apples", max_tokens=64)
                return None
            except openai.RateLimitError as error:
                return error

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(ask, range(6)))
        refused = [e for e in outcomes if e is not None]
        assert refused and len(refused) < 6
        assert refused[0].response.headers["retry-after"] == "1"


def test_disconnects_free_the_row_and_timeouts_are_504():
    with LiveServer(max_batch=4, request_timeout_s=None) as server:
        # A streaming client that leaves after the first block.
        stream = server.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": QUESTIONS[0]}], stream=True,
            max_tokens=256, extra_body={"block_length": 16, "steps": 256})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        stream.close()
        load = server.wait_idle(timeout=15)
        assert load["groups_completed"] == 1
        # A non-streaming client that gives up: its row is freed too.
        with pytest.raises(openai.APITimeoutError):
            server.client(timeout=0.5).completions.create(model="m", prompt="Tom", max_tokens=256,
                                                          extra_body={"steps": 256})
        server.wait_idle(timeout=15)
        assert server.engine.scheduler.counters["groups_completed"] == 2
    with LiveServer(request_timeout_s=0.3) as server:
        with pytest.raises(openai.APIStatusError) as caught:
            server.client().completions.create(model="m", prompt="Tom", max_tokens=256, extra_body={"steps": 256})
        assert caught.value.status_code == 504


def test_sigterm_drains_accepted_requests_then_exits():
    port = free_port()
    proc = start_server(MODEL, port, ["--max-batch", "4"])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0)

    def ask(question: str) -> str:
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                               extra_body={"block_length": 16})
        return reply.choices[0].message.content

    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(ask, q) for q in QUESTIONS[:3]]
            time.sleep(0.5)  # accepted and running
            os.kill(proc.pid, signal.SIGTERM)
            texts = [f.result(timeout=60) for f in futures]
        assert all("####" in t for t in texts)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(("flags", "named"), [(["--block-length", "7"], "block_length"),
                                              (["--threads", "0"], "threads")])
def test_cli_refuses_a_bad_setting(flags, named):
    result = subprocess.run([sys.executable, "-m", "dkvcache.serve", "--model", MODEL, *flags],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and named in result.stderr


def test_load_test_reports_every_mode():
    from dkvcache.serve import loadtest

    result = loadtest.run(MODEL, clients=2, requests=4, max_batch=2, modes=["continuous", "one-at-a-time"],
                          settings={"cache_type": "dual", "block_length": 16})
    assert set(result["rows"]) == {"continuous", "one-at-a-time"}
    for row in result["rows"].values():
        assert row["requests"] == 4 and row["requests_per_s"] > 0 and row["latency_p99_s"] >= row["latency_p50_s"]
    assert result["rows"]["one-at-a-time"]["speedup_requests_per_s"] == 1.0
    assert "one-at-a-time" in loadtest.table(result) and result["p99_bound_s"] > 0


def test_report_holds_back_a_possible_stop_prefix():
    """A stop string split across two blocks is never half-streamed: the streamed pieces add up to the answer."""
    from dkvcache.serve.groups import Row, report
    from dkvcache.serve.jobs import Job

    events = []
    row = Row(Job(prompt_ids=[1], settings={}, seed=0, sink=events.append, stop=("#END",)))

    class Chars:  # token i is chr(i)
        @staticmethod
        def decode(tokens, skip_special_tokens=True):
            return "".join(map(chr, tokens))

    report(row, [ord(c) for c in "abc#E"], False, 1, Chars, end_ids=set())
    assert [e.text for e in events] == ["abc"]  # "#E" could begin "#END": held back
    report(row, [ord(c) for c in "abc#ENDxyz"], False, 2, Chars, end_ids=set())
    assert events[-1].kind == "done" and events[-1].text == "abc" and events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events if e.kind == "text") == "abc"
