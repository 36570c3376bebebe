"""``python -m dkvcache.serve --model DIR_OR_HUB_ID [--dtype] [--device] [--max-batch N] [--port] [key=value ...]``

Generation defaults take ``diffusion_generate``'s names, as ``--cache-type dual`` or ``cache_type=dual``;
requests override them through the OpenAI fields and ``extra_body``.
"""

from __future__ import annotations

import argparse
import signal
import sys

from dkvcache.cli_values import parse_value

_KNOBS = ("cache_type", "threshold", "factor", "block_length", "steps", "max_new_tokens", "alg", "temperature",
          "cache_steps", "decoding")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dkvcache.serve", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id (Dream or LLaDA)")
    parser.add_argument("--served-model-name", default=None, help="the id /v1/models reports (default: dir name)")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's). On a CPU shared with other work, set it to "
                             "the cores the server can have: spinning threads that get descheduled stall every op")
    parser.add_argument("--max-batch", type=int, default=8, help="rows decoded at once (default 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    parser.add_argument("--admission", default="continuous", choices=["continuous", "static"],
                        help="continuous: join at the next block boundary; static: wait for a full batch")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request gets 504")
    for knob in _KNOBS:
        parser.add_argument(f"--{knob.replace('_', '-')}", dest=knob, type=parse_value, default=None,
                            help=f"default {knob} (diffusion_generate's name)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="any other diffusion_generate default")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    defaults = {k: getattr(args, k) for k in _KNOBS if getattr(args, k) is not None}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"error: expected key=value, got {item!r}", file=sys.stderr)
            return 2
        defaults[key.replace("-", "_")] = parse_value(value)
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    import uvicorn

    from dkvcache.serve import build_engine, create_app

    try:
        engine = build_engine(args.model, dtype=args.dtype, device=args.device, max_batch=args.max_batch,
                              max_queue=args.max_queue, request_timeout_s=args.request_timeout,
                              name=args.served_model_name, admission=args.admission,
                              **defaults)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to whatever handler was there before it started;
    # a no-op one lets a drained server exit with status 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
