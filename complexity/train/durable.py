"""Writing a run's files so that a kill -9 or a full disk at any moment loses nothing.

Files are written whole or not at all through `complexity.data.files.AtomicFile` (temporary
name, fsync, rename; a full disk raises its `DiskFullError` naming the path and the bytes, and
leaves nothing), then the folder is fsynced (`write_atomic`). A folder (a checkpoint, the export)
is built under a temporary name and swapped in by `complexity.data.files.replace_dir` (content
fsynced, the old one moved aside first and deleted only once the new one is in place), with a
fault point after each of its two renames (`replace_dir` here); `recover_dir` finishes or undoes
a swap that a kill interrupted. Append-only logs (metrics.jsonl, the ablation's batches.jsonl)
are appended to, never rewritten; before appending again, a resumed run cuts a torn last line
(`drop_torn_tail`).

Fault injection: every write point calls `fault_point(name)`. With the environment variable
COMPLEXITY_KILL_AT=name (or name:N, the N-th time) the process kills itself there with SIGKILL;
tests can also set `fault_hook`, called with every name (raise from it to simulate a crash or a
full disk). tests/test_train_faults.py kills a run at each point and checks what resumes.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..data import files
from ..data.files import AtomicFile, fsync_dir, is_disk_full
from ..data.files import recover_dir as recover_dir  # re-exported: the run folder finishes interrupted swaps

KILL_ENV = "COMPLEXITY_KILL_AT"
fault_hook: Callable[[str], None] | None = None
_reached: Counter = Counter()


def fault_point(name: str) -> None:
    """A place where a crash must lose nothing (see the module docstring)."""
    if fault_hook is not None:
        fault_hook(name)
    target = os.environ.get(KILL_ENV)
    if not target:
        return
    _reached[name] += 1
    point, _, nth = target.partition(":")
    if point == name and _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def caused_by_full_disk(err: BaseException) -> bool:
    """Whether a full disk is anywhere in an exception's chain (torch.distributed.checkpoint wraps
    its writers' OSErrors in a CheckpointException holding the failure of each rank)."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if is_disk_full(e):
            return True
        stack += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # CheckpointException: rank -> (err, tb)
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return False


def write_atomic(path, data: str | bytes, point: str | None = None) -> None:
    """Replace `path` with `data` whole or not at all; `point`: the fault point before the rename."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    with AtomicFile(path, size=len(raw)) as f:
        f.write(raw)
        if point:
            fault_point(point)
    fsync_dir(path.parent)


def write_json(path, obj, point: str | None = None, **dump) -> None:
    write_atomic(path, json.dumps(obj, **dump) + "\n", point)


def drop_torn_tail(path) -> None:
    """Cut a last line that a kill left without its newline (appends then start on a new line)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        back = min(size, 1 << 20)
        f.seek(size - back)
        tail = f.read(back)
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        f.truncate(size - back + cut + 1 if cut >= 0 else (0 if back == size else size))


def replace_dir(tmp: Path, final: Path, point: str) -> None:
    """`files.replace_dir` with the fault points `<point>.old_moved_aside` and `<point>.renamed`."""
    files.replace_dir(tmp, final, on_step=lambda step: fault_point(f"{point}.{step}"))
