"""The attention kernels this package runs, registered in the backend registry (`registry.py`).

Dense, `[B, S, H, D]` in and out (`dense_attention`):

| row | runs | automatic when |
|---|---|---|
| `flash_attn_3` | flash-attn 3 (`flash_attn_interface`) | installed, Hopper, fp16/bf16, no mask, head dim <= 256 |
| `flash_attn` | flash-attn 2 | installed, sm_80+, fp16/bf16, no mask, head dim <= 256 |
| `sdpa_cudnn` | SDPA, cuDNN first | Hopper (about 1.75x SDPA's flash backend at video sizes on an H100) |
| `sdpa_flash` | SDPA, flash first (the fused kernel on CPU) | otherwise |
| `sdpa_efficient`, `sdpa_math` | SDPA, that backend first | only on request |

PyTorch falls through to the next allowed SDPA backend when one cannot take the inputs. Ring attention needs the
log-sum-exp of every partial softmax: `sdpa_flash` and `sdpa_math` return it (`attention_forward_with_lse` /
`attention_backward_with_lse`: PyTorch's flash kernel on CUDA for fp16/bf16 without a mask, an exact fp32 math
path everywhere else).

Video Sparse Attention on tiled `[B, H, 64 N, D]` tensors (`vsa_attention_tiled`): `cuda` (the compiled sm_90a
forward, opt-in with `DIFFUSERS_DIST_ATTN_VSA_CUDA=1`), `triton` (any CUDA GPU, fp16/bf16), `torch` (the
reference; everywhere). Replicated text keys join the fine softmax on every row (`vsa_joint`: the kernel's
sparse part and a dense text part merged through their log-sum-exps).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..numerics import acc as _acc
from ..vsa.reference import vsa_tiled_reference
from .registry import AttentionBackendEnum, Backend, get_backend, register_backend, select_backend

__all__ = [
    "AttentionBackendEnum",
    "resolve_backend",
    "dense_attention",
    "dense_attention_with_lse",
    "attention_forward_with_lse",
    "attention_backward_with_lse",
    "lse_backend",
    "lse_capable",
    "vsa_attention_tiled",
    "available_implementations",
    "VSA_IMPLEMENTATIONS",
]

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Dense rows
# ---------------------------------------------------------------------------------------------------------------
@functools.cache
def _flash_attn_module(version: int):
    """The flash-attn function module for version 3 or 2, or None when not importable."""
    name = "flash_attn_interface" if version == 3 else "flash_attn"
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a broken ABI means "not installed", never a failure
        warnings.warn(f"{name} is installed but failed to import ({exc}); using PyTorch SDPA", stacklevel=2)
        return None


def _flash_attn(version: int) -> Callable:
    def run(q, k, v, *, scale=None, causal=False, key_mask=None):
        out = _flash_attn_module(version).flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
        return out[0] if isinstance(out, tuple) else out

    return run


def _sdpa(order: tuple[SDPBackend, ...]) -> Callable:
    def run(q, k, v, *, scale=None, causal=False, key_mask=None):
        mask = key_mask[:, None, None, :] if key_mask is not None else None  # [B, 1, 1, S_k], True = attend
        if causal and mask is not None:  # SDPA takes either a mask or is_causal: fold the (top-left) causal part in
            mask = mask & torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        allowed = order if q.is_cuda else [b for b in order if b in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)]
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(list(allowed), set_priority=True):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal and mask is None,
                                                 scale=scale, enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)

    return run


def _installed(version: int) -> Callable[[], str | None]:
    return lambda: None if _flash_attn_module(version) is not None else f"flash-attn {version} is not installed"


_CUDNN, _FLASH, _EFFICIENT, _MATH = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                     SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
for _row in (
    Backend("flash_attn_3", "dense", _flash_attn(3), priority=0, devices=("cuda",), dtypes=_HALF, max_head_dim=256,
            takes_mask=False, min_capability=(9, 0), max_capability=(9, 9), available=_installed(3)),
    Backend("flash_attn", "dense", _flash_attn(2), priority=1, devices=("cuda",), dtypes=_HALF, max_head_dim=256,
            takes_mask=False, min_capability=(8, 0), available=_installed(2)),
    Backend("sdpa_cudnn", "dense", _sdpa((_CUDNN, _FLASH, _EFFICIENT, _MATH)), family="sdpa", priority=2,
            auto_capability=(9,)),
    Backend("sdpa_flash", "dense", _sdpa((_FLASH, _CUDNN, _EFFICIENT, _MATH)), family="sdpa", priority=3,
            returns_lse=True),
    Backend("sdpa_efficient", "dense", _sdpa((_EFFICIENT, _MATH)), family="sdpa", priority=4, auto_capability=()),
    Backend("sdpa_math", "dense", _sdpa((_MATH,)), family="sdpa", priority=5, auto_capability=(), returns_lse=True),
):
    register_backend(_row)


def resolve_backend(
    q: torch.Tensor,
    *,
    requested: AttentionBackendEnum | str | None = None,
    has_mask: bool = False,
    supported: tuple[AttentionBackendEnum, ...] | None = None,
) -> AttentionBackendEnum:
    """The dense backend `dense_attention` runs for `q` (explicit request > env > automatic), as an enum member."""
    row = select_backend("dense", q, requested=requested, supported=supported, has_mask=has_mask)
    return AttentionBackendEnum.parse(row.name)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    backend: AttentionBackendEnum | str | None = None,
    supported: tuple[AttentionBackendEnum, ...] | None = None,
) -> torch.Tensor:
    """Exact softmax attention.

    Args:
        q: `[B, S_q, H, D]`; k, v: `[B, S_k, H_kv, D]` with `H % H_kv == 0` (GQA).
        scale: softmax scale, default `D**-0.5`.
        key_mask: bool `[B, S_k]`, True where a key may be attended (a key-padding mask).
    Returns:
        `[B, S_q, H, D]` in q's dtype.
    """
    row = select_backend("dense", q, requested=backend, supported=supported, has_mask=key_mask is not None)
    return row.implementation()(q, k, v, scale=scale, causal=causal, key_mask=key_mask)


# ---------------------------------------------------------------------------------------------------------------
# Attention that returns the log-sum-exp (ring attention, the joint sparse + text softmax)
# ---------------------------------------------------------------------------------------------------------------
def lse_backend(q: torch.Tensor, requested: AttentionBackendEnum | str | None = None,
                supported: tuple[AttentionBackendEnum, ...] | None = None) -> str:
    """The row name for attention that must return its LSE; `ValueError` naming the fix when an explicit
    request cannot (an env preference without an LSE falls back with one warning)."""
    try:
        return select_backend("dense", q, requested=requested, supported=supported, needs_lse=True, strict=True).name
    except ValueError as exc:
        raise ValueError(f"{exc}; ring attention needs the log-sum-exp: use sdpa_flash or sdpa_math, or ring=1 "
                         "(pure Ulysses; plan_degrees(...) picks a valid split)") from None


def _flash_lse_fits(q: torch.Tensor, key_mask: torch.Tensor | None, backend: str | None) -> bool:
    return (q.is_cuda and key_mask is None and q.dtype in _HALF and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
            and backend != "sdpa_math" and torch.cuda.get_device_capability(q.device)[0] >= 8)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """LSE with -inf (rows without any key) replaced by 0, so `exp(s - lse)` is 0 there, not NaN."""
    return lse.masked_fill(torch.isinf(lse), 0.0)


def _math_scores(q: torch.Tensor, k: torch.Tensor, scale: float, key_mask: torch.Tensor | None) -> torch.Tensor:
    s = torch.einsum("bqhd,bkhd->bhqk", _acc(q), _acc(k)) * scale
    return s if key_mask is None else s.masked_fill(~key_mask[:, None, None, :], float("-inf"))


def _efficient_lse_fits(q: torch.Tensor, key_mask: torch.Tensor | None, backend: str | None) -> bool:
    """PyTorch's memory-efficient kernel takes a key mask (as an additive bias) and returns the LSE."""
    return (q.is_cuda and key_mask is not None and q.dtype in _HALF and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
            and backend != "sdpa_math")


def _mask_bias(key_mask: torch.Tensor, q: torch.Tensor, heads: int, keys: int) -> torch.Tensor:
    """Additive bias `[B, H, S_q, keys]` (a stride-0 view) from a bool key mask padded with masked keys to `keys`."""
    bias = torch.zeros(key_mask.shape[0], 1, 1, keys, dtype=q.dtype, device=q.device)
    mask = F.pad(key_mask, (0, keys - key_mask.shape[1]), value=False)
    return bias.masked_fill_(~mask[:, None, None, :], float("-inf")).expand(-1, heads, q.shape[1], -1)


def attention_forward_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
    backend: str | None = None, *, native_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """No-autograd softmax attention that also returns the LSE.

    q `[B, S_q, H, D]`, k, v `[B, S_k, H, D]`, key_mask bool `[B, S_k]` (True = attend) ->
    `(out [B, S_q, H, D] fp32, lse [B, H, S_q] fp32, aux)` (fp64 for fp64 inputs; `native_out`: out in the kernel's
    dtype, no fp32 copy); `aux` goes to `attention_backward_with_lse`.
    Rows without a valid key get `out = 0`, `lse = -inf`. On CUDA (fp16/bf16) PyTorch's flash kernel runs without a
    mask and its memory-efficient kernel with one; everything else runs the exact fp32 math path. The backward of
    the masked case runs the math path: the memory-efficient backward, given a merged (not its own) output and LSE,
    returned wrong dq on an H200 (torch 2.11; GPU test `test_vsa_text.py`).
    """
    if _flash_lse_fits(q, key_mask, backend) and k.shape[1] > 0:
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False, scale=scale
        )
        out = res[0].transpose(1, 2)
        return (out if native_out else out.float()), res[1].float(), ("flash", *res[2:8])
    if _efficient_lse_fits(q, key_mask, backend) and k.shape[1] > 0:
        keys = -(-k.shape[1] // 16) * 16  # the kernel wants the bias's last dim 16-aligned: pad with masked keys
        kp, vp = (F.pad(t, (0, 0, 0, 0, 0, keys - k.shape[1])) for t in (k, v))
        bias = _mask_bias(key_mask, q, q.shape[2], keys)
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), bias, True, 0.0, False, scale=scale
        )
        out = out.transpose(1, 2)
        return (out if native_out else out.float()), lse[..., :q.shape[1]].float(), None
    s = _math_scores(q, k, scale, key_mask)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - _finite(lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, _acc(v)), lse, None


def attention_backward_with_lse(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    scale: float, key_mask: torch.Tensor | None = None, backend: str | None = None,
    aux: tuple | None = None, dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one key block given the *final* `out [B, S_q, H, D]` and `lse [B, H, S_q]` of the rows.

    With the final (merged) out and LSE, `P = exp(S - lse)` is the block's slice of the full softmax, so the
    block's `(dq, dk, dv)` (fp32) sum to the exact gradients (the ring-attention backward). `dlse` is an upstream
    gradient of the LSE (math path only).
    """
    if aux is not None and dlse is None and aux[0] == "flash":
        cum_q, cum_k, max_q, max_k, seed, offset = aux[1:]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout.to(q.dtype).transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            out.to(q.dtype).transpose(1, 2), lse, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset, scale=scale,
        )
        return dq.transpose(1, 2).float(), dk.transpose(1, 2).float(), dv.transpose(1, 2).float()
    qf, kf, vf, do = _acc(q), _acc(k), _acc(v), _acc(dout)
    p = torch.exp(_math_scores(q, k, scale, key_mask) - _finite(lse)[..., None])
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    delta = (do * _acc(out)).sum(-1).transpose(1, 2)  # [B, H, S_q]
    if dlse is not None:
        delta = delta - dlse.to(delta.dtype)
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, vf) - delta[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale, torch.einsum("bhqk,bqhd->bkhd", ds, qf) * scale, dv


class _AttentionWithLse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, key_mask, backend):
        ctx.set_materialize_grads(False)  # an unused LSE keeps the fast (flash) backward
        out, lse, aux = attention_forward_with_lse(q, k, v, scale, key_mask, backend)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.scale, ctx.backend, ctx.aux = scale, backend, aux
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_backward_with_lse(dout, q, k, v, out, lse, ctx.scale, key_mask, ctx.backend,
                                                 ctx.aux, dlse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def lse_capable(backend: AttentionBackendEnum | str) -> bool:
    """Whether the dense `backend` returns its log-sum-exp, i.e. can run ring attention (planner's `can_ring`)."""
    if str(backend).strip().lower() == "auto":
        return True  # the automatic choice picks a row that returns it
    name = AttentionBackendEnum.parse(backend).value
    return name == "torch_sdpa" or get_backend("dense", name).returns_lse


def dense_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    *,
    backend: AttentionBackendEnum | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention returning `(out [B, S_q, H, D] in q's dtype, lse [B, H, S_q] fp32)`.

    q `[B, S_q, H, D]`, k, v `[B, S_k, H, D]` (equal head counts), key_mask bool `[B, S_k]` (True = attend).
    Differentiable in q, k, v (through `out` and `lse`). Raises `ValueError` for a backend without an LSE.
    """
    chosen = lse_backend(q, backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _AttentionWithLse.apply(q, k, v, scale, key_mask, chosen)


# ---------------------------------------------------------------------------------------------------------------
# Video Sparse Attention rows
# ---------------------------------------------------------------------------------------------------------------
VSA_IMPLEMENTATIONS = ("triton", "cuda", "torch")  # automatic order: the fastest measured first


def _vsa_module(name: str):
    return importlib.import_module(f"diffusers_dist_attn.vsa.{name}_ops")


def _vsa_available(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            ok = bool(_vsa_module(name).is_available())
        except ImportError as exc:
            return f"VSA {name} implementation cannot be imported ({exc})"
        if ok:
            return None
        if name == "cuda":
            return ("the compiled sm_90a VSA forward is off (DIFFUSERS_DIST_ATTN_VSA_CUDA=1 enables it; it also needs "
                    "an sm_90 GPU, Triton and a successful build)")
        return "Triton or a CUDA device is missing"

    return check


def _tiled_kernel(name: str, op: str) -> Callable[[], Callable]:
    """The kernel of a compiled VSA row; with extra (text) keys it runs the joint softmax of `vsa_joint`."""

    def load() -> Callable:
        from .vsa_joint import vsa_with_text  # it builds on the LSE functions above

        kernel = getattr(_vsa_module(name), f"vsa_tiled_{name}")
        fwd_op = getattr(torch.ops.diffusers_dist_attn, op)

        def run(q, k, v, gate, block_sizes, topk, scale, *, extra_k=None, extra_v=None, extra_mask=None):
            if extra_k is None:
                return kernel(q, k, v, gate, block_sizes, topk, scale)
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            return vsa_with_text(fwd_op, q, k, v, gate, block_sizes, topk, scale, extra_k, extra_v, extra_mask)

        return run

    return load


for _row in (
    # Triton first: on the H200 it is faster than the sm_90a forward on every real grid (`kernels/README.md`), so
    # the opt-in CUDA row runs only when asked for by name
    Backend("triton", "vsa", load=_tiled_kernel("triton", "vsa_fwd"), priority=0, devices=("cuda",), dtypes=_HALF,
            extra_keys=True, available=_vsa_available("triton")),
    Backend("cuda", "vsa", load=_tiled_kernel("cuda", "vsa_fwd_cuda"), priority=1, devices=("cuda",),
            dtypes=(torch.bfloat16,), head_dims=(64, 128), min_capability=(9, 0), max_capability=(9, 0),
            extra_keys=True, available=_vsa_available("cuda")),
    Backend("torch", "vsa", vsa_tiled_reference, priority=2, extra_keys=True),
):
    register_backend(_row)


def names_vsa_implementation(implementation: str | None) -> bool:
    """Whether a VSA `implementation` argument names one (not None / `auto`): a named one must run or raise."""
    return implementation is not None and str(implementation).strip().lower() != "auto"


def available_implementations(device: torch.device | str = "cuda") -> list[str]:
    """VSA implementations installed and usable on `device` (for bf16, head dim 128), fastest first."""
    device = torch.device(device)
    names = []
    for name in VSA_IMPLEMENTATIONS:
        row = get_backend("vsa", name)
        if device.type in row.devices and row.available() is None:
            names.append(name)
    return names


def vsa_attention_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    block_sizes: torch.Tensor,
    topk: int,
    scale: float | None = None,
    *,
    implementation: str | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Video Sparse Attention on tiled `[B, H, 64 N, D]` tensors (see `vsa.reference.vsa_tiled_reference`).

    `implementation`: `cuda`, `triton`, `torch` or None/`auto`; an explicit one that cannot run raises. The
    extra (text) keys `[B, H, L, D]` with `extra_mask [B, L]` join every video query's softmax.
    """
    row = select_backend("vsa", q, requested=implementation, extra_keys=extra_k is not None,
                         strict=names_vsa_implementation(implementation))
    return row.implementation()(q, k, v, gate, block_sizes, topk, scale, extra_k=extra_k, extra_v=extra_v,
                                extra_mask=extra_mask)
