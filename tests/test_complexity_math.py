"""The shared equations (`complexity.complexity_math`) against float64 statements of
docs/architecture.md, and the model's layers against those functions' layer tables."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_model

from complexity import complexity_math as cm

torch.set_num_threads(2)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("mode", ["none", "guidance", "inl"])
def test_layer_tables_match_the_modules_allocated(mode):
    """Guidance: every layer takes mu (layer 0 mu_init), all but the last give one; INL: every
    layer after the first takes mu, none has a guidance block; none: neither."""
    config = tiny_config(mu_mode=mode, num_hidden_layers=4)
    takes = [cm.layer_takes_mu(config, i) for i in range(4)]
    gives = [cm.layer_gives_mu(config, i) for i in range(4)]
    assert takes == {"none": [False] * 4, "guidance": [True] * 4, "inl": [False, True, True, True]}[mode]
    assert gives == {"none": [False] * 4, "guidance": [True, True, True, False], "inl": [False] * 4}[mode]
    model = tiny_model(mu_mode=mode, num_hidden_layers=4)
    for i, layer in enumerate(model.model.layers):
        assert hasattr(layer.self_attn, "mu_to_q") == takes[i]
        assert (layer.mu_guidance is not None) == gives[i]
        assert (layer.dynamics is not None) == (mode == "inl")


def test_mu_guidance_is_the_clamped_sum():
    config = tiny_config(mu_mode="guidance", mu_clamp_min=0.0, mu_clamp_max=2.0, mu_prev_clamp=2.0)
    mu_param, proj = randn(64, seed=1, scale=2.0), randn(3, 5, 64, seed=2, scale=2.0)
    got = cm.mu_guidance(mu_param, proj, config)
    want = torch.clamp(torch.clamp(mu_param.double(), 0.0, 2.0) + proj.double(), -2.0, 2.0)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    assert got.shape == (3, 5, 64) and got.abs().max() <= 2.0


def test_inl_dynamics_step():
    config = tiny_config(mu_mode="inl", dynamics_dt=0.1, dynamics_beta_max=2.0, dynamics_velocity_clamp=10.0)
    h = config.hidden_size
    a, v, mu_c = randn(2, 7, h, seed=1, scale=3.0), randn(2, 7, h, seed=2, scale=8.0), randn(2, 7, h, seed=3)
    controls = randn(2, 7, 3 * h, seed=4, scale=3.0)
    got_a, got_v = cm.inl_dynamics(a, v, controls, mu_c, config)
    a64, v64, mu64, c64 = (t.double() for t in (a, v, mu_c, controls))
    alpha, beta, gate = (
        torch.sigmoid(c64[..., :h]),
        F.softplus(c64[..., h : 2 * h]).clamp(max=2.0),
        torch.sigmoid(c64[..., 2 * h :]),
    )
    want_v = (alpha * v64 - beta * (a64 - mu64)).clamp(-10.0, 10.0)
    torch.testing.assert_close(got_v.double(), want_v, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got_a.double(), a64 + 0.1 * gate * want_v, atol=1e-5, rtol=1e-6)
    assert got_v.abs().max() <= 10.0 and (want_v.abs() == 10.0).any()  # the clamp was exercised


def test_mu_highway_accumulates_every_layer():
    """INL: mu_prev(l+1) = mu_c(l) + scale * sum_{l' <= l} mu_c(l'); guidance passes mu on as is."""
    config = tiny_config(mu_mode="inl", mu_highway_scale=0.1)
    mus = [randn(4, 64, seed=s) for s in range(4)]
    mu_sum = None
    for layer, mu in enumerate(mus):
        mu_prev, mu_sum = cm.next_layer_mu(config, mu, mu_sum)
        want = mus[layer].double() + 0.1 * sum(m.double() for m in mus[: layer + 1])
        torch.testing.assert_close(mu_prev.double(), want, atol=1e-6, rtol=0)
    guidance = tiny_config(mu_mode="guidance")
    assert cm.next_layer_mu(guidance, mus[0], None) == (mus[0], None)


def test_initial_mu_state():
    hidden = randn(2, 5, 64)
    mu_init = randn(64, seed=1)
    mu_prev, velocity = cm.initial_mu_state(tiny_config(mu_mode="guidance"), mu_init, hidden)
    assert velocity is None and torch.equal(mu_prev, mu_init.expand(2, 5, 64))
    mu_prev, velocity = cm.initial_mu_state(tiny_config(mu_mode="inl"), None, hidden)
    assert mu_prev is None and torch.equal(velocity, torch.zeros(2, 5, 64))
    assert cm.initial_mu_state(tiny_config(), None, hidden) == (None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mu_router_override(dtype):
    """e = argmax(bias * one_hot(table) + logits): the table wins unless a logit beats it by the
    bias; a bf16 model routes as the fp32 sum does."""
    table = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(0))
    logits = randn(200, 4, seed=1, scale=6.0).to(dtype)
    got = cm.mu_router_override(table, logits, 10.0)
    want = (logits.double() + 10.0 * F.one_hot(table, 4).double()).argmax(-1)
    assert torch.equal(got, want)
    assert 0 < (got != table).sum() < 200  # some tokens moved, most did not
    assert torch.equal(cm.mu_router_override(table, torch.zeros(200, 4, dtype=dtype), 10.0), table)


@pytest.mark.parametrize("k", [1, 2])
def test_learned_topk_and_mixture(k):
    logits = randn(9, 4, seed=2, scale=2.0)
    probs, weights, experts = cm.learned_topk(logits, k)
    ref_probs = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(probs.double(), ref_probs, atol=1e-6, rtol=0)
    ref_weights, ref_experts = ref_probs.topk(k, -1)
    if k > 1:  # renormalised over the k (Mixtral); k = 1 keeps the raw probability (Switch)
        ref_weights = ref_weights / ref_weights.sum(-1, keepdim=True)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights.double(), ref_weights, atol=1e-6, rtol=0)

    bank = randn(4, 16, 16, seed=3).double()  # expert e: x @ bank[e]
    x = randn(9, 16, seed=4).double()
    got = cm.mix_topk_experts(lambda rows, ids: torch.einsum("nh,nho->no", rows, bank[ids]), x, experts, weights)
    want = sum(weights[:, j, None].double() * torch.einsum("nh,nho->no", x, bank[experts[:, j]]) for j in range(k))
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_switch_aux_loss_counts_only_real_tokens():
    probs = torch.softmax(randn(12, 4, seed=5, scale=2.0), -1)
    experts = probs.topk(2, -1).indices
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1])
    got = cm.switch_aux_loss(probs, experts, 4, mask)
    keep = mask.bool()
    f = F.one_hot(experts[keep], 4).sum(1).double().mean(0) / 2
    want = 4 * (f * probs[keep].double().mean(0)).sum()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, cm.switch_aux_loss(probs[keep], experts[keep], 4))
    balanced = cm.switch_aux_loss(torch.full((8, 4), 0.25), torch.arange(8).remainder(4).unsqueeze(1), 4)
    torch.testing.assert_close(balanced, torch.tensor(1.0))


def test_add_router_aux_loss_applies_the_coefficient_once():
    loss, aux = torch.tensor(2.0), torch.tensor(1.5)
    assert cm.add_router_aux_loss(loss, aux, tiny_config(router_aux_loss_coef=0.01)).item() == pytest.approx(2.015)
    assert cm.add_router_aux_loss(loss, None, tiny_config()) is loss
    assert cm.add_router_aux_loss(loss, aux, tiny_config(router_aux_loss_coef=0.0)) is loss
