"""Upstream TR-Hash checkpoint folders written from the format's description alone, and an
independent float64 forward of that description: the variant grid of tests/test_trhash.py.

Nothing here uses the converter under test. A variant is a set of overrides of upstream's native
config (its documented defaults below); `make_weights` draws its tensors under the native names,
with the derived buffers (rotary `inv_freq`, the fused top-2 metadata) computed here, and the
route tables from `complexity.hash_routing`'s builders (proven bit-exact against upstream's
published fixtures; the tables are copied by the converter, never rebuilt). The writers lay the
same model out as upstream's four exporters do (native, hf bundle, deep, MLX), and
`reference_logits` / `reference_greedy` compute the model in float64 with plain torch.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from complexity.hash_routing import build_route_table

# Upstream's native config defaults for the fields that change the computation, plus one field of
# each inert family a native config.json carries (the full dict has about 99 keys).
NATIVE_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": None,
    "vocab_size": 32000,
    "intermediate_size": None,
    "attention_type": "gqa",
    "attention_dropout": 0.0,
    "use_qk_norm": True,
    "sliding_window": None,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rope_type": "standard",
    "rope_fraction": 1.0,
    "mlp_type": "tr_hash_engine",
    "hidden_act": "silu",
    "num_experts": 1,
    "expert_initialization": "gpt_normal",
    "token_frequencies": None,
    "routing_strategy": "modulo_cyclic",
    "route_hash_count": 2,
    "lsh_routing": False,
    "shared_expert": True,
    "shared_intermediate_size": None,
    "shared_expert_chunk_tokens": 0,
    "use_shared_routed_gates": False,
    "shared_gate_init": 1.0,
    "routed_gate_init": 1.0,
    "shared_output_scale": 1.0,
    "routed_output_scale": 1.0,
    "shared_output_scale_first_layer": None,
    "shared_output_scale_last_layer": None,
    "routed_output_scale_first_layer": None,
    "routed_output_scale_last_layer": None,
    "top_k": 1,
    "top_k_primary_weight": None,
    "learn_hash_pair_gates": False,
    "learn_hash_channel_modulation": False,
    "hash_channel_scale_init": 0.0,
    "static_expert_capacity": False,
    "use_custom_kernels": False,
    "collect_moe_telemetry": False,
    "use_cggr": False,
    "active_num_experts": None,
    "active_expert_width": None,
    "causal_conv_kernel_size": 4,
    "tr_mha_num_experts": 4,
    "lexical_object_rank": 16,
    "micro_num_experts": 4,
    "norm_type": "rmsnorm",
    "norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "use_sdpa": True,
    "use_cache": True,
    "is_causal": True,
    "initializer_range": 0.02,
    "use_mup_init": False,
    "use_mup_attn_scale": False,
    "use_mup_output_mult": False,
    "mup_base_width": 256,
    "extra_config": {},
}
# A tiny model: every variant overrides what it is about.
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 101,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "num_experts": 4,
    "top_k": 2,
    "routing_strategy": "token_id_multi_hash",
}
STRATEGY = {  # upstream name -> the builder's
    "modulo": "modulo_cyclic",
    "modulo_cyclic": "modulo_cyclic",
    "token_id_balanced_hash": "balanced_hash",
    "token_id_multi_hash": "multi_hash",
    "token_id_hierarchical_hash": "hierarchical_hash",
}
QK_NORM_EPS = 1e-6
TOKEN_IDS = {"bos_token_id": 2, "eos_token_id": 0, "pad_token_id": 1, "unk_token_id": 3}


def native_config(**overrides) -> dict:
    """The full native config.json dict (no model_type) of a tiny variant."""
    unknown = set(overrides) - set(NATIVE_DEFAULTS)
    assert not unknown, f"not native config fields: {unknown}"
    return {**NATIVE_DEFAULTS, **TINY, **overrides}


# ----------------------------------------------------------------------------- the spec's resolution of nulls


def resolved(raw: dict) -> dict:
    """The numbers upstream's training framework computes with, from a native-style dict (§1)."""
    h, nh = raw["hidden_size"], raw["num_attention_heads"]
    d = h // nh
    e, k = raw["num_experts"], raw["top_k"]
    inter = raw["intermediate_size"] if raw["intermediate_size"] is not None else math.ceil(8 * h / 3 / 256) * 256
    p = raw["top_k_primary_weight"]
    p = 1.0 / k if p is None else min(max(float(p), 0.0), 1.0)
    weights = [1.0] if k == 1 else [p] + [(1 - p) / (k - 1)] * (k - 1)
    L = raw["num_hidden_layers"]

    def ramp(branch):
        base = raw[f"{branch}_output_scale"]
        first, last = raw[f"{branch}_output_scale_first_layer"], raw[f"{branch}_output_scale_last_layer"]
        if first is None and last is None:
            return [float(base)] * L
        first = base if first is None else first
        last = first if last is None else last
        return [first + (last - first) * i / max(L - 1, 1) for i in range(L)]

    return {
        "hidden": h,
        "heads": nh,
        "kv_heads": raw["num_key_value_heads"] or {"mha": nh, "mqa": 1}.get(raw["attention_type"], max(1, nh // 4)),
        "head_dim": d,
        "rope_dim": int(d * raw["rope_fraction"] // 2) * 2,
        "vocab": raw["vocab_size"],
        "layers": L,
        "experts": e,
        "top_k": k,
        "width": inter // e,
        "shared": (raw["shared_intermediate_size"] or inter) if raw["shared_expert"] else None,
        "slot_weights": weights,
        "shared_scales": ramp("shared"),
        "routed_scales": ramp("routed"),
        "theta": raw["rope_theta"],
        "eps": raw["norm_eps"],
        "qk_norm": raw["use_qk_norm"],
        "tied": raw["tie_word_embeddings"],
        "attn_scale": 1.0 / d if raw["use_mup_attn_scale"] else d**-0.5,
        "logit_div": h / raw["mup_base_width"] if raw["use_mup_output_mult"] else 1.0,
    }


# ----------------------------------------------------------------------------- tensors (native names)


def inv_freq(rope_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)


def fused_metadata(table: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused_expert_pairs int32, fused_route_codes uint8) as §2 states them: empty unless k = 2 and
    2 <= E <= 8; the pairs a < b in lexicographic order; code = pair index | swap bit."""
    if table.shape[0] != 2 or not 2 <= num_experts <= 8:
        return torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.uint8)
    pairs = list(itertools.combinations(range(num_experts), 2))
    swap = 0x8 if num_experts <= 4 else 0x20
    codes = []
    for a, b in table.t().tolist():
        codes.append(pairs.index((min(a, b), max(a, b))) | (swap if a > b else 0))
    return torch.tensor(pairs, dtype=torch.int32), torch.tensor(codes, dtype=torch.uint8)


def make_weights(raw: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights of the variant under upstream's native names, its route tables and
    its derived buffers. Scales are large enough that routing and every branch move the logits."""
    r = resolved(raw)
    g = torch.Generator().manual_seed(seed)
    h, d, e, w, v = r["hidden"], r["head_dim"], r["experts"], r["width"], r["vocab"]

    def randn(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {"embed_tokens.weight": randn(v, h), "norm.weight": randn(h, std=0.1, mean=1.0)}
    if not r["tied"]:
        sd["lm_head.weight"] = randn(v, h, std=0.3)
    for i in range(r["layers"]):
        p = f"layers.{i}."
        sd |= {
            p + "input_layernorm.weight": randn(h, std=0.1, mean=1.0),
            p + "post_attention_layernorm.weight": randn(h, std=0.1, mean=1.0),
            p + "self_attn.q_proj.weight": randn(r["heads"] * d, h, std=h**-0.5),
            p + "self_attn.k_proj.weight": randn(r["kv_heads"] * d, h, std=h**-0.5),
            p + "self_attn.v_proj.weight": randn(r["kv_heads"] * d, h, std=h**-0.5),
            p + "self_attn.o_proj.weight": randn(h, r["heads"] * d, std=(r["heads"] * d) ** -0.5),
            p + "self_attn.rotary_emb.inv_freq": inv_freq(r["rope_dim"], r["theta"]),
            p + "mlp.engine.expert_gate": randn(e, h, w, std=h**-0.5),
            p + "mlp.engine.expert_up": randn(e, h, w, std=h**-0.5),
            p + "mlp.engine.expert_down": randn(e, w, h, std=w**-0.5),
        }
        if r["qk_norm"]:
            sd[p + "self_attn.q_norm.weight"] = randn(d, std=0.1, mean=1.0)
            sd[p + "self_attn.k_norm.weight"] = randn(d, std=0.1, mean=1.0)
        if r["shared"]:
            s = r["shared"]
            sd |= {
                p + "mlp.engine.shared_gate.weight": randn(s, h, std=h**-0.5),
                p + "mlp.engine.shared_up.weight": randn(s, h, std=h**-0.5),
                p + "mlp.engine.shared_down.weight": randn(h, s, std=s**-0.5),
            }
        table = build_route_table(
            STRATEGY[raw["routing_strategy"]],
            vocab_size=v,
            num_experts=e,
            num_experts_per_tok=r["top_k"],
            layer_idx=i,
            route_hash_count=raw["route_hash_count"],
        )
        pairs, codes = fused_metadata(table, e)
        sd |= {
            p + "mlp.engine.route_table": table,
            p + "mlp.engine.fused_expert_pairs": pairs,
            p + "mlp.engine.fused_route_codes": codes,
        }
    return sd


# ----------------------------------------------------------------------------- the four exporters

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEEP_DROPPED = (
    "route_hash_count",
    "rope_fraction",
    "sliding_window",
    "use_mup_attn_scale",
    "use_mup_output_mult",
    "mup_base_width",
    "shared_output_scale_first_layer",
    "shared_output_scale_last_layer",
    "routed_output_scale_first_layer",
    "routed_output_scale_last_layer",
)


def _write(dst: Path, config: dict, sd: dict, metadata: dict | None = None) -> Path:
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=metadata is not None) + "\n")
    save_file({k: t.contiguous() for k, t in sd.items()}, str(dst / "model.safetensors"), metadata=metadata)
    return dst


def shard(folder: Path, shards: int = 2) -> Path:
    """Split `folder`'s model.safetensors into `shards` files plus model.safetensors.index.json,
    as save_pretrained does for large models."""
    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    weight_map = {}
    for n in range(shards):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: t for i, (k, t) in enumerate(sorted(sd.items())) if i % shards == n}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    index = {"metadata": {"total_size": sum(t.nbytes for t in sd.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_native(dst: Path, raw: dict, sd: dict) -> Path:
    """`ComplexityModel.save_pretrained`: the full dict, no model_type, no header metadata."""
    return _write(dst, raw, sd)


def write_hf(dst: Path, raw: dict, sd: dict) -> Path:
    """The Hugging Face bundle: the native dict (sorted keys) plus the bundle's fields; the same
    tensors, with {"format": "pt"} in the safetensors header; the adapter modules left out."""
    config = {
        **raw,
        "model_type": "tr_hash_moe",
        "architectures": ["TRHashForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tr_hash_moe.TRHashConfig",
            "AutoModelForCausalLM": "modeling_tr_hash_moe.TRHashForCausalLM",
        },
        "num_experts_per_tok": raw["top_k"],
        "is_decoder": True,
        "is_encoder_decoder": False,
        **TOKEN_IDS,
    }
    return _write(dst, config, sd, metadata={"format": "pt"})


def deep_fields(raw: dict, dtype: str) -> dict:
    """The deep export's ~30-key config.json: nulls passed through, §4's dropped fields gone."""
    keep = (
        "hidden_size num_hidden_layers num_attention_heads num_key_value_heads intermediate_size vocab_size "
        "max_position_embeddings attention_type use_qk_norm rope_theta"
    ).split()
    more = (
        "num_experts shared_expert shared_intermediate_size use_shared_routed_gates shared_gate_init "
        "routed_gate_init shared_output_scale routed_output_scale top_k top_k_primary_weight routing_strategy "
        "learn_hash_channel_modulation hash_channel_scale_init norm_type norm_eps"
    ).split()
    return {
        "architectures": ["DeepForCausalLM"],
        "model_type": "deep",
        **{k: raw[k] for k in keep},
        "mlp_type": "token_routed",
        **{k: raw[k] for k in more},
        "rms_norm_eps": raw["norm_eps"],
        "tie_word_embeddings": raw["tie_word_embeddings"],
        "torch_dtype": dtype,
        "source_mlp_type": "tr_hash_engine",
    }


def deep_view(raw: dict) -> dict:
    """The model a deep folder describes: the native dict with the fields the export drops back at
    their defaults (what every deep reader computes)."""
    return {**raw, **{k: NATIVE_DEFAULTS[k] for k in _DEEP_DROPPED}}


_DEEP_RENAMES = {
    "mlp.engine.expert_gate": "mlp.gate_proj_w",
    "mlp.engine.expert_up": "mlp.up_proj_w",
    "mlp.engine.expert_down": "mlp.down_proj_w",
    "mlp.engine.route_table": "mlp.topk_token_to_expert",
}
_DERIVED = ("self_attn.rotary_emb.inv_freq", "mlp.engine.fused_route_codes", "mlp.engine.fused_expert_pairs")


def _deep_tensors(sd: dict, dtype: str) -> dict:
    out = {}
    for name, t in sd.items():
        if name.endswith(_DERIVED):
            continue
        for old, new in _DEEP_RENAMES.items():
            name = name.replace(old, new)
        name = name.replace("mlp.engine.shared_", "mlp.shared_")
        out[name] = t if not t.is_floating_point() else t.to(DTYPES[dtype])
    return out


def write_deep(dst: Path, raw: dict, sd: dict, dtype: str = "bfloat16", *, primary_only: bool = False) -> Path:
    """Upstream's vLLM export: renamed tensors cast to `dtype`, derived buffers dropped.
    `primary_only`: the older lineage, which stored only the primary slot as `mlp.token_to_expert`."""
    out = _deep_tensors(sd, dtype)
    if primary_only:
        for name in [n for n in out if n.endswith("mlp.topk_token_to_expert")]:
            out[name.replace("topk_token_to_expert", "token_to_expert")] = out.pop(name)[0].contiguous()
    return _write(dst, deep_fields(raw, dtype), out, metadata={"format": "pt"})


def write_mlx(dst: Path, config: dict, sd: dict, dtype: str = "float16", *, primary_only: bool = False) -> Path:
    """The MLX export: `config` (model_type "complexity"), every key prefixed `model.`, the deep
    names for the MLP, the table as int32 `topk_token_to_expert` plus its row 0 as `token_to_expert`."""
    out = {}
    for name, t in _deep_tensors(sd, dtype).items():
        if name.endswith("mlp.topk_token_to_expert"):
            out["model." + name.replace("topk_token_to_expert", "token_to_expert")] = t[0].to(torch.int32)
            if primary_only:
                continue
            t = t.to(torch.int32)
        out["model." + name] = t
    return _write(dst, config, out)


# ----------------------------------------------------------------------------- the float64 reference


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, rope_dim, theta):
    """NeoX rotate-half RoPE on the first `rope_dim` dims of each head; the rest pass through."""
    if rope_dim == 0:
        return x
    freqs = pos[:, None].double() * inv_freq(rope_dim, theta).double()
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    a, b = rot.chunk(2, dim=-1)
    return torch.cat((rot * cos + torch.cat((-b, a), -1) * sin, rest), -1)


def reference_logits(raw: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] in float64 of the model `raw` (native-style dict) and `sd` (native names)."""
    r = resolved(raw)
    t = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    b, s = ids.shape
    d, nh, nkv, eps = r["head_dim"], r["heads"], r["kv_heads"], r["eps"]
    pos = torch.arange(s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    routing_ids = ids.clamp(0, r["vocab"] - 1)
    x = t["embed_tokens.weight"][ids]
    for i in range(r["layers"]):
        p = f"layers.{i}."
        a = _rms(x, t[p + "input_layernorm.weight"], eps)
        fused = torch.cat([t[p + f"self_attn.{n}_proj.weight"] for n in "kqv"])  # one k,q,v matmul
        k, q, v = (a @ fused.T).split([nkv * d, nh * d, nkv * d], -1)
        q, k, v = q.view(b, s, nh, d), k.view(b, s, nkv, d), v.view(b, s, nkv, d)
        if r["qk_norm"]:
            q = _rms(q, t[p + "self_attn.q_norm.weight"], QK_NORM_EPS)
            k = _rms(k, t[p + "self_attn.k_norm.weight"], QK_NORM_EPS)
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))
        q, k = _rope(q, pos, r["rope_dim"], r["theta"]), _rope(k, pos, r["rope_dim"], r["theta"])
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        scores = (q @ k.transpose(-1, -2) * r["attn_scale"]).masked_fill(~causal, float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, nh * d)
        h = x + o @ t[p + "self_attn.o_proj.weight"].T
        m = _rms(h, t[p + "post_attention_layernorm.weight"], eps)
        out = torch.zeros_like(h)
        if r["shared"]:
            gate, up, down = (t[p + f"mlp.engine.shared_{n}.weight"] for n in ("gate", "up", "down"))
            out += r["shared_scales"][i] * ((torch.nn.functional.silu(m @ gate.T) * (m @ up.T)) @ down.T)
        table = t[p + "mlp.engine.route_table"]
        gate, up, down = (t[p + f"mlp.engine.expert_{n}"] for n in ("gate", "up", "down"))
        for j, weight in enumerate(r["slot_weights"]):
            experts = table[j][routing_ids]  # [B, T]
            y = (torch.nn.functional.silu(m.unsqueeze(-2) @ gate[experts]) * (m.unsqueeze(-2) @ up[experts])) @ down[
                experts
            ]
            out += r["routed_scales"][i] * weight * y.squeeze(-2)
        x = h + out
    head = t["embed_tokens.weight"] if r["tied"] else t["lm_head.weight"]
    return (_rms(x, t["norm.weight"], eps) @ head.T) / r["logit_div"]


def reference_greedy(raw: dict, sd: dict, prompts: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] argmax continuation, the whole sequence recomputed every step (upstream's eager helper
    at temperature 0, without its repetition penalty)."""
    ids = prompts
    for _ in range(n):
        ids = torch.cat([ids, reference_logits(raw, sd, ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, prompts.shape[1] :]
