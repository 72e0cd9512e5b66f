"""Ranks that disagree, or fail, never leave their peers hanging.

Matrix (2 and 3 ranks): one rank (rank 1) passes a different argument, or bad input; every rank must raise the same
`ValueError` naming the argument and each rank's value, within 10 s, and the group must still work afterwards.
Faults (gloo, `init_sequence_parallel(timeout=5)`): a rank that raises locally mid-forward, exits, or stalls makes
its peers fail with `PeerFailureError` ("a peer rank ... failed, exited or stalled") in bounded time.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
from distributed_utils import run_distributed

from diffusers_dist_attn import DistributedAttention, DistributedAttention_VSA
from diffusers_dist_attn.distributed import groups as groups_mod
from diffusers_dist_attn.distributed.agreement import PeerFailureError, _is_collective_failure, peer_failures

B, S, H, D = 1, 4, 4, 8  # batch, local (per-rank) sequence length, heads, head_dim
ODD = 1  # the rank whose input differs (the middle one at 3 ranks)
CASE_LIMIT_S = 10.0  # each disagreement must be reported within this, on every rank
FAULT_TIMEOUT_S = 5.0  # init_sequence_parallel(timeout=...) of the fault runs


def _qkv(seq: int = S, heads: int = H, dim: int = D, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.randn(B, seq, heads, dim, dtype=dtype) for _ in range(3)]


def _text(length: int = 3) -> list[torch.Tensor]:
    return [torch.randn(B, length, H, D) for _ in range(3)]


def _grid(world: int, odd: bool) -> tuple[int, int, int]:
    """A `(T, H, W)` grid of the full sequence; the odd rank's has the same product but another shape."""
    return {2: ((2, 2, 2), (1, 2, 4)), 3: ((2, 2, 3), (1, 3, 4))}[world][odd]


def _case(name: str, rank: int, world: int) -> tuple[Callable[[], Any], list[str]]:
    """`(call, substrings the message must contain)` for one disagreement case on `rank`."""
    odd = rank == ODD
    seq = S * world
    dense, vsa = DistributedAttention(H, D), DistributedAttention_VSA(H, D)
    grid = _grid(world, False)
    if name == "seq_len":  # the local shard length differs
        return (lambda: dense(*_qkv(S + 1 if odd else S))), ["q/k/v shape", f"(1, {S}, {H}, {D})",
                                                            f"(1, {S + 1}, {H}, {D})"]
    if name == "heads":
        return (lambda: dense(*_qkv(heads=2 * H if odd else H))), ["q/k/v shape", f"(1, {S}, {2 * H}, {D})"]
    if name == "head_dim":  # layers built for their own head_dim (same scale): only the agreement can tell
        layer = DistributedAttention(H, 2 * D if odd else D, softmax_scale=D**-0.5)
        return (lambda: layer(*_qkv(dim=2 * D if odd else D))), ["q/k/v shape", f"(1, {S}, {H}, {2 * D})"]
    if name == "head_dim_vs_layer":  # same layer everywhere, wrong head_dim on one rank: its local error, named
        return (lambda: dense(*_qkv(dim=2 * D if odd else D))), [f"rank {ODD}:", "head_dim 16", "head_size=8"]
    if name == "dtype":
        return (lambda: dense(*_qkv(dtype=torch.float64 if odd else torch.float32))), [
            "dtype", "torch.float32", "torch.float64"]
    if name == "original_seq_len":  # 7 vs 8 at 2 ranks, 11 vs 12 at 3
        mine = seq - 1 if odd else seq
        return (lambda: dense(*_qkv(), original_seq_len=mine)), [
            "original_seq_len", f"rank 0={seq}", f"rank {ODD}={seq - 1}"]
    if name == "sparsity":
        return (lambda: vsa(*_qkv(), grid_size=grid, sparsity=0.75 if odd else 0.5)), [
            "sparsity", "rank 0=0.5", f"rank {ODD}=0.75"]
    if name == "grid_size":
        mine = _grid(world, odd)
        return (lambda: vsa(*_qkv(), grid_size=mine, sparsity=0.5)), ["grid", str(grid), str(_grid(world, True))]
    if name == "replicated_on_one_rank":  # hung before the agreement check existed
        return (lambda: dense(*_qkv(), *(_text() if odd else (None, None, None)))), [
            "replicated", "rank 0=None", f"rank {ODD}=(1, 3, {H}, {D})"]
    if name == "replicated_len":
        return (lambda: dense(*_qkv(), *_text(5 if odd else 3))), [
            "replicated", f"(1, 3, {H}, {D})", f"(1, 5, {H}, {D})"]
    if name == "replicated_mask_on_one_rank":
        mask = torch.ones(B, 3, dtype=torch.bool) if odd else None
        return (lambda: dense(*_qkv(), *_text(), replicated_mask=mask)), [
            "replicated_mask", "rank 0=False", f"rank {ODD}=True"]
    if name == "rotary_on_one_rank":
        tables = (torch.ones(seq, D // 2), torch.zeros(seq, D // 2)) if odd else None
        return (lambda: dense(*_qkv(), freqs_cis=tables)), ["rotary", "rank 0=None", f"rank {ODD}={seq}"]
    if name == "gate_on_one_rank":
        gate = torch.rand(B, S, H, D) if odd else None
        return (lambda: vsa(*_qkv(), gate_compress=gate, grid_size=grid)), [
            "gate_compress", "rank 0=None", f"rank {ODD}=(1, {S}, {H}, {D})"]
    if name == "implementation":
        impl = "triton" if odd else "torch"
        return (lambda: vsa(*_qkv(), grid_size=grid, implementation=impl)), [
            "implementation", "rank 0='torch'", f"rank {ODD}='triton'"]
    if name == "bad_gate_on_one_rank":  # a NaN-free gate of the wrong shape: rank 1's own error, on every rank
        gate = torch.rand(B, S, H, D // 2) if odd else torch.rand(B, S, H, D)
        return (lambda: vsa(*_qkv(), gate_compress=gate, grid_size=grid)), [
            f"bad input on 1 of {world} ranks", f"rank {ODD}:", "gate_compress"]
    raise KeyError(name)


CASES = ("seq_len", "heads", "head_dim", "head_dim_vs_layer", "dtype", "original_seq_len", "sparsity", "grid_size",
         "replicated_on_one_rank", "replicated_len", "replicated_mask_on_one_rank", "rotary_on_one_rank",
         "gate_on_one_rank", "implementation", "bad_gate_on_one_rank")


def _matrix_worker(rank: int, world: int) -> dict[str, Any]:
    """Run every case in turn (they share one group), then one correct call that must still work."""
    out: dict[str, Any] = {}
    for name in CASES:
        torch.manual_seed(rank)  # the inputs need not match: only what the agreement compares does
        call, expected = _case(name, rank, world)
        start = time.monotonic()
        try:
            call()
            outcome = ("returned", "")
        except ValueError as exc:  # RankDisagreementError (the ranks differ) is a ValueError too
            outcome = ("ValueError", str(exc))
        except Exception as exc:  # noqa: BLE001 - the test inspects the type
            outcome = (type(exc).__name__, str(exc))
        out[name] = {"type": outcome[0], "message": outcome[1], "seconds": time.monotonic() - start,
                     "expected": expected}
    torch.manual_seed(0)
    video, rep = DistributedAttention(H, D)(*_qkv(), *_text())
    out["after"] = (tuple(video.shape), tuple(rep.shape))
    return out


@functools.cache
def _matrix(world: int) -> list[dict[str, Any]]:
    # a short group timeout: a case that hangs fails in 10 s (as PeerFailureError) instead of blocking the run
    return run_distributed(world, _matrix_worker, timeout=60, group_timeout=CASE_LIMIT_S)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", CASES)
def test_one_rank_differs(world: int, case: str) -> None:
    per_rank = [res[case] for res in _matrix(world)]
    for rank, res in enumerate(per_rank):
        assert res["type"] == "ValueError", f"rank {rank}: {res['type']}: {res['message']}"
        for part in res["expected"]:
            assert part in res["message"], f"rank {rank}: {part!r} not in {res['message']!r}"
        if "bad input" not in res["message"] and "rank 0:" not in res["message"]:
            assert all(f"rank {r}=" in res["message"] for r in range(world)), res["message"]
        assert res["seconds"] < CASE_LIMIT_S, f"rank {rank} took {res['seconds']:.1f} s"
    assert len({res["message"] for res in per_rank}) == 1, "every rank must raise the same message"


@pytest.mark.parametrize("world", [2, 3])
def test_group_still_works_after_disagreements(world: int) -> None:
    for res in _matrix(world):
        assert res["after"] == ((B, S, H, D), (B, 3, H, D))


# ---------------------------------------------------------------------------------------------------- faults


def _timed_call(layer: DistributedAttention) -> dict[str, Any]:
    start = time.monotonic()
    try:
        layer(*_qkv())
        outcome = ("returned", "")
    except Exception as exc:  # noqa: BLE001 - the test inspects the type
        outcome = (type(exc).__name__, str(exc))
    return {"type": outcome[0], "message": outcome[1], "seconds": time.monotonic() - start}


def _raise_then_continue(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 fails locally just before the all-to-all, catches it and goes on to the next call."""
    layer = DistributedAttention(H, D)
    if rank != ODD:
        return {"first": _timed_call(layer)}

    def boom(*args: Any) -> None:
        raise RuntimeError("injected local failure before the all-to-all")

    layer._to_heads = boom  # an instance attribute shadows the static method, for this rank only
    first = _timed_call(layer)
    del layer._to_heads
    return {"first": first, "second": _timed_call(layer)}


def _exit_before_call(rank: int, world: int) -> dict[str, Any]:
    if rank == ODD:
        os._exit(0)  # no report, no goodbye to the group
    return {"first": _timed_call(DistributedAttention(H, D))}


def _stall_before_call(rank: int, world: int) -> dict[str, Any]:
    if rank == ODD:
        time.sleep(FAULT_TIMEOUT_S + 3)  # longer than the group's timeout; then leave without calling
        return {}
    return {"first": _timed_call(DistributedAttention(H, D))}


def _assert_peer_failure(res: dict[str, Any], limit: float = FAULT_TIMEOUT_S + 20) -> None:
    assert res["type"] == "PeerFailureError", f"{res['type']}: {res['message']}"
    assert "failed, exited or stalled" in res["message"]
    assert f"at most {FAULT_TIMEOUT_S:g} s" in res["message"], res["message"]  # the group's, not the env default
    assert res["seconds"] < limit, f"took {res['seconds']:.1f} s"


def test_rank_raising_mid_forward_does_not_hang_peers() -> None:
    results = run_distributed(2, _raise_then_continue, timeout=60, group_timeout=FAULT_TIMEOUT_S)
    _assert_peer_failure(results[0]["first"])  # waited in the all-to-all until the timeout
    failing = results[ODD]
    # its own error is reported as its own, not blamed on a peer
    assert failing["first"]["type"] == "RuntimeError" and "injected" in failing["first"]["message"]
    # the next call meets a peer that is still in the old call's all-to-all: fails, bounded, in the agreement
    assert failing["second"]["type"] in ("PeerFailureError", "ValueError"), failing["second"]
    assert failing["second"]["seconds"] < FAULT_TIMEOUT_S + 20


def test_rank_exiting_before_a_call_fails_peers() -> None:
    results = run_distributed(3, _exit_before_call, timeout=60, group_timeout=FAULT_TIMEOUT_S, allow_exit=True)
    assert results[ODD] is None
    for rank in (0, 2):
        _assert_peer_failure(results[rank]["first"])


def test_stalled_rank_fails_peers_after_the_timeout() -> None:
    results = run_distributed(2, _stall_before_call, timeout=60, group_timeout=FAULT_TIMEOUT_S)
    res = results[0]["first"]
    _assert_peer_failure(res)
    assert res["seconds"] > FAULT_TIMEOUT_S - 1, "failed before the timeout: not the stall that was detected"


# ---------------------------------------------------------------------------------------------------- timeouts


def _group_timeouts(rank: int, world: int) -> dict[str, float]:
    g = groups_mod.get_sequence_parallel_groups()
    names = ("sp_group", "dp_group", "ring_group", "ulysses_group")
    return {name: groups_mod.group_timeout_s(getattr(g, name)) for name in names if getattr(g, name) is not None}


def test_every_group_carries_the_timeout() -> None:
    # world 4 = dp 2 x (ring 2 x ulysses 1): the flattened SP group is not the world, so it is a new group too
    # 30 s, not less: the timeout also bounds the rendezvous that creates each group (slow on a loaded CI machine)
    for timeouts in run_distributed(4, _group_timeouts, sp=2, ring=2, timeout=90, group_timeout=30):
        assert set(timeouts) == {"sp_group", "dp_group", "ring_group"}
        assert all(t == 30 for t in timeouts.values()), timeouts


def test_mesh_without_backend_override_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch whose `init_device_mesh` has no `backend_override` still gets its mesh (default sub-group timeout)."""
    calls: list[dict[str, Any]] = []

    def old_init_device_mesh(device_type: str, mesh_shape: tuple[int, ...], *,
                             mesh_dim_names: tuple[str, ...] | None = None) -> str:
        calls.append({"shape": mesh_shape, "names": mesh_dim_names})
        return "mesh"

    monkeypatch.setattr(groups_mod, "init_device_mesh", old_init_device_mesh)
    monkeypatch.setattr(groups_mod.dist, "get_backend", lambda group=None: "gloo")
    assert groups_mod._mesh_options("gloo", timedelta(seconds=5)) is None
    assert groups_mod._mesh("cpu", (1, 2), ("dp", "sp"), timedelta(seconds=5)) == "mesh"
    assert calls == [{"shape": (1, 2), "names": ("dp", "sp")}]


def test_mesh_options_without_gloo_options_class(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoOptions:  # a ProcessGroupGloo without `_Options` / `Options`
        pass

    monkeypatch.setattr(groups_mod.dist, "ProcessGroupGloo", NoOptions)
    assert groups_mod._mesh_options("gloo", timedelta(seconds=5)) is None


def test_mesh_options_carry_the_timeout() -> None:
    options = groups_mod._mesh_options("gloo", timedelta(seconds=5))
    assert options is not None and options._timeout == timedelta(seconds=5)


def test_only_collective_failures_blame_a_peer() -> None:
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
    assert _is_collective_failure(gloo)
    assert _is_collective_failure(RuntimeError("Timed out waiting 5000ms for recv operation to complete"))
    assert not _is_collective_failure(RuntimeError("injected local failure"))
    assert not _is_collective_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(RuntimeError, match="local"), peer_failures(None, "here"):  # no group: never a peer's
        raise RuntimeError("local")
    assert issubclass(PeerFailureError, RuntimeError)
