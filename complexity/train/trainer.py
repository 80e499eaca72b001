"""The training loop: one code path for one CPU, one GPU and many GPUs/nodes under torchrun.

`Trainer.__init__` checks everything that can be wrong (recipe, run folder, data, tokenizer,
resume) before any compute, then builds model -> routing table -> wrapping (parallelize.py) ->
optimizer + schedule -> (resume). `Trainer.run` is the loop, in which each part decides whether
this step is its step:

    while step < max_steps:
        train_step()       micro-batches: forward, loss, backward (gradient accumulation); clip,
                           spike test and AdamW update on the device; it waits only for the
                           previous step, once its own forward and backward are queued
        if no part wants this step: continue
        settle()           wait for the device: losses, spike verdicts (and a restore)
        log, evaluate, checkpoint, stop       each at its own steps
    finish()               evaluation at the end, last checkpoint, export, summary.json

The device always has a step queued ahead of the host. A step's loss, grad norm and spike verdict
stay on the GPU and are copied back asynchronously; the host reads them at the next step (once
that step's forward and backward are queued, so the wait overlaps them) and at every log, eval
and checkpoint step. Tokens/s is measured between those read-backs. Under
torchrun, signals are agreed on only at those steps too (they sync anyway).

Parts in their own modules: the spike guard (spike_guard.py), the run folder and its files
(run_folder.py), checkpoints (checkpoint.py), the export (export.py), atomic writes and fault
points (durable.py), telemetry (metrics.py), experiment hooks (callbacks.py).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..complexity_math import add_router_aux_loss
from ..data import manifest as data_manifest
from . import checkpoint as ckpt_mod
from . import data as data_mod
from .callbacks import TrainerCallbacks
from .config import CUDA_GRAPH_MODES, RunConfig
from .eval import evaluate
from .export import export_hf
from .metrics import MATMUL_PEAK, MetricsLogger, Throughput, flops_per_token, measure_matmul_peak
from .optimizer import build_optimizer, build_scheduler, clip_divisor
from .parallelize import DistInfo, all_reduce_, allocate_grads, init_distributed, parallelize, uses_autocast
from .run_folder import RunFolder, check_same_run, in_use
from .spike_guard import SpikeGuard


@dataclass
class RunResult:
    out_dir: Path | None
    step: int  # optimizer steps completed (incl. skipped spikes)
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> global mean loss, this process's steps
    eval: dict | None = None  # the last evaluation
    interrupted: bool = False  # stopped by a signal or stop_after (a checkpoint was written)
    final_dir: Path | None = None  # the exported Hugging Face folder
    checkpoint: Path | None = None  # the last checkpoint written
    tokens_per_s: float | None = None  # mean over the measured steps (see Throughput)
    measured_steps: int = 0
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    signal: int | None = None  # the signal that stopped the run, if any


@dataclass
class _LaunchedStep:
    """A step whose numbers are still on their way back from the device."""

    step: int
    lr: float
    values: torch.Tensor  # [loss, grad norm, spike code, running mean], host
    ready: torch.cuda.Event | None  # recorded after the copy (CUDA), None elsewhere


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step it syncs at and exits."""

    def __init__(self, enabled: bool):
        self.enabled, self.received, self._old = enabled, None, {}

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; `labels` are already shifted, -100 is ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        *,
        out_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        callbacks: TrainerCallbacks | None = None,
        stop_after: int | None = None,
        model: torch.nn.Module | None = None,
        progress: bool | None = None,
    ):
        """`model`: a model built by the caller on the run's device, instead of the recipe's
        Complexity model (benchmarks run other architectures through the same step)."""
        self.callbacks = callbacks or TrainerCallbacks()
        self.stop_after = stop_after
        self.info: DistInfo = init_distributed(config.training.device)
        self.device = self.info.device
        # Everything left to decide is decided here, for this machine; the config is read-only
        # from here on. Raises for a global batch that does not divide, or a compile setting that
        # cannot run here, before anything is built.
        self.config = cfg = config.resolve(
            world_size=self.info.world_size,
            device_type=self.device.type,
            out=str(out_dir) if out_dir is not None else None,
        )
        self.precision = cfg.training.precision
        self.accum = cfg.training.grad_accum(self.info.world_size)
        self.out_dir = Path(cfg.out) if cfg.out else None
        show = (cfg.logging.progress if progress is None else progress) and self.info.is_main
        self.logger = MetricsLogger(None, tensorboard=False, progress=show)  # until the run opens its log
        self.folder = RunFolder(self.out_dir, self.info.is_main)

        self.model_config = cfg.model.build()
        self.manifest, tokenizer_source = self._check_data()
        self.tokenizer = self.folder.tokenizer_to_ship(*tokenizer_source, own_copy=resume)
        self._build_loaders()
        self.val_loader, self.val_batches = self._build_val_loader()
        start = self.folder.start(cfg, resume=resume, overwrite=overwrite)
        self.resumed_from = self.last_checkpoint = start.checkpoint
        self.losses: dict[int, float] = {}  # step -> loss, as read back
        # where the run's wall time goes besides its steps (summary.json's wall_time_s): on a short
        # run evaluation, checkpoints and the export are a large share, and they are what to cut
        self.seconds_in: Counter[str] = Counter()
        self.step = ckpt_mod.read_meta(start.checkpoint)["step"] if start.checkpoint else 0
        self.finished = start.resumed and self.folder.finished(self.step, cfg.training.max_steps, self._exports)
        if self.finished:
            return  # nothing to do, nothing to build, nothing written
        self._build_model(model, zipf=start.checkpoint is None)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.schedule, cfg.training.max_steps)
        self.guard = SpikeGuard(cfg.spike, self.device)
        self.launched: list[_LaunchedStep] = []
        self.read_back: dict[int, tuple[float, float, float]] = {}  # step -> (loss, grad norm, lr)
        self.tokens_seen = 0
        if start.checkpoint is not None:
            self._load(start.checkpoint)
        else:  # per-rank training randomness (dropout) differs between ranks; the init above did not
            torch.manual_seed(cfg.training.seed + 1_000_003 * (self.info.rank + 1))
        if self.cuda_graphs:
            # Accumulate outside the graphs' memory (see allocate_grads). After the load: with
            # gradients present, loading a state dict would not create the optimizer's state.
            allocate_grads(self.model)
        self.peak_flops, self.peak_source = self._mfu_peak()
        if not start.resumed:
            self.folder.write_config(cfg)
        self.tokenizer = self.folder.write_tokenizer(self.tokenizer)
        self.folder.write_run_info(self._run_info())
        self.logger = MetricsLogger(
            self.out_dir if self.info.is_main else None,
            tensorboard=cfg.logging.tensorboard,
            wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            run_config=cfg.to_dict(),
            progress=show,
            resume_step=self.step if start.resumed else None,
        )

    # ------------------------------------------------------------------ setup

    def _check_data(self):
        """The data manifest and (tokenizer folder, its recorded hash), checked against the model."""
        cfg = self.config
        if cfg.data.synthetic:
            return None, (None, None)
        if not cfg.data.path:
            raise ValueError("data.path: no training data given (use --data DIR or data.synthetic = true)")
        manifest = data_manifest.read_prepared_manifest(cfg.data.path)
        vocab, ids = self.model_config.vocab_size, int(manifest["vocab_size"])
        data_manifest.check_data_matches_model(manifest, vocab, cfg.data.path)
        if vocab > -(-ids // 128) * 128:  # more than padding: rows no token ever trains, yet sampled
            self.folder.log(
                f"warning: model.vocab_size={vocab} but the data's tokenizer has {ids} tokens: {vocab - ids} "
                f"embedding rows are never trained and their ids decode to nothing; set model.vocab_size={ids}"
            )
        return manifest, (data_manifest.tokenizer_dir(manifest), manifest["tokenizer"]["hash"])

    def _build_loaders(self) -> None:
        """One loader per data slot this rank owns (see data.py); raises if there is too little
        data for one global batch."""
        t, info, vocab = self.config.training, self.info, self.model_config.vocab_size
        self.num_slots = self.accum * info.world_size
        self.slots = list(range(info.rank * self.accum, (info.rank + 1) * self.accum))
        if self.config.data.synthetic:
            self.loaders = [
                data_mod.SyntheticLoader(vocab, t.micro_batch_size, t.seq_len, t.seed, s) for s in self.slots
            ]
        else:
            self.loaders = [
                data_mod.SlotLoader(
                    self.config.data.path, t.micro_batch_size, t.seq_len, t.seed, s, self.num_slots, vocab
                )
                for s in self.slots
            ]

    def _build_val_loader(self):
        """(loader, batches per evaluation) of this rank's share of the val split, or (None, 0)
        without one. Built once: every evaluation iterates it from the start, so each sees the
        same windows. Collective under torchrun (every rank must run as many forwards: FSDP)."""
        t, info = self.config.training, self.info
        if self.manifest is None or data_manifest.split_tokens(self.manifest, "val") <= t.seq_len:
            return None, 0
        max_batches = self.config.eval.max_batches
        loader = data_mod.make_val_loader(
            self.config.data.path,
            t.micro_batch_size,
            t.seq_len,
            rank=info.rank,
            world_size=info.world_size,
            max_batches=None if max_batches is None else max(1, max_batches // info.world_size),
            vocab_size=self.model_config.vocab_size,
        )
        n = len(loader)
        if info.world_size > 1:
            count = torch.tensor([n], device=self.device)
            all_reduce_(count, op=dist.ReduceOp.MIN)
            n = int(count.item())
        return loader, n

    def _build_model(self, model: torch.nn.Module | None, zipf: bool) -> None:
        from ..modeling_complexity import ComplexityForCausalLM
        from ..params import count_parameters

        cfg = self.config
        self._seed_all(cfg.training.seed)  # the same on every rank: FSDP shards one identical init
        if model is None:
            with torch.device(self.device):
                model = ComplexityForCausalLM(self.model_config)
        if self.precision == "bf16":
            model = model.to(torch.bfloat16)
        self.model = model.train()
        self.complexity = isinstance(model, ComplexityForCausalLM)
        if self.complexity:
            # The ids are in range by construction (synthetic) or checked by the loader in every
            # batch (prepared data, whose vocabulary fits the model's): skip the model's per-step
            # device sync.
            model.model.validate_token_ids = False
            if zipf and self.model_config.routing == "zipf" and model.model.token_to_expert is not None:
                self._install_zipf_table()
        self.forward_module = parallelize(model, cfg.training, self.info, self.precision)
        # Compiled, the fp32 cast, log-softmax and its gradient fuse into a few passes over the
        # bf16 logits instead of materialising fp32 copies of a [tokens, vocab] tensor.
        self.loss_fn = (
            torch.compile(causal_lm_loss, dynamic=False, mode=cfg.training.compile_mode)
            if cfg.training.compile
            else causal_lm_loss
        )
        self.cuda_graphs = cfg.training.compile and cfg.training.compile_mode in CUDA_GRAPH_MODES
        self.autocast = uses_autocast(cfg.training, self.info, self.precision)
        self.active_params = (
            count_parameters(model).active if self.complexity else sum(p.numel() for p in model.parameters())
        )
        mc = self.model_config
        self.flops_per_token = flops_per_token(
            self.active_params, mc.num_hidden_layers, mc.num_attention_heads, mc.head_dim, cfg.training.seq_len
        )

    def _install_zipf_table(self) -> None:
        from ..routing import build_routing_table

        mc = self.model_config
        if self.config.data.synthetic:
            return  # random tokens: the modulo table the model starts with is already balanced
        counts, local = data_mod.zipf_counts(
            self.config.data.path, self.manifest, mc.vocab_size, self.info.rank, self.info.world_size
        )
        t = torch.from_numpy(counts).to(self.device)
        if local:
            all_reduce_(t)  # every rank counted its share: sum across ranks
        self.model.set_routing_table(build_routing_table("zipf", mc.vocab_size, mc.num_experts, counts=t.cpu()))

    def _mfu_peak(self) -> tuple[float | None, str | None]:
        """The per-device peak MFU is reported against, and where it comes from (None on the CPU)."""
        if self.config.logging.peak_flops:
            return self.config.logging.peak_flops, "logging.peak_flops"
        if self.device.type != "cuda":
            return None, None
        peak = torch.tensor([measure_matmul_peak(self.device)], device=self.device, dtype=torch.float64)
        all_reduce_(peak)  # every rank timed its own GPU at once: their mean
        return float(peak.item()) / self.info.world_size, MATMUL_PEAK

    @property
    def _exports(self) -> bool:
        return self.config.checkpoint.export_final and self.manifest is not None and self.out_dir is not None

    def _run_info(self) -> dict:
        return {
            "world_size": self.info.world_size,
            "grad_accum": self.accum,
            "data_slots": self.num_slots,
            "device": str(self.device),
            "precision": self.precision,
            "active_params": self.active_params,
            "flops_per_token": self.flops_per_token,
            "mfu_peak_flops_per_device": self.peak_flops,
            "mfu_peak": self.peak_source,
            "auto": self.config.auto,
            "torch": torch.__version__,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
        }

    def _seed_all(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path | None:
        """Checkpoint the current step (collective); the log is made durable up to it first."""
        if self.out_dir is None:
            return None
        with self._timed("checkpoint"):
            return self._save()

    def _save(self) -> Path:
        self.logger.sync()
        meta = {
            "config": self.config.to_dict(),
            "identity": self.config.identity(),
            "scheduler": self.scheduler.state_dict(),
            "spike": self.guard.state_dict(),
            "tokens_seen": self.tokens_seen,
            "world_size": self.info.world_size,
        }
        rank_state = {
            "rng": ckpt_mod.rng_state(),
            "slots": {str(s): loader.state_dict() for s, loader in zip(self.slots, self.loaders)},
        }
        self.last_checkpoint = ckpt_mod.save_checkpoint(
            self.out_dir / "checkpoints",
            self.step,
            self.model,
            self.optimizer,
            meta,
            rank_state,
            self.config.checkpoint.keep_last,
        )
        return self.last_checkpoint

    def _load(self, path: Path) -> None:
        meta = ckpt_mod.load_checkpoint(path, self.model, self.optimizer)
        check_same_run(meta.get("identity", {}), self.config, f"checkpoint {path}")
        self.scheduler.load_state_dict(meta["scheduler"])
        self.guard.load_state_dict(meta.get("spike", {}))
        self.step = int(meta["step"])
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        slot_states = {}
        for rs in meta["rank_states"]:
            slot_states.update(rs["slots"])
        for s, loader in zip(self.slots, self.loaders):
            if str(s) not in slot_states:
                raise ValueError(
                    f"checkpoint {path}: no data position for slot {s} (saved with "
                    f"{len(slot_states)} slots, this run has {self.num_slots})"
                )
            loader.load_state_dict(slot_states[str(s)])
        states = meta["rank_states"]
        # Same world size: each rank gets its own RNG back (bitwise resume). Otherwise rank 0's.
        own = states[self.info.rank] if len(states) == self.info.world_size else states[0]
        ckpt_mod.set_rng_state(own["rng"])

    def _restore_after_spikes(self, step: int) -> None:
        latest = ckpt_mod.find_resume_checkpoint(self.out_dir / "checkpoints") if self.out_dir else None
        if latest is None:
            self.logger.event(step, "restore_failed", reason="no checkpoint to restore")
            raise RuntimeError(
                f"step {step}: {self.guard.consecutive} loss spikes in a row and no checkpoint to restore"
            )
        ckpt_mod.load_checkpoint(latest, self.model, self.optimizer)
        # The LR lives in the param groups that were just reloaded: put the schedule's back.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.guard.consecutive = 0
        self.logger.event(step, "restored", checkpoint=str(latest))

    # ------------------------------------------------------------------ the step

    def _micro_batch_loss(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with amp:
            out = self.forward_module(input_ids=ids, use_cache=False)
            loss = add_router_aux_loss(
                self.loss_fn(out.logits, labels), getattr(out, "aux_loss", None), self.model_config
            )
        return loss

    def _forward_backward(self, batches: list[dict]) -> torch.Tensor:
        """Accumulate the gradients of this rank's micro-batches; -> the global mean loss (device).
        Gradients are reduced across ranks once, after the last micro-batch (DDP no_sync, FSDP2
        set_requires_gradient_sync)."""
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for m, batch in enumerate(batches):
            if self.cuda_graphs:  # each micro-batch's forward begins a new graph generation
                torch.compiler.cudagraph_mark_step_begin()
            last = m == self.accum - 1
            if isinstance(self.forward_module, FSDPModule):
                self.forward_module.set_requires_gradient_sync(last)
            ddp_defer = isinstance(self.forward_module, DistributedDataParallel) and not last
            with self.forward_module.no_sync() if ddp_defer else contextlib.nullcontext():
                loss = self._micro_batch_loss(batch)
                (loss / self.accum).backward()
            total += loss.detach().float()  # read now: the next replay reuses the loss's memory
        total /= self.accum
        if self.info.world_size > 1:
            all_reduce_(total)
            total /= self.info.world_size
        return total

    def _grad_norm(self) -> torch.Tensor:
        """The global gradient norm, a device scalar."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        return norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP2: partial -> global

    def train_step(self) -> None:
        """Launch optimizer step self.step + 1. The only wait is for the previous step's spike
        verdict, read after this step's forward and backward are queued: a restore it calls for
        happens before this step's update, whose gradients are then recomputed."""
        step = self.step + 1
        batches = [self.callbacks.transform_batch(step, next(loader)) for loader in self.loaders]
        loss = self._forward_backward(batches)
        if self.settle():
            self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)
            loss = self._forward_backward(batches)
        grad_norm = self._grad_norm()
        if self.config.optim.grad_clip:
            self.optimizer.grad_scale = clip_divisor(grad_norm, self.config.optim.grad_clip)
        mult = self.callbacks.lr_multiplier(step)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = base * mult
        code, mean = self.guard.check(loss, grad_norm)
        if self.config.spike.enabled:
            self.optimizer.found_inf = (code != 0).float()  # fused AdamW skips the update on the device
        self._launch_read_back(step, torch.stack([loss.double(), grad_norm.double(), code.double(), mean]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.cuda_graphs)  # CUDA graphs: keep the buffers
        self.scheduler.step()
        self.step = step
        self.tokens_seen += self.config.training.tokens_per_step

    def _launch_read_back(self, step: int, values: torch.Tensor) -> None:
        ready = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            values = host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self.launched.append(_LaunchedStep(step, self.optimizer.param_groups[0]["lr"], values, ready))

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
            event = self.guard.verdict(item.step, loss, grad_norm, int(code), mean)
            if event is not None:
                self.logger.event(item.step, "spike_skipped", **event)
                if self.guard.must_restore:
                    self._restore_after_spikes(item.step)
                    restored = True
        return restored

    # ------------------------------------------------------------------ eval

    def run_eval(self) -> dict | None:
        """Held-out loss on the val split (collective); None without one."""
        if self.val_loader is None:
            return None
        return evaluate(
            self.model,
            iter(self.val_loader),
            device=self.device,
            vocab_size=self.model_config.vocab_size,
            autocast_dtype=torch.bfloat16 if self.autocast else None,
            max_batches=self.val_batches,
            split_tokens=data_manifest.split_tokens(self.manifest, "val"),
            split_bytes=data_manifest.split_bytes(self.manifest, "val"),
            expert_shares=not self.config.training.compile,
            forward=self.forward_module,
        )

    @contextlib.contextmanager
    def _timed(self, part: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds_in[part] += time.perf_counter() - started

    def _eval_and_log(self, step: int) -> dict | None:
        started = time.perf_counter()
        result = self.run_eval()
        seconds = time.perf_counter() - started
        self.seconds_in["eval"] += seconds
        if result is not None:
            record = {k: v for k, v in result.items() if k != "expert_shares_per_layer"}
            self.logger.log({"step": step, **record, "eval_time_s": seconds})
            msg = f"eval step {step}: val_loss {result['val_loss']:.4f}"
            if "val_bpb" in result:
                msg += f" | bpb {result['val_bpb']:.4f}"
            if "expert_shares" in result:
                msg += " | experts " + " ".join(f"{s:.2f}" for s in result["expert_shares"])
            self.logger.message(msg)
        return result

    # ------------------------------------------------------------------ the loop

    def run(self) -> RunResult:
        cfg, max_steps = self.config, self.config.training.max_steps
        result = RunResult(out_dir=self.out_dir, step=self.step, losses=self.losses, checkpoint=self.last_checkpoint)
        if self.finished:  # resumed after its end: say so, write nothing
            self.folder.log(f"{self.out_dir}: the run finished at step {self.step}; nothing to do")
            result.final_dir = self.out_dir / "final" if self._exports else None
            return result
        throughput = Throughput(self.step)
        self._run_started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with _Signals(cfg.checkpoint.save_on_signal) as signals, contextlib.closing(self.logger):
            self._announce()
            self.callbacks.on_start(self)
            while self.step < max_steps:
                self.train_step()
                step = result.step = self.step
                log_now = _due(cfg.logging.every, step) or step in (1, max_steps)
                eval_now = _due(cfg.eval.every, step) and step < max_steps
                save_now = _due(cfg.checkpoint.every, step)
                planned_stop = self.stop_after is not None and step >= self.stop_after
                # One process: a signal is seen at once. Under torchrun it is agreed on only at
                # steps that wait for the device anyway (no per-step host sync).
                if not (
                    log_now or eval_now or save_now or planned_stop or (self.info.world_size == 1 and signals.received)
                ):
                    continue
                self.settle()
                throughput.mark(step)  # the device has finished the interval
                if log_now:
                    self._log_step(step, throughput)
                if eval_now:
                    result.eval = self._eval_and_log(step)
                signalled = self._agree_on_signal(signals)
                if save_now or planned_stop or signalled:
                    result.checkpoint = self.save()
                if planned_stop or signalled:
                    result.interrupted, result.signal = True, signals.received
                    why = "a signal" if signalled else f"stop_after={self.stop_after}"
                    self.logger.message(f"stopped at step {step} ({why}); checkpoint {result.checkpoint}")
                    break
                if eval_now or save_now:
                    throughput.start(step)  # the pause is not training time
            else:
                self._finish(result)
            self._measure(result, throughput)
            self.callbacks.on_end(self, result)
        return result

    def _announce(self) -> None:
        cfg = self.config
        if self.resumed_from is not None:
            self.logger.message(f"resumed from {self.resumed_from} at step {self.step}")
        else:
            self.logger.message(
                f"training {cfg.training.max_steps} steps x {cfg.training.tokens_per_step:,} tokens "
                f"on {self.info.world_size} process(es), {self.accum} micro-batch(es) each, "
                f"{self.precision}, {self.active_params:,} active params"
            )
        for key, choice in cfg.auto.items():
            self.logger.message(f"{'compile' if key == 'training.compile' else key}: {choice}")
        if self.peak_flops:
            self.logger.message(f"MFU against the {self.peak_source}: {self.peak_flops / 1e12:,.1f} TFLOP/s per device")

    def _log_step(self, step: int, throughput: Throughput) -> None:
        loss, grad_norm, lr = self.read_back[step]
        tps = throughput.last_tokens_per_s(self.config.training.tokens_per_step)
        mfu = self._mfu(tps)
        self.logger.log(
            {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tps,
                "mfu": mfu,
                "tokens": self.tokens_seen,
                "step_time_s": throughput.last_step_time,
            }
        )
        eta = (self.config.training.max_steps - step) * throughput.mean_step_time
        self.logger.progress_line(step, self.config.training.max_steps, loss, lr, tps, mfu, eta)
        self.read_back.clear()

    def _mfu(self, tokens_per_s: float | None) -> float | None:
        if not self.peak_flops or not tokens_per_s:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_flops * self.info.world_size)

    def _agree_on_signal(self, signals: _Signals) -> bool:
        flag = 1 if signals.received is not None else 0
        if self.info.world_size > 1:
            t = torch.tensor([flag], device=self.device)
            all_reduce_(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return bool(flag)

    def _finish(self, result: RunResult) -> None:
        """The end of the run, each part skipped when a resumed run already has it (a kill may
        have come between them): evaluation, last checkpoint, export, summary (written last)."""
        cfg, step = self.config, self.step
        trained = bool(self.losses)  # this process ran steps (else it resumed at the end)
        if cfg.eval.at_end and (trained or not self.folder.logged_eval_at(step)):
            result.eval = self._eval_and_log(step)
        if self.out_dir is not None and (
            self.last_checkpoint is None or self.last_checkpoint.name != f"step_{step:08d}"
        ):
            result.checkpoint = self.save()
        if self._exports and (trained or not (self.out_dir / "final").is_dir()):
            with self._timed("export"):
                result.final_dir = export_hf(
                    self.model, self.model_config, self.out_dir, self.tokenizer, self.info.is_main
                )
            self.logger.message(f"exported {result.final_dir}")
        elif self._exports:
            result.final_dir = self.out_dir / "final"

    def _measure(self, result: RunResult, throughput: Throughput) -> None:
        """tokens/s, MFU and peak memory of this process's steps; rank 0 writes summary.json."""
        result.measured_steps = throughput.measured_steps
        result.tokens_per_s = throughput.tokens_per_s(self.config.training.tokens_per_step)
        result.mfu = self._mfu(result.tokens_per_s)
        if self.device.type == "cuda":
            peak = torch.tensor([torch.cuda.max_memory_allocated(self.device)], device=self.device)
            all_reduce_(peak, op=dist.ReduceOp.MAX)
            result.peak_memory_bytes = int(peak.item())
        t = self.config.training
        self.folder.write_summary(
            {
                "step": result.step,
                "interrupted": result.interrupted,
                "world_size": self.info.world_size,
                "tokens_per_s": result.tokens_per_s,
                "tokens_per_s_per_device": result.tokens_per_s / self.info.world_size if result.tokens_per_s else None,
                "tokens_per_s_measured_over": f"{result.measured_steps} steps of this process (those after its first "
                "logging interval, which holds the compilation; eval and checkpoint "
                "time excluded)",
                "mfu": result.mfu,
                "mfu_peak_flops_per_device": self.peak_flops,
                "mfu_peak": self.peak_source,
                "precision": self.precision,
                "grad_accum": self.accum,
                "tokens_per_step": t.tokens_per_step,
                "compile": self.config.auto.get("training.compile") if t.compile else "off",
                "peak_memory_gib": result.peak_memory_bytes / 2**30
                if result.peak_memory_bytes
                else None,  # max over ranks
                "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                # this process's loop, from its first step to this summary: the steps (the first
                # compiles the model) are the total less the parts named
                "wall_time_s": {
                    "total": time.perf_counter() - self._run_started,
                    **{part: self.seconds_in[part] for part in ("eval", "checkpoint", "export")},
                },
            }
        )


def train(config: RunConfig, **kwargs) -> RunResult:
    """Train according to `config` (see `Trainer` for keyword options); returns a RunResult. The
    run folder is held meanwhile (`run_folder.in_use`): one run writes it at a time."""
    with in_use(kwargs.get("out_dir") or config.out):
        return Trainer(config, **kwargs).run()
