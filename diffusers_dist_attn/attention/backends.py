"""Dense attention backends and their automatic selection.

One entry point, `dense_attention(q, k, v, ...)` on `[B, S, H, D]` tensors. The backend is resolved per call
from (explicit request > env `DIFFUSERS_DIST_ATTN_BACKEND` > automatic) and what the inputs allow:

- `FLASH_ATTN_3` / `FLASH_ATTN` (flash-attn 3 or 2) when importable, on CUDA, fp16/bf16, head dim <= 256, no mask;
- otherwise PyTorch SDPA, preferring cuDNN on Hopper (about 1.75x SDPA's flash backend at video sizes on an
  H100), flash elsewhere on CUDA, and the math backend on CPU; PyTorch falls through to the next allowed
  SDPA backend when one cannot take the inputs.

A requested backend that is missing falls back with one warning; the choice and the reason are logged once.
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

__all__ = ["AttentionBackendEnum", "BACKEND_ENV", "resolve_backend", "dense_attention"]


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
        return AttentionBackendEnum.SDPA_MATH, f"{device.type} tensors: SDPA math backend"
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
    return AttentionBackendEnum(_resolve(q.device, q.dtype, int(q.shape[-1]), request, env, has_mask, allowed))


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
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    order = _SDPA_ORDER.get(chosen, _SDPA_ORDER[AttentionBackendEnum.SDPA_MATH])
    if not q.is_cuda:
        order = [SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=gqa
        )
    return out.transpose(1, 2)
