"""Triton kernels for decoding: a handful of rows against weights that are each read once.

At batch 1 (or a few rows) a decode step is bound by reading the weights, and every extra
kernel costs a few microseconds of launch and latency even inside a CUDA graph. These kernels
serve the projections of a decode step in as few launches as the math allows:

- `linear_rows`: up to three output segments, each x_a W_a^T (+ x_b W_b^T) (+ bias), in ONE
  launch, reading every weight in place (q/k/v plus mu's q/k/v; INL's mu projection plus its
  controller over [a, v]; a single projection).
- `swiglu_rows` / `down_rows`: routed experts without sorting, grouping or a grouped GEMM, for
  one route per row (token routing) or k (hash routing, each route a "slot" with its own fixed
  weight): each program walks the experts its rows chose in one slot and reads only those
  experts' weights straight from the stacked bank [E, in, out]; the SwiGLU (times the slot's
  weight) is applied as the gate/up columns are produced, the down kernel sums the slots in one
  accumulator, and a shared expert (or, alone, a dense SwiGLU) rides along in the same launches.

Every program holds all rows (up to `MAX_ROWS`, in a tile of 16, 32 or 64): the weights are read
once whatever the row count, and no program sums partial results of another (no split-K, no
atomics), so the results do not depend on the launch. Products accumulate in float32 and are
rounded once, as a GEMM does; the SwiGLU rounds gate, up and silu(gate) to the activations'
dtype as `F.silu(gate) * up` does. Float32 runs IEEE products (no TF32).

Imported by `complexity_kernels` only where triton is installed and CUDA is there (or
TRITON_INTERPRET=1, which runs these kernels on the CPU); the model falls back to PyTorch
everywhere else. Launched as plain Triton calls, which torch.compile traces into its graph
(fullgraph) and CUDA graphs capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

try:  # (a `try` keeps transformers' trust_remote_code import check from demanding triton everywhere)
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("complexity_triton needs triton; complexity_kernels falls back to PyTorch without it") from err

MAX_ROWS = 64  # the most rows a launch takes: every program holds all of them (`_block_m`)
MAX_SLOTS = 4  # routes per row the expert kernels take (their weights are scalar arguments)
# The software pipeline's shared memory per program, at most: within an A100's 163 KiB per SM.
_PIPELINE_BYTES = 160 << 10
_PRECISION = "ieee"  # float32 products stay float32 (no TF32); half-precision products are exact anyway


@dataclass(frozen=True)
class Tiles:
    """How a launch is cut: output columns per program (16 gives at least a program per SM for
    2,048-wide outputs), the most of K read per loop iteration, warps per program, and software
    pipeline stages (deep pipelines keep enough weight bytes in flight per SM; float32 tiles are
    twice the shared memory, so at most 2 stages there). The K tile sets the order in which a
    column's products are summed: a launch's results depend on it, never on anything else."""

    block_n: int = 16
    max_block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        for name, low in (("block_n", 16), ("max_block_k", 16), ("num_warps", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low or value & (value - 1):
                raise ValueError(f"Tiles.{name}: {value!r}; expected a power of two, at least {low}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"Tiles.num_stages: {self.num_stages!r}; expected a positive integer")


DEFAULT_TILES = Tiles()
# Tiles for the launches measured to prefer others (benchmarks/bench_decode_kernels.py sweeps them
# on a GPU and prints the entries); every other launch takes DEFAULT_TILES. Keys, from the launch
# wrappers below: ("linear", *segment widths, K_A, K_B or 0), ("swiglu", slots, I_E, I_S, K),
# ("down", slots, I_E, I_S, N). These are the presets' launches at least 3% faster than with the
# defaults on an H100 (BENCHMARKS.md, seventh GPU run, with each launch's GB/s; weights read from
# memory): 9% off the time of pacific-prime's launches per step, 7% off tmlr-187m's, 8% off base's.
# Mostly two warps a program: a 16-column program has too little work for four.
TILES: dict[tuple, Tiles] = {
    # pacific-prime (hidden 2048)
    ("linear", 2048, 1024, 1024, 2048, 0): Tiles(block_n=16, max_block_k=256, num_warps=2, num_stages=4),
    ("linear", 2048, 1024, 1024, 2048, 2048): Tiles(block_n=16, max_block_k=256, num_warps=2, num_stages=4),
    ("linear", 2048, 2048, 0): Tiles(block_n=16, max_block_k=256, num_warps=2, num_stages=6),
    ("linear", 2048, 64, 2048, 2048): Tiles(block_n=16, max_block_k=256, num_warps=2, num_stages=6),
    ("linear", 6144, 64, 0): Tiles(block_n=64, max_block_k=512, num_warps=2, num_stages=6),
    ("linear", 4, 2048, 0): Tiles(block_n=16, max_block_k=256, num_warps=2, num_stages=3),
    ("swiglu", 1, 1408, 0, 2048): Tiles(block_n=32, max_block_k=128, num_warps=4, num_stages=4),
    # tmlr-187m and base (hidden 768)
    ("linear", 768, 256, 256, 768, 768): Tiles(block_n=16, max_block_k=256, num_warps=2, num_stages=4),
    ("linear", 768, 256, 256, 768, 0): Tiles(block_n=32, max_block_k=256, num_warps=4, num_stages=3),
    ("linear", 768, 768, 0): Tiles(block_n=16, max_block_k=256, num_warps=2, num_stages=4),
    ("swiglu", 1, 512, 512, 768): Tiles(block_n=16, max_block_k=256, num_warps=2, num_stages=4),
    ("swiglu", 1, 512, 0, 768): Tiles(block_n=32, max_block_k=256, num_warps=4, num_stages=3),
}


def tiles_for(key: tuple) -> Tiles:
    return TILES.get(key, DEFAULT_TILES)


def _block_k(k: int, tiles: Tiles) -> int:
    return max(16, min(tiles.max_block_k, triton.next_power_of_2(k)))


def _block_m(rows) -> int:
    """Rows per program: all of them, in the smallest tile tl.dot takes that holds them (16, 32 or
    64). Decided without a guard when the row count is a compiled dynamic size: from its declared
    range (a range up to 16 takes 16)."""
    for block in (16, 32, 64):
        if statically_known_true(rows <= block):
            return block
    raise ValueError(f"{rows} rows: the decode kernels take at most {MAX_ROWS}")


def _launch_options(dtype: torch.dtype, tiles: Tiles, block_m: int) -> dict:
    """Warps and pipeline stages: the tiles' stages, at most 2 in float32, and as many as fit
    _PIPELINE_BYTES (more rows: fewer stages). A stage holds a row tile and a weight tile for each
    of two pipelined K loops (`linear_rows`' two inputs), or a row tile and two weight tiles
    (gate and up), whichever is larger."""
    size = torch.finfo(dtype).bits // 8
    stage_bytes = 2 * (block_m + tiles.block_n) * tiles.max_block_k * size
    stages = min(tiles.num_stages, max(1, _PIPELINE_BYTES // stage_bytes))
    return {"num_warps": tiles.num_warps, "num_stages": min(2, stages) if dtype == torch.float32 else stages}


# ----------------------------------------------------------------------------- device code
#
# Only triton builtins and the helpers below: triton.language's own @jit helpers (tl.cdiv,
# tl.zeros, tl.max, ...) are compiled-mode objects when triton was imported before
# TRITON_INTERPRET was set, which would keep these kernels from running in the interpreter (the
# CPU tests). The kernels' long argument lists are kept as written (fmt: off).

# fmt: off


@triton.jit
def _cdiv(n, block: tl.constexpr):
    return (n + block - 1) // block


@triton.jit
def _either(a, b):
    return a | b


@triton.jit
def _dot_linear(acc, x_ptr, x_stride, rows, w_ptr, w_stride, n, N, K,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, SILU: tl.constexpr):
    """acc += x[:rows, :K] @ W[n, :K]^T, W in nn.Linear layout [N, K] (K contiguous); with SILU,
    silu(x) (rounded to x's dtype, as `F.silu(x)` gives it) in place of x."""
    m = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        x = tl.load(x_ptr + m[:, None] * x_stride + k[None, :], mask=(m[:, None] < rows) & (k[None, :] < K), other=0.0)
        if SILU:
            x32 = x.to(tl.float32)
            x = (x32 / (1.0 + tl.exp(-x32))).to(x.dtype)
        w = tl.load(w_ptr + n[:, None] * w_stride + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _linear_segment(out_ptr, out_stride, col0, n0, N, rows,
                    a_ptr, a_stride, K_A, wa_ptr, wa_stride, b_ptr, b_stride, K_B, wb_ptr, wb_stride, bias_ptr,
                    HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_A: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KA: tl.constexpr, BLOCK_KB: tl.constexpr,
                    PRECISION: tl.constexpr):
    """out[:rows, col0 + n] for BLOCK_N columns n of one segment: a W_a^T (+ b W_b^T) (+ bias)."""
    m = tl.arange(0, BLOCK_M)
    n = n0 + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    acc = _dot_linear(acc, a_ptr, a_stride, rows, wa_ptr, wa_stride, n, N, K_A, BLOCK_M, BLOCK_KA, PRECISION, SILU_A)
    if HAS_B:
        acc = _dot_linear(acc, b_ptr, b_stride, rows, wb_ptr, wb_stride, n, N, K_B, BLOCK_M, BLOCK_KB, PRECISION, False)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + m[:, None] * out_stride + col0 + n[None, :], out, mask=(m[:, None] < rows) & (n[None, :] < N))


@triton.jit
def _linear_rows_kernel(out_ptr, out_stride, rows, a_ptr, a_stride, K_A, b_ptr, b_stride, K_B,
                        wa0, swa0, wb0, swb0, bias0, N0,
                        wa1, swa1, wb1, swb1, bias1, N1,
                        wa2, swa2, wb2, swb2, bias2, N2,
                        NUM_SEGMENTS: tl.constexpr, SILU_A: tl.constexpr,
                        B0: tl.constexpr, BIAS0: tl.constexpr, B1: tl.constexpr, BIAS1: tl.constexpr,
                        B2: tl.constexpr, BIAS2: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KA: tl.constexpr, BLOCK_KB: tl.constexpr,
                        PRECISION: tl.constexpr):
    """out[:, segment s's columns] = a W_a^T (+ b W_b^T) (+ bias) for up to three segments; each
    program owns BLOCK_N columns of one segment."""
    pid = tl.program_id(0)
    blocks0 = _cdiv(N0, BLOCK_N)
    if pid < blocks0:
        _linear_segment(out_ptr, out_stride, 0, pid * BLOCK_N, N0, rows,
                        a_ptr, a_stride, K_A, wa0, swa0, b_ptr, b_stride, K_B, wb0, swb0, bias0, B0, BIAS0, SILU_A,
                        BLOCK_M, BLOCK_N, BLOCK_KA, BLOCK_KB, PRECISION)
    else:
        if NUM_SEGMENTS > 1:
            blocks1 = _cdiv(N1, BLOCK_N)
            if pid < blocks0 + blocks1:
                _linear_segment(out_ptr, out_stride, N0, (pid - blocks0) * BLOCK_N, N1, rows,
                                a_ptr, a_stride, K_A, wa1, swa1, b_ptr, b_stride, K_B, wb1, swb1, bias1, B1, BIAS1,
                                SILU_A, BLOCK_M, BLOCK_N, BLOCK_KA, BLOCK_KB, PRECISION)
            else:
                if NUM_SEGMENTS > 2:
                    _linear_segment(out_ptr, out_stride, N0 + N1, (pid - blocks0 - blocks1) * BLOCK_N, N2, rows,
                                    a_ptr, a_stride, K_A, wa2, swa2, b_ptr, b_stride, K_B, wb2, swb2, bias2, B2,
                                    BIAS2, SILU_A, BLOCK_M, BLOCK_N, BLOCK_KA, BLOCK_KB, PRECISION)


@triton.jit
def _dot_experts(acc_a, acc_b, x_ptr, x_stride, ids_ptr, ids_stride, rows, num_experts,
                 w_ptr, w_expert_stride, w_stride, n, N, K, b_offset,
                 TWO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc_a += x @ W[e_row][:K, n], each row through its own expert (ids_ptr[row * ids_stride]),
    W stacked [E, K, out] (out contiguous); with TWO also acc_b += x @ W[e_row][:K, b_offset + n].
    The experts no row chose are not read."""
    m = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + m * ids_stride, mask=m < rows, other=-1)
    for e in range(num_experts):
        mine = ids == e
        if tl.reduce(mine.to(tl.int32), 0, _either) > 0:
            w_e = w_ptr + e * w_expert_stride
            for k0 in range(0, K, BLOCK_K):
                k = k0 + kk
                # the other experts' rows load zeros: their products add exact zeros
                x = tl.load(x_ptr + m[:, None] * x_stride + k[None, :], mask=mine[:, None] & (k[None, :] < K), other=0.0)
                w_tile = w_e + k[:, None] * w_stride + n[None, :]
                w_mask = (k[:, None] < K) & (n[None, :] < N)
                acc_a = tl.dot(x, tl.load(w_tile, mask=w_mask, other=0.0), acc_a, input_precision=PRECISION)
                if TWO:
                    acc_b = tl.dot(x, tl.load(w_tile + b_offset, mask=w_mask, other=0.0), acc_b,
                                   input_precision=PRECISION)
    return acc_a, acc_b


@triton.jit
def _store_swiglu(h_ptr, h_stride, col0, n, N, rows, acc_gate, acc_up, scale, BLOCK_M: tl.constexpr):
    """h = silu(gate) * up * scale with the roundings of `F.silu(gate) * up * scale` on rounded
    gate and up (a scale of 1 changes nothing)."""
    m = tl.arange(0, BLOCK_M)
    dtype = h_ptr.dtype.element_ty
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    h = (act * up).to(dtype).to(tl.float32) * scale
    tl.store(h_ptr + m[:, None] * h_stride + col0 + n[None, :], h.to(dtype),
             mask=(m[:, None] < rows) & (n[None, :] < N))


@triton.jit
def _swiglu_rows_kernel(h_ptr, h_stride, x_ptr, x_stride, ids_ptr, slots, rows, K, num_experts,
                        w_ptr, w_expert_stride, w_stride, I_E, sg_ptr, su_ptr, s_stride, I_S,
                        scale0, scale1, scale2, scale3, shared_scale,
                        HAS_EXPERTS: tl.constexpr, HAS_SHARED: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """h[:, j I_E : (j+1) I_E] = scale_j * the SwiGLU of each row's expert in slot j (ids [rows,
    slots], bank [E, K, 2 I_E] = gate | up); h[:, slots I_E:] = shared_scale * the shared expert's
    (gate/up in nn.Linear layout [I_S, K]). The first programs own BLOCK_N expert columns of one
    slot each, the rest BLOCK_N shared columns."""
    pid = tl.program_id(0)
    blocks = 0
    if HAS_EXPERTS:
        blocks = _cdiv(I_E, BLOCK_N)
    acc_gate = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    if pid < slots * blocks:
        slot = pid // blocks
        n = (pid - slot * blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc_gate, acc_up = _dot_experts(acc_gate, acc_up, x_ptr, x_stride, ids_ptr + slot, slots, rows, num_experts,
                                        w_ptr, w_expert_stride, w_stride, n, I_E, K, I_E, True,
                                        BLOCK_M, BLOCK_K, PRECISION)
        scale = tl.where(slot == 0, scale0, tl.where(slot == 1, scale1, tl.where(slot == 2, scale2, scale3)))
        _store_swiglu(h_ptr, h_stride, slot * I_E, n, I_E, rows, acc_gate, acc_up, scale, BLOCK_M)
    else:
        if HAS_SHARED:
            n = (pid - slots * blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
            acc_gate = _dot_linear(acc_gate, x_ptr, x_stride, rows, sg_ptr, s_stride, n, I_S, K,
                                   BLOCK_M, BLOCK_K, PRECISION, False)
            acc_up = _dot_linear(acc_up, x_ptr, x_stride, rows, su_ptr, s_stride, n, I_S, K,
                                 BLOCK_M, BLOCK_K, PRECISION, False)
            _store_swiglu(h_ptr, h_stride, slots * I_E, n, I_S, rows, acc_gate, acc_up, shared_scale, BLOCK_M)


@triton.jit
def _down_rows_kernel(y_ptr, y_stride, h_ptr, h_stride, ids_ptr, slots, rows, I_E, N, num_experts,
                      w_ptr, w_expert_stride, w_stride, sd_ptr, sd_stride, I_S,
                      HAS_EXPERTS: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KS: tl.constexpr, PRECISION: tl.constexpr):
    """y = sum_j h[:, j I_E : (j+1) I_E] @ down[e_row,j] (ids [rows, slots], bank [E, I_E, N]) +
    h[:, slots I_E:] W_sd^T (the shared expert's down projection, [N, I_S]), all in one float32
    accumulator."""
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    if HAS_EXPERTS:
        for slot in range(slots):
            acc, _ = _dot_experts(acc, acc, h_ptr + slot * I_E, h_stride, ids_ptr + slot, slots, rows, num_experts,
                                  w_ptr, w_expert_stride, w_stride, n, N, I_E, 0, False, BLOCK_M, BLOCK_K, PRECISION)
    if HAS_SHARED:
        acc = _dot_linear(acc, h_ptr + slots * I_E, h_stride, rows, sd_ptr, sd_stride, n, N, I_S,
                          BLOCK_M, BLOCK_KS, PRECISION, False)
    tl.store(y_ptr + m[:, None] * y_stride + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(m[:, None] < rows) & (n[None, :] < N))


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _attend_block_kernel(q_ptr, q_sb, q_sh, q_sg, k_ptr, k_sb, k_sh, k_sl, v_ptr, v_sb, v_sh, v_sl,
                         mask_ptr, mask_sb, mask_sl, acc_ptr, ml_ptr, kv_heads, groups, L, scale,
                         MASK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, D: tl.constexpr,
                         PRECISION: tl.constexpr):
    """One query position's attention over ONE block of BLOCK_L keys, for the `groups` query heads
    of one K/V head of one row: the block's softmax numerator (acc [G, D], float32), its row
    maximum m and sum l, for `attend_one_position` to combine over the blocks. MASK: 0 none, 1
    additive (added to the scores; a key under -1e30 is hidden), 2 boolean (True: visible); keys
    past L are never visible."""
    bh = tl.program_id(0)
    block = tl.program_id(1)
    nblocks = tl.num_programs(1)
    b = bh // kv_heads
    h = bh - b * kv_heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    j = block * BLOCK_L + tl.arange(0, BLOCK_L)
    visible = j < L
    if MASK == 1:
        bias = tl.load(mask_ptr + b * mask_sb + j * mask_sl, mask=visible, other=0.0).to(tl.float32)
        visible = visible & (bias > -1e30)  # finfo.min or -inf: exp() of it is 0, so no need to read the key
    if MASK == 2:
        visible = visible & (tl.load(mask_ptr + b * mask_sb + j * mask_sl, mask=visible, other=0) != 0)
    # hidden keys are never read: a context bucket's positions past a row's own cost no bytes
    q = tl.load(q_ptr + b * q_sb + h * q_sh + g[:, None] * q_sg + d[None, :], mask=g[:, None] < groups, other=0.0)
    k = tl.load(k_ptr + b * k_sb + h * k_sh + j[:, None] * k_sl + d[None, :], mask=visible[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if MASK == 1:
        s += bias[None, :]
    s = tl.where(visible[None, :], s, float("-inf"))
    m = tl.reduce(s, 1, _maximum)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a block with no visible key adds nothing
    p = tl.exp(s - m_safe[:, None])
    v = tl.load(v_ptr + b * v_sb + h * v_sh + j[:, None] * v_sl + d[None, :], mask=visible[:, None], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    out = (bh * nblocks + block) * groups + g
    mine = g < groups
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=mine[:, None])
    tl.store(ml_ptr + out * 2, m, mask=mine)
    tl.store(ml_ptr + out * 2 + 1, tl.reduce(p, 1, _add), mask=mine)


@triton.jit
def _attend_combine_kernel(acc_ptr, ml_ptr, out_ptr, groups, blocks,
                           BLOCK_G: tl.constexpr, D: tl.constexpr):
    """The blocks of one (row, K/V head) in order: out = sum_i w_i acc_i / sum_i w_i l_i with
    w_i = exp(m_i - max_i m_i) (0 for a block with no visible key), in the output's dtype."""
    bh = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    mine = g < groups
    top = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    for block in range(blocks):
        row = (bh * blocks + block) * groups + g
        top = tl.maximum(top, tl.load(ml_ptr + row * 2, mask=mine, other=0.0))  # (0: padding rows stay finite)
    num = tl.full((BLOCK_G, D), 0.0, dtype=tl.float32)
    den = tl.full((BLOCK_G,), 0.0, dtype=tl.float32)
    for block in range(blocks):
        row = (bh * blocks + block) * groups + g
        w = tl.exp(tl.load(ml_ptr + row * 2, mask=mine, other=0.0) - top)
        num += w[:, None] * tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=mine[:, None], other=0.0)
        den += w * tl.load(ml_ptr + row * 2 + 1, mask=mine, other=1.0)
    out = bh * groups + g
    tl.store(out_ptr + out[:, None] * D + d[None, :], (num / den[:, None]).to(out_ptr.dtype.element_ty),
             mask=mine[:, None])


# ----------------------------------------------------------------------------- host code


def linear_rows(a: torch.Tensor, b: torch.Tensor | None, segments, silu_a: bool = False) -> torch.Tensor:
    """[rows, sum N_s]: segment s = a' @ W_a^T (+ b @ W_b^T when it has W_b) (+ bias), where a'
    is a, or silu(a) with `silu_a`.

    a [rows, K_A], b [rows, K_B] or None (rows <= MAX_ROWS, last dim contiguous, any row stride,
    0 included); `segments`: 1 to 3 (W_a [N, K_A], W_b [N, K_B] or None, bias [N] or None),
    weights with a contiguous last dim (column slices of a wider weight are fine).
    """
    rows = a.shape[0]
    if not 1 <= len(segments) <= 3:
        raise ValueError(f"linear_rows: {len(segments)} segments (1 to 3)")
    block_m = _block_m(rows)
    widths = [w_a.shape[0] for w_a, _, _ in segments]
    out = torch.empty((rows, sum(widths)), dtype=a.dtype, device=a.device)
    b_arg = b if b is not None else a  # (unused stand-ins keep every pointer argument a tensor)
    args, flags = [], {}
    for i in range(3):
        w_a, w_b, bias = segments[i] if i < len(segments) else (segments[0][0], None, None)
        w_b_arg = w_b if w_b is not None else w_a
        args += [w_a, w_a.stride(0), w_b_arg, w_b_arg.stride(0), bias if bias is not None else w_a,
                 widths[i] if i < len(segments) else 0]
        flags[f"B{i}"], flags[f"BIAS{i}"] = w_b is not None, bias is not None
    tiles = tiles_for(("linear", *widths, a.shape[1], 0 if b is None else b.shape[1]))
    _linear_rows_kernel[(sum(triton.cdiv(n, tiles.block_n) for n in widths),)](
        out, out.stride(0), rows, a, a.stride(0), a.shape[1], b_arg, b_arg.stride(0), b_arg.shape[1], *args,
        NUM_SEGMENTS=len(segments), SILU_A=silu_a, **flags, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
        BLOCK_KA=_block_k(a.shape[1], tiles), BLOCK_KB=_block_k(b_arg.shape[1], tiles), PRECISION=_PRECISION,
        **_launch_options(a.dtype, tiles, block_m),
    )
    return out


def _slots(expert_ids: torch.Tensor | None) -> int:
    """Routes per row: expert_ids [rows] is one slot, [rows, k] k slots."""
    if expert_ids is None:
        return 0
    slots = 1 if expert_ids.dim() == 1 else expert_ids.shape[1]
    if not 1 <= slots <= MAX_SLOTS or not expert_ids.is_contiguous():
        raise ValueError(f"expert_ids: shape {list(expert_ids.shape)}; expected contiguous [rows] or [rows, k <= {MAX_SLOTS}]")
    return slots


def swiglu_rows(x, expert_ids=None, gate_up=None, shared_gate=None, shared_up=None,
                slot_scales=(1.0,), shared_scale=1.0) -> torch.Tensor:
    """[rows, k I_E + I_S]: columns j I_E to (j+1) I_E hold row r's SwiGLU through expert
    expert_ids[r, j] times slot_scales[j] (bank gate_up [E, H, 2 I_E], gate | up; expert_ids [rows]
    is one slot; none without a bank), then the shared expert's (nn.Linear weights [I_S, H]) times
    shared_scale. Each SwiGLU is rounded to x's dtype before its scale, as `F.silu(g) * u * s`."""
    rows, k = x.shape
    slots = _slots(expert_ids)
    has_experts, has_shared = gate_up is not None, shared_gate is not None
    if has_experts and len(slot_scales) != slots:
        raise ValueError(f"slot_scales: {len(slot_scales)} values for {slots} routes per row")
    bank = gate_up if has_experts else x
    e, i = (gate_up.shape[0], gate_up.shape[2] // 2) if has_experts else (0, 0)
    i_s = shared_gate.shape[0] if has_shared else 0
    h = torch.empty((rows, slots * i + i_s), dtype=x.dtype, device=x.device)
    sg, su = (shared_gate, shared_up) if has_shared else (x, x)
    scales = [float(s) for s in slot_scales] + [1.0] * (MAX_SLOTS - len(slot_scales))
    tiles = tiles_for(("swiglu", slots, i, i_s, k))
    block_m = _block_m(rows)
    _swiglu_rows_kernel[(slots * triton.cdiv(i, tiles.block_n) + triton.cdiv(i_s, tiles.block_n),)](
        h, h.stride(0), x, x.stride(0), expert_ids if has_experts else x, slots, rows, k, e,
        bank, bank.stride(0), bank.stride(-2), i, sg, su, sg.stride(0), i_s, *scales, float(shared_scale),
        HAS_EXPERTS=has_experts, HAS_SHARED=has_shared, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=_block_k(k, tiles), PRECISION=_PRECISION, **_launch_options(x.dtype, tiles, block_m),
    )
    return h


def down_rows(h, out_features: int, expert_ids=None, down=None, shared_down=None) -> torch.Tensor:
    """[rows, out_features]: sum_j h[:, j I_E : (j+1) I_E] @ down[expert_ids[r, j]] (bank [E, I_E,
    out]; expert_ids [rows] is one slot; none without a bank) plus h[:, k I_E:] @ W_sd^T (the
    shared expert's down projection [out, I_S])."""
    rows = h.shape[0]
    slots = _slots(expert_ids)
    has_experts, has_shared = down is not None, shared_down is not None
    bank = down if has_experts else h
    e, i = (down.shape[0], down.shape[1]) if has_experts else (0, 0)
    i_s = shared_down.shape[1] if has_shared else 0
    y = torch.empty((rows, out_features), dtype=h.dtype, device=h.device)
    sd = shared_down if has_shared else h
    tiles = tiles_for(("down", slots, i, i_s, out_features))
    block_m = _block_m(rows)
    _down_rows_kernel[(triton.cdiv(out_features, tiles.block_n),)](
        y, y.stride(0), h, h.stride(0), expert_ids if has_experts else h, slots, rows, i, out_features, e,
        bank, bank.stride(0), bank.stride(-2), sd, sd.stride(0), i_s,
        HAS_EXPERTS=has_experts, HAS_SHARED=has_shared, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=_block_k(max(i, 1), tiles), BLOCK_KS=_block_k(max(i_s, 1), tiles), PRECISION=_PRECISION,
        **_launch_options(h.dtype, tiles, block_m),
    )
    return y


ATTEND_BLOCK = 64  # keys per program: one block each, so even one row of a short cache fills the SMs


def attend_one_position(q, k, v, mask, scale: float):
    """Attention of ONE query position per row, the query heads grouped by K/V head: q [B, KV, G, D],
    k and v [B, KV, L, D] (any strides but the last), mask None, additive or boolean (True:
    visible), [B, L] with any strides -> [B, KV, G, D] in q's dtype. Scores, softmax and sums in
    float32, the probabilities rounded to V's dtype for their product with it (as flash attention
    does). Hidden keys (False, or an additive value under -1e30: finfo.min, -inf) are never read,
    so attending over a context bucket costs the bytes of each row's own context.

    Each program of a first kernel takes one block of ATTEND_BLOCK keys of one (row, K/V head) and
    writes its softmax numerator, maximum and sum; a second kernel combines the blocks in a fixed
    order (no atomics: the result does not depend on the launch). D must be a power of two."""
    b, kv_heads, groups, d = q.shape
    length = k.shape[2]
    blocks = triton.cdiv(length, ATTEND_BLOCK)
    block_g = max(16, triton.next_power_of_2(groups))
    acc = torch.empty((b * kv_heads * blocks * groups, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b * kv_heads * blocks * groups, 2), dtype=torch.float32, device=q.device)
    out = torch.empty((b, kv_heads, groups, d), dtype=q.dtype, device=q.device)
    kind = 0 if mask is None else (2 if mask.dtype == torch.bool else 1)
    mask_arg, mask_strides = (q, (0, 0)) if mask is None else (mask, (mask.stride(0), mask.stride(1)))
    _attend_block_kernel[(b * kv_heads, blocks)](
        q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2), mask_arg, *mask_strides, acc, ml, kv_heads, groups, length,
        float(scale), MASK=kind, BLOCK_G=block_g, BLOCK_L=ATTEND_BLOCK, D=d, PRECISION=_PRECISION, num_warps=4,
    )
    _attend_combine_kernel[(b * kv_heads,)](acc, ml, out, groups, blocks, BLOCK_G=block_g, D=d, num_warps=4)
    return out


# fmt: on

__all__ = [
    "ATTEND_BLOCK",
    "DEFAULT_TILES",
    "MAX_ROWS",
    "MAX_SLOTS",
    "TILES",
    "Tiles",
    "attend_one_position",
    "down_rows",
    "linear_rows",
    "swiglu_rows",
    "tiles_for",
]
