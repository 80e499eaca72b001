"""`complexity serve CKPT`: an OpenAI-compatible HTTP server (see docs/serving.md).

The engine runs in its own process (vLLM v1's layout, see complexity/inference/core.py); this
process serves HTTP, tokenizes and detokenizes. On CUDA the engine's defaults are the fast ones
(CUDA graphs + compile, slots sized from free memory); `--eager` turns them off.
"""

from __future__ import annotations

import logging
import os
import sys
import time


def run(args) -> int:
    # the `serve` extra (fastapi, uvicorn, prometheus-client) first: without it, fail before the engine loads
    from ..serve import create_app
    from ..serve.http import uvicorn_config

    _configure_process(args)
    t0 = time.perf_counter()
    sock = _listen(args.host, args.port)
    try:
        aengine = _spawn_engine(args)
    except BaseException:
        sock.close()
        raise
    try:
        name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
        app = create_app(aengine, model_name=name, **_app_kwargs(args))
        print(
            f"complexity serve: {name} on http://{_url_host(args.host)}:{args.port}; engine ready in "
            f"{time.perf_counter() - t0:.1f}s: {aengine.info['description']}",
            file=sys.stderr,
            flush=True,
        )
        server = _draining_server(uvicorn_config(app, **_uvicorn_kwargs(args)), aengine, args.shutdown_timeout)
    except BaseException:
        aengine.stop()  # its process holds the model (and the GPU): not left behind by a failed start
        sock.close()
        raise
    with sock:
        return _serve_until_exit(server, aengine, sock)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address in a URL is bracketed


def _listen(host: str, port: int):
    """The server's socket, bound before the engine starts: an address in use (or a host that does
    not resolve) is one error line at once, not a uvicorn log line and exit 3 after the model has
    loaded (and, on a GPU, compiled) and the start-up line has announced the address."""
    import socket

    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind(address)
        sock.listen(2048)
        return sock
    except OSError as err:
        if sock is not None:
            sock.close()
        raise OSError(err.errno, f"cannot listen on {host}:{port}: {err.strerror}") from None


def _configure_process(args) -> None:
    """Torch's threads, logging, and a warning when the server is open to the network without a key."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"complexity serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    logging.basicConfig(level=logging.INFO)


def _spawn_engine(args):
    """The engine core in its own process, built from the engine flags, and its client here."""
    from ..inference import AsyncEngine
    from ..inference.args import engine_kwargs

    return AsyncEngine.spawn(
        args.checkpoint,
        engine_kwargs(args),
        threads=args.threads,
        max_concurrent=args.max_concurrent,
        max_queued_tokens=args.max_queued_tokens,
    )


def _app_kwargs(args) -> dict:
    """create_app's limits from the flags."""
    return dict(
        api_key=args.api_key,
        max_n=args.max_n,
        max_body_bytes=args.max_body_bytes,
        body_timeout=args.request_timeout,
    )


def _uvicorn_kwargs(args) -> dict:
    """uvicorn_config's address and transport limits from the flags."""
    return dict(
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        request_timeout=args.request_timeout,
        max_connections=args.max_connections,
        # past the engine's drain, so that the streams it cancels still send their last chunk
        shutdown_timeout=args.shutdown_timeout + 5,
    )


def _draining_server(config, aengine, drain_timeout: float):
    """uvicorn's server, draining the engine when a signal stops it."""
    import uvicorn

    class Server(uvicorn.Server):
        # SIGTERM/SIGINT: refuse new requests (503), let in-flight ones finish for up to
        # --shutdown-timeout seconds, then cancel the rest so every stream still ends with a final
        # chunk and [DONE]; uvicorn then closes connections and the lifespan stops the engine.
        def handle_exit(self, sig, frame):
            aengine.drain(drain_timeout)
            super().handle_exit(sig, frame)

    return Server(config)


def _serve_until_exit(server, aengine, sock) -> int:
    """Serve until a signal (exit code 0) or the engine's death (1: the requests in flight got
    errors); the engine is stopped either way."""
    died = False

    def engine_died(reason: str) -> None:
        nonlocal died
        died = True
        server.should_exit = True

    aengine.on_dead.append(engine_died)
    try:
        server.run(sockets=[sock])
    finally:
        aengine.stop()
    if died:
        print(f"complexity serve: error: {aengine.dead}", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    from ..inference.args import add_engine_args, positive_int, positive_seconds

    p = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder (config.json + model.safetensors + tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("COMPLEXITY_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $COMPLEXITY_API_KEY)",
    )
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the folder name)")
    p.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=1024,
        help="sequences accepted at once (running + waiting); more get 429 (default 1024)",
    )
    p.add_argument(
        "--max-queued-tokens",
        type=positive_int,
        default=None,
        help="prompt tokens allowed waiting for a slot; more get 429 (default unlimited)",
    )
    p.add_argument("--max-n", type=positive_int, default=16, help="largest n (choices per prompt)")
    p.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=8 << 20,
        help="largest request body; larger ones get 413 before they are read (default 8 MiB)",
    )
    p.add_argument(
        "--request-timeout",
        type=positive_seconds,
        default=30.0,
        help="seconds a client has to send a request's headers, and again its body (408 / closed; default 30)",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=2048,
        help="open connections (and requests) at once; more get 503 (default 2048)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=positive_seconds,
        default=30.0,
        help="seconds to finish in-flight requests on SIGTERM",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(p)
    p.set_defaults(func=run)
