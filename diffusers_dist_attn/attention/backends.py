"""Dense attention backends and their automatic selection.

One entry point, `dense_attention(q, k, v, ...)` on `[B, S, H, D]` tensors. The backend is resolved per call
from (explicit request > env `DIFFUSERS_DIST_ATTN_BACKEND` > automatic) and what the inputs allow:

- `FLASH_ATTN_3` / `FLASH_ATTN` (flash-attn 3 or 2) when importable, on CUDA, fp16/bf16, head dim <= 256, no mask;
- otherwise PyTorch SDPA, preferring cuDNN on Hopper (about 1.75x SDPA's flash backend at video sizes on an
  H100), flash elsewhere on CUDA, and the math backend on CPU; PyTorch falls through to the next allowed
  SDPA backend when one cannot take the inputs.

A requested backend that is missing falls back with one warning; the choice and the reason are logged once.

Ring attention needs the log-sum-exp (LSE) of every partial softmax: `dense_attention_with_lse` and its two
halves `attention_forward_with_lse` / `attention_backward_with_lse` run PyTorch's flash kernel
(`aten._scaled_dot_product_flash_attention[_backward]`) on CUDA for fp16/bf16 without a mask, and an exact
fp32 math path everywhere else (CPU, masks, fp32). Every dense backend except `FLASH_ATTN_3` can serve them.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import logging
import os
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

BACKEND_ENV = "DIFFUSERS_DIST_ATTN_BACKEND"

__all__ = [
    "AttentionBackendEnum",
    "BACKEND_ENV",
    "LSE_BACKENDS",
    "resolve_backend",
    "resolve_lse_backend",
    "dense_attention",
    "dense_attention_with_lse",
    "attention_forward_with_lse",
    "attention_backward_with_lse",
]


class AttentionBackendEnum(enum.Enum):
    """Attention backends. `supported_attention_backends` of the layers takes members of this enum."""

    FLASH_ATTN_3 = "flash_attn_3"
    FLASH_ATTN = "flash_attn"
    TORCH_SDPA = "torch_sdpa"  # SDPA with the automatic per-device preference below
    SDPA_CUDNN = "sdpa_cudnn"
    SDPA_FLASH = "sdpa_flash"
    SDPA_EFFICIENT = "sdpa_efficient"
    SDPA_MATH = "sdpa_math"
    VIDEO_SPARSE_ATTN = "video_sparse_attn"

    @classmethod
    def parse(cls, value: AttentionBackendEnum | str) -> AttentionBackendEnum:
        if isinstance(value, cls):
            return value
        key = str(value).strip()
        for member in cls:
            if key.upper() == member.name or key.lower() == member.value:
                return member
        raise ValueError(f"unknown attention backend {value!r}; allowed: {[m.value for m in cls]}")


DENSE_BACKENDS = tuple(b for b in AttentionBackendEnum if b is not AttentionBackendEnum.VIDEO_SPARSE_ATTN)
# value -> member as a plain dict: `AttentionBackendEnum(value)` inside a torch.compile'd region fails on torch 2.11
_BY_VALUE = {member.value: member for member in AttentionBackendEnum}

_SDPA_ORDER = {
    AttentionBackendEnum.SDPA_CUDNN: [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                      SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    AttentionBackendEnum.SDPA_FLASH: [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                      SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    AttentionBackendEnum.SDPA_EFFICIENT: [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    AttentionBackendEnum.SDPA_MATH: [SDPBackend.MATH],
}


@functools.cache
def _flash_attn_module(version: int):
    """The flash-attn function module for version 3 or 2, or None when not importable."""
    name = "flash_attn_interface" if version == 3 else "flash_attn"
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.import_module(name)
    except Exception as exc:  # broken ABI etc.: fall back, never fail
        warnings.warn(f"{name} is installed but failed to import ({exc}); using PyTorch SDPA", stacklevel=2)
        return None


def _flash_fits(device: torch.device, dtype: torch.dtype, head_dim: int, has_mask: bool, version: int) -> str | None:
    """None when flash-attn `version` can run these inputs, else the reason it cannot."""
    if _flash_attn_module(version) is None:
        return f"flash-attn {version} is not installed"
    if device.type != "cuda":
        return "inputs are not on CUDA"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (flash-attn needs fp16/bf16)"
    if has_mask:
        return "a key mask is given (flash-attn takes none)"
    if head_dim > 256 or head_dim % 8:
        return f"head dim {head_dim}"
    major, _ = torch.cuda.get_device_capability(device)
    if version == 3 and major != 9:
        return "flash-attn 3 needs Hopper (sm_90)"
    if version == 2 and major < 8:
        return "flash-attn 2 needs sm_80+"
    return None


def _auto_sdpa(device: torch.device) -> tuple[AttentionBackendEnum, str]:
    if device.type != "cuda":
        # Measured on the 2-core CPU host (Wan tiny, 2,560 tokens): SDPA's fused CPU kernel took 43-300 ms and
        # ~6 MiB where the math backend took 500-800 ms and ~230 MiB (it materialises S x S); both are exact in fp32.
        return AttentionBackendEnum.SDPA_FLASH, f"{device.type} tensors: SDPA fused CPU kernel (math as fallback)"
    major, _ = torch.cuda.get_device_capability(device)
    if major == 9:
        return AttentionBackendEnum.SDPA_CUDNN, "Hopper GPU: SDPA cuDNN backend (faster than SDPA flash there)"
    return AttentionBackendEnum.SDPA_FLASH, f"sm_{major}x GPU: SDPA flash backend"


def _parse_env(value: str) -> AttentionBackendEnum | None:
    value = value.strip()
    if not value or value.lower() == "auto":
        return None
    try:
        return AttentionBackendEnum.parse(value)
    except ValueError:
        _note(f"{BACKEND_ENV}={value!r} is not a backend; choosing automatically", True)
        return None


@functools.cache
def _note(message: str, warn: bool) -> None:
    """Warn or log a message once per process."""
    if warn:
        warnings.warn(message, stacklevel=4)
    else:
        logger.info(message)


def resolve_backend(
    q: torch.Tensor,
    *,
    requested: AttentionBackendEnum | str | None = None,
    has_mask: bool = False,
    supported: tuple[AttentionBackendEnum, ...] | None = None,
) -> AttentionBackendEnum:
    """The dense backend for `q`'s device/dtype/head dim: explicit request > env > automatic.

    Never raises for a missing optional backend (falls back with one warning). Pure Python on static
    properties; under `torch.compile` it is evaluated once at trace time, so it causes no graph break.
    """
    request = None if requested is None else AttentionBackendEnum.parse(requested).value
    allowed = None if supported is None else tuple(AttentionBackendEnum.parse(b).value for b in supported)
    env = os.environ.get(BACKEND_ENV, "")
    return _BY_VALUE[_resolve(q.device, q.dtype, int(q.shape[-1]), request, env, has_mask, allowed)]


@torch.compiler.assume_constant_result
def _resolve(
    device: torch.device, dtype: torch.dtype, head_dim: int, requested: str | None, env: str, has_mask: bool,
    supported: tuple[str, ...] | None,
) -> str:
    request = AttentionBackendEnum(requested) if requested is not None else _parse_env(env)
    allowed = None if supported is None else tuple(AttentionBackendEnum(s) for s in supported)
    if request is AttentionBackendEnum.VIDEO_SPARSE_ATTN:
        request = None  # sparse layers call dense attention only for their dense parts
    if request is not None and allowed is not None and request not in allowed:
        _note(f"attention backend {request.value} is not supported here ({[s.value for s in allowed]}); "
              "choosing automatically", True)
        request = None
    if request is None:
        for version, member in ((3, AttentionBackendEnum.FLASH_ATTN_3), (2, AttentionBackendEnum.FLASH_ATTN)):
            if (allowed is None or member in allowed) and _flash_fits(device, dtype, head_dim, has_mask, version) is None:
                _note(f"attention backend {member.value}: flash-attn {version} importable and inputs fit", False)
                return member.value
        backend, reason = _auto_sdpa(device)
        sdpa_allowed = [b for b in allowed or () if b.name.startswith("SDPA_")]
        if allowed is not None and backend not in allowed and AttentionBackendEnum.TORCH_SDPA not in allowed \
                and sdpa_allowed:
            backend, reason = sdpa_allowed[0], f"automatic choice {backend.value} is not in the supported set"
    elif request in (AttentionBackendEnum.FLASH_ATTN_3, AttentionBackendEnum.FLASH_ATTN):
        version = 3 if request is AttentionBackendEnum.FLASH_ATTN_3 else 2
        why_not = _flash_fits(device, dtype, head_dim, has_mask, version)
        if why_not is None:
            backend, reason = request, "requested"
        else:
            backend, _ = _auto_sdpa(device)
            _note(f"attention backend {request.value} requested but {why_not}; using {backend.value}", True)
            return backend.value
    elif request is AttentionBackendEnum.TORCH_SDPA:
        backend, reason = _auto_sdpa(device)
    else:
        backend, reason = request, "requested"
    _note(f"attention backend {backend.value}: {reason}", False)
    return backend.value


def _key_mask_to_sdpa(key_mask: torch.Tensor) -> torch.Tensor:
    return key_mask[:, None, None, :]  # [B, 1, 1, S_k], True = attend


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
    chosen = resolve_backend(q, requested=backend, has_mask=key_mask is not None, supported=supported)
    if chosen in (AttentionBackendEnum.FLASH_ATTN_3, AttentionBackendEnum.FLASH_ATTN):
        module = _flash_attn_module(3 if chosen is AttentionBackendEnum.FLASH_ATTN_3 else 2)
        out = module.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
        return out[0] if isinstance(out, tuple) else out
    gqa = k.shape[2] != q.shape[2]
    mask = _key_mask_to_sdpa(key_mask) if key_mask is not None else None
    if causal and mask is not None:  # SDPA takes either a mask or is_causal: fold the (top-left) causal part in
        mask = mask & torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    order = _SDPA_ORDER.get(chosen, _SDPA_ORDER[AttentionBackendEnum.SDPA_MATH])
    if not q.is_cuda:  # CPU has the fused (flash) kernel and math
        order = [b for b in order if b in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)]
    with sdpa_kernel(order, set_priority=True):
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=gqa
        )
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Attention that returns the log-sum-exp (for ring attention)
# ---------------------------------------------------------------------------------------------------------------
LSE_BACKENDS = tuple(b for b in DENSE_BACKENDS if b is not AttentionBackendEnum.FLASH_ATTN_3)
"""Backends that ring attention can use (FLASH_ATTN and the SDPA family run PyTorch's flash kernel on CUDA)."""


def resolve_lse_backend(
    q: torch.Tensor,
    *,
    requested: AttentionBackendEnum | str | None = None,
    supported: tuple[AttentionBackendEnum, ...] | None = None,
) -> AttentionBackendEnum:
    """The backend for attention that must return the LSE; `ValueError` naming the fix when none can.

    Explicit request > env `DIFFUSERS_DIST_ATTN_BACKEND` > `TORCH_SDPA` (flash kernel on CUDA, math on CPU).
    An explicit request without an LSE raises; such an env value (a process-wide preference) warns once and is
    ignored here.
    """
    request = None if requested is None else AttentionBackendEnum.parse(requested)
    if request is None:
        request = _parse_env(os.environ.get(BACKEND_ENV, ""))
        if request is AttentionBackendEnum.VIDEO_SPARSE_ATTN:
            request = None  # dense parts of sparse setups: automatic
        elif request is not None and request not in LSE_BACKENDS:
            _note(f"{BACKEND_ENV}={request.value} returns no log-sum-exp; ring attention uses torch_sdpa", True)
            request = None
    fix = ("use one of " + ", ".join(b.value for b in LSE_BACKENDS) +
           ", or ring=1 (pure Ulysses; plan_degrees(...) picks a valid split)")
    if request is AttentionBackendEnum.VIDEO_SPARSE_ATTN:
        raise ValueError("video sparse attention returns no log-sum-exp and cannot run over a ring; "
                         "use ring=1 with an uneven Ulysses head split (plan_degrees(..., full_heads=True))")
    if request is not None and request not in LSE_BACKENDS:
        raise ValueError(f"attention backend {request.value} returns no log-sum-exp, which ring attention needs; {fix}")
    allowed = None if supported is None else tuple(AttentionBackendEnum.parse(b) for b in supported)
    if allowed is not None:
        usable = [b for b in allowed if b in LSE_BACKENDS]
        if not usable:
            raise ValueError(f"none of the supported backends {[b.value for b in allowed]} returns a log-sum-exp, "
                             f"which ring attention needs; {fix}")
        if request is None or request not in usable:
            request = usable[0]
    return request or AttentionBackendEnum.TORCH_SDPA


def _flash_lse_fits(q: torch.Tensor, key_mask: torch.Tensor | None, backend: AttentionBackendEnum | None) -> bool:
    return (q.is_cuda and key_mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and backend is not AttentionBackendEnum.SDPA_MATH
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """LSE with -inf (rows without any key) replaced by 0, so `exp(s - lse)` is 0 there, not NaN."""
    return lse.masked_fill(torch.isinf(lse), 0.0)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """`t` in the accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _math_scores(q: torch.Tensor, k: torch.Tensor, scale: float, key_mask: torch.Tensor | None) -> torch.Tensor:
    s = torch.einsum("bqhd,bkhd->bhqk", _acc(q), _acc(k)) * scale
    return s if key_mask is None else s.masked_fill(~key_mask[:, None, None, :], float("-inf"))


def attention_forward_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
    backend: AttentionBackendEnum | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """No-autograd softmax attention that also returns the LSE.

    q `[B, S_q, H, D]`, k, v `[B, S_k, H, D]`, key_mask bool `[B, S_k]` (True = attend) ->
    `(out [B, S_q, H, D] fp32, lse [B, H, S_q] fp32, aux)` (fp64 for fp64 inputs); `aux` goes to `attention_backward_with_lse`.
    Rows without a valid key get `out = 0`, `lse = -inf`.
    """
    if _flash_lse_fits(q, key_mask, backend) and k.shape[1] > 0:
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False, scale=scale
        )
        return res[0].transpose(1, 2).float(), res[1].float(), tuple(res[2:8])
    s = _math_scores(q, k, scale, key_mask)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - _finite(lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, _acc(v)), lse, None


def attention_backward_with_lse(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    scale: float, key_mask: torch.Tensor | None = None, backend: AttentionBackendEnum | None = None,
    aux: tuple | None = None, dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one key block given the *final* `out [B, S_q, H, D]` and `lse [B, H, S_q]` of the rows.

    With the final (merged) out and LSE, `P = exp(S - lse)` is the block's slice of the full softmax, so the
    block's `(dq, dk, dv)` (fp32) sum to the exact gradients (the ring-attention backward). `dlse` is an upstream
    gradient of the LSE (math path only).
    """
    if aux is not None and dlse is None:
        cum_q, cum_k, max_q, max_k, seed, offset = aux
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
    chosen = resolve_lse_backend(q, requested=backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _AttentionWithLse.apply(q, k, v, scale, key_mask, chosen)
