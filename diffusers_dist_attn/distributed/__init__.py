"""Communication: process groups, collectives with autograd, cross-rank agreement and the degree planner.

Nothing here imports the attention package: attention algorithms (ring attention included) live in `attention/`.
"""

from .agreement import PeerFailureError, agree, peer_failures
from .collectives import (
    all_gather_heads,
    gather_sequence,
    group_rank,
    group_size,
    head_offset,
    head_split,
    heads_to_sequence,
    padded_length,
    sequence_to_heads,
    shard_sequence,
)
from .groups import (
    SINGLE_PROCESS,
    SequenceParallelGroups,
    destroy_sequence_parallel,
    get_sequence_parallel_groups,
    init_sequence_parallel,
    set_sequence_parallel_groups,
    valid_degrees,
)
from .planner import DegreePlan, plan_degrees

__all__ = [
    "SINGLE_PROCESS",
    "SequenceParallelGroups",
    "init_sequence_parallel",
    "get_sequence_parallel_groups",
    "set_sequence_parallel_groups",
    "destroy_sequence_parallel",
    "valid_degrees",
    "head_split",
    "head_offset",
    "agree",
    "peer_failures",
    "PeerFailureError",
    "plan_degrees",
    "DegreePlan",
    "group_size",
    "group_rank",
    "padded_length",
    "sequence_to_heads",
    "heads_to_sequence",
    "all_gather_heads",
    "shard_sequence",
    "gather_sequence",
]
