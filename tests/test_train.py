"""`complexity train` on CPU: convergence, exact resume, atomic checkpoints, spike guard, export,
and the bad inputs that must fail before any compute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_fixtures import REPO, make_tiny_data, override_args, read_losses, tiny_config, tiny_overrides  # noqa: E402
from data_fixtures import held_elsewhere  # noqa: E402

from complexity.cli import main as cli_main  # noqa: E402
from complexity.train import (  # noqa: E402
    ConfigError,
    Trainer,
    durable,  # noqa: E402
    load_config,
    spike_injection,
    train,
)
from complexity.train import checkpoint as ckpt_mod  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("train-data"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """A 24-step run with eval, checkpoints and the final export (shared by several tests)."""
    _, data = tiny_data
    out = tmp_path_factory.mktemp("runs") / "converge"
    cfg = tiny_config(data, **{"training.max_steps": 24, "eval.every": 12, "logging.tensorboard": True})
    result = train(cfg, out_dir=out)
    return out, result


def test_tiny_run_converges_and_logs(trained_run):
    out, result = trained_run
    losses = result.losses
    assert len(losses) == 24
    assert losses[24] < losses[1] - 2.0, losses  # ~6.0 -> ~3.2 on the templated corpus
    assert result.eval["val_loss"] < 4.0 and result.eval["val_bpb"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 25))
    assert all({"step", "loss", "lr", "tokens_per_s", "mfu"} <= r.keys() for r in train_lines)
    assert train_lines[0]["mfu"] is None  # CPU: n/a
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [12, 24] and all("val_bpb" in r for r in evals)
    assert all(r["eval_time_s"] > 0 for r in evals)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    resolved = json.loads((out / "resolved.json").read_text())
    assert resolved["training"]["tokens_per_step"] == 256 and resolved["model"]["hidden_size"] == 64
    assert [p.name for p in ckpt_mod.list_checkpoints(out / "checkpoints")] == ["step_00000020", "step_00000024"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 24 and summary["world_size"] == 1 and summary["device"] == "cpu"
    assert summary["tokens_per_s"] == result.tokens_per_s > 0 and summary["peak_memory_gib"] is None
    # where the loop's time went: two evaluations, two checkpoints (steps 20 and 24), the export
    wall = summary["wall_time_s"]
    assert set(wall) == {"total", "eval", "checkpoint", "export"} and all(t > 0 for t in wall.values())
    assert wall["eval"] == pytest.approx(sum(r["eval_time_s"] for r in evals))
    assert wall["total"] > wall["eval"] + wall["checkpoint"] + wall["export"]


def test_export_loads_with_automodel(trained_run, tiny_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import complexity  # noqa: F401

    out, _ = trained_run
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tok.encode("The cat sees the ball today.")])
    # Same weights as the last training checkpoint.
    from complexity.train.eval import load_for_eval

    ref, _ = load_for_eval(out, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref.eval()(ids).logits, rtol=0, atol=0)
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5


def test_resume_is_bitwise_identical(tiny_data, tmp_path, one_thread):
    _, data = tiny_data
    cfg = lambda: tiny_config(data, **{"training.max_steps": 10, "checkpoint.every": 4})  # noqa: E731
    full = train(cfg(), out_dir=tmp_path / "full")
    part = train(cfg(), out_dir=tmp_path / "part", stop_after=6)
    assert part.interrupted and part.step == 6
    rest = train(cfg(), out_dir=tmp_path / "part", resume=True)
    assert sorted(rest.losses) == list(range(7, 11))
    for step in range(1, 11):
        got = part.losses.get(step, rest.losses.get(step))
        assert got == full.losses[step], (step, got, full.losses[step])  # bitwise
    assert read_losses(tmp_path / "part") == full.losses  # metrics.jsonl continued cleanly
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full/final/model.safetensors"), load_file(tmp_path / "part/final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_and_resume_matches(tiny_data, tmp_path, one_thread):
    """Kill a CLI subprocess with SIGTERM mid-run; --resume continues with identical losses."""
    _, data = tiny_data
    o = tiny_overrides(data, **{"training.max_steps": 400, "checkpoint.every": 0})
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "complexity.cli", "train", "--out", str(out), *override_args(o)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = ckpt_mod.read_meta(ckpt_mod.latest_checkpoint(out / "checkpoints"))["step"]
    assert 3 <= stopped < 400
    # Resume and run 3 more steps (--stop-after), then compare with an uninterrupted reference.
    assert cli_main(["train", "--out", str(out), "--resume", "--stop-after", str(stopped + 3), *override_args(o)]) == 0
    ref = train(load_config(None, o), out_dir=tmp_path / "ref", stop_after=stopped + 3)
    got = read_losses(out)
    assert sorted(got) == list(range(1, stopped + 4))
    assert got == ref.losses


def test_kill_during_save_keeps_previous_checkpoint(tiny_data, tmp_path):
    _, data = tiny_data
    cfg = tiny_config(data, **{"training.max_steps": 12, "checkpoint.every": 4})
    calls = []

    def fail_on_second_save(phase):
        calls.append(phase)
        if phase == "checkpoint.rank_state_saved" and calls.count(phase) == 2:
            raise RuntimeError("injected crash mid-save")

    durable.fault_hook = fail_on_second_save
    try:
        with pytest.raises(RuntimeError, match="injected crash"):
            train(cfg, out_dir=tmp_path / "run")
    finally:
        durable.fault_hook = None
    ckpts = tmp_path / "run/checkpoints"
    assert [p.name for p in ckpt_mod.list_checkpoints(ckpts)] == ["step_00000004"]
    assert not (ckpts / ".tmp-step_00000008").exists()  # a failed save cleans up after itself
    resumed = train(
        tiny_config(data, **{"training.max_steps": 12, "checkpoint.every": 4}), out_dir=tmp_path / "run", resume=True
    )
    assert min(resumed.losses) == 5 and resumed.step == 12
    assert not (ckpts / ".tmp-step_00000008").exists()


@pytest.mark.parametrize("log_every", [1, 50])
def test_spike_guard_skips_and_restores(tiny_data, tmp_path, log_every):
    """log_every=1 reads every step back at once; with 50 the verdicts come back one step late
    (steps 20 and 21 are not log steps), and the restore must still precede step 22's update."""
    _, data = tiny_data
    cfg = tiny_config(
        data,
        **{
            "training.max_steps": 22,
            "checkpoint.every": 8,
            "spike.factor": 1.4,
            "spike.window": 5,
            "spike.min_history": 5,
            "spike.max_consecutive": 2,
            "logging.every": log_every,
        },
    )
    trainer = Trainer(cfg, out_dir=tmp_path / "run", callbacks=spike_injection([20, 21], vocab_size=384, lr_mult=1.0))
    result = trainer.run()
    events = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    events = [e for e in events if "event" in e]
    assert [(e["step"], e["event"]) for e in events] == [(20, "spike_skipped"), (21, "spike_skipped"), (21, "restored")]
    assert events[-1]["checkpoint"].endswith("step_00000016")
    # The optimizer state came back from step 16; only step 22 updated it since.
    state = trainer.optimizer.state_dict()["state"]
    assert int(next(iter(state.values()))["step"]) == 17
    assert result.step == 22 and torch.isfinite(torch.tensor(result.losses[22]))


def test_spike_guard_running_mean_and_state_round_trip():
    """The device-side guard: the mean covers the last `window` good losses, spikes and non-finite
    values stay out of it, and its state (oldest first, as a list) reloads to the same verdicts."""
    from complexity.train.config import SpikeSection
    from complexity.train.trainer import SpikeGuard

    cfg = SpikeSection(factor=2.0, window=3, min_history=2)
    guard = SpikeGuard(cfg, torch.device("cpu"))
    one = torch.tensor(1.0)
    codes = []
    for loss in [1.0, 2.0, float("nan"), 3.0, 4.0, 100.0]:
        code, mean = guard.check(torch.tensor(loss), one)
        codes.append(int(code))
    assert codes == [0, 0, 1, 0, 0, 3]
    assert guard.state_dict()["history"] == [2.0, 3.0, 4.0]  # the window kept the last three, in order
    assert float(mean) == 3.0
    assert int(guard.check(one, torch.tensor(float("inf")))[0]) == 2
    restored = SpikeGuard(cfg, torch.device("cpu"))
    restored.load_state_dict(guard.state_dict())
    for loss in [6.5, 5.0, 30.0]:
        assert int(restored.check(torch.tensor(loss), one)[0]) == int(guard.check(torch.tensor(loss), one)[0])
    assert restored.state_dict() == guard.state_dict()


def test_clip_as_fused_adamw_divisor_equals_clipping_the_gradients():
    """The trainer clips through fused AdamW's grad_scale; that must equal clip_grads_with_norm_
    followed by a plain AdamW step, for norms above and below the limit."""
    from complexity.train.optimizer import clip_divisor

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    fused = [torch.nn.Parameter(t.clone()) for t in init]
    plain = [torch.nn.Parameter(t.clone()) for t in init]
    opt_fused = torch.optim.AdamW(fused, lr=0.01, fused=True)
    opt_plain = torch.optim.AdamW(plain, lr=0.01, foreach=False)
    for scale in (10.0, 0.01, 3.0):  # clipped, not clipped, clipped
        grads = [scale * torch.randn(t.shape, generator=gen) for t in init]
        for p, g in zip(fused, grads):
            p.grad = g.clone()
        for p, g in zip(plain, grads):
            p.grad = g.clone()
        norm = torch.nn.utils.get_total_norm([p.grad for p in fused])
        opt_fused.grad_scale = clip_divisor(norm, 1.0)
        opt_fused.step()
        torch.nn.utils.clip_grads_with_norm_(plain, 1.0, norm)
        opt_plain.step()
        for a, b in zip(fused, plain):
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-6)


def test_lr_schedules():
    from complexity.train.config import OptimSection, ScheduleSection
    from complexity.train.optimizer import lr_at

    o = OptimSection(lr=1.0, min_lr=0.1)
    cos = ScheduleSection(kind="cosine", warmup_steps=10)
    assert lr_at(0, o, cos, 100) == pytest.approx(0.1) and lr_at(9, o, cos, 100) == pytest.approx(1.0)
    assert lr_at(100, o, cos, 100) == pytest.approx(0.1) and lr_at(55, o, cos, 100) == pytest.approx(0.55)
    wsd = ScheduleSection(kind="wsd", warmup_steps=10, decay_fraction=0.2)
    assert lr_at(79, o, wsd, 100) == 1.0 and lr_at(90, o, wsd, 100) == pytest.approx(0.55)
    assert lr_at(100, o, wsd, 100) == pytest.approx(0.1)


def test_param_groups_no_decay_rules():
    from complexity import ComplexityConfig, ComplexityForCausalLM
    from complexity.train.config import OptimSection
    from complexity.train.optimizer import param_groups

    cfg = ComplexityConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        mu_mode="guidance",
        shared_expert=True,
    )
    groups = param_groups(ComplexityForCausalLM(cfg), OptimSection())
    decay, no_decay = groups[0]["names"], groups[1]["names"]
    assert "model.embed_tokens.weight" in no_decay and "model.mu_init" in no_decay
    assert all(n.endswith(("norm.weight", ".mu", "mu_init", "embed_tokens.weight", ".bias")) for n in no_decay)
    assert "model.layers.0.mlp.experts.gate_up_proj" in decay and "model.layers.0.mu_guidance.mu_proj.weight" in decay
    groups = param_groups(ComplexityForCausalLM(cfg), OptimSection(decay_embeddings=True))
    assert "model.embed_tokens.weight" in groups[0]["names"]


def test_zipf_table_built_from_data_counts(tiny_data, tmp_path):
    import numpy as np

    from complexity.routing import build_routing_table

    _, data = tiny_data
    cfg = tiny_config(
        data,
        **{"model.routing": "zipf", "training.max_steps": 4, "checkpoint.export_final": False, "eval.at_end": False},
    )
    trainer = Trainer(cfg, out_dir=None)
    counts = np.load(data / "token_counts.npy")
    assert torch.equal(trainer.model.model.token_to_expert, build_routing_table("zipf", 384, 4, counts=counts))


# ----------------------------------------------------------------------------- bad input


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_compile_settings_are_refused():
    with pytest.raises(ConfigError, match="training.compile_mode"):
        load_config(None, {"training.compile_mode": "fastest"})
    with pytest.raises(ConfigError, match="training.compile_scope"):
        load_config(None, {"training.compile_scope": "everything"})


def test_unknown_recipe_key_and_preset(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.micro_batch: unknown key"):
        load_config(_write(tmp_path / "a.toml", "[training]\nmicro_batch = 4\n"))
    with pytest.raises(ConfigError, match=r"model\.hidden_sise: unknown model config field"):
        load_config(_write(tmp_path / "b.toml", "[model]\npreset = 'tiny'\nhidden_sise = 4\n"))
    with pytest.raises(ConfigError, match="unknown key 'trainig'"):
        load_config(_write(tmp_path / "c.toml", "[trainig]\nseed = 1\n"))
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config(None, preset="huge")
    with pytest.raises(ConfigError, match="training.precision"):
        load_config(None, ["training.precision=fp8"])
    assert cli_main(["train", "--config", str(tmp_path / "a.toml"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


BAD_RECIPE_VALUES = [
    ("optim.weight_decay=nan", "optim.weight_decay: expected a finite number, got nan"),
    ("optim.grad_clip=inf", "optim.grad_clip: expected a finite number or none, got inf"),
    ("spike.factor=nan", "spike.factor: expected a finite number, got nan"),
    ("optim.eps=0", "optim.eps: must be > 0, got 0.0"),
    ('optim.betas=["a", "b"]', "optim.betas: expected two numbers in [0, 1), got ['a', 'b']"),
    ("training.seed=-1", "training.seed: must lie in [0, 2**32), got -1"),
    ("training.seed=4294967296", "training.seed: must lie in [0, 2**32), got 4294967296"),
    ('model.shared_expert="no"', "model: ComplexityConfig.shared_expert: must be true or false, got 'no'"),
    ('model.vocab_size="8k"', "model: ComplexityConfig.vocab_size: must be a positive integer, got '8k'"),
]


@pytest.mark.parametrize("override,message", BAD_RECIPE_VALUES, ids=[o for o, _ in BAD_RECIPE_VALUES])
def test_bad_recipe_values_name_the_field(override, message, tmp_path, capsys):
    # nan / inf / a wrong type used to pass the range checks (nan < 0 is false) or fail later
    # with a bare TypeError or torch's own message
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message
    assert cli_main(["train", "--preset", "tiny", "--out", str(tmp_path / "o"), override]) == 2
    assert capsys.readouterr().err.strip() == f"complexity train: error: {message}"
    assert not (tmp_path / "o").exists()


def test_tokens_per_step_must_divide(tiny_data, tmp_path):
    _, data = tiny_data
    cfg = tiny_config(data, **{"training.tokens_per_step": 300})
    with pytest.raises(ConfigError, match="tokens_per_step: 300 is not divisible"):
        Trainer(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_data_from_another_vocabulary_is_refused(tiny_data, tmp_path):
    _, data = tiny_data
    cfg = tiny_config(data, **{"model.vocab_size": 300})
    with pytest.raises(ValueError, match="vocab size 384 but the model has only 300"):
        Trainer(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_too_little_data_is_refused(tiny_data, tmp_path):
    _, data = tiny_data
    cfg = tiny_config(
        data, **{"training.micro_batch_size": 128, "training.seq_len": 128, "training.tokens_per_step": 128 * 128 * 2}
    )
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_output_folder_of_another_run_and_resume_mismatch(trained_run, tiny_data, tmp_path):
    out, _ = trained_run
    _, data = tiny_data
    before = sorted(p.name for p in out.iterdir())
    mtime = (out / "metrics.jsonl").stat().st_mtime
    with pytest.raises(FileExistsError, match="already holds another run"):
        Trainer(tiny_config(data, **{"training.max_steps": 24}), out_dir=out)
    with pytest.raises(ValueError, match=r"different config:\n  optim.lr"):
        Trainer(tiny_config(data, **{"training.max_steps": 24, "optim.lr": 1e-3}), out_dir=out, resume=True)
    assert sorted(p.name for p in out.iterdir()) == before and (out / "metrics.jsonl").stat().st_mtime == mtime
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a training run"):
        Trainer(tiny_config(data), out_dir=tmp_path / "other", overwrite=True)
    assert (tmp_path / "other/notes.txt").read_text() == "mine"


def test_a_folder_a_running_run_holds_is_refused_before_anything_is_touched(trained_run, tiny_data, tmp_path):
    """`train` holds its run folder: a second run into it (here a --resume while the first is in
    fact still running) stops at once; a folder made for a run that fails before writing anything
    is removed again."""
    out, _ = trained_run
    _, data = tiny_data
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with held_elsewhere(out), pytest.raises(FileExistsError) as err:
        train(tiny_config(data, **{"training.max_steps": 30}), out_dir=out, resume=True)
    assert str(err.value) == (
        f"output folder {out} is being written by another training run that is still running: "
        "wait for it to end, stop it, or choose another --out"
    )
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(FileNotFoundError):
        train(tiny_config(tmp_path / "no-data"), out_dir=tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("flags", [[], ["--resume"], ["--overwrite"]], ids=["fresh", "resume", "overwrite"])
def test_output_path_that_is_a_file_is_refused(flags, tiny_data, tmp_path, capsys):
    # the folder's own mkdir used to fail late with a bare "FILE: File exists"
    _, data = tiny_data
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert cli_main(["train", "--out", str(file), *flags, *override_args(tiny_overrides(data))]) == 2
    message = f"output folder {file} is a file, not a run folder: choose another --out"
    assert capsys.readouterr().err.strip() == f"complexity train: error: {message}"
    assert file.read_text() == "mine"
