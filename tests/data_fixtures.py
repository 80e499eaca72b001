"""Shared tiny-data fixtures for the data/tokenizer/loader/routing tests (imported, not a conftest)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

WORDS = (
    "the model reads tokens and routes each one to an expert while the loader packs documents "
    "into shards so training sees every sample once per epoch with a seed that fixes the order "
    "language data text byte merge vocabulary frequency stream memory map manifest"
).split()


@contextmanager
def held_elsewhere(folder: Path):
    """Another process holding `folder` (`complexity.data.files.held`), as a writer that is still
    running does, until the block ends: then it is killed with SIGKILL."""
    code = "import sys, time; from complexity.data.files import held\nwith held(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 120))]
        text = " ".join(words).capitalize() + f". Document {i} — naïve café ünïcode."
        docs.append(text)
    return docs


def write_corpus(root: Path, n_txt: int = 3, n_jsonl_docs: int = 40) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    docs = make_docs(n_txt + n_jsonl_docs, seed=1)
    txt_files = []
    for i in range(n_txt):
        p = root / f"doc{i}.txt"
        p.write_text(docs[i], encoding="utf-8")
        txt_files.append(p)
    jl = root / "more.jsonl"
    with open(jl, "w", encoding="utf-8") as f:
        for d in docs[n_txt:]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    return {"txt": txt_files, "jsonl": jl, "docs": docs}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    from complexity.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(make_docs(200, seed=7), 400, out, show_progress=False)
    return out


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> Path:
    from complexity.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok2") / "tokenizer"
    train_tokenizer(make_docs(200, seed=99), 300, out, show_progress=False)
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "src")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_tokenizer, corpus) -> Path:
    from complexity.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("prep") / "data"
    prepare_dataset(
        [str(corpus["jsonl"].parent)], tiny_tokenizer, out, val_fraction=0.2, progress=False, log=lambda m: None
    )
    return out


@pytest.fixture(scope="session")
def big_prepared(tmp_path_factory, tiny_tokenizer) -> Path:
    """~100k tokens in one jsonl, for loader tests that need many samples."""
    from complexity.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("big")
    jl = root / "big.jsonl"
    with open(jl, "w", encoding="utf-8") as f:
        for d in make_docs(800, seed=3):
            f.write(json.dumps({"text": d}) + "\n")
    out = root / "data"
    prepare_dataset([str(jl)], tiny_tokenizer, out, val_fraction=0.05, progress=False, log=lambda m: None)
    return out
