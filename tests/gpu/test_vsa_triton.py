"""GPU tests of the Triton VSA path against the fp32 PyTorch reference (skipped without CUDA + Triton).

Every kernel output is poisoned (NaN / -1) before the kernels write it; inputs are fresh random draws with exact
zeros in pad slots. Tolerance: relative L2 error <= 1e-2 (bf16/fp16 operands, fp32 accumulation).
"""

from __future__ import annotations

import pytest
import torch

from diffusers_dist_attn.vsa import triton_ops
from diffusers_dist_attn.vsa.reference import (
    block_sparse_attention_reference,
    coarse_attention,
    real_slots,
    topk_block_indices,
    vsa_tiled_reference,
)
from diffusers_dist_attn.vsa.tiling import tile_layout, topk_for_sparsity

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not triton_ops.is_available(), reason="needs a CUDA GPU and Triton"),
]

TOL = 1e-2
# Rows whose top-k set may differ from the reference because two coarse scores are closer than the fp32
# summation-order noise; anything above this share is a bug, not noise.
MAX_SELECTION_MISMATCH = 0.005


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from diffusers_dist_attn.vsa import triton_kernels

    monkeypatch.setattr(triton_kernels, "POISON_OUTPUTS", True)
    yield


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten or broken output)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(grid, b, h, d, dtype, *, gate=True, seed=0, requires_grad=False):
    """Random tiled q, k, v, gate `[B, H, 64N, D]` with zero pad slots, and the layout's block sizes."""
    layout = tile_layout(grid, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    s = layout.tiled_len
    valid = (torch.arange(64, device="cuda")[None] < layout.block_sizes[:, None]).reshape(1, 1, s, 1)

    def draw():
        x = (torch.randn(b, h, s, d, device="cuda", generator=gen) * valid).to(dtype)
        return x.requires_grad_(requires_grad)

    q, k, v = draw(), draw(), draw()
    return q, k, v, (draw() if gate else None), layout.block_sizes


def _kernel_index(q, k, v, block_sizes, topk, scale):
    from diffusers_dist_attn.vsa import triton_kernels as kern

    qc, kc, vc = kern.block_means(q, k, v, block_sizes)
    return kern.coarse_select(qc, kc, vc, topk, scale, block_sizes)[3].long().sort(-1).values


def _reference(q, k, v, gate, block_sizes, topk):
    """fp32 reference; when the top-k sets differ in a few near-tie rows, the reference with the kernel's sets.

    Returns (reference output, share of rows whose selection differs).
    """
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        _, scores = coarse_attention(q, k, v, block_sizes, scale)
        ref_idx = topk_block_indices(scores, topk).sort(-1).values
        ker_idx = _kernel_index(q.detach(), k.detach(), v.detach(), block_sizes, topk, scale)
    mismatch = (ref_idx != ker_idx).any(-1).float().mean().item()
    if mismatch == 0:
        return vsa_tiled_reference(q, k, v, gate, block_sizes, topk), 0.0
    b, h, s, d = q.shape
    out_c, _ = coarse_attention(q, k, v, block_sizes, scale)
    out_c = out_c.repeat_interleave(64, dim=2)
    out_s = block_sparse_attention_reference(q, k, v, ker_idx, block_sizes, scale)
    real = real_slots(block_sizes)[:, None]  # zero at pad slots, as vsa_tiled_reference
    return ((out_c if gate is None else out_c * gate) + out_s) * real, mismatch


CASES = [
    # grid, batch, heads, head_dim, dtype
    ((21, 30, 52), 1, 2, 128, torch.bfloat16),  # Wan 480p grid: 624 blocks, partial tiles down to 8 tokens
    ((5, 7, 9), 2, 3, 64, torch.bfloat16),  # small odd grid, 12 blocks, batch 2
    ((9, 13, 6), 2, 2, 128, torch.float16),
    ((4, 4, 4), 1, 2, 64, torch.bfloat16),  # a single block
    ((9, 9, 9), 1, 2, 128, torch.bfloat16),  # 27 blocks: odd count (two-block programs at sparsity 0)
]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-b{c[1]}h{c[2]}d{c[3]}-{c[4]}")
@pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "nogate"])
def test_forward_matches_reference(case, sparsity, with_gate):
    check_forward(triton_ops.vsa_tiled_triton, case, sparsity, with_gate)


def check_forward(vsa, case, sparsity, with_gate):
    """`vsa(q, k, v, gate, block_sizes, topk)` vs the fp32 reference (shared with test_vsa_cuda.py)."""
    grid, b, h, d, dtype = case
    q, k, v, g, bs = _inputs(grid, b, h, d, dtype, gate=with_gate, seed=hash((grid, sparsity)) % 1000)
    topk = topk_for_sparsity(sparsity, bs.numel())
    with torch.no_grad():
        out = vsa(q, k, v, g, bs, topk)
        ref, mismatch = _reference(q, k, v, g, bs, topk)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert mismatch <= MAX_SELECTION_MISMATCH
    assert _rel(out, ref) <= TOL


GRAD_CASES = [
    # (grid, batch, heads, head_dim, dtype), sparsity; the 624-block grid skips sparsity 0 only to bound the
    # reference's autograd memory (dense over 40k keys); small grids cover sparsity 0.
    *[(((21, 30, 52), 1, 1, 128, torch.bfloat16), s) for s in (0.5, 0.9)],
    *[(((5, 7, 9), 2, 2, 64, torch.bfloat16), s) for s in (0.0, 0.5, 0.9)],
    *[(((7, 6, 5), 2, 2, 128, torch.float16), s) for s in (0.0, 0.5, 0.9)],
    (((13, 10, 17), 1, 2, 128, torch.bfloat16), 0.0),
    (((9, 9, 9), 1, 2, 128, torch.bfloat16), 0.0),
]


@pytest.mark.parametrize(
    ("case", "sparsity"),
    GRAD_CASES,
    ids=[f"{'x'.join(map(str, c[0]))}-b{c[1]}h{c[2]}d{c[3]}-{str(c[4])[6:]}-s{s}" for c, s in GRAD_CASES],
)
@pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "nogate"])
def test_gradients_match_reference(case, sparsity, with_gate):
    check_gradients(triton_ops.vsa_tiled_triton, case, sparsity, with_gate)


def check_gradients(vsa, case, sparsity, with_gate):
    """Output and q/k/v/gate gradients of `vsa` vs the fp32 reference (shared with test_vsa_cuda.py)."""
    grid, b, h, d, dtype = case
    q, k, v, g, bs = _inputs(grid, b, h, d, dtype, gate=with_gate, seed=7, requires_grad=True)
    topk = topk_for_sparsity(sparsity, bs.numel())
    inputs = [t for t in (q, k, v, g) if t is not None]
    out = vsa(q, k, v, g, bs, topk)
    ref, mismatch = _reference(q, k, v, g, bs, topk)
    assert mismatch <= MAX_SELECTION_MISMATCH
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_grads = torch.autograd.grad(ref, inputs, dout)
    assert _rel(out, ref) <= TOL
    for name, got, want in zip("qkvg", grads, ref_grads, strict=False):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert _rel(got, want) <= TOL, name


@pytest.mark.parametrize("n", [12, 624, 1182, 2160])
@pytest.mark.parametrize("topk", [1, 7, 64])
def test_topk_selects_exactly_k_and_matches_torch_topk(n, topk):
    from diffusers_dist_attn.vsa import triton_kernels as kern

    topk = min(topk, n)
    gen = torch.Generator(device="cuda").manual_seed(n + topk)
    qc, kc, vc = (torch.randn(2, 2, n, 64, device="cuda", generator=gen).bfloat16() for _ in range(3))
    sizes = torch.randint(1, 65, (n,), device="cuda", generator=gen, dtype=torch.int32)  # all three size classes
    out_c, scores, sel, idx, num = kern.coarse_select(qc, kc, vc, topk, 0.125, sizes)
    ref_scores = (qc.float() @ kc.float().transpose(-1, -2)) * 0.125
    assert _rel(scores, ref_scores) < 1e-5
    assert _rel(out_c, (ref_scores.softmax(-1) @ vc.float())) < TOL
    assert (sel.sum(-1) == topk).all() and (num[..., 2] == topk).all()
    # rows whose k-th and (k+1)-th scores differ (exact ties are checked below)
    ranked = scores.sort(-1, descending=True).values
    distinct = ranked[..., topk - 1] != ranked[..., topk] if topk < n else torch.ones_like(ranked[..., 0]).bool()
    assert distinct.float().mean() > 0.99
    want_sel, want_idx, want_num = triton_ops.topk_select_torch(scores, topk, sizes)  # grouped by size class
    assert torch.equal(idx[distinct], want_idx[distinct]) and torch.equal(num[distinct], want_num[distinct])
    want = torch.topk(scores, topk, dim=-1).indices.sort(-1).values
    assert torch.equal(idx.long().sort(-1).values[distinct], want[distinct])
    assert torch.equal(sel.bool(), torch.zeros_like(sel, dtype=torch.bool).scatter_(-1, idx.long(), True))


def test_topk_ties_take_lowest_index():
    from diffusers_dist_attn.vsa import triton_kernels as kern

    n = 40
    kc = torch.randn(1, 2, n, 64, device="cuda").bfloat16()
    kc[:, :, 5] = kc[:, :, 2]  # duplicated key blocks: exact ties
    kc[:, :, 31] = kc[:, :, 2]
    qc = torch.randn(1, 2, n, 64, device="cuda").bfloat16()
    qc[:, :, :3] = 0  # rows of all-equal scores
    sizes = torch.full((n,), 64, device="cuda", dtype=torch.int32)
    for topk in (1, 3, 8, n):
        _, scores, sel, idx, num = kern.coarse_select(qc, kc, kc, topk, 0.125, sizes)
        want_sel, want_idx, _ = triton_ops.topk_select_torch(scores, topk, sizes)
        assert torch.equal(idx, want_idx) and torch.equal(sel, want_sel)
        assert idx[0, 0, 0].tolist() == list(range(topk))


def test_k2q_matches_torch():
    from diffusers_dist_attn.vsa import triton_kernels as kern

    n = 300
    sel = (torch.rand(2, 3, n, n, device="cuda") < 0.1).to(torch.uint8)
    sizes = torch.randint(1, 65, (n,), device="cuda", dtype=torch.int32)
    k2q, num = kern.build_k2q(sel, sizes)
    want, want_num = triton_ops.k2q_from_mask_torch(sel, sizes)
    assert torch.equal(num, want_num)
    valid = torch.arange(n, device="cuda") < num[..., 2:]
    assert torch.equal(k2q[valid], want[valid])


def test_noncontiguous_inputs():
    q, k, v, g, bs = _inputs((5, 7, 9), 1, 2, 64, torch.bfloat16)
    as_bshd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, g)]
    with torch.no_grad():
        out = triton_ops.vsa_tiled_triton(*as_bshd, bs, 4)
        ref = triton_ops.vsa_tiled_triton(q, k, v, g, bs, 4)
    assert torch.equal(out, ref)


def test_torch_compile_fullgraph():
    q, k, v, g, bs = _inputs((5, 7, 9), 2, 2, 64, torch.bfloat16, requires_grad=True)
    topk = topk_for_sparsity(0.5, bs.numel())

    def layer(q, k, v, g):
        return triton_ops.vsa_tiled_triton(q * 1.0, k, v, g, bs, topk).float().square().mean()

    compiled = torch.compile(layer, fullgraph=True)
    loss = compiled(q, k, v, g)
    grads = torch.autograd.grad(loss, (q, k, v, g))
    loss_eager = layer(q, k, v, g)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v, g))
    assert abs(loss.item() - loss_eager.item()) <= 1e-3 * abs(loss_eager.item())
    for got, want in zip(grads, grads_eager, strict=True):
        assert _rel(got, want) <= TOL


@pytest.mark.parametrize(("grid", "size_classes"), [((9, 9, 9), False), ((9, 9, 9), True), ((5, 7, 9), True)],
                         ids=["9x9x9-one-class", "9x9x9", "5x7x9"])
def test_grouped_dense_path(monkeypatch, grid, size_classes):
    """topk == N with two blocks per program (off by default; selectable in CONFIGS) matches the reference, with and
    without size classes."""
    from diffusers_dist_attn.vsa import triton_kernels as kern

    monkeypatch.setattr(kern, "SIZE_CLASSES", size_classes)
    for name in ("fwd_dense", "dq_dense", "dkdv_dense"):
        monkeypatch.setitem(kern.CONFIGS, name, {**kern.CONFIGS[name], "group": 2})
    q, k, v, g, bs = _inputs(grid, 2, 2, 128, torch.bfloat16, seed=11, requires_grad=True)
    topk = bs.numel()
    out = triton_ops.vsa_tiled_triton(q, k, v, g, bs, topk)
    ref = vsa_tiled_reference(q, k, v, g, bs, topk)
    dout = torch.randn_like(out)
    assert _rel(out, ref) <= TOL
    grads = torch.autograd.grad(out, (q, k, v, g), dout)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v, g), dout), strict=True):
        assert _rel(got, want) <= TOL
