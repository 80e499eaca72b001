"""Tokenize text sources into packed, memory-mapped token shards with a manifest.

Output folder layout::

    OUT/manifest.json           written last; its presence means "complete"
    OUT/token_counts.npy        int64 [vocab_size]: frequency of every id in the train split
    OUT/train/shard_00000.npy   1-D uint16/uint32 token stream (np.load(..., mmap_mode="r"))
    OUT/val/shard_00000.npy     held-out documents, same format

Every document is followed by ``</s>`` (id 0), so the stream reads
``doc1 </s> doc2 </s> ...``. A document goes to the validation split when a hash of its text
falls below ``val_fraction`` (deterministic, independent of order and of the other sources;
identical documents always land in the same split).

Work happens in ``OUT.tmp-<config hash>``: one part per source file, each finished part marked
by a small JSON written after its token files. An interrupted run resumes from the finished
parts; a complete ``OUT`` made from the same inputs/tokenizer/options is left untouched.
Every file is written atomically (``PATH.partial``, fsync, rename: `complexity.data.files`) and
``OUT`` appears by one rename of the finished temporary folder, whose manifest is written last:
a kill -9 at any point loses no finished part and never leaves a folder that reads as complete.
Bad input removes the temporary folder; a full disk stops with the path and the bytes it needed
and keeps the finished parts for the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from .files import (
    AtomicFile,
    DiskFullError,
    FileFormatError,
    check_free_space,
    check_parent_folders,
    fsync_dir,
    held,
    npy_header,
    read_json,
    replace_dir,
    save_npy_atomic,
    write_json_atomic,
)
from .manifest import COUNTS_FILE, FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, read_manifest
from .sources import DataSourceError, Source, iter_documents, resolve_sources
from .tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    TokenizerError,
    load_tokenizer,
    tokenizer_hash,
    vocab_size_of,
)

DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens (512 MiB as uint16) per shard
FAIL_AFTER_ENV = "COMPLEXITY_PREPARE_FAIL_AFTER"  # fault injection for tests: crash after N parts


class PrepareInterrupted(RuntimeError):
    """Raised by the fault-injection hook (``COMPLEXITY_PREPARE_FAIL_AFTER``)."""


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict
    skipped: bool  # True when OUT was already complete for these inputs: nothing was done
    resumed_parts: int = 0  # parts reused from an interrupted run


def choose_dtype(vocab_size: int, dtype: str | None = None) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; validates an explicit choice."""
    if dtype is None or dtype == "auto":
        return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"--dtype {dtype}: choose uint16 or uint32")
    if vocab_size - 1 > np.iinfo(dt).max:
        raise ValueError(
            f"--dtype {dt.name} cannot hold token ids up to {vocab_size - 1} (vocab size {vocab_size}); "
            f"the largest id {dt.name} holds is {np.iinfo(dt).max}: use uint32"
        )
    return dt


def is_validation(text_bytes: bytes, val_fraction: float) -> bool:
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text_bytes, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


# ----------------------------------------------------------------------------- whole run


def prepare_dataset(
    inputs: Sequence[str] = (),
    tokenizer: str | os.PathLike = "",
    out_dir: str | os.PathLike = "",
    *,
    builtin: bool = False,
    val_fraction: float = 0.01,
    text_field: str = "text",
    txt_split: str = "file",
    hf_split: str | None = None,
    dtype: str | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_bytes: int = 1 << 20,
    workers: int = 0,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PrepareResult:
    """Tokenize ``inputs`` (and/or the built-in corpus) with ``tokenizer`` into ``out_dir``.

    Idempotent: if ``out_dir`` already holds the result for the same sources (by content hash),
    tokenizer and options, nothing is done (``skipped=True``). Resumable: parts finished by an
    interrupted run (kept in ``out_dir.tmp-<hash>``) are reused.

    ``workers``: 0 or 1 tokenizes with the Rust tokenizer's own thread pool
    (``encode_batch_fast``, all cores); N > 1 uses N worker processes instead. The output is
    identical either way.
    """
    _check_arguments(out_dir, val_fraction, shard_tokens, workers)
    out = Path(out_dir)
    tok = _Tokenizer.load(tokenizer)
    np_dtype = choose_dtype(tok.vocab_size, dtype)
    sources = resolve_sources(inputs, text_field=text_field, hf_split=hf_split, builtin=builtin)
    options = {
        "val_fraction": val_fraction,
        "text_field": text_field,
        "txt_split": txt_split,
        "hf_split": hf_split,
        "dtype": np_dtype.name,
        "shard_tokens": shard_tokens,
    }
    plan = _Plan(sources, tok, np_dtype, options, _config_hash(sources, tok.hash, options))

    existing = _existing_output(out, plan.config_hash, force)
    if existing is not None:
        log(f"{out}: already prepared from these inputs, tokenizer and options; nothing to do")
        return PrepareResult(out, existing, skipped=True)
    t0 = time.time()
    tmp = out.parent / f"{out.name}.tmp-{plan.config_hash[:12]}"
    tmp.mkdir(parents=True, exist_ok=True)  # or the one an interrupted run left
    with held(tmp):  # a second run of the same preparation would write the same parts
        manifest, resumed = _build(plan, tmp, batch_bytes=batch_bytes, workers=workers, progress=progress, log=log)
        replace_dir(tmp, out)
    log(_summary(out, manifest, resumed, time.time() - t0))
    return PrepareResult(out, manifest, skipped=False, resumed_parts=resumed)


def _check_arguments(out_dir, val_fraction: float, shard_tokens: int, workers: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be positive, got {shard_tokens}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0 (0: the tokenizer's own threads), got {workers}")
    if not str(out_dir):
        raise ValueError("no output folder given (--out)")
    check_parent_folders(out_dir)


@dataclass(frozen=True)
class _Tokenizer:
    """The tokenizer a run encodes with, and what the manifest records of it."""

    path: str | os.PathLike
    tok: Any  # tokenizers.Tokenizer
    hash: str
    vocab_size: int
    eos_id: int

    @classmethod
    def load(cls, path: str | os.PathLike) -> _Tokenizer:
        tok = load_tokenizer(path)
        tok_hash = tokenizer_hash(path)
        vocab_size = vocab_size_of(tok)
        eos_id = tok.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise TokenizerError(f"{path}: tokenizer has no {EOS_TOKEN} token to separate documents")
        return cls(path, tok, tok_hash, vocab_size, eos_id)


@dataclass(frozen=True)
class _Plan:
    """What a run reads and how it stores it, fixed before anything is written."""

    sources: list[Source]
    tokenizer: _Tokenizer
    dtype: np.dtype
    options: dict  # recorded in the manifest
    config_hash: str  # of the sources' contents, the tokenizer and the options: names the output


def _config_hash(sources: Sequence[Source], tok_hash: str, options: dict) -> str:
    blob = {
        "format": [FORMAT, FORMAT_VERSION],
        "sources": [[s.kind, s.sha256, s.size_bytes] for s in sources],
        "tokenizer": tok_hash,
        "options": options,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _existing_output(out: Path, config_hash: str, force: bool) -> dict | None:
    """The manifest of an ``out`` this very configuration already made, or None when ``out`` may
    be written; anything else there is refused unless ``force``."""
    if force:
        return None
    existing = read_manifest(out) if out.is_dir() else None
    if existing is not None:
        if existing.get("config_hash") == config_hash:
            return existing
        raise FileExistsError(
            f"{out}: already holds prepared data made from other inputs, tokenizer or options; "
            "use --force to replace it or choose another --out"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not a prepared-data folder; use --force to replace it")
    return None


def _build(
    plan: _Plan, tmp: Path, *, batch_bytes: int, workers: int, progress: bool, log: Callable[[str], None]
) -> tuple[dict, int]:
    """Make the complete output in ``tmp``, reusing what an interrupted run finished there:
    its manifest and the number of parts reused."""
    parts_dir = tmp / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    try:
        manifest = read_manifest(tmp)
        if manifest is None:
            metas, resumed = _run_parts(
                plan, parts_dir, batch_bytes=batch_bytes, workers=workers, progress=progress, fail_after=fail_after
            )
            if resumed:
                log(f"resumed: {resumed} of {len(plan.sources)} source(s) were already tokenized by an interrupted run")
            manifest = _assemble(tmp, metas, plan)
        else:  # a run killed between writing the manifest and renaming the folder
            resumed = len(plan.sources)
        shutil.rmtree(parts_dir, ignore_errors=True)
    except (DataSourceError, TokenizerError, ValueError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except DiskFullError as err:  # the finished parts stay: a re-run after freeing space reuses them
        raise err.with_hint(f"finished work is kept in {tmp} and reused when the command is run again") from None
    return manifest, resumed


def _summary(out: Path, manifest: dict, resumed: int, elapsed: float) -> str:
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    return (
        f"{out}: {manifest['documents']} documents -> {tr['tokens']:,} train tokens in {len(tr['shards'])} shard(s), "
        f"{va['tokens']:,} val tokens ({va['documents']} documents); {manifest['dtype']}; {elapsed:.1f}s"
        + (f"; reused {resumed} finished part(s)" if resumed else "")
    )


# ----------------------------------------------------------------------------- parts: one per source


def _run_parts(plan: _Plan, parts_dir: Path, *, batch_bytes: int, workers: int, progress: bool, fail_after: int):
    """Tokenize every source into its part, reusing the parts an interrupted run finished: the
    parts' records in source order, and how many were reused."""
    metas, resumed, encoder = [], 0, None
    pbar = _progress_bar(plan.sources) if progress else _NoProgress()
    try:
        for i, source in enumerate(plan.sources):
            part_id = f"{i:05d}-{(source.sha256 or 'x')[:12]}"
            meta = _finished_part(parts_dir, part_id, plan.dtype)
            if meta is not None:
                metas.append(meta)
                resumed += 1
                pbar.update(source.size_bytes)
                continue
            if encoder is None:
                encoder = _Encoder(plan.tokenizer, plan.dtype, plan.options["val_fraction"], workers)
            metas.append(_process_source(source, part_id, parts_dir, encoder, plan, batch_bytes, pbar))
            if fail_after and len(metas) >= fail_after:
                raise PrepareInterrupted(f"fault injection: stopping after {len(metas)} part(s) ({FAIL_AFTER_ENV})")
    finally:
        if encoder is not None:
            encoder.close()
        pbar.close()
    return metas, resumed


def _progress_bar(sources: Sequence[Source]):
    from tqdm.auto import tqdm

    return tqdm(total=sum(s.size_bytes for s in sources), unit="B", unit_scale=True, desc="tokenizing")


class _NoProgress:
    """Stands in for the progress bar with --no-progress (a tqdm, even disabled, starts a thread)."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _finished_part(parts_dir: Path, part_id: str, dtype) -> dict | None:
    """The record of a part an earlier run finished, or None when it must be (re)done: no
    marker, or a marker whose token files are not there in full (removed or damaged since)."""
    try:
        meta = read_json(parts_dir / f"{part_id}.json")
    except (FileNotFoundError, FileFormatError):
        return None
    try:
        for split in SPLITS:
            expected = int(meta["splits"][split]["tokens"]) * np.dtype(dtype).itemsize
            if (parts_dir / f"{part_id}.{split}.bin").stat().st_size != expected:
                return None
        if not (parts_dir / f"{part_id}.counts.npy").is_file() or meta["part"] != part_id:
            return None
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return meta


def _process_source(source, part_id, parts_dir, encoder: _Encoder, plan: _Plan, batch_bytes: int, pbar) -> dict:
    """Tokenize one source into its part: the train and val token files, the train token counts,
    and last the record that marks the part finished."""
    counts = np.zeros(plan.tokenizer.vocab_size, dtype=np.int64)
    stats = {s: {"documents": 0, "tokens": 0, "text_bytes": 0} for s in SPLITS}
    opts = plan.options
    docs = iter_documents(source, text_field=opts["text_field"], txt_split=opts["txt_split"], hf_split=opts["hf_split"])
    seen = 0
    # Both token files appear (fsynced, renamed) only once the source is read to the end; an
    # error or a kill leaves at most their .partial files, which the next run overwrites.
    with AtomicFile(parts_dir / f"{part_id}.train.bin") as train, AtomicFile(parts_dir / f"{part_id}.val.bin") as val:
        for batch in encoder.map(_doc_batches(docs, batch_bytes)):
            _add_batch(batch, {"train": train, "val": val}, stats, counts)
            seen += batch["chars"]
            pbar.update(batch["chars"])
        if stats["train"]["documents"] + stats["val"]["documents"] == 0:
            raise DataSourceError(f"{source.name}: contains no non-empty documents")
    save_npy_atomic(parts_dir / f"{part_id}.counts.npy", counts)
    meta = {"part": part_id, "source": source.to_json(), "splits": stats}
    write_json_atomic(parts_dir / f"{part_id}.json", meta)  # marks the part finished
    if source.size_bytes > seen:
        pbar.update(source.size_bytes - seen)
    return meta


def _add_batch(batch: dict, files: dict, stats: dict, counts: np.ndarray) -> None:
    """Append one packed batch to the part's token files, its statistics and train token counts."""
    for split in SPLITS:
        arr = batch["arrays"][split]
        st = stats[split]
        st["documents"] += batch["stats"][split][0]
        st["text_bytes"] += batch["stats"][split][1]
        st["tokens"] += int(arr.size)
        if arr.size:
            if split == "train":
                counts += np.bincount(arr, minlength=counts.size)
            files[split].write(arr)


# ----------------------------------------------------------------------------- tokenizing


def _pack(docs: list[str], encodings, eos_id: int, dtype, val_fraction: float) -> dict:
    """Pack a batch's documents (with their ``encode_batch_fast`` encodings) into one array per
    split, back to back, ``</s>`` after each."""
    raw = [doc.encode("utf-8") for doc in docs]
    ids = [enc.ids for enc in encodings]
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    # One pass from the Python lists into numpy, then every </s> inserted at once: 40% less time
    # than building one Python list with the </s> in it and converting that.
    flat = np.fromiter(chain.from_iterable(ids), dtype, count=int(lengths.sum()))
    stream = np.insert(flat, np.cumsum(lengths), eos_id)
    val = np.fromiter((is_validation(r, val_fraction) for r in raw), bool, count=len(raw))
    nbytes = np.fromiter(map(len, raw), np.int64, count=len(raw))
    if val.any():
        val_tokens = np.repeat(val, lengths + 1)
        arrays = {"train": stream[~val_tokens], "val": stream[val_tokens]}
    else:
        arrays = {"train": stream, "val": stream[:0]}
    stats = {s: [int(m.sum()), int(nbytes[m].sum())] for s, m in (("train", ~val), ("val", val))}
    return {"arrays": arrays, "stats": stats, "chars": sum(len(d) for d in docs)}


# Worker-process state for workers > 1 (multiprocessing with one single-threaded tokenizer each).
_WORKER: dict = {}


def _worker_init(tokenizer_path: str, eos_id: int, dtype: str, val_fraction: float) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tok=load_tokenizer(tokenizer_path), eos_id=eos_id, dtype=np.dtype(dtype), val_fraction=val_fraction)


def _worker_encode(docs: list[str]) -> dict:
    w = _WORKER
    encodings = w["tok"].encode_batch_fast(docs, add_special_tokens=False)
    return _pack(docs, encodings, w["eos_id"], w["dtype"], w["val_fraction"])


def _doc_batches(docs, batch_bytes: int):
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _Encoder:
    """Tokenizes batches ahead of the writer. workers <= 1: a helper thread runs the Rust
    tokenizer (itself multi-threaded; the GIL is released) and the caller's thread packs the
    results; workers > 1: a pool of worker processes tokenizes and packs."""

    def __init__(self, tokenizer: _Tokenizer, dtype: np.dtype, val_fraction: float, workers: int):
        self.workers = workers
        self.args = (tokenizer.eos_id, dtype, val_fraction)
        self.tok = tokenizer.tok
        if workers > 1:
            import multiprocessing as mp

            # fork is fast (no re-import of torch); the children use a fresh single-threaded
            # tokenizer, and tokenizers itself turns its thread pool off in forked children.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.pool = ctx.Pool(
                workers,
                initializer=_worker_init,
                initargs=(str(tokenizer.path), tokenizer.eos_id, dtype.name, val_fraction),
            )
        else:
            self.pool = ThreadPoolExecutor(max_workers=1)

    def map(self, batches):
        """Yield results in order, keeping a bounded number of batches in flight."""
        window = max(2, 2 * self.workers)
        pending = deque()
        for batch in batches:
            pending.append((batch, self._submit(batch)))
            if len(pending) >= window:
                yield self._result(*pending.popleft())
        while pending:
            yield self._result(*pending.popleft())

    def _submit(self, batch):
        if self.workers > 1:
            return self.pool.apply_async(_worker_encode, (batch,))
        return self.pool.submit(self.tok.encode_batch_fast, batch, add_special_tokens=False)

    def _result(self, batch, job) -> dict:
        if self.workers > 1:
            return job.get()
        # Packing (Python, holds the GIL) runs here, while the helper thread already has the next
        # batch in the Rust tokenizer: packing in the helper thread left the tokenizer's threads
        # idle for the packing time of every batch.
        return _pack(batch, job.result(), *self.args)

    def close(self) -> None:
        if self.workers > 1:
            self.pool.terminate()
            self.pool.join()
        else:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- assembling the output


def _assemble(tmp: Path, metas: list[dict], plan: _Plan) -> dict:
    """Join the finished parts into the output: the shards of each split, the token counts, and
    last the manifest, which marks the folder complete."""
    parts_dir = tmp / "parts"
    tokens = sum(_split_total(metas, split, "tokens") for split in SPLITS)
    needed = tokens * plan.dtype.itemsize + plan.tokenizer.vocab_size * 8 + (1 << 16)
    check_free_space(tmp, needed, "needed to assemble the shards, the token counts and the manifest")
    splits = {split: _write_split(tmp, split, metas, plan) for split in SPLITS}
    counts = np.zeros(plan.tokenizer.vocab_size, dtype=np.int64)
    for m in metas:
        counts += np.load(parts_dir / f"{m['part']}.counts.npy")
    save_npy_atomic(tmp / COUNTS_FILE, counts)
    manifest = _manifest(plan, metas, splits, int(counts.sum()))
    write_json_atomic(tmp / MANIFEST, manifest)  # last file: marks the folder complete
    fsync_dir(tmp)
    return manifest


def _split_total(metas: list[dict], split: str, key: str) -> int:
    return int(sum(m["splits"][split][key] for m in metas))


def _write_split(tmp: Path, split: str, metas: list[dict], plan: _Plan) -> dict:
    split_dir = tmp / split
    shutil.rmtree(split_dir, ignore_errors=True)  # shards of a run killed while writing them
    split_dir.mkdir()
    return {
        "tokens": _split_total(metas, split, "tokens"),
        "documents": _split_total(metas, split, "documents"),
        "text_bytes": _split_total(metas, split, "text_bytes"),
        "shards": _write_shards(tmp, split, metas, plan.dtype, plan.options["shard_tokens"]),
    }


def _write_shards(tmp: Path, split: str, metas, dtype, shard_tokens: int) -> list[dict]:
    """Concatenate the parts' token files of one split into shards of at most shard_tokens."""
    total = sum(m["splits"][split]["tokens"] for m in metas)
    streams = (
        np.memmap(tmp / "parts" / f"{m['part']}.{split}.bin", dtype=dtype, mode="r")
        for m in metas
        if m["splits"][split]["tokens"]
    )
    src, off = None, 0
    shards = []
    for k in range(-(-total // shard_tokens)):
        n = min(shard_tokens, total - k * shard_tokens)
        rel = f"{split}/shard_{k:05d}.npy"
        header = npy_header(dtype, (n,))
        with AtomicFile(tmp / rel, size=len(header) + n * dtype.itemsize) as f:
            f.write(header)
            left = n
            while left:
                if src is None or off == src.size:
                    src, off = next(streams), 0
                    continue
                take = min(left, src.size - off)
                f.write(src[off : off + take])
                off += take
                left -= take
        shards.append({"file": rel, "tokens": int(n)})
    return shards


def _manifest(plan: _Plan, metas: list[dict], splits: dict, counts_total: int) -> dict:
    tok = plan.tokenizer
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_hash": plan.config_hash,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": {"path": str(Path(tok.path).resolve()), "hash": tok.hash, "vocab_size": tok.vocab_size},
        "vocab_size": tok.vocab_size,
        "dtype": plan.dtype.name,
        "eos_id": int(tok.eos_id),
        "bos_id": tok.tok.token_to_id(BOS_TOKEN),
        "pad_id": tok.tok.token_to_id(PAD_TOKEN),
        "separator": "every document is followed by eos_id",
        "options": plan.options,
        "documents": int(sum(splits[s]["documents"] for s in SPLITS)),
        "tokens": int(sum(splits[s]["tokens"] for s in SPLITS)),
        "splits": splits,
        "token_counts": {"file": COUNTS_FILE, "split": "train", "dtype": "int64", "total": counts_total},
        "sources": [_source_record(s, m) for s, m in zip(plan.sources, metas)],
    }


def _source_record(source: Source, meta: dict) -> dict:
    record = source.to_json()
    record["documents"] = {sp: meta["splits"][sp]["documents"] for sp in SPLITS}
    record["tokens"] = {sp: meta["splits"][sp]["tokens"] for sp in SPLITS}
    return record
