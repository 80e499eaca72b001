"""A TR-Hash checkpoint's tensors under their neutral names, each checked against the config: every
stored tensor is used, dropped with the reason it is not needed, or named as a problem.

The native/hf derived buffers (rotary frequencies, upstream's top-2 kernel metadata) are checked
against the config and the tables, then dropped. The older lineage of the deep and MLX layouts
stores only the primary slot, `mlp.token_to_expert` [V]: its secondaries are
`(primary + j) mod E`, as upstream's converter and vllm-i64 read it.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from ....complexity_kernels import rope_inv_freq
from ....hash_routing import ROUTE_HASH_COUNTS, build_route_table, check_route_table, cyclic_slots
from .description import DEEP, HF, MLX, NATIVE, TRHashConfig, layout_name, neutral_tensor_shapes

_PRIMARY_ONLY = "mlp.token_to_expert"  # the older lineage's table: the primary slot only, [V]
# Native/hf per-layer buffers derived from the config or the table -> why they are dropped.
_DERIVED = {
    "self_attn.rotary_emb.inv_freq": "rotary inv_freq buffer: recomputed from rope_theta and the head size (checked equal)",
    "mlp.engine.fused_route_codes": "upstream's top-2 kernel metadata, derived from the route table (checked equal)",
    "mlp.engine.fused_expert_pairs": "upstream's top-2 kernel metadata, derived from the route table (checked equal)",
}


def map_tensors(
    sd: dict, layout: str, config: TRHashConfig, dropped: list, problems: list, notes: list
) -> dict[str, torch.Tensor]:
    """The state dict `sd` of `layout` under the neutral names; route tables as int64."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    tables: dict[int, torch.Tensor] = {}
    primary_only: list[int] = []
    narrow: set[str] = set()  # integer dtypes the route tables are stored in
    for neutral, shape in neutral_tensor_shapes(config).items():
        name = layout_name(neutral, layout)
        t = sd.get(name)
        primary = name.replace("topk_token_to_expert", "token_to_expert")
        if t is None and neutral.endswith("route_table") and layout in (DEEP, MLX) and primary in sd:
            used.add(primary)
            t = _primary_only_table(sd, primary, config, problems)
            if t is None:
                continue
            primary_only.append(_layer_of(neutral))
        if t is None:
            problems.append(f"missing tensor {name} (shape {list(shape)})")
            continue
        used.add(name)
        if tuple(t.shape) != shape:
            problems.append(f"{name} has shape {list(t.shape)}; the config gives {list(shape)} ({_why_shape(neutral)})")
            continue
        if neutral.endswith("route_table"):
            try:
                check_route_table(t, config.num_experts, config.vocab_size, config.num_experts_per_tok, name=name)
            except ValueError as err:
                problems.append(str(err))
                continue
            narrow.add(str(t.dtype).removeprefix("torch."))
            t = tables[_layer_of(neutral)] = t.to(torch.int64)
            if primary in sd and primary not in used:  # the MLX export's copy of row 0
                used.add(primary)
                _check_row_0_copy(sd[primary], primary, t, name, dropped, problems)
        elif not t.dtype.is_floating_point:
            problems.append(f"{name} has dtype {t.dtype}; weights are floating point")
            continue
        out[neutral] = t
    _note_table_storage(narrow, primary_only, config, notes)
    if layout in (NATIVE, HF):
        _check_derived(sd, config, tables, used, dropped, problems)
    _check_tied_head(sd, layout, config, used, dropped, problems)
    unexpected = sorted(set(sd) - used)
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f", ... ({len(unexpected)} in all)" if len(unexpected) > 8 else "")
        problems.append(f"unexpected tensor(s) for this config: {shown}")
    return out


def _layer_of(neutral: str) -> int:
    return int(neutral.split(".")[1])


def _why_shape(neutral: str) -> str:
    rest = neutral.split(".", 2)[-1]
    if rest.startswith("mlp.experts."):
        return "num_experts, hidden_size, intermediate_size / num_experts"
    if rest.startswith("mlp.shared_expert."):
        return "shared_intermediate_size (null: intermediate_size), hidden_size"
    if rest == "mlp.route_table":
        return "top_k, vocab_size"
    if rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        return "num_key_value_heads x head_dim, hidden_size"
    if rest.startswith("self_attn."):
        return "num_attention_heads, hidden_size"
    return "vocab_size, hidden_size"


def _primary_only_table(sd: dict, name: str, config: TRHashConfig, problems: list) -> torch.Tensor | None:
    """The older lineage's `mlp.token_to_expert` [V] (the primary slot) as a [k, V] table whose
    secondaries are (primary + j) mod E, as upstream's converter and vllm-i64 read it."""
    t = sd[name]
    if t.dim() != 1:
        problems.append(f"{name} has shape {list(t.shape)}; the primary-slot table is [vocab_size]")
        return None
    try:
        check_route_table(t.unsqueeze(0), config.num_experts, config.vocab_size, 1, name=name)
    except ValueError as err:
        problems.append(str(err))
        return None
    return cyclic_slots(t, config.num_experts, config.num_experts_per_tok)


def _check_row_0_copy(
    copy: torch.Tensor, copy_name: str, table: torch.Tensor, name: str, dropped: list, problems: list
) -> None:
    """The MLX export stores the table's row 0 again as `token_to_expert`: it must be that row."""
    if not torch.equal(copy.reshape(-1).long(), table[0]):
        problems.append(f"{copy_name} is not row 0 (the primary slot) of {name}")
    else:
        dropped.append((copy_name, "row 0 (the primary slot) of the route table, stored again (checked equal)"))


def _note_table_storage(narrow: set[str], primary_only: list[int], config: TRHashConfig, notes: list) -> None:
    """How the tables were stored, when not as [k, V] int64."""
    if narrow - {"int64"}:
        notes.append(f"route tables: stored as {', '.join(sorted(narrow))}, read as int64")
    if not primary_only:
        return
    if config.num_experts_per_tok > 1:
        notes.append(
            f"route tables of layer(s) {primary_only}: only {_PRIMARY_ONLY} (the primary slot) is stored, as "
            f"in upstream's older lineage; secondary slot j is (primary + j) mod num_experts, as upstream's "
            "converter and vllm-i64 read it"
        )
    else:
        notes.append(f"route tables of layer(s) {primary_only}: stored as {_PRIMARY_ONLY} (top_k 1: one slot)")


def fused_route_metadata(table: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's derived top-2 kernel metadata: (pairs int32 [E(E-1)/2, 2], all a < b in
    lexicographic order; codes uint8 [V], pair index | swap bit when slot 0 holds the larger
    expert). Only for k = 2 and 2 <= E <= 8; otherwise both are empty."""
    k, vocab = table.shape
    if k != 2 or not 2 <= num_experts <= 8:
        return torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.uint8)
    pairs = torch.tensor(list(itertools.combinations(range(num_experts), 2)), dtype=torch.int32)
    lo, hi = table.min(0).values, table.max(0).values
    index = torch.full((num_experts, num_experts), -1, dtype=torch.long)
    index[pairs[:, 0].long(), pairs[:, 1].long()] = torch.arange(len(pairs))
    swap = 0x8 if num_experts <= 4 else 0x20
    codes = index[lo, hi] | torch.where(table[0] > table[1], swap, 0)
    return pairs, codes.to(torch.uint8)


def _check_derived(
    sd: dict, config: TRHashConfig, tables: dict[int, torch.Tensor], used: set, dropped: list, problems: list
) -> None:
    """Native/hf buffers derived from the config or the table: must agree, then are dropped."""
    for i in range(config.num_hidden_layers):
        for suffix, why in _DERIVED.items():
            name = f"layers.{i}.{suffix}"
            if name not in sd:
                continue
            used.add(name)
            dropped.append((name, why))
            t = sd[name]
            if suffix.endswith("inv_freq"):
                want = rope_inv_freq(config.rope_dim, config.rope_theta)
                if t.shape != want.shape or not torch.allclose(t.float(), want, rtol=1e-5, atol=0):
                    problems.append(
                        f"{name} disagrees with rope_theta={config.rope_theta} over the {config.rope_dim} rotated "
                        f"dims of each head (head_dim {config.head_dim} x rope_fraction {config.rope_fraction})"
                    )
            elif i in tables:
                pairs, codes = fused_route_metadata(tables[i], config.num_experts)
                want = pairs if suffix.endswith("pairs") else codes
                if t.shape != want.shape or (want.numel() and not torch.equal(t.long(), want.long())):
                    problems.append(
                        f"{name} does not match layers.{i}'s route table (derived kernel metadata out of step)"
                    )


def _check_tied_head(sd: dict, layout: str, config: TRHashConfig, used: set, dropped: list, problems: list) -> None:
    """A stored lm_head of a tied model must be the embedding; it is then dropped."""
    head, embed_name = layout_name("lm_head.weight", layout), layout_name("embed_tokens.weight", layout)
    if not config.tie_word_embeddings or head not in sd:
        return
    used.add(head)
    embed = sd.get(embed_name)
    if embed is None or not torch.equal(sd[head], embed):
        problems.append(f"{head} differs from {embed_name} but tie_word_embeddings is true")
    else:
        dropped.append((head, "a stored copy of the tied embedding (checked equal)"))


def table_provenance(config: TRHashConfig, tensors: dict, layout: str, notes: list) -> TRHashConfig:
    """Compare the stored tables with a rebuild (information only: stored tables are kept), and
    recover route_hash_count for a deep multi-hash folder, which does not record it."""
    layers = range(config.num_hidden_layers)

    def rebuilt(i: int, hash_count: int) -> torch.Tensor:
        return build_route_table(
            config.route_strategy,
            vocab_size=config.vocab_size,
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            layer_idx=i,
            route_hash_count=hash_count,
        )

    def stored(i: int) -> torch.Tensor:
        return tensors[f"layers.{i}.mlp.route_table"]

    try:
        if config.route_strategy == "multi_hash" and config.route_hash_count is None:
            found = [c for c in ROUTE_HASH_COUNTS if torch.equal(rebuilt(0, c), stored(0))]
            if found and all(torch.equal(rebuilt(i, found[0]), stored(i)) for i in layers):
                notes.append(
                    f"route_hash_count: not recorded by the {layout} layout; {found[0]} rebuilds every stored table"
                )
                return dataclasses.replace(config, route_hash_count=found[0])
            notes.append(
                f"route_hash_count: not recorded by the {layout} layout and no count in 2..8 rebuilds the stored tables"
            )
            return config
        differ = [i for i in layers if not torch.equal(rebuilt(i, config.route_hash_count or 2), stored(i))]
    except ValueError as err:
        notes.append(f"route tables: {config.route_strategy} cannot rebuild them here ({err}); kept as stored")
        return config
    if differ:
        notes.append(
            f"route tables of layer(s) {differ} differ from a rebuild with {config.route_strategy} "
            "(stored tables are authoritative and kept as stored)"
        )
    else:
        notes.append(f"route tables: every layer equals a rebuild with {config.route_strategy} (kept as stored)")
    return config
