"""`save_checkpoint` itself, on a two-layer model (CPU): the order of its writes, fsyncs and
renames, the fault points between them, what a failure at each one leaves, the full-disk
refusals, pruning, and (two gloo processes) what each rank writes and hashes.

The kill -9 runs in test_train_faults.py check that a run resumes from whatever these leave.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from complexity.data.files import DiskFullError, recover_dir
from complexity.train import checkpoint as ckpt_mod
from complexity.train import durable

pytestmark = pytest.mark.usefixtures("one_thread")

POINTS = [
    "checkpoint.dcp_saved",
    "checkpoint.rank_state_saved",
    "checkpoint.meta_written",
    "checkpoint.renamed",
    "checkpoint.pruned",
]


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _needed(model, optimizer) -> int:
    """The bytes a save asks for: every tensor of the model and the optimizer state + 16 MiB."""
    tensors = [*model.state_dict().values(), *(t for s in optimizer.state.values() for t in s.values())]
    return sum(t.numel() * t.element_size() for t in tensors) + 16 * 2**20


def _save(ckpt_dir: Path, step: int, keep_last: int = 2) -> Path:
    model, optimizer = _trained()
    return ckpt_mod.save_checkpoint(ckpt_dir, step, model, optimizer, {"run": "r"}, {"slot": step}, keep_last)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def fault_hook():
    """Sets `durable.fault_hook` for one test, and always clears it."""

    def set_hook(fn):
        durable.fault_hook = fn

    yield set_hook
    durable.fault_hook = None


def test_writes_fsyncs_and_renames_in_order(tmp_path, monkeypatch, fault_hook):
    """Our writes, after DCP's: the rank state, meta.json last, every file and the folder
    fsynced before the rename publishes it; the parent folder fsynced after it; then pruning."""
    ckpts = tmp_path / "ckpts"
    for step in (1, 2):
        _save(ckpts, step)
    events = []

    def where(path) -> str:
        return os.path.relpath(path, ckpts)

    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(f"fsync {where(os.readlink(f'/proc/self/fd/{fd}'))}")
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(f"replace {where(src)} -> {where(dst)}")
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fault_hook(lambda point: events.append(f"{point}: {_names(ckpts)}"))
    _save(ckpts, 3)
    monkeypatch.undo()

    start = events.index("checkpoint.dcp_saved: ['.tmp-step_00000003', 'step_00000001', 'step_00000002']")
    assert all(e.startswith("fsync .tmp-step_00000003/") for e in events[:start])  # DCP's own files
    tmp = ".tmp-step_00000003"
    published = events.index(f"replace {tmp} -> step_00000003")
    tree = events[events.index(f"checkpoint.meta_written: {[tmp, 'step_00000001', 'step_00000002']}") + 1 : published]
    files = ["meta.json", "rank_00000.json", ".metadata", "__0_0.distcp"]
    assert sorted(tree[:-1]) == sorted(f"fsync {tmp}/{name}" for name in files) and tree[-1] == f"fsync {tmp}"
    assert events[start:] == [
        f"checkpoint.dcp_saved: {[tmp, 'step_00000001', 'step_00000002']}",
        f"fsync {tmp}/rank_00000.json.partial",
        f"replace {tmp}/rank_00000.json.partial -> {tmp}/rank_00000.json",
        f"fsync {tmp}",
        f"checkpoint.rank_state_saved: {[tmp, 'step_00000001', 'step_00000002']}",
        f"fsync {tmp}/meta.json.partial",
        f"replace {tmp}/meta.json.partial -> {tmp}/meta.json",
        f"fsync {tmp}",
        f"checkpoint.meta_written: {[tmp, 'step_00000001', 'step_00000002']}",
        *tree,
        f"replace {tmp} -> step_00000003",
        "fsync .",
        "checkpoint.renamed: ['step_00000001', 'step_00000002', 'step_00000003']",
        "checkpoint.pruned: ['step_00000002', 'step_00000003']",
    ]


def test_meta_json_lists_every_file_with_its_size_and_hash(tmp_path):
    final = _save(tmp_path, 7)
    assert final == tmp_path / "step_00000007" and _names(tmp_path) == ["step_00000007"]
    meta = json.loads((final / "meta.json").read_text())
    assert set(meta) == {"run", "step", "saved_at", "files"} and meta["run"] == "r" and meta["step"] == 7
    assert sorted(meta["files"]) == [".metadata", "__0_0.distcp", "rank_00000.json"]
    for name, entry in meta["files"].items():
        data = (final / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert json.loads((final / "rank_00000.json").read_text()) == {"slot": 7}
    assert ckpt_mod.verify_checkpoint(final)["step"] == 7


@pytest.mark.parametrize("point", POINTS)
def test_a_failure_at_each_point_keeps_every_finished_checkpoint(tmp_path, fault_hook, point):
    """Before the rename: the new checkpoint is gone, its .tmp folder removed. After it: the new
    one is complete; the older ones are pruned only after that."""
    for step in (1, 2):
        _save(tmp_path, step)

    def crash(reached):
        if reached == point:
            raise RuntimeError(f"crash at {reached}")

    fault_hook(crash)
    with pytest.raises(RuntimeError, match=f"crash at {point}"):
        _save(tmp_path, 3)
    published = POINTS.index(point) >= POINTS.index("checkpoint.renamed")
    kept = {
        "checkpoint.renamed": ["step_00000001", "step_00000002", "step_00000003"],
        "checkpoint.pruned": ["step_00000002", "step_00000003"],
    }.get(point, ["step_00000001", "step_00000002"])
    assert _names(tmp_path) == kept
    for folder in kept:
        assert ckpt_mod.verify_checkpoint(tmp_path / folder)["step"] == int(folder[-1])
    assert published == (ckpt_mod.latest_checkpoint(tmp_path).name == "step_00000003")


def test_saving_a_step_again_replaces_it_and_a_crash_between_the_renames_is_recoverable(tmp_path, fault_hook):
    _save(tmp_path, 1)
    old = (tmp_path / "step_00000001/meta.json").read_text()
    reached = []
    fault_hook(reached.append)
    _save(tmp_path, 1)
    assert reached == [*POINTS[:3], "checkpoint.old_moved_aside", *POINTS[3:]]
    assert _names(tmp_path) == ["step_00000001"] and (tmp_path / "step_00000001/meta.json").read_text() != old

    old = (tmp_path / "step_00000001/meta.json").read_text()

    def crash(point):
        if point == "checkpoint.old_moved_aside":
            raise RuntimeError("crash between the renames")

    fault_hook(crash)
    with pytest.raises(RuntimeError, match="between the renames"):
        _save(tmp_path, 1)
    assert _names(tmp_path) == [".replaced-step_00000001"]  # the new copy's .tmp folder is removed
    assert recover_dir(tmp_path / "step_00000001") and _names(tmp_path) == ["step_00000001"]
    assert (tmp_path / "step_00000001/meta.json").read_text() == old
    ckpt_mod.verify_checkpoint(tmp_path / "step_00000001")


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_keep_last_prunes_the_oldest(tmp_path, keep_last):
    for step in range(1, 5):
        _save(tmp_path, step, keep_last)
    assert _names(tmp_path) == [f"step_{s:08d}" for s in range(5 - keep_last, 5)]


def test_a_full_disk_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    (tmp_path / ".tmp-step_00000002").mkdir()  # what a killed save left
    (tmp_path / ".tmp-step_00000002/__0_0.distcp").write_bytes(b"x" * 100)
    monkeypatch.setattr(ckpt_mod, "free_bytes", lambda path: 1000)
    model, optimizer = _trained()
    with pytest.raises(DiskFullError) as err:
        ckpt_mod.save_checkpoint(tmp_path, 3, model, optimizer, {}, {}, 2)
    assert str(err.value) == (
        f"{tmp_path / 'step_00000003'}: disk full: writing it needs {_needed(model, optimizer):,} more bytes, "
        f"1,000 bytes free there; checkpoint not written; the last checkpoint, {tmp_path / 'step_00000001'}, is intact"
    )
    assert _names(tmp_path) == ["step_00000001"]  # the leftover is removed, before the free space is measured

    with pytest.raises(DiskFullError, match=r"checkpoint not written; no earlier checkpoint exists$"):
        ckpt_mod.save_checkpoint(tmp_path / "fresh", 3, model, optimizer, {}, {}, 2)
    assert _names(tmp_path / "fresh") == []


def test_a_full_disk_while_writing_names_the_checkpoint_and_leaves_nothing(tmp_path, fault_hook):
    _save(tmp_path, 1)

    def enospc(point):
        if point == "checkpoint.rank_state_saved":
            raise OSError(errno.ENOSPC, "No space left on device")

    fault_hook(enospc)
    model, optimizer = _trained()
    with pytest.raises(DiskFullError) as err:
        ckpt_mod.save_checkpoint(tmp_path, 2, model, optimizer, {}, {}, 2)
    needed = f"{_needed(model, optimizer):,}"
    assert re.fullmatch(
        re.escape(f"{tmp_path / 'step_00000002'}: disk full: writing it needs {needed} more bytes, ")
        + r"[\d,]+ bytes free there"
        + re.escape(f"; checkpoint not written; the last checkpoint, {tmp_path / 'step_00000001'}, is intact"),
        str(err.value),
    ), str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert _names(tmp_path) == ["step_00000001"]


# ----------------------------------------------------------------------------- two gloo processes


def _two_ranks(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        hashed, real_sha256 = [], ckpt_mod._sha256
        ckpt_mod._sha256 = lambda path: hashed.append(path.name) or real_sha256(path)
        ckpts = Path(out) / "ckpts"
        for step in (1, 2):
            model, optimizer = _trained()
            final = ckpt_mod.save_checkpoint(ckpts, step, model, optimizer, {"run": "r"}, {"rank": rank}, 1)
        if rank == 0:  # only rank 0 measures the free space; the others learn it from rank 0
            ckpt_mod.free_bytes = lambda path: 1000
        try:
            ckpt_mod.save_checkpoint(ckpts, 3, model, optimizer, {}, {}, 1)
            refused = None
        except DiskFullError as err:
            refused = str(err)
        result = {"final": str(final), "hashed": hashed, "refused": refused, "needed": _needed(model, optimizer)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_each_write_their_state_and_hash_a_share(tmp_path):
    """Every rank writes its rank state and hashes every other file of the sorted list; rank 0
    gathers the hashes into meta.json, prunes, and decides the free space for all."""
    torch.multiprocessing.spawn(_two_ranks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ckpts = tmp_path / "ckpts"
    final = ckpts / "step_00000002"
    assert [r["final"] for r in results] == [str(final)] * 2 and _names(ckpts) == ["step_00000002"]
    listed = json.loads((final / "meta.json").read_text())["files"]
    written = sorted(p.name for p in final.iterdir() if p.name != "meta.json")
    assert sorted(listed) == written and {"rank_00000.json", "rank_00001.json", ".metadata"} <= set(written)
    for name, entry in listed.items():
        assert entry["sha256"] == hashlib.sha256((final / name).read_bytes()).hexdigest(), name
    for rank in range(2):
        assert json.loads((final / f"rank_{rank:05d}.json").read_text()) == {"rank": rank}
        assert results[rank]["hashed"] == written[rank::2] * 2  # the same share at each of the two saves
    refused = (
        f"{ckpts / 'step_00000003'}: disk full: writing it needs {results[0]['needed'] * 2 - 16 * 2**20:,} more "
        f"bytes, 1,000 bytes free there; checkpoint not written; the last checkpoint, {final}, is intact"
    )
    assert [r["refused"] for r in results] == [refused, refused]
