"""Sequence-parallel process groups, set up from what `accelerate launch` / `torchrun` start.

Layout (as in FastVideo): the world is a `DeviceMesh` of shape `(dp, sp)` with dims `("dp", "sp")`.
Row-major order makes each sequence-parallel group a block of consecutive ranks and each data-parallel
group strided: world 8, sp 4 -> SP {0..3}, {4..7}; DP {0,4}, {1,5}, {2,6}, {3,7}.

Hybrid (USP, `sp = ulysses x ring`, `ring > 1`): the mesh is `(dp, ring, ulysses)` with dims
`("dp", "ring", "ulysses")` and the SP group is its flattened `("ring", "ulysses")` block ("sp"), so Ulysses
groups are consecutive ranks (inside a node, where the all-to-all rides NVLink) and ring groups are strided
(across nodes). SP rank = `ring_rank * ulysses + ulysses_rank`; world 8, ulysses 2, ring 4 -> Ulysses {0,1},
{2,3}, ...; ring {0,2,4,6}, {1,3,5,7}. With `ring == 1` everything is exactly the plain layout above.

Rank and world size are always read from `torch.distributed` (a plain `PartialState()` under torchrun on
CPU reports a single process). Without a launcher everything works with world size 1 and no process group.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .. import envs

logger = logging.getLogger(__name__)

__all__ = [
    "SINGLE_PROCESS",
    "SequenceParallelGroups",
    "init_sequence_parallel",
    "get_sequence_parallel_groups",
    "set_sequence_parallel_groups",
    "destroy_sequence_parallel",
    "valid_degrees",
    "current_groups",
    "launched_world_size",
    "local_world_size",
    "DEFAULT_TIMEOUT_S",
    "collective_timeout_s",
    "group_timeout_s",
]


class _SingleProcess:
    """Sentinel for a layer's `process_group`: run without any communication, whatever groups are current."""

    def __repr__(self) -> str:
        return "SINGLE_PROCESS"


SINGLE_PROCESS = _SingleProcess()


def valid_degrees(n: int, limit: int | None = None) -> list[int]:
    """Divisors of `n` (optionally only those <= `limit`)."""
    return [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]


@dataclass(frozen=True)
class SequenceParallelGroups:
    """The process groups one rank takes part in.

    `sp_group` is `None` when the sequence-parallel degree is 1 (no communication at all). For hybrid
    sequence parallelism `sp_size == ulysses_size * ring_size`; the Ulysses/ring fields default to pure
    Ulysses (`ulysses_* = sp_*`, `ring_size = 1`).
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
    ulysses_size: int = 0  # 0: same as sp_size (pure Ulysses)
    ulysses_rank: int = 0
    ring_size: int = 1
    ring_rank: int = 0
    ulysses_group: dist.ProcessGroup | None = None
    ring_group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.ulysses_size == 0:  # pure Ulysses over the whole SP group
            object.__setattr__(self, "ulysses_size", self.sp_size // self.ring_size)
            if self.ring_size == 1:
                object.__setattr__(self, "ulysses_rank", self.sp_rank)
                object.__setattr__(self, "ulysses_group", self.sp_group)
        if self.ulysses_size * self.ring_size != self.sp_size:
            raise ValueError(f"ulysses_size {self.ulysses_size} x ring_size {self.ring_size} must equal sp_size "
                             f"{self.sp_size}")

    @property
    def is_distributed(self) -> bool:
        return self.sp_size > 1


_CURRENT: SequenceParallelGroups | None = None
DEFAULT_TIMEOUT_S = float(envs.TIMEOUT.default)  # how long a collective waits for a stalled peer (gloo and NCCL default to 30 min)
_TIMEOUT_S: float | None = None  # the timeout the current groups were created with (for error messages)


def launched_world_size() -> int:
    """Processes of this job: the initialised default group's size, else the launcher's `WORLD_SIZE` (torchrun,
    accelerate), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int | None:
    """Processes per node as the launcher says (`LOCAL_WORLD_SIZE`), or None when it does not."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None


def _timeout(seconds: float | None) -> timedelta:
    """The collective timeout: the argument, else env `DIFFUSERS_DIST_ATTN_TIMEOUT`, else 600 s."""
    value = envs.get_float(envs.TIMEOUT) if seconds is None else float(seconds)
    if not value > 0:
        raise ValueError(f"timeout must be a positive number of seconds; got {value}")
    return timedelta(seconds=value)


def _ensure_process_group(cpu: bool | None, timeout: timedelta) -> None:
    """Initialise the default process group through accelerate when a launcher started us."""
    if dist.is_available() and dist.is_initialized():
        return
    if launched_world_size() <= 1:
        return
    from accelerate import PartialState

    use_cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    # `cpu=True` makes accelerate pick gloo; on GPUs it picks NCCL and sets the local device.
    PartialState(cpu=use_cpu, timeout=timeout)
    if not dist.is_initialized():  # pragma: no cover - depends on accelerate internals
        dist.init_process_group(backend="gloo" if use_cpu else "nccl", timeout=timeout)


def _mesh_options(backend: str, timeout: timedelta):
    """Backend options carrying `timeout` for the mesh's sub-groups, or None where this torch cannot express them."""
    if "backend_override" not in inspect.signature(init_device_mesh).parameters:
        return None  # torch without per-dimension backend options
    if "nccl" in backend.lower():
        cls = getattr(dist, "ProcessGroupNCCL", None)
        factory = None if cls is None else getattr(cls, "Options", None)
    else:
        cls = getattr(dist, "ProcessGroupGloo", None)
        factory = None if cls is None else getattr(cls, "_Options", None) or getattr(cls, "Options", None)
    if factory is None:
        return None
    try:
        options = factory()
        options._timeout = timeout
    except (AttributeError, TypeError, RuntimeError):  # an options class of another shape: use torch's default
        return None
    return options


def _mesh(device_type: str, shape: tuple[int, ...], names: tuple[str, ...], timeout: timedelta) -> DeviceMesh:
    """A device mesh whose sub-groups carry `timeout` (they would otherwise get torch's 10/30-minute default)."""
    options = _mesh_options(str(dist.get_backend()), timeout)
    if options is None:
        # Full-world dimensions still reuse the default group, which has the timeout; smaller ones get torch's
        # default. Say so rather than fail: the groups work, only a stalled peer is detected later.
        logger.warning("this torch cannot pass a timeout to device-mesh sub-groups (no init_device_mesh("
                       "backend_override=...) or backend options); they use torch's default collective timeout")
        return init_device_mesh(device_type, shape, mesh_dim_names=names)
    override = {name: options for name in names}
    return init_device_mesh(device_type, shape, mesh_dim_names=names, backend_override=override)


def _resolve_degrees(sp: int | None, ring: int | None, ulysses: int | None, world: int) -> tuple[int, int, int]:
    """`(sp, ulysses, ring)` from what was given; raises `ValueError` naming the fix."""
    if sp is None and ring is not None and ulysses is not None:
        sp = int(ring) * int(ulysses)
    sp = world if sp is None else int(sp)
    if ring is None and ulysses is None:
        return sp, sp, 1
    ring_v = None if ring is None else int(ring)
    ulysses_v = None if ulysses is None else int(ulysses)
    for name, value in (("ring", ring_v), ("ulysses", ulysses_v)):
        if value is not None and (value < 1 or sp < 1 or (sp % value and (ring_v is None or ulysses_v is None))):
            raise ValueError(f"{name}={value} must be a positive divisor of the sequence-parallel degree sp={sp}; "
                             f"valid values: {valid_degrees(max(sp, 1))} (or let plan_degrees(...) choose)")
    ring_v = sp // ulysses_v if ring_v is None else ring_v
    ulysses_v = sp // ring_v if ulysses_v is None else ulysses_v
    if ring_v * ulysses_v != sp:
        raise ValueError(f"ulysses={ulysses_v} x ring={ring_v} = {ulysses_v * ring_v} must equal the sequence-parallel "
                         f"degree sp={sp}; pass degrees whose product is {sp}, or let plan_degrees(...) choose")
    return sp, ulysses_v, ring_v


def init_sequence_parallel(
    sp: int | None = None, *, ring: int | None = None, ulysses: int | None = None, cpu: bool | None = None,
    timeout: float | None = None,
) -> SequenceParallelGroups:
    """Create (or reuse) the process groups and make them current.

    Args:
        sp: sequence-parallel degree; default the whole world (or `ring * ulysses`). Must divide the world size.
        ring: ring-attention degree (hybrid `sp = ulysses x ring`); default 1, i.e. pure Ulysses.
        ulysses: Ulysses degree; default `sp // ring`. Give either or both (their product must be `sp`).
        cpu: force gloo/CPU (`True`) or NCCL/GPU (`False`); default: CPU when no CUDA device is present.
        timeout: seconds a collective waits for a peer before failing (default env `DIFFUSERS_DIST_ATTN_TIMEOUT`,
            else 600); applies to the groups created here (and to the default group when this call creates it).

    Returns the groups of this rank; layers and model adapters read them via `get_sequence_parallel_groups()`.
    Raises `ValueError` (on every rank, before any collective) when `sp` does not divide the world size or the
    degrees do not multiply to `sp`. `plan_degrees(...)` (`distributed.planner`) proposes degrees.
    """
    global _TIMEOUT_S
    wait = _timeout(timeout)
    _ensure_process_group(cpu, wait)
    _TIMEOUT_S = wait.total_seconds()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    sp, ulysses, ring = _resolve_degrees(sp, ring, ulysses, world)
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
    if ring > 1:
        groups = _hybrid_groups(device_type, device, world, rank, sp, ulysses, ring, wait)
        set_sequence_parallel_groups(groups)
        logger.info("sequence parallel: world %d, sp %d = ulysses %d x ring %d, dp %d, backend %s, rank %d",
                    world, sp, ulysses, ring, world // sp, backend, rank)
        return groups
    mesh = _mesh(device_type, (world // sp, sp), ("dp", "sp"), wait)
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


def _hybrid_groups(
    device_type: str, device: torch.device, world: int, rank: int, sp: int, ulysses: int, ring: int,
    timeout: timedelta,
) -> SequenceParallelGroups:
    """Groups on a `("dp", "ring", "ulysses")` mesh; the SP group is the flattened `("ring", "ulysses")` block."""
    mesh = _mesh(device_type, (world // sp, ring, ulysses), ("dp", "ring", "ulysses"), timeout)
    block = mesh["ring", "ulysses"]
    # the flattened SP group is a new group too: without options it would get torch's default timeout
    options = _mesh_options(str(dist.get_backend()), timeout)
    if options is not None and "backend_override" in inspect.signature(block._flatten).parameters:
        sp_mesh = block._flatten("sp", backend_override=options)
    else:
        sp_mesh = block._flatten("sp")
    return SequenceParallelGroups(
        world_size=world,
        rank=rank,
        sp_size=sp,
        sp_rank=sp_mesh.get_local_rank(),
        dp_size=world // sp,
        dp_rank=mesh.get_local_rank("dp"),
        mesh=mesh,
        sp_group=sp_mesh.get_group(),
        dp_group=mesh.get_group("dp") if world // sp > 1 else None,
        device=device,
        ulysses_size=ulysses,
        ulysses_rank=mesh.get_local_rank("ulysses"),
        ring_size=ring,
        ring_rank=mesh.get_local_rank("ring"),
        ulysses_group=mesh.get_group("ulysses") if ulysses > 1 else None,
        ring_group=mesh.get_group("ring"),
    )


def current_groups() -> SequenceParallelGroups | None:
    """The current groups, or None before `init_sequence_parallel` (builds nothing: callable in traced code)."""
    return _CURRENT


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def get_sequence_parallel_groups() -> SequenceParallelGroups:
    """The current groups; a world-size-1 default when `init_sequence_parallel` was never called."""
    return _CURRENT if _CURRENT is not None else SequenceParallelGroups(device=_default_device())


def set_sequence_parallel_groups(groups: SequenceParallelGroups | None) -> None:
    """Make `groups` current (or reset to the single-process default with `None`)."""
    global _CURRENT
    _CURRENT = groups


def collective_timeout_s() -> float:
    """Seconds a collective of the current groups waits for a peer: what `init_sequence_parallel` used, else the
    env `DIFFUSERS_DIST_ATTN_TIMEOUT` (600 by default; for a process group created elsewhere this is a guess)."""
    if _TIMEOUT_S is not None:
        return _TIMEOUT_S
    try:
        return envs.get_float(envs.TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT_S


def group_timeout_s(group: dist.ProcessGroup | None) -> float:
    """Seconds a collective on `group` waits for a peer (read from its backend; `collective_timeout_s()` when
    this torch does not expose it)."""
    if group is not None:
        try:
            device = torch.device("cuda" if "nccl" in str(dist.get_backend(group)).lower() else "cpu")
            return group._get_backend(device).options._timeout.total_seconds()
        except (AttributeError, RuntimeError, ValueError):  # private API: absent or shaped otherwise
            pass
    return collective_timeout_s()


def destroy_sequence_parallel() -> None:
    """Forget the current groups and destroy the default process group if one exists."""
    global _TIMEOUT_S
    _TIMEOUT_S = None
    set_sequence_parallel_groups(None)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
