"""`data prepare`: packing, shards vs manifest, counts, resume, idempotence, bad inputs."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from complexity.cli import main

pytest_plugins = ["data_fixtures"]  # shared session fixtures (tiny tokenizer, prepared data)


def make_docs(*a, **k):
    from data_fixtures import make_docs

    return make_docs(*a, **k)


def write_corpus(*a, **k):
    from data_fixtures import write_corpus

    return write_corpus(*a, **k)


def _stream(folder: Path, split: str) -> np.ndarray:
    m = json.loads((folder / "manifest.json").read_text())
    parts = [np.load(folder / s["file"]) for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _looks_complete(out: Path) -> bool:
    return (out / "manifest.json").exists()


def _tree_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_packing_and_roundtrip(prepared, corpus, tiny_tokenizer):
    from complexity.data.prepare import is_validation
    from complexity.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer)
    m = json.loads((prepared / "manifest.json").read_text())
    # source order: the folder's files sorted by path: doc0.txt doc1.txt doc2.txt more.jsonl
    docs = corpus["docs"]
    expected = {"train": [], "val": []}
    for d in docs:
        split = "val" if is_validation(d.encode(), 0.2) else "train"
        expected[split].extend(tok.encode(d, add_special_tokens=False).ids + [0])
    for split in ("train", "val"):
        got = _stream(prepared, split)
        assert got.tolist() == expected[split]  # </s> after every document, no token lost
        assert m["splits"][split]["tokens"] == got.size
        assert sum(s["tokens"] for s in m["splits"][split]["shards"]) == got.size
        # decode back to the documents
        pieces = tok.decode(got.tolist(), skip_special_tokens=False).split("</s>")
        assert pieces[-1] == ""
        assert [p for p in pieces[:-1]] == [d for d in docs if (split == "val") == is_validation(d.encode(), 0.2)]
    assert m["splits"]["val"]["documents"] > 0 and m["splits"]["train"]["documents"] > 0
    assert m["documents"] == len(docs)
    assert m["splits"]["train"]["text_bytes"] + m["splits"]["val"]["text_bytes"] == sum(len(d.encode()) for d in docs)


def test_manifest_fields_and_counts(prepared, tiny_tokenizer):
    from complexity.data.tokenizer import tokenizer_hash

    m = json.loads((prepared / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["vocab_size"] == 400 and m["eos_id"] == 0
    assert m["tokenizer"]["hash"] == tokenizer_hash(tiny_tokenizer)
    assert len(m["sources"]) == 4
    for s in m["sources"]:
        assert len(s["sha256"]) == 64 and s["size_bytes"] == Path(s["name"]).stat().st_size
    counts = np.load(prepared / "token_counts.npy")
    assert counts.dtype == np.int64 and counts.shape == (400,)
    train = _stream(prepared, "train")
    assert np.array_equal(counts, np.bincount(train, minlength=400))
    assert m["token_counts"]["total"] == train.size
    assert not list(prepared.parent.glob("data.tmp-*"))
    assert not (prepared / "parts").exists()


def test_idempotent_rerun(prepared, tiny_tokenizer, corpus, capsys):
    before = _tree_bytes(prepared)
    mtime = (prepared / "manifest.json").stat().st_mtime_ns
    rc = main(
        [
            "data",
            "prepare",
            "--input",
            str(corpus["jsonl"].parent),
            "--tokenizer",
            str(tiny_tokenizer),
            "--out",
            str(prepared),
            "--val-fraction",
            "0.2",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _tree_bytes(prepared) == before
    assert (prepared / "manifest.json").stat().st_mtime_ns == mtime
    # different options on an existing folder: refused without --force
    rc = main(
        [
            "data",
            "prepare",
            "--input",
            str(corpus["jsonl"].parent),
            "--tokenizer",
            str(tiny_tokenizer),
            "--out",
            str(prepared),
            "--val-fraction",
            "0.3",
            "--no-progress",
        ]
    )
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert _tree_bytes(prepared) == before


def test_resume_after_interruption_matches_clean_run(tmp_path, tiny_tokenizer, monkeypatch):
    from complexity.data.files import held
    from complexity.data.prepare import PrepareInterrupted, prepare_dataset

    src = write_corpus(tmp_path / "src", n_txt=4, n_jsonl_docs=30)
    inputs = [str(tmp_path / "src")]
    quiet = dict(progress=False, log=lambda m: None, val_fraction=0.25, shard_tokens=700)
    clean = prepare_dataset(inputs, tiny_tokenizer, tmp_path / "clean", **quiet)
    assert len(clean.manifest["splits"]["train"]["shards"]) > 1  # multi-shard path exercised

    monkeypatch.setenv("COMPLEXITY_PREPARE_FAIL_AFTER", "2")
    with pytest.raises(PrepareInterrupted):
        prepare_dataset(inputs, tiny_tokenizer, tmp_path / "resumed", **quiet)
    assert not (tmp_path / "resumed").exists()
    tmps = list(tmp_path.glob("resumed.tmp-*"))
    assert len(tmps) == 1 and len(list((tmps[0] / "parts").glob("*.json"))) == 2
    assert not (tmps[0] / "manifest.json").exists()

    monkeypatch.delenv("COMPLEXITY_PREPARE_FAIL_AFTER")
    with held(tmps[0]), pytest.raises(FileExistsError) as err:  # the same preparation, running elsewhere
        prepare_dataset(inputs, tiny_tokenizer, tmp_path / "resumed", **quiet)
    assert str(err.value).startswith(f"{tmps[0]}: another process is writing in it now")
    logs = []
    res = prepare_dataset(inputs, tiny_tokenizer, tmp_path / "resumed", **{**quiet, "log": logs.append})
    assert res.resumed_parts == 2 and not res.skipped
    assert any("resumed" in line for line in logs)
    assert not list(tmp_path.glob("resumed.tmp-*"))
    a, b = _tree_bytes(tmp_path / "clean"), _tree_bytes(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        if k != "manifest.json":
            assert a[k] == b[k], k
    ma, mb = (json.loads(x) for x in (a["manifest.json"], b["manifest.json"]))
    ma.pop("created"), mb.pop("created")
    assert ma == mb
    assert len(src["docs"]) == ma["documents"]


def test_worker_processes_same_output(tmp_path, tiny_tokenizer, prepared, corpus):
    from complexity.data.prepare import prepare_dataset

    res = prepare_dataset(
        [str(corpus["jsonl"].parent)],
        tiny_tokenizer,
        tmp_path / "mp",
        val_fraction=0.2,
        workers=2,
        batch_bytes=2000,
        progress=False,
        log=lambda m: None,
    )
    for split in ("train", "val"):
        assert np.array_equal(_stream(tmp_path / "mp", split), _stream(prepared, split))
    assert res.manifest["config_hash"] == json.loads((prepared / "manifest.json").read_text())["config_hash"]


def test_batching_does_not_change_output(tmp_path, tiny_tokenizer, prepared, corpus):
    from complexity.data.prepare import prepare_dataset

    # one document per batch (many batches in flight, packed as they come back) vs the default
    res = prepare_dataset(
        [str(corpus["jsonl"].parent)],
        tiny_tokenizer,
        tmp_path / "b1",
        val_fraction=0.2,
        batch_bytes=1,
        progress=False,
        log=lambda m: None,
    )
    for split in ("train", "val"):
        assert np.array_equal(_stream(tmp_path / "b1", split), _stream(prepared, split))
    m = json.loads((prepared / "manifest.json").read_text())
    assert res.manifest["splits"] == m["splits"] and res.manifest["sources"] == m["sources"]
    assert np.array_equal(np.load(tmp_path / "b1" / "token_counts.npy"), np.load(prepared / "token_counts.npy"))


def test_parquet_glob_and_hf_disk_sources(tmp_path, tiny_tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from complexity.data.prepare import prepare_dataset

    docs = make_docs(12, seed=11)
    pq.write_table(pa.table({"body": docs[:6]}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"body": docs[6:]}).save_to_disk(str(tmp_path / "hfds"))
    res = prepare_dataset(
        [str(tmp_path / "*.parquet"), str(tmp_path / "hfds")],
        tiny_tokenizer,
        tmp_path / "out",
        text_field="body",
        val_fraction=0.0,
        progress=False,
        log=lambda m: None,
    )
    assert [s["kind"] for s in res.manifest["sources"]] == ["parquet", "hf_disk"]
    assert res.manifest["documents"] == 12 and res.manifest["splits"]["val"]["tokens"] == 0
    assert (_stream(tmp_path / "out", "train") == 0).sum() == 12


@pytest.mark.parametrize(
    "content,message",
    [
        ("a\u00e9\nb\u20acc\n\u00e9\u00e9".encode(), None),  # characters split across chunks: fine
        (b"ab\n\xc3\xa9\n\xffx", "a.txt:3: not valid UTF-8 text (bad byte 0xff at offset 6)"),
        (b"abc\ndef\x00", "a.txt:2: looks like a binary file (NUL byte at offset 7), not text"),
        (b"ab\n\xe2\x82", "a.txt:2: not valid UTF-8 text (truncated character at end of file)"),
        (b" \n\t\n  \n", "a.txt: file contains only whitespace"),
    ],
)
def test_text_check_across_chunks(tmp_path, monkeypatch, content, message):
    """Text files are hashed and checked in chunks: a character split between two chunks is
    text, and an error still names the right line and byte offset."""
    import hashlib

    from complexity.data import sources

    monkeypatch.setattr(sources, "_CHUNK", 4)
    p = tmp_path / "a.txt"
    p.write_bytes(content)
    if message is None:
        (src,) = sources.resolve_sources([str(p)])
        assert (src.size_bytes, src.sha256) == (len(content), hashlib.sha256(content).hexdigest())
    else:
        with pytest.raises(sources.DataSourceError) as err:
            sources.resolve_sources([str(p)])
        assert str(err.value) == f"{p.parent}/{message}"


def test_resolve_sources_expands_in_order_and_once(tmp_path, monkeypatch):
    """Folders expand to their supported files (sorted, hidden ones skipped, a saved dataset as one
    source), globs to their matches; an input named twice, by any path, is read once."""
    import datasets

    from complexity.data import builtin_corpus
    from complexity.data.sources import resolve_sources

    root = tmp_path / "corpus"
    for rel in ("b.txt", "a.jsonl", "sub/c.md", "sub/deeper/d.text", ".hidden/e.txt", ".f.txt", "notes.csv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text('{"text": "x"}\n' if rel.endswith(".jsonl") else "some text\n")
    datasets.Dataset.from_dict({"text": ["x", "y"]}).save_to_disk(str(root / "sub" / "saved"))
    monkeypatch.setattr(builtin_corpus, "corpus_stats", lambda: {"bytes": 5, "sha256": "0" * 64})
    site = {"name": "builtin:site-packages:2", "bytes": 7, "sha256": "1" * 64, "roots": ["r"]}
    monkeypatch.setattr(builtin_corpus, "site_packages_stats", lambda cap: {**site, "cap": cap})
    hub = datasets.Dataset.from_dict({"text": ["hub"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: hub)
    monkeypatch.chdir(tmp_path)

    specs = ["corpus", "corpus/b.txt", str(root / "sub" / "*.md"), "hf:someone/set:cfg", "hf:someone/set:cfg"]
    specs += ["builtin:site-packages:2", "builtin", "builtin:site-packages:2"]
    got = resolve_sources(specs, builtin=True)
    assert [(s.kind, s.name) for s in got] == [
        ("jsonl", "corpus/a.jsonl"),
        ("txt", "corpus/b.txt"),
        ("txt", "corpus/sub/c.md"),
        ("txt", "corpus/sub/deeper/d.text"),
        ("hf_disk", "corpus/sub/saved"),
        ("hf_hub", "hf:someone/set:cfg"),
        ("builtin_site", "builtin:site-packages:2"),
        ("builtin", builtin_corpus.NAME),
    ]
    assert got[0].size_bytes == len('{"text": "x"}\n') and got[4].extra == {"rows": 2}
    assert got[5].extra == {"split": "train"} and got[6].extra == {"max_mbytes": 2.0, "roots": ["r"]}


def test_txt_split_modes(tmp_path):
    from complexity.data.sources import iter_documents, resolve_sources

    p = tmp_path / "a.txt"
    p.write_text("one line\ntwo line\n\nthird para\n", encoding="utf-8")
    (src,) = resolve_sources([str(p)])
    assert list(iter_documents(src)) == ["one line\ntwo line\n\nthird para\n"]
    assert list(iter_documents(src, txt_split="line")) == ["one line", "two line", "third para"]
    assert list(iter_documents(src, txt_split="paragraph")) == ["one line\ntwo line", "third para"]


def _bad(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return p


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.txt", b"", "empty.txt: file is empty"),
        ("blank.txt", b"  \n\n ", "blank.txt: file contains only whitespace"),
        ("bin.txt", b"abc\x00\x01\x02def", "bin.txt:1: looks like a binary file"),
        ("latin.txt", "caf\u00e9".encode("latin-1"), "latin.txt:1: not valid UTF-8"),
        ("nofield.jsonl", b'{"text": "fine"}\n{"body": "oops"}\n', "nofield.jsonl:2: missing text field 'text'"),
        ("badjson.jsonl", b'{"text": "fine"}\n\n{"text": "x",\n', "badjson.jsonl:3: invalid JSON"),
        ("notstr.jsonl", b'{"text": 5}\n', "notstr.jsonl:1: field 'text' is int"),
        ("corrupt.parquet", b"PAR1 this is not really parquet PAR1", "corrupt.parquet: not a readable parquet file"),
        ("data.bin", b"whatever", "data.bin: unsupported file type"),
    ],
)
def test_bad_inputs_cli(tmp_path, tiny_tokenizer, corpus, capsys, name, content, message):
    bad = _bad(tmp_path, name, content)
    out = tmp_path / "out"
    rc = main(
        [
            "data",
            "prepare",
            "--input",
            str(corpus["jsonl"]),
            str(bad),
            "--tokenizer",
            str(tiny_tokenizer),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err, err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_missing_input_and_empty_glob(tmp_path, tiny_tokenizer, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "data",
                "prepare",
                "--input",
                str(tmp_path / "nope.txt"),
                "--tokenizer",
                str(tiny_tokenizer),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "nope.txt: no such file or folder" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "prepare",
                "--input",
                str(tmp_path / "*.jsonl"),
                "--tokenizer",
                str(tiny_tokenizer),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "glob matches no supported files" in capsys.readouterr().err
    assert (
        main(["data", "prepare", "--input", str(tmp_path), "--tokenizer", str(tmp_path / "notok"), "--out", str(out)])
        == 2
    )
    assert "no tokenizer.json" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--workers", "-1"], "--workers must be >= 0 (0: the tokenizer's own threads), got -1"),  # was accepted
        (["--shard-tokens", "0"], "--shard-tokens must be positive, got 0"),  # named no flag
        (["--val-fraction", "nan"], "--val-fraction must be in [0, 1), got nan"),
    ],
)
def test_bad_flags_are_named(flags, message, tmp_path, tiny_tokenizer, corpus, capsys):
    out = tmp_path / "out"
    argv = ["data", "prepare", "--input", str(corpus["jsonl"]), "--tokenizer", str(tiny_tokenizer), "--out", str(out)]
    assert main([*argv, *flags, "--no-progress"]) == 2
    assert capsys.readouterr().err == f"complexity data: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_dtype_too_small(tmp_path, corpus, capsys):
    from tokenizers import Tokenizer, models

    from complexity.data.prepare import choose_dtype
    from complexity.data.tokenizer import save_tokenizer

    assert choose_dtype(65536).name == "uint16" and choose_dtype(65537).name == "uint32"
    # a real (untrained) tokenizer folder with a 70k vocabulary
    vocab = {"</s>": 0, "<pad>": 1, "<s>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i + 4 for i in range(70_000)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    save_tokenizer(tok, tmp_path / "bigtok")
    out = tmp_path / "out"
    rc = main(
        [
            "data",
            "prepare",
            "--input",
            str(corpus["jsonl"]),
            "--tokenizer",
            str(tmp_path / "bigtok"),
            "--out",
            str(out),
            "--dtype",
            "uint16",
            "--no-progress",
        ]
    )
    assert rc == 2 and "uint16 cannot hold token ids up to 70003" in capsys.readouterr().err
    assert not out.exists()
    rc = main(
        [
            "data",
            "prepare",
            "--input",
            str(corpus["jsonl"]),
            "--tokenizer",
            str(tmp_path / "bigtok"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and json.loads((out / "manifest.json").read_text())["dtype"] == "uint32"


def test_inspect_detects_tokenizer_mismatch(prepared, tiny_tokenizer, other_tokenizer, capsys):
    assert main(["data", "inspect", str(prepared), "--tokenizer", str(tiny_tokenizer)]) == 0
    assert "train:" in capsys.readouterr().out
    assert main(["data", "inspect", str(prepared), "--tokenizer", str(other_tokenizer)]) == 2
    assert "prepared with a different tokenizer" in capsys.readouterr().err
    assert main(["data", "inspect", str(prepared), "--vocab-size", "256"]) == 2
    assert "vocab size 400" in capsys.readouterr().err


def test_interrupted_folder_not_mistaken_for_complete(tmp_path, prepared, tiny_tokenizer, corpus, capsys):
    import shutil

    half = tmp_path / "half"
    shutil.copytree(prepared, half)
    (half / "manifest.json").unlink()
    assert main(["data", "inspect", str(half)]) == 2
    assert "not a complete prepared-data folder" in capsys.readouterr().err
    rc = main(
        [
            "data",
            "prepare",
            "--input",
            str(corpus["jsonl"]),
            "--tokenizer",
            str(tiny_tokenizer),
            "--out",
            str(half),
            "--no-progress",
        ]
    )
    assert rc == 2 and "not a prepared-data folder" in capsys.readouterr().err


def test_hub_dataset_offline_error(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    rc = main(
        [
            "data",
            "prepare",
            "--input",
            "hf:someone/corpus",
            "--tokenizer",
            str(tiny_tokenizer),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "hf:someone/corpus: cannot load dataset 'someone/corpus' from the Hugging Face hub" in err
    assert "offline?" in err and not (tmp_path / "out").exists()


def test_builtin_flag_resolves_builtin_source():
    from complexity.data.sources import resolve_sources

    (src,) = resolve_sources([], builtin=True)
    assert src.kind == "builtin" and src.size_bytes > 1_000_000 and len(src.sha256) == 64


# ----------------------------------------------------------------------------- full disk, kill -9


def _tree_without_timestamp(folder: Path) -> dict:
    tree = _tree_bytes(folder)
    manifest = json.loads(tree.pop("manifest.json"))
    manifest.pop("created")
    tree["manifest.json"] = manifest
    return tree


def _leftovers(root: Path) -> list[str]:
    """Half-written files anywhere below root."""
    return [str(p) for p in root.rglob("*.partial")]


@pytest.fixture
def small_run(tmp_path, tiny_tokenizer):
    """Three sources, two shards per split: (inputs, options, the clean output)."""
    from complexity.data.prepare import prepare_dataset

    write_corpus(tmp_path / "src", n_txt=2, n_jsonl_docs=16)
    inputs = [str(tmp_path / "src")]
    opts = dict(val_fraction=0.25, shard_tokens=900, progress=False, log=lambda m: None)
    clean = prepare_dataset(inputs, tiny_tokenizer, tmp_path / "clean", **opts)
    assert len(clean.manifest["splits"]["train"]["shards"]) > 1 and len(clean.manifest["sources"]) == 3
    return inputs, opts, _tree_without_timestamp(tmp_path / "clean")


def _count_bytes_written(monkeypatch, run) -> int:
    import os

    real, total = os.write, [0]

    def counting(fd, data):
        n = real(fd, data)
        total[0] += n
        return n

    monkeypatch.setattr(os, "write", counting)
    run()
    monkeypatch.undo()
    return total[0]


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.97])
def test_full_disk_names_the_path_and_keeps_finished_work(
    fraction, tmp_path, tiny_tokenizer, small_run, monkeypatch, capsys
):
    """The disk fills after a share of the bytes a run writes (the last write is partial, as on a
    real disk): exit 1 with one line naming the file and the bytes it needed; no partial file left,
    nothing that reads as complete; after space is freed the same command finishes with the same
    output as an uninterrupted run."""
    import errno
    import os

    from complexity.data.prepare import prepare_dataset

    inputs, opts, clean = small_run
    total = _count_bytes_written(
        monkeypatch, lambda: prepare_dataset(inputs, tiny_tokenizer, tmp_path / "count", **opts)
    )
    real, left = os.write, [int(total * fraction)]

    def filling(fd, data):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, data[: left[0]])
        left[0] -= n
        return n

    out = tmp_path / "out"
    argv = [
        "data",
        "prepare",
        "--input",
        *inputs,
        "--tokenizer",
        str(tiny_tokenizer),
        "--out",
        str(out),
        "--val-fraction",
        "0.25",
        "--shard-tokens",
        "900",
        "--no-progress",
    ]
    monkeypatch.setattr(os, "write", filling)
    rc = main(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("complexity data: error: ") and "disk full: writing it needs " in err[0]
    assert f"{out}.tmp-" in err[0] and "bytes free there; finished work is kept in" in err[0]
    assert not _leftovers(tmp_path) and not out.exists()
    assert not list(tmp_path.glob("out.tmp-*/manifest.json"))
    assert main(argv) == 0
    assert _tree_without_timestamp(out) == clean
    assert not list(tmp_path.glob("out.tmp-*"))


def test_full_disk_before_assembling_the_shards(tmp_path, tiny_tokenizer, small_run, monkeypatch):
    import shutil as sh

    from complexity.data.files import DiskFullError
    from complexity.data.prepare import prepare_dataset

    inputs, opts, clean = small_run
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(10_000_000, 9_999_000, 1_000))
    with pytest.raises(DiskFullError) as err:
        prepare_dataset(inputs, tiny_tokenizer, tmp_path / "out", **opts)
    message = str(err.value)
    assert "needed to assemble the shards" in message and ", 1,000 bytes free there" in message
    assert err.value.needed > 2 * 400 * 8  # the shards of both splits + the int64 [400] counts
    monkeypatch.undo()
    (tmp,) = tmp_path.glob("out.tmp-*")
    assert len(list((tmp / "parts").glob("*.json"))) == 3 and not (tmp / "manifest.json").exists()
    logs = []
    res = prepare_dataset(inputs, tiny_tokenizer, tmp_path / "out", **{**opts, "log": logs.append})
    assert res.resumed_parts == 3 and _tree_without_timestamp(tmp_path / "out") == clean


# The calls that change the file system: a kill -9 just before any of them is a "write point".
_WRITE_POINTS = ("write", "fsync", "replace", "rename", "unlink", "rmdir", "mkdir")


def _patch_write_points(on_call) -> None:
    import os

    for name in _WRITE_POINTS:
        real = getattr(os, name)

        def wrapper(*args, _real=real, **kwargs):
            on_call()
            return _real(*args, **kwargs)

        setattr(os, name, wrapper)


def _killed_at(point: int, inputs, tokenizer, out, opts) -> None:
    """Child process: run prepare and SIGKILL ourselves just before write point number `point`."""
    import os
    import signal

    from complexity.data.prepare import prepare_dataset

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    calls = [0]

    def tick():
        calls[0] += 1
        if calls[0] == point:
            os.kill(os.getpid(), signal.SIGKILL)

    _patch_write_points(tick)
    prepare_dataset(inputs, tokenizer, out, **opts)
    os._exit(0)


def test_kill_9_at_every_write_point_then_resume(tmp_path, tiny_tokenizer, small_run):
    """A kill -9 before each file-system call of a run (every write, fsync, rename, unlink, mkdir):
    the output folder never reads as complete unless it is, and running the command again gives
    exactly the output of an uninterrupted run."""
    import multiprocessing as mp
    import signal

    from complexity.data.loader import PackedTokens
    from complexity.data.prepare import prepare_dataset

    inputs, opts, clean = small_run
    ctx = mp.get_context("fork")
    out = tmp_path / "out"
    point = 0
    while True:
        point += 1
        child = ctx.Process(target=_killed_at, args=(point, inputs, tiny_tokenizer, out, opts))
        child.start()
        child.join(120)
        if child.is_alive():
            child.kill()
            pytest.fail(f"prepare hung in the child killed at write point {point}")
        if child.exitcode == 0:  # the run finished before reaching this point: every point was tried
            break
        assert child.exitcode == -signal.SIGKILL, (point, child.exitcode)
        if out.exists():  # only a complete folder may be there
            PackedTokens(out, "train")
            assert _tree_without_timestamp(out) == clean, point
        resumed = prepare_dataset(inputs, tiny_tokenizer, out, **opts)
        assert _tree_without_timestamp(out) == clean, point
        assert not _leftovers(tmp_path) and not list(tmp_path.glob("out.tmp-*")), point
        assert not list(tmp_path.glob(".replaced-out")), point
        del resumed
        import shutil

        shutil.rmtree(out)
    assert point > 30  # parts (3 sources), shards (2 + 1 per split), counts, manifest, rename


# ----------------------------------------------------------------------------- pinned output


def _fixed_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer built from an explicit vocabulary and merges (no training, so
    its ids do not depend on the trainer's version)."""
    from tokenizers import models, pre_tokenizers

    from complexity.data.tokenizer import SPECIAL_TOKENS, build_untrained_tokenizer

    merges = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("e", "r"), ("i", "n"), ("o", "r"), ("Ġ", "s"), ("Ġ", "t")]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for piece in sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]:
        vocab[piece] = len(vocab)
    tok = build_untrained_tokenizer()
    tok.model = models.BPE(vocab, merges)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _digests(folder: Path, tmp_path: Path) -> dict:
    """sha256 of every file below folder; in JSON files the temporary paths and the creation
    time, which differ from run to run, are replaced first."""
    import hashlib
    import re

    digests = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.suffix == ".json":
                for path in (str(tmp_path.resolve()), str(tmp_path)):
                    data = data.replace(path.encode(), b"<tmp>")
                data = re.sub(rb'"created": "[^"]*"', b'"created": "<created>"', data)
            digests[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return digests


# What `prepare` writes for one fixed input (three text files and a jsonl, a fixed tokenizer,
# several shards per split): the files of the finished folder and the parts an interrupted run
# keeps. A change in any byte, name or manifest field (or its order) shows here.
PINNED_TOKENIZER_HASH = "f22dd6c1c910991868a989baeb4dfcee830a00d2ee0eafc8a9d5eaf9330c7b3e"
PINNED_TMP_NAME = "out.tmp-f7c608c195a4"
PINNED_PARTS = {
    "parts/00000-9fcd9c637825.counts.npy": "9ed48fb5c8f595aa048dffceeb3505e2e4926315bd05d9f41cd09dbfa36e8d3a",
    "parts/00000-9fcd9c637825.json": "119e0c0a79dc91ddab17f3b8194830523831afa5c1595065eec5e41966519ac3",
    "parts/00000-9fcd9c637825.train.bin": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "parts/00000-9fcd9c637825.val.bin": "a9623699866fb2b04a50a67de902cfba04a7c143d31e173e24b9fbb14b8ca76b",
    "parts/00001-709408ae2d48.counts.npy": "2a068b6a380c5241278160bafbc6fc61170f464456cb97bc31d7dc75f5949964",
    "parts/00001-709408ae2d48.json": "e70cdaa151637e7ae72d33e55ebee5a38892b8d483960893476f99ebfa4381b8",
    "parts/00001-709408ae2d48.train.bin": "9d46285bd882650aa12dd8e2b7be8804394b3f85f8f7314bf2d6f3b381d15296",
    "parts/00001-709408ae2d48.val.bin": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
}
PINNED_OUTPUT = {
    "manifest.json": "9a697bf2801adf67ec0b75f4a7c962be41b005d066eb62845b447eeb62542915",
    "token_counts.npy": "f66155d9e2f7514155d0151369a49ad882e2ce9f2338eae6e0499b54ae403a1f",
    "train/shard_00000.npy": "d6e48decd07ed280b38fd16fd8f0bd0701df01388086854edebea4452db33d7e",
    "train/shard_00001.npy": "5077ba0cd224378d73ce067c790bf69547bde1c372d5aa10556380c143c3ee6b",
    "train/shard_00002.npy": "5dbed0342cfa1a099be22f13b179d8bccc3e84f9f9a332f7c05cabca3eceac3b",
    "train/shard_00003.npy": "624ef7b4bfd2c8c5690a294c70496d5b1e429138ddb2e719383f55acca9d9bee",
    "train/shard_00004.npy": "7635d52799b8560e01295b614ce1c0c39f0413bfc0903f5d0b89161114dca02b",
    "train/shard_00005.npy": "b7359f4a502edfe8491c4ac854eedba05660f5f604dffb5b3453163263e8ad64",
    "val/shard_00000.npy": "91c64dd7fc2dc927d3b2ed7d2fb2e2a5d15a0945d301f0ecd4c6fce369ddd348",
    "val/shard_00001.npy": "e71117df8b9cee29d373c3f8ea51074aaa00d17bb96bf7db71e0579a5a4cff88",
}


def test_prepared_bytes_are_pinned(tmp_path, monkeypatch):
    from complexity.data.prepare import PrepareInterrupted, prepare_dataset
    from complexity.data.tokenizer import tokenizer_hash

    tok = _fixed_tokenizer(tmp_path / "tok")
    assert tokenizer_hash(tok) == PINNED_TOKENIZER_HASH  # else the digests below cannot hold
    write_corpus(tmp_path / "src", n_txt=3, n_jsonl_docs=30)
    inputs = [str(tmp_path / "src")]
    opts = dict(val_fraction=0.25, shard_tokens=2000, progress=False, log=lambda m: None)

    clean = prepare_dataset(inputs, tok, tmp_path / "clean", **opts)
    assert _digests(tmp_path / "clean", tmp_path) == PINNED_OUTPUT
    assert not clean.skipped and clean.resumed_parts == 0
    prepare_dataset(inputs, tok, tmp_path / "workers", **opts, workers=2, batch_bytes=1)
    assert _digests(tmp_path / "workers", tmp_path) == PINNED_OUTPUT

    monkeypatch.setenv("COMPLEXITY_PREPARE_FAIL_AFTER", "2")
    with pytest.raises(PrepareInterrupted):
        prepare_dataset(inputs, tok, tmp_path / "out", **opts)
    (tmp,) = tmp_path.glob("out.tmp-*")
    assert tmp.name == PINNED_TMP_NAME
    assert _digests(tmp, tmp_path) == PINNED_PARTS
    monkeypatch.delenv("COMPLEXITY_PREPARE_FAIL_AFTER")
    resumed = prepare_dataset(inputs, tok, tmp_path / "out", **opts)
    assert resumed.resumed_parts == 2 and _digests(tmp_path / "out", tmp_path) == PINNED_OUTPUT
