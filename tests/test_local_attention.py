"""LocalAttention, rotary and backend selection, single process."""

import math
import warnings

import pytest
import torch

from diffusers_dist_attn import AttentionBackendEnum, LocalAttention
from diffusers_dist_attn.attention import apply_rotary, resolve_backend
from diffusers_dist_attn.envs import BACKEND

BACKEND_ENV = BACKEND.name


def naive_attention(q, k, v, scale, key_mask=None, causal=False):
    """Independent fp64 attention on [B, S, H, D] with GQA by head repetition."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    if causal:
        s_q, s_k = logits.shape[-2:]
        logits = logits.masked_fill(torch.ones(s_q, s_k, dtype=torch.bool).triu(1), -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v.double()).float()


def test_local_attention_matches_naive_with_mask_gqa_and_causal():
    torch.manual_seed(0)
    q = torch.randn(2, 9, 4, 16)
    k, v = torch.randn(2, 13, 2, 16), torch.randn(2, 13, 2, 16)
    mask = torch.rand(2, 13) > 0.3
    mask[:, 0] = True
    layer = LocalAttention(4, 16, num_kv_heads=2, softmax_scale=0.3)
    out = layer(q, k, v, key_mask=mask)
    assert (out - naive_attention(q, k, v, 0.3, mask)).abs().max() < 1e-5
    q2, k2, v2 = (torch.randn(1, 7, 2, 8) for _ in range(3))
    causal = LocalAttention(2, 8, causal=True)(q2, k2, v2)
    assert (causal - naive_attention(q2, k2, v2, 8**-0.5, causal=True)).abs().max() < 1e-5
    mask2 = torch.tensor([[True, True, False, True, True, True, False]])
    both = LocalAttention(2, 8, causal=True)(q2, k2, v2, key_mask=mask2)  # causal is kept when a mask is given
    assert (both - naive_attention(q2, k2, v2, 8**-0.5, key_mask=mask2, causal=True)).abs().max() < 1e-5


def test_rotary_matches_complex_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 8)
    angles = torch.randn(6, 4)
    expect = torch.view_as_real(torch.view_as_complex(x.reshape(2, 6, 3, 4, 2)) * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
    half = apply_rotary(x, (angles.cos(), angles.sin()))  # [S, D/2] tables
    full = apply_rotary(x, (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)))  # [S, D]
    diffusers_fmt = apply_rotary(x, (angles.cos().repeat_interleave(2, -1)[None, :, None], angles.sin().repeat_interleave(2, -1)[None, :, None]))
    for out in (half, full, diffusers_fmt):
        assert (out - expect).abs().max() < 1e-6
    with pytest.raises(ValueError, match="cover 5 tokens"):
        apply_rotary(x, (angles[:5].cos(), angles[:5].sin()))


def test_backend_selection_on_cpu(monkeypatch):
    q = torch.randn(1, 4, 2, 8)
    assert resolve_backend(q) is AttentionBackendEnum.SDPA_FLASH  # SDPA's fused CPU kernel, math as fallback
    # A missing optional backend falls back with one warning, never an error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend(q, requested="flash_attn") is AttentionBackendEnum.SDPA_FLASH
    assert any("flash_attn requested" in str(w.message) for w in caught)
    monkeypatch.setenv(BACKEND_ENV, "sdpa_efficient")
    assert resolve_backend(q) is AttentionBackendEnum.SDPA_EFFICIENT
    monkeypatch.setenv(BACKEND_ENV, "SDPA_FLASH")
    # not in the supported set -> automatic choice
    assert resolve_backend(q, supported=(AttentionBackendEnum.SDPA_MATH,)) is AttentionBackendEnum.SDPA_MATH
    with pytest.raises(ValueError, match="unknown attention backend"):
        AttentionBackendEnum.parse("nope")


def test_local_attention_compiles_without_graph_break():
    torch.manual_seed(0)
    layer = LocalAttention(2, 8)
    q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    compiled = torch.compile(layer, fullgraph=True)
    assert (compiled(q, k, v) - layer(q, k, v)).abs().max() < 1e-5
