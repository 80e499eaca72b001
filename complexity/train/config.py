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

`load_config(path, overrides)` returns a validated `RunConfig`. The trainer resolves it for the
machine it runs on (`RunConfig.resolve`): every "auto" and every default that follows the run's
length gets its value, and the result is read-only; its `to_dict()` is saved in the run folder
(`resolved.json`).

Defaults that follow the run's length, unless set: `schedule.warmup_steps` = 10% of
`training.max_steps` (at most 100), `eval.every` and `checkpoint.every` = half of it (at most 500).
A value the recipe or the command line gives is checked as given (a warmup longer than the run
is an error).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tomllib

from ..configuration_complexity import PRESETS, ComplexityConfig


class ConfigError(ValueError):
    """A recipe key or value is wrong; the message names it."""


class _Section:
    """A recipe section: assignable while the recipe is read, read-only once the run resolved it."""

    _frozen = False

    def __setattr__(self, name, value):
        if self._frozen:
            raise AttributeError(
                f"{type(self).__name__}.{name}: a resolved run config is read-only "
                "(use dataclasses.replace or RunConfig.from_dict to derive another)"
            )
        object.__setattr__(self, name, value)

    def freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)


def _model_fields() -> set[str]:
    sig = inspect.signature(ComplexityConfig.__init__)
    names = {n for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD}
    return names


@dataclass
class ModelSection(_Section):
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

    def freeze(self) -> None:
        super().freeze()
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    def build(self) -> ComplexityConfig:
        try:
            return ComplexityConfig.from_preset(self.preset, **self.overrides)
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None


@dataclass
class DataSection(_Section):
    path: str | None = None  # a `complexity data prepare` output folder
    synthetic: bool = False  # uniform random tokens (throughput benchmarks; no eval, no export tokenizer)

    def validate(self) -> None:
        if self.synthetic and self.path:
            raise ConfigError("data: set either data.path or data.synthetic = true, not both")


@dataclass
class OptimSection(_Section):
    lr: float = 3e-4
    min_lr: float = 3e-5  # the floor the decay ends at
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # weight decay on embed_tokens (= tied lm_head)
    decay_norms_and_biases: bool = False  # ... on norms, biases and mu base/init vectors (all 1-D)
    grad_clip: float | None = 1.0  # max global grad norm; None/0 = no clipping

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr: must lie in [0, optim.lr={self.lr}], got {self.min_lr}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps: must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip: must be >= 0, got {self.grad_clip}")


@dataclass
class ScheduleSection(_Section):
    kind: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay, linear decay) | "constant"
    warmup_steps: int | None = None  # None: 10% of training.max_steps, at most 100
    decay_fraction: float = 0.2  # wsd: the last fraction of training decays to optim.min_lr

    def validate(self) -> None:
        if self.kind not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"schedule.kind: unknown value {self.kind!r}; expected cosine, wsd or constant")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"schedule.decay_fraction: must lie in (0, 1], got {self.decay_fraction}")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs
COMPILE_SCOPES = ("layers", "model")


@dataclass
class TrainingSection(_Section):
    seed: int = 0
    max_steps: int = 1000  # optimizer steps; also the length of the LR schedule
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    seq_len: int = 2048
    tokens_per_step: int | None = None  # global tokens per optimizer step; None = micro * seq * world (no accumulation)
    precision: str = "auto"  # "auto" (fp32 on CPU, bf16-mixed on GPU) | "fp32" | "bf16-mixed" | "bf16"
    compile: bool = False  # torch.compile the model (and the loss)
    compile_mode: str = "auto"  # torch.compile mode: "auto" | "default" | "reduce-overhead" (CUDA
    # graphs) | "max-autotune-no-cudagraphs" | "max-autotune"
    compile_scope: str = "auto"  # "auto" | "layers": each decoder layer | "model": the whole model
    # as one graph. auto (both): the fastest setting that works here,
    # see `resolve_compile`
    activation_checkpointing: bool = False
    dp: str = "ddp"  # data parallelism under torchrun: "ddp" | "fsdp" (FSDP2 fully_shard)
    fsdp_reshard_after_forward: bool = True  # False: keep each layer's gathered weights from forward to
    # backward (one all-gather per micro-batch instead of two, more memory)
    device: str = "auto"  # "auto" | "cpu" | "cuda"

    def validate(self) -> None:
        if not 0 <= self.seed < 2**32:  # what numpy's and torch's generators accept
            raise ConfigError(f"training.seed: must lie in [0, 2**32), got {self.seed}")
        for name in ("max_steps", "micro_batch_size", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"training.{name}: must be a positive integer, got {v!r}")
        if self.tokens_per_step is not None and (
            not isinstance(self.tokens_per_step, int) or self.tokens_per_step <= 0
        ):
            raise ConfigError(f"training.tokens_per_step: must be a positive integer, got {self.tokens_per_step!r}")
        if self.precision not in ("auto", "fp32", "bf16-mixed", "bf16"):
            raise ConfigError(
                f"training.precision: unknown value {self.precision!r}; expected auto, fp32, bf16-mixed or bf16"
            )
        if self.compile_mode not in ("auto", *COMPILE_MODES):
            raise ConfigError(
                f"training.compile_mode: unknown value {self.compile_mode!r}; expected one of "
                + ", ".join(("auto", *COMPILE_MODES))
            )
        if self.compile_scope not in ("auto", *COMPILE_SCOPES):
            raise ConfigError(
                f"training.compile_scope: unknown value {self.compile_scope!r}; expected auto, layers or model"
            )
        if self.dp not in ("ddp", "fsdp"):
            raise ConfigError(f"training.dp: unknown value {self.dp!r}; expected ddp or fsdp")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"training.device: unknown value {self.device!r}; expected auto, cpu or cuda")

    def resolve_compile(self, device_type: str, world_size: int) -> tuple[str, str, str]:
        """-> (scope, mode, why) for a compiled run: the recipe's values, with "auto" replaced by
        the fastest setting that works on this machine. Raises ConfigError for a combination that
        cannot run here (before anything is compiled).

        Measured on one H100/H200 (BENCHMARKS.md, "Training throughput"): the whole model with CUDA
        graphs is the fastest, then per layer with CUDA graphs, the whole model in the default mode,
        and per layer in the default mode. Under torchrun the auto choice is per layer in the
        default mode (FSDP2 shards per layer), and CUDA graphs are refused: FSDP2 gathers each
        layer's parameters into fresh memory for every micro-batch, which a recorded graph cannot
        replay, and DDP's bucketed all-reduce of graph-produced gradients has not been verified on
        several GPUs. On the CPU, CUDA graphs do not exist: auto is per layer in the default mode.
        With activation checkpointing on one GPU, auto keeps the setting those recipes were
        measured with (per layer, default mode); CUDA graphs with it are allowed when asked for
        (tests/gpu checks them against eager).
        """
        if device_type == "cuda" and world_size == 1 and self.activation_checkpointing:
            scope, mode, why = "layers", "default", "one CUDA GPU, with activation checkpointing"
        elif device_type == "cuda" and world_size == 1:
            scope, mode, why = "model", "reduce-overhead", "one CUDA GPU"
        elif device_type == "cuda":
            scope, mode, why = "layers", "default", f"{world_size} processes under torchrun"
        else:
            scope, mode, why = (
                "layers",
                "default",
                "the CPU" if world_size == 1 else f"{world_size} processes on the CPU",
            )
        given = [name for name in ("compile_scope", "compile_mode") if getattr(self, name) != "auto"]
        scope = self.compile_scope if self.compile_scope != "auto" else scope
        mode = self.compile_mode if self.compile_mode != "auto" else mode
        if world_size > 1 and mode in CUDA_GRAPH_MODES:
            raise ConfigError(
                f"training.compile_mode: {mode!r} replays CUDA graphs, which are not supported under torchrun "
                f"({world_size} processes): FSDP2 gathers the parameters into fresh memory for every micro-batch "
                "and DDP has not been verified with them; use 'default' or 'max-autotune-no-cudagraphs' "
                "(or leave it to 'auto')"
            )
        why = (
            "recipe"
            if len(given) == 2
            else (f"auto: {why}" if not given else f"auto: {why}; " + ", ".join(f"{g} from the recipe" for g in given))
        )
        return scope, mode, why

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
class CheckpointSection(_Section):
    every: int | None = None  # steps between checkpoints (0 = only on signal / at the end);
    # None: half of training.max_steps, at most 500
    keep_last: int = 3
    save_on_signal: bool = True  # SIGTERM/SIGINT: checkpoint at the end of the current step, then exit
    export_final: bool = True  # OUT/final: Hugging Face folder (safetensors + config + tokenizer)

    def validate(self) -> None:
        if self.every is not None and self.every < 0:
            raise ConfigError(f"checkpoint.every: must be >= 0, got {self.every}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last: must be >= 1, got {self.keep_last}")


@dataclass
class EvalSection(_Section):
    every: int | None = None  # steps between evaluations (0 = never during training);
    # None: half of training.max_steps, at most 500
    max_batches: int | None = 50  # None = the whole validation split
    at_end: bool = True

    def validate(self) -> None:
        if self.every is not None and self.every < 0:
            raise ConfigError(f"eval.every: must be >= 0, got {self.every}")
        if self.max_batches is not None and self.max_batches <= 0:
            raise ConfigError(f"eval.max_batches: must be positive, got {self.max_batches}")


@dataclass
class LoggingSection(_Section):
    every: int = 10
    tensorboard: bool = True
    wandb: bool = False  # only if the wandb package is installed
    wandb_project: str = "complexity"
    peak_flops: float | None = None  # per device, for MFU; None = the bf16 matmul peak measured at the start
    progress: bool = True  # live progress line on stderr

    def validate(self) -> None:
        if self.every <= 0:
            raise ConfigError(f"logging.every: must be positive, got {self.every}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"logging.peak_flops: must be positive, got {self.peak_flops}")


@dataclass
class SpikeSection(_Section):
    """Loss-spike guard. A step is a spike when its loss or grad norm is not finite, or its loss
    exceeds `factor` times the mean of the last `window` good losses (once `min_history` exist)."""

    enabled: bool = True
    factor: float = 3.0
    window: int = 50
    min_history: int = 10
    max_consecutive: int = 3  # after this many spikes in a row, restore the last checkpoint

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
class RunConfig(_Section):
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

    def validate(self) -> RunConfig:
        for name in SECTIONS:
            getattr(self, name).validate()
        if self.schedule.warmup_steps is not None and self.schedule.warmup_steps > self.training.max_steps:
            raise ConfigError(
                f"schedule.warmup_steps: {self.schedule.warmup_steps} exceeds training.max_steps={self.training.max_steps}"
            )
        model = self.model.build()
        if self.training.seq_len > model.max_position_embeddings:
            raise ConfigError(
                f"training.seq_len: {self.training.seq_len} exceeds model max_position_embeddings={model.max_position_embeddings}"
            )
        return self

    def resolve(self, *, world_size: int, device_type: str, out: str | None = None) -> RunConfig:
        """This recipe as the trainer runs it on `world_size` processes of `device_type`: a read-only
        copy in which nothing is left to decide ("auto" values, the global batch, the defaults
        that follow the run's length). `auto` on the result records what was chosen and why."""
        cfg = RunConfig.from_dict(self.to_dict(), where="config")
        t, steps = cfg.training, cfg.training.max_steps
        auto: dict[str, str] = {}
        if out is not None:
            cfg.out = str(out)
        if t.tokens_per_step is None:
            t.tokens_per_step = t.micro_batch_size * t.seq_len * world_size
        t.grad_accum(world_size)  # raises when the global batch does not divide
        follow = [
            ("schedule", "warmup_steps", 0.1, 100),
            ("eval", "every", 0.5, 500),
            ("checkpoint", "every", 0.5, 500),
        ]
        for section, key, fraction, cap in follow:
            if getattr(getattr(cfg, section), key) is None:
                value = max(1, min(cap, round(fraction * steps)))
                setattr(getattr(cfg, section), key, value)
                auto[f"{section}.{key}"] = (
                    f"{value} (auto: {fraction:.0%} of training.max_steps={steps}, at most {cap})"
                )
        t.device = device_type
        if t.precision == "auto":
            t.precision = "bf16-mixed" if device_type == "cuda" else "fp32"
            auto["training.precision"] = f"{t.precision} (auto: {device_type})"
        if t.compile:
            t.compile_scope, t.compile_mode, why = t.resolve_compile(device_type, world_size)
            auto["training.compile"] = f"{t.compile_scope} scope, {t.compile_mode} ({why})"
        else:
            unused = [f"{k}={getattr(t, k)!r}" for k in ("compile_mode", "compile_scope") if getattr(t, k) != "auto"]
            if unused:  # e.g. the recipe's settings with compile switched off on the command line
                auto["training.compile"] = f"off ({', '.join(unused)} unused: training.compile is false)"
        cfg.freeze()
        object.__setattr__(cfg, "auto", auto)
        return cfg

    def freeze(self) -> None:
        for name in SECTIONS:
            getattr(self, name).freeze()
        super().freeze()

    def to_dict(self) -> dict:
        out = {"out": self.out}
        for name in SECTIONS:
            if name == "model":
                out[name] = {"preset": self.model.preset, **self.model.overrides}
                continue
            section = dataclasses.asdict(getattr(self, name))
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
    def from_dict(cls, data: dict, where: str = "config") -> RunConfig:
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


_TYPE_NAMES = {"bool": "true/false", "int": "an integer", "float": "a finite number", "str": "a string"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _coerce(section: str, key: str, f: dataclasses.Field, value):
    """Type checking from the field's annotation: ints where floats are expected are fine (never
    nan or inf), None only where the field is optional; anything else must match."""
    ann = str(f.type)
    optional = ann.endswith("| None")
    base = ann.removesuffix("| None").strip()
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{section}.{key}: cannot be none")
    if base.startswith("tuple"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{section}.{key}: expected a list, got {value!r}")
        return tuple(value)
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": _is_number(value),  # nan and inf pass no range check: refused here, for every field
        "str": isinstance(value, str),
    }
    if base not in ok:
        return value
    if not ok[base]:
        raise ConfigError(
            f"{section}.{key}: expected {_TYPE_NAMES[base]}{' or none' if optional else ''}, got {value!r}"
        )
    return float(value) if base == "float" else value


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


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict | None = None, preset: str | None = None
) -> RunConfig:
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
