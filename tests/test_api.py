"""The FastVideo API page's signatures keep working (positional order, defaults, enum members)."""

import inspect

import torch

from diffusers_dist_attn import AttentionBackendEnum, DistributedAttention, DistributedAttention_VSA, LocalAttention


def test_constructor_signatures_match_the_api_page():
    for cls in (DistributedAttention, DistributedAttention_VSA):
        params = list(inspect.signature(cls.__init__).parameters)
        assert params[1:8] == ["num_heads", "head_size", "num_kv_heads", "softmax_scale", "causal",
                               "supported_attention_backends", "prefix"]
    params = list(inspect.signature(LocalAttention.__init__).parameters)
    assert params[1:7] == ["num_heads", "head_size", "num_kv_heads", "softmax_scale", "causal",
                           "supported_attention_backends"]
    assert "prefix" not in params


def test_positional_forward_calls_as_on_the_api_page():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 8) for _ in range(3))
    rq, rk, rv = (torch.randn(1, 3, 2, 8) for _ in range(3))
    backends = (AttentionBackendEnum.TORCH_SDPA, AttentionBackendEnum.FLASH_ATTN)
    da = DistributedAttention(2, 8, None, None, False, backends, "blocks.0.attn1")
    out, rep = da(q, k, v, rq, rk, rv)
    assert out.shape == q.shape and rep.shape == rq.shape
    out, rep = da(q, k, v)
    assert rep is None
    vsa = DistributedAttention_VSA(2, 8, None, None, False, (AttentionBackendEnum.VIDEO_SPARSE_ATTN,), "x")
    out, rep = vsa(q, k, v, None, None, None, torch.zeros_like(q), grid_size=(2, 2, 2))
    assert out.shape == q.shape and rep is None
    assert LocalAttention(2, 8)(q, k, v).shape == q.shape
    assert da.num_heads == 2 and da.head_size == 8 and da.num_kv_heads == 2 and da.prefix == "blocks.0.attn1"
