"""Tokenizer training/saving, the built-in corpus, and `complexity tokenizer train`."""

from __future__ import annotations

import collections
import itertools
import json
import os
import time

import pytest

from complexity.cli import main

pytest_plugins = ["data_fixtures"]  # shared session fixtures (tiny tokenizer, prepared data)


def make_docs(*a, **k):
    from data_fixtures import make_docs

    return make_docs(*a, **k)


def write_corpus(*a, **k):
    from data_fixtures import write_corpus

    return write_corpus(*a, **k)


def test_special_token_ids_and_hf_folder(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == ("</s>", "<pad>", "<s>", "<unk>")
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 400
    cfg = json.loads((tiny_tokenizer / "tokenizer_config.json").read_text())
    assert "chat_template" in cfg and cfg["eos_token_id"] == 0 and cfg["pad_token_id"] == 1 and cfg["bos_token_id"] == 2
    # matches the model config defaults
    from complexity.configuration_complexity import ComplexityConfig

    mc = ComplexityConfig()
    assert (mc.pad_token_id, mc.bos_token_id, mc.eos_token_id) == (1, 2, 0)


@pytest.mark.parametrize(
    "text",
    [
        "The model reads tokens.",
        "naïve café ünïcode — “quotes” 日本語 🙂\n\n  indented\ttab",
        "",
        "x" * 500,
    ],
)
def test_round_trip(tiny_tokenizer, text):
    from transformers import AutoTokenizer

    from complexity.data.tokenizer import load_tokenizer

    fast = load_tokenizer(tiny_tokenizer)
    ids = fast.encode(text, add_special_tokens=False).ids
    assert 0 not in ids and 2 not in ids  # no special tokens added
    assert fast.decode(ids) == text
    hf = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    assert hf(text)["input_ids"] == ids
    assert hf.decode(ids) == text


def test_nfc_normalisation(tiny_tokenizer):
    from complexity.data.tokenizer import load_tokenizer

    fast = load_tokenizer(tiny_tokenizer)
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert fast.encode(composed).ids == fast.encode(decomposed).ids


def test_chat_template(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    msgs = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert tok.apply_chat_template(msgs, tokenize=False) == "User: Hi there\n\nAssistant: Hello!\n\nUser: How are you?"
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).endswith(
        "User: How are you?\n\nAssistant:"
    )
    assert (
        tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == "User: Hi there\n\nAssistant:"
    )


def test_tokenizer_hash_stable_and_distinct(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from complexity.data.tokenizer import tokenizer_hash

    h = tokenizer_hash(tiny_tokenizer)
    AutoTokenizer.from_pretrained(str(tiny_tokenizer)).save_pretrained(str(tmp_path / "resaved"))
    assert tokenizer_hash(tmp_path / "resaved") == h  # cosmetic re-save keeps the hash
    from complexity.data.tokenizer import train_tokenizer

    train_tokenizer(make_docs(50, seed=5), 300, tmp_path / "other", show_progress=False)
    assert tokenizer_hash(tmp_path / "other") != h


def test_cli_train(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    killed = tmp_path / ".tok.writing-killed"  # a save killed a while ago, before its rename
    killed.mkdir()
    os.utime(killed, (time.time() - 3600,) * 2)
    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(corpus["jsonl"]),
            *map(str, corpus["txt"]),
            "--vocab-size",
            "320",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 320 and tok.eos_token_id == 0
    assert not list(tmp_path.glob(".tok.writing-*"))
    # refuses to overwrite without --force
    rc = main(["tokenizer", "train", "--input", str(corpus["jsonl"]), "--vocab-size", "320", "--out", str(out)])
    assert rc == 2 and "--force" in capsys.readouterr().err


def test_cli_train_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["tokenizer", "train", "--input", str(empty), "--vocab-size", "300", "--out", str(tmp_path / "t")]) == 2
    assert "empty.txt: file is empty" in capsys.readouterr().err
    good = tmp_path / "good.txt"
    good.write_text("hello world")
    assert main(["tokenizer", "train", "--input", str(good), "--vocab-size", "100", "--out", str(tmp_path / "t")]) == 2
    assert "too small" in capsys.readouterr().err
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(good),
                "--vocab-size",
                "300",
                "--min-frequency",
                "-1",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    assert "--min-frequency must be >= 0, got -1" in capsys.readouterr().err
    # used to save a tokenizer that truncates every text to nothing
    argv = ["tokenizer", "train", "--input", str(good), "--vocab-size", "300", "--out", str(tmp_path / "t")]
    assert main([*argv, "--model-max-length", "0"]) == 2
    assert "--model-max-length must be positive, got 0" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert not (tmp_path / "t").exists()


def test_builtin_corpus_deterministic_prose():
    from complexity.data import builtin_corpus

    first = list(itertools.islice(builtin_corpus.iter_documents(), 30))
    again = list(itertools.islice(builtin_corpus.iter_documents(), 30))
    assert first == again and len(first) == 30
    assert all(isinstance(d, str) and d.strip() for d in first)
    text = "\n".join(first)
    words = text.split()
    assert len(text) > 50_000
    # mostly prose: common English words appear often
    assert sum(w.lower() in {"the", "a", "is", "of", "to", "and"} for w in words) / len(words) > 0.08


def test_builtin_module_docs_extracted():
    from complexity.data import builtin_corpus

    src = (
        '"""Module docstring that is long enough to be kept by the extractor."""\n'
        "def f():\n    '''Function docstring that is long enough to be kept, too.'''\n    x = 1  # inline\n"
        "# This block comment has plenty of ordinary words in it\n# and continues here.\n"
        "\n# x = f(1, 2) + g[3]; y = {4: 5}\n"
    )
    import ast

    assert builtin_corpus._docstrings(ast.parse(src)) == [
        "Module docstring that is long enough to be kept by the extractor.",
        "Function docstring that is long enough to be kept, too.",
    ]
    assert builtin_corpus._comment_paragraphs(src) == [
        "This block comment has plenty of ordinary words in it and continues here."
    ]


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', '{"added_tokens": 5}', '{"added_tokens": ["a"]}'])
def test_tokenizer_hash_names_a_tokenizer_json_of_the_wrong_shape(tmp_path, content):
    """Valid JSON that is not a tokenizer's shape is a TokenizerError naming the file (it was an
    AttributeError or TypeError from inside the hash)."""
    from complexity.data.tokenizer import TokenizerError, tokenizer_hash

    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizer\.json: expected a JSON object"):
        tokenizer_hash(tmp_path)


def test_tokenizer_hash_leaves_the_garbage_collector_as_it_found_it(tiny_tokenizer, tmp_path):
    """The hash pauses the collector while it parses tokenizer.json (see tokenizer_hash)."""
    import gc

    from complexity.data.tokenizer import TokenizerError, tokenizer_hash

    first = tokenizer_hash(tiny_tokenizer)
    assert gc.isenabled() and tokenizer_hash(tiny_tokenizer) == first
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError):
        tokenizer_hash(bad)
    assert gc.isenabled()  # restored on the error path too
    gc.disable()
    try:
        assert tokenizer_hash(tiny_tokenizer) == first
        assert not gc.isenabled()  # a caller's disabled collector stays disabled
    finally:
        gc.enable()


def test_train_refuses_a_file_as_out(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    out.write_text("not a folder")
    rc = main(["tokenizer", "train", "--input", str(corpus["jsonl"]), "--vocab-size", "300", "--out", str(out)])
    assert rc == 2 and f"{out}: is a file, not a folder" in capsys.readouterr().err
    assert out.read_text() == "not a folder"


def test_full_disk_before_saving(tmp_path, corpus, monkeypatch, capsys):
    """Too little free space for tokenizer.json: exit 1 naming the folder and the bytes needed; nothing written."""
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5000, 5000))
    out = tmp_path / "tok"
    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(corpus["jsonl"]),
            "--vocab-size",
            "300",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert f"complexity tokenizer: error: {out}: disk full: writing it needs " in err[0]
    assert "5,000 bytes free there; needed to save the tokenizer" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_full_disk_while_saving_leaves_nothing(tmp_path, corpus, monkeypatch, capsys):
    """The disk fills while transformers writes the files (here: after half of tokenizer.json):
    the temporary folder is removed and no tokenizer folder appears."""
    import errno

    from transformers import PreTrainedTokenizerFast

    real = PreTrainedTokenizerFast.save_pretrained

    def fills_up(self, folder, *args, **kwargs):
        real(self, folder, *args, **kwargs)
        path = Path(folder) / "tokenizer.json"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    from pathlib import Path

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", fills_up)
    out = tmp_path / "tok"
    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(corpus["jsonl"]),
            "--vocab-size",
            "300",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and f"{out}: disk full: writing it needs " in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_rust_disk_full_error_is_recognised():
    from complexity.data.files import is_disk_full

    assert is_disk_full(Exception("No space left on device (os error 28)"))
    assert not is_disk_full(Exception("Model missing. at line 1 column 2"))
