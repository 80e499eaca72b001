"""TR-Hash MoE: route tables, fixed weights and scales, the routed computation, upstream's layouts
as its own code wrote them (tests/fixtures/trhash), and a grid of further variants written from the
format's description in all four layouts (tests/trhash_synthetic.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import trhash_synthetic as syn  # tests/trhash_synthetic.py: the format written from its description
from safetensors.torch import load_file, save_file

import complexity.hash_routing as hr
from complexity.complexity_kernels import rope_inv_freq
from complexity.hash_routing import (
    ROUTE_SEED,
    ROUTE_STRATEGIES,
    branch_scale,
    build_route_table,
    check_route_table,
    h32,
    hash_routed_mlp,
    slot_weights,
    token_routes,
)
from complexity.integrations.upstream import UpstreamFormatError, detect_upstream
from complexity.integrations.upstream.trhash import (
    DEEP,
    HF,
    NATIVE,
    deep_config,
    fused_route_metadata,
    read_trhash,
    trhash_layout,
    write_deep,
)

torch.set_num_threads(2)

FIXTURES = Path(__file__).parent / "fixtures" / "trhash"
VARIANTS = ("mh2-top2-shared", "bal-top2-e8-noshared")
LAYOUT_NAMES = (NATIVE, HF, DEEP)


def fixture(variant: str, layout: str | None = None) -> Path:
    return FIXTURES / variant / layout if layout else FIXTURES / variant


def reference(variant: str) -> dict[str, torch.Tensor]:
    return load_file(fixture(variant) / "reference.safetensors")


# ----------------------------------------------------------------------------- route tables


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_fixture_table_is_rebuilt_bit_for_bit_from_its_config(variant):
    raw = json.loads((fixture(variant, NATIVE) / "config.json").read_text())
    stored = load_file(fixture(variant, NATIVE) / "model.safetensors")
    strategy = {"token_id_multi_hash": "multi_hash", "token_id_balanced_hash": "balanced_hash"}[raw["routing_strategy"]]
    for layer in range(raw["num_hidden_layers"]):
        table = build_route_table(
            strategy,
            vocab_size=raw["vocab_size"],
            num_experts=raw["num_experts"],
            num_experts_per_tok=raw["top_k"],
            layer_idx=layer,
            route_hash_count=raw["route_hash_count"],
        )
        want = stored[f"layers.{layer}.mlp.engine.route_table"]
        assert table.dtype == want.dtype == torch.int64
        assert torch.equal(table, want), f"layer {layer}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_routes_give_the_reference_routes(variant):
    ref = reference(variant)
    ckpt = read_trhash(fixture(variant, NATIVE))
    for layer in range(ckpt.config.num_hidden_layers):
        routes = token_routes(ckpt.tensors[f"layers.{layer}.mlp.route_table"], ref["input_ids"])  # [B, T, k]
        assert torch.equal(routes.permute(2, 0, 1), ref["routes"][layer])


def _h32_python(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_h32_is_exact_on_int64_tensors_up_to_2_pow_32():
    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x1_0000_0001, 0x9E3779B1 * 31]
    values += torch.randint(0, 2**40, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    got = h32(torch.tensor(values, dtype=torch.long)).tolist()
    assert got == [_h32_python(v) for v in values]


CASES = [(97, 4, 2), (512, 4, 4), (1000, 8, 2), (333, 8, 4), (64, 16, 4), (50, 2, 1), (40, 6, 2)]


def _table(strategy, vocab, experts, k, layer=0, count=2):
    return build_route_table(
        strategy, vocab_size=vocab, num_experts=experts, num_experts_per_tok=k, layer_idx=layer, route_hash_count=count
    )


# hierarchical_hash needs an even E >= 4 and k <= E/2 (its refusals are tested below)
BUILDER_CASES = [
    (s, *case)
    for s in ROUTE_STRATEGIES
    for case in CASES
    if s != "hierarchical_hash" or (case[1] >= 4 and case[1] % 2 == 0 and 2 * case[2] <= case[1])
]


@pytest.mark.parametrize("strategy,vocab,experts,k", BUILDER_CASES)
def test_every_builder_gives_distinct_in_range_experts_per_token(strategy, vocab, experts, k):
    for layer in (0, 3):
        table = _table(strategy, vocab, experts, k, layer)
        assert table.shape == (k, vocab) and table.dtype == torch.int64
        check_route_table(table, experts, vocab, k)  # range and distinctness
        assert table.min() >= 0 and table.max() < experts
        assert (table.sort(0).values.diff(dim=0) != 0).all()


@pytest.mark.parametrize("vocab,experts,k", [(97, 4, 2), (1000, 8, 2), (333, 8, 4), (64, 16, 4), (50, 2, 1)])
def test_balanced_hash_uses_each_expert_once_per_slot_in_every_full_block(vocab, experts, k):
    for layer in (0, 2):
        table = _table("balanced_hash", vocab, experts, k, layer)
        order = torch.randperm(vocab, generator=torch.Generator().manual_seed(ROUTE_SEED + 104729 * layer))
        full = vocab // experts * experts
        blocks = table[:, order[:full]].view(k, -1, experts)
        assert (blocks.sort(-1).values == torch.arange(experts)).all()
        counts = torch.stack([torch.bincount(row, minlength=experts) for row in table])
        assert counts.min() >= vocab // experts and counts.max() <= -(-vocab // experts)


def test_modulo_cyclic_is_periodic_and_cyclic():
    table = _table("modulo_cyclic", 103, 8, 4, layer=5)
    assert torch.equal(table[0, :-8], table[0, 8:])  # primary depends on id mod E only
    assert sorted(table[0, :8].tolist()) == list(range(8))  # a permutation of the experts
    for j in range(4):
        assert torch.equal(table[j], (table[0] + j) % 8)


def test_hierarchical_hash_refines_the_balanced_table_over_half_the_experts():
    for layer in (0, 1):
        table = _table("hierarchical_hash", 500, 8, 2, layer)
        parents = _table("balanced_hash", 500, 4, 2, layer)
        assert torch.equal(table % 4, parents)
        assert (table >= 4).any() and (table < 4).any()


def test_multi_hash_depends_on_the_hash_count_and_the_layer():
    tables = {c: _table("multi_hash", 300, 8, 2, count=c) for c in (2, 3, 8)}
    assert not torch.equal(tables[2], tables[3]) and not torch.equal(tables[3], tables[8])
    assert not torch.equal(_table("multi_hash", 300, 8, 2, layer=0), _table("multi_hash", 300, 8, 2, layer=1))


@pytest.mark.parametrize("strategy", ROUTE_STRATEGIES)
def test_builders_neither_use_nor_consume_the_global_rng(strategy):
    torch.manual_seed(1)
    a = _table(strategy, 200, 8, 2, 1)
    after = torch.rand(1)
    torch.manual_seed(2)
    b = _table(strategy, 200, 8, 2, 1)
    torch.manual_seed(1)
    _table(strategy, 200, 8, 2, 1)
    assert torch.equal(a, b) and torch.equal(torch.rand(1), after)


def test_single_expert_tables_are_zero():
    for strategy in ("modulo_cyclic", "balanced_hash", "multi_hash"):
        assert torch.equal(_table(strategy, 30, 1, 1), torch.zeros(1, 30, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(route_strategy="hierarchical_hash", num_experts=6, num_experts_per_tok=4), "num_experts_per_tok"),
        (dict(route_strategy="hierarchical_hash", num_experts=2, num_experts_per_tok=1), "num_experts"),
        (dict(route_strategy="hierarchical_hash", num_experts=10 - 1, num_experts_per_tok=2), "num_experts"),
        (dict(route_strategy="balanced_hash", num_experts=6, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(route_strategy="modulo_cyclic", num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (
            dict(route_strategy="multi_hash", num_experts=4, num_experts_per_tok=2, route_hash_count=1),
            "route_hash_count",
        ),
        (
            dict(route_strategy="multi_hash", num_experts=4, num_experts_per_tok=2, route_hash_count=9),
            "route_hash_count",
        ),
        (
            dict(route_strategy="multi_hash", num_experts=4, num_experts_per_tok=2, route_hash_count=True),
            "route_hash_count",
        ),
        (dict(route_strategy="zipf", num_experts=4, num_experts_per_tok=2), "route_strategy"),
        (dict(route_strategy="modulo_cyclic", num_experts=0, num_experts_per_tok=1), "num_experts"),
        (dict(route_strategy="modulo_cyclic", num_experts=4, num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(route_strategy="modulo_cyclic", num_experts=4, num_experts_per_tok=2, vocab_size=0), "vocab_size"),
        (dict(route_strategy="modulo_cyclic", num_experts=4, num_experts_per_tok=2, layer_idx=-1), "layer_idx"),
    ],
)
def test_impossible_settings_name_the_field(kwargs, field):
    args = dict(vocab_size=64, layer_idx=0) | kwargs
    with pytest.raises(ValueError, match=rf"^{field}:"):
        build_route_table(args.pop("route_strategy"), **args)


def test_check_route_table_names_the_token():
    table = _table("balanced_hash", 50, 4, 2)
    check_route_table(table, 4, 50, 2)
    bad = table.clone()
    bad[1, 7] = bad[0, 7]
    with pytest.raises(ValueError, match="token 7 repeats an expert"):
        check_route_table(bad, 4)
    bad = table.clone()
    bad[0, 9] = 4
    with pytest.raises(ValueError, match=r"token 9 is routed to expert\(s\) \[4, .*outside \[0, 4\)"):
        check_route_table(bad, 4)
    with pytest.raises(ValueError, match="integer tensor"):
        check_route_table(table.float(), 4)
    with pytest.raises(ValueError, match=r"shape \[2, 50\], expected \[k, 51\]"):
        check_route_table(table, 4, vocab_size=51)


# ----------------------------------------------------------------------------- slot weights and branch scales


def test_slot_weights():
    assert slot_weights(2, 0.5) == (0.5, 0.5)
    assert slot_weights(2, None) == (0.5, 0.5)
    assert slot_weights(4, None) == (0.25,) * 4
    assert slot_weights(2, 0.7) == pytest.approx((0.7, 0.3))
    assert slot_weights(4, 0.7) == pytest.approx((0.7, 0.1, 0.1, 0.1))
    assert slot_weights(1, 0.3) == (1.0,) and slot_weights(1, None) == (1.0,)
    assert slot_weights(3, 1.0) == (1.0, 0.0, 0.0)
    for bad in (1.5, -0.1, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match="^route_primary_weight:"):
            slot_weights(2, bad)


def test_branch_scale_interpolates_over_depth():
    assert [branch_scale(2.0, None, None, i, 4) for i in range(4)] == [2.0] * 4
    assert [branch_scale(2.0, 1.0, 4.0, i, 4) for i in range(4)] == [1.0, 2.0, 3.0, 4.0]
    assert [branch_scale(2.0, None, 5.0, i, 4) for i in range(4)] == [2.0, 3.0, 4.0, 5.0]  # missing first -> base
    assert [branch_scale(2.0, 3.0, None, i, 4) for i in range(4)] == [3.0] * 4  # missing last -> first
    assert branch_scale(2.0, 1.0, 4.0, 0, 1) == 1.0


# ----------------------------------------------------------------------------- the routed computation


def loop_reference(x, routes, weights, gate_up, down, shared, shared_scale, routed_scale):
    """float64, one token and one slot at a time: the definition."""
    width = down.shape[1]
    rows = []
    for n in range(x.shape[0]):
        b = x[n].double()
        y = torch.zeros_like(b)
        for j, w in enumerate(weights):
            e = int(routes[n, j])
            h = b @ gate_up[e].double()
            y = y + routed_scale * w * ((F.silu(h[:width]) * h[width:]) @ down[e].double())
        if shared is not None:
            gate, up, d = (t.double() for t in shared)
            y = y + shared_scale * (d @ (F.silu(gate @ b) * (up @ b)))
        rows.append(y)
    return torch.stack(rows)


def mlp_inputs(tokens=37, hidden=16, experts=4, k=2, width=8, shared=12, dtype=torch.float32, seed=0, vocab=101):
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return (
            (
                torch.randn(*size, generator=gen) / size[-2] ** 0.5
                if len(size) > 1
                else torch.randn(*size, generator=gen)
            )
            .to(dtype)
            .requires_grad_()
        )

    table = _table("balanced_hash", vocab, experts, k)
    ids = torch.randint(0, vocab, (tokens,), generator=gen)
    return dict(
        x=torch.randn(tokens, hidden, generator=gen).to(dtype).requires_grad_(),
        routes=token_routes(table, ids),
        weights=slot_weights(k, 0.7 if k > 1 else None),
        gate_up=rand(experts, hidden, 2 * width),
        down=rand(experts, width, hidden),
        shared=(rand(shared, hidden), rand(shared, hidden), rand(hidden, shared)) if shared else None,
        shared_scale=1.5,
        routed_scale=2.0,
    )


def call(inputs, strategy):
    i = inputs
    return hash_routed_mlp(
        i["x"],
        i["routes"],
        i["weights"],
        i["gate_up"],
        i["down"],
        i["shared"],
        i["shared_scale"],
        i["routed_scale"],
        strategy=strategy,
    )


def leaves(inputs):
    return [inputs["x"], inputs["gate_up"], inputs["down"], *(inputs["shared"] or ())]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SHAPES = {
    "shared-k2": dict(),
    "no-shared-k4": dict(experts=8, k=4, shared=0),
    "k1": dict(k=1),
    "e8-k2-shared": dict(experts=8, k=2, width=4, shared=20),
}


@pytest.mark.parametrize("strategy", ["dense", "grouped", "auto"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("tokens", [1, 37, 1100])  # 1100: the dense strategy's fused-weights form
def test_fp32_strategies_match_a_float64_token_loop(strategy, shape, tokens):
    inputs = mlp_inputs(tokens=tokens, **SHAPES[shape])
    want = loop_reference(
        *(inputs[k] for k in ("x", "routes", "weights", "gate_up", "down", "shared", "shared_scale", "routed_scale"))
    )
    got = call(inputs, strategy)
    assert got.dtype == torch.float32 and got.shape == inputs["x"].shape
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("strategy", ["dense", "grouped"])
@pytest.mark.parametrize("tokens", [37, 1100])
def test_gradients_reach_every_weight_and_match_float64(strategy, tokens):
    inputs = mlp_inputs(tokens=tokens)
    ref = {
        k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in inputs.items()
        if k != "shared"
    }
    ref["shared"] = tuple(t.detach().double().requires_grad_() for t in inputs["shared"])
    cot = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (call(inputs, strategy) * cot.float()).sum().backward()
    (
        loop_reference(
            *(ref[k] for k in ("x", "routes", "weights", "gate_up", "down", "shared", "shared_scale", "routed_scale"))
        )
        * cot
    ).sum().backward()
    for got, want in zip(leaves(inputs), leaves(ref)):
        assert got.grad is not None and rel(got.grad, want.grad) < 1e-5
    # every expert was chosen by some token here, and every expert got a gradient
    assert (inputs["gate_up"].grad.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("tokens", [7, 1030])
def test_dense_strategy_gradcheck_float64(tokens, monkeypatch):
    monkeypatch.setattr(hr, "FUSE_WEIGHTS_MIN_ROWS", 8)  # both forms at gradcheck-friendly sizes
    inputs = mlp_inputs(tokens=min(tokens, 12), dtype=torch.float64, hidden=6, width=3, shared=4)
    tensors = leaves(inputs)

    def f(x, gate_up, down, *shared):
        return hash_routed_mlp(
            x, inputs["routes"], inputs["weights"], gate_up, down, tuple(shared), 1.5, 2.0, strategy="dense"
        )

    assert torch.autograd.gradcheck(f, tensors)


def test_grouped_strategy_in_bf16_matches_the_fp32_loop_within_bf16_rounding():
    inputs = mlp_inputs(tokens=64, hidden=32, width=16, shared=16, dtype=torch.bfloat16)
    want = loop_reference(
        *(inputs[k] for k in ("x", "routes", "weights", "gate_up", "down", "shared", "shared_scale", "routed_scale"))
    )
    for strategy in ("dense", "grouped"):
        got = call(inputs, strategy)
        assert got.dtype == torch.bfloat16 and rel(got, want) < 1e-2


def test_autocast_computes_in_the_autocast_dtype():
    inputs = mlp_inputs(tokens=16, hidden=32, width=16, shared=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for strategy in ("dense", "grouped"):
            out = call(inputs, strategy)
            assert out.dtype == torch.bfloat16
            out.float().sum().backward()
    assert inputs["gate_up"].grad.dtype == torch.float32


@pytest.mark.parametrize("strategy,dtype", [("dense", torch.float32), ("grouped", torch.bfloat16)])
def test_compiles_with_fullgraph_forward_and_backward(strategy, dtype):
    torch._dynamo.reset()
    inputs = mlp_inputs(tokens=40, hidden=32, width=16, shared=16, dtype=dtype)
    want = call(inputs, strategy)
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True, dynamic=False)
    got = compiled(inputs, strategy)
    assert torch.equal(got, want)
    got.float().sum().backward()
    assert all(t.grad is not None for t in leaves(inputs))


def test_auto_picks_dense_when_the_extra_flops_are_small():
    grouped_ok = True
    assert hr.pick_strategy(4, 2, 64, 3072, grouped_ok) == "dense"  # the 200M shape: 4% extra
    assert hr.pick_strategy(8, 2, 512, 1024, grouped_ok) == "grouped"
    assert hr.pick_strategy(8, 2, 512, 1024, grouped_ok=False) == "dense"


def test_bad_arguments_are_refused():
    inputs = mlp_inputs()
    with pytest.raises(ValueError, match="^strategy: unknown"):
        call(inputs, "fast")
    with pytest.raises(ValueError, match=r"^routes: has shape \[37, 2\], expected \[37, 3\]"):
        hash_routed_mlp(inputs["x"], inputs["routes"], (0.5, 0.3, 0.2), inputs["gate_up"], inputs["down"])
    double = mlp_inputs(dtype=torch.float64)
    with pytest.raises(ValueError, match="^strategy: 'grouped' needs torch's grouped GEMM for torch.float64"):
        call(double, "grouped")


def _load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_moe", Path(__file__).parents[1] / "benchmarks" / "bench_moe.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_moe_correctness_part_runs_on_the_cpu(tmp_path):
    bench = _load_bench()
    results = bench.main(["--device", "cpu", "--check-only", "--tokens", "48", "1", "--out", str(tmp_path)])
    assert results["checks"] and all(errs for errs in results["checks"].values())
    written = json.loads((tmp_path / "bench_moe.json").read_text())
    assert written["checks"].keys() == results["checks"].keys()
    bad = bench.make_inputs(bench.CPU_SHAPES[0], 8, "cpu", torch.float32)
    with torch.no_grad():
        bad["down"][0].mul_(1.01)  # the reference must notice a wrong expert
    assert (
        rel(
            bench.run_moe(bad, "dense"),
            bench.reference(bench.make_inputs(bench.CPU_SHAPES[0], 8, "cpu", torch.float32)),
        )
        > 1e-5
    )


# ----------------------------------------------------------------------------- the three layouts


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_each_layout_is_detected(variant, layout):
    raw = json.loads((fixture(variant, layout) / "config.json").read_text())
    assert trhash_layout(raw)[0] == layout
    ckpt = read_trhash(fixture(variant, layout))
    assert ckpt.layout == layout and ckpt.notes[0].startswith(f"layout {layout}: config.json has")
    found = detect_upstream(fixture(variant, layout))  # the converter's one detection path names it
    assert found.design == f"tr-hash-{layout}" and found.notes[0].startswith(f"TR-Hash MoE, {layout} layout")


@pytest.mark.parametrize("variant", VARIANTS)
def test_layouts_give_identical_tensors_and_configs(variant):
    native, hf, deep = (read_trhash(fixture(variant, layout)) for layout in LAYOUT_NAMES)
    for other in (hf, deep):
        assert other.config == native.config
        assert other.tensors.keys() == native.tensors.keys()
        for name, tensor in native.tensors.items():
            assert other.tensors[name].dtype == tensor.dtype and torch.equal(other.tensors[name], tensor), name


def test_resolved_configs_of_the_fixtures():
    mh2 = read_trhash(fixture("mh2-top2-shared", DEEP)).config
    assert (mh2.num_experts, mh2.num_experts_per_tok, mh2.expert_width, mh2.shared_expert_width) == (4, 2, 16, 64)
    assert (mh2.route_strategy, mh2.route_hash_count) == ("multi_hash", 2)  # recovered: deep drops it
    assert mh2.slot_weights == (0.5, 0.5) and (mh2.shared_scale(1), mh2.routed_scale(1)) == (1.0, 2.0)
    bal = read_trhash(fixture("bal-top2-e8-noshared", NATIVE)).config
    assert (bal.num_experts, bal.expert_width, bal.shared_expert_width, bal.num_key_value_heads) == (8, 8, None, 1)
    assert (bal.route_strategy, bal.route_hash_count) == ("balanced_hash", None)
    assert bal.slot_weights == pytest.approx((0.7, 0.3)) and bal.routed_scale(0) == 1.5
    assert not hasattr(bal, "top_k")  # the architecture's k is never a sampling top_k


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def reference_forward(ckpt, ids):
    """The TR-Hash forward from the neutral description, fp32: (logits, hidden states per block)."""
    c, t = ckpt.config, ckpt.tensors
    b, s = ids.shape
    d, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    freqs = torch.arange(s, dtype=torch.float32)[:, None] * rope_inv_freq(d, c.rope_theta)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    x = t["embed_tokens.weight"][ids]
    states = [x]
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        a = _rms(x, t[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = (a @ t[p + "self_attn.q_proj.weight"].T).view(b, s, nh, d)
        k = (a @ t[p + "self_attn.k_proj.weight"].T).view(b, s, nkv, d)
        v = (a @ t[p + "self_attn.v_proj.weight"].T).view(b, s, nkv, d)
        if c.use_qk_norm:
            q, k = (
                _rms(q, t[p + "self_attn.q_norm.weight"], c.qk_norm_eps),
                _rms(k, t[p + "self_attn.k_norm.weight"], c.qk_norm_eps),
            )
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        h = x + o @ t[p + "self_attn.o_proj.weight"].T
        m = _rms(h, t[p + "post_attention_layernorm.weight"], c.rms_norm_eps).reshape(b * s, -1)
        shared = (
            tuple(t[p + f"mlp.shared_expert.{n}_proj.weight"] for n in ("gate", "up", "down"))
            if c.shared_expert
            else None
        )
        out = hash_routed_mlp(
            m,
            token_routes(t[p + "mlp.route_table"], ids.reshape(-1)),
            c.slot_weights,
            torch.cat([t[p + "mlp.experts.gate"], t[p + "mlp.experts.up"]], -1),
            t[p + "mlp.experts.down"],
            shared,
            c.shared_scale(i),
            c.routed_scale(i),
        )
        x = h + out.view(b, s, -1)
        states.append(x)
    head = t["embed_tokens.weight"] if c.tie_word_embeddings else t["lm_head.weight"]
    return _rms(x, t["norm.weight"], c.rms_norm_eps) @ head.T, torch.stack(states)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_the_neutral_description_reproduces_upstreams_logits(variant, layout):
    ref = reference(variant)
    with torch.no_grad():
        logits, states = reference_forward(read_trhash(fixture(variant, layout)), ref["input_ids"])
    torch.testing.assert_close(states, ref["hidden_states"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- edited and broken folders


def edited(tmp_path: Path, variant: str, layout: str, *, config=None, weights=None, drop_config=False) -> Path:
    """A copy of a fixture folder with its config and/or weights edited."""
    dst = tmp_path / f"{variant}-{layout}"
    shutil.copytree(fixture(variant, layout), dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    if drop_config:
        (dst / "config.json").unlink()
    if config is not None:
        raw = json.loads((dst / "config.json").read_text())
        config(raw)
        (dst / "config.json").write_text(json.dumps(raw))
    if weights is not None:
        sd = load_file(dst / "model.safetensors")
        weights(sd)
        save_file(sd, dst / "model.safetensors")
    return dst


def problems_of(src) -> str:
    with pytest.raises(UpstreamFormatError) as err:
        read_trhash(src)
    return str(err.value)


def test_null_fields_take_the_frameworks_meaning(tmp_path):
    def nulls(raw):
        raw["top_k_primary_weight"] = None
        raw["num_key_value_heads"] = None
        raw["shared_intermediate_size"] = None

    ckpt = read_trhash(edited(tmp_path, "bal-top2-e8-noshared", NATIVE, config=nulls))
    assert ckpt.config.route_primary_weight == 0.5  # 1/k, not vllm-i64's 0.95
    assert ckpt.config.num_key_value_heads == 1  # max(1, 4 // 4)
    assert ckpt.config.shared_expert_width is None  # no shared expert: the null is irrelevant
    assert any("null -> 0.5" in n for n in ckpt.notes)
    mh2 = read_trhash(
        edited(tmp_path, "mh2-top2-shared", DEEP, config=lambda raw: raw.update(shared_intermediate_size=None))
    )
    assert mh2.config.shared_expert_width == 64  # = intermediate_size (vllm-i64: 64 / 4)


def test_a_null_that_resolves_against_the_tensors_names_the_field(tmp_path):
    msg = problems_of(
        edited(tmp_path, "mh2-top2-shared", NATIVE, config=lambda raw: raw.update(num_key_value_heads=None))
    )
    assert "layers.0.self_attn.k_proj.weight has shape [32, 64]; the config gives [16, 64] (num_key_value_heads" in msg


def test_deep_nulls_without_source_mlp_type_are_ambiguous(tmp_path):
    def strip(raw):
        del raw["source_mlp_type"]
        raw["top_k_primary_weight"] = None

    msg = problems_of(edited(tmp_path, "mh2-top2-shared", DEEP, config=strip))
    assert "top_k_primary_weight is null in a deep config without source_mlp_type" in msg and "0.95" in msg
    # explicit values need no convention
    read_trhash(edited(tmp_path / "b", "bal-top2-e8-noshared", DEEP, config=lambda raw: raw.pop("source_mlp_type")))


def test_per_layer_scales_are_read_from_native_configs(tmp_path):
    def ramp(raw):
        raw["routed_output_scale_first_layer"] = 1.0
        raw["routed_output_scale_last_layer"] = 3.0
        raw["shared_output_scale_last_layer"] = 0.5

    c = read_trhash(edited(tmp_path, "mh2-top2-shared", HF, config=ramp)).config
    assert [c.routed_scale(i) for i in range(2)] == [1.0, 3.0]
    assert [c.shared_scale(i) for i in range(2)] == [1.0, 0.5]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("use_mup_attn_scale", 1, "use_mup_attn_scale=1 is not a valid bool"),
        ("rope_fraction", 1.5, "rope_fraction=1.5 is not in (0, 1]"),
        ("rope_fraction", 0.5, "rotary_emb.inv_freq disagrees with rope_theta=10000.0 over the 8 rotated dims"),
        ("attention_type", "lexical_gqa", "attention_type='lexical_gqa' is not supported"),
        ("sliding_window", 16, "sliding_window=16 is not supported"),
        ("active_num_experts", 2, "active_num_experts=2 is not supported"),
        ("routing_strategy", "learned", "routing_strategy='learned' is not a strategy upstream's MLP builds"),
        ("top_k_primary_weight", 1.5, "top_k_primary_weight=1.5 is not in [0, 1]"),
        ("top_k", 5, "top_k=5 exceeds num_experts=4"),
        ("route_hash_count", 9, "route_hash_count=9 is not an integer in [2, 8]"),
        ("hidden_size", "64", "hidden_size='64' is not a positive integer"),
        ("norm_type", "layernorm", "norm_type='layernorm' is not supported"),
        ("mlp_type", "token_routed", "mlp_type='token_routed' is not 'tr_hash_engine'"),
        ("intermediate_size", 62, "intermediate_size=62 (all experts together) is not divisible by num_experts=4"),
        ("brand_new_option", 1, "field(s) this reader does not know, so cannot vouch for: brand_new_option"),
    ],
)
def test_unsupported_or_invalid_settings_are_refused_by_name(tmp_path, field, value, message):
    layout = HF if field != "mlp_type" else NATIVE
    src = edited(
        tmp_path, "mh2-top2-shared", HF if layout == HF else NATIVE, config=lambda raw: raw.update({field: value})
    )
    if field == "mlp_type":
        with pytest.raises(UpstreamFormatError, match="none of the TR-Hash layouts"):
            read_trhash(src)
        return
    assert message in problems_of(src)


def test_hf_num_experts_per_tok_must_agree_with_top_k(tmp_path):
    src = edited(tmp_path, "mh2-top2-shared", HF, config=lambda raw: raw.update(num_experts_per_tok=4))
    assert "num_experts_per_tok=4 differs from top_k=2" in problems_of(src)


def test_broken_folders_say_what_is_missing(tmp_path):
    v = "mh2-top2-shared"
    msg = problems_of(edited(tmp_path / "a", v, NATIVE, weights=lambda sd: sd.pop("layers.1.mlp.engine.route_table")))
    assert "missing tensor layers.1.mlp.engine.route_table (shape [2, 512])" in msg
    msg = problems_of(edited(tmp_path / "b", v, DEEP, weights=lambda sd: sd.pop("layers.0.mlp.up_proj_w")))
    assert "missing tensor layers.0.mlp.up_proj_w (shape [4, 64, 16])" in msg
    msg = problems_of(edited(tmp_path / "c", v, HF, config=lambda raw: raw.update(model_type="llama")))
    assert "model_type 'llama'" in msg and "'tr_hash_moe'" in msg
    garbage = edited(tmp_path / "d", v, NATIVE)
    (garbage / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in problems_of(garbage)
    (garbage / "config.json").write_text("[1, 2]")
    assert "config.json: not a JSON object" in problems_of(garbage)
    assert "no config.json" in problems_of(edited(tmp_path / "e", v, NATIVE, drop_config=True))
    no_weights = edited(tmp_path / "f", v, NATIVE)
    (no_weights / "model.safetensors").unlink()
    assert "no weights: none of model.safetensors" in problems_of(no_weights)
    corrupt = edited(tmp_path / "g", v, NATIVE)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "truncated or corrupt safetensors" in problems_of(corrupt)
    neither = edited(tmp_path / "h", v, NATIVE, config=lambda raw: raw.pop("mlp_type"))
    assert "none of the TR-Hash layouts" in problems_of(neither) and "mlp_type None" in problems_of(neither)

    def ours(raw):
        for key in ("routing_strategy", "top_k", "num_experts_per_tok", "mlp_type"):
            raw.pop(key)
        raw.update(model_type="complexity", mlp_type="hash_routed", mu_mode="none")

    with pytest.raises(UpstreamFormatError, match="this project's own format"):
        detect_upstream(edited(tmp_path / "i", v, HF, config=ours))
    # model_type 'complexity' with upstream's fields is upstream's MLX export: its names are asked for
    msg = problems_of(edited(tmp_path / "j", v, HF, config=lambda raw: raw.update(model_type="complexity")))
    assert "missing tensor model.layers.0.mlp.topk_token_to_expert" in msg
    assert "not a folder" in problems_of(tmp_path / "nowhere")


def test_bad_tensors_are_named(tmp_path):
    v = "mh2-top2-shared"

    def duplicate_route(sd):
        sd["layers.0.mlp.engine.route_table"][1, 5] = sd["layers.0.mlp.engine.route_table"][0, 5]

    msg = problems_of(edited(tmp_path / "a", v, NATIVE, weights=duplicate_route))
    assert "layers.0.mlp.engine.route_table: token 5 repeats an expert" in msg

    def stale_codes(sd):
        sd["layers.1.mlp.engine.fused_route_codes"][11] ^= 0x8

    assert "layers.1.mlp.engine.fused_route_codes does not match layers.1's route table" in problems_of(
        edited(tmp_path / "s", v, NATIVE, weights=stale_codes)
    )

    def extra(sd):
        sd["layers.0.mlp.engine.mystery"] = torch.zeros(3)

    assert "unexpected tensor(s) for this config: layers.0.mlp.engine.mystery" in problems_of(
        edited(tmp_path / "b", v, NATIVE, weights=extra)
    )

    def float_table(sd):
        sd["layers.0.mlp.topk_token_to_expert"] = sd["layers.0.mlp.topk_token_to_expert"].float()

    assert "must be an integer tensor" in problems_of(edited(tmp_path / "c", v, DEEP, weights=float_table))

    def theta(raw):
        raw["rope_theta"] = 500000.0

    assert "rotary_emb.inv_freq disagrees with rope_theta=500000.0" in problems_of(
        edited(tmp_path / "d", v, NATIVE, config=theta)
    )

    def narrow_shared(sd):
        sd["layers.1.mlp.shared_gate.weight"] = sd["layers.1.mlp.shared_gate.weight"][:32]

    assert (
        "layers.1.mlp.shared_gate.weight has shape [32, 64]; the config gives [64, 64] (shared_intermediate_size"
        in problems_of(edited(tmp_path / "e", v, DEEP, weights=narrow_shared))
    )


def test_fused_route_metadata_matches_upstreams_buffers():
    for variant, experts in (("mh2-top2-shared", 4), ("bal-top2-e8-noshared", 8)):
        sd = load_file(fixture(variant, NATIVE) / "model.safetensors")
        pairs, codes = fused_route_metadata(sd["layers.1.mlp.engine.route_table"], experts)
        assert torch.equal(pairs, sd["layers.1.mlp.engine.fused_expert_pairs"])
        assert torch.equal(codes, sd["layers.1.mlp.engine.fused_route_codes"])
    empty = fused_route_metadata(_table("balanced_hash", 20, 16, 2), 16)
    assert empty[0].shape == (0, 2) and empty[1].shape == (0,)


# ----------------------------------------------------------------------------- writing the deep export


@pytest.mark.parametrize("variant", VARIANTS)
def test_deep_export_equals_upstreams_own_and_reads_back_identically(tmp_path, variant):
    native = read_trhash(fixture(variant, NATIVE))
    out = write_deep(native.config, native.tensors, tmp_path / "deep", dtype="float32")
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (fixture(variant, DEEP) / "config.json").read_text()
    )
    ours, theirs = load_file(out / "model.safetensors"), load_file(fixture(variant, DEEP) / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    generation = json.loads((out / "generation_config.json").read_text())
    assert "top_k" not in generation and "do_sample" not in generation
    back = read_trhash(out)
    assert back.layout == DEEP and back.config == native.config
    assert all(torch.equal(back.tensors[k], native.tensors[k]) for k in native.tensors)


def test_bf16_deep_export_reads_back_as_the_bf16_cast(tmp_path):
    native = read_trhash(fixture("mh2-top2-shared", NATIVE))
    back = read_trhash(write_deep(native.config, native.tensors, tmp_path / "deep"))  # bf16: upstream's default
    assert json.loads((tmp_path / "deep" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert back.config == native.config
    for name, tensor in native.tensors.items():
        want = tensor if name.endswith("route_table") else tensor.to(torch.bfloat16)
        assert torch.equal(back.tensors[name], want), name


def test_deep_export_writes_explicit_numbers_for_upstream_nulls(tmp_path):
    src = edited(
        tmp_path,
        "mh2-top2-shared",
        NATIVE,
        config=lambda raw: raw.update(top_k_primary_weight=None, shared_intermediate_size=None),
    )
    ckpt = read_trhash(src)
    cfg = deep_config(ckpt.config, torch.float32)
    assert cfg["top_k_primary_weight"] == 0.5 and cfg["shared_intermediate_size"] == 64


def test_deep_export_refuses_what_it_cannot_record_and_leaves_nothing(tmp_path):
    def ramp(raw):
        raw["routed_output_scale_first_layer"] = 1.0
        raw["routed_output_scale_last_layer"] = 3.0

    ckpt = read_trhash(edited(tmp_path, "mh2-top2-shared", NATIVE, config=ramp))
    with pytest.raises(ValueError, match="^routed_output_scale_first_layer/_last_layer: the scale varies over layers"):
        write_deep(ckpt.config, ckpt.tensors, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    flat = read_trhash(
        edited(
            tmp_path / "flat",
            "mh2-top2-shared",
            NATIVE,
            config=lambda raw: raw.update(routed_output_scale_first_layer=2.5),
        )
    )
    assert (
        json.loads((write_deep(flat.config, flat.tensors, tmp_path / "flat-out") / "config.json").read_text())[
            "routed_output_scale"
        ]
        == 2.5
    )
    native = read_trhash(fixture("mh2-top2-shared", NATIVE))
    with pytest.raises(FileExistsError, match="not empty"):
        write_deep(native.config, native.tensors, tmp_path / "flat-out")
    write_deep(native.config, native.tensors, tmp_path / "flat-out", overwrite=True)
    missing = dict(native.tensors)
    missing.pop("layers.0.mlp.experts.up")
    with pytest.raises(ValueError, match="missing tensor layers.0.mlp.experts.up"):
        write_deep(native.config, missing, tmp_path / "never")
    with pytest.raises(ValueError, match="^dtype:"):
        write_deep(native.config, native.tensors, tmp_path / "never", dtype="int8")
    assert not (tmp_path / "never").exists()


def test_a_top1_variant_with_empty_kernel_metadata_reads(tmp_path):
    """Upstream saves the fused top-2 buffers empty unless k = 2 and 2 <= E <= 8."""

    def top1(raw):
        raw["top_k"] = 1

    def slot0(sd):
        for i in range(2):
            sd[f"layers.{i}.mlp.engine.route_table"] = sd[f"layers.{i}.mlp.engine.route_table"][:1].clone()
            sd[f"layers.{i}.mlp.engine.fused_route_codes"] = torch.zeros(0, dtype=torch.uint8)
            sd[f"layers.{i}.mlp.engine.fused_expert_pairs"] = torch.zeros(0, 2, dtype=torch.int32)

    ckpt = read_trhash(edited(tmp_path, "mh2-top2-shared", NATIVE, config=top1, weights=slot0))
    assert ckpt.config.num_experts_per_tok == 1 and ckpt.config.slot_weights == (1.0,)
    assert ckpt.tensors["layers.0.mlp.route_table"].shape == (1, 512)


# ----------------------------------------------------------------------------- conversion to our model and back


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(variant, layout) -> our folder converted from that fixture folder, built once."""
    from complexity.integrations.upstream import convert_upstream

    root, cache = tmp_path_factory.mktemp("converted"), {}

    def get(variant, layout):
        if (variant, layout) not in cache:
            dst = root / f"{variant}-{layout}"
            cache[variant, layout] = (convert_upstream(fixture(variant, layout), dst), dst)
        return cache[variant, layout]

    return get


def _load_ours(folder):
    from complexity.checkpoint_folder import load_checkpoint_folder

    model, tokenizer = load_checkpoint_folder(folder, dtype=torch.float32, tokenizer=False)
    return model


def _all_states(model, ids):
    """(logits, [embedding, each block's output], last hidden state after the final norm)."""
    blocks = []
    hooks = [layer.register_forward_hook(lambda m, a, out: blocks.append(out[0])) for layer in model.model.layers]
    try:
        with torch.no_grad():
            out = model(ids, use_cache=False, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out.logits, torch.stack([out.hidden_states[0], *blocks]), out.hidden_states[-1]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_converted_model_reproduces_upstreams_references(converted, variant, layout):
    """fp32 logits and hidden states within 1e-4, routes and greedy tokens identical, the padded
    batch identical to the unpadded greedy: for every layout of both published fixtures."""
    report, dst = converted(variant, layout)
    assert report.design == f"tr-hash-{layout}" and str(report).startswith(f"detected: TR-Hash MoE, {layout} layout")
    ref = reference(variant)
    model = _load_ours(dst)
    assert model.config.mlp_type == "hash_routed" and model.config.mu_mode == "none"
    logits, states, last = _all_states(model, ref["input_ids"])
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(states, ref["hidden_states"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, ref["last_hidden_state"], atol=1e-4, rtol=1e-4)
    for i, layer in enumerate(model.model.layers):
        assert torch.equal(token_routes(layer.mlp.route_table, ref["input_ids"]).permute(2, 0, 1), ref["routes"][i])
    n = ref["greedy_tokens"].shape[1]
    with torch.no_grad():
        greedy = model.generate(ref["greedy_prompt_ids"], max_new_tokens=n, do_sample=False, eos_token_id=None)
        padded = model.generate(
            ref["padded_prompt_ids"],
            attention_mask=ref["padded_attention_mask"],
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
        )
    assert torch.equal(greedy[:, -n:], ref["greedy_tokens"])
    assert torch.equal(padded[:, -n:], ref["padded_greedy_tokens"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_model_keeps_the_architectural_top_k_out_of_generation(converted, variant):
    _, dst = converted(variant, HF)  # the hf bundle's config.json holds top_k: 2
    generation = json.loads((dst / "generation_config.json").read_text())
    assert "top_k" not in generation and "do_sample" not in generation
    config = json.loads((dst / "config.json").read_text())
    assert "top_k" not in config and config["num_experts_per_tok"] == 2
    assert _load_ours(dst).generation_config.top_k in (None, 50)  # transformers' default, not the k of the routing


def test_engine_decodes_a_converted_model_like_upstream(converted):
    from complexity.inference import Engine, SamplingParams

    ref = reference("mh2-top2-shared")
    model = _load_ours(converted("mh2-top2-shared", DEEP)[1])
    n = ref["greedy_tokens"].shape[1]
    prompts = ref["greedy_prompt_ids"].tolist() + [row[row != 1].tolist() for row in ref["padded_prompt_ids"][1:]]
    outs = Engine(model, max_batch=4, max_seq_len=64).generate(
        prompts, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    )
    assert [o.token_ids for o in outs] == ref["greedy_tokens"].tolist() + ref["padded_greedy_tokens"][1:].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_convert_save_load_export_deep_convert(converted, tmp_path, variant):
    """convert -> our folder -> load -> export deep -> convert again: the same logits, bit for bit
    (fp32 throughout), and the deep export reads back as the fixture's own neutral description."""
    from complexity.integrations.upstream import convert_upstream, export_deep

    _, ours = converted(variant, NATIVE)
    deep = export_deep(ours, tmp_path / "deep", dtype="float32")
    again = tmp_path / "again"
    convert_upstream(deep, again)
    ref = reference(variant)
    with torch.no_grad():
        first = _load_ours(ours)(ref["input_ids"]).logits
        second = _load_ours(again)(ref["input_ids"]).logits
    assert torch.equal(first, second)
    back, original = read_trhash(deep), read_trhash(fixture(variant, DEEP))
    assert back.config == original.config
    assert all(torch.equal(back.tensors[k], original.tensors[k]) for k in original.tensors)


def test_our_own_hash_routed_model_exports_to_deep_and_comes_back(tmp_path):
    """A hash_routed model trained here (tables rebuilt from its config, then a custom one
    installed) goes to upstream's deep layout and back unchanged; what the deep layout cannot
    say is refused by name and leaves nothing behind."""
    from complexity import ComplexityConfig, ComplexityForCausalLM
    from complexity.integrations.upstream import convert_upstream, export_deep

    config = ComplexityConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_type="hash_routed",
        num_experts_per_tok=2,
        route_strategy="hierarchical_hash",
        route_primary_weight=0.6,
        shared_expert=True,
        shared_expert_intermediate_size=48,
        routed_output_scale=1.5,
    )
    torch.manual_seed(0)
    model = ComplexityForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        model.model.layers[1].mlp.route_table.copy_(model.model.layers[1].mlp.route_table.flip(0))
    model.save_pretrained(tmp_path / "ours")
    deep = export_deep(tmp_path / "ours", tmp_path / "deep", dtype="float32")
    raw = json.loads((deep / "config.json").read_text())
    assert raw["routing_strategy"] == "token_id_hierarchical_hash" and raw["top_k_primary_weight"] == 0.6
    report = convert_upstream(deep, tmp_path / "back")
    assert any("differ from a rebuild" in n for n in report.notes)  # the custom table: kept, not rebuilt
    back = _load_ours(tmp_path / "back")
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert torch.equal(back.model.layers[1].mlp.route_table, model.model.layers[1].mlp.route_table)

    for name, overrides in (
        ("mu_mode", dict(mu_mode="guidance")),
        ("qk_norm_eps", dict(qk_norm_eps=1e-5)),
        (
            "routed_output_scale_first_layer",
            dict(routed_output_scale_first_layer=1.0, routed_output_scale_last_layer=3.0),
        ),
    ):
        folder = tmp_path / f"refused-{name}"
        ComplexityForCausalLM(ComplexityConfig(**{**config.to_diff_dict(), **overrides})).save_pretrained(folder)
        with pytest.raises(ValueError, match=rf"^{folder / 'config.json'}: {name}"):
            export_deep(folder, tmp_path / f"never-{name}")
        assert not (tmp_path / f"never-{name}").exists()


def _save_token_routed(folder: Path) -> Path:
    """A tiny token-routed model saved in `folder`: a model the deep layout cannot describe."""
    from complexity import ComplexityConfig, ComplexityForCausalLM

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ComplexityForCausalLM(ComplexityConfig(**sizes, num_key_value_heads=1)).save_pretrained(folder)
    return folder


def test_deep_export_refuses_before_reading_weights_and_says_why(tmp_path, monkeypatch):
    """A token-routed model (ours, or upstream's complexity-deep, converted or not) has no deep
    form, and a non-empty DST is refused: both said before any weight is read."""
    from complexity import checkpoint_folder
    from complexity.integrations.upstream import export_deep

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    ours = _save_token_routed(tmp_path / "ours")
    monkeypatch.setattr(checkpoint_folder, "load_checkpoint_folder", no_weights)
    with pytest.raises(ValueError, match=rf"^{ours / 'config.json'}: mlp_type: is 'token_routed'"):
        export_deep(ours, tmp_path / "never")
    for name in ("complexity-deep-v1.0-mu", "complexity-deep-v0.13-inl"):
        src = FIXTURES.parent / "upstream" / name
        with pytest.raises(ValueError) as err:
            export_deep(src, tmp_path / "never")
        assert str(err.value) == (
            f"{src}: an upstream complexity-deep checkpoint (token-routed); only TR-Hash (hash_routed) models "
            "have a deep export"
        )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("kept")
    with pytest.raises(FileExistsError, match="exists and is not empty .overwrite=True / --overwrite replaces it"):
        export_deep(ours, tmp_path / "full")
    assert not (tmp_path / "never").exists() and (tmp_path / "full" / "x").read_text() == "kept"


def test_cli_converts_each_layout_and_exports_deep(tmp_path, capsys):
    from complexity.cli import main

    assert main(["convert", str(fixture("bal-top2-e8-noshared", HF)), str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "detected: TR-Hash MoE, hf layout" in out and "config.json has model_type 'tr_hash_moe'" in out
    assert "hash routing top-2 (balanced_hash, slot weights 0.7, 0.3)" in out
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "deep"), "--to", "deep", "--dtype", "float32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert detect_upstream(tmp_path / "deep").design == "tr-hash-deep"
    # upstream's native/hf layouts straight to deep, as upstream's own exporter does
    assert (
        main(
            [
                "convert",
                str(fixture("bal-top2-e8-noshared", NATIVE)),
                str(tmp_path / "x"),
                "--to",
                "deep",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    ours, theirs = (
        load_file(tmp_path / "x" / "model.safetensors"),
        load_file(fixture("bal-top2-e8-noshared", DEEP) / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "y"), "--to", "deep", "--dry-run"]) == 2
    assert "--to deep" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    routed = _save_token_routed(tmp_path / "routed")
    assert main(["convert", str(routed), str(tmp_path / "z"), "--to", "deep"]) == 2
    assert "mlp_type: is 'token_routed'; only hash_routed models" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


# ----------------------------------------------------------------------------- the model's own contract


@pytest.mark.parametrize("name", ["hash-top2-shared", "hash-top2-mu"])
def test_multi_token_chunks_on_a_cache_equal_the_full_pass(name):
    """Upstream attends a chunk of several new tokens on a cache without a causal mask; ours is
    the full pass, chunk after chunk, and left padding changes nothing either."""
    from conftest import VARIANTS as MODEL_VARIANTS
    from conftest import tiny_model

    model = tiny_model(**MODEL_VARIANTS[name])
    ids = torch.randint(4, 256, (2, 15), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :5], use_cache=True)
        chunk = model(ids[:, 5:11], past_key_values=first.past_key_values, use_cache=True)
        last = model(ids[:, 11:], past_key_values=chunk.past_key_values, use_cache=True)
        torch.testing.assert_close(torch.cat([first.logits, chunk.logits, last.logits], 1), full, atol=1e-5, rtol=0)
        padded = torch.cat([torch.full((2, 3), 1), ids], 1)
        mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], 1)
        out = model(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        torch.testing.assert_close(out[:, 3:], full, atol=1e-5, rtol=0)


def test_hash_routed_model_routes_by_each_layers_table():
    """The model's MLP is `hash_routed_mlp` over its own layer's table: a float64 token loop over
    the layer's weights gives its output, and another layer's table would not."""
    from conftest import VARIANTS as MODEL_VARIANTS
    from conftest import tiny_model

    from complexity.modeling_complexity import Routing

    model = tiny_model(**MODEL_VARIANTS["hash-top2-shared"])
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(9))
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(10))
    for layer in (0, 2):
        mlp = model.model.layers[layer].mlp
        with torch.no_grad():
            out, aux = mlp(x, Routing(ids))
        shared = (
            mlp.shared_expert.gate_proj.weight,
            mlp.shared_expert.up_proj.weight,
            mlp.shared_expert.down_proj.weight,
        )
        routes = token_routes(mlp.route_table, ids.reshape(-1))
        want = loop_reference(
            x.reshape(-1, 64), routes, (0.7, 0.3), mlp.experts.gate_up_proj, mlp.experts.down_proj, shared, 1.0, 2.0
        )
        assert aux is None and rel(out.reshape(-1, 64), want) < 1e-5
        assert not torch.equal(mlp.route_table, model.model.layers[1].mlp.route_table)


# ----------------------------------------------------------------------------- the variant grid (written from the format's description)
#
# Every variant upstream's format allows, written by tests/trhash_synthetic.py in upstream's layouts
# and computed by its independent float64 forward. Tolerance: fp32 logits of the converted model
# within 1e-4 (absolute and relative) of the float64 reference over the same stored values.

GRID_TOL = dict(atol=1e-4, rtol=1e-4)
# id -> (native config overrides, the layout the whole pipeline runs on, the deep/MLX dtype)
GRID = {
    "multi-e4-k2-pnull-shared": (dict(top_k_primary_weight=None, shared_intermediate_size=48), NATIVE, "float32"),
    "multi-e8-k4-c5-untied": (
        dict(
            num_experts=8,
            top_k=4,
            route_hash_count=5,
            top_k_primary_weight=0.4,
            shared_expert=False,
            tie_word_embeddings=False,
        ),
        HF,
        "bfloat16",
    ),
    "multi-e16-k1-c8-p-explicit": (
        dict(num_experts=16, top_k=1, route_hash_count=8, top_k_primary_weight=0.3),
        DEEP,
        "bfloat16",
    ),
    "multi-e2-k2-c3-v97-noshared": (
        dict(num_experts=2, route_hash_count=3, vocab_size=97, shared_expert=False),
        DEEP,
        "float16",
    ),
    "balanced-e8-k2-p07-noshared": (
        dict(routing_strategy="token_id_balanced_hash", num_experts=8, top_k_primary_weight=0.7, shared_expert=False),
        HF,
        "float32",
    ),
    "balanced-e16-k4-nulls": (
        dict(
            routing_strategy="token_id_balanced_hash",
            num_experts=16,
            top_k=4,
            intermediate_size=None,
            shared_intermediate_size=None,
            num_key_value_heads=None,
        ),
        NATIVE,
        "bfloat16",
    ),
    "balanced-e2-k1": (dict(routing_strategy="token_id_balanced_hash", num_experts=2, top_k=1), DEEP, "float32"),
    "balanced-e1-k1": (dict(routing_strategy="token_id_balanced_hash", num_experts=1, top_k=1), NATIVE, "float32"),
    "modulo-alias-e4-k4": (dict(routing_strategy="modulo", top_k=4), DEEP, "float32"),
    "modulo_cyclic-e8-k2-kvnull": (
        dict(routing_strategy="modulo_cyclic", num_experts=8, num_attention_heads=8, num_key_value_heads=None),
        HF,
        "float32",
    ),
    "hierarchical-e4-k2": (dict(routing_strategy="token_id_hierarchical_hash"), NATIVE, "float32"),
    "hierarchical-e8-k4": (
        dict(routing_strategy="token_id_hierarchical_hash", num_experts=8, top_k=4),
        DEEP,
        "bfloat16",
    ),
    "hierarchical-e16-k2-untied": (
        dict(routing_strategy="token_id_hierarchical_hash", num_experts=16, tie_word_embeddings=False),
        HF,
        "float32",
    ),
    "ramp-routed-first-last": (
        dict(routed_output_scale_first_layer=0.5, routed_output_scale_last_layer=2.0),
        NATIVE,
        "float32",
    ),
    "ramp-shared-last-only": (dict(shared_output_scale_last_layer=0.25, routed_output_scale=1.5), HF, "float32"),
    "ramp-routed-first-only": (dict(routed_output_scale_first_layer=1.5), NATIVE, "float32"),
    "no-qk-norm-theta": (dict(use_qk_norm=False, rope_theta=500.0, norm_eps=1e-5), NATIVE, "float32"),
    # the QK-norm keeps its fixed 1e-6 whatever norm_eps is (large here, so a wrong one shows);
    # max_position_embeddings only sizes upstream's RoPE cache: the sequences here are longer
    "qk-eps-fixed-maxpos-8": (dict(norm_eps=0.1, max_position_embeddings=8), HF, "float32"),
    "mha-kvnull": (dict(attention_type="mha", num_key_value_heads=None), DEEP, "float32"),
    "mqa-kvnull-e8-k2": (
        dict(attention_type="mqa", num_key_value_heads=None, num_experts=8, routing_strategy="modulo_cyclic"),
        NATIVE,
        "float32",
    ),
}
# A convention each conversion report must state (beyond the layout, which every one names).
GRID_NOTES = {
    "multi-e4-k2-pnull-shared": "top_k_primary_weight: null -> 0.5 (1/top_k, the framework's meaning",
    "multi-e16-k1-c8-p-explicit": "top_k_primary_weight: 0.3 has no effect with top_k 1",
    "multi-e2-k2-c3-v97-noshared": "route_hash_count: not recorded by the deep layout; 3 rebuilds every stored table",
    "balanced-e16-k4-nulls": "intermediate_size: null -> 256 (round_up(8H/3, 256))",
    "modulo-alias-e4-k4": "routing_strategy: 'modulo' is upstream's alias of modulo_cyclic",
    "modulo_cyclic-e8-k2-kvnull": "num_key_value_heads: null -> 2 (gqa default)",
    "ramp-routed-first-last": "routed_output_scale_first_layer/_last_layer: per-layer scales 0.5, 1.25, 2",
    "ramp-shared-last-only": "shared_output_scale_first_layer/_last_layer: per-layer scales 1, 0.625, 0.25",
    "qk-eps-fixed-maxpos-8": "max_position_embeddings: 8 becomes the longest sequence our engine and server accept",
    "mha-kvnull": "num_key_value_heads: null -> 4 (mha default)",
    "no-qk-norm-theta": "special tokens: not in config.json; upstream's tokenizer's assumed",
}
# What the deep layout cannot record, and the field its export refuses by name.
DEEP_REFUSES = {"ramp-routed-first-last": "routed_output_scale", "ramp-shared-last-only": "shared_output_scale"}


def grid_variant(name: str, seed: int = 0) -> tuple[dict, dict]:
    overrides, _, _ = GRID[name]
    raw = syn.native_config(**overrides)
    return raw, syn.make_weights(raw, seed=sum(map(ord, name)) + seed)


def stored(sd: dict, dtype: str) -> dict:
    """The tensors as a layout stored at `dtype` holds them (floats rounded)."""
    return {k: v.to(syn.DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}


def write_layout(root: Path, layout: str, raw: dict, sd: dict, dtype: str) -> tuple[Path, dict, dict]:
    """(folder, the native-style config it describes, the tensors it holds) for one layout."""
    dst = root / layout
    root.mkdir(parents=True, exist_ok=True)
    if layout == NATIVE:
        return syn.write_native(dst, raw, sd), raw, sd
    if layout == HF:
        return syn.write_hf(dst, raw, sd), raw, sd
    if layout == DEEP:
        return syn.write_deep(dst, raw, sd, dtype), syn.deep_view(raw), stored(sd, dtype)
    mlx_config = {**raw, "model_type": "complexity"}
    return syn.write_mlx(dst, mlx_config, sd, dtype), raw, stored(sd, dtype)


def grid_ids(raw: dict, batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, raw["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", [NATIVE, HF, DEEP, "mlx"])
@pytest.mark.parametrize("name", list(GRID))
def test_grid_every_layout_is_detected_and_computes_the_reference(tmp_path, name, layout):
    """Each variant in each of upstream's four layouts: the detection names the layout, and the
    model it loads as computes the float64 reference of what that layout records."""
    from complexity.integrations.upstream import load_upstream

    raw, sd = grid_variant(name)
    dtype = GRID[name][2]
    src, described, held = write_layout(tmp_path, layout, raw, sd, dtype)
    model, ckpt, _ = load_upstream(src, dtype=torch.float32)
    assert ckpt.design == f"tr-hash-{layout}" and ckpt.notes[0].startswith(f"TR-Hash MoE, {layout} layout")
    ids = grid_ids(raw)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits.double(), syn.reference_logits(described, held, ids), **GRID_TOL)


@pytest.mark.parametrize("name", list(GRID))
def test_grid_convert_generate_engine_and_round_trip(tmp_path, name):
    """The whole pipeline on one layout per variant: `complexity convert` output loaded back gives
    the reference logits; greedy tokens are identical between generate(), the engine and the
    reference's argmax loop; convert -> save -> load -> export deep -> convert gives the same
    logits bit for bit, or (what deep cannot record) the export refuses naming the field and
    leaves nothing."""
    from complexity.inference import Engine, SamplingParams
    from complexity.integrations.upstream import convert_upstream, export_deep

    raw, sd = grid_variant(name)
    _, layout, dtype = GRID[name]
    src, described, held = write_layout(tmp_path / "src", layout, raw, sd, dtype)
    report = convert_upstream(src, tmp_path / "ours")
    assert str(report).startswith(f"detected: TR-Hash MoE, {layout} layout")
    assert GRID_NOTES.get(name, "") in str(report)
    model = _load_ours(tmp_path / "ours")
    ids = grid_ids(raw)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits.double(), syn.reference_logits(described, held, ids), **GRID_TOL)

    prompts, n = ids[:, :4], 5
    want = syn.reference_greedy(described, held, prompts, n)
    with torch.no_grad():
        got = model.generate(prompts, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert torch.equal(got[:, -n:], want)
    # our engine serves at most max_position_embeddings positions (upstream's only sizes a RoPE cache)
    cap = min(32, model.config.max_position_embeddings)
    outs = Engine(model, max_batch=2, max_seq_len=cap).generate(
        prompts.tolist(), SamplingParams(max_new_tokens=min(n, cap - 4), temperature=0.0, ignore_eos=True)
    )
    assert [o.token_ids for o in outs] == want[:, : cap - 4].tolist()

    if name in DEEP_REFUSES:
        with pytest.raises(ValueError, match=rf"^{tmp_path / 'ours' / 'config.json'}: {DEEP_REFUSES[name]}"):
            export_deep(tmp_path / "ours", tmp_path / "deep", dtype="float32")
        assert not (tmp_path / "deep").exists() and not list(tmp_path.glob(".deep*"))
        return
    deep = export_deep(tmp_path / "ours", tmp_path / "deep", dtype="float32")
    assert detect_upstream(deep).design == "tr-hash-deep"
    convert_upstream(deep, tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(_load_ours(tmp_path / "again")(ids).logits, logits)


# Upstream settings computed by our attention knobs: upstream fields -> our field.
KNOBS = {
    "rope-fraction": (dict(rope_fraction=0.5), "partial_rotary_factor", "rope_fraction"),
    "mup-attn-scale": (dict(use_mup_attn_scale=True), "attention_multiplier", "use_mup_attn_scale"),
    "mup-output-mult": (dict(use_mup_output_mult=True, mup_base_width=16), "logits_scaling", "use_mup_output_mult"),
}


@pytest.mark.parametrize("knob", list(KNOBS))
def test_grid_rope_fraction_and_mup_map_to_our_knobs(tmp_path, knob):
    """The converted model computes the float64 reference (partial RoPE, 1/head_dim softmax
    scale, logits / (H / base)), the field holds the mapped value, and the deep export (which
    upstream writes without these fields) refuses it naming the field."""
    from complexity.integrations.upstream import convert_upstream, export_deep

    overrides, ours, upstream = KNOBS[knob]
    raw = syn.native_config(**overrides, num_hidden_layers=2)
    sd = syn.make_weights(raw, seed=7)
    src = syn.write_native(tmp_path / "src", raw, sd)
    ckpt = read_trhash(src)
    expected = {"rope-fraction": 0.5, "mup-attn-scale": 1 / 8, "mup-output-mult": 32 / 16}[knob]
    neutral = {"partial_rotary_factor": "rope_fraction"}.get(ours, ours)
    assert getattr(ckpt.config, neutral) == expected
    assert any(n.startswith(f"{upstream}: ") for n in ckpt.notes)
    convert_upstream(src, tmp_path / "ours")
    model = _load_ours(tmp_path / "ours")
    assert getattr(model.config, ours) == expected
    ids = grid_ids(raw)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits.double(), syn.reference_logits(raw, sd, ids), **GRID_TOL)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'ours' / 'config.json'}: {ours}: .*upstream's {upstream}"):
        export_deep(tmp_path / "ours", tmp_path / "deep")
    assert not (tmp_path / "deep").exists()


def test_grid_sliding_window_and_the_expert_shrink_stay_refused_by_name(tmp_path):
    for field, value in (("sliding_window", 4), ("active_num_experts", 2), ("active_expert_width", 8)):
        raw = syn.native_config(**{field: value})
        src = syn.write_native(tmp_path / field, raw, syn.make_weights(raw))
        assert f"config.json: {field}={value} is not supported" in problems_of(src)


@pytest.mark.parametrize("layout", [DEEP, "mlx"])
@pytest.mark.parametrize("strategy", ["modulo_cyclic", "token_id_multi_hash"])
def test_grid_primary_only_tables_get_cyclic_secondaries(tmp_path, layout, strategy):
    """The older lineage stores only mlp.token_to_expert (the primary slot): secondary j is
    (primary + j) mod E, and a note says so. For modulo_cyclic that is the table itself."""
    from complexity.integrations.upstream import load_upstream

    raw = syn.native_config(routing_strategy=strategy, num_experts=4, top_k=3)
    sd = syn.make_weights(raw, seed=3)
    if layout == DEEP:
        src = syn.write_deep(tmp_path / "src", raw, sd, "float32", primary_only=True)
    else:
        src = syn.write_mlx(tmp_path / "src", {**raw, "model_type": "complexity"}, sd, "float32", primary_only=True)
    cyclic = dict(sd)
    for i in range(raw["num_hidden_layers"]):
        primary = sd[f"layers.{i}.mlp.engine.route_table"][0]
        cyclic[f"layers.{i}.mlp.engine.route_table"] = (primary + torch.arange(3)[:, None]) % 4
    if strategy == "modulo_cyclic":
        assert all(torch.equal(cyclic[k], sd[k]) for k in sd)
    model, ckpt, _ = load_upstream(src)
    assert any("only mlp.token_to_expert (the primary slot)" in n and "(primary + j) mod" in n for n in ckpt.notes)
    ids = grid_ids(raw)
    with torch.no_grad():
        logits = model(ids).logits
    described = syn.deep_view(raw) if layout == DEEP else raw
    torch.testing.assert_close(logits.double(), syn.reference_logits(described, cyclic, ids), **GRID_TOL)

    name = ("model." if layout == "mlx" else "") + "layers.1.mlp.token_to_expert"
    tensors = load_file(src / "model.safetensors")
    tensors[name][5] = 4
    save_file(tensors, src / "model.safetensors")
    assert f"{name}: token 5 is routed to expert(s) [4], outside [0, 4) (num_experts)" in problems_of(src)


def test_grid_mlx_export_is_read_only_when_its_config_says_enough(tmp_path, capsys):
    """The MLX layout's config is little documented: every field that changes the computation must
    be stated (each missing one is named); the row-0 copy must agree; fp16 and int32 are read."""
    raw = syn.native_config()
    sd = syn.make_weights(raw, seed=5)
    reduced = {**syn.deep_fields(raw, "float16"), "model_type": "complexity"}
    reduced.pop("architectures")
    msg = problems_of(syn.write_mlx(tmp_path / "reduced", reduced, sd))
    for field in ("rope_fraction", "routed_output_scale_first_layer", "use_mup_attn_scale", "sliding_window"):
        assert f"config.json: missing field {field}: the MLX layout's config must state it" in msg
    assert "missing field top_k:" not in msg

    full = syn.write_mlx(tmp_path / "full", {**raw, "model_type": "complexity"}, sd)
    from complexity.cli import main

    assert main(["convert", str(full), str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "detected: TR-Hash MoE, mlx layout" in out and "route tables: stored as int32, read as int64" in out
    assert main(["convert", str(full), str(tmp_path / "deep"), "--to", "deep"]) == 0  # upstream MLX -> deep
    assert read_trhash(tmp_path / "deep").config == read_trhash(full).config
    ckpt = read_trhash(full)
    assert ckpt.layout == "mlx" and "mlp_type 'tr_hash_engine'" in ckpt.notes[0]
    assert "route tables: stored as int32, read as int64" in ckpt.notes
    assert any("row 0 (the primary slot)" in why for _, why in ckpt.dropped)

    def stale_row0(sd):
        sd["model.layers.1.mlp.token_to_expert"] = (sd["model.layers.1.mlp.token_to_expert"] + 1) % 4

    bad = tmp_path / "stale"
    shutil.copytree(full, bad)
    tensors = load_file(bad / "model.safetensors")
    stale_row0(tensors)
    save_file(tensors, bad / "model.safetensors")
    assert "model.layers.1.mlp.token_to_expert is not row 0 (the primary slot)" in problems_of(bad)


def test_grid_mlx_export_is_named_by_our_own_loader(tmp_path):
    """Upstream's MLX export says model_type 'complexity', as our folders do: our loader names it
    and says how to convert it, whether its config or only its tensor names give it away."""
    from complexity.checkpoint_folder import CheckpointError, load_checkpoint_folder

    raw = syn.native_config()
    sd = syn.make_weights(raw)
    with_fields = syn.write_mlx(tmp_path / "a", {**raw, "model_type": "complexity"}, sd)
    bare = {k: v for k, v in raw.items() if k not in ("routing_strategy", "top_k", "mlp_type")}
    names_only = syn.write_mlx(tmp_path / "b", {**bare, "model_type": "complexity"}, sd)
    for folder in (with_fields, names_only):
        with pytest.raises(CheckpointError, match="upstream's TR-Hash MLX export") as err:
            load_checkpoint_folder(folder)
        assert f"complexity convert {folder} OUT" in str(err.value)
    msg = problems_of(names_only)  # told by its table names, then refused for what its config does not say
    assert "missing field top_k: the MLX layout's config must state it" in msg
    with pytest.raises(UpstreamFormatError, match="missing field routing_strategy"):
        detect_upstream(names_only)  # the converter's detection, not its complexity-deep path


@pytest.mark.parametrize("layout", [HF, "mlx"])
def test_grid_sharded_weights_are_read_and_named(tmp_path, layout):
    """A sharded bundle (model.safetensors.index.json) reads like a single file, and an MLX export
    whose config carries none of upstream's fields is still told by the index's table names."""
    from complexity.checkpoint_folder import CheckpointError, load_checkpoint_folder
    from complexity.integrations.upstream import load_upstream

    raw, sd = grid_variant("multi-e4-k2-pnull-shared")
    if layout == HF:
        src = syn.shard(syn.write_hf(tmp_path / "src", raw, sd))
    else:
        src = syn.shard(syn.write_mlx(tmp_path / "src", {**raw, "model_type": "complexity"}, sd, "float32"))
    model, ckpt, _ = load_upstream(src)
    assert ckpt.design == f"tr-hash-{layout}"
    ids = grid_ids(raw)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits.double(), syn.reference_logits(raw, sd, ids), **GRID_TOL)
    if layout == "mlx":
        bare = {k: v for k, v in raw.items() if k not in ("routing_strategy", "top_k", "mlp_type")}
        (src / "config.json").write_text(json.dumps({**bare, "model_type": "complexity"}))
        with pytest.raises(CheckpointError, match="upstream's TR-Hash MLX export .*route tables"):
            load_checkpoint_folder(src)


def test_grid_every_route_hash_count_is_read_and_recovered_from_deep_tables(tmp_path):
    """route_hash_count 2..8: the native config states it; the deep export drops it, and the
    reader recovers it from the stored tables (the only count that rebuilds them all)."""
    for count in range(2, 9):
        raw = syn.native_config(num_experts=8, route_hash_count=count, num_hidden_layers=2)
        sd = syn.make_weights(raw, seed=count)
        native = read_trhash(syn.write_native(tmp_path / f"n{count}", raw, sd))
        deep = read_trhash(syn.write_deep(tmp_path / f"d{count}", raw, sd, "float32"))
        assert native.config.route_hash_count == deep.config.route_hash_count == count
        assert f"route_hash_count: not recorded by the deep layout; {count} rebuilds every stored table" in deep.notes
