"""Code written against FastVideo's layer API runs unchanged: constructor arguments its models pass, both forward
signatures (the seed page's `replicated_q` fourth, FastVideo's current `original_seq_len` fourth), and every rotary
table layout is either read correctly or refused with the fix."""

from __future__ import annotations

import pytest
import torch

from diffusers_dist_attn import (
    AttentionBackendEnum,
    DistributedAttention,
    DistributedAttention_VSA,
    LocalAttention,
)

H, D, S = 2, 8, 12


def _qkv(seq: int = S) -> list[torch.Tensor]:
    return [torch.randn(1, seq, H, D) for _ in range(3)]


def test_fastvideo_constructor_arguments():
    backends = (AttentionBackendEnum.TORCH_SDPA, AttentionBackendEnum.VIDEO_SPARSE_ATTN)
    q, k, v = _qkv()
    dense = DistributedAttention(H, D, None, None, False, backends, "blocks.0.attn1", dropout_rate=0.0)
    local = LocalAttention(H, D, None, None, False, backends, dropout_rate=0.0)
    vsa = DistributedAttention_VSA(H, D, None, None, False, backends, "blocks.0.attn1", dropout_rate=0.0)
    assert torch.allclose(dense(q, k, v)[0], local(q, k, v), atol=1e-6)
    out, _ = vsa(q, k, v, gate_compress=torch.zeros_like(q), grid_size=(1, 3, 4), sparsity=0.0)
    assert out.shape == q.shape


def test_both_fourth_argument_conventions():
    torch.manual_seed(0)
    layer = DistributedAttention(H, D)
    q, k, v = _qkv()
    rq, rk, rv = (torch.randn(1, 3, H, D) for _ in range(3))
    seed_style = layer(q, k, v, rq, rk, rv)  # the seed API page: replicated tokens fourth to sixth
    assert seed_style[1].shape == rq.shape
    assert torch.equal(layer(q, k, v, S)[0], layer(q, k, v, original_seq_len=S)[0])  # FastVideo's current models


def test_dropout_rate_nonzero_is_refused_in_training_only():
    q, k, v = _qkv()
    layer = DistributedAttention(H, D, dropout_rate=0.1)
    with pytest.raises(ValueError, match="dropout_rate=0.1 in training mode"):
        layer.train()(q, k, v)
    assert layer.eval()(q, k, v)[0].shape == q.shape  # inference: dropout does not apply
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        DistributedAttention(H, D, dropout_rate=1.5)


def test_rotary_table_layouts():
    torch.manual_seed(0)
    layer = LocalAttention(H, D)
    q, k, v = _qkv()
    angles = torch.rand(S, D // 2) * 3
    half = (angles.cos(), angles.sin())  # [S, D/2]: one angle per interleaved pair
    interleaved = (angles.repeat_interleave(2, -1).cos(), angles.repeat_interleave(2, -1).sin())  # [S, D]
    assert torch.allclose(layer(q, k, v, half), layer(q, k, v, interleaved), atol=1e-6)
    rotate_half = (torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin())  # [θ, θ]
    with pytest.raises(ValueError, match="not interleaved.*rotate-half"):
        layer(q, k, v, rotate_half)
