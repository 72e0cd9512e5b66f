"""Video Sparse Attention kernels: tiling, the PyTorch reference (ground truth), the Triton and CUDA custom ops.

This package is a kernel library: which implementation runs is chosen by the backend registry
(`attention.registry`, rows `cuda`, `triton`, `torch`; entry point `attention.backends.vsa_attention_tiled`).
"""

from .reference import block_mean, coarse_attention, topk_block_indices, vsa_tiled_reference
from .tiling import BLOCK, TILE, TileLayout, num_blocks, tile, tile_layout, topk_for_sparsity, untile

__all__ = [
    "BLOCK",
    "TILE",
    "TileLayout",
    "num_blocks",
    "tile_layout",
    "tile",
    "untile",
    "topk_for_sparsity",
    "block_mean",
    "coarse_attention",
    "topk_block_indices",
    "vsa_tiled_reference",
]
