"""Where the code runs and what it prints: device and dtype choice, Hugging Face's progress bars.

One definition each, shared by the inference engine, the trainer, evaluation and the converter,
so "auto" means the same thing everywhere: the fast, safe choice for the hardware found.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Accepted dtype names (the spellings torch, transformers and the command line use).
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = "auto", *, field: str = "device") -> torch.device:
    """None / "auto" -> CUDA when torch sees a GPU, else the CPU; anything else as given.

    Asking for CUDA on a machine without it is an error naming `field` (never a silent CPU run).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{field}: {device!r} is not a device (e.g. 'cpu', 'cuda', 'cuda:1', 'auto')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field}: {str(device)!r} was requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{field}: {str(device)!r} was requested but torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def parse_dtype(dtype: str | torch.dtype, *, field: str = "dtype") -> torch.dtype:
    """A dtype name ("bfloat16", "bf16", "float32", ...) or a torch.dtype -> the torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"{field}: unknown value {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, *, field: str = "dtype") -> torch.dtype:
    """None / "auto" -> bfloat16 on CUDA (tensor cores, half the memory), float32 elsewhere (CPU
    bfloat16 kernels are slower than float32 ones); anything else as `parse_dtype` reads it."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(dtype, torch.dtype) and dtype not in DTYPES:
        raise ValueError(f"{field}: unknown value {dtype!r}; expected one of auto, {', '.join(DTYPES)}")
    return parse_dtype(dtype, field=field)


@contextlib.contextmanager
def hf_progress_bars_off() -> Iterator[None]:
    """Silence transformers' progress bars (e.g. "Loading weights") for a block, then restore them.

    For library calls whose own output is a report or a stream that a bar would interleave with.
    """
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


__all__ = ["DTYPES", "hf_progress_bars_off", "parse_dtype", "resolve_device", "resolve_dtype"]
