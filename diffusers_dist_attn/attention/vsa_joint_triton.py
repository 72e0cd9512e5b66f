"""One Triton kernel for the forward merge of VSA with text keys (see `vsa_joint.py` for the math).

`torch.ops.diffusers_dist_attn.merge_text(out_s, lse2, out_t, lse_t, out_c, gate, block_sizes)` -> `(out, fine, lse)`:
`lse = logaddexp(lse2 ln 2, lse_t)`, `fine = out_s e^(lse2 ln 2 - lse) + out_t e^(lse_t - lse)`,
`out = fine + rep64(out_c) * gate` (gate None: `+ rep64(out_c)`); `out` and `fine` are zero at pad slots (slot
`>= block_sizes[block]`, int32 `[N]`). `out_s, gate [B, H, 64 N, D]` contiguous,
`out_t [B, H, 64 N, D]` and `lse_t [B, H, 64 N]` with any strides (last dim of `out_t` contiguous), `out_c [B, H, N, D]`
fp32. One read of every input and one write of every output, instead of ~10 fp32 passes in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["merge_text"]

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _merge_kernel(
    OS, LSE2, OT, LSET, OC, G, OUT, FINE, LSE, BS, N, H, sot_b, sot_h, sot_s, slt_b, slt_h, slt_s,
    D: tl.constexpr, HAS_GATE: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)  # one 64-row VSA block of one (batch, head)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H  # out_t / lse_t keep their own (batch, head) strides: no copy into [B, H, S, D]
    rows = blk * 64 + tl.arange(0, 64)
    cols = tl.arange(0, D)
    s = bh * N * 64 + rows  # row in the flattened contiguous [B*H*64N] layout
    lse_s = tl.load(LSE2 + s) * LN2
    lse_t = tl.load(LSET + b * slt_b + h * slt_h + rows * slt_s)
    m = tl.maximum(lse_s, lse_t)
    m = tl.where(m == float("-inf"), 0.0, m)
    ws, wt = tl.exp(lse_s - m), tl.exp(lse_t - m)
    total = ws + wt
    lse = m + tl.log(total)
    ws, wt = ws / total, wt / total
    off = s[:, None] * D + cols[None, :]
    fine = tl.load(OS + off).to(tl.float32) * ws[:, None]
    text = tl.load(OT + b * sot_b + h * sot_h + rows[:, None] * sot_s + cols[None, :]).to(tl.float32)
    fine += tl.where(wt[:, None] > 0, text * wt[:, None], 0.0)  # a row without valid text keys: out_t unused
    real = (tl.arange(0, 64) < tl.load(BS + blk))[:, None]  # pad slots: zero
    fine = tl.where(real, fine, 0.0)
    coarse = tl.load(OC + (bh * N + blk) * D + cols)[None, :]
    if HAS_GATE:
        coarse = coarse * tl.load(G + off).to(tl.float32)
    tl.store(LSE + s, lse)
    tl.store(FINE + off, fine.to(FINE.dtype.element_ty))
    tl.store(OUT + off, tl.where(real, fine + coarse, 0.0).to(OUT.dtype.element_ty))


@torch.library.custom_op("diffusers_dist_attn::merge_text", mutates_args=())
def merge_text(out_s: torch.Tensor, lse2: torch.Tensor, out_t: torch.Tensor, lse_t: torch.Tensor,
               out_c: torch.Tensor, gate: torch.Tensor | None,
               block_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See the module docstring."""
    b, h, s, d = out_s.shape
    n = s // 64
    out, fine = torch.empty_like(out_s), torch.empty_like(out_s)
    lse = torch.empty((b, h, s), device=out_s.device, dtype=torch.float32)
    if out_t.stride(-1) != 1:
        out_t = out_t.contiguous()
    _merge_kernel[(n, b * h)](
        out_s, lse2, out_t, lse_t, out_c.contiguous(), gate if gate is not None else out_s, out, fine, lse,
        block_sizes, n, h,
        *out_t.stride()[:3], *lse_t.stride(), D=d, HAS_GATE=gate is not None, num_warps=4,
    )
    return out, fine, lse


@merge_text.register_fake
def _(out_s, lse2, out_t, lse_t, out_c, gate, block_sizes):
    b, h, s, _ = out_s.shape
    return torch.empty_like(out_s), torch.empty_like(out_s), out_s.new_empty((b, h, s), dtype=torch.float32)
