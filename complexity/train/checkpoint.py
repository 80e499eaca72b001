"""Atomic, resharding-friendly training checkpoints.

Layout of `OUT/checkpoints/step_00001000/`::

    .metadata, __*_*.distcp   torch.distributed.checkpoint (DCP): {"model": ..., "optim": ...}
                              from `get_state_dict` (sharded under FSDP2, so a run can resume on
                              a different number of ranks; the zipf routing table is a buffer in "model")
    rank_00000.json ...       per-rank state: RNG states (python, numpy, torch, cuda) and the data
                              loaders' positions, keyed by *data slot* (see trainer.py), so the data
                              order survives a change of world size
    meta.json                 written last: step, scheduler, spike-guard state, config identity

Atomicity: everything is written into `.tmp-step_XXXXXXXX/`, every file is fsynced, `meta.json`
is written and fsynced last, then the folder is renamed into place and the parent directory
fsynced. A kill at any point leaves the previous checkpoints untouched; a `.tmp-*` leftover is
never read and is removed by the next save. Multi-node runs need the checkpoint folder on a
shared file system (as DCP itself does).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .parallelize import barrier

STEP_RE = re.compile(r"^step_(\d{8})$")
META = "meta.json"

# Test/experiment hook: called with a phase name ("dcp_saved", "rank_state_saved",
# "before_rename") on every rank during a save; raising (or os._exit) simulates a crash there.
fault_hook: Callable[[str], None] | None = None
KILL_ENV = "COMPLEXITY_CHECKPOINT_KILL_AT"  # same, from the environment: SIGKILL self at that phase


def _fault(phase: str) -> None:
    if fault_hook is not None:
        fault_hook(phase)
    if os.environ.get(KILL_ENV) == phase:
        os.kill(os.getpid(), 9)


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


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durable(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


# ----------------------------------------------------------------------------- listing


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with meta.json), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if STEP_RE.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {META})")
    return json.loads(meta_path.read_text())


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
    name = f"step_{step:08d}"
    final = ckpt_dir / name
    tmp = ckpt_dir / f".tmp-{name}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _fault("dcp_saved")
    write_json_durable(tmp / f"rank_{rank:05d}.json", rank_state)
    _fault("rank_state_saved")
    barrier()

    if rank == 0:
        for f in tmp.iterdir():
            fsync_path(f)
        write_json_durable(tmp / META, {**meta, "step": step, "saved_at": time.time()})
        fsync_path(tmp)
        _fault("before_rename")
        if final.exists():  # a re-save of the same step (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(ckpt_dir)
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Collective. Loads model (+ optimizer) in place, resharding as needed; returns meta.json
    with the per-rank states of every saved rank under "rank_states" (a list, by saved rank)."""
    path = Path(path)
    meta = read_meta(path)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        load_model_weights(path, model)
    rank_files = sorted(path.glob("rank_*.json"))
    meta["rank_states"] = [_json_restore(json.loads(f.read_text())) for f in rank_files]
    return meta


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Only the model's weights (e.g. for evaluation), from a DCP checkpoint folder."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    model_sd = get_model_state_dict(model)
    state = {"model": model_sd}
    with _quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def full_model_state_dict(model: torch.nn.Module) -> dict:
    """Collective: the whole, unsharded model state on CPU (complete on rank 0)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
