"""complexity.runtime: one meaning of "auto" for devices and dtypes, and the progress-bar silencer."""

from __future__ import annotations

import pytest
import torch
from transformers.utils import logging as hf_logging

from complexity.runtime import hf_progress_bars_off, parse_dtype, resolve_device, resolve_dtype


def test_auto_device_is_cuda_exactly_when_torch_sees_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"training\.device: 'cuda' was requested but torch sees no CUDA device"):
        resolve_device("cuda", field="training.device")


def test_a_device_string_torch_cannot_read_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"--device: 'cdua' is not a device"):
        resolve_device("cdua", field="--device")


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_elsewhere():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype(None, torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cuda")) is torch.float16
    assert resolve_dtype(torch.float64, torch.device("cpu")) is torch.float64


def test_dtype_names_and_errors():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match=r"--dtype: unknown value 'int8'; expected one of float32, fp32"):
        parse_dtype("int8", field="--dtype")
    with pytest.raises(ValueError, match=r"dtype: unknown value 'auto'") as info:
        parse_dtype("auto")  # "auto" needs a device: resolve_dtype
    assert "expected one of auto" not in str(info.value)
    with pytest.raises(ValueError, match=r"dtype: unknown value 'fp8'; expected one of auto, float32"):
        resolve_dtype("fp8", torch.device("cpu"))


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_bars_are_restored_as_they_were(enabled):
    before = hf_logging.is_progress_bar_enabled()
    try:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        with pytest.raises(RuntimeError), hf_progress_bars_off():
            assert not hf_logging.is_progress_bar_enabled()
            raise RuntimeError("the block fails")
        assert hf_logging.is_progress_bar_enabled() is enabled
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
