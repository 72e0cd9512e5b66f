"""The fused Triton rotary kernel (`attention/rotary_triton.py`) vs the PyTorch formula: outputs and gradients.

Runs on a CUDA GPU with Triton, or on CPU under Triton's interpreter (`TRITON_INTERPRET=1` with triton
installed); skipped otherwise. Inputs: odd sizes, non-contiguous `x`, tables of batch 1 and B, `[S, D/2]` and
diffusers' `[1, S, 1, D]` layouts, outputs poisoned first (the kernel must write every element).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from diffusers_dist_attn.attention import rotary

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_HAS_TRITON and (torch.cuda.is_available() or _INTERPRET)),
                       reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1)"),
]


def _tables(b_tab, s, d, layout):
    gen = torch.Generator().manual_seed(3)
    angles = torch.rand(b_tab, s, d // 2, generator=gen, dtype=torch.float64) * 6.3
    if layout == "half":  # [S, D/2] (FastVideo / HunyuanVideo)
        return angles[0].cos().float().to(DEVICE), angles[0].sin().float().to(DEVICE)
    # diffusers' Wan: [B, S, 1, D], each angle repeated
    cos = angles.cos().repeat_interleave(2, -1)[:, :, None].float().to(DEVICE)
    sin = angles.sin().repeat_interleave(2, -1)[:, :, None].float().to(DEVICE)
    return cos, sin


def _x(b, s, h, d, dtype, contiguous):
    gen = torch.Generator().manual_seed(1)
    if contiguous:
        return torch.randn(b, s, h, d, generator=gen).to(DEVICE, dtype)
    # a head slice of a wider tensor, as after the Ulysses all-to-all: strides of [B, S, H + 3, D]
    return torch.randn(b, s, h + 3, d, generator=gen).to(DEVICE, dtype)[:, :, 1:h + 1]


CASES = [  # b, s, h, d, table batch, table layout, contiguous
    (1, 37, 3, 128, 1, "full", True),
    (2, 19, 5, 64, 2, "full", False),
    (2, 33, 2, 128, 1, "half", False),
    (1, 7, 1, 32, 1, "half", True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_matches_torch_formula(case, dtype, monkeypatch):
    b, s, h, d, b_tab, layout, contiguous = case
    x = _x(b, s, h, d, dtype, contiguous)
    tables = _tables(b_tab, s, d, layout)
    cos, sin = rotary.normalize_rotary_tables(tables, d)
    want = rotary.rotary_torch(x, cos, sin)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: torch.full(a[0], float("nan"), **k))  # poison the output
    from diffusers_dist_attn.attention.rotary_triton import rotary_fused

    got = rotary_fused(x, cos, sin, 1)
    monkeypatch.undo()
    assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
    # fp32: FMA vs separate rounding; bf16: at most one ulp (2^-7 relative) from rounding a slightly different fp32
    rel = 1e-6 if dtype == torch.float32 else 2.0**-7
    assert torch.isfinite(got).all()
    assert ((got.float() - want.float()).abs() <= rel * want.float().abs() + 1e-6).all()
    if DEVICE == "cuda":  # the public entry point takes the fused path on CUDA
        assert torch.equal(rotary.apply_rotary(x, tables), got)


def test_gradient_is_the_inverse_rotation():
    b, s, h, d = 2, 21, 3, 64
    x = _x(b, s, h, d, torch.float32, True).requires_grad_()
    cos, sin = rotary.normalize_rotary_tables(_tables(1, s, d, "full"), d)
    from diffusers_dist_attn.attention.rotary_triton import rotary_fused

    w = torch.randn(b, s, h, d, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (rotary_fused(x, cos, sin, 1) * w).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (rotary.rotary_torch(x_ref, cos, sin) * w).sum().backward()
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of a Triton op needs CUDA")
def test_compiles_without_graph_breaks():
    x = _x(1, 40, 4, 128, torch.bfloat16, True)
    tables = _tables(1, 40, 128, "full")

    def f(x):
        return rotary.apply_rotary(x * 2, tables).float().sum()

    assert torch.compile(f, fullgraph=True)(x).item() == pytest.approx(f(x).item(), rel=1e-3)
