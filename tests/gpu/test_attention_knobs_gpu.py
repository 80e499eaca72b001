"""partial_rotary_factor, attention_multiplier and logits_scaling on CUDA: SDPA's CUDA kernels
(flash / memory-efficient, which take the scale as an argument) and the eager path, float32 and
bfloat16, uncached and through a KV cache, against the same model in float64 on the CPU."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

# The suite's variants and tiny models (tests/conftest.py; `conftest` here is tests/gpu's own).
_spec = importlib.util.spec_from_file_location("suite_conftest", Path(__file__).parents[1] / "conftest.py")
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
VARIANTS, tiny_model = _suite.VARIANTS, _suite.tiny_model

# relative to the largest reference logit: float32 differs by summation order (no TF32 here),
# bfloat16 by one rounding of every activation over three layers
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@torch.no_grad()
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_knobs_on_cuda_match_the_float64_cpu_model(impl, dtype):
    model = tiny_model(**VARIANTS["partial-rope-mup"], attn_implementation=impl)
    ids = torch.randint(4, 256, (2, 24), generator=torch.Generator().manual_seed(21))
    want = copy.deepcopy(model).double()(ids).logits
    # the same weights without the knobs: the knobs must move the logits far past the tolerance
    plain_config = copy.deepcopy(model.config)
    plain_config.partial_rotary_factor, plain_config.attention_multiplier, plain_config.logits_scaling = 1.0, None, 1.0
    plain = type(model)(plain_config)
    plain.load_state_dict(model.state_dict())
    without = plain.double().eval()(ids).logits
    atol = TOLERANCE[dtype] * float(want.abs().max())
    assert float((without - want).abs().max()) > 10 * atol

    cuda = model.to("cuda", dtype)
    got = cuda(ids.cuda()).logits.double().cpu()
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    out = cuda(ids[:, :16].cuda(), use_cache=True)  # prefill, then one token at a time
    steps, cache = [out.logits], out.past_key_values
    for t in range(16, 24):
        out = cuda(ids[:, t : t + 1].cuda(), past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, dim=1).double().cpu(), want, atol=atol, rtol=0)
