"""Cross-rank agreement: ranks that disagree are bad input, reported on every rank before any data moves.

Every communicating call first runs `agree(group, fields, where=...)`: each rank hashes what must match across
the group (shapes after padding, sequence lengths, grid, sparsity, presence of optional inputs, ...) together
with its own validation error, if any, and one all-gather of two int64 per rank compares them. When everything
matches nothing else happens. When not, a second (object) all-gather brings every rank's values, and every rank
raises the same `ValueError` naming each differing field with each rank's value, or the validation error of the
ranks that had one. So a rank whose input is bad, or a rank whose input differs, never leaves its peers waiting in
an all-to-all.

`peer_failures(group)` turns a failed or timed-out collective (a peer raised, exited or stalled) into a
`PeerFailureError` that says so; groups created by `init_sequence_parallel` carry a timeout
(`init_sequence_parallel(timeout=...)`, else `DIFFUSERS_DIST_ATTN_TIMEOUT`, default 600 s), so a stalled peer ends
in bounded time. Errors that are not a collective's (out of memory, a kernel error on this rank) pass unchanged:
they are this rank's own failure, not a peer's.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .. import envs
from .groups import group_timeout_s

__all__ = [
    "PeerFailureError",
    "RankDisagreementError",
    "agree",
    "agreement_enabled",
    "enter_checked_region",
    "exit_checked_region",
    "fingerprint",
    "layer_check_needed",
    "peer_failures",
    "tensor_checksums",
]


class PeerFailureError(RuntimeError):
    """A collective failed because a peer rank raised, exited or stalled past the group's timeout."""


class RankDisagreementError(ValueError):
    """The ranks passed different values for arguments that must match (not a bad input on some rank)."""


def agreement_enabled() -> bool:
    """False when `DIFFUSERS_DIST_ATTN_CHECK_RANKS=0` or while torch.compile traces (a host sync cannot trace)."""
    return not torch.compiler.is_compiling() and envs.get_bool(envs.CHECK_RANKS)


def fingerprint(fields: Mapping[str, Any]) -> int:
    """A process-independent signed 63-bit hash of `fields` (names and `repr` of values)."""
    text = repr(sorted((str(k), repr(v)) for k, v in fields.items()))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _device(group: dist.ProcessGroup) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# torch >= 2.13 renamed `all_gather_into_tensor` (now deprecated, with a warning) to `all_gather_single`.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _timeout_hint(group: dist.ProcessGroup | None) -> str:
    return (f"a peer rank of the sequence-parallel group failed, exited or stalled (collectives wait at most "
            f"{group_timeout_s(group):g} s: init_sequence_parallel(timeout=...) or env {envs.TIMEOUT.name}); "
            "the first error is in that rank's log")


# What gloo / NCCL / the c10d store put in the message of a failed collective (timeouts, closed connections).
_COLLECTIVE_MARKERS = ("gloo", "nccl", "c10d", "connection", "timed out", "timeout", "socket", "broken pipe",
                       "process group", "processgroup", "watchdog")


def _is_collective_failure(exc: RuntimeError) -> bool:
    """Whether `exc` came from a collective (a peer's fault) rather than from this rank's own work."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):  # a local failure, whatever its message says
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _COLLECTIVE_MARKERS)


@contextlib.contextmanager
def peer_failures(group: dist.ProcessGroup | None, where: str) -> Iterator[None]:
    """Re-raise a collective's failure inside the block as `PeerFailureError` naming `where`.

    Other errors (bad input, out of memory, a failing kernel on this rank) pass unchanged: calling them a peer's
    failure would send the reader to the wrong rank's log.
    """
    try:
        yield
    except (ValueError, TypeError, PeerFailureError):
        raise
    except RuntimeError as exc:  # gloo / NCCL errors, incl. timeouts and connection resets
        if group is None or not dist.is_initialized() or not _is_collective_failure(exc):
            raise
        raise PeerFailureError(f"{where}: {_timeout_hint(group)} ({type(exc).__name__}: {exc})") from exc


def agree(group: dist.ProcessGroup | None, fields: Mapping[str, Any], *, where: str,
          error: str | None = None) -> None:
    """Raise the same `ValueError` on every rank of `group` unless all ranks pass equal `fields` and no `error`.

    Args:
        group: the process group (None or size 1: only the local `error` is raised).
        fields: name -> value (ints, floats, tuples, strings, None, dtypes: anything with a stable `repr`).
        where: what is being called, for the message (e.g. "DistributedAttention").
        error: this rank's own validation error message, if its input is bad.
    """
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        if error is not None:
            raise ValueError(error)
        return
    mine = torch.tensor([int(error is not None), fingerprint(fields)], dtype=torch.int64, device=_device(group))
    gathered = torch.empty(world * 2, dtype=torch.int64, device=mine.device)
    with peer_failures(group, where):
        _all_gather_single(gathered, mine, group=group)
        rows = gathered.view(world, 2).tolist()
        if not any(flag for flag, _ in rows) and len({h for _, h in rows}) == 1:
            return
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, (dict(fields), error), group=group)
    raise _disagreement_error(where, everyone)


def _disagreement_error(where: str, everyone: list[tuple[dict[str, Any], str | None]]) -> ValueError:
    raw = [err for _, err in everyone]
    if all(err is not None for err in raw) and len(set(raw)) == 1:
        return ValueError(raw[0])  # the same bad input on every rank: the plain message
    errors = [f"rank {r}: {err}" for r, err in enumerate(raw) if err is not None]
    if errors:
        return ValueError(f"{where}: bad input on {len(errors)} of {len(everyone)} ranks; " + "; ".join(errors))
    names = sorted({k for fields, _ in everyone for k in fields})
    diffs = []
    for name in names:
        values = [fields.get(name, "<missing>") for fields, _ in everyone]
        if len({repr(v) for v in values}) > 1:
            diffs.append(f"{name} differs: " + ", ".join(f"rank {r}={v!r}" for r, v in enumerate(values)))
    return RankDisagreementError(
        f"{where}: the ranks of the sequence-parallel group must call it with matching arguments, but "
        + "; ".join(diffs) + ". Pass the same inputs (same seed, shapes and settings) on every rank")


def _checksum_terms(t: torch.Tensor) -> torch.Tensor:
    x = t.detach().flatten().double()
    weights = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64).remainder_(9973)
    return torch.stack([x.sum(), (x * x).sum(), (x * weights).sum()])


def tensor_checksums(tensors: list[torch.Tensor]) -> list[tuple[float, float, float]]:
    """A cheap value fingerprint of each tensor: (sum, sum of squares, position-weighted sum), in fp64, with one
    host sync per device for all of them.

    Two tensors that differ in any element almost surely differ in one of the three; used to detect inputs that
    must be identical across ranks (latents, timestep, text embeddings).
    """
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    sums: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(tensors)
    for indices in by_device.values():
        values = torch.stack([_checksum_terms(tensors[i]) for i in indices]).tolist()
        for i, row in zip(indices, values, strict=True):
            sums[i] = tuple(row)
    return sums


# A caller that checked agreement for a whole transformer forward (the sharding hook of `parallelize`) marks the
# region, so the layers inside skip their own per-call check (one collective per forward instead of per layer).
_CHECKED_REGIONS = 0


def enter_checked_region() -> None:
    """Mark the start of a region (e.g. one transformer forward) whose agreement was already checked."""
    global _CHECKED_REGIONS
    _CHECKED_REGIONS += 1


def exit_checked_region() -> None:
    """Mark the end of a region entered with `enter_checked_region` (call it also when the forward raised)."""
    global _CHECKED_REGIONS
    _CHECKED_REGIONS = max(0, _CHECKED_REGIONS - 1)


def layer_check_needed() -> bool:
    """Whether a standalone layer call must run its own agreement check."""
    return agreement_enabled() and _CHECKED_REGIONS == 0
