"""One Triton kernel for the VSA tile permutation: a row gather with the head transpose folded in.

`torch.ops.diffusers_dist_attn.permute_rows(x, index, to_tiled)`:
- `to_tiled=True`: `x [B, S, H, D]` (raster order) -> `[B, H, R, D]`, row `r` = `x[:, index[r]]`, zero where
  `index[r] < 0` (pad slots);
- `to_tiled=False`: `x [B, H, R, D]` -> `[B, S, H, D]`, row `s` = `x[:, :, index[s]]`.

One read of every source row and one write of every output row (the PyTorch path is a transpose-gather plus a
fill of the pad rows). The op has a fake kernel so `torch.compile(fullgraph=True)` traces it; autograd lives in
`tiling.py` (each direction's backward is the other direction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["permute_rows"]


@triton.jit
def _permute_rows_kernel(
    X, OUT, IDX, R, H, sxb, sxr, sxh, sob, sor, soh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # one program: BLOCK_R output rows of one (batch, head); rows are D contiguous values on both sides
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    live = r < R
    src = tl.load(IDX + r, mask=live, other=-1)
    ok = (src >= 0)[:, None] & (c < D)[None, :]
    base = b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    x = tl.load(X + base + src.to(tl.int64)[:, None] * sxr + c[None, :], mask=ok, other=0.0)
    out = OUT + b.to(tl.int64) * sob + h.to(tl.int64) * soh + r.to(tl.int64)[:, None] * sor + c[None, :]
    tl.store(out, x, mask=live[:, None] & (c < D)[None, :])


@torch.library.custom_op("diffusers_dist_attn::permute_rows", mutates_args=())
def permute_rows(x: torch.Tensor, index: torch.Tensor, to_tiled: bool) -> torch.Tensor:
    """See the module docstring; `index` int32 `[R]`."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if to_tiled:
        b, _, h, d = x.shape
        r = index.shape[0]
        out = torch.empty((b, h, r, d), device=x.device, dtype=x.dtype)
        sx = (x.stride(0), x.stride(1), x.stride(2))  # batch, row (token), head
        so = (out.stride(0), out.stride(2), out.stride(1))
    else:
        b, h, _, d = x.shape
        r = index.shape[0]
        out = torch.empty((b, r, h, d), device=x.device, dtype=x.dtype)
        sx = (x.stride(0), x.stride(2), x.stride(1))
        so = (out.stride(0), out.stride(1), out.stride(2))
    if out.numel() == 0:
        return out
    block_r = 64 if d <= 128 else 32
    _permute_rows_kernel[(triton.cdiv(r, block_r), b * h)](
        x, out, index, r, h, *sx, *so, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_R=block_r, num_warps=4,
    )
    return out


@permute_rows.register_fake
def _(x, index, to_tiled):
    if to_tiled:
        b, _, h, d = x.shape
        return x.new_empty((b, h, index.shape[0], d))
    b, h, _, d = x.shape
    return x.new_empty((b, index.shape[0], h, d))
