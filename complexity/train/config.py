"""Training configuration: dataclasses with validation, TOML recipes, `section.key=value` overrides.

A recipe is a TOML file with the sections below (every key optional, unknown keys are errors):

    out = "runs/tiny"                 # run folder (CLI --out wins)
    [model]      preset = "tiny", plus any ComplexityConfig field (hidden_size = 64, mu_mode = "guidance", ...)
    [data]       path (a `complexity data prepare` folder) | synthetic = true (random tokens, benchmarks)
    [optim]      lr, min_lr, betas, eps, weight_decay, decay_embeddings, decay_norms_and_biases, grad_clip
    [schedule]   kind ("cosine" | "wsd" | "constant"), warmup_steps, decay_fraction (wsd)
    [training]   seed, max_steps, micro_batch_size, seq_len, tokens_per_step, precision, compile,
                 compile_mode, compile_scope, activation_checkpointing, dp ("ddp" | "fsdp"),
                 fsdp_reshard_after_forward, device
    [checkpoint] every, keep_last, save_on_signal, export_final
    [eval]       every, max_batches, at_end
    [logging]    every, tensorboard, wandb, wandb_project, peak_flops, progress
    [spike]      enabled, factor, window, min_history, max_consecutive

`load_config(path, overrides)` returns a validated `RunConfig`; `RunConfig.to_dict()` is the
resolved form saved in every run folder (`resolved.json`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configuration_complexity import PRESETS, ComplexityConfig


class ConfigError(ValueError):
    """A recipe key or value is wrong; the message names it."""


def _model_fields() -> set[str]:
    sig = inspect.signature(ComplexityConfig.__init__)
    names = {n for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD}
    return names


@dataclass
class ModelSection:
    preset: str = "tiny"
    # Any ComplexityConfig field (vocab_size, hidden_size, mlp_type, routing, mu_mode, ...).
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; available: {', '.join(PRESETS)}")
        allowed = _model_fields()
        for key in self.overrides:
            if key not in allowed:
                raise ConfigError(f"model.{key}: unknown model config field")
        self.build()  # ComplexityConfig raises ValueError naming the field

    def build(self) -> ComplexityConfig:
        try:
            return ComplexityConfig.from_preset(self.preset, **self.overrides)
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None


@dataclass
class DataSection:
    path: str | None = None        # a `complexity data prepare` output folder
    synthetic: bool = False        # uniform random tokens (throughput benchmarks; no eval, no export tokenizer)

    def validate(self) -> None:
        if self.synthetic and self.path:
            raise ConfigError("data: set either data.path or data.synthetic = true, not both")


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr: float = 3e-5            # the floor the decay ends at
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # weight decay on embed_tokens (= tied lm_head)
    decay_norms_and_biases: bool = False  # ... on norms, biases and mu base/init vectors (all 1-D)
    grad_clip: float | None = 1.0   # max global grad norm; None/0 = no clipping

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr: must lie in [0, optim.lr={self.lr}], got {self.min_lr}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip: must be >= 0, got {self.grad_clip}")


@dataclass
class ScheduleSection:
    kind: str = "cosine"            # "cosine" | "wsd" (warmup-stable-decay, linear decay) | "constant"
    warmup_steps: int = 100
    decay_fraction: float = 0.2     # wsd: the last fraction of training decays to optim.min_lr

    def validate(self) -> None:
        if self.kind not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"schedule.kind: unknown value {self.kind!r}; expected cosine, wsd or constant")
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"schedule.decay_fraction: must lie in (0, 1], got {self.decay_fraction}")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


@dataclass
class TrainingSection:
    seed: int = 0
    max_steps: int = 1000           # optimizer steps; also the length of the LR schedule
    micro_batch_size: int = 8       # sequences per rank per forward/backward
    seq_len: int = 2048
    tokens_per_step: int | None = None  # global tokens per optimizer step; None = micro * seq * world (no accumulation)
    precision: str = "auto"         # "auto" (fp32 on CPU, bf16-mixed on GPU) | "fp32" | "bf16-mixed" | "bf16"
    compile: bool = False           # torch.compile each decoder layer (and the loss)
    compile_mode: str = "default"   # torch.compile mode: "default" | "reduce-overhead" (CUDA graphs)
                                    # | "max-autotune-no-cudagraphs" | "max-autotune"
    compile_scope: str = "layers"   # "layers": each decoder layer | "model": the whole model as one graph
    activation_checkpointing: bool = False
    dp: str = "ddp"                 # data parallelism under torchrun: "ddp" | "fsdp" (FSDP2 fully_shard)
    fsdp_reshard_after_forward: bool = True  # False: keep each layer's gathered weights from forward to
                                    # backward (one all-gather per micro-batch instead of two, more memory)
    device: str = "auto"            # "auto" | "cpu" | "cuda"

    def validate(self) -> None:
        for name in ("max_steps", "micro_batch_size", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"training.{name}: must be a positive integer, got {v!r}")
        if self.tokens_per_step is not None and (not isinstance(self.tokens_per_step, int) or self.tokens_per_step <= 0):
            raise ConfigError(f"training.tokens_per_step: must be a positive integer, got {self.tokens_per_step!r}")
        if self.precision not in ("auto", "fp32", "bf16-mixed", "bf16"):
            raise ConfigError(f"training.precision: unknown value {self.precision!r}; expected auto, fp32, bf16-mixed or bf16")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"training.compile_mode: unknown value {self.compile_mode!r}; expected one of "
                              + ", ".join(COMPILE_MODES))
        if self.compile_scope not in ("layers", "model"):
            raise ConfigError(f"training.compile_scope: unknown value {self.compile_scope!r}; expected layers or model")
        if self.dp not in ("ddp", "fsdp"):
            raise ConfigError(f"training.dp: unknown value {self.dp!r}; expected ddp or fsdp")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"training.device: unknown value {self.device!r}; expected auto, cpu or cuda")

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step; errors (never rescales) when not divisible."""
        per_micro = self.micro_batch_size * self.seq_len * world_size
        if self.tokens_per_step is None:
            return 1
        if self.tokens_per_step % per_micro:
            raise ConfigError(
                f"training.tokens_per_step: {self.tokens_per_step} is not divisible by micro_batch_size * seq_len * "
                f"world_size = {self.micro_batch_size} * {self.seq_len} * {world_size} = {per_micro}"
            )
        return self.tokens_per_step // per_micro


@dataclass
class CheckpointSection:
    every: int = 500                # steps between checkpoints (0 = only on signal / at the end)
    keep_last: int = 3
    save_on_signal: bool = True     # SIGTERM/SIGINT: checkpoint at the end of the current step, then exit
    export_final: bool = True       # OUT/final: Hugging Face folder (safetensors + config + tokenizer)

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every: must be >= 0, got {self.every}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last: must be >= 1, got {self.keep_last}")


@dataclass
class EvalSection:
    every: int = 500                # steps between evaluations (0 = never during training)
    max_batches: int | None = 50    # None = the whole validation split
    at_end: bool = True

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every: must be >= 0, got {self.every}")
        if self.max_batches is not None and self.max_batches <= 0:
            raise ConfigError(f"eval.max_batches: must be positive, got {self.max_batches}")


@dataclass
class LoggingSection:
    every: int = 10
    tensorboard: bool = True
    wandb: bool = False             # only if the wandb package is installed
    wandb_project: str = "complexity"
    peak_flops: float | None = None  # per device, for MFU; None = the device's bf16 dense peak if known
    progress: bool = True           # live progress line on stderr

    def validate(self) -> None:
        if self.every <= 0:
            raise ConfigError(f"logging.every: must be positive, got {self.every}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"logging.peak_flops: must be positive, got {self.peak_flops}")


@dataclass
class SpikeSection:
    """Loss-spike guard. A step is a spike when its loss or grad norm is not finite, or its loss
    exceeds `factor` times the mean of the last `window` good losses (once `min_history` exist)."""
    enabled: bool = True
    factor: float = 3.0
    window: int = 50
    min_history: int = 10
    max_consecutive: int = 3        # after this many spikes in a row, restore the last checkpoint

    def validate(self) -> None:
        if self.factor <= 1:
            raise ConfigError(f"spike.factor: must be > 1, got {self.factor}")
        for name in ("window", "min_history", "max_consecutive"):
            if getattr(self, name) < 1:
                raise ConfigError(f"spike.{name}: must be >= 1, got {getattr(self, name)}")


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "schedule": ScheduleSection,
    "training": TrainingSection,
    "checkpoint": CheckpointSection,
    "eval": EvalSection,
    "logging": LoggingSection,
    "spike": SpikeSection,
}

# The parts of a run that fix its trajectory: a resume must match these exactly.
IDENTITY_KEYS = {
    "model": None,  # all of it
    "data": None,
    "optim": None,
    "schedule": None,
    "training": ("seed", "max_steps", "micro_batch_size", "seq_len", "tokens_per_step"),
}


@dataclass
class RunConfig:
    out: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    spike: SpikeSection = field(default_factory=SpikeSection)

    def validate(self) -> "RunConfig":
        for name in SECTIONS:
            getattr(self, name).validate()
        if self.schedule.warmup_steps > self.training.max_steps:
            raise ConfigError(
                f"schedule.warmup_steps: {self.schedule.warmup_steps} exceeds training.max_steps={self.training.max_steps}"
            )
        model = self.model.build()
        if self.training.seq_len > model.max_position_embeddings:
            raise ConfigError(
                f"training.seq_len: {self.training.seq_len} exceeds model max_position_embeddings={model.max_position_embeddings}"
            )
        return self

    def to_dict(self) -> dict:
        out = {"out": self.out}
        for name in SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            if name == "model":
                section = {"preset": section["preset"], **section["overrides"]}
            if name == "optim":
                section["betas"] = list(section["betas"])
            out[name] = section
        return out

    def identity(self) -> dict:
        """The fields a resumed run must share with the checkpointed one."""
        d = self.to_dict()
        ident = {}
        for name, keys in IDENTITY_KEYS.items():
            ident[name] = d[name] if keys is None else {k: d[name][k] for k in keys}
        return ident

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table at the top level")
        config = cls()
        for key, value in data.items():
            if key == "out":
                config.out = None if value is None else str(value)
                continue
            if key not in SECTIONS:
                raise ConfigError(f"{where}: unknown key {key!r}; expected out or one of [{', '.join(SECTIONS)}]")
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table")
            _apply_section(config, key, value)
        return config.validate()


def _apply_section(config: RunConfig, name: str, values: dict) -> None:
    section = getattr(config, name)
    if name == "model":
        for key, value in values.items():
            if key == "preset":
                section.preset = value
            elif key == "overrides" and isinstance(value, dict):
                section.overrides.update(value)
            else:
                section.overrides[key] = value
        return
    known = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key; expected one of {', '.join(known)}")
        setattr(section, key, _coerce(name, key, known[key], value))


def _coerce(section: str, key: str, f: dataclasses.Field, value):
    """Light type checking: ints where floats are expected are fine; anything else must match."""
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if value is None or default is None:
        # Optional fields (default None) accept int/float/str as declared in the annotation.
        ann = str(f.type)
        if value is not None and "float" in ann and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{section}.{key}: expected true/false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{section}.{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{section}.{key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{section}.{key}: expected a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{section}.{key}: expected a list, got {value!r}")
        return tuple(value)
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value`; the value is read as a TOML value (numbers, true/false, "strings",
    [lists]); a bare word that is not valid TOML is taken as a string (precision=bf16-mixed)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if raw.strip().lower() in ("none", "null"):
        value = None
    return key, value


def apply_overrides(data: dict, overrides: list[str] | dict | None) -> dict:
    """Merge `section.key=value` overrides into a recipe dict (returns a new dict)."""
    data = json.loads(json.dumps(data))  # deep copy
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        if key == "out":
            data["out"] = value
            continue
        section, dot, name = key.partition(".")
        if not dot or not name:
            raise ConfigError(f"override {key!r}: expected section.key (e.g. training.max_steps=100)")
        if section not in SECTIONS:
            raise ConfigError(f"override {key!r}: unknown section {section!r}; expected one of {', '.join(SECTIONS)}")
        data.setdefault(section, {})[name] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                preset: str | None = None) -> RunConfig:
    """A validated RunConfig from a TOML recipe (or resolved.json) and/or a preset, plus overrides."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
        where = str(path)
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot parse: {err}") from None
    if preset is not None:
        data.setdefault("model", {})["preset"] = preset
    data = apply_overrides(data, overrides)
    return RunConfig.from_dict(data, where=where)
