"""Shared test helpers: tiny configs and models for every variant of the architecture."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import complexity  # noqa: F401  (registers the model with the Auto classes)
from complexity import ComplexityConfig, ComplexityForCausalLM

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=4,
    max_position_embeddings=128,
)

# Every variant the model supports, by a readable id.
VARIANTS = {
    "dense": dict(mlp_type="dense"),
    "dense-mu": dict(mlp_type="dense", mu_mode="guidance"),
    "routed": dict(mlp_type="token_routed"),
    "routed-range": dict(mlp_type="token_routed", routing="range"),
    "routed-shared-mu": dict(mlp_type="token_routed", shared_expert=True, mu_mode="guidance", routing="zipf"),
    "inl": dict(mlp_type="token_routed", mu_mode="inl"),
    "learned": dict(mlp_type="learned_moe"),
    "learned-top2-shared-mu": dict(
        mlp_type="learned_moe", num_experts_per_tok=2, shared_expert=True, mu_mode="guidance"
    ),
    "sliding": dict(mlp_type="token_routed", shared_expert=True, mu_mode="guidance", sliding_window=5),
    "no-qk-norm": dict(mlp_type="token_routed", use_qk_norm=False),
    # top-2 hash routing (§2e): the upstream TR-Hash form (multi-hash tables, unequal slot
    # weights, shared expert, routed branch x2, mu off), and balanced tables with mu guidance,
    # branch scales that vary over depth and the QK-norm's own epsilon
    "hash-top2-shared": dict(
        mlp_type="hash_routed",
        num_experts_per_tok=2,
        route_primary_weight=0.7,
        shared_expert=True,
        routed_output_scale=2.0,
    ),
    "hash-top2-mu": dict(
        mlp_type="hash_routed",
        num_experts_per_tok=2,
        route_strategy="balanced_hash",
        mu_mode="guidance",
        routed_output_scale_first_layer=1.0,
        routed_output_scale_last_layer=3.0,
        qk_norm_eps=1e-5,
    ),
    # the three attention/output knobs at non-default values: RoPE on the first 6 of the 16 dims
    # of each head, the muP softmax scale 1/head_dim, logits divided by 2.5
    "partial-rope-mup": dict(
        mlp_type="hash_routed",
        num_experts_per_tok=2,
        shared_expert=True,
        partial_rotary_factor=0.4,
        attention_multiplier=1 / 16,
        logits_scaling=2.5,
    ),
}


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """benchmarks/<script> with `args` in a child process on one CPU thread, from the repository
    root; its output captured as text."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def tiny_config(**overrides) -> ComplexityConfig:
    return ComplexityConfig(**{**TINY, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Trained-like weights: every parameter (zero-inits and unit norms included) gets noise, so
    every component of every variant changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * (0.1 if p.dim() > 1 else 0.3)
            p.copy_((1.0 if "norm" in name else 0.0) + noise if p.dim() == 1 else noise)
    return model


def tiny_model(seed: int = 0, **overrides) -> ComplexityForCausalLM:
    torch.manual_seed(seed)
    return randomize_(ComplexityForCausalLM(tiny_config(**overrides)), seed).eval()


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant(request):
    return request.param, VARIANTS[request.param]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    bitwise comparisons with subprocesses (OMP_NUM_THREADS=1) need the same thread count, and one
    thread is also much faster for these tiny models on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
