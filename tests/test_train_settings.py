"""The trainer's settings on the CPU: what "auto" resolves to on each machine, the compile settings
that are refused, the defaults that follow the run's length, the read-only resolved config, and
the gradient buffers that make CUDA-graph replays safe under gradient accumulation (the real
CUDA-graph runs are in tests/gpu/test_train_gpu.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_fixtures import make_tiny_data, tiny_config  # noqa: E402

from complexity.cli import main as cli_main  # noqa: E402
from complexity.train import ConfigError, Trainer, load_config, train  # noqa: E402
from complexity.train.parallelize import allocate_grads  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, one_thread):
    yield make_tiny_data(tmp_path_factory.mktemp("settings-data"))


# ----------------------------------------------------------------------------- compile: auto and refusals


@pytest.mark.parametrize(
    "device, world, scope, mode, why",
    [
        ("cuda", 1, "model", "reduce-overhead", "auto: one CUDA GPU"),
        ("cuda", 8, "layers", "default", "auto: 8 processes under torchrun"),
        ("cpu", 1, "layers", "default", "auto: the CPU"),
        ("cuda-ac", 1, "layers", "default", "auto: one CUDA GPU, with activation checkpointing"),
    ],
)
def test_compile_auto_picks_the_fastest_setting_that_works(device, world, scope, mode, why):
    ac = device.endswith("-ac")
    cfg = load_config(None, {"training.compile": True, "training.activation_checkpointing": ac})
    cfg = cfg.resolve(world_size=world, device_type=device.removesuffix("-ac"))
    assert (cfg.training.compile_scope, cfg.training.compile_mode) == (scope, mode)
    assert cfg.auto["training.compile"] == f"{scope} scope, {mode} ({why})"


def test_compile_settings_from_the_recipe_are_kept_and_said_so():
    cfg = load_config(None, {"training.compile": True, "training.compile_scope": "layers"})
    r = cfg.resolve(world_size=1, device_type="cuda")
    assert (r.training.compile_scope, r.training.compile_mode) == ("layers", "reduce-overhead")
    assert r.auto["training.compile"].endswith("(auto: one CUDA GPU; compile_scope from the recipe)")
    both = load_config(
        None, {"training.compile": True, "training.compile_scope": "layers", "training.compile_mode": "default"}
    ).resolve(world_size=1, device_type="cuda")
    assert both.auto["training.compile"] == "layers scope, default (recipe)"


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graphs_under_torchrun_are_refused_before_anything_is_built(mode):
    cfg = load_config(None, {"training.compile": True, "training.compile_mode": mode})
    with pytest.raises(
        ConfigError,
        match=rf"training.compile_mode: '{mode}' replays CUDA graphs, which are not "
        r"supported under torchrun \(2 processes\)",
    ):
        cfg.resolve(world_size=2, device_type="cuda")
    ok = load_config(None, {"training.compile": True, "training.compile_mode": "max-autotune-no-cudagraphs"})
    assert ok.resolve(world_size=2, device_type="cuda").training.compile_mode == "max-autotune-no-cudagraphs"


def test_compile_settings_without_compile_are_said_to_be_unused():
    cfg = load_config(None, {"training.compile_mode": "reduce-overhead"}).resolve(world_size=1, device_type="cuda")
    assert cfg.auto["training.compile"] == "off (compile_mode='reduce-overhead' unused: training.compile is false)"
    assert "training.compile" not in load_config(None).resolve(world_size=1, device_type="cuda").auto


# ----------------------------------------------------------------------------- defaults that follow the run


def test_defaults_follow_the_runs_length_and_given_values_are_checked():
    short = load_config(None, preset="tiny", overrides={"training.max_steps": 12}).resolve(
        world_size=1, device_type="cpu"
    )
    assert (short.schedule.warmup_steps, short.eval.every, short.checkpoint.every) == (1, 6, 6)
    assert short.auto["schedule.warmup_steps"] == "1 (auto: 10% of training.max_steps=12, at most 100)"
    long = load_config(None, {"training.max_steps": 100_000}).resolve(world_size=1, device_type="cpu")
    assert (long.schedule.warmup_steps, long.eval.every, long.checkpoint.every) == (100, 500, 500)
    given = load_config(None, {"training.max_steps": 12, "eval.every": 0, "schedule.warmup_steps": 3})
    r = given.resolve(world_size=1, device_type="cpu")
    assert (r.schedule.warmup_steps, r.eval.every) == (3, 0) and "eval.every" not in r.auto
    with pytest.raises(ConfigError, match="schedule.warmup_steps: 100 exceeds training.max_steps=12"):
        load_config(None, {"training.max_steps": 12, "schedule.warmup_steps": 100})


def test_a_default_never_fails_the_users_command(tiny_data, tmp_path, capsys):
    """`complexity train --preset tiny --data DATA --max-steps 12` used to stop with
    "schedule.warmup_steps: 100 exceeds training.max_steps=12", a value the user never chose."""
    _, data = tiny_data
    args = [
        "--preset",
        "tiny",
        "--data",
        str(data),
        "--max-steps",
        "2",
        "model.vocab_size=384",
        "model.hidden_size=64",
        "model.intermediate_size=128",
        "model.num_hidden_layers=1",
        "training.micro_batch_size=2",
        "training.seq_len=32",
        'training.device="cpu"',
        "logging.tensorboard=false",
    ]
    assert cli_main(["train", "--out", str(tmp_path / "run"), *args]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "schedule.warmup_steps: 1 (auto: 10% of training.max_steps=2, at most 100)" in err
    assert (tmp_path / "run/final/model.safetensors").is_file()
    assert "embedding rows are never trained" not in err  # 384 ids, 384 rows
    assert cli_main(["train", "--out", str(tmp_path / "bad"), *args, "schedule.warmup_steps=3"]) == 2
    assert "schedule.warmup_steps: 3 exceeds training.max_steps=2" in capsys.readouterr().err


def test_a_vocabulary_far_beyond_the_tokenizers_is_warned_about(tiny_data, tmp_path, capsys):
    """The presets' 32000 rows over a small tokenizer's data: rows no token trains, whose ids
    `complexity generate` can still sample and decode to nothing (padding to 128 is not warned)."""
    _, data = tiny_data
    args = ["--preset", "tiny", "--data", str(data), "--max-steps", "1", "model.hidden_size=64"]
    args += ["model.num_hidden_layers=1", "training.micro_batch_size=2", "training.seq_len=32"]
    args += ['training.device="cpu"', "logging.tensorboard=false", "eval.at_end=false"]
    assert cli_main(["train", "--out", str(tmp_path / "run"), *args, "model.vocab_size=1024"]) == 0
    assert (
        "warning: model.vocab_size=1024 but the data's tokenizer has 384 tokens: 640 embedding rows are never "
        "trained and their ids decode to nothing; set model.vocab_size=384"
    ) in capsys.readouterr().err


def test_the_resolved_config_is_read_only(tiny_data):
    _, data = tiny_data
    user = tiny_config(data)
    trainer = Trainer(user, progress=False)
    with pytest.raises(AttributeError, match="read-only"):
        trainer.config.training.max_steps = 5
    with pytest.raises(TypeError):
        trainer.config.model.overrides["hidden_size"] = 8
    assert user.training.precision == "auto" and trainer.config.training.precision == "fp32"  # the user's is untouched
    user.training.max_steps = 13  # an unresolved config stays editable


# ----------------------------------------------------------------------------- CUDA graphs and accumulation


class _StaticGradMul(torch.autograd.Function):
    """y = x * w whose backward hands back dw in one buffer that every call reuses, as a replayed
    CUDA graph hands back its outputs in the graph's static memory."""

    buffer = torch.zeros(3)

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        _StaticGradMul.buffer.copy_((grad * x).sum(0))
        return None, _StaticGradMul.buffer.detach()  # a new tensor over the static memory


class _StaticGradModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return _StaticGradMul.apply(x, self.w).sum()


def test_allocated_grads_keep_accumulation_out_of_graph_memory():
    """Why the trainer calls allocate_grads under CUDA graphs: a parameter without a .grad adopts
    the first micro-batch's gradient tensor, which lives in the graph's memory, and the second
    replay overwrites it (here: 2 x 20 instead of 2 + 20); with buffers allocated beforehand the
    gradients are added in place into memory the graph does not own."""
    micro_batches = [torch.full((2, 3), 1.0), torch.full((2, 3), 10.0)]
    for allocate, expected in ((False, 40.0), (True, 22.0)):
        model = _StaticGradModel()
        if allocate:
            allocate_grads(model)
        for x in micro_batches:
            model(x).backward()
        assert model.w.grad.tolist() == [expected] * 3
        assert (model.w.grad.data_ptr() == _StaticGradMul.buffer.data_ptr()) is not allocate


@pytest.mark.parametrize("scope, mode", [("layers", "default"), ("model", "reduce-overhead")])
def test_compiled_training_with_accumulation_matches_eager(tiny_data, scope, mode):
    """Two micro-batches per step, compiled per layer or as a whole model; "reduce-overhead" runs
    the trainer's CUDA-graph path (gradient buffers allocated once, zeroed in place, a new graph
    generation per micro-batch), which on the CPU replays no graph. Losses agree with eager to
    float32 rounding (the compiled kernels reorder sums)."""
    _, data = tiny_data
    base = {
        "training.max_steps": 3,
        "checkpoint.every": 0,
        "checkpoint.export_final": False,
        "training.tokens_per_step": 2 * 4 * 32,
        "model.mlp_type": "token_routed",
        "model.shared_expert": True,
        "model.mu_mode": "guidance",
    }
    eager = train(tiny_config(data, **base)).losses
    trainer = Trainer(
        tiny_config(
            data, **base, **{"training.compile": True, "training.compile_scope": scope, "training.compile_mode": mode}
        )
    )
    assert trainer.accum == 2 and trainer.cuda_graphs == (mode == "reduce-overhead")
    compiled_modules = [trainer.model] if scope == "model" else list(trainer.model.model.layers)
    assert all(m._compiled_call_impl is not None for m in compiled_modules)
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    compiled = trainer.run().losses
    assert sorted(compiled) == [1, 2, 3]
    for step in compiled:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5), (step, compiled, eager)
    if trainer.cuda_graphs:  # the same gradient buffers from the first step to the last
        assert all(g is not None for g in grads.values())
        assert all(p.grad is grads[n] for n, p in trainer.model.named_parameters())


def test_resume_under_cuda_graph_mode_restores_the_optimizer_state(tiny_data, tmp_path):
    """The gradient buffers of the CUDA-graph path are allocated after a resumed run's load:
    torch's state-dict loading creates the optimizer state only for parameters without gradients,
    so allocating first would resume with empty Adam moments. (Nothing is compiled here: the
    state is checked right after the load.)"""
    from complexity.train import checkpoint as ckpt_mod

    _, data = tiny_data
    o = {"training.max_steps": 4, "checkpoint.every": 2, "checkpoint.export_final": False}
    train(tiny_config(data, **o), out_dir=tmp_path / "run", stop_after=2)
    trainer = Trainer(
        tiny_config(data, **o, **{"training.compile": True, "training.compile_mode": "reduce-overhead"}),
        out_dir=tmp_path / "run",
        resume=True,
    )
    assert trainer.cuda_graphs and trainer.step == 2
    assert all(p.grad is not None and not p.grad.any() for p in trainer.model.parameters())
    reference = Trainer(tiny_config(data, **o), out_dir=tmp_path / "run", resume=True)
    got, want = trainer.optimizer.state_dict()["state"], reference.optimizer.state_dict()["state"]
    assert len(got) == len(want) == len(list(trainer.model.parameters()))
    for key in want:
        assert int(got[key]["step"]) == int(want[key]["step"]) == 2
        assert torch.equal(got[key]["exp_avg"], want[key]["exp_avg"]) and want[key]["exp_avg"].any()
    ckpt_mod.verify_checkpoint(tmp_path / "run/checkpoints/step_00000002")
