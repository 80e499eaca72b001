"""Training on one CUDA GPU: every compile mode x scope, with and without gradient accumulation,
gives the eager run's losses and gradient norms; so does the automatic setting (whole model, CUDA
graphs) for every model variant, with a resume, and in bf16-mixed with evaluation between steps;
activation checkpointing under CUDA graphs; the pure-bf16 step.

Tolerances. float32 (TF32 off): 1e-4 relative per step, on the loss and on the global gradient
norm, over 4 optimizer steps. Compiled kernels reorder floating-point sums (~1e-6 relative);
gradients accumulated wrongly (a CUDA-graph replay overwriting the first micro-batch's gradient)
move the step-1 gradient norm and every later loss by far more. bf16-mixed: 1e-2 relative per
step (bf16 keeps 8 bits of mantissa: one rounding is 4e-3 relative, and eager and compiled round
in different places).
"""

from __future__ import annotations

import pytest
import torch
from _train_fixtures import make_tiny_data

from complexity.train import Trainer, load_config

MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
SCOPES = ("layers", "model")
STEPS = 4
FP32_RTOL = 1e-4
BF16_RTOL = 1e-2

# A small tmlr-187m: token-routed experts + shared expert + mu guidance, 2 layers.
MODEL = {
    "model.preset": "tiny",
    "model.vocab_size": 512,
    "model.hidden_size": 128,
    "model.intermediate_size": 256,
    "model.num_hidden_layers": 2,
    "model.num_attention_heads": 4,
    "model.num_key_value_heads": 2,
    "model.max_position_embeddings": 256,
    "model.mlp_type": "token_routed",
    "model.shared_expert": True,
    "model.mu_mode": "guidance",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("gpu-train-data"), vocab_size=512)[1]


@pytest.fixture(scope="module", autouse=True)
def ieee_fp32():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: fp32 compiled and eager agree to rounding
    yield
    torch.set_float32_matmul_precision(old)


def _config(data, accum: int, precision: str = "fp32", **extra):
    o = {
        **MODEL,
        "data.path": str(data),
        "training.device": "cuda",
        "training.precision": precision,
        "training.max_steps": STEPS,
        "training.micro_batch_size": 4,
        "training.seq_len": 64,
        "training.tokens_per_step": 4 * 64 * accum,
        "schedule.warmup_steps": 1,
        "optim.lr": 3e-3,
        "checkpoint.every": 0,
        "checkpoint.export_final": False,
        "eval.every": 0,
        "eval.at_end": False,
        "logging.every": 1,
        "logging.tensorboard": False,
        "logging.progress": False,
        **extra,
    }
    return load_config(None, o)


def _run(config) -> tuple[dict[int, float], dict[int, float], Trainer]:
    """(losses, gradient norms) by step, and the trainer."""
    trainer = Trainer(config, progress=False)
    norms = {}
    while trainer.step < config.training.max_steps:
        trainer.train_step()
        trainer.settle()
        norms.update({s: v[1] for s, v in trainer.read_back.items()})
    torch.compiler.reset()  # the next configuration compiles from scratch
    return dict(trainer.losses), norms, trainer


_EAGER: dict = {}


def _eager(data, accum: int, precision: str = "fp32"):
    if (accum, precision) not in _EAGER:
        losses, norms, _ = _run(_config(data, accum, precision))
        _EAGER[accum, precision] = losses, norms
    return _EAGER[accum, precision]


def _agree(got: dict, ref: dict, rtol: float, what: str) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=rtol), (what, step, got, ref)


@pytest.mark.parametrize("accum", [1, 2], ids=["accum1", "accum2"])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", MODES)
def test_compile_mode_and_scope_match_eager(data, mode, scope, accum):
    losses, norms, trainer = _run(
        _config(
            data, accum, **{"training.compile": True, "training.compile_mode": mode, "training.compile_scope": scope}
        )
    )
    assert trainer.accum == accum and trainer.cuda_graphs == (mode in ("reduce-overhead", "max-autotune"))
    ref_losses, ref_norms = _eager(data, accum)
    _agree(losses, ref_losses, FP32_RTOL, "loss")
    _agree(norms, ref_norms, FP32_RTOL, "grad norm")


@pytest.mark.parametrize(
    "variant",
    [
        {"model.mlp_type": "dense", "model.shared_expert": False, "model.mu_mode": "none"},
        {"model.mu_mode": "inl", "model.shared_expert": False, "model.routing": "modulo"},
        {"model.mlp_type": "learned_moe", "model.num_experts_per_tok": 1},
        {"model.sliding_window": 16},
        {"model.mlp_type": "hash_routed", "model.num_experts_per_tok": 2, "model.routed_output_scale": 2.0},
    ],
    ids=["dense", "inl", "learned_moe", "sliding_window", "hash_routed"],
)
def test_cuda_graphs_with_accumulation_for_every_model_variant(data, variant):
    """The automatic setting (whole model, CUDA graphs) on the other architectures the ablation
    trains (learned_moe adds its router's load-balancing loss)."""
    ref_losses, ref_norms, _ = _run(_config(data, 2, **variant))
    losses, norms, _ = _run(_config(data, 2, **variant, **{"training.compile": True}))
    _agree(losses, ref_losses, FP32_RTOL, "loss")
    _agree(norms, ref_norms, FP32_RTOL, "grad norm")


def test_auto_setting_bf16_with_eval_between_steps(data, tmp_path):
    """What a user gets on one GPU: bf16-mixed, whole model with CUDA graphs (chosen automatically),
    4 micro-batches per step, a held-out evaluation (an inference graph) between training steps,
    checkpoints and the export. Losses within bf16 tolerance of eager."""
    common = {
        **MODEL,
        "data.path": str(data),
        "training.device": "cuda",
        "training.max_steps": 6,
        "training.micro_batch_size": 4,
        "training.seq_len": 64,
        "training.tokens_per_step": 4 * 64 * 4,
        "schedule.warmup_steps": 1,
        "optim.lr": 3e-3,
        "eval.every": 2,
        "eval.max_batches": 2,
        "checkpoint.every": 3,
        "logging.every": 1,
        "logging.tensorboard": False,
        "logging.progress": False,
    }
    eager = Trainer(load_config(None, common), out_dir=tmp_path / "eager").run()
    trainer = Trainer(load_config(None, {**common, "training.compile": True}), out_dir=tmp_path / "auto")
    assert trainer.config.auto["training.compile"] == "model scope, reduce-overhead (auto: one CUDA GPU)"
    assert trainer.precision == "bf16-mixed" and trainer.cuda_graphs
    result = trainer.run()
    torch.compiler.reset()
    assert sorted(result.losses) == list(range(1, 7))
    for step, loss in eager.losses.items():
        assert result.losses[step] == pytest.approx(loss, rel=BF16_RTOL), (step, result.losses, eager.losses)
    assert result.eval["val_loss"] == pytest.approx(eager.eval["val_loss"], rel=BF16_RTOL)
    assert (tmp_path / "auto/final/model.safetensors").is_file() and result.mfu > 0


def test_activation_checkpointing_under_cuda_graphs_matches_eager(data):
    cfg = {"training.activation_checkpointing": True}
    ref_losses, ref_norms, _ = _run(_config(data, 2, **cfg))
    losses, norms, trainer = _run(
        _config(
            data,
            2,
            **cfg,
            **{"training.compile": True, "training.compile_mode": "reduce-overhead", "training.compile_scope": "model"},
        )
    )
    _agree(losses, ref_losses, FP32_RTOL, "loss")
    _agree(norms, ref_norms, FP32_RTOL, "grad norm")


def test_pure_bf16_training_step(data):
    """precision = "bf16": bf16 weights, gradients and Adam state. The first loss (same weights,
    rounded) matches bf16-mixed's within bf16 tolerance and training makes progress."""
    mixed, _ = _eager(data, 2, "bf16-mixed")
    losses, norms, trainer = _run(_config(data, 2, "bf16", **{"training.max_steps": 8, "optim.lr": 1e-2}))
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    state = trainer.optimizer.state_dict()["state"]
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in state.values())
    assert losses[1] == pytest.approx(mixed[1], rel=BF16_RTOL)
    assert all(torch.isfinite(torch.tensor(v)) for v in [*losses.values(), *norms.values()])
    assert losses[8] < losses[1] - 0.1, losses


def test_resume_under_cuda_graphs_continues_the_run(data, tmp_path):
    """Stopped after step 2 and resumed with the automatic setting (CUDA graphs, gradient buffers
    allocated after the load): the last steps match the uninterrupted run."""
    o = {
        "training.compile": True,
        "training.compile_mode": "reduce-overhead",
        "training.compile_scope": "model",
        "checkpoint.every": 2,
    }
    full, _, _ = _run(_config(data, 2, **o))
    Trainer(_config(data, 2, **o), out_dir=tmp_path / "run", stop_after=2, progress=False).run()
    torch.compiler.reset()
    rest = Trainer(_config(data, 2, **o), out_dir=tmp_path / "run", resume=True, progress=False).run().losses
    torch.compiler.reset()
    assert sorted(rest) == [3, 4]
    for step in rest:
        assert rest[step] == pytest.approx(full[step], rel=FP32_RTOL), (step, rest, full)
