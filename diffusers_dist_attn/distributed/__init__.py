"""Communication: process groups and collectives with autograd."""

from .collectives import (
    all_gather_heads,
    gather_sequence,
    group_rank,
    group_size,
    heads_to_sequence,
    padded_length,
    sequence_to_heads,
    shard_sequence,
)
from .groups import (
    SequenceParallelGroups,
    destroy_sequence_parallel,
    get_sequence_parallel_groups,
    init_sequence_parallel,
    set_sequence_parallel_groups,
    valid_degrees,
)

__all__ = [
    "SequenceParallelGroups",
    "init_sequence_parallel",
    "get_sequence_parallel_groups",
    "set_sequence_parallel_groups",
    "destroy_sequence_parallel",
    "valid_degrees",
    "group_size",
    "group_rank",
    "padded_length",
    "sequence_to_heads",
    "heads_to_sequence",
    "all_gather_heads",
    "shard_sequence",
    "gather_sequence",
]
