"""DistributedAttention on real gloo groups equals single-process LocalAttention (fp32, <= 1e-5)."""

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_distributed
from references import joint_attention_reference

from diffusers_dist_attn import DistributedAttention, get_sequence_parallel_groups
from diffusers_dist_attn.distributed import gather_sequence, shard_sequence

B, S, H, D, L = 2, 13, 4, 8, 5  # S = 13 is uneven over 2 and 4 ranks


def _inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    rq, rk, rv = (torch.randn(B, L, H, D) for _ in range(3))
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, False]])
    angles = torch.randn(S, D // 2)
    freqs = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
    w_out, w_rep = torch.randn(B, S, H, D), torch.randn(B, L, H, D)
    return (q, k, v), (rq, rk, rv), mask, freqs, w_out, w_rep


def _single_process(replicated: bool, rotary: bool):
    qkv, rep, mask, freqs, w_out, w_rep = _inputs()
    return joint_attention_reference(qkv, rep, mask, freqs if rotary else None, w_out, w_rep, replicated)


def _distributed_body(rank, world, replicated, rotary):
    group = get_sequence_parallel_groups().sp_group
    (q, k, v), rep, mask, freqs, w_out, w_rep = _inputs()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *rep)]
    q, k, v, rq, rk, rv = leaves
    shards = [shard_sequence(t, group)[0] for t in (q, k, v)]
    layer = DistributedAttention(H, D)
    kwargs = {"original_seq_len": S, "freqs_cis": freqs if rotary else None}
    if replicated:
        out, rep_out = layer(*shards, rq, rk, rv, replicated_mask=mask, **kwargs)
    else:
        out, rep_out = layer(*shards, **kwargs)
    full = gather_sequence(out, group, 1, S)
    loss = (full * w_out).sum() + (0 if rep_out is None else (rep_out * w_rep).sum())
    loss.backward()
    grads = [t.grad for t in leaves]
    for g in grads[3:] if group is not None else []:  # replicated inputs: each rank holds P x its head slice; average = single-process
        if g is not None:
            dist.all_reduce(g, op=dist.ReduceOp.AVG, group=group)
    return full.detach(), None if rep_out is None else rep_out.detach(), grads


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("replicated,rotary", [(False, False), (True, True)])
def test_distributed_equals_single_process(world, replicated, rotary):
    ref_out, ref_rep, ref_grads = _single_process(replicated, rotary)
    if world == 1:
        results = [_distributed_body(0, 1, replicated, rotary)]
    else:
        results = run_distributed(world, _distributed_body, replicated, rotary)
    for out, rep_out, grads in results:
        assert (out - ref_out).abs().max() <= 1e-5
        if replicated:
            assert (rep_out - ref_rep).abs().max() <= 1e-5
        for g, rg in zip(grads, ref_grads, strict=True):
            if rg is not None:
                assert (g - rg).abs().max() <= 1e-5


def test_padded_replicated_keys_get_no_weight():
    (q, k, v), (rq, rk, rv), mask, _, _, _ = _inputs()
    layer = DistributedAttention(H, D)
    out, rep = layer(q, k, v, rq, rk, rv, replicated_mask=mask)
    rk2, rv2 = rk.clone(), rv.clone()
    rk2[~mask], rv2[~mask] = 1e3, -1e3
    out2, rep2 = layer(q, k, v, rq, rk2, rv2, replicated_mask=mask)
    assert torch.equal(out, out2) and torch.equal(rep, rep2)


def _saved_storage_body(rank, world):
    """Largest storage that autograd keeps for one DistributedAttention call with RoPE (bytes), and q's size."""
    group = get_sequence_parallel_groups().sp_group
    (q, k, v), _, _, freqs, _, _ = _inputs()
    shards = [shard_sequence(t.clone().requires_grad_(), group)[0] for t in (q, k, v)]
    sizes = []

    def pack(t):
        sizes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        DistributedAttention(H, D)(*shards, original_seq_len=S, freqs_cis=freqs)
    return max(sizes), B * S * (H // world) * D * 4


def test_backward_does_not_keep_the_received_qkv_buffer():
    """After RoPE replaces q and k, the saved v must not pin the whole received [q; k; v] buffer (3x v)."""
    for largest, per_tensor in run_distributed(2, _saved_storage_body):
        assert largest < 2 * per_tensor, (largest, per_tensor)
