"""Load test: N concurrent streaming clients against a local server, one server per admission mode, loopback only.

    python -m dkvcache.serve.loadtest --model assets/tiny-dream --clients 16 --requests 64

Modes, each a fresh ``python -m dkvcache.serve`` subprocess on a free loopback port, the same prompts in the same
order: ``continuous`` (``--max-batch B``: requests join at the next block boundary), ``static`` (a batch of B
starts only when nothing runs and B requests wait), ``one-at-a-time`` (``--max-batch 1``). Every client sends
its requests one after another (closed loop) with ``stream=true``; the first streamed text is the time to first
block. Reports requests/s, completion tokens/s (the server's usage: tokens up to the first end token), p50/p99
latency, p50 time to first block, and the ratios against one-at-a-time, side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

from openai import AsyncOpenAI

MODES = {"continuous": ["--admission", "continuous"], "static": ["--admission", "static"],
         "one-at-a-time": ["--admission", "continuous", "--max-batch", "1"]}


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, extra: list[str], timeout_s: float = 120.0) -> subprocess.Popen:
    """``python -m dkvcache.serve`` on 127.0.0.1:port, returned once /health answers."""
    command = [sys.executable, "-m", "dkvcache.serve", "--model", model, "--port", str(port), *extra]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as response:
                if response.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"the server did not answer /health within {timeout_s} s")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (graceful drain), then wait; returns the exit status."""
    proc.terminate()
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def _one(client: AsyncOpenAI, prompt: str, settings: dict) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                  stream=True, extra_body=settings)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return {"latency": latency, "first_block": first if first is not None else latency, "tokens": tokens}


async def drive(port: int, prompts: list[str], clients: int, settings: dict) -> dict:
    """Send every prompt once from ``clients`` closed-loop clients; aggregate the measures."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[dict] = []

    async def client_loop(client: AsyncOpenAI) -> None:
        while not queue.empty():
            results.append(await _one(client, queue.get_nowait(), settings))

    # No retries: a 429 or an error must show, not be hidden in the latency.
    async with AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0,
                           timeout=600.0) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in results)
    return {"requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "latency_p50_s": statistics.median(latencies), "latency_p99_s": _quantile(latencies, 0.99),
            "first_block_p50_s": statistics.median(r["first_block"] for r in results)}


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _prompts(count: int) -> list[str]:
    from dkvcache.tasks import arith

    rows = arith.load_jsonl()
    return [rows[i % len(rows)]["question"] for i in range(count)]


def run(model: str, clients: int, requests: int, max_batch: int, modes: list[str], settings: dict,
        threads: int | None = None) -> dict:
    """Every mode against its own server, the same prompts; returns the table as a dict."""
    prompts = _prompts(requests)
    rows = {}
    for mode in modes:
        port = free_port()
        extra = ["--max-batch", str(max_batch), *MODES[mode], *(["--threads", str(threads)] if threads else [])]
        proc = start_server(model, port, extra)
        try:
            asyncio.run(drive(port, prompts[: min(4, len(prompts))], min(4, clients), settings))  # warm-up
            if mode == modes[0]:  # one request at a time on an idle server: the latency bound's unit
                alone = asyncio.run(drive(port, prompts[:8], 1, settings))["latency_p50_s"]
            rows[mode] = asyncio.run(drive(port, prompts, clients, settings))
        finally:
            stop_server(proc)
        print(f"{mode}: {rows[mode]['requests_per_s']:.2f} req/s", file=sys.stderr)
    base = rows.get("one-at-a-time")
    if base:
        for row in rows.values():
            row["speedup_requests_per_s"] = row["requests_per_s"] / base["requests_per_s"]
    import torch

    # The latency bound: p99 <= 2 x (latency alone) x (requests in flight / max batch).
    bound = 2 * alone * max(clients / max_batch, 1.0)
    return {"model": model, "clients": clients, "requests": requests, "max_batch": max_batch, "threads": threads,
            "settings": settings, "rows": rows, "latency_alone_p50_s": alone, "p99_bound_s": bound,
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "device": "cpu", "platform": platform.platform()}}


def table(result: dict) -> str:
    """The result as a Markdown table."""
    lines = ["| mode | req/s | tokens/s | p50 latency (s) | p99 latency (s) | p50 first block (s) "
             "| req/s vs one-at-a-time |",
             "|---|---|---|---|---|---|---|"]
    for mode, row in result["rows"].items():
        lines.append(f"| {mode} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} | "
                     f"{row['latency_p50_s']:.2f} | {row['latency_p99_s']:.2f} | {row['first_block_p50_s']:.2f} | "
                     f"{row.get('speedup_requests_per_s', float('nan')):.2f}x |")
    lines.append("")
    lines.append(f"latency of one request on an idle server (p50): {result['latency_alone_p50_s']:.3f} s; "
                 f"p99 bound 2 x alone x max(clients / max_batch, 1) = {result['p99_bound_s']:.3f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dkvcache.serve.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/tiny-dream")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests in all, per mode")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {list(MODES)}")
    parser.add_argument("--settings", default="{}",
                        help='JSON extra_body for every request, e.g. {"cache_type":"dual"}')
    parser.add_argument("--threads", type=int, default=None, help="the servers' --threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: unknown {unknown}; allowed: {list(MODES)}")
    if args.clients < 1 or args.requests < 1 or args.max_batch < 1:
        parser.error("--clients, --requests and --max-batch must be >= 1")
    result = run(args.model, args.clients, args.requests, args.max_batch, modes, json.loads(args.settings),
                 args.threads)
    print(table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
