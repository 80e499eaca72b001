"""The GPU suite (`pytest -m gpu tests/gpu`): every test here needs a CUDA device and fails,
never skips, on a machine without one. CI deselects the marker explicitly."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # the suite's shared helpers (conftest, fixtures)


_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.path).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _needs_cuda():
    assert torch.cuda.is_available(), "the GPU suite needs a CUDA device (torch sees none)"
