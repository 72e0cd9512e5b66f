"""Video Sparse Attention: tiling, the PyTorch reference and the kernel dispatch point."""

from .dispatch import available_implementations, resolve_implementation, vsa_tiled
from .reference import block_mean, coarse_attention, topk_block_indices, vsa_tiled_reference
from .tiling import BLOCK, TILE, TileLayout, tile, tile_layout, topk_for_sparsity, untile

__all__ = [
    "BLOCK",
    "TILE",
    "TileLayout",
    "tile_layout",
    "tile",
    "untile",
    "topk_for_sparsity",
    "block_mean",
    "coarse_attention",
    "topk_block_indices",
    "vsa_tiled_reference",
    "vsa_tiled",
    "available_implementations",
    "resolve_implementation",
]
