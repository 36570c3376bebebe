"""The HTTP layer: FastAPI routes in the OpenAI shape over one :class:`~dkvcache.serve.scheduler.Scheduler`.

Errors follow OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 names the bad field (the
generation settings are validated here, before the request is queued), 429 with ``Retry-After`` when the queue
is full, 503 while shutting down, 504 past the request timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from dkvcache.resolve import check_inputs_fit, resolve
from dkvcache.serve.jobs import Event, Job, QueueFull
from dkvcache.serve.protocol import ChatRequest, CompletionRequest, RequestError
from dkvcache.serve.scheduler import Scheduler

# Names that ``diffusion_generate`` reports but a client knows under its OpenAI name.
_OPENAI_NAMES = {"max_new_tokens": "max_tokens"}
_DISCONNECT_POLL_S = 0.25


@dataclass
class Engine:
    """What the routes share: the model, its tokenizer, the scheduler and the server's generation defaults."""

    model: Any
    tokenizer: Any
    scheduler: Scheduler
    name: str
    defaults: dict[str, Any] = field(default_factory=dict)
    request_timeout_s: float | None = 600.0
    created: int = field(default_factory=lambda: int(time.time()))


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 429: "rate_limit_error", 504: "timeout"}.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param_of(message: str) -> str | None:
    """The field a ``diffusion_generate`` validation message is about (``block_length=32 is invalid`` …)."""
    found = re.search(r"(?:diffusion_generate: |^)([a-z_]+)[=: ]", message) or re.search(r"\['([a-z_]+)'", message)
    name = found.group(1) if found else None
    return _OPENAI_NAMES.get(name, name)


def _rename(message: str) -> str:
    for ours, theirs in _OPENAI_NAMES.items():
        message = message.replace(ours, theirs)
    return message


def _prompt_ids(engine: Engine, body: CompletionRequest | ChatRequest) -> list[int]:
    tok = engine.tokenizer
    if isinstance(body, ChatRequest):
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    elif isinstance(body.prompt, str):
        ids = tok(body.prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = list(body.prompt)
    if not ids:
        raise RequestError("the prompt is empty", "messages" if isinstance(body, ChatRequest) else "prompt")
    return ids


def _make_job(engine: Engine, body: CompletionRequest | ChatRequest, sink: Any) -> Job:
    """Validate everything (RequestError naming the field) and build the job; nothing is queued yet."""
    ids = _prompt_ids(engine, body)
    settings = body.diffusion_settings(engine.defaults)
    stop = body.stop_strings()
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    try:
        opts = resolve(engine.model, len(ids), **settings, seed=seed)
        check_inputs_fit(engine.model, torch.tensor([ids]), opts)
    except (ValueError, TypeError) as error:
        message = _rename(str(error).replace("diffusion_generate: ", ""))
        raise RequestError(message, _param_of(str(error))) from error
    return Job(prompt_ids=ids, settings=settings, seed=seed, sink=sink, stop=stop,
               timeout_s=engine.request_timeout_s)


def _submit(engine: Engine, body: CompletionRequest | ChatRequest) -> tuple[Job, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = _make_job(engine, body, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    engine.scheduler.submit(job)
    return job, events


def _chunk(kind: str, rid: str, engine: Engine, text: str | None, finish: str | None, first: bool) -> dict:
    if kind == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": engine.name,
                "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": engine.name,
            "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}


async def _stream(engine: Engine, kind: str, job: Job, events: asyncio.Queue) -> AsyncIterator[str]:
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    first = True
    try:
        while True:
            event = await events.get()
            if event.kind == "error":
                yield f"data: {json.dumps({'error': {'message': event.text, 'code': event.status}})}\n\n"
                break
            if event.kind == "text":
                yield f"data: {json.dumps(_chunk(kind, rid, engine, event.text, None, first))}\n\n"
                first = False
                continue
            final = _chunk(kind, rid, engine, None, event.finish_reason, first)
            final["usage"] = event.usage.as_dict()
            yield f"data: {json.dumps(final)}\n\n"
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that went away frees its row at the next step


async def _wait_final(request: Request, job: Job, events: asyncio.Queue) -> Event | None:
    """The request's final event, or None when the client disconnected first (its row is freed)."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if event.kind in ("done", "error"):
                return event
    finally:
        job.cancelled.set()


async def _handle(engine: Engine, request: Request, body: CompletionRequest | ChatRequest, kind: str):
    try:
        job, events = _submit(engine, body)
    except RequestError as error:
        return _error(400, str(error), error.param)
    except QueueFull as error:
        return _error(429, f"the server is busy ({error}); retry later", headers={"Retry-After": "1"})
    except RuntimeError as error:
        return _error(503, str(error))
    if body.stream:
        return StreamingResponse(_stream(engine, kind, job, events), media_type="text/event-stream")
    event = await _wait_final(request, job, events)
    if event is None:
        return _error(499, "client closed the request")
    if event.kind == "error":
        return _error(event.status, event.text)
    usage = event.usage.as_dict()
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": event.text},
                  "finish_reason": event.finish_reason}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": engine.name, "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": event.text, "finish_reason": event.finish_reason, "logprobs": None}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": engine.name, "choices": [choice], "usage": usage}


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application; starting it starts the scheduler, shutting it down drains the scheduler."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.scheduler.start()
        yield
        await asyncio.to_thread(engine.scheduler.stop)

    app = FastAPI(title="dkvcache", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid request body')}", param)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.scheduler.load()}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "dkvcache"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _handle(engine, request, body, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await _handle(engine, request, body, "chat")

    return app
