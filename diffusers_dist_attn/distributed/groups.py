"""Sequence-parallel process groups, set up from what `accelerate launch` / `torchrun` start.

Layout (as in FastVideo): the world is a `DeviceMesh` of shape `(dp, sp)` with dims `("dp", "sp")`.
Row-major order makes each sequence-parallel group a block of consecutive ranks and each data-parallel
group strided: world 8, sp 4 -> SP {0..3}, {4..7}; DP {0,4}, {1,5}, {2,6}, {3,7}.

Rank and world size are always read from `torch.distributed` (a plain `PartialState()` under torchrun on
CPU reports a single process). Without a launcher everything works with world size 1 and no process group.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

logger = logging.getLogger(__name__)

__all__ = [
    "SequenceParallelGroups",
    "init_sequence_parallel",
    "get_sequence_parallel_groups",
    "set_sequence_parallel_groups",
    "destroy_sequence_parallel",
    "valid_degrees",
]


def valid_degrees(n: int, limit: int | None = None) -> list[int]:
    """Divisors of `n` (optionally only those <= `limit`)."""
    return [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]


@dataclass(frozen=True)
class SequenceParallelGroups:
    """The process groups one rank takes part in.

    `sp_group` is `None` when the sequence-parallel degree is 1 (no communication at all).
    """

    world_size: int = 1
    rank: int = 0
    sp_size: int = 1
    sp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    mesh: DeviceMesh | None = None
    sp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.sp_size > 1


_CURRENT: SequenceParallelGroups | None = None


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _ensure_process_group(cpu: bool | None) -> None:
    """Initialise the default process group through accelerate when a launcher started us."""
    if dist.is_available() and dist.is_initialized():
        return
    if _launched_world_size() <= 1:
        return
    from accelerate import PartialState

    use_cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    # `cpu=True` makes accelerate pick gloo; on GPUs it picks NCCL and sets the local device.
    PartialState(cpu=use_cpu)
    if not dist.is_initialized():  # pragma: no cover - depends on accelerate internals
        dist.init_process_group(backend="gloo" if use_cpu else "nccl")


def init_sequence_parallel(sp: int | None = None, *, cpu: bool | None = None) -> SequenceParallelGroups:
    """Create (or reuse) the process groups and make them current.

    Args:
        sp: sequence-parallel degree; default the whole world. Must divide the world size.
        cpu: force gloo/CPU (`True`) or NCCL/GPU (`False`); default: CPU when no CUDA device is present.

    Returns the groups of this rank; layers and model adapters read them via `get_sequence_parallel_groups()`.
    Raises `ValueError` (on every rank, before any collective) when `sp` does not divide the world size.
    """
    _ensure_process_group(cpu)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    sp = world if sp is None else int(sp)
    if sp < 1 or world % sp != 0:
        hint = "" if world > 1 else " (this is a single process: start it with `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N`)"
        raise ValueError(
            f"sp={sp} must be a positive divisor of the world size {world}; valid values: {valid_degrees(world)}{hint}."
        )
    if world == 1:
        groups = SequenceParallelGroups(device=_default_device())
        set_sequence_parallel_groups(groups)
        return groups

    backend = dist.get_backend()
    device_type = "cuda" if "nccl" in str(backend) and torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    mesh = init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
    groups = SequenceParallelGroups(
        world_size=world,
        rank=rank,
        sp_size=sp,
        sp_rank=mesh.get_local_rank("sp"),
        dp_size=world // sp,
        dp_rank=mesh.get_local_rank("dp"),
        mesh=mesh,
        sp_group=mesh.get_group("sp") if sp > 1 else None,
        dp_group=mesh.get_group("dp") if world // sp > 1 else None,
        device=device,
    )
    set_sequence_parallel_groups(groups)
    logger.info("sequence parallel: world %d, sp %d, dp %d, backend %s, rank %d", world, sp, world // sp, backend, rank)
    return groups


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def get_sequence_parallel_groups() -> SequenceParallelGroups:
    """The current groups; a world-size-1 default when `init_sequence_parallel` was never called."""
    return _CURRENT if _CURRENT is not None else SequenceParallelGroups(device=_default_device())


def set_sequence_parallel_groups(groups: SequenceParallelGroups | None) -> None:
    """Make `groups` current (or reset to the single-process default with `None`)."""
    global _CURRENT
    _CURRENT = groups


def destroy_sequence_parallel() -> None:
    """Forget the current groups and destroy the default process group if one exists."""
    set_sequence_parallel_groups(None)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
