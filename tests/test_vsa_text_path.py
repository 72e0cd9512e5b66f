"""VSA with text keys through the kernel contract (LSE merge), tiling's inverse-gather backward, and VSA under
torch.compile from a fresh process: CPU, fp32/fp64 against the PyTorch reference.

On CPU the VSA forward op runs its PyTorch mirror (same outputs as the Triton kernels: fine output, base-2 LSE,
coarse output, selection), so the merge and its backward are checked exactly here; the GPU tests check the same
path with the Triton kernels.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from diffusers_dist_attn.attention.registry import select_backend
from diffusers_dist_attn.attention.vsa_joint import vsa_with_text
from diffusers_dist_attn.vsa import triton_ops  # noqa: F401 - registers the VSA custom ops
from diffusers_dist_attn.vsa.reference import vsa_tiled_reference
from diffusers_dist_attn.vsa.tiling import tile, tile_layout, untile

TOL = 1e-5


def _masks(b: int, n: int) -> list[torch.Tensor | None]:
    prefix = torch.ones(b, n, dtype=torch.bool)
    prefix[0, n // 2:] = False
    empty = prefix.clone()
    empty[-1] = False  # no valid text key in this batch row
    return [None, prefix, empty]


@pytest.mark.parametrize("grid,d", [((5, 6, 7), 64), ((3, 5, 9), 128)])
@pytest.mark.parametrize("mask_index", [0, 1, 2])
@pytest.mark.parametrize("with_gate", [True, False])
def test_vsa_with_text_matches_reference(grid, d, mask_index, with_gate):
    torch.manual_seed(mask_index + d)
    b, h, n_text, topk = 2, 2, 6, 3
    layout = tile_layout(grid)
    q, k, v, g = (tile(torch.randn(b, layout.seq_len, h, d), layout).requires_grad_() for _ in range(4))
    gate = g if with_gate else None
    tk, tv = (torch.randn(b, h, n_text, d, requires_grad=True) for _ in range(2))
    mask = _masks(b, n_text)[mask_index]
    scale = d**-0.5
    out = vsa_with_text(torch.ops.diffusers_dist_attn.vsa_fwd, q, k, v, gate, layout.block_sizes, topk, scale, tk,
                        tv, mask)
    ref = vsa_tiled_reference(q, k, v, gate, layout.block_sizes, topk, scale, extra_k=tk, extra_v=tv, extra_mask=mask)
    real = torch.ones(layout.tiled_len, dtype=torch.bool)
    real[layout.pad_slots] = False
    assert (out - ref)[:, :, real].abs().max() <= TOL
    dout = torch.randn_like(out) * real[None, None, :, None]  # pad rows are dropped by untile: no gradient
    leaves = [t for t in (q, k, v, gate, tk, tv) if t is not None]
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, leaves, dout)
    for x, y in zip(got, want, strict=True):
        assert (x - y).abs().max() <= TOL * max(1.0, y.abs().max().item())


def test_registry_sends_text_keys_to_a_row_that_takes_them():
    q = torch.randn(1, 2, 64, 8)
    row = select_backend("vsa", q, extra_keys=True)
    assert row.extra_keys and row.name == "torch"  # CPU: the reference; on CUDA the Triton row (GPU tests)
    with pytest.raises(ValueError, match="triton.*cannot run here"):
        select_backend("vsa", q, requested="triton", extra_keys=True, strict=True)


def test_tile_backward_is_the_inverse_gather():
    layout = tile_layout((3, 5, 6))
    x = torch.randn(2, layout.seq_len, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tile(t, layout), (x,))
    y = torch.randn(2, 2, layout.tiled_len, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: untile(t, layout), (y,))
    # the gradient of tile never reaches pad slots of an untile input
    (grad,) = torch.autograd.grad(untile(y, layout).sum(), y)
    assert grad[:, :, layout.pad_slots].abs().max() == 0


_FRESH_COMPILE = """
import torch
from diffusers_dist_attn import DistributedAttention_VSA
from diffusers_dist_attn.vsa import tiling
assert not tiling._DEVICE_CACHE, "the layout cache must start empty"
torch.manual_seed(0)
layers = {d: DistributedAttention_VSA(2, d) for d in (8, 16)}
compiled = {d: torch.compile(layer, fullgraph=True) for d, layer in layers.items()}
# a second grid and head dim recompile with symbolic ints and sizes; 0.0 is every block (the dense route)
for grid, d in (((3, 5, 6), 8), ((3, 5, 7), 8), ((4, 5, 7), 16)):
    q, k, v, g = (torch.randn(1, grid[0] * grid[1] * grid[2], 2, d) for _ in range(4))
    for sparsity in (0.5, 0.0):
        out = compiled[d](q, k, v, gate_compress=g, grid_size=grid, sparsity=sparsity)[0]
        ref = layers[d](q, k, v, gate_compress=g, grid_size=grid, sparsity=sparsity)[0]
        assert (out - ref).abs().max() < 1e-5, (grid, d, sparsity, (out - ref).abs().max())
print("ok")
"""


def test_vsa_compiles_fullgraph_in_a_fresh_process():
    """The first compiled call builds the tile layout (not an eager call before it); later grids and head dims
    recompile (ints that changed between calls arrive as SymInts) without a graph break."""
    done = subprocess.run([sys.executable, "-c", _FRESH_COMPILE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
