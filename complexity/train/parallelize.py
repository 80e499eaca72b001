"""Distributed setup and model wrapping, applied from outside the model (torchtitan style).

Order (as torchtitan): activation checkpointing -> torch.compile (each decoder layer, or the
whole model with training.compile_scope = "model") -> data parallelism (FSDP2 `fully_shard` per
decoder layer + root, or DDP). The model code knows nothing
of ranks; state-dict keys are unchanged by every step here (`Module.compile()` compiles in place,
HF's gradient checkpointing flags the layers in place, FSDP2 shards in place, and
`torch.distributed.checkpoint.state_dict` strips DDP's `module.` prefix).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import runtime
from .config import TrainingSection


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(kind: str) -> str:
    return str(runtime.resolve_device(kind, field="training.device"))


def init_distributed(device_kind: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE set), else a single process.
    NCCL on CUDA, gloo on CPU. Idempotent."""
    device_type = resolve_device(device_kind)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant torch.utils.checkpoint)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError("training.activation_checkpointing: this model does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: `model.model.layers` for Complexity and HF Llama/Mixtral."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no `model.layers` to wrap")
    return list(layers)


def apply_compile(model: nn.Module, mode: str, scope: str) -> None:
    """torch.compile in place (`Module.compile`): names and state-dict keys do not change.

    scope "layers": each decoder layer; the repeated block compiles once and is reused, and the
    embedding, routing and LM head around them stay eager. scope "model": the whole model, one
    graph forward and one backward (with mode "reduce-overhead", one CUDA graph each): longer to
    compile, but nothing is left to launch from Python between layers.
    """
    if scope == "model":
        model.compile(mode=mode)
        return
    layers = decoder_layers(model)
    # Layers that differ in structure (the first INL layer has no mu input, the last guidance
    # layer no mu output) or in guarded attributes each add a compiled variant; past dynamo's
    # default limit (8) the remaining layers would silently run eager.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 2 * len(layers)))
    for layer in layers:
        layer.compile(mode=mode)


def allocate_grads(model: nn.Module) -> None:
    """Give every trainable parameter a zero `.grad` now, outside any CUDA graph.

    Under CUDA graphs (compile modes "reduce-overhead", "max-autotune") a replayed backward graph
    returns the gradients in the graph's static memory. A parameter without a `.grad` adopts that
    tensor as its `.grad`, and the next micro-batch's replay overwrites it (torch raises "accessing
    tensor output of CUDAGraphs that has been overwritten by a subsequent run"). A parameter that
    already has a `.grad` gets the new gradient added in place (AccumulateGrad), so with these
    buffers, zeroed in place (`zero_grad(set_to_none=False)`) rather than dropped after each step,
    gradient accumulation sums into memory that no graph owns.
    """
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def apply_fsdp(model: nn.Module, device: torch.device, precision: str, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root (embedding, final norm and the tied
    LM head stay together in the root group). bf16-mixed uses FSDP's MixedPrecisionPolicy
    (bf16 compute, fp32 master weights and gradient reduction) instead of autocast."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16-mixed"
        else MixedPrecisionPolicy()
    )
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed right away in backward: keep them gathered.
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # The model's buffers (routing tables) are identical on every rank and never change: no need
    # to broadcast them from rank 0 before every forward (MBs a step for hash-routed tables).
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
    )


def parallelize(model: nn.Module, training: TrainingSection, info: DistInfo, precision: str) -> nn.Module:
    """Apply AC, compile and data parallelism; returns the module to call for forward/backward
    (the DDP wrapper, or the model itself, sharded in place by FSDP2)."""
    if training.activation_checkpointing:
        apply_activation_checkpointing(model)
    if training.compile:
        apply_compile(model, training.compile_mode, training.compile_scope)
    if info.world_size > 1:
        if training.dp == "fsdp":
            return apply_fsdp(model, info.device, precision, training.fsdp_reshard_after_forward)
        return apply_ddp(model, info.device)
    return model


def uses_autocast(training: TrainingSection, info: DistInfo, precision: str) -> bool:
    """bf16-mixed runs under autocast, except under FSDP2 where the MixedPrecisionPolicy does it."""
    return precision == "bf16-mixed" and not (info.world_size > 1 and training.dp == "fsdp")
