"""Triton kernels for Video Sparse Attention on tiled tensors `[B, H, 64*N, D]` (contiguous).

Launchers (each one or two kernel launches; `BH = B*H`):

- `block_means(q, k, v, bs)`: per-block means over real tokens -> `q_c, k_c, v_c [B, H, N, D]` (input dtype).
- `coarse_select(q_c, k_c, v_c, topk, scale, bs)`: compressed attention `out_c` (fp32 `[B, H, N, D]`), the coarse
  scores (fp32 `[B, H, N, N]`), and per row exactly `topk` key blocks with the largest scores (ties: lower block
  index first) as a byte mask `sel [B, H, N, N]` and index lists `q2k_idx [B, H, N, topk]` grouped by size class
  (see below) with the group ends `q2k_num [B, H, N, 3]` (the last is `topk`). One launch.
- `sparse_fwd(...)`: block-sparse flash attention over the selected key blocks (keys at or past `bs[j]` in block
  j masked), fused epilogue `out = out_c[block] * gate + out_s`; also the base-2 log-sum-exp.
  One program per (query block, batch*head) walks its index list, one key tile per step; the gathered K/V tiles
  come through TMA descriptors on sm_90+ (`CONFIGS[...]["tma"]`).
- `build_k2q(sel, bs)`: for every key block, the query blocks that selected it, grouped by size class (backward).
- `bwd_preprocess`, `sparse_bwd_dq`, `sparse_bwd_dkdv`: the backward (FA2 style: dQ over q2k, dK/dV over k2q),
  with the coarse-stage gradients (divided by the block sizes in-kernel) added in the epilogues.

Size classes: a block of `bs <= 16` real tokens is read as a 16-row tile, `16 < bs <= 32` as a 32-row tile, the
rest as 64-row tiles (`WIDTHS`), so the partial tiles at a grid's borders (18% of the slots of the Wan 480p grid)
cost the work of their real rows rounded up to 16 or 32 instead of 64. Index lists are grouped by class (ascending
inside a group) and each loop over a list runs once per class with that tile height.

Pad slots are not tokens: the kernels write zeros there (out, out_s, dq, dk, dv, d_gate) and ignore `dout` there
(which must be finite: dK/dV multiply its pad rows by zero instead of masking the tile, to keep the TMA operand in
shared memory); the block means never read past a block's size. Inputs must be finite at pad slots (`tiling.tile`
writes zeros there).

Measured on an H200 (see `benchmarks/NOTES.md`): the fine kernels run at ~570 (forward) to ~735 (dQ) TFLOP/s counted
on 64x64 blocks, near the card's practical bf16 rate; sharing K/V tiles between query blocks did not pay.

All matmuls take bf16/fp16 operands with fp32 accumulation; head_dim D in {64, 128} (any power of two >= 16 works).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: pointer loads only
    TensorDescriptor = None

BLOCK = 64
LOG2E = 1.4426950408889634
WIDTHS = (64, 32, 16)  # tile heights of the size classes (`_size_class`)

# Group index lists by size class. Off: every block is one 64-row class (the kernels before the split; for
# side-by-side benchmarks).
SIZE_CLASSES = True

# Launch configurations of the fine-stage kernels. `tma`: load the gathered K/V (Q/dO) tiles of every height through TMA
# tensor descriptors (sm_90+; otherwise plain pointer loads). `benchmarks/bench_vsa.py --sweep` measures the
# alternatives on the card at hand and reports the fastest; the sparse defaults below come from its H200 runs on the
# Wan 480p and 720p grids with size classes (`--grid`, `results/sweeps/`). `num_stages` is capped on cards with
# less shared memory (`_num_stages`).
# `*_dense`: topk == N, where every list is the same, so a program may take `group` = 2 blocks (128 rows) and
# fetch each K/V (Q/dO) tile once for both. On the H100 with Triton 3.6 that measured slower than one block per
# program (s = 0, B1 H12 S32768 D128: forward 18.8 vs 15.8 ms, fwd+bwd 66.9 vs 56.2 ms), so it is off (group 1
# uses the sparse configs); `bench_vsa.py --sweep dense` times it on other cards.
CONFIGS: dict[str, dict[str, int]] = {
    "fwd": {"num_warps": 4, "num_stages": 5, "tma": 1},
    "dq": {"num_warps": 4, "num_stages": 2, "tma": 1},
    "dkdv": {"num_warps": 4, "num_stages": 2, "tma": 1, "longest_first": 1},
    "fwd_dense": {"group": 1, "num_warps": 8, "num_stages": 2, "tma": 1},
    "dq_dense": {"group": 1, "num_warps": 8, "num_stages": 2, "tma": 1},
    "dkdv_dense": {"group": 1, "num_warps": 8, "num_stages": 2, "tma": 0},
}

# Tests set this to fill every output with NaN (floats) or -1 (ints) before the kernels write it.
POISON_OUTPUTS = False


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output (poisoned when `POISON_OUTPUTS`)."""
    dtype = like.dtype if dtype is None else dtype
    if not POISON_OUTPUTS:
        return torch.empty(shape, device=like.device, dtype=dtype)
    fill = float("nan") if dtype.is_floating_point else (255 if dtype == torch.uint8 else -1)
    return torch.full(shape, fill, device=like.device, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# coarse stage
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _size_class(bs, SPLIT: tl.constexpr):
    """0 (64-row tiles), 1 (32) or 2 (16) for block sizes `bs`; all 0 without `SPLIT`."""
    if SPLIT:
        cls = (bs <= 32).to(tl.int32) + (bs <= 16).to(tl.int32)
    else:
        cls = (bs < 0).to(tl.int32)
    return cls


@triton.jit
def _mean_one(X, XC, base, cbase, bs, D: tl.constexpr):
    offs_m = tl.arange(0, 64)
    offs_d = tl.arange(0, D)
    x = tl.load(X + base + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < bs, other=0.0)
    tl.store(XC + cbase + offs_d, (tl.sum(x.to(tl.float32), 0) / bs).to(XC.dtype.element_ty))


@triton.jit
def _block_mean_kernel(Q, K, V, QC, KC, VC, BS, N, D: tl.constexpr):
    """grid (N, BH): means of block `blk` of q, k and v (fp32 sums divided by the block size)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = (bh * N + blk) * (64 * D)
    cbase = (bh * N + blk) * D
    bs = tl.load(BS + blk)
    _mean_one(Q, QC, base, cbase, bs, D)
    _mean_one(K, KC, base, cbase, bs, D)
    _mean_one(V, VC, base, cbase, bs, D)


@triton.jit
def _coarse_kernel(
    QC, KC, VC, OC, SC, SEL, IDX, NUM, BS, N, topk, scale,
    D: tl.constexpr, BMC: tl.constexpr, BNC: tl.constexpr, NPAD: tl.constexpr, R: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """grid (cdiv(N, BMC), BH): coarse attention, scores and exact top-k for BMC query blocks; index lists
    grouped by the key blocks' size class."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, D)
    rows = pid * BMC + tl.arange(0, BMC)
    rmask = rows < N
    cbase = bh * N * D
    sbase = bh * N * N
    q = tl.load(QC + cbase + rows[:, None] * D + offs_d[None, :], mask=rmask[:, None], other=0.0)
    m_i = tl.full([BMC], float("-inf"), tl.float32)
    l_i = tl.zeros([BMC], tl.float32)
    acc = tl.zeros([BMC, D], tl.float32)
    for c0 in range(0, N, BNC):
        cols = c0 + tl.arange(0, BNC)
        cmask = cols < N
        kc = tl.load(KC + cbase + cols[:, None] * D + offs_d[None, :], mask=cmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kc)) * scale
        tl.store(SC + sbase + rows[:, None] * N + cols[None, :], s, mask=rmask[:, None] & cmask[None, :])
        s2 = tl.where(cmask[None, :], s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vc = tl.load(VC + cbase + cols[:, None] * D + offs_d[None, :], mask=cmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vc.dtype), vc)
        m_i = m_new
    tl.store(OC + cbase + rows[:, None] * D + offs_d[None, :], acc / l_i[:, None], mask=rmask[:, None])
    tl.debug_barrier()  # the score rows written above are read back by other threads of this program

    # Exact top-k per row: radix select of the k-th largest order-preserving int32 key (31 bisection steps over
    # the bits after the sign), then all keys above it plus the lowest-indexed ties.
    cols = tl.arange(0, NPAD)
    cm = cols < N
    cls = _size_class(tl.load(BS + cols, mask=cm, other=64), SPLIT)
    for r0 in range(0, BMC, R):
        rr = pid * BMC + r0 + tl.arange(0, R)
        rm = rr < N
        s = tl.load(SC + sbase + rr[:, None] * N + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        bits = s.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where(cm[None, :], key, -2147483648)
        n_nonneg = tl.sum((key >= 0).to(tl.int32), 1)
        thr = tl.where(n_nonneg >= topk, 0, -2147483648)
        for i in range(31):
            cand = thr | (1 << (30 - i))
            cnt = tl.sum((key >= cand[:, None]).to(tl.int32), 1)
            thr = tl.where(cnt >= topk, cand, thr)
        gt = key > thr[:, None]
        n_gt = tl.sum(gt.to(tl.int32), 1)
        eq = (key == thr[:, None]) & cm[None, :]
        rank = tl.cumsum(eq.to(tl.int32), 1)
        sel = gt | (eq & (rank <= (topk - n_gt)[:, None]))
        # list position: the selected blocks of lower classes first, then ascending inside the class
        end = tl.zeros([R], tl.int32)
        pos = tl.zeros([R, NPAD], tl.int32)
        for c in tl.static_range(3):
            in_c = (sel & (cls == c)[None, :]).to(tl.int32)
            pos += in_c * (end[:, None] + tl.cumsum(in_c, 1) - 1)
            end += tl.sum(in_c, 1)
            tl.store(NUM + (bh * N + rr) * 3 + c, end, mask=rm)
        colv = tl.zeros([R, NPAD], tl.int32) + cols[None, :]
        tl.store(IDX + bh * N * topk + rr[:, None] * topk + pos, colv, mask=sel & rm[:, None])
        tl.store(SEL + sbase + rr[:, None] * N + cols[None, :], sel.to(tl.uint8), mask=rm[:, None] & cm[None, :])


@triton.jit
def _k2q_kernel(SEL, K2Q, K2QN, BS, N, BC: tl.constexpr, RB: tl.constexpr, SPLIT: tl.constexpr):
    """grid (cdiv(N, BC), BH): for BC key blocks, the query blocks whose row selected them, grouped by the query
    blocks' size class (one pass over the mask per class), ascending inside a group."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    cols = pid * BC + tl.arange(0, BC)
    cm = cols < N
    base = bh * N * N
    count = tl.zeros([BC], tl.int32)
    for c in tl.static_range(3):
        for r0 in range(0, N, RB):
            rows = r0 + tl.arange(0, RB)
            rm = rows < N
            in_c = _size_class(tl.load(BS + rows, mask=rm, other=64), SPLIT) == c
            m = tl.load(SEL + base + rows[:, None] * N + cols[None, :], mask=(rm & in_c)[:, None] & cm[None, :],
                        other=0)
            m = m.to(tl.int32)
            pos = tl.cumsum(m, 0) - 1 + count[None, :]
            rowv = tl.zeros([RB, BC], tl.int32) + rows[:, None]
            tl.store(K2Q + base + cols[None, :] * N + pos, rowv, mask=m > 0)
            count += tl.sum(m, 0)
        tl.store(K2QN + (bh * N + cols) * 3 + c, count, mask=cm)


# --------------------------------------------------------------------------------------------------------------
# fine stage
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile(X, row0, D: tl.constexpr, BN: tl.constexpr, USE_TMA: tl.constexpr):
    """The `[BN, D]` tile at row `row0` of a `[rows, D]` view: a TMA descriptor of `[BN, D]` boxes, or a pointer."""
    if USE_TMA:
        x = X.load([row0.to(tl.int32), 0])
    else:
        offs = tl.arange(0, BN)
        x = tl.load(X + (row0 + offs)[:, None] * D + tl.arange(0, D)[None, :])
    return x


@triton.jit
def _rows_of(X, bh, N, blk0, rows, rmask, D: tl.constexpr, GB: tl.constexpr):
    """Per-block vectors `X[bh, block, :]` (fp32 `[BH, N, D]`) of the program's rows: `[1, D]` or `[64*GB, D]`."""
    offs_d = tl.arange(0, D)
    if GB == 1:
        x = tl.load(X + (bh * N + blk0) * D + offs_d)[None, :]
    else:
        x = tl.load(X + (bh * N + rows // 64)[:, None] * D + offs_d[None, :], mask=rmask[:, None], other=0.0)
    return x


@triton.jit
def _sizes_of(BS, blk0, rows, rmask, GB: tl.constexpr):
    """Block sizes of the program's rows: a scalar or `[64*GB, 1]` (1 for rows past the end)."""
    if GB == 1:
        bs = tl.load(BS + blk0).to(tl.float32)
    else:
        bs = tl.load(BS + rows // 64, mask=rmask, other=1).to(tl.float32)[:, None]
    return bs


@triton.jit
def _real_rows(BS, blk0, rows, rmask, GB: tl.constexpr):
    """`[64*GB]` bool: the program's rows that are tokens (not pad slots, not past the end)."""
    if GB == 1:
        ok = (rows % 64) < tl.load(BS + blk0)
    else:
        ok = (rows % 64) < tl.load(BS + rows // 64, mask=rmask, other=0)
    return ok & rmask


@triton.jit
def _list_ends(NUM, list_id):
    """Ends of the three size-class groups of list `list_id` (`q2k_num` / `k2q_num` rows of 3)."""
    return tl.load(NUM + list_id * 3), tl.load(NUM + list_id * 3 + 1), tl.load(NUM + list_id * 3 + 2)


@triton.jit
def _fwd_keys(q, m_i, l_i, acc, K, V, idx_ptr, start, end, BS, seq_row, qk_scale,
              D: tl.constexpr, BN: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """Online softmax (base 2) of `q` over the key blocks `idx_ptr[start:end]`, each read as a `[BN, D]` tile."""
    offs_n = tl.arange(0, BN)
    for t in range(start, end):
        kb = tl.load(idx_ptr + t)
        bias = tl.where(offs_n < tl.load(BS + kb), 0.0, float("-inf"))  # pad keys of a partial block
        k = _tile(K, seq_row + kb * 64, D, BN, USE_TMA)
        s = tl.dot(q, tl.trans(k)) * qk_scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V, seq_row + kb * 64, D, BN, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, K32, K16, V, V32, V16, G, OC, OUT, OS, LSE, IDX, NUM, BS, qk_scale, N, maxk,
    D: tl.constexpr, HAS_GATE: tl.constexpr, SAVE_OS: tl.constexpr, USE_TMA: tl.constexpr, GB: tl.constexpr,
):  # fmt: skip
    """grid (cdiv(N, GB), BH): the 64*GB query rows of blocks `blk0 ..` against the key blocks listed for `blk0`
    (online softmax, base 2), one loop per size class. GB > 1 only when those blocks share one list (topk == N):
    each K/V tile fetched from L2 then serves 64*GB rows instead of 64."""
    BM: tl.constexpr = 64 * GB
    blk0 = tl.program_id(0) * GB
    bh = tl.program_id(1).to(tl.int64)
    seq_row = bh * N * 64  # first row of this (batch, head) in the [BH*S, D] view
    list_id = bh * N + blk0
    offs_d = tl.arange(0, D)
    rows = blk0 * 64 + tl.arange(0, BM)
    rmask = rows < N * 64
    tile = (seq_row + rows)[:, None] * D + offs_d[None, :]
    q = tl.load(Q + tile, mask=rmask[:, None], other=0.0)
    idx_ptr = IDX + list_id * maxk
    end64, end32, end16 = _list_ends(NUM, list_id)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    m_i, l_i, acc = _fwd_keys(q, m_i, l_i, acc, K, V, idx_ptr, 0, end64, BS, seq_row, qk_scale, D, 64, USE_TMA)
    m_i, l_i, acc = _fwd_keys(q, m_i, l_i, acc, K32, V32, idx_ptr, end64, end32, BS, seq_row, qk_scale, D, 32,
                              USE_TMA)  # fmt: skip
    m_i, l_i, acc = _fwd_keys(q, m_i, l_i, acc, K16, V16, idx_ptr, end32, end16, BS, seq_row, qk_scale, D, 16,
                              USE_TMA)  # fmt: skip
    real = _real_rows(BS, blk0, rows, rmask, GB)[:, None]
    out_s = tl.where(real, acc / l_i[:, None], 0.0)
    if SAVE_OS:
        tl.store(OS + tile, out_s.to(OS.dtype.element_ty), mask=rmask[:, None])
    oc = _rows_of(OC, bh, N, blk0, rows, rmask, D, GB)
    if HAS_GATE:
        out = out_s + oc * tl.load(G + tile, mask=rmask[:, None], other=0.0).to(tl.float32)
    else:
        out = out_s + oc
    tl.store(OUT + tile, tl.where(real, out, 0.0).to(OUT.dtype.element_ty), mask=rmask[:, None])
    tl.store(LSE + seq_row + rows, m_i + tl.log2(l_i), mask=rmask)


@triton.jit
def _bwd_pre_kernel(OS, DO, G, OC, DELTA, DG, DOC, BS, N, D: tl.constexpr, HAS_GATE: tl.constexpr):
    """grid (N, BH): delta = rowsum(dO * out_s); d_gate = dO * out_c; d_out_c = colsum(dO * gate); dO read as zero
    in pad slots."""
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    seq = bh * N * (64 * D)
    row_id = bh * N + qb
    offs_d = tl.arange(0, D)
    offs_m = tl.arange(0, 64)
    rows = qb * 64 + offs_m
    tile = rows[:, None] * D + offs_d[None, :]
    real = (offs_m < tl.load(BS + qb))[:, None]
    do = tl.load(DO + seq + tile, mask=real, other=0.0).to(tl.float32)
    os = tl.load(OS + seq + tile).to(tl.float32)
    tl.store(DELTA + bh * N * 64 + rows, tl.sum(do * os, 1))
    if HAS_GATE:
        oc = tl.load(OC + row_id * D + offs_d)
        tl.store(DG + seq + tile, (do * oc[None, :]).to(DG.dtype.element_ty))
        doc = tl.sum(do * tl.load(G + seq + tile).to(tl.float32), 0)
    else:
        doc = tl.sum(do, 0)
    tl.store(DOC + row_id * D + offs_d, doc)


@triton.jit
def _dq_keys(q, do, lse, delta, dq, K, V, idx_ptr, start, end, BS, seq_row, qk_scale,
             D: tl.constexpr, BN: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """dQ (unscaled) of `q` over the key blocks `idx_ptr[start:end]`, each read as a `[BN, D]` tile."""
    offs_n = tl.arange(0, BN)
    for t in range(start, end):
        kb = tl.load(idx_ptr + t)
        bias = tl.where(offs_n < tl.load(BS + kb), 0.0, float("-inf"))
        k = _tile(K, seq_row + kb * 64, D, BN, USE_TMA)
        v = _tile(V, seq_row + kb * 64, D, BN, USE_TMA)
        s = tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]
        p = tl.exp2(s + bias[None, :])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, K32, K16, V, V32, V16, DO, LSE, DELTA, DQC, DQ, IDX, NUM, BS, qk_scale, sm_scale, N, maxk,
    D: tl.constexpr, USE_TMA: tl.constexpr, GB: tl.constexpr,
):  # fmt: skip
    """grid (cdiv(N, GB), BH): dQ of query blocks `blk0 ..` over their selected key blocks (one loop per size
    class), plus the coarse term dq_c / bs (`DQC` fp32 `[BH, N, D]`); zero in pad slots."""
    BM: tl.constexpr = 64 * GB
    blk0 = tl.program_id(0) * GB
    bh = tl.program_id(1).to(tl.int64)
    seq_row = bh * N * 64
    list_id = bh * N + blk0
    offs_d = tl.arange(0, D)
    rows = blk0 * 64 + tl.arange(0, BM)
    rmask = rows < N * 64
    real = _real_rows(BS, blk0, rows, rmask, GB)
    tile = (seq_row + rows)[:, None] * D + offs_d[None, :]
    q = tl.load(Q + tile, mask=rmask[:, None], other=0.0)
    do = tl.load(DO + tile, mask=real[:, None], other=0.0)
    lse = tl.load(LSE + seq_row + rows, mask=rmask, other=0.0)
    delta = tl.load(DELTA + seq_row + rows, mask=rmask, other=0.0)
    idx_ptr = IDX + list_id * maxk
    end64, end32, end16 = _list_ends(NUM, list_id)
    dq = tl.zeros([BM, D], tl.float32)
    dq = _dq_keys(q, do, lse, delta, dq, K, V, idx_ptr, 0, end64, BS, seq_row, qk_scale, D, 64, USE_TMA)
    dq = _dq_keys(q, do, lse, delta, dq, K32, V32, idx_ptr, end64, end32, BS, seq_row, qk_scale, D, 32, USE_TMA)
    dq = _dq_keys(q, do, lse, delta, dq, K16, V16, idx_ptr, end32, end16, BS, seq_row, qk_scale, D, 16, USE_TMA)
    coarse = _rows_of(DQC, bh, N, blk0, rows, rmask, D, GB) / _sizes_of(BS, blk0, rows, rmask, GB)
    dq = tl.where(real[:, None], dq * sm_scale + coarse, 0.0)
    tl.store(DQ + tile, dq.to(DQ.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _dkdv_queries(k, v, dk, dv, Q, DO, LSE, DELTA, idx_ptr, start, end, BS, seq_row, qk_scale,
                  D: tl.constexpr, BN: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """dK (unscaled), dV of the program's keys over the query blocks `idx_ptr[start:end]`, each read as a
    `[BN, D]` tile; pad query rows contribute nothing."""
    offs_n = tl.arange(0, BN)
    for t in range(start, end):
        qb = tl.load(idx_ptr + t)
        qrow = seq_row + qb * 64
        q = _tile(Q, qrow, D, BN, USE_TMA)
        do = _tile(DO, qrow, D, BN, USE_TMA)
        lse = tl.load(LSE + qrow + offs_n)
        delta = tl.load(DELTA + qrow + offs_n)
        pt = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        pt = tl.where((offs_n < tl.load(BS + qb))[None, :], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, Q32, Q16, K, V, DO, DO32, DO16, LSE, DELTA, DKC, DVC, DK, DV, K2Q, K2QN, ORDER, BS, qk_scale, sm_scale, N,
    D: tl.constexpr, USE_TMA: tl.constexpr, GB: tl.constexpr, LONGEST_FIRST: tl.constexpr,
):  # fmt: skip
    """grid (cdiv(N, GB), BH): dK, dV of key blocks `blk0 ..` over the query blocks that selected `blk0` (one loop
    per size class; GB > 1 only when all key blocks share that list, i.e. topk == N), plus the coarse terms (`DKC`,
    `DVC` fp32 `[BH, N, D]`, divided by the block sizes here); zero in pad slots. `LONGEST_FIRST`: program `i` of a
    head takes key block `ORDER[bh, i]` (int32 `[BH, N]`, that head's blocks by list length, longest first)."""
    BM: tl.constexpr = 64 * GB
    bh = tl.program_id(1).to(tl.int64)
    if LONGEST_FIRST:
        blk0 = tl.load(ORDER + bh * N + tl.program_id(0))
    else:
        blk0 = tl.program_id(0) * GB
    seq_row = bh * N * 64
    list_id = bh * N + blk0
    offs_d = tl.arange(0, D)
    rows = blk0 * 64 + tl.arange(0, BM)
    rmask = rows < N * 64
    tile = (seq_row + rows)[:, None] * D + offs_d[None, :]
    k = tl.load(K + tile, mask=rmask[:, None], other=0.0)
    v = tl.load(V + tile, mask=rmask[:, None], other=0.0)
    idx_ptr = K2Q + list_id * N
    end64, end32, end16 = _list_ends(K2QN, list_id)
    dk = tl.zeros([BM, D], tl.float32)
    dv = tl.zeros([BM, D], tl.float32)
    dk, dv = _dkdv_queries(k, v, dk, dv, Q, DO, LSE, DELTA, idx_ptr, 0, end64, BS, seq_row, qk_scale, D, 64,
                           USE_TMA)  # fmt: skip
    dk, dv = _dkdv_queries(k, v, dk, dv, Q32, DO32, LSE, DELTA, idx_ptr, end64, end32, BS, seq_row, qk_scale, D,
                           32, USE_TMA)  # fmt: skip
    dk, dv = _dkdv_queries(k, v, dk, dv, Q16, DO16, LSE, DELTA, idx_ptr, end32, end16, BS, seq_row, qk_scale, D,
                           16, USE_TMA)  # fmt: skip
    sizes = _sizes_of(BS, blk0, rows, rmask, GB)
    real = _real_rows(BS, blk0, rows, rmask, GB)[:, None]
    dk = tl.where(real, dk * sm_scale + _rows_of(DKC, bh, N, blk0, rows, rmask, D, GB) / sizes, 0.0)
    dv = tl.where(real, dv + _rows_of(DVC, bh, N, blk0, rows, rmask, D, GB) / sizes, 0.0)
    tl.store(DK + tile, dk.to(DK.dtype.element_ty), mask=rmask[:, None])
    tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=rmask[:, None])


# --------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------


def _dims(x: torch.Tensor) -> tuple[int, int, int]:
    b, h, s, d = x.shape
    return b * h, s // BLOCK, d


def block_means(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[B, H, 64N, D]` x3 -> `[B, H, N, D]` x3 block means (input dtype); block_sizes int32 `[N]`."""
    bh, n, d = _dims(q)
    b, h = q.shape[:2]
    qc, kc, vc = (new_output((b, h, n, d), x) for x in (q, k, v))
    _block_mean_kernel[(n, bh)](q, k, v, qc, kc, vc, block_sizes, n, D=d, num_warps=4)
    return qc, kc, vc


def coarse_select(
    qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, topk: int, scale: float, block_sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse attention and exact top-k on `[B, H, N, D]` block means; `block_sizes` int32 `[N]`.

    Returns `out_c` fp32 `[B,H,N,D]`, `scores` fp32 `[B,H,N,N]`, `sel` uint8 `[B,H,N,N]`,
    `q2k_idx` int32 `[B,H,N,topk]` (grouped by size class, ascending inside a group), `q2k_num` int32
    `[B,H,N,3]` (the group ends; the last is `topk`).
    """
    b, h, n, d = qc.shape
    out_c = new_output((b, h, n, d), qc, torch.float32)
    scores = new_output((b, h, n, n), qc, torch.float32)
    sel = new_output((b, h, n, n), qc, torch.uint8)
    idx = new_output((b, h, n, topk), qc, torch.int32)
    num = new_output((b, h, n, 3), qc, torch.int32)
    npad = max(16, triton.next_power_of_2(n))
    bmc = 16
    rows = max(1, min(bmc, 2048 // npad))
    _coarse_kernel[(triton.cdiv(n, bmc), b * h)](
        qc, kc, vc, out_c, scores, sel, idx, num, block_sizes, n, topk, scale,
        D=d, BMC=bmc, BNC=64, NPAD=npad, R=rows, SPLIT=SIZE_CLASSES, num_warps=4 if npad <= 2048 else 8,
    )  # fmt: skip
    return out_c, scores, sel, idx, num


def build_k2q(sel: torch.Tensor, block_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte mask `[B,H,Nq,Nk]` -> `k2q_idx` int32 `[B,H,Nk,Nq]` (grouped by the query blocks' size class, ascending
    inside a group) and the group ends `k2q_num` int32 `[B,H,Nk,3]` (the last is the list's length)."""
    b, h, n, _ = sel.shape
    k2q = new_output((b, h, n, n), sel, torch.int32)
    k2qn = new_output((b, h, n, 3), sel, torch.int32)
    _k2q_kernel[(triton.cdiv(n, 64), b * h)](sel, k2q, k2qn, block_sizes, n, BC=64, RB=32, SPLIT=SIZE_CLASSES,
                                             num_warps=4)
    return k2q, k2qn


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need sm_90+, 16-byte aligned bases and int32 row offsets."""
    if TensorDescriptor is None:
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        if not tensors[0].is_cuda or torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
            return False
    return all(t.data_ptr() % 16 == 0 and t.numel() // t.shape[-1] < 2**31 for t in tensors)


@functools.cache
def _shared_memory(device: torch.device) -> int | None:
    """Shared memory one program may use on `device` (bytes), if torch reports it."""
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def stages_that_fit(stages: int, shared_memory: int, tile_bytes: int) -> int:
    """`stages`, lowered until a conservative estimate (two pipelined tiles per stage, K and V or Q and dO, plus two
    resident ones) fits in `shared_memory` bytes (at least 1). Triton's own use is lower (it shares buffers across
    the class loops: the H200 forward at 5 stages compiles to ~115 KB), so the cap only guards smaller cards."""
    return max(1, min(stages, (shared_memory - 2 * tile_bytes) // (2 * tile_bytes)))


def _num_stages(cfg: dict[str, int], x: torch.Tensor) -> int:
    """`cfg["num_stages"]` capped by `stages_that_fit` for `[64, D]` tiles of `x` on its card; unchanged where torch
    does not report the shared memory."""
    smem = _shared_memory(x.device) if x.is_cuda else None
    if smem is None:
        return cfg["num_stages"]
    return stages_that_fit(cfg["num_stages"], smem, 64 * x.shape[-1] * x.element_size())


def _check_ends(ends: torch.Tensor, lists: torch.Tensor, name: str) -> None:
    """The kernels read `ends` as int32 rows of 3 (group ends) per list of `lists [B, H, N, L]`: check it on the host
    (a `[B, H, N]` count tensor would be read out of bounds)."""
    if ends.dtype != torch.int32 or ends.shape != (*lists.shape[:3], 3) or not ends.is_contiguous():
        raise ValueError(f"{name} must be contiguous int32 [B, H, N, 3] (ends of the size-class groups) for lists "
                         f"{tuple(lists.shape)}; got {ends.dtype} {tuple(ends.shape)}")


def _grouping(kernel: str, n: int, shared_lists: bool) -> tuple[dict[str, int], int]:
    """(launch config, blocks per program) for `kernel`; grouping needs all lists to be the same."""
    dense = CONFIGS[kernel + "_dense"]
    if shared_lists and n > 1 and dense.get("group", 1) > 1:
        return dense, dense["group"]
    return CONFIGS[kernel], 1


def _operands(cfg: dict[str, int], *tensors: torch.Tensor) -> tuple[bool, list]:
    """The tiles' sources for a kernel, one per tile height of `WIDTHS` for each tensor: `[height, D]`-box
    descriptors over `[rows, D]` views, or the tensor itself three times."""
    use_tma = bool(cfg["tma"]) and _tma_ok(*tensors)
    if not use_tma:
        return False, [t for t in tensors for _ in WIDTHS]
    return True, [TensorDescriptor.from_tensor(t.view(-1, t.shape[-1]), [rows, t.shape[-1]])
                  for t in tensors for rows in WIDTHS]


def sparse_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    out_c: torch.Tensor,
    q2k_idx: torch.Tensor,
    q2k_num: torch.Tensor,
    block_sizes: torch.Tensor,
    scale: float,
    save_out_s: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fine stage + gate epilogue. Returns `out [B,H,S,D]`, `lse` fp32 `[B,H,S]` (base 2, of `s*scale*log2e`),
    `out_s [B,H,S,D]` (empty unless `save_out_s`)."""
    bh, n, d = _dims(q)
    _check_ends(q2k_num, q2k_idx, "q2k_num")
    cfg, gb = _grouping("fwd", n, q2k_idx.shape[-1] == n)
    out = new_output(q.shape, q)
    out_s = new_output(q.shape, q) if save_out_s else q.new_empty(0)
    lse = new_output(q.shape[:3], q, torch.float32)
    use_tma, kv = _operands(cfg, k, v)
    _fwd_kernel[(triton.cdiv(n, gb), bh)](
        q, *kv, gate if gate is not None else q, out_c, out, out_s, lse, q2k_idx, q2k_num, block_sizes,
        scale * LOG2E, n, q2k_idx.shape[-1],
        D=d, HAS_GATE=gate is not None, SAVE_OS=save_out_s, USE_TMA=use_tma, GB=gb,
        num_warps=cfg["num_warps"], num_stages=_num_stages(cfg, q),
    )  # fmt: skip
    return out, lse, out_s


def bwd_preprocess(
    dout: torch.Tensor, out_s: torch.Tensor, gate: torch.Tensor | None, out_c: torch.Tensor, block_sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Returns `delta` fp32 `[B,H,S]`, `d_gate [B,H,S,D]` (None without gate), `d_out_c` fp32 `[B,H,N,D]`."""
    bh, n, d = _dims(dout)
    delta = new_output(dout.shape[:3], dout, torch.float32)
    dgate = new_output(gate.shape, gate) if gate is not None else None
    doc = new_output(out_c.shape, out_c)
    _bwd_pre_kernel[(n, bh)](
        out_s, dout, gate if gate is not None else dout, out_c, delta, dgate if dgate is not None else dout, doc,
        block_sizes, n, D=d, HAS_GATE=gate is not None, num_warps=4,
    )  # fmt: skip
    return delta, dgate, doc


def sparse_bwd_dq(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    dqc: torch.Tensor,
    q2k_idx: torch.Tensor,
    q2k_num: torch.Tensor,
    block_sizes: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """dQ `[B,H,S,D]` of the fine stage plus `dqc / block_size` (`dqc` fp32 `[B,H,N,D]`, the gradient of the
    block means) broadcast to each block's real rows; zero at pad slots."""
    bh, n, d = _dims(q)
    _check_ends(q2k_num, q2k_idx, "q2k_num")
    cfg, gb = _grouping("dq", n, q2k_idx.shape[-1] == n)
    dq = new_output(q.shape, q)
    use_tma, kv = _operands(cfg, k, v)
    _bwd_dq_kernel[(triton.cdiv(n, gb), bh)](
        q, *kv, dout, lse, delta, dqc, dq, q2k_idx, q2k_num, block_sizes, scale * LOG2E, scale, n,
        q2k_idx.shape[-1], D=d, USE_TMA=use_tma, GB=gb, num_warps=cfg["num_warps"], num_stages=_num_stages(cfg, q),
    )  # fmt: skip
    return dq


def sparse_bwd_dkdv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    dkc: torch.Tensor,
    dvc: torch.Tensor,
    k2q_idx: torch.Tensor,
    k2q_num: torch.Tensor,
    block_sizes: torch.Tensor,
    scale: float,
    shared_lists: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV `[B,H,S,D]`: fine stage over k2q lists plus `dkc / block_size`, `dvc / block_size` (zero at pad keys)
    (fp32 `[B,H,N,D]` gradients of the block means). `shared_lists`: every key block has the same list
    (topk == N), so programs take two key blocks."""
    bh, n, d = _dims(q)
    _check_ends(k2q_num, k2q_idx, "k2q_num")
    cfg, gb = _grouping("dkdv", n, shared_lists)
    dk, dv = new_output(k.shape, k), new_output(v.shape, v)
    use_tma, (q64, q32, q16, do64, do32, do16) = _operands(cfg, q, dout)
    # Lists differ in length (popular key blocks are selected by several times topk query blocks): launching the
    # longest first keeps them out of the last wave. Stable, so equal lengths keep their spatial order.
    longest_first = gb == 1 and bool(cfg.get("longest_first", 0))
    order = (torch.sort(k2q_num[..., 2].view(bh, n), dim=-1, descending=True, stable=True).indices.to(torch.int32)
             if longest_first else k2q_num)
    _bwd_dkdv_kernel[(triton.cdiv(n, gb), bh)](
        q64, q32, q16, k, v, do64, do32, do16, lse, delta, dkc, dvc, dk, dv, k2q_idx, k2q_num, order, block_sizes,
        scale * LOG2E, scale, n, D=d, USE_TMA=use_tma, GB=gb, LONGEST_FIRST=longest_first,
        num_warps=cfg["num_warps"], num_stages=_num_stages(cfg, q),
    )  # fmt: skip
    return dk, dv
