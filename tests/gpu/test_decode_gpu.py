"""Decoding on CUDA in float32: the engine with CUDA graphs (with and without torch.compile) gives
exactly the tokens of the eager engine, which gives exactly the tokens of transformers'
`generate()`, for every kind of model (greedy, 4 prompts of different lengths decoded together).

float32 with TF32 off: the three paths compute the same logits up to summation order, and greedy
argmax over a random model's well-separated logits does not flip (a capture bug, a stale KV slot
or a wrong position shows up as different tokens at once).
"""

from __future__ import annotations

import pytest
import torch

import complexity
from complexity.inference import Engine, SamplingParams

VARIANTS = {
    "token_routed": {},
    "dense": dict(mlp_type="dense"),
    "inl": dict(mu_mode="inl"),
    "guidance_shared_sliding": dict(mu_mode="guidance", shared_expert=True, sliding_window=24),
    "learned_moe": dict(mlp_type="learned_moe"),
}
NEW_TOKENS = 40


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)
    torch.compiler.reset()


def _model(**overrides):
    torch.manual_seed(0)
    cfg = complexity.ComplexityConfig.from_preset(
        "tiny", vocab_size=512, initializer_range=0.1, max_position_embeddings=256, **overrides
    )
    return complexity.ComplexityForCausalLM(cfg).to(device="cuda", dtype=torch.float32).eval()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(4, 512, (n,), generator=g).tolist() for n in (5, 17, 40, 9)]


def _engine_tokens(model, **flags) -> list[list[int]]:
    engine = Engine(model, None, max_batch=4, max_seq_len=128, **flags)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    return [out.token_ids for out in engine.generate(_prompts(), params)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_graph_decode_equals_eager_equals_generate(variant):
    model = _model(**VARIANTS[variant])
    eager = _engine_tokens(model, cuda_graphs=False, compile=False)
    graphs = _engine_tokens(model, cuda_graphs=True, compile=False)
    reference = []
    for prompt in _prompts():
        ids = torch.tensor([prompt], device="cuda")
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )
        reference.append(out[0, len(prompt) :].tolist())
    assert all(len(t) == NEW_TOKENS for t in eager)
    assert eager == reference
    assert graphs == eager


@pytest.mark.parametrize("variant", ["token_routed", "guidance_shared_sliding"])
def test_compiled_cuda_graph_decode_equals_eager(variant):
    model = _model(**VARIANTS[variant])
    assert _engine_tokens(model, cuda_graphs=True, compile=True) == _engine_tokens(
        model, cuda_graphs=False, compile=False
    )
