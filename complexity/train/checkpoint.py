"""Atomic, resharding-friendly training checkpoints.

Layout of `OUT/checkpoints/step_00001000/`::

    .metadata, __*_*.distcp   torch.distributed.checkpoint (DCP): {"model": ..., "optim": ...}
                              from `get_state_dict` (sharded under FSDP2, so a run can resume on
                              a different number of ranks; the zipf routing table is a buffer in "model")
    rank_00000.json ...       per-rank state: RNG states (python, numpy, torch, cuda) and the data
                              loaders' positions, keyed by *data slot* (see trainer.py), so the data
                              order survives a change of world size
    meta.json                 written last: step, scheduler, spike-guard state, config identity

Atomicity: everything is written into `.tmp-step_XXXXXXXX/`; `meta.json`, written last, lists
every other file with its size and sha256; every file is fsynced, then the folder is swapped in
(`durable.replace_dir`: an existing folder of the same name is moved aside and deleted only once
the new one is in place). Older checkpoints are pruned (`keep_last`) only after the new one is
complete. A kill at any point leaves the previous checkpoints untouched; a `.tmp-*` leftover is
never read and is removed by the next save. Multi-node runs need the checkpoint folder on a
shared file system (as DCP itself does).

Damage. `verify_checkpoint` checks a folder against its meta.json (present, sizes, hashes) before
anything is loaded; `find_resume_checkpoint` takes the newest checkpoint that passes, sets the
damaged newer ones aside as `.damaged-step_XXXXXXXX` (never read again, kept for inspection) and
says so; with none that passes it raises `CheckpointError` and changes nothing. A full disk
raises `complexity.data.files.DiskFullError` before the save starts (the size is known) or when a write fails,
and leaves the previous checkpoints intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..data.files import DiskFullError, free_bytes
from .durable import caused_by_full_disk, fault_point, replace_dir, write_json
from .parallelize import barrier

STEP_RE = re.compile(r"^step_(\d{8})$")
META = "meta.json"
_FAILURES = (Exception, CheckpointException)  # DCP's CheckpointException is a BaseException


class CheckpointError(ValueError):
    """A training checkpoint is damaged or cannot be loaded; the message names the folder and file."""


@contextlib.contextmanager
def _quiet():
    # DCP warns that it "assumes a single process" when no process group exists: that is intended.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.name}
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": obj.tolist(), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} in a checkpoint's JSON state")


def _json_restore(obj):
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tensor__" in obj:
            return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
        return {k: _json_restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_restore(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ----------------------------------------------------------------------------- listing and verifying


def step_folders(ckpt_dir: str | Path) -> list[Path]:
    """Every `step_*` folder (complete or not), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if STEP_RE.match(p.name) and p.is_dir()), key=lambda p: p.name)


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with meta.json), oldest first."""
    return [p for p in step_folders(ckpt_dir) if (p / META).is_file()]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: damaged ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{meta_path}: damaged (no step)")
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _file_manifest(folder: Path) -> dict | None:
    """Collective. {name: {"bytes", "sha256"}} of every file in a checkpoint folder but meta.json,
    on rank 0 (None elsewhere). Every rank hashes a share of the files (the folder is on a file
    system they all see, as DCP requires), each in parallel threads (hashlib releases the GIL):
    a save reads the checkpoint back once in total, not once through rank 0."""
    names = [sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != META) if _rank() == 0 else None]
    if _is_dist():
        dist.broadcast_object_list(names, src=0)
    world = dist.get_world_size() if _is_dist() else 1
    mine = [folder / name for name in names[0][_rank() :: world]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        digests = list(pool.map(_sha256, mine))
    share = {p.name: {"bytes": p.stat().st_size, "sha256": d} for p, d in zip(mine, digests)}
    shares = [share]
    if _is_dist():
        shares = [None] * world
        dist.all_gather_object(shares, share)
    return {name: entry for part in shares for name, entry in sorted(part.items())} if _rank() == 0 else None


def verify_checkpoint(path: str | Path) -> dict:
    """meta.json of a checkpoint whose files are all there, whole and unchanged; else raises
    CheckpointError naming the first file that is not. (Checkpoints written before meta.json
    listed its files are checked for their files' presence only.)"""
    path = Path(path)
    meta = read_meta(path)
    files = meta.get("files")
    if files is None:
        if not (path / ".metadata").is_file() or not list(path.glob("rank_*.json")):
            raise CheckpointError(f"{path}: damaged (.metadata or the rank_*.json files are missing)")
        return meta
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{f}: damaged ({size:,} bytes, {want['bytes']:,} written)")
    for name, want in sorted(files.items()):
        if _sha256(path / name) != want["sha256"]:
            raise CheckpointError(f"{path / name}: damaged (its content changed since it was written: sha256 differs)")
    return meta


def find_resume_checkpoint(ckpt_dir: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """Collective. The newest checkpoint that passes `verify_checkpoint` (None when there is
    none at all). Damaged newer ones are set aside as `.damaged-<name>`, each with a message;
    when every checkpoint is damaged, CheckpointError, and nothing is moved."""
    choice: list = [None]
    if _rank() == 0:
        ckpt_dir = Path(ckpt_dir)
        damaged = []
        for folder in reversed(step_folders(ckpt_dir)):
            try:
                verify_checkpoint(folder)
            except CheckpointError as err:
                damaged.append((folder, err))
                continue
            choice[0] = str(folder)
            break
        if damaged and choice[0] is None:
            choice[0] = CheckpointError(
                f"{ckpt_dir}: no usable checkpoint; "
                + "; ".join(str(e) for _, e in damaged)
                + ". Nothing was changed: restore a checkpoint, or start over with --overwrite"
            )
        for folder, err in damaged if choice[0] is not None and not isinstance(choice[0], Exception) else ():
            aside = folder.with_name(f".damaged-{folder.name}")
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
            log(f"checkpoint {folder.name} is damaged ({err}); set aside as {aside}; resuming from the one before")
    if _is_dist():
        dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], Exception):
        raise choice[0]
    return Path(choice[0]) if choice[0] else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run's `checkpoints/` folder or a run folder -> the checkpoint to load."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"{path}: no complete checkpoint found (looked for {META}, checkpoints/step_*)")


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    rank_state: dict,
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    rank = _rank()
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp-{final.name}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if rank == 0:
        _clear_leftovers(ckpt_dir)
    needed, free = _bytes_needed_and_free(ckpt_dir, model_sd, optim_sd)
    hint = _not_written_hint(ckpt_dir)
    if needed > free:
        raise DiskFullError(final, needed, free=int(free), hint=hint)
    if rank == 0:
        tmp.mkdir()
    barrier()
    try:
        _write_rank_files(tmp, rank, model_sd, optim_sd, rank_state)
        barrier()  # every rank's files are in before any is hashed
        files = _file_manifest(tmp)
        if rank == 0:
            _publish(tmp, final, {**meta, "step": step, "saved_at": time.time(), "files": files})
            _prune(ckpt_dir, final, keep_last)
    except _FAILURES as err:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if caused_by_full_disk(err):
            raise DiskFullError(final, needed, hint=hint) from None
        raise
    barrier()  # no rank goes on before the checkpoint is in place
    return final


def _clear_leftovers(ckpt_dir: Path) -> None:
    """Rank 0: what an interrupted save left is never read; it goes before the free space is measured."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def _bytes_needed_and_free(ckpt_dir: Path, model_sd: dict, optim_sd: dict) -> tuple[int, float]:
    """Collective, one all-reduce: the tensors' bytes summed over ranks + 16 MiB for DCP's metadata
    and the JSON files, and the free bytes rank 0 measures (inf when unknown), so that a full disk
    is refused on every rank before anything is written."""
    sizes = torch.tensor([_state_bytes(model_sd, optim_sd), 0], dtype=torch.float64)
    if _rank() == 0:
        free = free_bytes(ckpt_dir)
        sizes[1] = free if free is not None else float("inf")
    if _is_dist():
        sizes = sizes.to(_collective_device())
        dist.all_reduce(sizes)
    return int(sizes[0]) + 16 * 2**20, sizes[1].item()


def _state_bytes(*states) -> int:
    total = 0
    for state in states:
        for v in state.values():
            if isinstance(v, dict):
                total += _state_bytes(v)
            elif isinstance(v, torch.Tensor):
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _not_written_hint(ckpt_dir: Path) -> str:
    previous = latest_checkpoint(ckpt_dir)
    intact = f"the last checkpoint, {previous}, is intact" if previous else "no earlier checkpoint exists"
    return f"checkpoint not written; {intact}"


def _write_rank_files(tmp: Path, rank: int, model_sd: dict, optim_sd: dict, rank_state: dict) -> None:
    """Every rank: its shards of the tensors (DCP), then its own JSON state."""
    with _quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    fault_point("checkpoint.dcp_saved")
    write_json(tmp / f"rank_{rank:05d}.json", rank_state, default=_json_default)
    fault_point("checkpoint.rank_state_saved")


def _publish(tmp: Path, final: Path, meta: dict) -> None:
    """Rank 0: meta.json, written last, marks the checkpoint complete; then it is swapped in."""
    write_json(tmp / META, meta)
    fault_point("checkpoint.meta_written")
    replace_dir(tmp, final, "checkpoint")


def _prune(ckpt_dir: Path, final: Path, keep_last: int) -> None:
    """Rank 0, once `final` is in place: of the checkpoints before it, the `keep_last - 1` newest stay."""
    older = [p for p in list_checkpoints(ckpt_dir) if p.name < final.name]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old)
    fault_point("checkpoint.pruned")


def _dcp_load(path: Path, state: dict) -> None:
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(path))
    except _FAILURES as err:
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot be loaded ({detail})") from None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Collective. Loads model (+ optimizer) in place, resharding as needed; returns meta.json
    with the per-rank states of every saved rank under "rank_states" (a list, by saved rank).
    Raises CheckpointError for a damaged checkpoint (call `verify_checkpoint` first to learn
    that before any weight is overwritten)."""
    path = Path(path)
    meta = read_meta(path)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        _dcp_load(path, state)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        load_model_weights(path, model)
    meta["rank_states"] = []
    for f in sorted(path.glob("rank_*.json")):
        try:
            meta["rank_states"].append(_json_restore(json.loads(f.read_text())))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{f}: damaged ({err})") from None
    return meta


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Only the model's weights (e.g. for evaluation), from a DCP checkpoint folder, after
    checking it (CheckpointError names a damaged file)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    path = Path(path)
    verify_checkpoint(path)
    state = {"model": get_model_state_dict(model)}
    _dcp_load(path, state)
    set_model_state_dict(model, state["model"])


def full_model_state_dict(model: torch.nn.Module) -> dict:
    """Collective: the whole, unsharded model state on CPU (complete on rank 0)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
