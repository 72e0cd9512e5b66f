"""Attention layers, the backend registry and the kernels it dispatches to."""

from .backends import (
    available_implementations,
    dense_attention,
    resolve_backend,
    vsa_attention_tiled,
)
from .layers import DistributedAttention, DistributedAttention_VSA, LocalAttention
from .registry import AttentionBackendEnum, select_backend, selection_report
from .rotary import apply_rotary

__all__ = [
    "AttentionBackendEnum",
    "dense_attention",
    "resolve_backend",
    "select_backend",
    "selection_report",
    "vsa_attention_tiled",
    "available_implementations",
    "apply_rotary",
    "LocalAttention",
    "DistributedAttention",
    "DistributedAttention_VSA",
]
