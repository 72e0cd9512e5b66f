"""What the Triton and CUDA VSA custom ops share: schemas, fake kernels, the autograd formula, input checks.

Both forward ops (`diffusers_dist_attn::vsa_fwd` in `triton_ops`, `diffusers_dist_attn::vsa_fwd_cuda` in
`cuda_ops`) have the same schema and the same ten outputs `(out, lse, out_s, out_c, sel, q2k_idx, q2k_num, q_c, k_c,
v_c)`, so they share one fake kernel and one autograd formula whose backward is the Triton `vsa_bwd` op.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from .tiling import BLOCK

__all__ = ["FWD_SCHEMA", "BWD_SCHEMA", "KERNEL_DTYPES", "fwd_fake", "setup_context", "backward", "check_tiled",
           "prepare_tiled", "triton_kernels"]

KERNEL_DTYPES = (torch.bfloat16, torch.float16)

FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? gate, Tensor block_sizes, int topk, float scale, bool save_out_s)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? gate, Tensor out_s, Tensor lse, Tensor out_c,"
    " Tensor sel, Tensor q2k_idx, Tensor q2k_num, Tensor q_c, Tensor k_c, Tensor v_c, Tensor block_sizes,"
    " float scale) -> (Tensor, Tensor, Tensor, Tensor)"
)


def fwd_fake(q, k, v, gate, block_sizes, topk, scale, save_out_s):
    """Output metadata of the forward ops (meta tensors under torch.compile)."""
    b, h, s, d = q.shape
    n = s // BLOCK
    f32, i32 = torch.float32, torch.int32
    return (
        torch.empty_like(q),
        q.new_empty(b, h, s, dtype=f32),
        torch.empty_like(q) if save_out_s else q.new_empty(0),
        q.new_empty(b, h, n, d, dtype=f32),
        q.new_empty(b, h, n, n, dtype=torch.uint8),
        q.new_empty(b, h, n, topk, dtype=i32),
        q.new_empty(b, h, n, 3, dtype=i32),
        q.new_empty(b, h, n, d),
        k.new_empty(b, h, n, d),
        v.new_empty(b, h, n, d),
    )


def setup_context(ctx, inputs, output):
    q, k, v, gate, block_sizes, _topk, scale, _save = inputs
    _out, lse, out_s, out_c, sel, idx, num, qc, kc, vc = output
    ctx.scale = scale
    ctx.has_gate = gate is not None
    ctx.set_materialize_grads(False)  # the auxiliary outputs never get gradients; skip zero-filling them
    ctx.save_for_backward(q, k, v, gate, block_sizes, out_s, lse, out_c, sel, idx, num, qc, kc, vc)


def backward(ctx, dout, *_unused):
    if dout is None:
        return None, None, None, None, None, None, None, None
    q, k, v, gate, block_sizes, out_s, lse, out_c, sel, idx, num, qc, kc, vc = ctx.saved_tensors
    if out_s.numel() == 0:
        raise RuntimeError("vsa_fwd ran with save_out_s=False (no grad was required); cannot differentiate it")
    dq, dk, dv, dgate = torch.ops.diffusers_dist_attn.vsa_bwd(
        dout.contiguous(), q, k, v, gate, out_s, lse, out_c, sel, idx, num, qc, kc, vc, block_sizes, ctx.scale
    )
    return dq, dk, dv, (dgate if ctx.has_gate else None), None, None, None, None


@functools.cache
def triton_kernels() -> ModuleType:
    """The Triton kernel module (imported on first use: it needs Triton)."""
    from . import triton_kernels as module

    return module


def check_tiled(q, k, v, gate, block_sizes: torch.Tensor, topk: int) -> int:
    """Validate tiled `[B, H, 64*N, D]` inputs of the VSA ops; returns N."""
    s = q.shape[2]
    if s % BLOCK or k.shape != q.shape or v.shape != q.shape or (gate is not None and gate.shape != q.shape):
        raise ValueError(f"q, k, v, gate must share a [B, H, 64*N, D] shape; got {q.shape}, {k.shape}, {v.shape}")
    n = s // BLOCK
    if block_sizes.numel() != n:
        raise ValueError(f"block_sizes has {block_sizes.numel()} entries for {n} blocks")
    if not 1 <= topk <= n:
        raise ValueError(f"topk must be in [1, {n}], got {topk}")
    if k.dtype != q.dtype or v.dtype != q.dtype or (gate is not None and gate.dtype != q.dtype):
        raise ValueError("q, k, v and gate must share one dtype")
    return n


def prepare_tiled(q, k, v, gate, block_sizes: torch.Tensor, topk: int, scale: float | None) -> tuple:
    """Checked, contiguous arguments `(q, k, v, gate, sizes, topk, scale, save_out_s)` of the forward ops."""
    check_tiled(q, k, v, gate, block_sizes, topk)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tensors = (q, k, v) if gate is None else (q, k, v, gate)
    save_out_s = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    gate = None if gate is None else gate.contiguous()
    sizes = block_sizes.to(device=q.device, dtype=torch.int32).contiguous()
    return q.contiguous(), k.contiguous(), v.contiguous(), gate, sizes, int(topk), scale, save_out_s
