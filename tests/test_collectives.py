"""Collectives on real gloo groups: shapes, values, adjoint backward, world-size-1 identity."""

import io

import pytest
import torch
from distributed_utils import run_distributed

from diffusers_dist_attn import get_sequence_parallel_groups
from diffusers_dist_attn.distributed import (
    all_gather_heads,
    gather_sequence,
    heads_to_sequence,
    sequence_to_heads,
    shard_sequence,
)


def test_world_size_one_is_identity_without_copies():
    x = torch.randn(2, 7, 4, 3)
    assert sequence_to_heads(x, None) is x
    assert heads_to_sequence(x, None) is x
    assert all_gather_heads(x, None) is x
    assert shard_sequence(x, None, dim=-3)[0] is x  # negative dims are fine
    local, n = shard_sequence(x, None)
    assert local is x and n == 7
    assert gather_sequence(x, None, 1) is x


def _collectives_body(rank, world):
    group = get_sequence_parallel_groups().sp_group
    torch.manual_seed(0)
    full = torch.randn(2, 11, 4 * world, 3, requires_grad=True)  # 11 tokens: uneven over 2 and 4 ranks
    local, n = shard_sequence(full, group, dim=-3)  # a negative dim: same as dim=1
    heads = sequence_to_heads(local, group)  # [B, S_pad, H/P, D]
    h_loc = heads.shape[2]
    padded = torch.nn.functional.pad(full, (0, 0, 0, 0, 0, heads.shape[1] - n))
    expect_heads = padded[:, :, rank * h_loc:(rank + 1) * h_loc]
    back = heads_to_sequence(heads, group)
    gathered = gather_sequence(back, group, 1, n)
    weight = torch.randn(2, 11, 4 * world, 3)
    (gathered * weight).sum().backward()
    rep = torch.randn(2, 5, 4 * world, 3, requires_grad=True)
    rep_full = all_gather_heads(rep[:, :, rank * h_loc:(rank + 1) * h_loc], group)
    rep_full.sum().backward()
    # batch 1: the all-gather's result is a view of the collective's buffer; it must be complete when handed out
    whole = torch.randn(1, 3 * world, 2, 3)
    one = gather_sequence(whole[:, rank * 3:(rank + 1) * 3], group, 1, 3 * world - 1)
    buf = io.BytesIO()
    torch.save(one, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()))
    # a list moves in one collective and equals the concatenation moved alone (also a one-element list)
    a, b = torch.randn(2, 3, 4 * world, 3), torch.randn(2, 3, 4 * world, 3)
    listed_err = max((sequence_to_heads([a, b], group) - sequence_to_heads(torch.cat([a, b]), group)).abs().max().item(),
                     (sequence_to_heads([a], group) - sequence_to_heads(a, group)).abs().max().item())
    return {
        "listed_err": listed_err,
        "batch1_saved_err": (saved - whole[:, :3 * world - 1]).abs().max().item(),
        "heads_err": (heads - expect_heads).abs().max().item(),
        "roundtrip_err": (gathered - full).abs().max().item(),
        "grad_err": (full.grad - weight).abs().max().item(),
        "local_len": local.shape[1],
        "rep_err": (rep_full - rep).abs().max().item(),
        "rep_grad_slice": rep.grad[:, :, rank * h_loc:(rank + 1) * h_loc].unique().tolist(),
    }


def test_collectives_two_and_four_ranks():
    for world in (2, 4):
        for r in run_distributed(world, _collectives_body):
            assert r["batch1_saved_err"] == 0 and r["listed_err"] == 0
            assert r["heads_err"] == 0 and r["roundtrip_err"] == 0 and r["rep_err"] == 0
            # gather's backward reduce-scatters (P identical grads) and shard's backward divides by P: identity.
            assert r["grad_err"] < 1e-6
            assert r["local_len"] == -(-11 // world)
            # all-gather backward = reduce-scatter SUM of the P identical upstream grads
            assert r["rep_grad_slice"] == [float(world)]


def test_sequence_to_heads_rejects_mismatched_lists_before_communicating():
    """Checked before any collective, so it raises on every rank alike (here without a group at all)."""
    with pytest.raises(ValueError, match="one shape and dtype"):
        sequence_to_heads([torch.randn(1, 4, 2, 3), torch.randn(1, 5, 2, 3)], None)
    with pytest.raises(ValueError, match="non-empty list"):
        sequence_to_heads([], None)
