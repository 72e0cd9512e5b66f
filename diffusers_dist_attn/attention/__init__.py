"""Attention layers and dense backends."""

from .backends import AttentionBackendEnum, dense_attention, resolve_backend
from .layers import DistributedAttention, DistributedAttention_VSA, LocalAttention
from .rotary import apply_rotary

__all__ = [
    "AttentionBackendEnum",
    "dense_attention",
    "resolve_backend",
    "apply_rotary",
    "LocalAttention",
    "DistributedAttention",
    "DistributedAttention_VSA",
]
