"""Model adapters: one sequence-sharding mechanism (`sharding.py`) and per-model plans and processors.

`parallelize(pipe_or_transformer, sp=..., attention="dense"|"vsa", sparsity=...)` works for every transformer class
with a registered `ShardingPlan` (Wan: `models/wan.py`; HunyuanVideo: `models/hunyuan_video.py`).

The model adapters import their diffusers model modules, so they are imported on first use: `import
diffusers_dist_attn.models` loads only the mechanism; `from diffusers_dist_attn.models import
set_wan_attn_processors` (or `parallelize` on a Wan model) loads the Wan adapter then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .gates import GATE_NAME, GateLayout, GateLoadReport
from .sharding import (
    DenseThenSparse,
    ParallelHandle,
    ShardingPlan,
    ShardingState,
    ShardInput,
    get_plan,
    load_gates,
    parallelize,
    register_plan,
    resolve_sparsity,
)

if TYPE_CHECKING:
    from .hunyuan_video import HunyuanVideoDistributedAttnProcessor
    from .wan import (
        WanDistributedAttnProcessor,
        add_gate_compress,
        load_gate_compress,
        remove_gate_compress,
        set_wan_attn_processors,
    )

# name -> adapter module that defines it (imported on first access); the gate functions are Wan's
_LAZY = {
    "WanDistributedAttnProcessor": "wan",
    "set_wan_attn_processors": "wan",
    "add_gate_compress": "wan",
    "remove_gate_compress": "wan",
    "load_gate_compress": "wan",
    "HunyuanVideoDistributedAttnProcessor": "hunyuan_video",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "parallelize",
    "ParallelHandle",
    "ShardingPlan",
    "ShardInput",
    "ShardingState",
    "DenseThenSparse",
    "register_plan",
    "get_plan",
    "load_gates",
    "resolve_sparsity",
    "GATE_NAME",
    "GateLayout",
    "GateLoadReport",
    "WanDistributedAttnProcessor",
    "HunyuanVideoDistributedAttnProcessor",
    "set_wan_attn_processors",
    "add_gate_compress",
    "remove_gate_compress",
    "load_gate_compress",
]
