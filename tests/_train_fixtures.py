"""Shared helpers for the training tests: a tiny tokenizer + prepared corpus, and tiny recipes.

The corpus is generated (no downloads): short templated sentences with a learnable structure,
so a 2-layer, 64-wide model's loss drops well within a few dozen steps on CPU.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SUBJECTS = ["the cat", "a dog", "the model", "my friend", "the teacher", "a bird", "the robot", "our team"]
VERBS = ["sees", "likes", "eats", "builds", "reads", "writes", "finds", "moves"]
OBJECTS = ["the ball", "a book", "some code", "the tree", "a letter", "the house", "a song", "the data"]
ENDINGS = ["today.", "again.", "every day.", "at night.", "in the morning.", "with joy."]


def corpus_text(n_docs: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(3, 8)):
            s, v, o = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
            sentences.append(f"{s.capitalize()} {v} {o} {rng.choice(ENDINGS)}")
        docs.append(" ".join(sentences))
    return docs


def make_tiny_data(root: Path, vocab_size: int = 384, n_docs: int = 400, val_fraction: float = 0.1):
    """(tokenizer_dir, data_dir) under root, built with the data engineer's library API."""
    from complexity.data.prepare import prepare_dataset
    from complexity.data.tokenizer import train_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    docs = corpus_text(n_docs)
    corpus = root / "corpus.jsonl"
    import json

    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = root / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer(docs, vocab_size, tok, show_progress=False)
    data = root / "data"
    prepare_dataset([str(corpus)], tok, data, val_fraction=val_fraction, progress=False, log=lambda *a: None)
    return tok, data


def tiny_overrides(data_dir, vocab_size: int = 384, **extra) -> dict:
    """section.key -> value for a ~0.1M-parameter model and a few-second run."""
    o = {
        "model.preset": "tiny",
        "model.vocab_size": vocab_size,
        "model.hidden_size": 64,
        "model.intermediate_size": 128,
        "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4,
        "model.num_key_value_heads": 2,
        "model.max_position_embeddings": 256,
        "data.path": str(data_dir),
        "optim.lr": 3e-3,
        "optim.min_lr": 3e-4,
        "schedule.warmup_steps": 2,
        "training.max_steps": 12,
        "training.micro_batch_size": 4,
        "training.seq_len": 32,
        "training.tokens_per_step": 256,
        "training.device": "cpu",
        "checkpoint.every": 4,
        "checkpoint.keep_last": 2,
        "eval.every": 0,
        "eval.max_batches": 4,
        "logging.every": 1,
        "logging.tensorboard": False,
        "logging.progress": False,
    }
    o.update(extra)
    return o


def tiny_config(data_dir, **extra):
    from complexity.train import load_config

    return load_config(None, tiny_overrides(data_dir, **extra))


def run_cli(args: list[str], env: dict | None = None, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "complexity.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def override_args(overrides: dict) -> list[str]:
    """The CLI form (section.key=value, TOML values) of an overrides dict."""
    import json

    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def read_losses(run_dir) -> dict[int, float]:
    import json

    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "event" not in r:
            out[r["step"]] = r["loss"]
    return out


def torchrun(nproc: int, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "complexity.cli",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
