"""Collectives with autograd for sequence parallelism.

All ops take a process group (`None` or a group of size 1 means: no communication, the input is returned
as is). They are built on `torch.distributed._functional_collectives`, so they trace under `torch.compile`
without graph breaks, and their backward is the adjoint of the forward:

| op | forward | backward |
|---|---|---|
| `sequence_to_heads` | `[B, S/P, H, D] -> [B, S, H/P, D]` (all-to-all) | `heads_to_sequence` |
| `heads_to_sequence` | `[B, S, H/P, D] -> [B, S/P, H, D]` (all-to-all) | `sequence_to_heads` |
| `all_gather_heads` | `[B, L, H/P, D] -> [B, L, H, D]` | reduce-scatter (sum) |
| `gather_sequence` | all-gather along `dim`, trim to the original length | reduce-scatter (sum) |
| `shard_sequence` | zero-pad to a multiple of P, keep chunk r | all-gather, divide by P |

Gradient convention (FastVideo's): every SP rank computes the same loss from gathered outputs, so each rank
ends with P x its partial parameter gradients; averaging gradients over the SP group (what DDP over the whole
world does) gives the single-process gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

# torch >= 2.13 renamed the all-gathers (`*_tensor` -> `*_single`); take whichever this torch has.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd

__all__ = [
    "group_size",
    "group_rank",
    "sequence_to_heads",
    "heads_to_sequence",
    "all_gather_heads",
    "shard_sequence",
    "gather_sequence",
    "padded_length",
]


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def padded_length(length: int, world: int) -> int:
    """Smallest multiple of `world` that is >= `length`."""
    return -(-length // world) * world


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-to-all `[B, S_loc, H, D] -> [B, P*S_loc, H/P, D]`: scatter heads, gather the sequence.

    Rank r receives heads `[r*H/P, (r+1)*H/P)` of every rank's sequence shard, concatenated in rank order.
    Callers stack q, k, v (and the VSA gate) along the batch dim so one collective moves all of them.
    """
    world = group_size(group)
    if world == 1:
        return x
    b, s_loc, h, d = x.shape
    send = x.reshape(b, s_loc, world, h // world, d).permute(2, 1, 0, 3, 4).contiguous()  # [P, S_loc, B, H/P, D]
    recv = funcol.all_to_all_single_autograd(send.flatten(0, 1), None, None, group)  # chunk j from rank j
    recv = recv.reshape(world, s_loc, b, h // world, d)
    return recv.permute(2, 0, 1, 3, 4).reshape(b, world * s_loc, h // world, d)


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-to-all `[B, S, H/P, D] -> [B, S/P, H, D]`: scatter the sequence, gather heads (global head order)."""
    world = group_size(group)
    if world == 1:
        return x
    b, s, h_loc, d = x.shape
    s_loc = s // world
    send = x.reshape(b, world, s_loc, h_loc, d).permute(1, 2, 0, 3, 4).contiguous()  # [P, S_loc, B, H/P, D]
    recv = funcol.all_to_all_single_autograd(send.flatten(0, 1), None, None, group)  # chunk j: heads of rank j
    recv = recv.reshape(world, s_loc, b, h_loc, d)
    return recv.permute(2, 1, 0, 3, 4).reshape(b, s_loc, world * h_loc, d)


def all_gather_heads(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`[B, L, H/P, D] -> [B, L, H, D]`, identical on every rank; backward reduce-scatters (sum)."""
    if group_size(group) == 1:
        return x
    return _all_gather_autograd(x.contiguous(), gather_dim=2, group=group)


class _ShardSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        world, rank = group_size(group), group_rank(group)
        length = x.shape[dim]
        pad = padded_length(length, world) - length
        if pad:
            pad_spec = [0, 0] * (x.ndim - 1 - dim) + [0, pad]
            x = F.pad(x, pad_spec)
        ctx.dim, ctx.group, ctx.length = dim, group, length
        return x.chunk(world, dim=dim)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = group_size(ctx.group)
        full = _all_gather(grad.contiguous(), gather_dim=ctx.dim, group=ctx.group)
        full = full.narrow(ctx.dim, 0, ctx.length) / world
        return full, None, None


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> tuple[torch.Tensor, int]:
    """Zero-pad `x` along `dim` to a multiple of P and keep this rank's chunk.

    Returns `(x_local, original_length)`; `x_local.shape[dim] == ceil(length / P)`.
    """
    length = x.shape[dim]
    if group_size(group) == 1:
        return x, length
    return _ShardSequence.apply(x, dim, group), length


def gather_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1, original_length: int | None = None
) -> torch.Tensor:
    """All-gather the shards along `dim` (rank order) and trim to `original_length`."""
    if group_size(group) == 1:
        return x if original_length is None else x.narrow(dim, 0, original_length)
    full = _all_gather_autograd(x.contiguous(), gather_dim=dim, group=group)
    return full if original_length is None else full.narrow(dim, 0, original_length)
