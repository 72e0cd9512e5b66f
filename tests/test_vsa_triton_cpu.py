"""CPU tests of the Triton VSA path's plumbing: op registration, fake (meta) kernels, autograd registration,
`torch.compile` tracing, and the plain-PyTorch mirror of the kernels' algorithm (index builders, backward math).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from diffusers_dist_attn.vsa import triton_ops
from diffusers_dist_attn.vsa.reference import vsa_tiled_reference
from diffusers_dist_attn.vsa.tiling import tile_layout, topk_for_sparsity

OPS = torch.ops.diffusers_dist_attn


def _inputs(grid, b, h, d, dtype, *, seed=0, requires_grad=False):
    layout = tile_layout(grid)
    gen = torch.Generator().manual_seed(seed)
    s = layout.tiled_len
    valid = (torch.arange(64)[None] < layout.block_sizes[:, None]).reshape(1, 1, s, 1)

    def draw():
        return (
            (torch.randn(b, h, s, d, generator=gen, dtype=torch.float64) * valid)
            .to(dtype)
            .requires_grad_(requires_grad)
        )

    return draw(), draw(), draw(), draw(), layout.block_sizes


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_module_imports_and_reports_availability():
    assert isinstance(triton_ops.is_available(), bool)
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        assert triton_ops.is_available() is False
    assert callable(triton_ops.vsa_tiled_triton)


def test_ops_are_registered():
    for name in ("vsa_fwd", "vsa_bwd"):
        op = getattr(OPS, name)
        assert "diffusers_dist_attn" in str(op.default._schema)


def test_fake_tensor_shapes():
    with FakeTensorMode():
        q = torch.empty(2, 3, 64 * 10, 128, dtype=torch.bfloat16)
        bs = torch.full((10,), 64, dtype=torch.int32)
        outs = OPS.vsa_fwd(q, q, q, q, bs, 4, 0.1, True)
        out = triton_ops.vsa_tiled_triton(q, q, q, None, bs, 4)
        grads = OPS.vsa_bwd(q, q, q, q, None, q, outs[1], outs[3], outs[4], outs[5], outs[6], outs[7], outs[8],
                            outs[9], bs, 0.1)  # fmt: skip
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    shapes = [tuple(t.shape) for t in outs]
    assert shapes == [
        (2, 3, 640, 128), (2, 3, 640), (2, 3, 640, 128), (2, 3, 10, 128), (2, 3, 10, 10), (2, 3, 10, 4),
        (2, 3, 10, 3), (2, 3, 10, 128), (2, 3, 10, 128), (2, 3, 10, 128),
    ]  # fmt: skip
    assert [t.dtype for t in outs[1:7]] == [torch.float32, torch.bfloat16, torch.float32, torch.uint8] + [
        torch.int32
    ] * 2
    assert [tuple(t.shape) for t in grads] == [(2, 3, 640, 128)] * 3 + [(0,)]


def test_opcheck_forward_and_backward():
    q, k, v, g, bs = _inputs((5, 6, 7), 1, 2, 16, torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.vsa_fwd.default, (q, k, v, g, bs, 3, 0.25, True))
    outs = OPS.vsa_fwd(q.detach(), k.detach(), v.detach(), g.detach(), bs, 3, 0.25, True)
    dout = torch.randn_like(q)
    args = (dout, q.detach(), k.detach(), v.detach(), None, outs[2], outs[1], outs[3], *outs[4:], bs, 0.25)
    torch.library.opcheck(OPS.vsa_bwd.default, args)


@pytest.mark.parametrize("with_gate", [True, False])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_mirror_matches_reference_forward_and_grads(with_gate, sparsity):
    """The op's algorithm (fp64 mirror): forward, and backward via delta / coarse-gradient / pad handling."""
    q, k, v, g, bs = _inputs((4, 6, 9), 2, 2, 16, torch.float64, seed=3, requires_grad=True)
    g = g if with_gate else None
    topk = topk_for_sparsity(sparsity, bs.numel())
    out = OPS.vsa_fwd(q, k, v, g, bs, topk, 0.25, True)[0]
    ref = vsa_tiled_reference(q, k, v, g, bs, topk, 0.25)
    assert _rel(out, ref) < 1e-6
    inputs = [t for t in (q, k, v, g) if t is not None]
    dout = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout), strict=True):
        assert _rel(got, want) < 1e-6


def test_wrapper_bf16_on_cpu_uses_mirror_and_is_differentiable():
    q, k, v, g, bs = _inputs((4, 5, 6), 1, 2, 32, torch.bfloat16, requires_grad=True)
    out = triton_ops.vsa_tiled_triton(q, k, v, g, bs, 2)
    ref = vsa_tiled_reference(q, k, v, g, bs, 2)
    assert _rel(out, ref) < 1e-2
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, g))


def test_wrapper_fp32_falls_back_to_reference():
    q, k, v, g, bs = _inputs((4, 5, 6), 1, 1, 16, torch.float32)
    assert torch.equal(triton_ops.vsa_tiled_triton(q, k, v, g, bs, 2), vsa_tiled_reference(q, k, v, g, bs, 2))


def test_wrapper_rejects_bad_arguments():
    q, k, v, g, bs = _inputs((4, 4, 8), 1, 1, 16, torch.bfloat16)
    with pytest.raises(ValueError):
        triton_ops.vsa_tiled_triton(q, k, v, g, bs, 0)
    with pytest.raises(ValueError):
        triton_ops.vsa_tiled_triton(q, k, v, g, bs, bs.numel() + 1)
    with pytest.raises(ValueError):
        triton_ops.vsa_tiled_triton(q[:, :, :-1], k, v, g, bs, 1)


def test_backward_without_saved_state_raises():
    q, k, v, g, bs = _inputs((4, 4, 4), 1, 1, 16, torch.float64, requires_grad=True)
    out = OPS.vsa_fwd(q, k, v, g, bs, 1, 0.25, False)[0]
    with pytest.raises(RuntimeError, match="save_out_s"):
        out.sum().backward()


def test_torch_compile_fullgraph_traces_without_break():
    q, k, v, g, bs = _inputs((4, 5, 6), 1, 2, 32, torch.bfloat16, requires_grad=True)

    def layer(q, k, v, g):
        return triton_ops.vsa_tiled_triton(q, k, v, g, bs, 3).float().square().mean()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, g)
    grads = torch.autograd.grad(loss, (q, k, v, g))
    want = torch.autograd.grad(layer(q, k, v, g), (q, k, v, g))
    for a, b in zip(grads, want, strict=True):
        assert torch.equal(a, b)


def _grouped(blocks: list[int], sizes: torch.Tensor) -> list[int]:
    """`blocks` ordered by size class (more than 32 real tokens, 17-32, up to 16), ascending inside a class."""
    return sorted(blocks, key=lambda j: (int(sizes[j] <= 32) + int(sizes[j] <= 16), j))


def _ends(blocks: list[int], sizes: torch.Tensor) -> list[int]:
    return [sum(int(sizes[j] <= 32) + int(sizes[j] <= 16) <= c for j in blocks) for c in range(3)]


def test_topk_select_exact_k_ties_to_lower_index_grouped_by_size():
    sizes = torch.tensor([64, 16, 48, 32, 8, 64, 24, 64, 12, 40] * 2, dtype=torch.int32)
    scores = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    sel, idx, num = triton_ops.topk_select_torch(scores, 5, sizes)
    assert (sel.sum(-1) == 5).all() and (num[..., 2] == 5).all()
    top = torch.topk(scores, 5).indices
    for row in range(20):
        blocks = top[1, 2, row].tolist()
        assert idx[1, 2, row].tolist() == _grouped(blocks, sizes)
        assert num[1, 2, row].tolist() == _ends(blocks, sizes)
    tied = torch.zeros(1, 1, 3, 10)
    tied[0, 0, 1, 7] = 1.0
    sel, idx, _ = triton_ops.topk_select_torch(tied, 3, torch.full((10,), 64))
    assert idx[0, 0].tolist() == [[0, 1, 2], [0, 1, 7], [0, 1, 2]]


def test_k2q_from_mask_inverts_selection_grouped_by_size():
    sizes = torch.tensor([64, 16, 48, 32, 8, 64, 24, 64, 12, 40, 64, 1, 33, 17, 64, 64, 2], dtype=torch.int32)
    sel = (torch.rand(2, 2, 17, 17) < 0.3).to(torch.uint8)
    k2q, num = triton_ops.k2q_from_mask_torch(sel, sizes)
    for b in range(2):
        for h in range(2):
            for j in range(17):
                want = torch.nonzero(sel[b, h, :, j]).flatten().tolist()
                assert num[b, h, j].tolist() == _ends(want, sizes)
                assert k2q[b, h, j, : len(want)].tolist() == _grouped(want, sizes)


def test_pipeline_stages_fit_the_shared_memory():
    kern = pytest.importorskip("diffusers_dist_attn.vsa.triton_kernels")
    tile = 64 * 128 * 2  # a [64, 128] bf16 tile
    assert kern.stages_that_fit(5, 232_448, tile) == 5  # H100 / H200: 227 KB per block
    assert kern.stages_that_fit(5, 166_912, tile) == 4  # A100: 163 KB
    assert kern.stages_that_fit(5, 101_376, tile) == 2  # 99 KB (sm_86 / sm_89)
    assert kern.stages_that_fit(4, 101_376, 64 * 64 * 2) == 4  # D = 64 on the same card
    assert kern.stages_that_fit(5, 60_000, tile) == 1  # never below one
    assert kern.stages_that_fit(2, 232_448, tile) == 2  # never raised


def test_coarse_backward_matches_autograd():
    gen = torch.Generator().manual_seed(5)
    qc, kc, vc = (torch.randn(2, 2, 9, 8, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    out = ((qc @ kc.transpose(-1, -2)) * 0.3).softmax(-1) @ vc
    d = torch.randn_like(out)
    want = torch.autograd.grad(out, (qc, kc, vc), d)
    got = triton_ops.coarse_backward(d, qc.detach(), kc.detach(), vc.detach(), 0.3)
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < 1e-12
