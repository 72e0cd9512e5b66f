"""GPU test of the Triton tile permutation against the PyTorch gathers: exact equality, pad slots zero, gradients."""

from __future__ import annotations

import pytest
import torch

from diffusers_dist_attn.vsa import tiling

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or tiling._PERMUTE is None, reason="needs CUDA and Triton"),
]


@pytest.mark.parametrize("grid,b,h,d", [((21, 30, 52), 1, 3, 128), ((5, 7, 9), 2, 2, 64), ((3, 5, 6), 2, 3, 80)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_permutation_kernel_equals_gathers(grid, b, h, d, dtype):
    torch.manual_seed(0)
    layout = tiling.tile_layout(grid, "cuda")
    x = torch.randn(b, layout.seq_len, h, d, device="cuda", dtype=dtype)
    index = tiling._indices(layout)
    tiled = tiling.tile(x, layout)
    want = x.cpu().transpose(1, 2).index_select(2, layout.source_index.cpu())
    want[:, :, layout.pad_slots.cpu()] = 0
    assert torch.equal(tiled.cpu(), want)
    assert torch.equal(tiling.untile(tiled, layout), x)
    # strided input (a head slice of a wider buffer) and the autograd round trip
    wide = torch.randn(b, layout.seq_len, h + 1, d, device="cuda", dtype=dtype)[:, :, 1:]
    assert torch.equal(tiling._tile(wide, index).cpu(), tiling._tile(wide.cpu(), tuple(t.cpu() for t in index)))
    leaf = x.clone().requires_grad_()
    grad_out = torch.randn_like(tiled)
    (grad,) = torch.autograd.grad(tiling.tile(leaf, layout), leaf, grad_out)
    assert torch.equal(grad, tiling.untile(grad_out, layout))
