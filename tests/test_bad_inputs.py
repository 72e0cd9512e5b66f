"""Every bad input gets a clear ValueError on every rank, before any collective (no rank hangs)."""

import pytest
import torch
from distributed_utils import run_distributed

from diffusers_dist_attn import (
    DistributedAttention,
    DistributedAttention_VSA,
    LocalAttention,
    init_sequence_parallel,
)


def _qkv(*shape):
    return [torch.randn(*shape) for _ in range(3)]


def test_sp_degree_must_divide_world_single_process():
    with pytest.raises(ValueError, match=r"sp=2 must be a positive divisor of the world size 1.*torchrun"):
        init_sequence_parallel(sp=2)


def _bad_sp_degree(rank, world):
    try:
        init_sequence_parallel(sp=3)
    except ValueError as exc:
        return str(exc)
    return None


def test_sp_degree_must_divide_world_multi_process():
    for msg in run_distributed(2, _bad_sp_degree):
        assert msg is not None and "sp=3" in msg and "[1, 2]" in msg


def _bad_inputs_on_ranks(rank, world):
    """Each call must raise on every rank; if a rank entered a collective, the harness would time out."""
    messages = {}
    q, k, v = _qkv(1, 4, 1, 8)  # 1 head over 2 ranks: impossible without a ring
    cases = {
        "heads": lambda: DistributedAttention(1, 8)(q, k, v),
        "seq_len": lambda: DistributedAttention(4, 8)(*_qkv(1, 4, 4, 8), original_seq_len=3),
        "grid": lambda: DistributedAttention_VSA(4, 8)(*_qkv(1, 4, 4, 8), original_seq_len=8, grid_size=(2, 2, 3)),
        "sparsity": lambda: DistributedAttention_VSA(4, 8)(*_qkv(1, 4, 4, 8), grid_size=(2, 2, 2), sparsity=1.0),
        # tables for 6 of the 8 tokens: must fail before the all-to-all, not after it on some ranks only
        "rotary": lambda: DistributedAttention(4, 8)(*_qkv(1, 4, 4, 8), freqs_cis=(torch.ones(6, 8), torch.zeros(6, 8))),
        "implementation": lambda: DistributedAttention_VSA(4, 8)(*_qkv(1, 4, 4, 8), grid_size=(2, 2, 2),
                                                                 implementation="cuda-please"),
    }
    for name, call in cases.items():
        try:
            call()
        except ValueError as exc:
            messages[name] = str(exc)
    return messages


def test_errors_raise_on_every_rank_before_collectives():
    for messages in run_distributed(2, _bad_inputs_on_ranks):
        assert "1 attention heads cannot be split over a sequence-parallel degree of 2" in messages["heads"]
        assert "ring" in messages["heads"]
        assert "original_seq_len=3" in messages["seq_len"]
        assert "grid_size (2, 2, 3) has 12 tokens but the (unpadded) sequence has 8" in messages["grid"]
        assert "sparsity must be in [0, 1)" in messages["sparsity"]
        assert "rotary tables cover 6 tokens but the (unpadded) sequence has 8" in messages["rotary"]
        assert "implementation='cuda-please'" in messages["implementation"]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(4, 3, 8), torch.randn(4, 3, 8), torch.randn(4, 3, 8)), "q must be 4-D"),
        (lambda: (torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8).double(), torch.randn(1, 4, 3, 8)), "k.dtype"),
        (lambda: (torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8, device="meta"), torch.randn(1, 4, 3, 8)), "one device"),
        (lambda: (torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8), torch.randn(1, 5, 3, 8)), "same shape"),
        (lambda: (torch.randn(1, 4, 3, 8), torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)), "batch"),
        (lambda: (torch.randn(1, 4, 4, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)), "equal head counts"),
    ],
)
def test_shape_dtype_device_errors(make, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        DistributedAttention(q.shape[-2], 8)(q, k, v)


def test_replicated_errors():
    q, k, v = _qkv(1, 4, 2, 8)
    rq = torch.randn(1, 3, 2, 8)
    layer = DistributedAttention(2, 8)
    with pytest.raises(ValueError, match=r"given together; missing \['replicated_v'\]"):
        layer(q, k, v, rq, rq)
    with pytest.raises(ValueError, match="replicated_mask must be a bool tensor"):
        layer(q, k, v, rq, rq, rq, replicated_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="replicated_k"):
        layer(q, k, v, rq, torch.randn(1, 3, 1, 8), rq)
    # FastVideo's current models pass original_seq_len as the fourth positional argument: an int there is taken
    # as original_seq_len (a tensor is replicated_q, as the seed API page has it); given twice is an error
    assert torch.equal(layer(q, k, v, 4)[0], layer(q, k, v, original_seq_len=4)[0])
    with pytest.raises(TypeError, match="original_seq_len was given twice"):
        layer(q, k, v, 4, original_seq_len=4)
    with pytest.raises(ValueError, match="original_seq_len must be a positive int"):
        layer(q, k, v, original_seq_len=3.9)
    with pytest.raises(ValueError, match="without replicated"):
        layer(q, k, v, replicated_mask=torch.ones(1, 3, dtype=torch.bool))


def test_vsa_errors():
    q, k, v = _qkv(1, 8, 2, 8)
    layer = DistributedAttention_VSA(2, 8)
    with pytest.raises(ValueError, match="grid_size=.*required"):
        layer(q, k, v)
    with pytest.raises(ValueError, match="sparsity must be in"):
        layer(q, k, v, grid_size=(2, 2, 2), sparsity=-0.1)
    with pytest.raises(ValueError, match="gate_compress must match q"):
        layer(q, k, v, gate_compress=torch.randn(1, 8, 2, 4), grid_size=(2, 2, 2))
    with pytest.raises(ValueError, match="causal"):
        DistributedAttention_VSA(2, 8, causal=True)


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        LocalAttention(4, 8, num_kv_heads=3)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        DistributedAttention(4, 8, not_an_arg=1)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        LocalAttention(2, 8)(*_qkv(1, 4, 2, 8), key_mask=torch.ones(1, 3, dtype=torch.bool))
