"""Spawn real multi-process gloo groups from a test.

`run_distributed(world_size, fn, *args, sp=None, ring=None)` forks `world_size` processes, each sets the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), calls
`init_sequence_parallel(sp, cpu=True)` (accelerate's `PartialState(cpu=True)` -> gloo; with `ring`:
`init_sequence_parallel(sp, ring=ring, cpu=True)`, hybrid Ulysses x ring) and returns
`fn(rank, world_size, *args)`. Results come back in rank order; an exception on any rank fails the call with
that rank's traceback; a hang fails after `timeout` seconds instead of blocking CI.

Fault tests: `group_timeout=s` is passed as `init_sequence_parallel(timeout=s)` (how long a collective waits for a
stalled peer); `allow_exit=True` accepts ranks that exit without reporting (e.g. `os._exit`), whose result is
`None`.
"""

from __future__ import annotations

import io
import os
import random
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out for bind(0) / outgoing connections (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port() -> int:
    """A free port for the rendezvous store, below the ephemeral range.

    A port from bind(0) is ephemeral: between its release here and rank 0's bind, a concurrent job's gloo listener
    (gloo takes ephemeral ports, many per group) can grab it, and ranks then meet a foreign store and hang. Random
    (SystemRandom: tests seed `random`) ports below the range are only taken by another job picking the same one.
    """
    floor = _ephemeral_floor()
    if floor > 11000:
        rng = random.SystemRandom()
        for _ in range(100):
            port = rng.randrange(10000, floor)
            with socket.socket() as s:
                try:
                    s.bind(("", port))  # all addresses, as the store binds
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, sp: int | None, ring: int | None, fn: Callable, args: tuple, queue,
    group_timeout: float | None = None,
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    try:
        torch.set_num_threads(1)
        from diffusers_dist_attn import destroy_sequence_parallel, init_sequence_parallel

        # `timeout` only when asked, so callers that never pass it exercise the env / default path unchanged
        extra: dict[str, Any] = {} if group_timeout is None else {"timeout": group_timeout}
        if ring is None:
            init_sequence_parallel(sp, cpu=True, **extra)
        else:
            init_sequence_parallel(sp, ring=ring, cpu=True, **extra)
        try:
            result = fn(rank, world, *args)
        finally:
            destroy_sequence_parallel()
        buf = io.BytesIO()
        torch.save(result, buf)  # bytes, not shared-memory handles that die with the worker
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_distributed(
    world_size: int, fn: Callable, *args: Any, sp: int | None = None, ring: int | None = None, timeout: float = 180.0,
    group_timeout: float | None = None, allow_exit: bool = False,
) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; returns the per-rank results.

    Args:
        timeout: seconds the whole run may take (a hang fails the test instead of blocking CI).
        group_timeout: `init_sequence_parallel(timeout=...)` of every rank (default: env / 600 s).
        allow_exit: a rank that exits without reporting gives `None` instead of failing the call.
    """
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, sp, ring, fn, args, queue, group_timeout))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout

    def drain() -> None:
        while not queue.empty():
            rank, ok, payload = queue.get()
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = f"rank {rank}:\n{payload}"

    while time.monotonic() < deadline:
        drain()
        if len(results) + len(errors) == world_size or all(not p.is_alive() for p in procs):
            break
        time.sleep(0.01)
    drain()  # a rank may have reported just before exiting
    unreported = [r for r in range(world_size) if r not in results and r not in errors]
    hung = [r for r in unreported if procs[r].is_alive()]
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    drain()
    gone = [r for r in unreported if r not in hung and r not in results and r not in errors]
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors[r] for r in sorted(errors)))
    if gone and not allow_exit:
        codes = ", ".join(f"rank {r}: exit code {procs[r].exitcode}" for r in gone)
        raise RuntimeError(f"ranks exited without reporting ({codes})")
    hung = [r for r in hung if r not in results]
    if hung:
        raise TimeoutError(f"ranks {hung} of {world_size} did not finish within {timeout}s (hang?); "
                           f"finished: {sorted(results)}")
    return [results.get(r) for r in range(world_size)]
