"""GPU tests of VSA with replicated (text) keys on the kernel path, against the fp32 reference.

The public layer (world 1, `[B, S, H, D]` in and out) with text keys must select a compiled VSA row (not the
reference) and match `vsa_tiled_reference` with `extra_k/extra_v/extra_mask` in fp32: forward and gradients,
partial tiles, batch 2, head dims 64 and 128, with and without a key mask (incl. a batch row with no valid text
key). Kernel outputs are poisoned before they are written.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_dist_attn import DistributedAttention_VSA
from diffusers_dist_attn.attention.registry import select_backend
from diffusers_dist_attn.vsa import triton_ops
from diffusers_dist_attn.vsa.reference import block_sparse_attention_reference, coarse_attention
from diffusers_dist_attn.vsa.tiling import tile, tile_layout, topk_for_sparsity, untile

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not triton_ops.is_available(), reason="needs a CUDA GPU and Triton"),
]

TOL = 1e-2  # relative L2, bf16 operands with fp32 accumulation (as tests/gpu/test_vsa_triton.py)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from diffusers_dist_attn.vsa import triton_kernels

    monkeypatch.setattr(triton_kernels, "POISON_OUTPUTS", True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten or broken output)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _mask(kind: str, b: int, n: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones(b, n, dtype=torch.bool, device="cuda")
    mask[0, n * 3 // 4:] = False
    if kind == "empty_row":
        mask[-1] = False  # a batch row whose text is all padding: video queries see only video keys
    return mask


@pytest.mark.parametrize("grid,b,h,d,text", [((5, 6, 7), 2, 2, 64, 24), ((9, 13, 6), 1, 3, 128, 40),
                                               ((4, 4, 4), 2, 2, 128, 16)])
@pytest.mark.parametrize("mask_kind", ["none", "prefix", "empty_row"])
def test_layer_with_text_matches_reference(grid, b, h, d, text, mask_kind):
    torch.manual_seed(sum(grid) + d + text)
    s = grid[0] * grid[1] * grid[2]
    sparsity = 0.5
    x = [torch.randn(b, s, h, d, device="cuda") for _ in range(4)]
    t = [torch.randn(b, text, h, d, device="cuda") for _ in range(3)]
    mask = _mask(mask_kind, b, text)
    layer = DistributedAttention_VSA(h, d)
    assert select_backend("vsa", x[0].bfloat16(), extra_keys=True).name in ("triton", "cuda")
    leaves = [z.bfloat16().requires_grad_() for z in x + t]
    out, rep = layer(*leaves[:3], *leaves[4:7], leaves[3], grid_size=grid, sparsity=sparsity, replicated_mask=mask)
    ref_leaves = [z.bfloat16().float().requires_grad_() for z in x + t]  # same values: same block selection
    layout = tile_layout(grid, "cuda")
    topk = topk_for_sparsity(sparsity, layout.num_blocks)
    rq, rk, rv = ref_leaves[4:7]
    tq, tk, tv, tg = (tile(z, layout) for z in ref_leaves[:4])
    scale = d**-0.5
    from diffusers_dist_attn.vsa import triton_kernels  # needs Triton: imported only where the test runs

    with torch.no_grad():  # the kernel's own top-k sets: near-tie coarse scores may order differently in fp32
        qc, kc, vc = triton_kernels.block_means(*(t.bfloat16() for t in (tq, tk, tv)), layout.block_sizes)
        index = triton_kernels.coarse_select(qc, kc, vc, topk, scale, layout.block_sizes)[3].long()
    out_c = coarse_attention(tq, tk, tv, layout.block_sizes, scale)[0].repeat_interleave(64, dim=2)
    fine = block_sparse_attention_reference(tq, tk, tv, index, layout.block_sizes, scale, extra_k=rk.transpose(1, 2),
                                            extra_v=rv.transpose(1, 2), extra_mask=mask)
    ref = untile(out_c * tg + fine, layout)
    assert _rel(out, ref) < TOL
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves[:4] + leaves[5:7], dout.bfloat16())
    ref_grads = torch.autograd.grad(ref, ref_leaves[:4] + ref_leaves[5:7], dout)
    for name, got, want in zip(("q", "k", "v", "gate", "text_k", "text_v"), grads, ref_grads, strict=True):
        assert _rel(got, want) < TOL, name
    assert rep.shape == rq.shape


@pytest.mark.parametrize("grid,d,text", [((5, 6, 7), 64, 0), ((9, 13, 6), 128, 40)])
def test_all_blocks_runs_dense_and_matches_the_kernel(grid, d, text):
    """Sparsity 0 selects every block: the automatic choice runs dense attention + the coarse stage (untiled) and
    agrees with the Triton kernel (explicit) and the fp32 reference in output and gradients; compiles fullgraph."""
    from diffusers_dist_attn.attention.registry import selection_report

    torch.manual_seed(sum(grid) + d)
    b, h = 2, 2
    s = grid[0] * grid[1] * grid[2]
    x = [torch.randn(b, s, h, d, device="cuda") for _ in range(4)] + [torch.randn(b, text, h, d, device="cuda")
                                                                        for _ in range(3)]
    mask = _mask("prefix", b, text) if text else None
    layer = DistributedAttention_VSA(h, d)
    dout = torch.randn(b, s, h, d, device="cuda")
    results = {}
    for implementation in (None, "triton", "torch"):
        leaves = [z.bfloat16().requires_grad_() if implementation != "torch" else z.bfloat16().float().requires_grad_()
                  for z in x]
        rep_args = leaves[4:7] if text else [None, None, None]
        out, _ = layer(*leaves[:3], *rep_args, leaves[3], grid_size=grid, sparsity=0.0, replicated_mask=mask,
                       implementation=implementation)
        grads = torch.autograd.grad(out, leaves[:4] + (leaves[5:7] if text else []), dout.to(out.dtype))
        results[implementation] = (out, grads, selection_report()["vsa"])
    assert [results[i][2] for i in (None, "triton", "torch")] == ["dense", "triton", "torch"]
    ref_out, ref_grads, _ = results["torch"]
    for implementation in (None, "triton"):
        out, grads, _ = results[implementation]
        assert _rel(out, ref_out) < TOL, implementation
        for got, want in zip(grads, ref_grads, strict=True):
            assert _rel(got, want) < TOL, implementation
    q, k, v, g = (z.bfloat16() for z in x[:4])
    rep_args = [z.bfloat16() for z in x[4:7]] if text else [None, None, None]
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(q, k, v, *rep_args, g, grid_size=grid, sparsity=0.0, replicated_mask=mask)[0]
    assert _rel(out, results[None][0]) < TOL  # compiled: the gate epilogue fuses (one bf16 rounding, not two)


def test_text_path_compiles_fullgraph():
    torch.manual_seed(0)
    grid, h, d = (4, 8, 8), 2, 64
    s = grid[0] * grid[1] * grid[2]
    q, k, v, g = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    tq, tk, tv = (torch.randn(1, 16, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(1, 16, dtype=torch.bool, device="cuda")
    layer = DistributedAttention_VSA(h, d)
    eager = layer(q, k, v, tq, tk, tv, g, grid_size=grid, sparsity=0.5, replicated_mask=mask)[0]
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(q, k, v, tq, tk, tv, g, grid_size=grid, sparsity=0.5, replicated_mask=mask)[0]
    assert _rel(out, eager) < 1e-3


@pytest.mark.parametrize("d,with_gate", [(64, True), (128, False), (128, True)])
def test_fused_merge_matches_torch(d, with_gate):
    """The Triton merge kernel against its PyTorch formula: strided text LSE (as the padded efficient-kernel LSE),
    a row block without valid text keys (lse_t = -inf), bf16 outputs."""
    from diffusers_dist_attn.attention import vsa_joint

    if vsa_joint._merge_triton is None:
        pytest.skip("Triton merge kernel unavailable")
    torch.manual_seed(d)
    b, h, n = 2, 3, 5
    s = 64 * n
    out_s = torch.randn(b, h, s, d, device="cuda").bfloat16()
    lse2 = torch.randn(b, h, s, device="cuda") * 3
    out_t = torch.randn(b, s, h, d, device="cuda").bfloat16().transpose(1, 2)  # a [B, S, H, D] buffer's view
    lse_t = (torch.randn(b, h, s + 32, device="cuda") * 3)[..., :s]  # padded LSE, sliced
    lse_t[1, 2, :64] = float("-inf")
    out_c = torch.randn(b, h, n, d, device="cuda")
    gate = torch.randn(b, h, s, d, device="cuda").bfloat16() if with_gate else None
    sizes = torch.tensor([64, 23, 64, 1, 40], device="cuda", dtype=torch.int32)  # zero at the pad slots
    got = vsa_joint._merge_triton(out_s, lse2, out_t, lse_t, out_c, gate, sizes)
    want = vsa_joint._merge_torch(out_s, lse2, out_t, lse_t, out_c, gate, sizes)
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) < 1e-2
    assert (got[2] - want[2]).abs().max() < 1e-4
