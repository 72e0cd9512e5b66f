"""Numeric helpers shared by the PyTorch references and the exact math paths."""

from __future__ import annotations

import torch

__all__ = ["acc"]


def acc(t: torch.Tensor) -> torch.Tensor:
    """`t` in the accumulation dtype: fp32, or fp64 for fp64 inputs (so references can serve gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
