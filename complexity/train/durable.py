"""Writing a run's files so that a kill -9 or a full disk at any moment loses nothing.

Every file is written whole or not at all: into a temporary name beside it, fsynced, renamed over
the old one, and the folder fsynced (`write_atomic`). A folder (a checkpoint, the exported model)
is built under a temporary name and swapped in with two renames, the old one moved aside first
and deleted only once the new one is in place (`replace_dir`); `recover_dir` finishes or undoes
a swap that a kill interrupted. Append-only logs (metrics.jsonl, the ablation's batches.jsonl)
are appended to, never rewritten; before appending again, a resumed run cuts a torn last line
(`drop_torn_tail`).

A full disk raises `DiskFullError` (an OSError, errno ENOSPC) naming the path and the bytes that
were needed, after the partial file is removed.

Fault injection: every write point calls `fault_point(name)`. With the environment variable
COMPLEXITY_KILL_AT=name (or name:N, the N-th time) the process kills itself there with SIGKILL;
tests can also set `fault_hook`, called with every name (raise from it to simulate a crash or a
full disk). tests/test_train_faults.py kills a run at each point and checks what resumes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

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


class DiskFullError(OSError):
    """The disk is full: `path` could not be written; `needed` bytes (about) were asked for."""

    def __init__(self, path, needed: int | None, what: str = "", note: str = "", free: int | None = None):
        self.path, self.needed = Path(path), needed
        if free is None:
            try:
                free = free_bytes(self.path)
            except OSError:
                pass
        need = f"needed about {_size(needed)}" if needed is not None else "needed more space"
        have = f", {_size(free)} free" if free is not None else ""
        super().__init__(
            errno.ENOSPC,
            f"{what or 'writing'} {self.path}: the disk is full ({need}{have})" + (f"; {note}" if note else ""),
        )

    def __str__(self) -> str:
        return self.strerror


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _existing_parent(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def is_disk_full(err: BaseException) -> bool:
    """Whether ENOSPC is anywhere in an exception's chain (torch.distributed.checkpoint wraps the
    writer's OSError in a CheckpointException holding per-rank failures)."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        stack += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # CheckpointException
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return False


def free_bytes(path) -> int:
    return shutil.disk_usage(_existing_parent(Path(path))).free


def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """fsync every file under `root`, then every folder (deepest first)."""
    root = Path(root)
    dirs = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            fsync_path(Path(dirpath) / f)
        dirs += [Path(dirpath) / d for d in dirnames]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_path(d)


def write_atomic(path, data: str | bytes, point: str | None = None) -> None:
    """Replace `path` with `data` whole or not at all (temp file, fsync, rename, fsync folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise DiskFullError(path, len(raw)) from None
        raise
    if point:
        fault_point(point)
    os.replace(tmp, path)
    fsync_path(path.parent)


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


def _aside(final: Path) -> Path:
    return final.with_name(f".replaced-{final.name}")


def replace_dir(tmp: Path, final: Path, point: str) -> None:
    """Swap the complete folder `tmp` in as `final`. An existing `final` is moved aside first and
    deleted only after the new one is in place: at every moment one complete copy exists under
    `final` or, between the two renames, under `.replaced-<name>` (`recover_dir` puts it back)."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = _aside(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        fault_point(f"{point}.old_moved_aside")
    os.replace(tmp, final)
    fsync_path(final.parent)
    fault_point(f"{point}.renamed")
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> bool:
    """Finish a `replace_dir` a kill interrupted: with no `final`, its set-aside copy is put
    back; with both, the copy is deleted. -> whether a copy was put back."""
    final = Path(final)
    old = _aside(final)
    if not old.exists():
        return False
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        return False
    os.replace(old, final)
    fsync_path(final.parent)
    return True
