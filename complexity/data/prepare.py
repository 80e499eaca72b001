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
Bad input removes the temporary folder, so nothing half-written is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .sources import DataSourceError, Source, iter_documents, resolve_sources
from .tokenizer import EOS_TOKEN, TokenizerError, load_tokenizer, tokenizer_hash, vocab_size_of

FORMAT = "complexity-packed-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COUNTS_FILE = "token_counts.npy"
SPLITS = ("train", "val")
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


def _config_hash(sources: Sequence[Source], tok_hash: str, options: dict) -> str:
    blob = {
        "format": [FORMAT, FORMAT_VERSION],
        "sources": [[s.kind, s.sha256, s.size_bytes] for s in sources],
        "tokenizer": tok_hash,
        "options": options,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a complete prepared folder, or None when absent."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable manifest: {err}") from err
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a complexity prepared-data manifest")
    return manifest


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- one source


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

    def __init__(self, tok, tokenizer_path, eos_id, dtype, val_fraction, workers: int):
        self.workers = workers
        self.args = (eos_id, dtype, val_fraction)
        self.tok = tok
        if workers > 1:
            import multiprocessing as mp

            # fork is fast (no re-import of torch); the children use a fresh single-threaded
            # tokenizer, and tokenizers itself turns its thread pool off in forked children.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.pool = ctx.Pool(workers, initializer=_worker_init,
                                 initargs=(str(tokenizer_path), eos_id, np.dtype(dtype).name, val_fraction))
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


def _process_source(source, index, parts_dir, encoder: _Encoder, vocab_size, opts, batch_bytes, pbar) -> dict:
    part_id = f"{index:05d}-{(source.sha256 or 'x')[:12]}"
    paths = {s: parts_dir / f"{part_id}.{s}.bin" for s in SPLITS}
    partial = {s: Path(str(p) + ".partial") for s, p in paths.items()}
    files = {s: open(partial[s], "wb") for s in SPLITS}
    counts = np.zeros(vocab_size, dtype=np.int64)
    stats = {s: {"documents": 0, "tokens": 0, "text_bytes": 0} for s in SPLITS}
    seen = 0
    try:
        docs = iter_documents(source, text_field=opts["text_field"], txt_split=opts["txt_split"], hf_split=opts["hf_split"])
        for result in encoder.map(_doc_batches(docs, batch_bytes)):
            for split in SPLITS:
                arr = result["arrays"][split]
                st = stats[split]
                st["documents"] += result["stats"][split][0]
                st["text_bytes"] += result["stats"][split][1]
                st["tokens"] += int(arr.size)
                if arr.size:
                    if split == "train":
                        counts += np.bincount(arr, minlength=vocab_size)
                    arr.tofile(files[split])
            seen += result["chars"]
            if pbar is not None:
                pbar.update(result["chars"])
        if stats["train"]["documents"] + stats["val"]["documents"] == 0:
            raise DataSourceError(f"{source.name}: contains no non-empty documents")
        for split in SPLITS:
            files[split].flush()
            os.fsync(files[split].fileno())
            files[split].close()
            os.replace(partial[split], paths[split])
    except BaseException:
        for split in SPLITS:
            files[split].close()
            partial[split].unlink(missing_ok=True)
        raise
    _save_npy_atomic(parts_dir / f"{part_id}.counts.npy", counts)
    meta = {"part": part_id, "source": source.to_json(), "splits": stats}
    _write_json_atomic(parts_dir / f"{part_id}.json", meta)  # marks the part finished
    if pbar is not None and source.size_bytes > seen:
        pbar.update(source.size_bytes - seen)
    return meta


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
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError("shard_tokens must be positive")
    out = Path(out_dir)
    if not str(out_dir):
        raise ValueError("no output folder given (--out)")
    tok = load_tokenizer(tokenizer)
    tok_hash = tokenizer_hash(tokenizer)
    vocab_size = vocab_size_of(tok)
    eos_id = tok.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise TokenizerError(f"{tokenizer}: tokenizer has no {EOS_TOKEN} token to separate documents")
    np_dtype = choose_dtype(vocab_size, dtype)

    sources = resolve_sources(inputs, text_field=text_field, hf_split=hf_split, builtin=builtin)
    options = {
        "val_fraction": val_fraction,
        "text_field": text_field,
        "txt_split": txt_split,
        "hf_split": hf_split,
        "dtype": np_dtype.name,
        "shard_tokens": shard_tokens,
    }
    config_hash = _config_hash(sources, tok_hash, options)

    existing = read_manifest(out) if out.is_dir() else None
    if existing is not None and not force:
        if existing.get("config_hash") == config_hash:
            log(f"{out}: already prepared from these inputs, tokenizer and options; nothing to do")
            return PrepareResult(out, existing, skipped=True)
        raise FileExistsError(
            f"{out}: already holds prepared data made from other inputs, tokenizer or options; "
            "use --force to replace it or choose another --out"
        )
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not a prepared-data folder; use --force to replace it")

    tmp = out.parent / f"{out.name}.tmp-{config_hash[:12]}"
    parts_dir = tmp / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    t0 = time.time()
    try:
        if read_manifest(tmp) is None:
            metas, resumed = _run_parts(
                sources, parts_dir, tok, tokenizer, eos_id, vocab_size, np_dtype, options, batch_bytes, workers,
                progress, fail_after, log,
            )
            manifest = _assemble(
                tmp, metas, sources, tok, tokenizer, tok_hash, vocab_size, eos_id, np_dtype, options, config_hash
            )
        else:
            resumed = len(sources)
            manifest = read_manifest(tmp)
        shutil.rmtree(parts_dir, ignore_errors=True)
    except (DataSourceError, TokenizerError, ValueError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _install(tmp, out)
    elapsed = time.time() - t0
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    log(
        f"{out}: {manifest['documents']} documents -> {tr['tokens']:,} train tokens in {len(tr['shards'])} shard(s), "
        f"{va['tokens']:,} val tokens ({va['documents']} documents); {np_dtype.name}; {elapsed:.1f}s"
        + (f"; reused {resumed} finished part(s)" if resumed else "")
    )
    return PrepareResult(out, manifest, skipped=False, resumed_parts=resumed)


def _run_parts(sources, parts_dir, tok, tokenizer_path, eos_id, vocab_size, dtype, opts, batch_bytes, workers,
               progress, fail_after, log):
    metas = []
    encoder = None
    resumed = 0
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=sum(s.size_bytes for s in sources), unit="B", unit_scale=True, desc="tokenizing")
    try:
        for i, source in enumerate(sources):
            part_id = f"{i:05d}-{(source.sha256 or 'x')[:12]}"
            meta_path = parts_dir / f"{part_id}.json"
            if meta_path.is_file():
                metas.append(json.loads(meta_path.read_text(encoding="utf-8")))
                resumed += 1
                if pbar is not None:
                    pbar.update(source.size_bytes)
                continue
            if encoder is None:
                encoder = _Encoder(tok, tokenizer_path, eos_id, dtype, opts["val_fraction"], workers)
            metas.append(_process_source(source, i, parts_dir, encoder, vocab_size, opts, batch_bytes, pbar))
            if fail_after and len(metas) >= fail_after:
                raise PrepareInterrupted(f"fault injection: stopping after {len(metas)} part(s) ({FAIL_AFTER_ENV})")
    finally:
        if encoder is not None:
            encoder.close()
        if pbar is not None:
            pbar.close()
    if resumed:
        log(f"resumed: {resumed} of {len(sources)} source(s) were already tokenized by an interrupted run")
    return metas, resumed


def _assemble(tmp, metas, sources, tok, tokenizer_path, tok_hash, vocab_size, eos_id, dtype, opts, config_hash) -> dict:
    parts_dir = tmp / "parts"
    splits = {}
    for split in SPLITS:
        split_dir = tmp / split
        shutil.rmtree(split_dir, ignore_errors=True)
        split_dir.mkdir()
        shards = []
        total = sum(m["splits"][split]["tokens"] for m in metas)
        n_shards = max(1, -(-total // opts["shard_tokens"])) if total else 0
        remaining = total
        part_iter = iter(metas)
        cur_src = None
        cur_off = 0
        for k in range(n_shards):
            n = min(opts["shard_tokens"], remaining)
            rel = f"{split}/shard_{k:05d}.npy"
            path = tmp / rel
            arr = np.lib.format.open_memmap(str(path) + ".partial", mode="w+", dtype=dtype, shape=(n,))
            filled = 0
            while filled < n:
                if cur_src is None or cur_off >= cur_src.size:
                    m = next(part_iter)
                    cur_src = np.memmap(parts_dir / f"{m['part']}.{split}.bin", dtype=dtype, mode="r") \
                        if m["splits"][split]["tokens"] else np.zeros(0, dtype)
                    cur_off = 0
                    continue
                take = min(n - filled, cur_src.size - cur_off)
                arr[filled:filled + take] = cur_src[cur_off:cur_off + take]
                filled += take
                cur_off += take
            arr.flush()
            del arr
            os.replace(str(path) + ".partial", path)
            shards.append({"file": rel, "tokens": int(n)})
            remaining -= n
        splits[split] = {
            "tokens": int(total),
            "documents": int(sum(m["splits"][split]["documents"] for m in metas)),
            "text_bytes": int(sum(m["splits"][split]["text_bytes"] for m in metas)),
            "shards": shards,
        }
    counts = np.zeros(vocab_size, dtype=np.int64)
    for m in metas:
        counts += np.load(parts_dir / f"{m['part']}.counts.npy")
    _save_npy_atomic(tmp / COUNTS_FILE, counts)
    sources_json = []
    for s, m in zip(sources, metas):
        d = s.to_json()
        d["documents"] = {sp: m["splits"][sp]["documents"] for sp in SPLITS}
        d["tokens"] = {sp: m["splits"][sp]["tokens"] for sp in SPLITS}
        sources_json.append(d)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_hash": config_hash,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": {
            "path": str(Path(tokenizer_path).resolve()),
            "hash": tok_hash,
            "vocab_size": vocab_size,
        },
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_id": int(eos_id),
        "bos_id": tok.token_to_id("<s>"),
        "pad_id": tok.token_to_id("<pad>"),
        "separator": "every document is followed by eos_id",
        "options": opts,
        "documents": int(sum(splits[s]["documents"] for s in SPLITS)),
        "tokens": int(sum(splits[s]["tokens"] for s in SPLITS)),
        "splits": splits,
        "token_counts": {"file": COUNTS_FILE, "split": "train", "dtype": "int64", "total": int(counts.sum())},
        "sources": sources_json,
    }
    _write_json_atomic(tmp / MANIFEST, manifest)  # last file: marks the folder complete
    return manifest


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished temporary folder to ``out`` (replacing an old one if forced)."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_token_counts(folder: str | os.PathLike) -> np.ndarray:
    """The int64 [vocab] train-split token frequencies of a prepared folder."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder}: no {MANIFEST}: not a (complete) prepared-data folder")
    return np.load(Path(folder) / manifest["token_counts"]["file"])
