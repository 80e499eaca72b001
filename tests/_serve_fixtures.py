"""Shared test fixtures: a tiny byte-level BPE tokenizer and a tiny random checkpoint.

    from _serve_fixtures import make_tiny_checkpoint  # tests/ is on sys.path under pytest
    path = make_tiny_checkpoint(tmp_path / "ckpt", mu_mode="guidance")

The checkpoint folder holds config.json, model.safetensors and the tokenizer files
(special tokens </s>=0 eos, <pad>=1, <s>=2 bos, <unk>=3; chat template "User: ...\\n\\nAssistant: ...").
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_WORDS = (
    "the a cat dog sat on mat and ran to house tree big small red blue green happy sad "
    "hello world once upon time there was little girl boy who loved play in garden sun "
    "moon star café naïve über déjà vu 東京 猫 🙂"
).split()


def corpus_text(n_sentences: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n_sentences)]


@lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["</s>", "<pad>", "<s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text(), trainer=trainer)
    return tok.to_str()


def make_tokenizer(vocab_size: int = 384):
    """A PreTrainedTokenizerFast: byte-level BPE, the special tokens above, the chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    path, *, model_name: str = "tiny", request_timeout: float = 30.0, max_connections: int = 2048, **app_kwargs
):
    """A real uvicorn server (the transport limits of `complexity serve`) on a free loopback port,
    in a background thread, over a float32 CPU engine whose core runs in a thread. Yields (url, app)."""
    import threading
    import time

    import uvicorn

    from complexity.inference import Engine
    from complexity.serve import create_app
    from complexity.serve.http import uvicorn_config

    engine_kwargs = {k: app_kwargs.pop(k) for k in ("max_batch", "max_seq_len", "decode_steps") if k in app_kwargs}
    # The float32 CPU engine: the tests compare it with float32 CPU forwards, also on GPU machines.
    engine = Engine.from_pretrained(path, device="cpu", **engine_kwargs)
    app = create_app(engine, model_name=model_name, **app_kwargs)
    port = free_port()
    server = uvicorn.Server(
        uvicorn_config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            request_timeout=request_timeout,
            max_connections=max_connections,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(15)


def make_tiny_checkpoint(path, **config_overrides) -> Path:
    """Write a tiny random Complexity checkpoint (+ tokenizer) to `path`; return the path.

    Defaults: hidden 64, 2 layers, 4 heads, 2 kv heads, 4 experts, token_routed, vocab = the
    tokenizer's. `initializer_range` defaults to 0.1 so logits are peaked enough that greedy
    decoding is free of near-ties (batched and unbatched float32 runs then agree exactly).
    Any ComplexityConfig field can be overridden; `seed` (default 0) seeds the weights.
    """
    import torch

    import complexity

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    seed = config_overrides.pop("seed", 0)
    tokenizer = make_tokenizer(config_overrides.pop("tokenizer_vocab_size", 384))
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        max_position_embeddings=512,
        initializer_range=0.1,
    )
    fields.update(config_overrides)
    torch.manual_seed(seed)
    config = complexity.ComplexityConfig(**fields)
    model = complexity.ComplexityForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


__all__ = ["make_tiny_checkpoint", "make_tokenizer", "corpus_text", "free_port", "running_server", "CHAT_TEMPLATE"]
