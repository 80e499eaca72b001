"""benchmarks/decode_reference.py, the dense decoder the decode benchmark compares the engine
with: its cached one-token steps equal its full causal forward (float32), its step compiles
whole (fullgraph: no host sync, as the benchmark runs it on the GPU) and decodes the same tokens,
and it is sized to read the Complexity model's weight bytes per token."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from decode_reference import (  # noqa: E402
    DenseDecoder,
    ReferenceConfig,
    decode_bytes_per_token,
    decode_one_token,
    generate,
    same_bytes_config,
)

import complexity  # noqa: E402

CONFIG = ReferenceConfig(
    vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48
)


def _reference() -> DenseDecoder:
    torch.manual_seed(0)
    return DenseDecoder(CONFIG).init_weights_(std=0.2).eval()


@torch.no_grad()
def test_cached_steps_equal_the_full_forward():
    ref = _reference()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ref.setup_caches(2, 16)
    full = ref(ids, torch.arange(12))  # a prefill of all 12 positions: causal flash attention
    ref.setup_caches(2, 16)
    ref(ids[:, :8], torch.arange(8))
    steps = [ref(ids[:, t : t + 1], torch.tensor([t])) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_compiled_step_decodes_the_eager_tokens():
    """fullgraph: the decode position's mask row is indexed by a tensor (an int index of a device
    tensor was a data-dependent host read that fullgraph refuses)."""
    ref = _reference()
    prompts = torch.randint(0, CONFIG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    ref.setup_caches(2, 16)
    eager = generate(ref, prompts, 8)
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, fullgraph=True, backend="aot_eager")
    ref.setup_caches(2, 16)
    assert torch.equal(generate(ref, prompts, 8, step=step), eager)


def test_generate_refuses_more_positions_than_the_cache():
    ref = _reference()
    ref.setup_caches(1, 8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ref, torch.zeros(1, 5, dtype=torch.long), 4)


@pytest.mark.parametrize("preset", ["tiny", "pacific-prime"])
def test_sized_to_the_models_bytes_per_token(preset):
    """The reference reads what the Complexity model reads per batch-1 token (one expert per
    routed layer, the tied embedding once), within its MLP width's rounding."""
    with torch.device("meta"):
        model = complexity.ComplexityForCausalLM(complexity.ComplexityConfig.from_preset(preset, vocab_size=512))
        ref = DenseDecoder(same_bytes_config(model, dtype_bytes=4))
    ours, theirs = decode_bytes_per_token(model), decode_bytes_per_token(ref)
    assert abs(theirs - ours) <= 8 * 3 * model.config.hidden_size * model.config.num_hidden_layers * 4
