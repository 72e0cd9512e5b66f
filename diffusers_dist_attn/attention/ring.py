"""Ring attention: exact softmax attention over K/V blocks passed peer-to-peer around a ring group.

Rank i of a ring of R holds its queries and K/V block i. At step s it attends to block `(i - s) mod R` while the
next block is already in flight (`batch_isend_irecv` posted before the compute), and merges the partial results
exactly through their log-sum-exp. Only two K/V blocks live at a time, so memory stays O(S/R); the full K/V is
never gathered. The backward passes the blocks around the ring again, together with fp32 dK/dV accumulators that
arrive back at their owner after R steps; each block's gradients use the final output and LSE (as FlashAttention's
backward does), so they sum to the exact gradients.

Replicated extra keys (e.g. HunyuanVideo text, identical on every ring rank) are one more block of every rank's
softmax, attended once and never sent; only that small block carries the key mask, so the video blocks keep the
flash kernel in forward and backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..distributed.collectives import group_rank, group_size
from .backends import attention_backward_with_lse, attention_forward_with_lse, dense_attention_with_lse

__all__ = ["joint_key_mask", "merge_partials", "ring_attention"]

_KV_TAG, _GRAD_TAG = 0, 1


def _exchange(send: torch.Tensor, recv: torch.Tensor, group: dist.ProcessGroup, tag: int) -> list:
    """Post: send `send` to the next ring rank, receive the previous rank's into `recv`; returns the works."""
    rank, world = group_rank(group), group_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world)
    prv = dist.get_global_rank(group, (rank - 1) % world)
    return dist.batch_isend_irecv([
        dist.P2POp(dist.isend, send, nxt, group, tag),
        dist.P2POp(dist.irecv, recv, prv, group, tag),
    ])


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def merge_partials(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Exact merge of two softmax partials: `out [B, S, H, D]`, `lse [B, H, S]` (either may be -inf)."""
    new = torch.logaddexp(lse, lse_b)
    safe = new.masked_fill(torch.isinf(new), 0.0)
    w, w_b = (torch.exp(x - safe).transpose(1, 2)[..., None] for x in (lse, lse_b))
    return out * w + out_b * w_b, new


def joint_key_mask(video_len: int, extra_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Key mask of `[video ; extra]` keys (`[B, S + L]`, True = attend) from the extra keys' mask `[B, L]`, or None
    when every key counts."""
    if extra_mask is None:
        return None
    return torch.cat([extra_mask.new_ones(extra_mask.shape[0], video_len), extra_mask], 1)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, extra_k, extra_v, extra_mask, block_lens, scale, group, backend):
        rank, world = group_rank(group), group_size(group)
        width = max(block_lens)
        kv = F.pad(torch.stack([k, v]), (0, 0, 0, 0, 0, width - k.shape[1])).contiguous()  # [2, B, width, H, D]
        acc = torch.promote_types(q.dtype, torch.float32)  # as numerics.acc: fp64 stays fp64 (gradcheck)
        out = q.new_zeros(q.shape, dtype=acc)
        lse = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc)
        aux_extra = None
        if extra_k is not None and q.shape[1]:  # the extra keys as their own block (only it carries the mask)
            out_b, lse_b, aux_extra = attention_forward_with_lse(q, extra_k, extra_v, scale, extra_mask, backend)
            out, lse = merge_partials(out, lse, out_b.to(acc), lse_b.to(acc))
        auxes = [aux_extra]
        for step in range(world):
            if step + 1 < world:
                incoming = torch.empty_like(kv)
                works = _exchange(kv, incoming, group, _KV_TAG)  # next block in flight during the compute
            length = block_lens[(rank - step) % world]
            aux = None
            if length and q.shape[1]:
                out_b, lse_b, aux = attention_forward_with_lse(q, kv[0, :, :length], kv[1, :, :length], scale, None,
                                                               backend)
                out, lse = merge_partials(out, lse, out_b.to(acc), lse_b.to(acc))
            auxes.append(aux)
            if step + 1 < world:
                _wait(works)
                kv = incoming
        ctx.save_for_backward(q, k, v, extra_k, extra_v, extra_mask, out, lse)
        ctx.block_lens, ctx.scale, ctx.group, ctx.backend, ctx.auxes = block_lens, scale, group, backend, auxes
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, extra_k, extra_v, extra_mask, out, lse = ctx.saved_tensors
        group, block_lens = ctx.group, ctx.block_lens
        rank, world = group_rank(group), group_size(group)
        width = max(block_lens)
        kv = F.pad(torch.stack([k, v]), (0, 0, 0, 0, 0, width - k.shape[1])).contiguous()
        dq = torch.zeros_like(out)
        d_extra_k = d_extra_v = None
        if extra_k is not None:
            d_extra_k, d_extra_v = torch.zeros_like(extra_k), torch.zeros_like(extra_v)
            if q.shape[1]:
                dq_b, dk_b, dv_b = attention_backward_with_lse(dout, q, extra_k, extra_v, out, lse, ctx.scale,
                                                               extra_mask, ctx.backend, ctx.auxes[0])
                dq += dq_b
                d_extra_k, d_extra_v = dk_b.to(extra_k.dtype), dv_b.to(extra_v.dtype)
        grad_works: list = []
        grad_in = dout.new_empty(0)
        for step in range(world):
            if step + 1 < world:
                incoming = torch.empty_like(kv)
                kv_works = _exchange(kv, incoming, group, _KV_TAG)
            length = block_lens[(rank - step) % world]
            dkv = kv.new_zeros(kv.shape, dtype=out.dtype)  # this step's contribution to the held block
            if length and q.shape[1]:
                dq_b, dk_b, dv_b = attention_backward_with_lse(
                    dout, q, kv[0, :, :length], kv[1, :, :length], out, lse, ctx.scale, None, ctx.backend,
                    ctx.auxes[step + 1]
                )
                dq += dq_b
                dkv[0, :, :length], dkv[1, :, :length] = dk_b, dv_b
            if step:  # add what the previous ranks accumulated for this block, then pass it on
                _wait(grad_works)
                dkv += grad_in
            grad_in = torch.empty_like(dkv)
            grad_works = _exchange(dkv, grad_in, group, _GRAD_TAG)
            if step + 1 < world:
                _wait(kv_works)
                kv = incoming
        _wait(grad_works)  # after R steps every accumulator is back at its owner
        own = block_lens[rank]
        dk, dv = grad_in[0, :, :own].to(k.dtype), grad_in[1, :, :own].to(v.dtype)
        return dq.to(q.dtype), dk, dv, d_extra_k, d_extra_v, None, None, None, None, None


@torch.compiler.disable  # point-to-point ops do not trace: a graph break around the ring
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    scale: float | None = None,
    block_lens: Sequence[int] | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Exact attention of this rank's queries over every ring rank's K/V block (+ the extra keys once).

    Args:
        q: `[B, S_q, H, D]` this rank's queries (any length, e.g. its video rows followed by replicated text).
        k, v: `[B, block_lens[rank], H, D]` this rank's key block; the blocks of all ranks form the key sequence.
        group: the ring group (None or size 1: plain attention).
        block_lens: key rows of every ring rank (default: all equal to `k.shape[1]`); 0 is allowed.
        extra_k, extra_v: `[B, L, H, D]` keys identical on every rank (replicated text), attended exactly once.
        extra_mask: bool `[B, L]`, True = attend (padding of the extra keys).
        backend: an LSE row name (`backends.lse_backend`); None = flash kernel on CUDA when it fits, else math.
    Returns:
        `[B, S_q, H, D]` in q's dtype; differentiable in q, k, v, extra_k, extra_v.
    """
    world = group_size(group)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    lens = tuple(int(n) for n in (block_lens if block_lens is not None else [k.shape[1]] * world))
    if len(lens) != world or lens[group_rank(group)] != k.shape[1]:
        raise ValueError(f"block_lens {lens} must have one entry per ring rank ({world}) and this rank's equal to "
                         f"k.shape[1] = {k.shape[1]}")
    if world == 1:
        group = None
    if group is None:  # one block: the same kernels, the extra keys appended
        keys, values, mask = k, v, None
        if extra_k is not None:
            keys, values = torch.cat([k, extra_k], 1), torch.cat([v, extra_v], 1)
            mask = joint_key_mask(k.shape[1], extra_mask)
        return dense_attention_with_lse(q, keys, values, scale, mask, backend=backend)[0]
    return _RingAttention.apply(q, k, v, extra_k, extra_v, extra_mask, lens, scale, group, backend)
