"""Text sources: resolve inputs (files, folders, globs, HF datasets) and read their documents.

Supported inputs (``resolve_sources``):

- ``*.txt`` / ``*.text`` / ``*.md``: UTF-8 text; ``txt_split`` decides what a document is:
  ``file`` (the whole file, default), ``line`` (each non-blank line) or ``paragraph``
  (blocks separated by blank lines);
- ``*.jsonl``: one JSON object per line, the document in ``text_field`` (default ``text``);
- ``*.parquet``: the string column ``text_field``;
- a folder saved by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: split ``hf_split``);
- any other folder: every supported file below it (recursively, sorted, hidden files skipped);
- a glob (``data/*.jsonl``, ``corpus/**/*.txt``);
- ``hf:NAME[:CONFIG]``: ``datasets.load_dataset(NAME, CONFIG, split=hf_split)`` (needs network);
- ``builtin``: the zero-download corpus of ``complexity.data.builtin_corpus``;
- ``builtin:site-packages[:N]``: the prose of the installed packages (docstrings, .md/.rst/.txt;
  ``complexity.data.builtin_corpus``), optionally stopping after N million bytes.

Every problem raises ``DataSourceError`` (a ``ValueError``) or ``FileNotFoundError`` naming the
file, and the line for jsonl.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
TXT_SPLITS = ("file", "line", "paragraph")
_CHUNK = 1 << 20


class DataSourceError(ValueError):
    """An input file/dataset is unusable; the message names it (and the line, for jsonl)."""


@dataclass
class Source:
    """One resolved input. ``sha256``/``size_bytes`` identify its content for resume/idempotence."""

    name: str  # path, "hf:NAME" or "builtin"
    kind: str  # txt | jsonl | parquet | hf_disk | hf_hub | builtin | builtin_site
    size_bytes: int = 0
    sha256: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d


# ----------------------------------------------------------------------------- resolving


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def is_hf_disk_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").is_file()
        and (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


def _expand(spec: str) -> list[tuple[Path, str]]:
    """The (path, kind) of every file or saved dataset an input names: a file, a folder, a glob."""
    p = Path(spec)
    if p.is_file():
        kind = _kind_of(p)
        if kind is None:
            raise DataSourceError(
                f"{p}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)}, "
                "folders, globs, datasets saved with save_to_disk)"
            )
        return [(p, kind)]
    if p.is_dir():
        return [(p, "hf_disk")] if is_hf_disk_folder(p) else _walk_folder(p)
    if any(ch in spec for ch in "*?["):
        return _glob(spec)
    raise FileNotFoundError(
        f"{spec}: no such file or folder (for a Hugging Face hub dataset write hf:NAME; "
        "for the built-in corpus use --builtin)"
    )


def _walk_folder(folder: Path) -> list[tuple[Path, str]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        dpath = Path(dirpath)
        hf_dirs = [d for d in dirnames if is_hf_disk_folder(dpath / d)]
        for d in hf_dirs:
            found.append((dpath / d, "hf_disk"))
        dirnames[:] = [d for d in dirnames if d not in hf_dirs]  # a saved dataset is one source
        for name in sorted(filenames):
            fp = dpath / name
            kind = _kind_of(fp)
            if kind and not name.startswith("."):
                found.append((fp, kind))
    found.sort(key=lambda t: str(t[0]))
    if not found:
        raise DataSourceError(f"{folder}: folder contains no supported files ({', '.join(SUPPORTED_SUFFIXES)})")
    return found


def _glob(spec: str) -> list[tuple[Path, str]]:
    found = []
    for m in sorted(glob.glob(spec, recursive=True)):
        mp = Path(m)
        if mp.is_file() and _kind_of(mp):
            found.append((mp, _kind_of(mp)))
        elif is_hf_disk_folder(mp):
            found.append((mp, "hf_disk"))
    if not found:
        raise FileNotFoundError(f"{spec}: glob matches no supported files")
    return found


def _hash_and_check_text(path: Path, kind: str) -> tuple[int, str]:
    """sha256 + size; rejects empty, binary (NUL bytes) and non-UTF-8 text files, naming the line."""
    h = hashlib.sha256()
    size = 0
    text = _TextCheck(path) if kind in ("txt", "jsonl") else None
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                if text is not None:
                    text.feed(chunk)
                size += len(chunk)
            if text is not None:
                text.finish()
    except OSError as err:
        raise DataSourceError(f"{path}: cannot read: {err.strerror or err}") from None
    if size == 0:
        raise DataSourceError(f"{path}: file is empty")
    if text is not None and not text.any_text:
        raise DataSourceError(f"{path}: file contains only whitespace")
    return size, h.hexdigest()


class _TextCheck:
    """Checks a file fed chunk by chunk for NUL bytes and UTF-8 validity (a character may be split
    between two chunks), and whether it holds any non-blank text; an error names the line."""

    def __init__(self, path: Path):
        self.path = path
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.lines = 0  # newlines before the current chunk
        self.offset = 0  # bytes before the current chunk
        self.any_text = False

    def feed(self, chunk: bytes) -> None:
        nul = chunk.find(b"\x00")
        if nul >= 0:
            line = self.lines + chunk.count(b"\n", 0, nul) + 1
            raise DataSourceError(
                f"{self.path}:{line}: looks like a binary file (NUL byte at offset {self.offset + nul}), not text"
            )
        pending = len(self.decoder.getstate()[0])  # bytes of a character split across chunks
        try:
            text = self.decoder.decode(chunk)
        except UnicodeDecodeError as err:
            at = max(0, err.start - pending)
            line = self.lines + chunk.count(b"\n", 0, at) + 1
            raise DataSourceError(
                f"{self.path}:{line}: not valid UTF-8 text (bad byte 0x{err.object[err.start]:02x} at offset "
                f"{self.offset - pending + err.start})"
            ) from None
        self.any_text = self.any_text or bool(text.strip())
        self.lines += chunk.count(b"\n")
        self.offset += len(chunk)

    def finish(self) -> None:
        try:
            self.any_text = bool(self.decoder.decode(b"", final=True).strip()) or self.any_text
        except UnicodeDecodeError:
            raise DataSourceError(
                f"{self.path}:{self.lines + 1}: not valid UTF-8 text (truncated character at end of file)"
            ) from None


def _check_parquet(path: Path, text_field: str) -> dict:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
        names = pf.schema_arrow.names
        rows = pf.metadata.num_rows
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError on corrupt files
        raise DataSourceError(f"{path}: not a readable parquet file: {err}") from None
    if text_field not in names:
        raise DataSourceError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); use --text-field")
    if rows == 0:
        raise DataSourceError(f"{path}: parquet file has no rows")
    return {"rows": rows}


def _load_hf_disk(path: Path, hf_split: str | None):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataSourceError(f"{path}: cannot load saved dataset: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = hf_split or ("train" if "train" in ds else None)
        if split not in ds:
            raise DataSourceError(f"{path}: dataset has splits {sorted(ds)}; choose one with --hf-split")
        ds = ds[split]
    return ds


def _load_hf_hub(spec: str, hf_split: str | None):
    import datasets

    name = spec[3:]
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        return datasets.load_dataset(name, config, split=hf_split or "train")
    except Exception as err:
        raise DataSourceError(
            f"{spec}: cannot load dataset {name!r} from the Hugging Face hub ({type(err).__name__}: {err}); "
            "offline? save it with `save_to_disk` elsewhere and pass the folder"
        ) from None


def resolve_sources(
    inputs: Sequence[str],
    *,
    text_field: str = "text",
    hf_split: str | None = None,
    builtin: bool = False,
) -> list[Source]:
    """Expand ``inputs`` into an ordered, de-duplicated list of validated ``Source``s.

    Text and jsonl files are hashed and checked for emptiness, NUL bytes and UTF-8 validity here;
    parquet files for readability and the text column. jsonl lines are checked while reading.
    """
    specs = list(inputs)
    if builtin:
        specs.append("builtin")
    if not specs:
        raise DataSourceError("no inputs: give --input PATH... or --builtin")
    found: dict[str, Source] = {}  # by the input's name, or a file's resolved path
    for spec in specs:
        if spec == "builtin" or spec.startswith(("builtin:site-packages", "hf:")):
            if spec not in found:
                found[spec] = _named_source(spec, text_field, hf_split)
            continue
        for path, kind in _expand(spec):
            key = str(path.resolve())
            if key not in found:
                found[key] = _file_source(path, kind, text_field, hf_split)
    return list(found.values())


def _named_source(spec: str, text_field: str, hf_split: str | None) -> Source:
    """A source named rather than found on disk: a hub dataset or a built-in corpus."""
    if spec.startswith("hf:"):
        ds = _load_hf_hub(spec, hf_split)
        _check_hf_column(spec, ds, text_field)
        fp = getattr(ds, "_fingerprint", "") or ""
        return Source(spec, "hf_hub", int(getattr(ds, "dataset_size", 0) or 0), fp, {"split": hf_split or "train"})
    from . import builtin_corpus

    if spec == "builtin":
        stats = builtin_corpus.corpus_stats()
        return Source(builtin_corpus.NAME, "builtin", stats["bytes"], stats["sha256"])
    try:  # builtin:site-packages[:N], the installed packages' prose
        cap = builtin_corpus.parse_site_spec(spec)
    except ValueError as err:
        raise DataSourceError(str(err)) from None
    stats = builtin_corpus.site_packages_stats(cap)
    extra = {"max_mbytes": cap, "roots": stats["roots"]}
    return Source(stats["name"], "builtin_site", stats["bytes"], stats["sha256"], extra)


def _file_source(path: Path, kind: str, text_field: str, hf_split: str | None) -> Source:
    if kind == "hf_disk":
        ds = _load_hf_disk(path, hf_split)
        _check_hf_column(path, ds, text_field)
        size, digest = _hash_folder(path)
        return Source(str(path), kind, size, digest, {"rows": len(ds)})
    extra = _check_parquet(path, text_field) if kind == "parquet" else {}
    size, digest = _hash_and_check_text(path, kind)
    return Source(str(path), kind, size, digest, extra)


def _check_hf_column(where, ds, text_field: str) -> None:
    cols = list(getattr(ds, "column_names", []) or [])
    if text_field not in cols:
        raise DataSourceError(
            f"{where}: dataset has no column {text_field!r} (columns: {', '.join(cols)}); use --text-field"
        )
    if len(ds) == 0:
        raise DataSourceError(f"{where}: dataset has no rows")


def _hash_folder(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    for fp in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(fp.relative_to(path)).encode())
        with open(fp, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
    return size, h.hexdigest()


# ----------------------------------------------------------------------------- reading


def _split_text(text: str, txt_split: str) -> Iterator[str]:
    if txt_split == "file":
        if text.strip():
            yield text
    elif txt_split == "line":
        for line in text.splitlines():
            if line.strip():
                yield line
    elif txt_split == "paragraph":
        block: list[str] = []
        for line in text.splitlines() + [""]:
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
    else:
        raise DataSourceError(f"unknown txt split {txt_split!r} (choose from {', '.join(TXT_SPLITS)})")


def iter_documents(
    source: Source, *, text_field: str = "text", txt_split: str = "file", hf_split: str | None = None
) -> Iterator[str]:
    """Yield the documents of one resolved source, validating as it goes."""
    kind, name = source.kind, source.name
    if kind == "builtin":
        from . import builtin_corpus

        yield from builtin_corpus.iter_documents()
    elif kind == "builtin_site":
        from . import builtin_corpus

        yield from builtin_corpus.iter_site_packages_documents(source.extra.get("max_mbytes"))
    elif kind == "txt":
        yield from _iter_txt(name, txt_split)
    elif kind == "jsonl":
        yield from _iter_jsonl(Path(name), text_field)
    elif kind == "parquet":
        yield from _iter_parquet(Path(name), text_field)
    elif kind == "hf_disk":
        yield from _iter_dataset(name, _load_hf_disk(Path(name), hf_split), text_field)
    elif kind == "hf_hub":
        yield from _iter_dataset(name, _load_hf_hub(name, source.extra.get("split")), text_field)
    else:
        raise DataSourceError(f"{name}: unknown source kind {kind!r}")


def _iter_txt(name: str, txt_split: str) -> Iterator[str]:
    raw = Path(name).read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is not part of the text
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataSourceError(f"{name}:{line}: not valid UTF-8 text (bad byte at offset {err.start})") from None
    yield from _split_text(text, txt_split)


def _iter_dataset(name: str, ds, text_field: str) -> Iterator[str]:
    for i, batch in enumerate(ds.select_columns([text_field]).iter(batch_size=1000)):
        for j, text in enumerate(batch[text_field]):
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataSourceError(
                    f"{name}: row {i * 1000 + j}: column {text_field!r} is {type(text).__name__}, not text"
                )
            if text.strip():
                yield text


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # a byte-order mark is not JSON
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataSourceError(
                    f"{path}:{lineno}: not valid UTF-8 text (bad byte at column {err.start + 1})"
                ) from None
            if line.strip():
                text = _jsonl_text(line, f"{path}:{lineno}", text_field)
                if text.strip():
                    yield text


def _jsonl_text(line: str, where: str, text_field: str) -> str:
    """The text field of one jsonl line, checked."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise DataSourceError(f"{where}: invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise DataSourceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        keys = ", ".join(map(str, obj)) or "none"
        raise DataSourceError(f"{where}: missing text field {text_field!r} (fields: {keys}); use --text-field")
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataSourceError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a \ud800-style escape without its pair: not Unicode text
        raise DataSourceError(
            f"{where}: field {text_field!r} holds a lone surrogate (U+{ord(text[err.start]):04X} at "
            f"character {err.start}): a \\u escape without its pair is not valid Unicode"
        ) from None
    return text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(str(path))
        batches = pf.iter_batches(columns=[text_field], batch_size=2048)
        for batch in batches:
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataSourceError(
                        f"{path}: row {row - 1}: column {text_field!r} is {type(text).__name__}, not text"
                    )
                if text.strip():
                    yield text
    except DataSourceError:
        raise
    except Exception as err:
        raise DataSourceError(f"{path}: not a readable parquet file (row {row}): {err}") from None
