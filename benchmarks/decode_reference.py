"""A gpt-fast-style dense decoder: the reference the decode benchmark compares the engine with.

Written to be fast at decoding and nothing else, the way gpt-fast (pytorch-labs) decodes a Llama:
a static KV cache, q/k/v as one weight (and the MLP's gate/up as one), RoPE from a precomputed
table, and the whole one-token step (forward + greedy pick) under
`torch.compile(mode="reduce-overhead", fullgraph=True)`, called in a loop that never waits for
the host. Grouped-query attention goes through SDPA without copying K/V: at one query position
the heads of a group are that group's queries (the prompt is prefilled with SDPA's causal flash
path). No mu, no routing: a plain pre-norm SwiGLU decoder.

`same_bytes_config` sizes it against a Complexity model: same vocabulary, width, depth, heads
and KV heads, and the MLP width chosen so that a batch-1 step reads the same weight bytes as the
Complexity model's (every weight once, one expert per routed layer). What remains is how the
two spend those bytes.

    from decode_reference import DenseDecoder, same_bytes_config, decode_bytes_per_token
    ref = DenseDecoder(same_bytes_config(model)).to("cuda", torch.bfloat16)
    tokens = generate(ref, prompt_ids, max_new_tokens=256)           # [B, S + 256]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ReferenceConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6


def decode_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one batch-1 decode step reads: every parameter once (a tied embedding /
    LM head once), a routed expert bank for the experts a token visits only (top_k of E), and
    of an untied input embedding one row."""
    config = getattr(model, "config", None)
    routed = getattr(config, "mlp_type", "dense") != "dense"
    top_k = config.num_experts_per_tok if getattr(config, "mlp_type", None) in ("learned_moe", "hash_routed") else 1
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    tied = embedding is not None and embedding is model.get_output_embeddings().weight
    total = 0
    for name, p in model.named_parameters():  # a tied weight once
        nbytes = p.numel() * p.element_size()
        if routed and ".experts." in name:
            nbytes = nbytes * top_k // config.num_experts
        elif embedding is not None and p is embedding and not tied:
            nbytes = p.shape[1] * p.element_size()
        total += nbytes
    return total


def same_bytes_config(model: nn.Module, dtype_bytes: int | None = None) -> ReferenceConfig:
    """The reference shaped like the Complexity `model` (vocabulary, width, depth, heads, KV
    heads, head width, RoPE base), with the MLP width that makes a batch-1 step read the same
    weight bytes (rounded to a multiple of 8 columns, 16-byte rows)."""
    c = model.config
    dtype_bytes = dtype_bytes or next(model.parameters()).element_size()
    target = decode_bytes_per_token(model) // dtype_bytes  # in parameters
    h, d = c.hidden_size, c.head_dim
    attention = h * (c.num_attention_heads + 2 * c.num_key_value_heads) * d + c.num_attention_heads * d * h
    fixed = c.vocab_size * h + h + c.num_hidden_layers * (attention + 2 * h)  # tied embedding, norms
    width = (target - fixed) / (3 * h * c.num_hidden_layers)
    return ReferenceConfig(
        vocab_size=c.vocab_size,
        hidden_size=h,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=d,
        intermediate_size=max(8, int(round(width / 8)) * 8),
        rope_theta=c.rope_theta,
        norm_eps=c.rms_norm_eps,
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.c = c
        self.wqkv = nn.Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, bias=False)
        self.wo = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x, cos, sin, mask, input_pos):
        c = self.c
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], -1
        )
        q = q.view(b, s, c.num_heads, c.head_dim).transpose(1, 2)
        k = k.view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        self.k_cache[:b, :, input_pos] = k
        self.v_cache[:b, :, input_pos] = v
        if s > 1:  # prefill from position 0: causal flash attention over the new keys
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # one position: a group's heads are its queries, K/V read in place
            group = c.num_heads // c.num_kv_heads
            grouped = q.reshape(b, c.num_kv_heads, group, c.head_dim)
            y = F.scaled_dot_product_attention(grouped, self.k_cache[:b], self.v_cache[:b], attn_mask=mask)
            y = y.reshape(b, c.num_heads, 1, c.head_dim)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.w13 = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.attention = Attention(c)
        self.feed_forward = FeedForward(c)
        self.attention_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.ffn_norm = RMSNorm(c.hidden_size, c.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class DenseDecoder(nn.Module):
    """Token ids [B, S] at positions `input_pos` [S] (shared by the batch) -> logits [B, S, V]."""

    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.config = c
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.output = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied, as the Complexity presets are
        self.max_seq_len = 0

    @torch.no_grad()
    def init_weights_(self, seed: int = 0, std: float = 0.02) -> DenseDecoder:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for p in self.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        c = self.config
        param = self.output.weight
        shape = (max_batch, c.num_kv_heads, max_seq_len, c.head_dim)
        for layer in self.layers:
            layer.attention.k_cache = torch.zeros(shape, dtype=param.dtype, device=param.device)
            layer.attention.v_cache = torch.zeros(shape, dtype=param.dtype, device=param.device)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        freqs = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).to(param.device)
        self.cos, self.sin = emb.cos().to(param.dtype), emb.sin().to(param.dtype)
        self.causal = torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=param.device))
        self.max_seq_len = max_seq_len

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        # the one decode position's row [1, 1, 1, L] (a tensor index: no host sync)
        mask = self.causal[input_pos[-1:]][None, None]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x))


def prefill(model: DenseDecoder, idx: torch.Tensor) -> torch.Tensor:
    """Write the prompts [B, S] to the cache; -> the greedy next tokens [B, 1]."""
    pos = torch.arange(idx.shape[1], device=idx.device)
    return model(idx, pos)[:, -1].argmax(-1, keepdim=True)


def decode_one_token(model: DenseDecoder, cur: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One step for the tokens cur [B, 1] at input_pos [1] -> the greedy next tokens [B, 1]."""
    return model(cur, input_pos)[:, -1].argmax(-1, keepdim=True)


def compiled_decoder(fullgraph: bool = True, mode: str = "reduce-overhead"):
    """gpt-fast's decode step: compiled whole, replayed as CUDA graphs (one per batch size)."""
    return torch.compile(decode_one_token, mode=mode, fullgraph=fullgraph)


@torch.no_grad()
def generate(model: DenseDecoder, prompts: torch.Tensor, max_new_tokens: int, step=decode_one_token) -> torch.Tensor:
    """Greedy: prefill, then `max_new_tokens - 1` steps that never wait for the host (the tokens
    stay on the device until the end, as in gpt-fast). -> [B, S + max_new_tokens]."""
    s = prompts.shape[1]
    if s + max_new_tokens > model.max_seq_len:
        raise ValueError(f"max_new_tokens: {s} + {max_new_tokens} positions exceed the cache ({model.max_seq_len})")
    out = [prompts, prefill(model, prompts)]
    input_pos = torch.tensor([s], device=prompts.device)
    for _ in range(max_new_tokens - 1):
        out.append(step(model, out[-1].clone(), input_pos).clone())
        input_pos += 1
    return torch.cat(out, dim=1)


__all__ = [
    "DenseDecoder",
    "ReferenceConfig",
    "compiled_decoder",
    "decode_bytes_per_token",
    "generate",
    "same_bytes_config",
]
