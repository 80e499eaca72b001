"""A static, slot-based KV cache for the inference engine.

Per layer, keys and values live in preallocated tensors [num_slots, n_kv, max_len + 1, head_dim]
(the spare position: `positions_per_slot`).
Each request owns one slot (a row) for its whole life; positions inside a row are the token
positions. The model calls `update(k, v, layer_idx)` from every attention layer; what it writes
and returns depends on the mode the engine set before the forward:

- prefill(slots): k/v [B, n_kv, S, d] for fresh prompts (positions 0..S-1, right padded) are
  written to rows `slots`; attention runs on the new k/v alone (nothing earlier exists), with
  the kernel's causal mode where the model can use it (`fresh_prompts`).
- decode(pos, kv_len): k/v [B, n_kv, 1, d] for rows 0..B-1 are written at per-row position
  `pos[b]`; attention runs on the views `cache[:B, :, :kv_len]` (no copy), kv_len being the
  engine's context bucket, not the whole slot. The engine builds the 4D mask that lets each row
  see its own positions 0..pos[b] only (and the sliding window).

Static shapes and no host syncs in `update`, so the decode step can be compiled and replayed
as a CUDA graph.
"""

from __future__ import annotations

import torch


def positions_per_slot(max_len: int) -> int:
    """The positions a slot holds for a context of max_len tokens (what its memory is sized by):
    one spare past max_len, never written, so that a decode view cache[:, :, :kv_len] is never the
    whole buffer. A whole buffer is contiguous; a compiled decode step's layout checks would then
    specialize its dynamic kv_len to max_len, and the one graph for every context bucket breaks."""
    return max_len + 1


class SlotKVCache:
    is_compileable = True

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_slots, num_kv_heads, positions_per_slot(max_len), head_dim)
        self.key_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_len = num_slots, max_len
        self.mode = "decode"
        self.slots: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.kv_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.key_cache + self.value_cache)

    def set_prefill(self, slots: torch.Tensor) -> None:
        self.mode, self.slots = "prefill", slots

    @property
    def fresh_prompts(self) -> bool:
        """True while the cache takes whole prompts from position 0 (prefill): a forward's keys are
        then all there is to attend to, and causal attention needs no mask (the model asks)."""
        return self.mode == "prefill"

    def set_decode(self, pos: torch.Tensor, kv_len: int) -> None:
        self.mode, self.pos, self.kv_len = "decode", pos, kv_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        kc, vc = self.key_cache[layer_idx], self.value_cache[layer_idx]
        if self.mode == "prefill":
            s = key_states.shape[2]
            kc[self.slots, :, :s] = key_states
            vc[self.slots, :, :s] = value_states
            return key_states, value_states
        b = key_states.shape[0]
        rows = torch.arange(b, device=kc.device)
        # written into the whole buffer: through a view cache[:b], torch.compile would rebuild the
        # view's rows around the write (copying every row of the batch, twice, per layer and step)
        kc[rows, :, self.pos] = key_states[:, :, 0]
        vc[rows, :, self.pos] = value_states[:, :, 0]
        return kc[:b, :, : self.kv_len], vc[:b, :, : self.kv_len]

    # Parts of the transformers Cache interface that generic code may query.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def __len__(self) -> int:
        return len(self.key_cache)


def attention_mask_decode(
    pos: torch.Tensor, kv_range: torch.Tensor, sliding_window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [B, 1, 1, kv_len] (kv_range = arange(kv_len)): row b sees keys j with
    pos[b] - W < j <= pos[b]."""
    j = kv_range[None, :]
    visible = j <= pos[:, None]
    if sliding_window is not None:
        visible = visible & (j > pos[:, None] - sliding_window)
    zero = torch.zeros((), dtype=dtype, device=pos.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=pos.device)
    return torch.where(visible, zero, neg)[:, None, None, :]


def attention_mask_prefill(
    batch: int, length: int, sliding_window: int | None, dtype: torch.dtype, device
) -> torch.Tensor:
    """Additive causal mask [B, 1, S, S] for prompts starting at position 0 (right padding needs
    nothing more: real queries never see the padded keys after them)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    visible = j <= i
    if sliding_window is not None:
        visible = visible & (j > i - sliding_window)
    mask = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[None, None].expand(batch, 1, length, length)


__all__ = ["SlotKVCache", "attention_mask_decode", "attention_mask_prefill", "positions_per_slot"]
