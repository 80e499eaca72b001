"""2-process `torchrun` (gloo, CPU): DDP and FSDP2 give the losses of one process with the same
global batch, and an FSDP2 checkpoint resumes on a different number of ranks.

Tolerance: 1e-5 relative. The data slots make the sequences of every step identical; what
differs is only the order of floating-point sums (gradient all-reduce / reduce-scatter vs local
accumulation), which moves the fp32 losses by ~1e-7 relative over these few steps.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_fixtures import make_tiny_data, override_args, read_losses, tiny_overrides, torchrun  # noqa: E402

from complexity.train import load_config, train  # noqa: E402
from complexity.train.checkpoint import resolve_checkpoint  # noqa: E402

STEPS = 6
RTOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("dist")
    _, data = make_tiny_data(root / "fx")
    o = tiny_overrides(
        data,
        **{
            "training.max_steps": STEPS,
            "checkpoint.every": 3,
            "model.routing": "zipf",
            "model.shared_expert": True,
            "model.mu_mode": "guidance",
        },
    )
    reference = train(load_config(None, o), out_dir=root / "single")
    yield root, o, reference.losses


def _close(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=RTOL), (step, a[step], b[step])


@pytest.mark.parametrize("dp", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, dp):
    root, o, reference = setup
    out = root / dp
    r = torchrun(2, ["train", "--out", str(out), *override_args({**o, "training.dp": dp})])
    assert r.returncode == 0, r.stderr[-4000:]
    _close(read_losses(out), reference)
    assert (out / "final/model.safetensors").is_file()


def test_fsdp_with_gradient_accumulation_matches_one_process(setup):
    """Two micro-batches per rank: FSDP2 accumulates unsharded and reduce-scatters only after the
    last one; the losses must still be those of one process with the same global batch."""
    root, o, _ = setup
    o = {
        **o,
        "training.tokens_per_step": 4 * o["training.micro_batch_size"] * o["training.seq_len"],
        "training.max_steps": 4,
        "checkpoint.every": 0,
    }
    single = train(load_config(None, o), out_dir=root / "accum-single").losses
    out = root / "accum-fsdp"
    r = torchrun(2, ["train", "--out", str(out), *override_args({**o, "training.dp": "fsdp"})])
    assert r.returncode == 0, r.stderr[-4000:]
    _close(read_losses(out), single)


def test_fsdp_checkpoint_resumes_on_one_process(setup):
    root, o, reference = setup
    out = root / "reshard"
    r = torchrun(2, ["train", "--out", str(out), "--stop-after", "3", *override_args({**o, "training.dp": "fsdp"})])
    assert r.returncode == 0, r.stderr[-4000:]
    # both ranks hashed a share of the files: meta.json lists every one, each hash right
    ckpt = resolve_checkpoint(out)
    listed = json.loads((ckpt / "meta.json").read_text())["files"]
    written = sorted(p.name for p in ckpt.iterdir() if p.name != "meta.json")
    assert sorted(listed) == written and len(written) >= 4  # .metadata, 2 shards, 2 rank states
    for name, entry in listed.items():
        assert entry["sha256"] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest(), name
    rest = train(load_config(None, o), out_dir=out, resume=True)  # 1 process, 2 micro-batches
    assert sorted(rest.losses) == [4, 5, 6]
    _close(read_losses(out), reference)


def test_fsdp_compiled_with_gradient_accumulation_matches_one_process(setup):
    """training.compile under torchrun: auto compiles per layer in the default mode (said in
    run.json); with FSDP2 and two micro-batches per rank the losses are those of one eager
    process (compiled kernels reorder sums: within RTOL)."""
    root, o, _ = setup
    o = {
        **o,
        "training.tokens_per_step": 4 * o["training.micro_batch_size"] * o["training.seq_len"],
        "training.max_steps": 3,
        "checkpoint.every": 0,
        "checkpoint.export_final": False,
    }
    single = train(load_config(None, o), out_dir=root / "compiled-single").losses
    out = root / "compiled-fsdp"
    r = torchrun(
        2,
        ["train", "--out", str(out), *override_args({**o, "training.dp": "fsdp", "training.compile": True})],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    _close(read_losses(out), single)
    run = json.loads((out / "run.json").read_text())
    assert run["auto"]["training.compile"] == "layers scope, default (auto: 2 processes on the CPU)"


def test_cuda_graphs_under_torchrun_are_refused(setup):
    root, o, _ = setup
    out = root / "graphs-fsdp"
    r = torchrun(
        2,
        [
            "train",
            "--out",
            str(out),
            *override_args(
                {**o, "training.dp": "fsdp", "training.compile": True, "training.compile_mode": "reduce-overhead"}
            ),
        ],
    )
    assert r.returncode != 0
    assert (
        "complexity train: error: training.compile_mode: 'reduce-overhead' replays CUDA graphs, which are not "
        "supported under torchrun (2 processes)" in r.stderr
    )
    assert not out.exists()
