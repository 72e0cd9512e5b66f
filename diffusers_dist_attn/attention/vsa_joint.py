"""VSA with replicated (text) keys on the kernel path: one softmax over the selected video blocks and the text keys.

The fine stage of VSA with text is `softmax(q [K_sel ; K_text]^T) [V_sel ; V_text]`. It is computed as two exact
partial softmaxes merged through their log-sum-exps, the way ring attention merges blocks:

- the sparse video part by the VSA forward op (Triton or CUDA), which returns the fine output `out_s` and its
  base-2 LSE;
- the text part by a dense kernel that returns its LSE (`attention_forward_with_lse`: PyTorch's flash kernel
  without a mask, its memory-efficient kernel with a key mask, exact math elsewhere);
- `fine = out_s * exp(lse_s - lse) + out_t * exp(lse_t - lse)`, `lse = logaddexp(lse_s, lse_t)`, and the coarse
  term `rep64(out_c) * gate` is added as in VSA without text (one fused Triton kernel on CUDA,
  `vsa_joint_triton.py`; PyTorch elsewhere); zero at pad slots, as VSA's output is.

Backward: each part's gradients computed with the *merged* output and LSE are its slice of the joint softmax's
gradients (FlashAttention's identity), so the VSA backward op gets `(fine, lse)` in place of its own `(out_s,
lse_s)` and the text part runs the dense backward with the same pair; their `dq` add up. `dout` is zeroed at pad
slots first (no gradient flows from them; the VSA op ignores it there on its own).
"""

from __future__ import annotations

import importlib.util
import math

import torch

from ..vsa.op_contract import prepare_tiled
from ..vsa.reference import real_slots
from ..vsa.tiling import BLOCK
from .backends import attention_backward_with_lse, attention_forward_with_lse
from .ring import merge_partials

__all__ = ["vsa_with_text"]

_LN2 = math.log(2.0)


def _merge_torch(out_s, lse2, out_t, lse_t, out_c, gate, block_sizes):
    """`(out, fine, lse)` of the merge, in PyTorch (CPU; the reference of the Triton merge kernel): the two softmax
    partials merged by `ring.merge_partials` (on `[B, S, H, D]` views), then the gated coarse term; zero at pad
    slots."""
    fine, lse = merge_partials(out_s.float().transpose(1, 2), lse2 * _LN2,  # the kernels keep base-2 LSEs
                               out_t.float().transpose(1, 2), lse_t.float())
    real = real_slots(block_sizes, out_s.device)[:, None]
    fine = fine.transpose(1, 2) * real
    coarse = out_c.repeat_interleave(BLOCK, dim=2) * real
    out = fine + (coarse if gate is None else coarse * gate.float())
    return out.to(out_s.dtype), fine.to(out_s.dtype), lse


_merge_triton = None  # the fused merge kernel, imported here so that no import runs in traced code
if importlib.util.find_spec("triton") is not None:
    try:
        from .vsa_joint_triton import merge_text as _merge_triton
    except Exception:  # noqa: BLE001 - a broken Triton install means the PyTorch merge
        _merge_triton = None


def _merge(out_s, lse2, out_t, lse_t, out_c, gate, block_sizes):
    """Out `[B, H, 64 N, D]`, fine output (q's dtype) and merged natural LSE `[B, H, 64 N]`."""
    if out_s.is_cuda and _merge_triton is not None and out_s.shape[-1] in (64, 128):
        return _merge_triton(out_s, lse2, out_t, lse_t, out_c, gate, block_sizes)
    return _merge_torch(out_s, lse2, out_t, lse_t, out_c, gate, block_sizes)


class _VSAWithText(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, block_sizes, topk, scale, text_k, text_v, text_mask, fwd_op):
        ctx.set_materialize_grads(False)
        _, lse2, out_s, out_c, sel, idx, num, qc, kc, vc = fwd_op(q, k, v, gate, block_sizes, topk, scale, True)
        # the text part on the tiled queries, as [B, S, H, D] views (no copies)
        out_t, lse_t, aux = attention_forward_with_lse(q.transpose(1, 2), text_k.transpose(1, 2),
                                                       text_v.transpose(1, 2), scale, text_mask, None,
                                                       native_out=True)
        out, fine, lse = _merge(out_s, lse2, out_t.transpose(1, 2), lse_t, out_c, gate, block_sizes)
        ctx.save_for_backward(q, k, v, gate, block_sizes, fine, lse, out_c, sel, idx, num, qc, kc, vc, text_k, text_v,
                              text_mask)
        ctx.scale, ctx.aux = scale, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        if dout is None:
            return (None,) * 11
        q, k, v, gate, block_sizes, fine, lse, out_c, sel, idx, num, qc, kc, vc, text_k, text_v, text_mask = \
            ctx.saved_tensors
        dout = dout.masked_fill(~real_slots(block_sizes, dout.device)[:, None], 0).contiguous()
        dq, dk, dv, dgate = torch.ops.diffusers_dist_attn.vsa_bwd(
            dout, q, k, v, gate, fine, (lse / _LN2).contiguous(), out_c, sel, idx, num, qc, kc, vc, block_sizes,
            ctx.scale)
        dq_t, dk_t, dv_t = attention_backward_with_lse(
            dout.transpose(1, 2), q.transpose(1, 2), text_k.transpose(1, 2), text_v.transpose(1, 2),
            fine.transpose(1, 2), lse, ctx.scale, text_mask, None, ctx.aux)
        dq = dq + dq_t.transpose(1, 2).to(dq.dtype)
        return (dq, dk, dv, dgate if gate is not None else None, None, None, None,
                dk_t.transpose(1, 2).to(text_k.dtype), dv_t.transpose(1, 2).to(text_v.dtype), None, None)


def vsa_with_text(
    fwd_op,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    block_sizes: torch.Tensor,
    topk: int,
    scale: float,
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    text_mask: torch.Tensor | None,
) -> torch.Tensor:
    """VSA on tiled `q, k, v, gate [B, H, 64 N, D]` whose fine softmax also covers `text_k, text_v [B, H, L, D]`
    (`text_mask` bool `[B, L]`, True = attend). `fwd_op` is a VSA forward custom op with the shared contract
    (`vsa.op_contract`). Returns `[B, H, 64 N, D]`; differentiable in q, k, v, gate, text_k, text_v."""
    q, k, v, gate, sizes, topk, scale, _ = prepare_tiled(q, k, v, gate, block_sizes, topk, scale)
    return _VSAWithText.apply(q, k, v, gate, sizes, topk, scale, text_k, text_v, text_mask, fwd_op)
