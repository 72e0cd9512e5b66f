"""Model adapters: one sequence-sharding mechanism (`sharding.py`) and per-model plans and processors.

`parallelize(pipe_or_transformer, sp=..., attention="dense"|"vsa", sparsity=...)` works for every transformer class
with a registered `ShardingPlan` (Wan: `models/wan.py`; HunyuanVideo: `models/hunyuan_video.py`).
"""

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
from .wan import (
    GateLoadReport,
    WanDistributedAttnProcessor,
    WanLocalAttnProcessor,
    WanVSAAttnProcessor,
    add_gate_compress,
    load_gate_compress,
    remove_gate_compress,
    set_wan_attn_processors,
)

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
    "WanLocalAttnProcessor",
    "WanDistributedAttnProcessor",
    "WanVSAAttnProcessor",
    "set_wan_attn_processors",
    "add_gate_compress",
    "remove_gate_compress",
    "load_gate_compress",
    "GateLoadReport",
]
