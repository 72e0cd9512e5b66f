"""Spawn real multi-process gloo groups from a test.

`run_distributed(world_size, fn, *args, sp=None, ring=None)` forks `world_size` processes, each sets the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), calls
`init_sequence_parallel(sp, cpu=True)` (accelerate's `PartialState(cpu=True)` -> gloo; with `ring`:
`init_sequence_parallel(sp, ring=ring, cpu=True)`, hybrid Ulysses x ring) and returns
`fn(rank, world_size, *args)`. Results come back in rank order; an exception on any rank fails the call with
that rank's traceback; a hang fails after `timeout` seconds instead of blocking CI.
"""

from __future__ import annotations

import io
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, sp: int | None, ring: int | None, fn: Callable, args: tuple, queue
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    try:
        torch.set_num_threads(1)
        from diffusers_dist_attn import destroy_sequence_parallel, init_sequence_parallel

        if ring is None:
            init_sequence_parallel(sp, cpu=True)
        else:
            init_sequence_parallel(sp, ring=ring, cpu=True)
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
    world_size: int, fn: Callable, *args: Any, sp: int | None = None, ring: int | None = None, timeout: float = 180.0
) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; returns the per-rank results."""
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, sp, ring, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size and time.monotonic() < deadline:
        if not queue.empty():
            rank, ok, payload = queue.get()
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
        elif all(not p.is_alive() for p in procs) and queue.empty():
            break
        else:
            time.sleep(0.01)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    if len(results) < world_size:
        raise TimeoutError(f"only ranks {sorted(results)} of {world_size} finished within {timeout}s (hang?)")
    return [results[r] for r in range(world_size)]
