"""`complexity serve CKPT`: an OpenAI-compatible HTTP server (see docs/serving.md)."""

from __future__ import annotations

import logging
import os
import sys


def run(args) -> int:
    import uvicorn

    from ..inference import Engine
    from ..serve import create_app

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"complexity serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    engine = Engine.from_pretrained(
        args.checkpoint, device=args.device, dtype=args.dtype, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
        max_prefill_tokens=args.max_prefill_tokens, cuda_graphs=args.cuda_graphs, compile=args.compile, seed=args.seed)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    app = create_app(engine, model_name=name, api_key=args.api_key, max_concurrent=args.max_concurrent,
                     max_queued_tokens=args.max_queued_tokens, max_n=args.max_n)
    logging.basicConfig(level=logging.INFO)
    print(f"complexity serve: {name} on http://{args.host}:{args.port} (slots {args.max_batch}, context "
          f"{engine.max_seq_len}, {engine.device}, {str(engine.dtype).removeprefix('torch.')})", file=sys.stderr, flush=True)
    aengine = app.state.engine

    class Server(uvicorn.Server):
        # SIGTERM/SIGINT: refuse new requests (503), let in-flight ones finish for up to
        # --shutdown-timeout seconds, then cancel the rest so every stream still ends with a final
        # chunk and [DONE]; uvicorn then closes connections and the lifespan stops the engine.
        def handle_exit(self, sig, frame):
            aengine.drain(args.shutdown_timeout)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    Server(config).run()
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder (config.json + model.safetensors + tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("COMPLEXITY_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $COMPLEXITY_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the folder name)")
    p.add_argument("--max-batch", type=_positive, default=16, help="cache slots = largest decode batch (default 16)")
    p.add_argument("--max-seq-len", type=_positive, default=None, help="per-slot context (default: the model's)")
    p.add_argument("--max-concurrent", type=_positive, default=256,
                   help="requests accepted at once (running + waiting); more get 429 (default 256)")
    p.add_argument("--max-queued-tokens", type=_positive, default=None,
                   help="prompt tokens allowed waiting for a slot; more get 429 (default unlimited)")
    p.add_argument("--max-prefill-tokens", type=_positive, default=8192, help="padded tokens per prefill forward")
    p.add_argument("--max-n", type=_positive, default=16, help="largest n (choices per prompt)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, float32 on cpu), float32, bfloat16, float16")
    p.add_argument("--cuda-graphs", action="store_true", help="capture the decode step as CUDA graphs (cuda only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared sampler (requests may pass their own)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on SIGTERM")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)
