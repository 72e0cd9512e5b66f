"""GPU tests of the opt-in sm_90a VSA forward (`diffusers_dist_attn/kernels/vsa_fwd_sm90.cu`); skipped unless an sm_90 GPU
and Triton are present. On such a machine a failed build FAILS (the reason is in the message), it is not skipped.

Compared with the fp32 reference (`diffusers_dist_attn.vsa.reference`) at partial tiles, batch 2, head_dim 64/128,
with every output poisoned (NaN / -1) before the kernel writes it, and directly against the Triton fine stage on
the same index lists (including lists shorter than `maxk`). Helpers and tolerances come from test_vsa_triton.py.

    DIFFUSERS_DIST_ATTN_VSA_CUDA=1 python -m pytest -q tests/gpu/test_vsa_cuda.py
"""

from __future__ import annotations

import pytest
import torch
from test_vsa_triton import TOL, _inputs, _rel, check_forward, check_gradients

from diffusers_dist_attn.attention.backends import available_implementations
from diffusers_dist_attn.attention.registry import select_backend
from diffusers_dist_attn.vsa import cuda_build, cuda_ops, triton_ops
from diffusers_dist_attn.vsa.reference import real_slots
from diffusers_dist_attn.vsa.tiling import topk_for_sparsity


def _hopper() -> bool:
    return bool(torch.cuda.is_available()) and torch.cuda.get_device_capability() == (9, 0)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_hopper() and triton_ops.is_available()), reason="needs an sm_90 GPU and Triton"),
]

LSE_ATOL = 2e-2  # base-2 log-sum-exp of bf16 logits


@pytest.fixture(scope="module")
def ext():
    result = cuda_build.build(verbose=True)
    if result.module is None:
        pytest.fail(f"the sm_90a extension did not build: {result.reason}")
    return result.module


@pytest.fixture(autouse=True)
def _poison_and_enable(monkeypatch):
    from diffusers_dist_attn.vsa import triton_kernels

    monkeypatch.setattr(triton_kernels, "POISON_OUTPUTS", True)
    monkeypatch.setenv(cuda_ops.ENABLE_ENV, "1")
    yield


CASES = [
    # grid, batch, heads, head_dim
    ((21, 30, 52), 1, 2, 128),  # Wan 480p grid: 624 blocks, partial tiles down to 8 tokens
    ((5, 7, 9), 2, 3, 64),  # small odd grid, 12 blocks, batch 2
    ((9, 13, 6), 2, 2, 128),  # batch 2, partial tiles
    ((4, 4, 4), 1, 2, 64),  # a single block
    ((9, 9, 9), 1, 3, 128),  # 27 blocks, 81 tiles: odd tile count (idle second consumer in the last CTA)
]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-b{c[1]}h{c[2]}d{c[3]}")
@pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "nogate"])
def test_forward_matches_reference(ext, case, sparsity, with_gate):
    check_forward(cuda_ops.vsa_tiled_cuda, (*case, torch.bfloat16), sparsity, with_gate)


def _lse_err(lse: torch.Tensor, want: torch.Tensor, block_sizes: torch.Tensor) -> float:
    """Largest LSE difference over the real slots (the LSE of pad slots is not part of the contract)."""
    return (lse - want)[..., real_slots(block_sizes)].abs().max().item()


def _one_group(counts: torch.Tensor) -> torch.Tensor:
    """List lengths `[B, H, N]` -> `q2k_num [B, H, N, 3]` with every listed block in the 64-row size class (any
    block may be read as a 64-row tile; the CUDA forward reads only the last end)."""
    return counts[..., None].expand(*counts.shape, 3).contiguous()


def _random_lists(b, h, n, maxk, gen, *, ragged):
    """Ascending random key-block lists `[B, H, N, maxk]` (int32) and their `q2k_num` (all maxk, or 1..maxk)."""
    scores = torch.rand(b, h, n, n, device="cuda", generator=gen)
    idx = scores.topk(maxk, dim=-1).indices.sort(-1).values.to(torch.int32).contiguous()
    if ragged:
        num = torch.randint(1, maxk + 1, (b, h, n), device="cuda", generator=gen, dtype=torch.int32)
    else:
        num = torch.full((b, h, n), maxk, device="cuda", dtype=torch.int32)
    return idx, _one_group(num)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "nogate"])
def test_fine_stage_matches_triton(ext, d, ragged, with_gate):
    """The CUDA forward alone vs the Triton fine stage on identical inputs and index lists: out, out_s, lse."""
    from diffusers_dist_attn.vsa import triton_kernels as kern

    q, k, v, g, bs = _inputs((9, 13, 6), 2, 3, d, torch.bfloat16, gate=with_gate, seed=3)
    b, h, s, _ = q.shape
    n = s // 64
    gen = torch.Generator(device="cuda").manual_seed(5)
    idx, num = _random_lists(b, h, n, min(7, n), gen, ragged=ragged)
    out_c = torch.randn(b, h, n, d, device="cuda", generator=gen)
    scale = d**-0.5
    want_out, want_lse, want_os = kern.sparse_fwd(q, k, v, g, out_c, idx, num, bs, scale, True)
    out, out_s, lse = kern.new_output(q.shape, q), kern.new_output(q.shape, q), kern.new_output(q.shape[:3], q, torch.float32)
    ext.sparse_fwd(q, k, v, g, out_c, idx, num, bs, scale, out, out_s, lse)
    torch.cuda.synchronize()
    assert _rel(out_s, want_os) <= TOL
    assert _rel(out, want_out) <= TOL
    assert torch.isfinite(lse).all() and _lse_err(lse, want_lse, bs) <= LSE_ATOL


@pytest.mark.parametrize("d", [64, 128])
def test_fine_stage_overlapping_unsorted_lists(ext, d):
    """Lists of query block 2j + 1 mostly equal to block 2j's, in no index order (top-k order with the even
    positions reversed), ragged counts (5-9 blocks: odd and even lengths through the two-step software pipeline),
    27 blocks per head x 4 heads (odd: the CTA pairs shift by one block per head): the CUDA forward equals the
    Triton fine stage."""
    from diffusers_dist_attn.vsa import triton_kernels as kern

    q, k, v, g, bs = _inputs((9, 9, 9), 2, 2, d, torch.bfloat16, gate=True, seed=6)
    b, h, s, _ = q.shape
    n = s // 64
    gen = torch.Generator(device="cuda").manual_seed(7)
    scores = torch.rand(b, h, n, n, device="cuda", generator=gen)
    scores[:, :, 1::2] = scores[:, :, 0:-1:2] + 0.1 * torch.rand(b, h, n // 2, n, device="cuda", generator=gen)
    idx = scores.topk(9, dim=-1).indices.to(torch.int32)  # descending score: no index order
    idx[..., ::2] = idx[..., ::2].flip(-1)
    idx = idx.contiguous()
    num = _one_group(torch.randint(5, 10, (b, h, n), device="cuda", generator=gen, dtype=torch.int32))
    out_c = torch.randn(b, h, n, d, device="cuda", generator=gen)
    want_out, want_lse, want_os = kern.sparse_fwd(q, k, v, g, out_c, idx, num, bs, d**-0.5, True)
    out, out_s, lse = kern.new_output(q.shape, q), kern.new_output(q.shape, q), kern.new_output(q.shape[:3], q, torch.float32)
    ext.sparse_fwd(q, k, v, g, out_c, idx, num, bs, d**-0.5, out, out_s, lse)
    torch.cuda.synchronize()
    assert _rel(out_s, want_os) <= TOL and _rel(out, want_out) <= TOL
    assert torch.isfinite(lse).all() and _lse_err(lse, want_lse, bs) <= LSE_ATOL


def test_fine_stage_without_out_s(ext):
    from diffusers_dist_attn.vsa import triton_kernels as kern

    q, k, v, g, bs = _inputs((5, 7, 9), 2, 2, 128, torch.bfloat16, seed=4)
    b, h, s, d = q.shape
    n = s // 64
    idx, num = _random_lists(b, h, n, 5, torch.Generator(device="cuda").manual_seed(1), ragged=False)
    out_c = torch.zeros(b, h, n, d, device="cuda")
    want_out, want_lse, _ = kern.sparse_fwd(q, k, v, g, out_c, idx, num, bs, 0.1, False)
    out, lse = kern.new_output(q.shape, q), kern.new_output(q.shape[:3], q, torch.float32)
    ext.sparse_fwd(q, k, v, g, out_c, idx, num, bs, 0.1, out, None, lse)
    assert _rel(out, want_out) <= TOL and _lse_err(lse, want_lse, bs) <= LSE_ATOL


GRAD_CASES = [
    (((21, 30, 52), 1, 1, 128), 0.9),
    (((5, 7, 9), 2, 2, 64), 0.5),
    (((7, 6, 5), 2, 2, 128), 0.0),
]


@pytest.mark.parametrize(("case", "sparsity"), GRAD_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-b{c[1]}h{c[2]}d{c[3]}-s{s}" for c, s in GRAD_CASES])
@pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "nogate"])
def test_gradients_match_reference(ext, case, sparsity, with_gate):
    """CUDA forward + Triton backward (the backward reads the CUDA forward's out_s and lse)."""
    check_gradients(cuda_ops.vsa_tiled_cuda, (*case, torch.bfloat16), sparsity, with_gate)


def test_dispatch_opt_in(ext, monkeypatch):
    """Opted in, the CUDA forward runs when named; the automatic choice stays Triton (the faster one measured)."""
    assert available_implementations("cuda")[:2] == ["triton", "cuda"]
    q = torch.zeros(1, 2, 64, 128, device="cuda", dtype=torch.bfloat16)
    assert select_backend("vsa", q).name == "triton"
    assert select_backend("vsa", q, requested="cuda", strict=True).name == "cuda"
    monkeypatch.delenv(cuda_ops.ENABLE_ENV)
    assert "cuda" not in available_implementations("cuda")


def test_unsupported_inputs_fall_back_to_triton(ext):
    q, k, v, g, bs = _inputs((5, 7, 9), 1, 2, 64, torch.float16, seed=2)
    with torch.no_grad():
        assert torch.equal(cuda_ops.vsa_tiled_cuda(q, k, v, g, bs, 4), triton_ops.vsa_tiled_triton(q, k, v, g, bs, 4))


def test_torch_compile_fullgraph(ext):
    q, k, v, g, bs = _inputs((5, 7, 9), 2, 2, 128, torch.bfloat16, requires_grad=True)
    topk = topk_for_sparsity(0.5, bs.numel())

    def layer(q, k, v, g):
        return cuda_ops.vsa_tiled_cuda(q * 1.0, k, v, g, bs, topk).float().square().mean()

    loss = torch.compile(layer, fullgraph=True)(q, k, v, g)
    grads = torch.autograd.grad(loss, (q, k, v, g))
    loss_eager = layer(q, k, v, g)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v, g))
    assert abs(loss.item() - loss_eager.item()) <= 1e-3 * abs(loss_eager.item())
    for got, want in zip(grads, grads_eager, strict=True):
        assert _rel(got, want) <= TOL
