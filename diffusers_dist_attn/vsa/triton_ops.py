"""Video Sparse Attention as `torch.library` custom ops backed by the Triton kernels in `triton_kernels.py`.

Two ops in namespace `diffusers_dist_attn`, both with fake (meta) kernels, joined by `register_autograd`, so that
`torch.compile(fullgraph=True)` traces a VSA call without a graph break:

- `vsa_fwd(q, k, v, gate?, block_sizes, topk, scale, save_out_s)` -> `(out, lse, out_s, out_c, sel, q2k_idx,
  q2k_num, q_c, k_c, v_c)`;
- `vsa_bwd(dout, q, k, v, gate?, out_s, lse, out_c, sel, q2k_idx, q2k_num, q_c, k_c, v_c, block_sizes, scale)`
  -> `(dq, dk, dv, dgate)` (`dgate` empty without a gate).

On CUDA (bf16/fp16) they launch the Triton kernels; otherwise they run a plain-PyTorch mirror of the same algorithm
(dense masked attention per head; meant for small CPU tests of the op plumbing, not for speed).

Importing this module never needs Triton; `is_available()` says whether the CUDA path can run.
"""

import importlib.util
import os

import torch

from ..numerics import acc as _acc
from .op_contract import (
    BWD_SCHEMA,
    FWD_SCHEMA,
    KERNEL_DTYPES,
    backward,
    check_tiled,
    fwd_fake,
    prepare_tiled,
    setup_context,
    triton_kernels,
)
from .reference import block_mean, real_slots, vsa_tiled_reference
from .tiling import BLOCK

__all__ = ["is_available", "vsa_tiled_triton", "topk_select_torch", "k2q_from_mask_torch", "coarse_backward",
           "size_class_torch"]

LOG2E = 1.4426950408889634


def is_available() -> bool:
    """True when Triton is importable and a CUDA device is present (never raises)."""
    try:
        return importlib.util.find_spec("triton") is not None and bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA/Triton install means "not available"
        return False


def _use_kernels(q: torch.Tensor) -> bool:
    """Triton kernels on CUDA (bf16/fp16); also on CPU under `TRITON_INTERPRET=1` (debugging, tiny sizes)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    return q.dtype in KERNEL_DTYPES and (q.is_cuda or interpret)


# --------------------------------------------------------------------------------------------------------------
# plain-PyTorch pieces (shared by the CPU mirror and, for the tiny coarse backward, by the CUDA path)
# --------------------------------------------------------------------------------------------------------------


def size_class_torch(block_sizes: torch.Tensor) -> torch.Tensor:
    """Size class of each block (the kernels' `_size_class`): 0 above 32 real tokens, 1 for 17-32, 2 up to 16."""
    sizes = block_sizes.long()
    return (sizes <= 32).long() + (sizes <= 16).long()


def _group_ends(member: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """int32 `[..., 3]`: how many members (bool `[..., M]`) fall in classes `<= 0, <= 1, <= 2` (`cls [..., M]`)."""
    return torch.stack([(member & (cls <= c)).sum(-1) for c in range(3)], -1).to(torch.int32)


def topk_select_torch(
    scores: torch.Tensor, topk: int, block_sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exactly `topk` largest per row of `scores [B,H,Nq,Nk]`, ties to the lower index (the kernel's rule).

    Returns `sel` uint8 `[B,H,Nq,Nk]`, `q2k_idx` int32 `[B,H,Nq,topk]` grouped by the key blocks' size class
    (ascending inside a group) and the group ends `q2k_num` int32 `[B,H,Nq,3]`, as `coarse_select` does.
    """
    n = scores.shape[-1]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    cls = size_class_torch(block_sizes.to(scores.device))
    idx = torch.sort(cls[order] * n + order, dim=-1).values % n
    sel = torch.zeros(scores.shape, dtype=torch.uint8, device=scores.device).scatter_(-1, idx, 1)
    return sel, idx.to(torch.int32), _group_ends(torch.ones_like(idx, dtype=torch.bool), cls[idx])


def k2q_from_mask_torch(sel: torch.Tensor, block_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sel [B,H,Nq,Nk]` -> per key block the query blocks that selected it, grouped by the query blocks' size
    class (ascending inside a group): `k2q_idx` int32 `[B,H,Nk,Nq]` (first `k2q_num[..., 2]` entries valid) and the
    group ends `k2q_num` int32 `[B,H,Nk,3]`, as `build_k2q` does."""
    t = sel.transpose(-1, -2).bool()
    cls = size_class_torch(block_sizes.to(sel.device))
    idx = torch.sort((~t).long() * 3 + cls, dim=-1, stable=True).indices
    return idx.to(torch.int32), _group_ends(t, cls.expand_as(t))


def coarse_backward(
    d_out_c: torch.Tensor, q_c: torch.Tensor, k_c: torch.Tensor, v_c: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `out_c = softmax(q_c k_c^T * scale) v_c` w.r.t. the block means (fp32, all `[B,H,N,D]`)."""
    qf, kf, vf = (t.to(d_out_c.dtype) for t in (q_c, k_c, v_c))
    p = ((qf @ kf.transpose(-1, -2)) * scale).softmax(-1)
    dv = p.transpose(-1, -2) @ d_out_c
    dp = d_out_c @ vf.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return (ds @ kf) * scale, (ds.transpose(-1, -2) @ qf) * scale, dv


def _rep64(x: torch.Tensor) -> torch.Tensor:
    """`[B,H,N,D]` -> `[B,H,64N,D]`, each block row repeated over its 64 slots."""
    return x.repeat_interleave(BLOCK, dim=2)


def _token_mask(sel: torch.Tensor, block_sizes: torch.Tensor) -> torch.Tensor:
    """Selected blocks expanded to tokens, pad keys excluded: bool `[B,H,S,S]`."""
    return sel.bool().repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1) & real_slots(block_sizes, sel.device)


def _fwd_torch(q, k, v, gate, block_sizes, topk, scale, save_out_s):
    qc, kc, vc = (block_mean(t, block_sizes) for t in (q, k, v))
    scores = (_acc(qc) @ _acc(kc).transpose(-1, -2)) * scale
    out_c = (scores.softmax(-1) @ _acc(vc)).float()
    sel, idx, num = topk_select_torch(scores, topk, block_sizes)
    logits = (_acc(q) @ _acc(k).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~_token_mask(sel, block_sizes), float("-inf"))
    real = real_slots(block_sizes, q.device)[:, None]
    out_s = (logits.softmax(-1) @ _acc(v)) * real
    lse = (torch.logsumexp(logits, -1) * LOG2E).float()
    out = out_s + (_rep64(out_c) if gate is None else _rep64(out_c) * _acc(gate)) * real
    out_s = out_s.to(q.dtype) if save_out_s else q.new_empty(0)
    return out.to(q.dtype), lse, out_s, out_c, sel, idx, num, qc, kc, vc


def _bwd_torch(dout, q, k, v, gate, out_s, lse, out_c, sel, q_c, k_c, v_c, block_sizes, scale):
    b, h, s, d = q.shape
    real = real_slots(block_sizes, q.device)[:, None]
    qf, kf, vf = (_acc(t) for t in (q, k, v))
    dof = _acc(dout).masked_fill(~real, 0)  # pad slots are not tokens: no gradient flows from them
    logits = (qf @ kf.transpose(-1, -2)) * scale
    p = torch.where(_token_mask(sel, block_sizes), torch.exp2(logits * LOG2E - lse[..., None]), 0.0)
    delta = (dof * _acc(out_s)).sum(-1, keepdim=True)
    ds = p * (dof @ vf.transpose(-1, -2) - delta)
    dq, dk, dv = (ds @ kf) * scale, (ds.transpose(-1, -2) @ qf) * scale, p.transpose(-1, -2) @ dof
    weighted = dof if gate is None else dof * _acc(gate)
    d_out_c = weighted.view(b, h, s // BLOCK, BLOCK, d).sum(3)
    dgate = (dof * _rep64(out_c)).to(gate.dtype) if gate is not None else q.new_empty(0)
    inv = 1.0 / block_sizes.to(q.device, d_out_c.dtype)[:, None]
    dqc, dkc, dvc = (g * inv for g in coarse_backward(d_out_c, q_c, k_c, v_c, scale))
    dq, dk, dv = ((fine + _rep64(coarse)) * real for fine, coarse in ((dq, dqc), (dk, dkc), (dv, dvc)))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dgate


# --------------------------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("diffusers_dist_attn::vsa_fwd", mutates_args=(), schema=FWD_SCHEMA)
def _vsa_fwd(q, k, v, gate, block_sizes, topk, scale, save_out_s):
    """VSA forward on tiled `[B,H,64N,D]`; see the module docstring for the outputs."""
    if not _use_kernels(q):
        return _fwd_torch(q, k, v, gate, block_sizes, topk, scale, save_out_s)
    kern = triton_kernels()
    qc, kc, vc = kern.block_means(q, k, v, block_sizes)
    out_c, _, sel, idx, num = kern.coarse_select(qc, kc, vc, topk, scale, block_sizes)
    out, lse, out_s = kern.sparse_fwd(q, k, v, gate, out_c, idx, num, block_sizes, scale, save_out_s)
    return out, lse, out_s, out_c, sel, idx, num, qc, kc, vc


@torch.library.custom_op("diffusers_dist_attn::vsa_bwd", mutates_args=(), schema=BWD_SCHEMA)
def _vsa_bwd(dout, q, k, v, gate, out_s, lse, out_c, sel, q2k_idx, q2k_num, q_c, k_c, v_c, block_sizes, scale):
    """VSA backward: `(dq, dk, dv, dgate)`, `dgate` empty when `gate` is None."""
    if not _use_kernels(q):
        return _bwd_torch(dout, q, k, v, gate, out_s, lse, out_c, sel, q_c, k_c, v_c, block_sizes, scale)
    kern = triton_kernels()
    delta, dgate, d_out_c = kern.bwd_preprocess(dout, out_s, gate, out_c, block_sizes)
    dqc, dkc, dvc = coarse_backward(d_out_c, q_c, k_c, v_c, scale)  # divided by the block sizes in-kernel
    dq = kern.sparse_bwd_dq(q, k, v, dout, lse, delta, dqc, q2k_idx, q2k_num, block_sizes, scale)
    k2q, k2q_num = kern.build_k2q(sel, block_sizes)
    dense = q2k_idx.shape[-1] == q_c.shape[2]
    dk, dv = kern.sparse_bwd_dkdv(q, k, v, dout, lse, delta, dkc, dvc, k2q, k2q_num, block_sizes, scale, dense)
    return dq, dk, dv, dgate if dgate is not None else q.new_empty(0)


@_vsa_bwd.register_fake
def _vsa_bwd_fake(dout, q, k, v, gate, out_s, lse, out_c, sel, q2k_idx, q2k_num, q_c, k_c, v_c, block_sizes, scale):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(gate) if gate is not None else q.new_empty(0),
    )




# --------------------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------------------


def vsa_tiled_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    block_sizes: torch.Tensor,
    topk: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Video Sparse Attention on tiled `[B, H, 64*N, D]` tensors; same contract as `vsa_tiled_reference`.

    `block_sizes` int `[N]` (1..64 real tokens per block), `gate [B,H,64N,D]` or None, exactly `topk` key blocks
    per query block (ties to the lower block index). Differentiable in q, k, v and gate. bf16/fp16 run the
    Triton kernels on CUDA; other dtypes fall back to the reference.
    """
    if q.dtype not in KERNEL_DTYPES:
        check_tiled(q, k, v, gate, block_sizes, topk)
        return vsa_tiled_reference(q, k, v, gate, block_sizes, topk, q.shape[-1] ** -0.5 if scale is None else scale)
    args = prepare_tiled(q, k, v, gate, block_sizes, topk, scale)
    return torch.ops.diffusers_dist_attn.vsa_fwd(*args)[0]




_vsa_fwd.register_fake(fwd_fake)
_vsa_fwd.register_autograd(backward, setup_context=setup_context)
