"""Tiling of a post-patch (T, H, W) token grid into 4x4x4 cubes padded to 64-token blocks (VSA geometry).

Tokens arrive in raster order `(t, h, w)`. Tiles are visited in raster order of tile coordinates; inside a tile
its in-bounds voxels in raster order; each tile occupies one 64-slot block, real tokens first, padding after
(tiles at the upper borders are clipped, so `block_sizes[b] <= 64`). Pad slots are exactly zero.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["TILE", "BLOCK", "TileLayout", "num_blocks", "tile_layout", "tile", "untile", "topk_for_sparsity"]

TILE: tuple[int, int, int] = (4, 4, 4)
BLOCK: int = TILE[0] * TILE[1] * TILE[2]


@dataclass(frozen=True)
class TileLayout:
    """Index tensors for one grid.

    Attributes:
        grid: `(T, H, W)` post-patch grid, `S = T*H*W` tokens.
        tiles: tiles per axis `(ceil(T/4), ceil(H/4), ceil(W/4))`.
        num_blocks: `N = prod(tiles)`; the tiled length is `64 * N`.
        slot_index: long `[S]`, raster token i -> its slot in the tiled sequence.
        block_sizes: int32 `[N]`, real tokens per block (sum = S).
        source_index: long `[64 N]`, tiled slot -> its raster token (pad slots: token 0, zeroed after).
        pad_slots: long `[64 N - S]`, the pad slots.
    """

    grid: tuple[int, int, int]
    tiles: tuple[int, int, int]
    num_blocks: int
    slot_index: torch.Tensor
    block_sizes: torch.Tensor
    source_index: torch.Tensor
    pad_slots: torch.Tensor

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def tiled_len(self) -> int:
        return BLOCK * self.num_blocks


@functools.lru_cache(maxsize=64)
def _layout_cpu(grid: tuple[int, int, int]) -> TileLayout:
    t, h, w = grid
    tiles = _tiles(grid)
    coords = torch.stack(
        torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), dim=-1
    ).reshape(-1, 3)  # raster order
    tile_coords = coords // torch.tensor(TILE)
    block_of_token = (tile_coords[:, 0] * tiles[1] + tile_coords[:, 1]) * tiles[2] + tile_coords[:, 2]
    num_blocks = tiles[0] * tiles[1] * tiles[2]
    # Stable sort by block keeps raster order inside each tile.
    order = torch.sort(block_of_token, stable=True).indices  # tile order -> raster token
    block_sizes = torch.bincount(block_of_token, minlength=num_blocks)
    starts = torch.cumsum(block_sizes, 0) - block_sizes
    sorted_blocks = block_of_token[order]
    rank_in_block = torch.arange(order.numel()) - starts[sorted_blocks]
    slot_index = torch.empty_like(order)
    slot_index[order] = sorted_blocks * BLOCK + rank_in_block
    source_index = torch.zeros(num_blocks * BLOCK, dtype=torch.long)
    source_index[slot_index] = torch.arange(slot_index.numel())
    is_pad = torch.ones(num_blocks * BLOCK, dtype=torch.bool)
    is_pad[slot_index] = False
    return TileLayout(grid, tiles, num_blocks, slot_index, block_sizes.to(torch.int32), source_index,
                      is_pad.nonzero().flatten())


def _tiles(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(math.ceil(n / s) for n, s in zip(grid, TILE, strict=True))


def num_blocks(grid: tuple[int, int, int]) -> int:
    """`N`, the number of 64-token blocks of `grid` (pure Python)."""
    return math.prod(_tiles(grid))


_DEVICE_CACHE: dict[tuple[tuple[int, int, int], torch.device], tuple[torch.Tensor, ...]] = {}


@torch.compiler.assume_constant_result
def _index_tensors(grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """`(slot_index, block_sizes, source_index, pad_slots)` of `grid` on `device`, built once per process.

    Under `torch.compile` this runs eagerly at trace time and its result is a constant of the graph: building the
    layout inside the traced region would make its `nonzero()` a data-dependent shape (a fullgraph failure).
    """
    key = (grid, device)
    if key not in _DEVICE_CACHE:
        base = _layout_cpu(grid)
        _DEVICE_CACHE[key] = tuple(t.to(device) for t in (base.slot_index, base.block_sizes, base.source_index,
                                                          base.pad_slots))
    return _DEVICE_CACHE[key]


def tile_layout(grid: tuple[int, int, int], device: torch.device | str = "cpu") -> TileLayout:
    """The (cached) tile layout of `grid` with its index tensors on `device`."""
    if len(grid) != 3 or any(isinstance(g, bool) or int(g) != g or g < 1 for g in grid):
        raise ValueError(f"grid_size must be three positive ints (T, H, W); got {grid}")
    grid = tuple(int(g) for g in grid)
    return TileLayout(grid, _tiles(grid), num_blocks(grid), *_index_tensors(grid, torch.device(device)))


def _tile(x: torch.Tensor, source_index: torch.Tensor, pad_slots: torch.Tensor) -> torch.Tensor:
    # one gather pass straight into the [B, H, 64N, D] layout, then zero only the pad rows
    out = x.transpose(1, 2).index_select(2, source_index)
    return out.index_fill_(2, pad_slots, 0) if pad_slots.numel() else out


def _untile(x: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).index_select(1, slot_index)


class _Tile(torch.autograd.Function):
    """`tile` whose backward is the inverse gather (`untile`), not `index_select`'s scatter-add."""

    @staticmethod
    def forward(ctx, x, source_index, pad_slots, slot_index):
        ctx.save_for_backward(slot_index)
        return _tile(x, source_index, pad_slots)

    @staticmethod
    def backward(ctx, grad):
        (slot_index,) = ctx.saved_tensors
        return _untile(grad, slot_index), None, None, None


class _Untile(torch.autograd.Function):
    """`untile` whose backward is the inverse gather (`tile`, zero in pad slots)."""

    @staticmethod
    def forward(ctx, x, source_index, pad_slots, slot_index):
        ctx.save_for_backward(source_index, pad_slots)
        return _untile(x, slot_index)

    @staticmethod
    def backward(ctx, grad):
        source_index, pad_slots = ctx.saved_tensors
        return _tile(grad, source_index, pad_slots), None, None, None


def tile(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """`[B, S, H, D]` raster order -> `[B, H, 64*N, D]` tiled, zero in pad slots (contiguous).

    The map is a bijection between tokens and real slots, so the backward is the inverse gather (`untile` of the
    gradient): pad slots get no gradient, and no scatter-add runs.
    """
    b, s, h, d = x.shape
    if s != layout.seq_len:
        raise ValueError(f"sequence length {s} does not match grid {layout.grid} ({layout.seq_len} tokens)")
    if torch.is_grad_enabled() and x.requires_grad:
        return _Tile.apply(x, layout.source_index, layout.pad_slots, layout.slot_index)
    return _tile(x, layout.source_index, layout.pad_slots)


def untile(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """`[B, H, 64*N, D]` tiled -> `[B, S, H, D]` raster order (pad slots dropped), contiguous; backward: `tile`."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Untile.apply(x, layout.source_index, layout.pad_slots, layout.slot_index)
    return _untile(x, layout.slot_index)


def topk_for_sparsity(sparsity: float, num_blocks: int) -> int:
    """Key blocks kept per query block: `clamp(ceil((1 - s) * N), 1, N)`, in double precision like FastVideo."""
    return max(1, min(num_blocks, math.ceil((1.0 - float(sparsity)) * num_blocks)))
