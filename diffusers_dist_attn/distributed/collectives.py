"""Collectives with autograd for sequence parallelism.

All ops take a process group (`None` or a group of size 1 means: no communication, the input is returned
as is). They are built on `torch.distributed._functional_collectives`, so they trace under `torch.compile`
without graph breaks, and their backward is the adjoint of the forward:

| op | forward | backward |
|---|---|---|
| `sequence_to_heads` | `[B, S/P, H, D] -> [B, S, H_r, D]` (all-to-all) | `heads_to_sequence` |
| `heads_to_sequence` | `[B, S, H_r, D] -> [B, S/P, H, D]` (all-to-all) | `sequence_to_heads` |
| `all_gather_heads` | `[B, L, H_r, D] -> [B, L, H, D]` | reduce-scatter (sum) |
| `broadcast_from_first` | group rank 0's tensor on every rank | sum of the grads to rank 0 |
| `gather_sequence` | all-gather along `dim`, trim to the original length | reduce-scatter (sum) |
| `shard_sequence` | zero-pad to a multiple of P, keep chunk r | all-gather, divide by P |

`H_r = H/P` when P divides H; otherwise the heads are split unevenly (`head_split`: 12 over 8 ranks is
2,2,2,2,1,1,1,1) and the all-to-alls carry split sizes, which gloo and NCCL both support.

Gradient convention (FastVideo's): every SP rank computes the same loss from gathered outputs, so each rank
ends with P x its partial parameter gradients; averaging gradients over the SP group (what DDP over the whole
world does) gives the single-process gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

# torch >= 2.13 renamed the all-gathers (`*_tensor` -> `*_single`); take whichever this torch has.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_all_gather_autograd_op = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def _needs_autograd(x: torch.Tensor) -> bool:
    # The autograd variants have no kernel under `torch.inference_mode()` (NotImplementedError on CUDA), and the
    # plain ones are cheaper whenever no gradient can flow.
    return torch.is_grad_enabled() and x.requires_grad


def _all_to_all(x: torch.Tensor, output_splits, input_splits, group) -> torch.Tensor:
    op = funcol.all_to_all_single_autograd if _needs_autograd(x) else funcol.all_to_all_single
    return _waited(op(x, output_splits, input_splits, group))


def _all_gather_autograd(x: torch.Tensor, gather_dim: int, group) -> torch.Tensor:
    op = _all_gather_autograd_op if _needs_autograd(x) else _all_gather
    return _waited(op(x, gather_dim=gather_dim, group=group))

__all__ = [
    "group_size",
    "group_rank",
    "sequence_to_heads",
    "heads_to_sequence",
    "all_gather_heads",
    "shard_sequence",
    "gather_sequence",
    "padded_length",
    "head_split",
    "head_offset",
    "broadcast_from_first",
]


class _Wait(torch.autograd.Function):
    """Identity whose forward waits for an async functional collective and returns a plain tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.trigger_wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _waited(x: torch.Tensor) -> torch.Tensor:
    """Complete an async functional collective before its result leaves this module (a plain tensor).

    funcol returns an `AsyncCollectiveTensor` that waits on its first *compute* op; views (an all-gather whose
    leading dims are 1, then `narrow`) and `torch.save` would read it before the data has arrived.
    """
    return _Wait.apply(x) if isinstance(x, funcol.AsyncCollectiveTensor) else x


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def padded_length(length: int, world: int) -> int:
    """Smallest multiple of `world` that is >= `length`."""
    return -(-length // world) * world


def head_split(num_heads: int, world: int) -> list[int]:
    """Heads per rank for Ulysses: `num_heads // world`, the first `num_heads % world` ranks one more.

    12 heads over 8 ranks -> `[2, 2, 2, 2, 1, 1, 1, 1]`. Every rank needs at least one head.
    """
    if num_heads < world:
        raise ValueError(f"{num_heads} attention heads cannot be split over a Ulysses degree of {world}: "
                         "every rank needs at least one head")
    base, extra = divmod(num_heads, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def head_offset(num_heads: int, world: int, rank: int) -> int:
    """First global head of `rank` under `head_split`."""
    return sum(head_split(num_heads, world)[:rank])


def sequence_to_heads(x: torch.Tensor | Sequence[torch.Tensor], group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-to-all `[B, S_loc, H, D] -> [B, P*S_loc, H_r, D]`: scatter heads, gather the sequence.

    Rank r receives heads `head_split(H, P)[r]` (contiguous, in global order; `H/P` when P divides H) of every
    rank's sequence shard, concatenated in rank order. Uneven head counts use split sizes (backward too).
    A list of tensors (q, k, v and the VSA gate, each `[B, S_loc, H, D]`) moves in one collective: each is
    written once, permuted, into the send buffer, and the result is their concatenation along the batch dim.
    """
    world = group_size(group)
    tensors = [x] if isinstance(x, torch.Tensor) else list(x)
    first = tensors[0] if tensors else None
    if first is None or any(t.shape != first.shape or t.dtype != first.dtype or t.ndim != 4 for t in tensors):
        raise ValueError("sequence_to_heads takes one [B, S_loc, H, D] tensor or a non-empty list of them with one "
                         f"shape and dtype; got {[(tuple(t.shape), t.dtype) for t in tensors]}")
    if world == 1:
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)
    b_one, s_loc, h, d = tensors[0].shape
    b = b_one * len(tensors)
    splits = head_split(h, world)
    h_me = splits[group_rank(group)]
    if len(tensors) == 1:
        send = first.permute(2, 1, 0, 3).contiguous()
    else:
        send = tensors[0].new_empty(h, s_loc, b, d)  # [H, S_loc, n*B, D]: heads of rank j are contiguous
        for i, t in enumerate(tensors):
            send[:, :, i * b_one:(i + 1) * b_one] = t.permute(2, 1, 0, 3)
    unit = s_loc * b * d
    even = h % world == 0
    recv = _all_to_all(
        send.flatten(), None if even else [h_me * unit] * world, None if even else [n * unit for n in splits], group
    )
    recv = recv.reshape(world, h_me, s_loc, b, d)  # chunk j from rank j
    return recv.permute(3, 0, 2, 1, 4).reshape(b, world * s_loc, h_me, d)


def heads_to_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None, num_heads: int | None = None
) -> torch.Tensor:
    """All-to-all `[B, S, H_r, D] -> [B, S/P, H, D]`: scatter the sequence, gather heads (global head order).

    `num_heads`: the total H when the heads are split unevenly (`head_split`); default `P * H_r`.
    """
    world = group_size(group)
    if world == 1:
        return x
    b, s, h_me, d = x.shape
    s_loc = s // world
    splits = head_split(world * h_me if num_heads is None else num_heads, world)
    if splits[group_rank(group)] != h_me:
        raise ValueError(f"rank {group_rank(group)} holds {h_me} heads but the split of {num_heads} is {splits}")
    send = x.reshape(b, world, s_loc, h_me, d).permute(1, 3, 2, 0, 4).contiguous().flatten()  # [P, H_r, S_loc, B, D]
    unit = s_loc * b * d
    even = len(set(splits)) == 1
    recv = _all_to_all(
        send, None if even else [n * unit for n in splits], None if even else [h_me * unit] * world, group
    )
    recv = recv.reshape(sum(splits), s_loc, b, d)  # heads in global order
    return recv.permute(2, 1, 0, 3)


def all_gather_heads(x: torch.Tensor, group: dist.ProcessGroup | None, num_heads: int | None = None) -> torch.Tensor:
    """`[B, L, H_r, D] -> [B, L, H, D]`, identical on every rank; backward reduce-scatters (sum).

    `num_heads`: the total H when the heads are split unevenly; then the gather is one all-to-all with split
    sizes (gloo cannot all-gather unequal sizes).
    """
    world = group_size(group)
    if world == 1:
        return x
    if num_heads is None or num_heads == world * x.shape[2]:
        return (_all_gather_autograd(x.contiguous(), gather_dim=2, group=group))
    b, length, h_me, d = x.shape
    splits = head_split(num_heads, world)
    unit = length * b * d
    send = x.permute(2, 1, 0, 3).reshape(1, -1).expand(world, -1).flatten()  # my heads, once per peer
    recv = _all_to_all(send, [n * unit for n in splits], [h_me * unit] * world, group)
    return recv.reshape(num_heads, length, b, d).permute(2, 1, 0, 3)


class _BroadcastFromFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = x.detach().clone().contiguous()
        dist.broadcast(out, group=group, group_src=0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return (grad if group_rank(ctx.group) == 0 else torch.zeros_like(grad)), None


def broadcast_from_first(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Group rank 0's `x` on every rank (other ranks pass any tensor of the same shape and dtype).

    Backward: rank 0 receives the sum of every rank's gradient, the others zero (the adjoint). Makes a value
    computed once (on rank 0) bitwise identical on all ranks.
    """
    if group_size(group) == 1:
        return x
    return _BroadcastFromFirst.apply(x, group)


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
    dim = dim % x.ndim
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
    full = (_all_gather_autograd(x.contiguous(), gather_dim=dim, group=group))
    return full if original_length is None else full.narrow(dim, 0, original_length)
