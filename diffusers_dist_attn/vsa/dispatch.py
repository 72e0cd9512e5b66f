"""One dispatch point for Video Sparse Attention on tiled tensors.

Implementations, in automatic order: `cuda` (compiled Hopper kernel, when built and on sm_90), `triton` (any
CUDA GPU with Triton), `torch` (the reference; CPU and anywhere else). Override with the `implementation`
argument or env `DIFFUSERS_DIST_ATTN_VSA_IMPL` (`auto`, `cuda`, `triton`, `torch`); an unavailable request falls
back with one warning.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from types import ModuleType

import torch

from .reference import vsa_tiled_reference

logger = logging.getLogger(__name__)

VSA_IMPL_ENV = "DIFFUSERS_DIST_ATTN_VSA_IMPL"
IMPLEMENTATIONS = ("cuda", "triton", "torch")
_MODULES = {"cuda": "diffusers_dist_attn.vsa.cuda_ops", "triton": "diffusers_dist_attn.vsa.triton_ops"}

__all__ = ["VSA_IMPL_ENV", "IMPLEMENTATIONS", "available_implementations", "resolve_implementation", "vsa_tiled"]


_LOADED: dict[str, ModuleType] = {}  # filled by `_module`; read by `vsa_tiled` (a plain dict: compile-traceable)


@functools.cache
def _module(name: str) -> ModuleType | None:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError:
        return None
    _LOADED[name] = module
    return module


def _available(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if device.type != "cuda":
        return False
    module = _module(name)
    return module is not None and bool(module.is_available())


def available_implementations(device: torch.device | str = "cuda") -> list[str]:
    """Implementations that can run on `device`, fastest first."""
    device = torch.device(device)
    return [name for name in IMPLEMENTATIONS if _available(name, device)]


@functools.cache
def _note(message: str, warn: bool) -> None:
    (warnings.warn(message, stacklevel=3) if warn else logger.info(message))


def resolve_implementation(device: torch.device, requested: str | None = None, *, has_extra_keys: bool = False) -> str:
    """The VSA implementation for `device`: explicit request > env > automatic (evaluated once under compile)."""
    request = (requested or os.environ.get(VSA_IMPL_ENV, "auto")).strip().lower()
    if request not in (*IMPLEMENTATIONS, "auto"):
        raise ValueError(f"VSA implementation {request!r} is not one of {('auto', *IMPLEMENTATIONS)}")
    return _resolve(device, request, has_extra_keys)


@torch.compiler.assume_constant_result
def _resolve(device: torch.device, request: str, has_extra_keys: bool) -> str:
    if has_extra_keys:
        # The joint sparse-video + dense-text softmax exists only in the reference for now.
        if request not in ("auto", "torch"):
            _note(f"VSA with replicated (text) keys runs on the torch reference; {request!r} ignored", True)
        return "torch"
    if request != "auto":
        if _available(request, device):
            return request
        fallback = available_implementations(device)[0]
        _note(f"VSA implementation {request!r} is not available on {device}; using {fallback!r}", True)
        return fallback
    chosen = available_implementations(device)[0]
    _note(f"VSA implementation: {chosen} (device {device})", False)
    return chosen


def vsa_tiled(
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
    """Video Sparse Attention on tiled `[B, H, 64*N, D]` tensors; see `vsa_tiled_reference` for the math."""
    name = resolve_implementation(q.device, implementation, has_extra_keys=extra_k is not None)
    if name == "torch":
        return vsa_tiled_reference(
            q, k, v, gate, block_sizes, topk, scale, extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask
        )
    # `_resolve` (run eagerly, also under torch.compile) imported the module; no import happens in traced code
    module = _LOADED[name]
    return getattr(module, f"vsa_tiled_{name}")(q, k, v, gate, block_sizes, topk, scale)
