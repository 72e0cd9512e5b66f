"""Video Sparse Attention with the compiled Hopper (sm_90a) fine-stage forward (opt-in).

The CUDA kernel (`diffusers_dist_attn/kernels/vsa_fwd_sm90.cu`: wgmma + TMA, warp-specialised, software-pipelined)
passes the GPU tests and compute-sanitizer; it reads every key block as a 64-row tile, and on an H200 it is slower
than the Triton kernels, which read partial border blocks as 16/32-row tiles, so it is opt-in
(`benchmarks/NOTES.md`): `is_available()` is False unless env `DIFFUSERS_DIST_ATTN_VSA_CUDA=1` is set; with it, it
also needs an sm_90 GPU and a successful build (`cuda_build.load_extension`, built on first use and cached).

Only the fine forward is new. Everything else is the Triton path of `triton_ops` / `triton_kernels`:
- one custom op `diffusers_dist_attn::vsa_fwd_cuda` with the schema, fake kernel and autograd formula of
  `diffusers_dist_attn::vsa_fwd` (its outputs are the same ten tensors, so `op_contract.setup_context` /
  `backward` apply unchanged and the backward is the Triton `vsa_bwd`);
- inside it: Triton block means + coarse select (q2k lists), then the CUDA forward writes `out`, `lse`, `out_s`
  into buffers allocated by `triton_kernels.new_output` (poisoned under `POISON_OUTPUTS`, as in the GPU tests).
bf16 with head_dim 64 or 128 runs the CUDA kernel; anything else goes to `vsa_tiled_triton`.
"""

from __future__ import annotations

import torch

from .. import envs
from . import triton_ops
from .op_contract import FWD_SCHEMA, backward, fwd_fake, prepare_tiled, setup_context, triton_kernels

__all__ = ["ENABLE_ENV", "is_available", "vsa_tiled_cuda"]

ENABLE_ENV = envs.VSA_CUDA.name
_HEAD_DIMS = (64, 128)


def _enabled() -> bool:
    return envs.get_bool(envs.VSA_CUDA)


def is_available() -> bool:
    """True only with `DIFFUSERS_DIST_ATTN_VSA_CUDA=1`, an sm_90 GPU, Triton (coarse stage and backward) and a
    built extension. Never raises; a failed build warns once (in `cuda_build`)."""
    if not _enabled():
        return False
    try:
        if not (triton_ops.is_available() and torch.cuda.get_device_capability() == (9, 0)):
            return False
        from .cuda_build import load_extension

        return load_extension() is not None
    except Exception:  # noqa: BLE001 - a broken CUDA install means "not available"
        return False


def _supported(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype == torch.bfloat16 and q.shape[-1] in _HEAD_DIMS


@torch.library.custom_op("diffusers_dist_attn::vsa_fwd_cuda", mutates_args=(), schema=FWD_SCHEMA)
def _vsa_fwd_cuda(q, k, v, gate, block_sizes, topk, scale, save_out_s):
    """`vsa_fwd` with the fine stage on the sm_90a kernel; same ten outputs."""
    if not _supported(q):  # CPU mirror / Triton for what the kernel does not cover
        return tuple(torch.ops.diffusers_dist_attn.vsa_fwd(q, k, v, gate, block_sizes, topk, scale, save_out_s))
    from .cuda_build import load_extension

    ext = load_extension()
    if ext is None:
        raise RuntimeError("diffusers_dist_attn::vsa_fwd_cuda called but the sm_90a extension is not built")
    kern = triton_kernels()
    qc, kc, vc = kern.block_means(q, k, v, block_sizes)
    out_c, _, sel, idx, num = kern.coarse_select(qc, kc, vc, topk, scale, block_sizes)
    out = kern.new_output(q.shape, q)
    out_s = kern.new_output(q.shape, q) if save_out_s else q.new_empty(0)
    lse = kern.new_output(q.shape[:3], q, torch.float32)
    ext.sparse_fwd(q, k, v, gate, out_c, idx, num, block_sizes, scale, out, out_s if save_out_s else None, lse)
    return out, lse, out_s, out_c, sel, idx, num, qc, kc, vc


_vsa_fwd_cuda.register_fake(fwd_fake)
_vsa_fwd_cuda.register_autograd(backward, setup_context=setup_context)


def vsa_tiled_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    block_sizes: torch.Tensor,
    topk: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Video Sparse Attention on tiled `[B, H, 64*N, D]` tensors; the contract of `triton_ops.vsa_tiled_triton`.

    bf16 inputs with head_dim 64/128 on CUDA run the sm_90a forward (Triton coarse stage and
    backward); other inputs run `vsa_tiled_triton` unchanged.
    """
    if not _supported(q):
        return triton_ops.vsa_tiled_triton(q, k, v, gate, block_sizes, topk, scale)
    args = prepare_tiled(q, k, v, gate, block_sizes, topk, scale)
    return torch.ops.diffusers_dist_attn.vsa_fwd_cuda(*args)[0]
