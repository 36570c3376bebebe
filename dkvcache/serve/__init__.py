"""An OpenAI-compatible server with step-level continuous batching: ``python -m dkvcache.serve --model DIR``.

Layers: :mod:`.protocol` (request bodies → generation settings), :mod:`.scheduler` (one thread owns the model and
interleaves waves of requests step by step), :mod:`.app` (FastAPI routes), :mod:`.server` (loading), and
:mod:`.loadtest` (throughput and latency against a running server).
"""

from dkvcache.serve.app import Engine, create_app
from dkvcache.serve.server import build_engine

__all__ = ["Engine", "build_engine", "create_app"]
