"""The training loop: one code path for one CPU, one GPU and many GPUs/nodes under torchrun.

Read top to bottom: `Trainer.__init__` checks everything that can be wrong (recipe, run folder,
data, resume compatibility) before any compute, then builds model -> routing table -> wrapping
(parallelize.py) -> optimizer + schedule -> (resume). `Trainer.run` is the loop:

    for each optimizer step:
        for each of this rank's data slots (gradient accumulation):
            forward (autocast / FSDP mixed precision), loss = CE (+ router aux), backward(loss / accum)
        loss all-reduced (mean over the global batch), grad norm (global)
        spike guard (on the device): a bad step's update is skipped, else optimizer.step()
        (fused AdamW, which also applies the clip to grad_clip as its gradient divisor)
        scheduler.step(); log; evaluate; checkpoint; stop on signal

The step never waits for the device. Its loss, grad norm and spike verdict stay on the GPU and are
copied back asynchronously; the host reads them one step later (by then the next step's kernels
are queued, so the GPU does not idle) and at every log, eval and checkpoint step. Tokens/s is
measured between those read-backs.

Loss spikes. A step is a spike when its loss or grad norm is not finite, or its loss exceeds
`spike.factor` times the mean of the last `spike.window` good losses (after `min_history` good
steps). The test runs on the device and feeds fused AdamW's `found_inf`: a spike step leaves the
weights, the Adam moments and the Adam step count untouched; the scheduler DOES advance and the
data loader has consumed the batch, so the step counter, the LR schedule and the data order stay
those of the planned run. After `spike.max_consecutive` spikes in a row the model and optimizer
are restored from the last checkpoint before the next step updates anything (that step's
gradients are recomputed on the restored weights; step counter, schedule and data position keep
going forward, so the bad data is not replayed). Events go to metrics.jsonl as
{"event": "spike_skipped" | "restored"}.

Hooks for experiments: `batch_transform(step, batch) -> batch` (applied to every micro-batch of
the step, before it is moved to the device) and `lr_multiplier(step) -> float` (multiplies that
step's scheduled LR). `spike_injection()` builds both for the "random tokens + LR x k" fault.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..complexity_math import add_router_aux_loss
from ..data import manifest as data_manifest
from . import checkpoint as ckpt_mod
from . import data as data_mod
from .config import CUDA_GRAPH_MODES, RunConfig
from .eval import evaluate
from .metrics import MATMUL_PEAK, MetricsLogger, Throughput, flops_per_token, measure_matmul_peak
from .optimizer import build_optimizer, build_scheduler, clip_divisor
from .parallelize import DistInfo, all_reduce_, allocate_grads, barrier, init_distributed, parallelize, uses_autocast

RUN_FILES = ("resolved.json", "run.json", "metrics.jsonl", "summary.json", "tensorboard", "checkpoints", "final")


@dataclass
class RunResult:
    out_dir: Path | None
    step: int                                   # optimizer steps completed (incl. skipped spikes)
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> global mean loss, this process's steps
    eval: dict | None = None                    # the last evaluation
    interrupted: bool = False                   # stopped by a signal or stop_after (a checkpoint was written)
    final_dir: Path | None = None               # the exported Hugging Face folder
    checkpoint: Path | None = None              # the last checkpoint written
    tokens_per_s: float | None = None           # mean over the run (after the first step)
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    measured_steps: int = 0                     # the steps tokens_per_s is measured over
    signal: int | None = None                   # the signal that stopped the run, if any


def spike_injection(step: int, vocab_size: int, lr_mult: float = 10.0, seed: int = 1234):
    """(batch_transform, lr_multiplier) for a one-step fault at `step` (1-based): uniform random
    tokens in every micro-batch and the LR multiplied by `lr_mult`."""

    def batch_transform(s: int, batch: dict) -> dict:
        if s != step:
            return batch
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, batch["input_ids"].shape, generator=g)
        return {**batch, "input_ids": ids, "labels": torch.randint(0, vocab_size, ids.shape, generator=g)}

    def lr_multiplier(s: int) -> float:
        return lr_mult if s == step else 1.0

    return batch_transform, lr_multiplier


class SpikeGuard:
    """The spike test of SpikeSection, computed on the device so that no step waits for the host.

    Good losses enter a ring buffer of the last `window` (the running mean). `consecutive` is host
    bookkeeping, updated when the trainer reads the verdicts back.
    """

    REASONS = {1: "non-finite loss", 2: "non-finite grad norm", 3: "loss above factor x running mean"}

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.history = torch.zeros(cfg.window, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)  # losses held (<= window)
        self.slot = torch.zeros((), dtype=torch.long, device=device)   # where the next good loss goes
        self._slots = torch.arange(cfg.window, device=device)
        self.consecutive = 0

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (code, running mean) as device scalars; code 0 is a good step (its loss enters the
        history), else a key of REASONS. With the guard disabled every step is good."""
        loss, grad_norm = loss.double(), grad_norm.double()
        mean = self.history.sum() / self.count.clamp(min=1)
        if not self.cfg.enabled:
            return torch.zeros((), dtype=torch.long, device=loss.device), mean
        above = (self.count >= self.cfg.min_history) & (loss > self.cfg.factor * mean)
        code = torch.where(~torch.isfinite(loss), 1,
                           torch.where(~torch.isfinite(grad_norm), 2, torch.where(above, 3, 0)))
        good = code == 0
        write = good & (self._slots == self.slot)
        self.history.copy_(torch.where(write, loss, self.history))
        self.slot.copy_((self.slot + good) % self.cfg.window)
        self.count.copy_((self.count + good).clamp(max=self.cfg.window))
        return code, mean

    def state_dict(self) -> dict:
        n, slot, values = int(self.count), int(self.slot), self.history.tolist()
        return {"history": values[:n] if n < self.cfg.window else values[slot:] + values[:slot],
                "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        values = list(state.get("history", []))[-self.cfg.window:]
        self.history.zero_()
        self.history[: len(values)] = torch.tensor(values, dtype=torch.float64)
        self.count.fill_(len(values))
        self.slot.fill_(len(values) % self.cfg.window)
        self.consecutive = int(state.get("consecutive", 0))


@dataclass
class _LaunchedStep:
    """A step whose numbers are still on their way back from the device."""

    step: int
    lr: float
    values: torch.Tensor                 # [loss, grad norm, spike code, running mean], host
    ready: torch.cuda.Event | None       # recorded after the copy (CUDA), None elsewhere


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self, enabled: bool):
        self.received: int | None = None
        self._old = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint {va!r} vs now {vb!r}")
    return out


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; `labels` are already shifted, -100 is ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        *,
        out_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        batch_transform: Callable[[int, dict], dict] | None = None,
        lr_multiplier: Callable[[int], float] | None = None,
        stop_after: int | None = None,
        model_factory: Callable[[object], torch.nn.Module] | None = None,
        progress: bool | None = None,
    ):
        self.batch_transform, self.lr_multiplier, self.stop_after = batch_transform, lr_multiplier, stop_after
        self.info: DistInfo = init_distributed(config.training.device)
        info = self.info
        self.device = info.device
        # Everything left to decide is decided here, for this machine, and the config is read-only
        # from here on (raises for a global batch that does not divide, or a compile setting
        # that cannot run here, before anything is built).
        self.config = cfg = config.resolve(world_size=info.world_size, device_type=self.device.type,
                                           out=str(out_dir) if out_dir is not None else None)
        self.precision = cfg.training.precision
        self.out_dir = Path(cfg.out) if cfg.out else None
        self.accum = cfg.training.grad_accum(info.world_size)
        self.num_slots = self.accum * info.world_size
        self.slots = list(range(info.rank * self.accum, (info.rank + 1) * self.accum))

        # ---- model config and data checks (before any compute)
        self.model_config = cfg.model.build()
        vocab = self.model_config.vocab_size
        self.manifest = None
        if not cfg.data.synthetic:
            if not cfg.data.path:
                raise ValueError("data.path: no training data given (use --data DIR or data.synthetic = true)")
            self.manifest = data_manifest.read_prepared_manifest(cfg.data.path)
            data_manifest.check_data_matches_model(self.manifest, vocab, cfg.data.path)

        # ---- run folder: refuse to clobber another run
        self.resume_from: Path | None = None
        self.last_checkpoint: Path | None = None
        if self.out_dir is not None:
            self._check_run_folder(resume, overwrite)

        # ---- data slots (raises if there is too little data for one global batch)
        if cfg.data.synthetic:
            self.loaders = [data_mod.SyntheticLoader(vocab, cfg.training.micro_batch_size, cfg.training.seq_len,
                                                     cfg.training.seed, s) for s in self.slots]
        else:
            self.loaders = [data_mod.SlotLoader(cfg.data.path, cfg.training.micro_batch_size, cfg.training.seq_len,
                                                cfg.training.seed, s, self.num_slots, vocab) for s in self.slots]

        # ---- build: seed (same on every rank, so FSDP shards one identical init), model, table
        self._seed_all(cfg.training.seed)
        if model_factory is not None:
            model = model_factory(self.model_config)
        else:
            from ..modeling_complexity import ComplexityForCausalLM

            with torch.device(self.device):
                model = ComplexityForCausalLM(self.model_config)
        if self.precision == "bf16":
            model = model.to(torch.bfloat16)
        if hasattr(getattr(model, "model", None), "validate_token_ids"):
            # The ids are in range by construction (synthetic) or were checked above against the
            # model's vocabulary (prepared data): skip the per-step device sync of the model's check.
            model.model.validate_token_ids = False
        self.model = model
        self.model.train()
        fresh = self.resume_from is None
        if fresh and getattr(self.model_config, "routing", None) == "zipf" and \
                getattr(getattr(model, "model", None), "token_to_expert", None) is not None:
            self._install_zipf_table()
        self.forward_module = parallelize(model, cfg.training, info, self.precision)
        # Compiled, the fp32 cast, log-softmax and its gradient fuse into a few passes over the
        # bf16 logits instead of materialising fp32 copies of a [tokens, vocab] tensor.
        self.loss_fn = torch.compile(causal_lm_loss, dynamic=False, mode=cfg.training.compile_mode) \
            if cfg.training.compile else causal_lm_loss
        self.cuda_graphs = cfg.training.compile and cfg.training.compile_mode in CUDA_GRAPH_MODES
        if self.cuda_graphs:
            # A replayed backward graph writes the gradients into the graph's own memory, which
            # the next micro-batch's replay overwrites. Gradients that already exist are added to
            # in place (AccumulateGrad), so allocating them here, outside any graph, and zeroing
            # them in place after each step keeps the accumulated sum in memory no graph owns.
            allocate_grads(model)
        self.autocast = uses_autocast(cfg.training, info, self.precision)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.schedule, cfg.training.max_steps)
        self.guard = SpikeGuard(cfg.spike, self.device)
        self.launched: list[_LaunchedStep] = []
        self.losses: dict[int, float] = {}                   # step -> loss, as read back
        self.read_back: dict[int, tuple[float, float, float]] = {}  # step -> (loss, grad norm, lr)
        self.step = 0
        self.tokens_seen = 0
        # Per-rank training randomness (dropout) differs between ranks; init above did not.
        torch.manual_seed(cfg.training.seed + 1_000_003 * (info.rank + 1))

        from ..params import count_parameters

        try:
            self.active_params = count_parameters(model).active
        except Exception:
            self.active_params = sum(p.numel() for p in model.parameters())
        mc = self.model_config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        self.flops_per_token = flops_per_token(self.active_params, mc.num_hidden_layers, mc.num_attention_heads,
                                               head_dim, cfg.training.seq_len)
        self.peak_flops, self.peak_source = self._mfu_peak()

        if self.resume_from is not None:
            self._load(self.resume_from)
        self._write_run_files()
        show = cfg.logging.progress if progress is None else progress
        self.logger = MetricsLogger(self.out_dir, enabled=info.is_main, tensorboard=cfg.logging.tensorboard,
                                    wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                                    run_config=cfg.to_dict(), progress=show,
                                    resume_step=self.step if self.resume_from is not None else None)

    # ------------------------------------------------------------------ setup helpers

    def _check_run_folder(self, resume: bool, overwrite: bool) -> None:
        out = self.out_dir
        resolved = out / "resolved.json"
        if resume and resolved.is_file():
            saved = RunConfig.from_dict(json.loads(resolved.read_text()), where=str(resolved))
            diffs = _diff(saved.identity(), self.config.identity())
            if diffs:
                raise ValueError(f"--resume {out}: the run was started with a different config:\n  " + "\n  ".join(diffs))
            self.resume_from = ckpt_mod.latest_checkpoint(out / "checkpoints")
            return
        if out.exists() and any(out.iterdir()):
            if resume:
                raise FileExistsError(f"--resume {out}: this folder holds no run (no resolved.json)")
            if not overwrite:
                what = "another run" if resolved.is_file() else "other files"
                raise FileExistsError(f"output folder {out} already holds {what}: use --resume to continue it, "
                                      "--overwrite to replace it, or another --out")
            if not resolved.is_file():
                raise FileExistsError(f"output folder {out} holds files that are not a training run; "
                                      "refusing to --overwrite it (choose another --out)")
            barrier()  # every rank has looked at the folder before rank 0 empties it
            if self.info.is_main:
                for name in RUN_FILES:
                    p = out / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
            barrier()

    def _write_run_files(self) -> None:
        if self.out_dir is None or not self.info.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.resume_from is None:
            (self.out_dir / "resolved.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        run = {
            "world_size": self.info.world_size, "grad_accum": self.accum, "data_slots": self.num_slots,
            "device": str(self.device), "precision": self.precision, "active_params": self.active_params,
            "flops_per_token": self.flops_per_token, "mfu_peak_flops_per_device": self.peak_flops,
            "mfu_peak": self.peak_source, "auto": self.config.auto,
            "torch": torch.__version__, "resumed_from": str(self.resume_from) if self.resume_from else None,
        }
        (self.out_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")

    def _mfu_peak(self) -> tuple[float | None, str | None]:
        """The per-device peak MFU is reported against, and where it comes from (None on the CPU)."""
        if self.config.logging.peak_flops:
            return self.config.logging.peak_flops, "logging.peak_flops"
        if self.device.type != "cuda":
            return None, None
        peak = torch.tensor([measure_matmul_peak(self.device)], device=self.device, dtype=torch.float64)
        all_reduce_(peak)  # every rank timed its own GPU at once: their mean
        return float(peak.item()) / self.info.world_size, MATMUL_PEAK

    def _seed_all(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _install_zipf_table(self) -> None:
        from ..routing import build_routing_table

        mc = self.model_config
        if self.config.data.synthetic:
            return  # random tokens: the modulo table the model starts with is already balanced
        counts, local = data_mod.zipf_counts(self.config.data.path, self.manifest, mc.vocab_size,
                                             self.info.rank, self.info.world_size)
        t = torch.from_numpy(counts).to(self.device)
        if local:
            all_reduce_(t)  # every rank counted its share: sum across ranks
        table = build_routing_table("zipf", mc.vocab_size, mc.num_experts, counts=t.cpu())
        self.model.set_routing_table(table)

    # ------------------------------------------------------------------ checkpoints

    def _rank_state(self) -> dict:
        return {"rng": ckpt_mod.rng_state(),
                "slots": {str(s): l.state_dict() for s, l in zip(self.slots, self.loaders)}}

    def save(self) -> Path | None:
        if self.out_dir is None:
            return None
        meta = {
            "config": self.config.to_dict(), "identity": self.config.identity(),
            "scheduler": self.scheduler.state_dict(), "spike": self.guard.state_dict(),
            "tokens_seen": self.tokens_seen, "world_size": self.info.world_size,
        }
        path = ckpt_mod.save_checkpoint(self.out_dir / "checkpoints", self.step, self.model, self.optimizer,
                                        meta, self._rank_state(), self.config.checkpoint.keep_last)
        self.last_checkpoint = path
        return path

    def _load(self, path: Path) -> None:
        meta = ckpt_mod.load_checkpoint(path, self.model, self.optimizer)
        diffs = _diff(meta.get("identity", {}), self.config.identity())
        if diffs:
            raise ValueError(f"checkpoint {path} was written by a different config:\n  " + "\n  ".join(diffs))
        self.scheduler.load_state_dict(meta["scheduler"])
        self.guard.load_state_dict(meta.get("spike", {}))
        self.step = int(meta["step"])
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        slot_states = {}
        for rs in meta["rank_states"]:
            slot_states.update(rs["slots"])
        for s, loader in zip(self.slots, self.loaders):
            if str(s) not in slot_states:
                raise ValueError(f"checkpoint {path}: no data position for slot {s} (saved with "
                                 f"{len(slot_states)} slots, this run has {self.num_slots})")
            loader.load_state_dict(slot_states[str(s)])
        states = meta["rank_states"]
        # Same world size: each rank gets its own RNG back (bitwise resume). Otherwise rank 0's.
        own = states[self.info.rank] if len(states) == self.info.world_size else states[0]
        ckpt_mod.set_rng_state(own["rng"])

    # ------------------------------------------------------------------ the step

    def _micro_batch_loss(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with amp:
            out = self.forward_module(input_ids=ids, use_cache=False)
            loss = add_router_aux_loss(self.loss_fn(out.logits, labels), getattr(out, "aux_loss", None), self.model_config)
        return loss

    def _grad_norm(self) -> torch.Tensor:
        """The global gradient norm, a device scalar."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor partial norm -> the global norm
            norm = norm.full_tensor()
        return norm

    def _forward_backward(self, batches: list[dict]) -> torch.Tensor:
        """Accumulate the gradients of this rank's micro-batches; -> the global mean loss (device)."""
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        ddp = hasattr(self.forward_module, "no_sync")
        fsdp = hasattr(self.forward_module, "set_requires_gradient_sync")
        for m, batch in enumerate(batches):
            if self.cuda_graphs:  # each forward begins a new replay generation
                torch.compiler.cudagraph_mark_step_begin()
            last = m == self.accum - 1
            if fsdp:  # accumulate unsharded; reduce-scatter once, after the last micro-batch
                self.forward_module.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if (last or not ddp) else self.forward_module.no_sync()
            with sync:
                loss = self._micro_batch_loss(batch)
                (loss / self.accum).backward()
            total += loss.detach().float()
        total /= self.accum
        if self.info.world_size > 1:
            all_reduce_(total)
            total /= self.info.world_size
        return total

    def train_step(self) -> None:
        """Launch one optimizer step (self.step is the 0-based index of the step being taken).

        The only wait is for the previous step's spike verdict, read after this step's forward and
        backward are queued: a restore it calls for happens before this step's update, and this
        step's gradients are then recomputed on the restored weights.
        """
        step1 = self.step + 1
        batches = []
        for loader in self.loaders:
            batch = next(loader)
            if self.batch_transform is not None:
                batch = self.batch_transform(step1, batch)
            batches.append(batch)
        loss = self._forward_backward(batches)
        if self.settle():
            self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)
            loss = self._forward_backward(batches)
        grad_norm = self._grad_norm()
        if self.config.optim.grad_clip:
            self.optimizer.grad_scale = clip_divisor(grad_norm, self.config.optim.grad_clip)
        mult = self.lr_multiplier(step1) if self.lr_multiplier else 1.0
        for group, base in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = base * mult
        code, mean = self.guard.check(loss, grad_norm)
        if self.config.spike.enabled:
            self.optimizer.found_inf = (code != 0).float()  # fused AdamW skips the update on the device
        values = torch.stack([loss.double(), grad_norm.double(), code.double(), mean])
        ready = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            values = host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self.launched.append(_LaunchedStep(step1, self.optimizer.param_groups[0]["lr"], values, ready))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)  # CUDA graphs: see allocate_grads
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += self.config.training.tokens_per_step

    def settle(self) -> bool:
        """Read back the launched steps' numbers (waiting for the device if need be): record their
        losses, log their spike events, and restore the last checkpoint after `max_consecutive`
        spikes in a row. -> whether it restored."""
        restored = False
        launched, self.launched = self.launched, []
        for item in launched:
            if item.ready is not None:
                item.ready.synchronize()
            loss, grad_norm, code, mean = item.values.tolist()
            self.losses[item.step] = loss
            self.read_back[item.step] = (loss, grad_norm, item.lr)
            if not code:
                self.guard.consecutive = 0
                continue
            self.guard.consecutive += 1
            reason = self.guard.REASONS[int(code)]
            if int(code) == 3:
                reason = f"loss {loss:.4f} > {self.config.spike.factor} x running mean {mean:.4f}"
            self.logger.event(item.step, "spike_skipped", loss=loss, grad_norm=grad_norm, reason=reason,
                              consecutive=self.guard.consecutive)
            if self.guard.consecutive >= self.config.spike.max_consecutive:
                self._restore_after_spikes(item.step)
                restored = True
        return restored

    # ------------------------------------------------------------------ eval

    def run_eval(self) -> dict | None:
        if self.manifest is None or data_manifest.split_tokens(self.manifest, "val") <= self.config.training.seq_len:
            return None
        cfg = self.config
        loader = data_mod.make_val_loader(cfg.data.path, cfg.training.micro_batch_size, cfg.training.seq_len,
                                          rank=self.info.rank, world_size=self.info.world_size,
                                          vocab_size=self.model_config.vocab_size)
        n = len(loader)
        if cfg.eval.max_batches is not None:
            n = min(n, max(1, cfg.eval.max_batches // self.info.world_size))
        if self.info.world_size > 1:  # every rank must run the same number of forwards (FSDP)
            t = torch.tensor([n], device=self.device)
            all_reduce_(t, op=dist.ReduceOp.MIN)
            n = int(t.item())
        result = evaluate(self.model, iter(loader), device=self.device, vocab_size=self.model_config.vocab_size,
                          autocast_dtype=torch.bfloat16 if self.autocast else None, max_batches=n,
                          split_tokens=data_manifest.split_tokens(self.manifest, "val"),
                          split_bytes=data_manifest.split_bytes(self.manifest, "val"),
                          expert_shares=not cfg.training.compile, forward=self.forward_module)
        return result

    # ------------------------------------------------------------------ export

    def export(self) -> Path | None:
        """OUT/final: a Hugging Face folder (safetensors + config + tokenizer files). Collective."""
        if self.out_dir is None:
            return None
        state = ckpt_mod.full_model_state_dict(self.model)
        final = self.out_dir / "final"
        if self.info.is_main:
            from ..modeling_complexity import ComplexityForCausalLM

            with torch.device("meta"):
                export_model = ComplexityForCausalLM(self.model_config)
            export_model.load_state_dict(state, strict=False, assign=True)
            export_model.tie_weights()
            missing = [n for n, p in export_model.named_parameters() if p.is_meta] + \
                      [n for n, b in export_model.named_buffers() if b.is_meta]
            if missing:
                raise RuntimeError(f"export: weights missing from the state dict: {missing[:5]}")
            tmp = self.out_dir / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            export_model.save_pretrained(tmp)
            tok = data_manifest.tokenizer_dir(self.manifest) if self.manifest else None
            if tok is not None and tok.is_dir():
                for f in tok.iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        barrier()
        return final

    # ------------------------------------------------------------------ the loop

    def run(self) -> RunResult:
        cfg, info = self.config, self.info
        result = RunResult(out_dir=self.out_dir, step=self.step, losses=self.losses)
        signals = _Signals(cfg.checkpoint.save_on_signal)
        timer = Throughput()
        max_steps = cfg.training.max_steps
        tok_per_step = cfg.training.tokens_per_step
        measured_s, measured_steps = 0.0, 0  # after this process's first interval (compilation)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            if self.step == 0 and self.logger.enabled:
                self.logger.message(f"training {max_steps} steps x {tok_per_step:,} tokens on {info.world_size} "
                                    f"process(es), {self.accum} micro-batch(es) each, {self.precision}, "
                                    f"{self.active_params:,} active params")
            elif self.resume_from is not None:
                self.logger.message(f"resumed from {self.resume_from} at step {self.step}")
            for key, choice in cfg.auto.items():
                self.logger.message(f"{key.split('.')[-1] if key == 'training.compile' else key}: {choice}")
            if self.peak_flops:
                self.logger.message(f"MFU against {self.peak_source}: {self.peak_flops / 1e12:,.1f} TFLOP/s per device")
            timer.start(self.step)
            first_interval = True
            while self.step < max_steps:
                self.train_step()
                step = result.step = self.step
                log_now = step % cfg.logging.every == 0 or step == 1 or step == max_steps
                eval_now = bool(cfg.eval.every) and step % cfg.eval.every == 0 and step < max_steps
                stop_signal = self._stop_requested(signals)
                stop = stop_signal or (self.stop_after is not None and step >= self.stop_after)
                save_now = bool(cfg.checkpoint.every) and step % cfg.checkpoint.every == 0 or stop
                if not (log_now or eval_now or save_now):
                    continue
                self.settle()  # waits for the device: the interval's time is now complete
                seconds, steps = timer.mark(step)
                if not first_interval:
                    measured_s, measured_steps = measured_s + seconds, measured_steps + steps
                first_interval = False
                if log_now:
                    loss, grad_norm, lr = self.read_back[step]
                    tps = tok_per_step * steps / seconds if seconds > 0 else float("nan")
                    mfu = (self.flops_per_token * tps / (self.peak_flops * info.world_size)) if self.peak_flops else None
                    self.logger.log({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                     "tokens_per_s": tps, "mfu": mfu, "tokens": self.tokens_seen,
                                     "step_time_s": seconds / steps})
                    eta = (max_steps - step) * timer.mean_step_time
                    self.logger.progress_line(step, max_steps, loss, lr, tps, mfu, eta)
                self.read_back.clear()
                if eval_now:
                    result.eval = self._eval_and_log(step)
                if save_now:
                    result.checkpoint = self.save()
                if stop:
                    result.interrupted = True
                    why = f"signal {signals.received}" if stop_signal else f"stop_after={self.stop_after}"
                    self.logger.message(f"stopped at step {step} ({why}); checkpoint {result.checkpoint}")
                    break
                if eval_now or save_now:
                    timer.start(step)  # the pause is not training time
            if not result.interrupted:
                if cfg.eval.at_end:
                    result.eval = self._eval_and_log(self.step)
                if self.out_dir is not None and (cfg.checkpoint.every or cfg.checkpoint.export_final):
                    if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:08d}"):
                        result.checkpoint = self.save()
                if cfg.checkpoint.export_final and self.manifest is not None:
                    result.final_dir = self.export()
                    self.logger.message(f"exported {result.final_dir}")
        finally:
            signals.restore()
            self.logger.close()
        result.interrupted = result.interrupted or signals.received is not None
        result.signal = signals.received
        result.measured_steps = measured_steps
        if measured_steps:
            result.tokens_per_s = tok_per_step * measured_steps / measured_s
            if self.peak_flops:
                result.mfu = self.flops_per_token * result.tokens_per_s / (self.peak_flops * info.world_size)
        if self.device.type == "cuda":
            peak = torch.tensor([torch.cuda.max_memory_allocated(self.device)], device=self.device)
            all_reduce_(peak, op=dist.ReduceOp.MAX)
            result.peak_memory_bytes = int(peak.item())
        self._write_summary(result)
        return result

    def _write_summary(self, result: RunResult) -> None:
        """OUT/summary.json: what this process's part of the run measured (rank 0 writes)."""
        if self.out_dir is None or not self.info.is_main:
            return
        summary = {
            "step": result.step, "world_size": self.info.world_size, "interrupted": result.interrupted,
            "tokens_per_s": result.tokens_per_s,
            "tokens_per_s_per_device": result.tokens_per_s / self.info.world_size if result.tokens_per_s else None,
            "tokens_per_s_measured_over": f"{result.measured_steps} steps (the run's steps after its first logging "
                                          "interval, which holds the compilation; eval and checkpoint time excluded)",
            "mfu": result.mfu, "mfu_peak_flops_per_device": self.peak_flops, "mfu_peak": self.peak_source,
            "precision": self.precision, "grad_accum": self.accum, "tokens_per_step": self.config.training.tokens_per_step,
            "compile": self.config.auto.get("training.compile") if self.config.training.compile else "off",
            "peak_memory_gib": result.peak_memory_bytes / 2**30 if result.peak_memory_bytes else None,  # max over ranks
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
        }
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def _eval_and_log(self, step: int) -> dict | None:
        result = self.run_eval()
        if result is not None:
            record = {"step": step, **{k: v for k, v in result.items() if k != "expert_shares_per_layer"}}
            self.logger.log(record)
            msg = f"eval step {step}: val_loss {result['val_loss']:.4f}"
            if "val_bpb" in result:
                msg += f" | bpb {result['val_bpb']:.4f}"
            if "expert_shares" in result:
                msg += " | experts " + " ".join(f"{s:.2f}" for s in result["expert_shares"])
            self.logger.message(msg)
        return result

    def _stop_requested(self, signals: _Signals) -> bool:
        flag = 1 if signals.received is not None else 0
        if self.info.world_size > 1:
            t = torch.tensor([flag], device=self.device)
            all_reduce_(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return bool(flag)

    def _restore_after_spikes(self, step: int) -> None:
        latest = ckpt_mod.latest_checkpoint(self.out_dir / "checkpoints") if self.out_dir else None
        if latest is None:
            self.logger.event(step, "restore_failed", reason="no checkpoint to restore")
            raise RuntimeError(f"step {step}: {self.guard.consecutive} loss spikes in a row and no checkpoint to restore")
        ckpt_mod.load_checkpoint(latest, self.model, self.optimizer)
        # The LR lives in the param groups that were just reloaded: put the schedule's back.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.guard.consecutive = 0
        self.logger.event(step, "restored", checkpoint=str(latest))


def train(config: RunConfig, **kwargs) -> RunResult:
    """Train according to `config` (see `Trainer` for keyword options); returns a RunResult."""
    return Trainer(config, **kwargs).run()
