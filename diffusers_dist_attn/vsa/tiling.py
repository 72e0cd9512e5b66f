"""Tiling of a post-patch (T, H, W) token grid into 4x4x4 cubes padded to 64-token blocks (VSA geometry).

Tokens arrive in raster order `(t, h, w)`. Tiles are visited in raster order of tile coordinates; inside a tile
its in-bounds voxels in raster order; each tile occupies one 64-slot block, real tokens first, padding after
(tiles at the upper borders are clipped, so `block_sizes[b] <= 64`). Pad slots are exactly zero.
"""

from __future__ import annotations

import functools
import importlib.util
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
        tile_index: int32 `[64 N]`, `source_index` with -1 at pad slots (the Triton permutation kernel).
        untile_index: int32 `[S]`, `slot_index` (the Triton permutation kernel).
    """

    grid: tuple[int, int, int]
    tiles: tuple[int, int, int]
    num_blocks: int
    slot_index: torch.Tensor
    block_sizes: torch.Tensor
    source_index: torch.Tensor
    pad_slots: torch.Tensor
    tile_index: torch.Tensor
    untile_index: torch.Tensor

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
    tile_index = source_index.masked_fill(is_pad, -1).to(torch.int32)
    return TileLayout(grid, tiles, num_blocks, slot_index, block_sizes.to(torch.int32), source_index,
                      is_pad.nonzero().flatten(), tile_index, slot_index.to(torch.int32))


def _tiles(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(math.ceil(n / s) for n, s in zip(grid, TILE, strict=True))


def num_blocks(grid: tuple[int, int, int]) -> int:
    """`N`, the number of 64-token blocks of `grid` (pure Python)."""
    return math.prod(_tiles(grid))


_DEVICE_CACHE: dict[tuple[tuple[int, int, int], torch.device], tuple[torch.Tensor, ...]] = {}


@torch.compiler.assume_constant_result
def _index_tensors(grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The index tensors of `TileLayout` (from `slot_index` on) for `grid` on `device`, built once per process.

    Under `torch.compile` this runs eagerly at trace time and its result is a constant of the graph: building the
    layout inside the traced region would make its `nonzero()` a data-dependent shape (a fullgraph failure).
    """
    key = (grid, device)
    if key not in _DEVICE_CACHE:
        base = _layout_cpu(grid)
        _DEVICE_CACHE[key] = tuple(t.to(device) for t in (base.slot_index, base.block_sizes, base.source_index,
                                                          base.pad_slots, base.tile_index, base.untile_index))
    return _DEVICE_CACHE[key]


def tile_layout(grid: tuple[int, int, int], device: torch.device | str = "cpu") -> TileLayout:
    """The (cached) tile layout of `grid` with its index tensors on `device`."""
    if len(grid) != 3 or any(isinstance(g, bool) or int(g) != g or g < 1 for g in grid):
        raise ValueError(f"grid_size must be three positive ints (T, H, W); got {grid}")
    grid = tuple(int(g) for g in grid)
    return TileLayout(grid, _tiles(grid), num_blocks(grid), *_index_tensors(grid, torch.device(device)))


_PERMUTE = None  # the Triton permutation op (`tiling_triton`), imported here so no import runs in traced code
if importlib.util.find_spec("triton") is not None:
    try:
        from .tiling_triton import permute_rows as _PERMUTE
    except Exception:  # noqa: BLE001 - a broken Triton install means the PyTorch gathers
        _PERMUTE = None


def _tile(x: torch.Tensor, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`[B, S, H, D]` -> `[B, H, 64 N, D]`; `index` = (source_index, pad_slots, slot_index, tile_index, untile_index)."""
    source_index, pad_slots, _, tile_index, _ = index
    if x.is_cuda and _PERMUTE is not None:
        return _PERMUTE(x, tile_index, True)
    # one gather pass straight into the [B, H, 64N, D] layout, then zero only the pad rows
    out = x.transpose(1, 2).index_select(2, source_index)
    return out.index_fill_(2, pad_slots, 0) if pad_slots.numel() else out


def _untile(x: torch.Tensor, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if x.is_cuda and _PERMUTE is not None:
        return _PERMUTE(x, index[4], False)
    return x.transpose(1, 2).index_select(1, index[2])


class _Tile(torch.autograd.Function):
    """`tile` whose backward is the inverse gather (`untile`), not `index_select`'s scatter-add."""

    @staticmethod
    def forward(ctx, x, *index):
        ctx.save_for_backward(*index)
        return _tile(x, index)

    @staticmethod
    def backward(ctx, grad):
        return (_untile(grad, ctx.saved_tensors), *(None,) * 5)


class _Untile(torch.autograd.Function):
    """`untile` whose backward is the inverse gather (`tile`, zero in pad slots)."""

    @staticmethod
    def forward(ctx, x, *index):
        ctx.save_for_backward(*index)
        return _untile(x, index)

    @staticmethod
    def backward(ctx, grad):
        return (_tile(grad, ctx.saved_tensors), *(None,) * 5)


def _indices(layout: TileLayout) -> tuple[torch.Tensor, ...]:
    return layout.source_index, layout.pad_slots, layout.slot_index, layout.tile_index, layout.untile_index


def tile(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """`[B, S, H, D]` raster order -> `[B, H, 64*N, D]` tiled, zero in pad slots (contiguous).

    The map is a bijection between tokens and real slots, so the backward is the inverse gather (`untile` of the
    gradient): pad slots get no gradient, and no scatter-add runs.
    """
    b, s, h, d = x.shape
    if s != layout.seq_len:
        raise ValueError(f"sequence length {s} does not match grid {layout.grid} ({layout.seq_len} tokens)")
    if torch.is_grad_enabled() and x.requires_grad:
        return _Tile.apply(x, *_indices(layout))
    return _tile(x, _indices(layout))


def untile(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """`[B, H, 64*N, D]` tiled -> `[B, S, H, D]` raster order (pad slots dropped), contiguous; backward: `tile`."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Untile.apply(x, *_indices(layout))
    return _untile(x, _indices(layout))


def topk_for_sparsity(sparsity: float, num_blocks: int) -> int:
    """Key blocks kept per query block: `clamp(ceil((1 - s) * N), 1, N)`, in double precision like FastVideo."""
    return max(1, min(num_blocks, math.ceil((1.0 - float(sparsity)) * num_blocks)))
