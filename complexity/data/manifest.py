"""The manifest of a prepared-data folder (``complexity data prepare``): its format and readers.

``OUT/manifest.json`` is written last by ``prepare``; its presence means the folder is complete.
Fields (format ``complexity-packed-tokens``, version 1)::

    vocab_size, dtype (uint16 | uint32), eos_id, bos_id, pad_id
    tokenizer: {path, hash, vocab_size}        the tokenizer the ids come from
    splits: {train|val: {tokens, documents, text_bytes, shards: [{file, tokens}]}}
    token_counts: {file, split, dtype, total}  int64 [vocab_size] train-split frequencies
    config_hash, options, sources, documents, tokens, created

Everything that reads a prepared folder goes through here: `read_manifest` checks the fields
above (an error names the manifest and the field), and the accessors below answer the
questions callers ask (tokens and bytes of a split, the tokenizer, the token counts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import numpy as np

from .files import FileFormatError, read_json

FORMAT = "complexity-packed-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COUNTS_FILE = "token_counts.npy"
SPLITS = ("train", "val")
TOKEN_DTYPES = ("uint16", "uint32")


class ManifestError(FileFormatError):
    """A manifest.json is unreadable or inconsistent; the message names the file and the field."""


class DataMismatchError(ValueError):
    """The prepared data does not belong to the given tokenizer / model vocabulary."""


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_manifest(manifest, path) -> dict:
    """Check the fields readers rely on; raise `ManifestError` naming the first bad one."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    for check in (_check_format, _check_ids, _check_tokenizer, _check_splits, _check_token_counts):
        check(manifest, path)
    return manifest


def _fail(path, field: str, problem: str) -> NoReturn:
    raise ManifestError(f"{path}: {field}: {problem}")


def _check_format(manifest: dict, path) -> None:
    if manifest.get("format") != FORMAT:
        _fail(path, "format", f"{manifest.get('format')!r} is not {FORMAT!r}: not a complexity prepared-data manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        _fail(
            path,
            "format_version",
            f"{version!r}: this version reads format {FORMAT_VERSION} (upgrade complexity, or "
            "re-run `complexity data prepare`)",
        )


def _check_ids(manifest: dict, path) -> None:
    """The vocabulary size, a token dtype that holds every id, and the end-of-document id."""
    vocab = manifest.get("vocab_size")
    if not _is_count(vocab) or vocab == 0:
        _fail(path, "vocab_size", f"expected a positive integer, got {vocab!r}")
    if manifest.get("dtype") not in TOKEN_DTYPES:
        _fail(path, "dtype", f"expected one of {', '.join(TOKEN_DTYPES)}, got {manifest.get('dtype')!r}")
    if np.iinfo(np.dtype(manifest["dtype"])).max < vocab - 1:
        _fail(path, "dtype", f"{manifest['dtype']} cannot hold ids up to vocab_size - 1 = {vocab - 1}")
    eos = manifest.get("eos_id")
    if not _is_count(eos) or eos >= vocab:
        _fail(path, "eos_id", f"expected an id in [0, {vocab}), got {eos!r}")


def _check_tokenizer(manifest: dict, path) -> None:
    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("hash"), str):
        _fail(path, "tokenizer", "expected {path, hash, vocab_size} with a hash string")


def _check_splits(manifest: dict, path) -> None:
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not set(SPLITS) <= set(splits):
        _fail(path, "splits", f"expected an object with {' and '.join(SPLITS)}")
    for split in SPLITS:
        _check_split(splits[split], f"splits.{split}", path)


def _check_split(info, where: str, path) -> None:
    if not isinstance(info, dict):
        _fail(path, where, "expected an object")
    for key in ("tokens", "documents", "text_bytes"):
        if not _is_count(info.get(key)):
            _fail(path, f"{where}.{key}", f"expected a non-negative integer, got {info.get(key)!r}")
    shards = info.get("shards")
    if not isinstance(shards, list):
        _fail(path, f"{where}.shards", "expected a list")
    for i, shard in enumerate(shards):
        _check_shard(shard, f"{where}.shards[{i}]", path)
    total = sum(s["tokens"] for s in shards)
    if total != info["tokens"]:
        _fail(path, f"{where}.tokens", f"{info['tokens']} differs from the sum of its shards' tokens ({total})")


def _check_shard(shard, where: str, path) -> None:
    if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or not _is_count(shard.get("tokens")):
        _fail(path, where, "expected {file, tokens}")
    rel = Path(shard["file"])
    if rel.is_absolute() or ".." in rel.parts:  # shards are opened relative to the folder
        _fail(path, f"{where}.file", f"{shard['file']!r} must be a path inside the folder")


def _check_token_counts(manifest: dict, path) -> None:
    counts = manifest.get("token_counts")
    if counts is not None and (not isinstance(counts, dict) or not isinstance(counts.get("file"), str)):
        _fail(path, "token_counts", "expected {file, ...}")


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The checked manifest of a complete prepared folder, or None when it has none (yet)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except FileFormatError as err:
        raise ManifestError(str(err)) from None
    return validate_manifest(manifest, path)


def read_prepared_manifest(folder: str | os.PathLike) -> dict:
    """The checked manifest of a complete prepared folder; `FileNotFoundError` when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not" if folder.exists() else "no such folder: expected"
        raise FileNotFoundError(f"{folder}: {what} a prepared-data folder (make one with `complexity data prepare`)")
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(
            f"{folder}: no {MANIFEST}: not a complete prepared-data folder (run `complexity data prepare`)"
        )
    return manifest


# ----------------------------------------------------------------------------- accessors


def split_tokens(manifest: dict, split: str) -> int:
    return int(manifest["splits"].get(split, {}).get("tokens", 0))


def split_bytes(manifest: dict, split: str) -> int:
    """UTF-8 bytes of the split's documents (for bits per byte)."""
    return int(manifest["splits"].get(split, {}).get("text_bytes", 0))


def tokenizer_dir(manifest: dict) -> Path | None:
    """The folder of the tokenizer the data was prepared with (as recorded; it may have moved)."""
    path = manifest.get("tokenizer", {}).get("path")
    return Path(path) if path else None


def token_counts_path(folder: str | os.PathLike, manifest: dict) -> Path | None:
    """The train-split token-counts file, or None when the manifest records none."""
    name = (manifest.get("token_counts") or {}).get("file")
    return Path(folder) / name if name else None


def read_token_counts(folder: str | os.PathLike, manifest: dict | None = None) -> np.ndarray:
    """The int64 [vocab_size] train-split token frequencies of a prepared folder."""
    manifest = manifest if manifest is not None else read_prepared_manifest(folder)
    path = token_counts_path(folder, manifest)
    if path is None:
        raise FileNotFoundError(f"{Path(folder) / MANIFEST}: records no token_counts file")
    try:
        counts = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (named by {MANIFEST})") from None
    except (OSError, ValueError, EOFError) as err:
        raise ManifestError(f"{path}: not a readable .npy token-counts array: {err}") from None
    if counts.shape != (manifest["vocab_size"],) or not np.issubdtype(counts.dtype, np.integer):
        raise ManifestError(
            f"{path}: holds {counts.dtype} {list(counts.shape)}, expected int64 [{manifest['vocab_size']}] (vocab_size)"
        )
    return counts.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------- compatibility


def check_compatible(manifest: dict, where, *, tokenizer=None, vocab_size: int | None = None) -> None:
    """Raise `DataMismatchError` when the data was made with another tokenizer (a folder or
    tokenizer.json), or holds ids a model with ``vocab_size`` embeddings cannot embed (a model's
    vocabulary may be padded beyond the tokenizer's)."""
    if tokenizer is not None:
        from .tokenizer import tokenizer_hash

        check_same_tokenizer(manifest, where, tokenizer_hash(tokenizer), str(tokenizer))
    if vocab_size is not None and int(manifest["vocab_size"]) > int(vocab_size):
        raise DataMismatchError(
            f"{where}: prepared data has vocab size {manifest['vocab_size']} but the model has only "
            f"{vocab_size} embeddings"
        )


def check_same_tokenizer(manifest: dict, where, tok_hash: str, tok_where: str) -> None:
    """Refuse data prepared with another tokenizer than ``tok_where`` (hash ``tok_hash``)."""
    recorded = manifest["tokenizer"]
    if tok_hash != recorded["hash"]:
        raise DataMismatchError(
            f"{where}: prepared with a different tokenizer (hash {recorded['hash'][:12]}, vocab "
            f"{recorded.get('vocab_size')}, from {recorded.get('path')}) than {tok_where} (hash {tok_hash[:12]}); "
            "re-run `complexity data prepare` with the right --tokenizer"
        )


def check_same_run_tokenizer(manifest: dict, where, run_data, checkpoint) -> None:
    """Refuse data prepared with another tokenizer than the data a training checkpoint was
    trained on (``run_data``, from its run config); nothing to compare when that folder is gone."""
    try:
        run_manifest = read_prepared_manifest(run_data)
    except (FileNotFoundError, ValueError):
        return
    check_same_tokenizer(
        manifest, where, run_manifest["tokenizer"]["hash"], f"the tokenizer of {checkpoint}'s training data {run_data}"
    )


def check_data_matches_model(manifest: dict, vocab_size: int, where) -> None:
    """Every id in the data must have an embedding in a model with ``vocab_size`` rows."""
    check_compatible(manifest, where, vocab_size=vocab_size)
