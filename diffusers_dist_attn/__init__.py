"""diffusers_dist_attn: fast, exact attention for video diffusion transformers, as diffusers AttentionProcessors.

Public API:
- layers: `LocalAttention`, `DistributedAttention` (Ulysses), `DistributedAttention_VSA` (Video Sparse Attention);
- groups: `init_sequence_parallel(sp=...)` from what `accelerate launch` / `torchrun` start;
- backends: `AttentionBackendEnum`.
"""

import logging

from .attention import AttentionBackendEnum, DistributedAttention, DistributedAttention_VSA, LocalAttention
from .distributed import (
    SequenceParallelGroups,
    destroy_sequence_parallel,
    get_sequence_parallel_groups,
    init_sequence_parallel,
)

__version__ = "0.1.0"

# Our loggers live under diffusers' library logger, so diffusers' own controls
# (`diffusers.utils.logging.set_verbosity_info()`, its handler) show backend choices too; without diffusers
# configured, records propagate to the root logger as usual. Nothing of diffusers is imported for this.
logging.getLogger(__name__).parent = logging.getLogger("diffusers")

__all__ = [
    "LocalAttention",
    "DistributedAttention",
    "DistributedAttention_VSA",
    "AttentionBackendEnum",
    "SequenceParallelGroups",
    "init_sequence_parallel",
    "get_sequence_parallel_groups",
    "destroy_sequence_parallel",
]
