"""Which of upstream's four TR-Hash layouts a folder is, from its config.json (and, for the MLX
layout, whose model_type is ours, its tensor names):

| layout | config.json | tensors |
|---|---|---|
| native | upstream's full model-config dict, no `model_type`, `mlp_type: tr_hash_engine` | `layers.N.mlp.engine.{expert_gate,expert_up,expert_down,route_table,shared_*}`, plus derived `rotary_emb.inv_freq`, `fused_route_codes`, `fused_expert_pairs` |
| hf | the native dict plus `model_type: tr_hash_moe`, `num_experts_per_tok`, token ids, `auto_map` (its two adapter modules may be absent) | the native tensors, same bytes |
| deep | about 30 keys, `model_type: deep`, `mlp_type: token_routed`, `source_mlp_type: tr_hash_engine` | `layers.N.mlp.{gate,up,down}_proj_w`, `mlp.topk_token_to_expert`, `mlp.shared_*`; derived buffers dropped |
| mlx | `model_type: complexity` (as ours) with upstream's fields (`routing_strategy`, `top_k`, ...) | the deep names under `model.`, the table as int32 `topk_token_to_expert` plus its row 0 as `token_to_expert`; maybe fp16 |
"""

from __future__ import annotations

from .description import DEEP, HF, MLX, NATIVE


def trhash_layout(raw: dict, tensor_names=()) -> tuple[str, str] | None:
    """(layout, why) when config.json is one of the four TR-Hash layouts; None otherwise.
    `tensor_names` (the weights' names, headers only) tell the MLX layout, whose model_type is
    ours, when its config carries none of upstream's own fields."""
    model_type = raw.get("model_type")
    if model_type == "complexity":
        return _mlx_layout(raw, tensor_names)
    if model_type == "tr_hash_moe":
        return HF, "config.json has model_type 'tr_hash_moe'"
    if model_type == "deep":
        why = "config.json has model_type 'deep'"
        return DEEP, why + (
            " and source_mlp_type 'tr_hash_engine'" if raw.get("source_mlp_type") == "tr_hash_engine" else ""
        )
    if model_type is None and raw.get("mlp_type") == "tr_hash_engine":
        return NATIVE, "config.json has no model_type and mlp_type 'tr_hash_engine'"
    return None


def _mlx_layout(raw: dict, tensor_names) -> tuple[str, str] | None:
    """Upstream's MLX export says model_type 'complexity', as our own folders do; upstream's
    fields in config.json (ours have none of them) or its table names tell it apart."""
    markers = [k for k in ("routing_strategy", "top_k", "source_mlp_type") if k in raw]
    if raw.get("mlp_type") == "tr_hash_engine":
        markers.insert(0, "mlp_type 'tr_hash_engine'")
    if markers:
        return MLX, f"config.json has model_type 'complexity' with upstream's TR-Hash field(s) {', '.join(markers)}"
    tables = [n for n in tensor_names if n.endswith("mlp.topk_token_to_expert")]
    if tables:
        return MLX, f"config.json has model_type 'complexity' and the weights hold TR-Hash route tables ({tables[0]})"
    return None
