"""Reading and writing the project's files: atomic writes, full-disk errors, checked JSON reads.

Writes go through `AtomicFile`: the bytes land in ``PATH.partial`` and only a complete, fsynced
file is renamed to ``PATH``, so a crash, a kill -9 or a full disk never leaves a file that reads
as complete. Bytes are written with ``os.write`` (in a loop: it may write less than asked), so a
full disk surfaces as one `DiskFullError` naming the path and the bytes it needed, and the
partial file is removed.

Folders (a prepared dataset, a tokenizer, a checkpoint, an export) are built under a temporary
name and swapped in by `replace_dir`: content fsynced first, the old folder kept until the new
one is in place, never a partial folder under the final name. `new_folder` does the whole
round: a temporary folder beside the output, the swap, cleanup on failure. A folder being
written is `held` (a lock on the folder itself, dropped by the kernel when its process dies), so
a second writer of the same work folder is refused, and what a killed writer left is known as such.

Reads of JSON files raise `FileFormatError` naming the file and what is wrong with it (empty,
not UTF-8, the JSON error's line and column), never a bare "Expecting value".
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# errno values that mean "no room": the file system is full, or the user's quota is.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT}


class FileFormatError(ValueError):
    """A file exists but its content is unusable; the message names the file and the problem."""


class DiskFullError(OSError):
    """A write ran out of disk space. ``needed``: the bytes the write still needed (at least)."""

    def __init__(self, path, needed: int, *, free: int | None = None, at_least: bool = False, hint: str = ""):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.path, self.needed, self.at_least, self.hint = Path(path), int(needed), at_least, hint
        self.free = free if free is not None else free_bytes(self.path)

    def __str__(self) -> str:
        need = f"{'at least ' if self.at_least else ''}{self.needed:,} more bytes"
        free = f", {self.free:,} bytes free there" if self.free is not None else ""
        return f"{self.path}: disk full: writing it needs {need}{free}" + (f"; {self.hint}" if self.hint else "")

    def with_hint(self, hint: str) -> DiskFullError:
        """The same error, with ``hint`` added to the message."""
        return DiskFullError(
            self.path,
            self.needed,
            free=self.free,
            at_least=self.at_least,
            hint=f"{self.hint}; {hint}" if self.hint else hint,
        )


def free_bytes(path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def check_free_space(path, needed: int, what: str = "") -> None:
    """Raise `DiskFullError` before writing ``needed`` bytes at ``path`` when they do not fit."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise DiskFullError(path, needed, free=free, hint=what)


def check_parent_folders(out) -> None:
    """Refuse an output (a folder, or a file) that cannot be made because a file stands where one
    of its parent folders would be (`a/b` with `a` a file), naming that file: the OS says only
    "File exists" or "Not a directory". Folder outputs call it before any work."""
    out = Path(out)
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise NotADirectoryError(f"{out}: {parent} is a file, not a folder; choose another output path")
            return


def check_output_folder(out, *, replace: bool, how_to_replace: str) -> None:
    """Before any work: `out` can be made (`check_parent_folders`) and is absent, an empty
    folder, or a folder the caller may replace (`how_to_replace` names the flag that does)."""
    out = Path(out)
    check_parent_folders(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file, not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not replace:
        raise FileExistsError(f"{out}: exists and is not empty ({how_to_replace} replaces it)")


def is_disk_full(err: BaseException) -> bool:
    """An OSError for a full disk/quota, or the same from Rust code (``tokenizers``), which
    raises a plain Exception ending in "(os error 28)"."""
    if isinstance(err, OSError) and err.errno in _NO_ROOM:
        return True
    return any(f"(os error {code})" in str(err) for code in _NO_ROOM)


class AtomicFile:
    """A file written under ``PATH.partial`` and renamed to ``PATH`` once complete and fsynced.

    Use as a context manager: a normal exit commits, an exception removes the partial file.
    ``size`` (optional): the final size in bytes, for the full-disk message.
    """

    def __init__(self, path, *, size: int | None = None):
        self.path = Path(path)
        if self.path.is_dir():  # else the final rename fails, naming the temporary file
            raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name", str(self.path))
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.size = size
        self.written = 0
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as err:  # name the file asked for, not its temporary name
            if isinstance(err, NotADirectoryError):
                check_parent_folders(self.path)  # which part of the path is a file
            raise type(err)(err.errno, err.strerror, str(self.path)) from None

    def write(self, data) -> int:
        """Write bytes / a C-contiguous array; returns the number of bytes written."""
        view = memoryview(data)
        if not view.c_contiguous:
            view = memoryview(np.ascontiguousarray(data))
        view = view.cast("B")
        total = len(view)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as err:
                if is_disk_full(err):
                    if self.size is not None:
                        raise DiskFullError(self.path, self.size - self.written) from None
                    raise DiskFullError(self.path, len(view), at_least=True) from None
                raise OSError(err.errno, err.strerror, str(self.path)) from None
            view = view[n:]
            self.written += n
        return total

    def commit(self) -> Path:
        try:
            os.fsync(self.fd)
        except OSError as err:  # delayed allocation: a full disk can show up only here
            if is_disk_full(err):
                raise DiskFullError(self.path, self.written, at_least=True) from None
            raise
        finally:
            os.close(self.fd)
            self.fd = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def write_bytes_atomic(path, data: bytes) -> Path:
    with AtomicFile(path, size=len(data)) as f:
        f.write(data)
    return Path(path)


def write_json_atomic(path, obj, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def npy_header(dtype, shape: tuple) -> bytes:
    """The ``.npy`` (format 1.0) header ``np.save`` writes for a C-ordered array."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    )
    return buf.getvalue()


def save_npy_atomic(path, arr: np.ndarray) -> Path:
    arr = np.ascontiguousarray(arr)
    header = npy_header(arr.dtype, arr.shape)
    with AtomicFile(path, size=len(header) + arr.nbytes) as f:
        f.write(header)
        f.write(arr)
    return Path(path)


def read_json(path) -> object:
    """Parse a JSON file; `FileFormatError` names the file and the problem (line and column)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise FileFormatError(f"{path}: is a folder, expected a JSON file") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as err:
        raise FileFormatError(f"{path}: cannot read: {err.strerror}") from None
    if not raw.strip():
        raise FileFormatError(f"{path}: empty file, expected JSON")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise FileFormatError(f"{path}: not UTF-8 text (bad byte at offset {err.start}), expected JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path}: not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise FileFormatError(f"{path}: not usable JSON: nested too deeply") from None


NUMBER = (int, float)
_KINDS = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    NUMBER: "a number",
    bool: "true or false",
    object: "any value",
}


def check_fields(obj, fields: dict, where: str, remedy: str) -> dict:
    """`obj` when it is a JSON object holding `fields` (name -> a type of _KINDS) with those types;
    otherwise a `FileFormatError` "WHERE: what is wrong; REMEDY"."""
    problem = None
    if not isinstance(obj, dict):
        problem = f"expected a JSON object, found {type(obj).__name__}"
    else:
        for name, kind in fields.items():
            value = obj.get(name)
            if name not in obj:
                problem = f"the field {name!r} is missing"
            elif not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, NUMBER)):
                problem = f"the field {name!r} should be {_KINDS[kind]}, found {value!r}"
            if problem:
                break
    if problem:
        raise FileFormatError(f"{where}: {problem}; {remedy}")
    return obj


def read_json_object(path: Path, remedy: str, fields: dict | None = None) -> dict:
    """A JSON object file of a run or ablation folder. A damaged one (unreadable, not JSON, not an
    object, a field of `fields` missing or of another type: see `check_fields`) is a
    `FileFormatError` naming the file and what is wrong, followed by `remedy`: what to do about it."""
    try:
        obj = read_json(path)
    except FileFormatError as err:
        raise FileFormatError(f"{err}; {remedy}") from None
    return check_fields(obj, fields or {}, str(path), remedy)


def fsync_dir(path) -> None:
    """Make a rename inside ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        fsync_dir(d)


def _aside(final: Path) -> Path:
    return final.with_name(f".replaced-{final.name}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def replace_dir(tmp, final, on_step: Callable[[str], None] | None = None) -> Path:
    """Swap the complete folder `tmp` in as `final` (the one way a folder is replaced here).

    `tmp`'s files and folders are fsynced first, so what the rename publishes is on disk. An
    existing `final` (a folder, or a file) is moved aside to `.replaced-<name>` and deleted only
    once the new one is in place; if the second rename fails it is put back. So at every moment
    one complete copy exists: under `final` or, after a kill between the two renames, under
    `.replaced-<name>` (`recover_dir` puts it back; the next `replace_dir` removes it). `tmp` stays
    the caller's to delete on failure. `on_step` is called with "old_moved_aside" and "renamed"
    after each rename (fault injection: `complexity.train.durable`)."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = _aside(final)
    moved = False
    if final.exists() or final.is_symlink():
        _remove(old)  # a copy an interrupted swap left: `final` is complete, so it is stale
        os.replace(final, old)
        moved = True
        if on_step is not None:
            on_step("old_moved_aside")
    try:
        os.replace(tmp, final)
    except BaseException:
        if moved:
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if on_step is not None:
        on_step("renamed")
    _remove(old)  # the copy moved aside now, or one an interrupted swap left
    return final


def recover_dir(final) -> bool:
    """Finish a `replace_dir` a kill interrupted: with no `final`, its set-aside copy is put
    back; with both, the copy is deleted. -> whether a copy was put back."""
    final = Path(final)
    old = _aside(final)
    if not (old.exists() or old.is_symlink()):
        return False
    if final.exists():
        _remove(old)
        return False
    os.replace(old, final)
    fsync_dir(final.parent)
    return True


ABANDONED_AFTER_S = 60.0  # a folder this old that no process holds was left by a killed writer


@contextmanager
def held(folder) -> Iterator[bool]:
    """Hold an advisory lock on the existing `folder` while the block runs, or raise
    FileExistsError naming it when another process holds it. The lock is on the folder itself (no
    lock file to leave behind) and follows it through a rename; the kernel drops it when its
    process dies, kill -9 included, so an unheld work folder is one that nobody is writing.
    -> whether it is locked: False on a file system without locks (some network and FUSE mounts),
    where the block runs unguarded rather than not at all."""
    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = True
    except BlockingIOError:
        os.close(fd)
        raise FileExistsError(f"{folder}: another process is writing in it now; wait for it to finish") from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        locked = False
    try:
        yield locked
    finally:
        os.close(fd)


def _abandoned(folder: Path) -> bool:
    """Whether nobody holds `folder` and it was last changed long enough ago that it is not a
    writer's folder in the instant between its creation and its lock. Never where nothing can be
    locked: there a living writer's folder looks the same."""
    try:
        with held(folder) as locked:
            return locked and time.time() - folder.stat().st_mtime > ABANDONED_AFTER_S
    except (FileExistsError, FileNotFoundError):
        return False


def _writing_folder(final: Path) -> Path:
    """A new, uniquely named folder beside `final`. Made by os.mkdir, so with the umask's
    permissions: tempfile.mkdtemp's are owner-only (0700) whatever the umask, and a model or
    tokenizer folder must be as readable by others (a server's user) as any folder the user makes."""
    while True:
        tmp = final.parent / f".{final.name}.writing-{os.urandom(6).hex()}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


@contextmanager
def new_folder(final) -> Iterator[Path]:
    """A temporary folder beside `final` to write into, swapped in as `final` (`replace_dir`)
    when the block ends, deleted if it raises: `final` is never partial, and an old `final` stays
    until the new one is complete. The temporary folder is `held`; the ones killed writers of
    `final` left are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.writing-*"):
        if _abandoned(stale):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = _writing_folder(final)
    try:
        with held(tmp):
            yield tmp
            replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
