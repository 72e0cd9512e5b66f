"""Plain PyTorch Video Sparse Attention: the ground truth for the Triton and CUDA kernels.

All functions work on tiled tensors `[B, H, S_t, D]` with `S_t = 64 * N` (see `tiling.py`): block `j` holds
`block_sizes[j]` real tokens followed by zero padding. Pad slots are not tokens: the block means leave them out,
VSA's output is zero there, so no gradient flows from them (a finite `dout` there is ignored) and inputs there get
none. Computation is in fp32; outputs are cast back.
"""

from __future__ import annotations

import torch

from ..numerics import acc as _acc
from .tiling import BLOCK

__all__ = [
    "real_slots",
    "block_mean",
    "coarse_attention",
    "topk_block_indices",
    "block_sparse_attention_reference",
    "vsa_tiled_reference",
]


def real_slots(block_sizes: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """bool `[64 N]`: True at the slots that hold tokens."""
    sizes = block_sizes.to(device) if device is not None else block_sizes
    return (torch.arange(BLOCK, device=sizes.device) < sizes[:, None]).reshape(-1)


def block_mean(x: torch.Tensor, block_sizes: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens of each 64-slot block: `[B, H, 64*N, D] -> [B, H, N, D]` (sums in fp32, or fp64 for
    fp64 inputs; the result in x's dtype, as the kernels store it)."""
    b, h, s, d = x.shape
    real = real_slots(block_sizes, x.device).view(s // BLOCK, BLOCK, 1)
    sums = x.reshape(b, h, s // BLOCK, BLOCK, d).masked_fill(~real, 0).sum(3, dtype=torch.promote_types(x.dtype, torch.float32))
    return (sums / block_sizes.to(sums.device, sums.dtype)[:, None]).to(x.dtype)


def coarse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_sizes: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention between block means.

    Returns `out_c [B, H, N, D]` (input dtype) and the pre-softmax `scores [B, H, N, N]` (fp32).
    """
    qc, kc, vc = (_acc(block_mean(t, block_sizes)) for t in (q, k, v))
    scores = (qc @ kc.transpose(-1, -2)) * scale
    return (scores.softmax(-1) @ vc).to(q.dtype), scores


def topk_block_indices(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """The `topk` key blocks with the largest scores per query block: long `[B, H, N_q, topk]`."""
    return torch.topk(scores.detach(), topk, dim=-1, sorted=True).indices


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_sizes: torch.Tensor,
    scale: float,
    *,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    query_blocks_per_chunk: int = 64,
) -> torch.Tensor:
    """Each query block attends to the real tokens of its selected key blocks (plus optional extra keys).

    Args:
        q, k, v: `[B, H, 64*N, D]`.
        block_index: long `[B, H, N, K]` selected key blocks per query block.
        block_sizes: int `[N]` real tokens per key block; slots at or past it are never attended.
        extra_k, extra_v: `[B, H, L, D]` keys every query also attends to in the same softmax (e.g. text).
        extra_mask: bool `[B, L]`, True where an extra key is valid.
    Returns:
        `[B, H, 64*N, D]` in q's dtype; memory is bounded by chunking over query blocks.
    """
    b, h, s, d = q.shape
    n = s // BLOCK
    kk = block_index.shape[-1]
    qb, kb, vb = (_acc(t).reshape(b * h, n, BLOCK, d) for t in (q, k, v))
    idx = block_index.reshape(b * h, n, kk)
    rows = torch.arange(b * h, device=q.device)[:, None, None]
    slot = torch.arange(BLOCK, device=q.device)
    sizes = block_sizes.to(q.device).long()
    if extra_k is not None:
        ek, ev = _acc(extra_k).reshape(b * h, -1, d), _acc(extra_v).reshape(b * h, -1, d)
        emask = None if extra_mask is None else extra_mask.repeat_interleave(h, 0)  # [B*H, L]
    out = []
    for start in range(0, n, query_blocks_per_chunk):
        sel = idx[:, start : start + query_blocks_per_chunk]  # [BH, c, K]
        k_sel, v_sel = kb[rows, sel], vb[rows, sel]  # [BH, c, K, 64, D]
        valid = slot < sizes[sel][..., None]  # [BH, c, K, 64]
        qc = qb[:, start : start + query_blocks_per_chunk]  # [BH, c, 64, D]
        logits = torch.einsum("bcqd,bckjd->bcqkj", qc, k_sel) * scale
        logits = logits.masked_fill(~valid[:, :, None], float("-inf")).flatten(-2)  # [BH, c, 64, K*64]
        values = v_sel.flatten(2, 3)  # [BH, c, K*64, D]
        if extra_k is not None:
            extra_logits = torch.einsum("bcqd,bld->bcql", qc, ek) * scale
            if emask is not None:
                extra_logits = extra_logits.masked_fill(~emask[:, None, None, :], float("-inf"))
            logits = torch.cat([logits, extra_logits], -1)
            values = torch.cat([values, ev[:, None].expand(-1, values.shape[1], -1, -1)], 2)
        out.append(logits.softmax(-1) @ values)
    return torch.cat(out, 1).reshape(b, h, s, d).to(q.dtype)


def vsa_tiled_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    block_sizes: torch.Tensor,
    topk: int,
    scale: float | None = None,
    *,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Video Sparse Attention on tiled tensors `[B, H, 64*N, D]`.

    `out = rep64(softmax(q_c k_c^T * scale) v_c) * gate + block_sparse(q, k, v; top-k of the coarse scores)`
    (`+` instead of `* gate +` when `gate` is None) at real slots, zero at pad slots. Differentiable in q, k, v,
    gate (selection is not).
    """
    b, h, s, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out_c, scores = coarse_attention(q, k, v, block_sizes, scale)
    index = topk_block_indices(scores, topk)
    out_s = block_sparse_attention_reference(
        q, k, v, index, block_sizes, scale, extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask
    )
    out_c = out_c[:, :, :, None, :].expand(b, h, s // BLOCK, BLOCK, d).reshape(b, h, s, d)
    out = (out_c if gate is None else out_c * gate) + out_s
    return out * real_slots(block_sizes, out.device)[:, None]
