"""Rotary position embedding with interleaved pairs (GPT-J style), as Wan, HunyuanVideo and FastVideo use it."""

from __future__ import annotations

import importlib.util

import torch

from .. import envs

__all__ = ["apply_rotary", "normalize_rotary_tables"]

rotary_fused = None  # the fused Triton op, imported here so that no import runs inside a torch.compile'd region
if importlib.util.find_spec("triton") is not None:
    try:
        from .rotary_triton import rotary_fused
    except Exception:  # noqa: BLE001 - a broken Triton install means "use the PyTorch formula"
        rotary_fused = None

RotaryTables = tuple[torch.Tensor, torch.Tensor]


def normalize_rotary_tables(freqs_cis: RotaryTables, head_dim: int) -> RotaryTables:
    """Bring `(cos, sin)` to `[1 or B, S, 1, D/2]` (one angle per pair).

    Accepts `[S, D]` or `[S, D/2]` (FastVideo / HunyuanVideo) and `[1 or B, S, 1, D]` (diffusers' Wan).
    With `D` columns each pair's angle is repeated (`repeat_interleave(2)`): cos is read at even and sin at odd
    columns. Full-width `[S, D]` tables in the rotate-half layout (angles concatenated, `[θ, θ]`) pair other
    channels and are refused (checked eagerly; under torch.compile the layout is trusted).
    """
    cos, sin = freqs_cis
    if cos.shape != sin.shape:
        raise ValueError(f"rotary cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    if cos.ndim == 2:
        if cos.shape[-1] == head_dim and not torch.compiler.is_compiling():
            _check_interleaved(cos)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if cos.ndim != 4 or cos.shape[2] != 1:
        raise ValueError(f"rotary tables must be [S, D], [S, D/2] or [B, S, 1, D]; got {tuple(cos.shape)}")
    if cos.shape[-1] == head_dim:  # made contiguous here, once, rather than per rotated tensor in the kernel
        cos, sin = cos[..., 0::2].contiguous(), sin[..., 1::2].contiguous()
    elif cos.shape[-1] != head_dim // 2:
        raise ValueError(f"rotary tables have {cos.shape[-1]} columns; head dim {head_dim} needs {head_dim} or {head_dim // 2}")
    return cos, sin


# the last full-width table found interleaved: a model passes one table object to every block, so the check (a
# device sync) runs once per forward, not once per layer
_CHECKED_TABLE: list[torch.Tensor] = []


def _check_interleaved(cos: torch.Tensor) -> None:
    """Full-width `[S, D]` tables must repeat each pair's angle in adjacent columns (interleaved pairs)."""
    if _CHECKED_TABLE and _CHECKED_TABLE[0] is cos:
        return
    if torch.equal(cos[:, 0::2], cos[:, 1::2]):
        _CHECKED_TABLE[:] = [cos]
        return
    half = cos.shape[-1] // 2
    layout = "rotate-half ([θ, θ] concatenated)" if torch.equal(cos[:, :half], cos[:, half:]) else "unknown"
    raise ValueError(f"full-width rotary tables [S, D] = {tuple(cos.shape)} are not interleaved (layout: {layout}); "
                     "this package rotates interleaved pairs (x[2i], x[2i+1]) as Wan, HunyuanVideo and FastVideo do: "
                     "pass [S, D/2] tables (one angle per pair) or tables with each angle repeated twice in place")


def apply_rotary(x: torch.Tensor, freqs_cis: RotaryTables) -> torch.Tensor:
    """Rotate interleaved pairs of `x [B, S, H, D]` in fp32 and cast back.

    `o[2i] = x[2i] cos - x[2i+1] sin`, `o[2i+1] = x[2i+1] cos + x[2i] sin`. Tables must cover exactly `S` rows.
    CUDA tensors go through one fused Triton kernel (`rotary_triton`, same math in fp32 registers) unless env
    `DIFFUSERS_DIST_ATTN_ROTARY=torch`; everything else runs the PyTorch formula below.
    """
    cos, sin = normalize_rotary_tables(freqs_cis, x.shape[-1])
    if cos.shape[1] != x.shape[1]:
        raise ValueError(f"rotary tables cover {cos.shape[1]} tokens but the sequence has {x.shape[1]}")
    if cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"rotary tables have batch {cos.shape[0]}; x has batch {x.shape[0]} (allowed: 1 or {x.shape[0]})")
    fused = envs.get(envs.ROTARY).lower() != "torch"
    if fused and rotary_fused is not None and x.is_cuda and not (cos.requires_grad or sin.requires_grad):
        return rotary_fused(x, cos, sin, 1)
    return rotary_torch(x, cos, sin)


def rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The PyTorch formula: `x [B, S, H, D]`, normalized tables `[1 or B, S, 1, D/2]`."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.float(), sin.float()
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.type_as(x)
