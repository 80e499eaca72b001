"""`complexity.data.files.replace_dir`, the one way a folder is replaced (prepared data, tokenizers,
conversions, checkpoints, exports): content fsynced before the rename, the old folder kept until
the new one is in place, and no failure that leaves a partial folder or none at all; and
`new_folder`, which does the whole round with one writer per folder."""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest
from data_fixtures import held_elsewhere

from complexity.data import files
from complexity.train import durable


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "sub").mkdir()
    (path / "x").write_text(text)
    (path / "sub" / "y").write_text(text)
    return path


def _read(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def test_replaces_a_folder_or_a_file_and_fsyncs_the_new_content_first(tmp_path, monkeypatch):
    final = _folder(tmp_path / "out", "old")
    events = []
    real_fsync_path, real_replace = files.fsync_path, os.replace

    def fsync_path(path):
        events.append(("fsync", Path(path).relative_to(tmp_path).as_posix()))
        return real_fsync_path(path)

    def replace(src, dst):
        events.append(("rename", Path(src).name, Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(files, "fsync_path", fsync_path)
    monkeypatch.setattr(files.os, "replace", replace)
    files.replace_dir(_folder(tmp_path / "new", "new"), final)
    monkeypatch.undo()
    assert _read(final) == {"sub/y": "new", "x": "new"} and sorted(os.listdir(tmp_path)) == ["out"]
    # every file of the new folder is fsynced, then the old folder moved aside, then the new one in
    assert sorted(events[:2]) == [("fsync", "new/sub/y"), ("fsync", "new/x")]
    assert events[2:] == [("rename", "out", ".replaced-out"), ("rename", "new", "out")]

    (tmp_path / "file").write_text("a file where the folder goes")
    files.replace_dir(_folder(tmp_path / "new", "newer"), tmp_path / "file")
    assert _read(tmp_path / "file") == {"sub/y": "newer", "x": "newer"}
    assert sorted(os.listdir(tmp_path)) == ["file", "out"]


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    """The second rename fails (e.g. EXDEV, a permission, a full disk's metadata): the old folder
    is back under its name, unchanged, nothing is left aside, and the new one is still the
    caller's to remove."""
    final = _folder(tmp_path / "out", "old")
    new = _folder(tmp_path / "new", "new")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == new:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    for swap in (lambda: files.replace_dir(new, final), lambda: durable.replace_dir(new, final, "export")):
        monkeypatch.setattr(files.os, "replace", replace)
        with pytest.raises(OSError, match="cross-device"):
            swap()
        monkeypatch.undo()
        assert _read(final) == {"sub/y": "old", "x": "old"}
        assert sorted(os.listdir(tmp_path)) == ["new", "out"]


def test_a_failed_fsync_publishes_nothing(tmp_path, monkeypatch):
    """The disk fills when the new content is flushed: the old folder stays in place, untouched."""
    final = _folder(tmp_path / "out", "old")
    new = _folder(tmp_path / "new", "new")

    def enospc(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", enospc)
    with pytest.raises(OSError) as err:
        files.replace_dir(new, final)
    monkeypatch.undo()
    assert files.is_disk_full(err.value)
    assert _read(final) == {"sub/y": "old", "x": "old"} and sorted(os.listdir(tmp_path)) == ["new", "out"]


def test_a_kill_between_the_renames_loses_neither_copy(tmp_path):
    """Killed after the old folder was moved aside: `recover_dir` puts it back; or the next
    `replace_dir` installs its folder and removes the stale copy."""
    final = _folder(tmp_path / "out", "old")

    def killed(step):
        if step == "old_moved_aside":
            raise KeyboardInterrupt  # stands for the kill: nothing after this point runs

    with pytest.raises(KeyboardInterrupt):
        files.replace_dir(_folder(tmp_path / "new", "new"), final, on_step=killed)
    assert not final.exists() and _read(tmp_path / ".replaced-out") == {"sub/y": "old", "x": "old"}
    assert files.recover_dir(final) and _read(final) == {"sub/y": "old", "x": "old"}
    assert not files.recover_dir(final)

    with pytest.raises(KeyboardInterrupt):
        files.replace_dir(tmp_path / "new", final, on_step=killed)
    shutil.rmtree(tmp_path / "new")  # the killed caller's temporary folder (a re-run removes its own)
    files.replace_dir(_folder(tmp_path / "newer", "newer"), final)  # no `out`, a copy aside
    assert _read(final) == {"sub/y": "newer", "x": "newer"} and sorted(os.listdir(tmp_path)) == ["out"]

    # a stale copy beside a complete folder is removed by the next swap, never put back
    _folder(tmp_path / ".replaced-out", "stale")
    files.replace_dir(_folder(tmp_path / "new", "newest"), final)
    assert _read(final) == {"sub/y": "newest", "x": "newest"} and sorted(os.listdir(tmp_path)) == ["out"]


def test_new_folder_is_complete_or_absent_and_removes_only_what_killed_writers_left(tmp_path):
    """`new_folder`: the swap on success, nothing on failure; a temporary folder beside the output
    is removed only when no process holds it and it is not brand new (a writer between creating
    and holding its folder); a holder killed with SIGKILL holds nothing."""
    final = _folder(tmp_path / "out", "old")
    with pytest.raises(RuntimeError), files.new_folder(final) as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("the writer failed")
    assert _read(final) == {"sub/y": "old", "x": "old"} and sorted(os.listdir(tmp_path)) == ["out"]

    old = time.time() - 2 * files.ABANDONED_AFTER_S
    for name in ("killed", "live", "new"):
        (tmp_path / f".out.writing-{name}").mkdir()
    for name in ("killed", "live"):
        os.utime(tmp_path / f".out.writing-{name}", (old, old))
    live = tmp_path / ".out.writing-live"
    with held_elsewhere(live):  # another writer of `out`, alive until the block ends (then killed)
        with pytest.raises(FileExistsError) as err, files.held(live):
            pytest.fail("held a folder another process holds")
        assert str(err.value) == f"{live}: another process is writing in it now; wait for it to finish"
        with files.new_folder(final) as tmp:
            (tmp / "x").write_text("new")
        assert _read(final) == {"x": "new"}
        assert sorted(os.listdir(tmp_path)) == [".out.writing-live", ".out.writing-new", "out"]
    with files.held(live):  # the kernel dropped the killed writer's lock
        pass


def test_new_folder_has_the_umasks_permissions_as_any_folder_the_user_makes(tmp_path):
    # the temporary folder came from tempfile.mkdtemp (0700 whatever the umask): a converted
    # model or a tokenizer could not be read by another user, a server's included
    old = os.umask(0o022)
    try:
        with files.new_folder(tmp_path / "out") as tmp:
            (tmp / "x").write_text("new")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755


def test_an_atomic_file_onto_a_folder_names_the_folder(tmp_path):
    # the final rename used to fail with "PATH.partial: Is a directory"
    (tmp_path / "out.npy").mkdir()
    with pytest.raises(IsADirectoryError) as err:
        files.write_bytes_atomic(tmp_path / "out.npy", b"x")
    assert err.value.filename == str(tmp_path / "out.npy") and err.value.strerror == "is a folder; give a file name"
    assert [p.name for p in tmp_path.iterdir()] == ["out.npy"] and not any((tmp_path / "out.npy").iterdir())


def test_a_file_system_without_locks_writes_unguarded_and_removes_nothing(tmp_path, monkeypatch):
    """Where flock is refused (some network and FUSE mounts), writing still works, but no
    temporary folder can be told from a living writer's, so none is removed."""

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    old = time.time() - 2 * files.ABANDONED_AFTER_S
    (tmp_path / ".out.writing-other").mkdir()
    os.utime(tmp_path / ".out.writing-other", (old, old))
    (tmp_path / "work").mkdir()
    with files.held(tmp_path / "work") as locked:
        assert locked is False
    with files.new_folder(tmp_path / "out") as tmp:
        (tmp / "x").write_text("new")
    assert _read(tmp_path / "out") == {"x": "new"}
    assert sorted(os.listdir(tmp_path)) == [".out.writing-other", "out", "work"]

    def broken(fd, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.fcntl, "flock", broken)
    with pytest.raises(OSError) as err, files.held(tmp_path / "work"):
        pytest.fail("held a folder whose lock failed")
    assert err.value.errno == errno.EIO
