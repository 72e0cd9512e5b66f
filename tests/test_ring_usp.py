"""Hybrid Ulysses x ring (USP) and uneven head splits on real gloo groups equal single-process attention.

One spawn per world size (2, 4, 8) runs every valid (ulysses, ring) split of that world inside the workers
(`init_sequence_parallel(world, ring=r)` re-creates the groups on the same process group); the parent compares
outputs and q/k/v (and replicated) gradients with single-process attention (fp32, max abs error <= 1e-5).
Shapes are tiny and uneven: 13 video tokens, 5 text tokens with a key mask, heads that do not divide the degree.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_distributed
from references import joint_attention_reference

from diffusers_dist_attn import (
    DistributedAttention,
    DistributedAttention_VSA,
    LocalAttention,
    get_sequence_parallel_groups,
    init_sequence_parallel,
)
from diffusers_dist_attn.attention.backends import attention_forward_with_lse, dense_attention_with_lse
from diffusers_dist_attn.attention.ring import ring_attention
from diffusers_dist_attn.distributed import (
    all_gather_heads,
    gather_sequence,
    head_split,
    heads_to_sequence,
    sequence_to_heads,
    shard_sequence,
)

TOL = 1e-5
B, S, D, L = 2, 13, 8, 5
GRID = (1, 3, 5)  # VSA: 15 tokens, 2 tiles
HEADS = {2: (3,), 4: (6,), 8: (6, 12)}  # 3 over 2, 6 over 4 and 12 over 8 are uneven; 6 over 8 needs a ring


def _splits(world: int) -> list[tuple[int, int]]:
    return [(world // r, r) for r in range(1, world + 1) if world % r == 0]


def _inputs(heads: int, seq: int = S, seed: int = 0):
    g = torch.Generator().manual_seed(seed + heads)
    q, k, v = (torch.randn(B, seq, heads, D, generator=g) for _ in range(3))
    rep = tuple(torch.randn(B, L, heads, D, generator=g) for _ in range(3))
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, False]])
    angles = torch.randn(seq, D // 2, generator=g)
    freqs = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
    w_out, w_rep = torch.randn(B, seq, heads, D, generator=g), torch.randn(B, L, heads, D, generator=g)
    gate = torch.randn(B, seq, heads, D, generator=g)
    return (q, k, v), rep, mask, freqs, w_out, w_rep, gate


@functools.cache
def _reference(heads: int, replicated: bool):
    """Single-process joint attention (LocalAttention over [video ; text] with the text mask), RoPE on."""
    (q, k, v), rep, mask, freqs, w_out, w_rep, _ = _inputs(heads)
    out, rep_out, grads = joint_attention_reference((q, k, v), rep, mask, freqs, w_out, w_rep, replicated)
    return out, rep_out, grads[:3 + 3 * replicated]


def _distributed(heads: int, replicated: bool):
    """DistributedAttention on the current groups; returns (out, rep_out, grads) like `_reference`."""
    groups = get_sequence_parallel_groups()
    group = groups.sp_group
    (q, k, v), rep, mask, freqs, w_out, w_rep, _ = _inputs(heads)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *rep)]
    q, k, v, rq, rk, rv = leaves
    shards = [shard_sequence(t, group)[0] for t in (q, k, v)]
    layer = DistributedAttention(heads, D)
    if replicated:
        out, rep_out = layer(*shards, rq, rk, rv, original_seq_len=S, freqs_cis=freqs, replicated_mask=mask)
    else:
        out, rep_out = layer(*shards, original_seq_len=S, freqs_cis=freqs)
    full = gather_sequence(out, group, 1, S)
    loss = (full * w_out).sum() + (0 if rep_out is None else (rep_out * w_rep).sum())
    loss.backward()
    # replicated inputs: the SP ranks' grads sum to P x the single-process grads (None where a rank did not use
    # them: only ring rank 0 computes the replicated queries)
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves[:3 + 3 * replicated]]
    for g in grads[3:]:
        dist.all_reduce(g, op=dist.ReduceOp.AVG, group=group)
    return full.detach(), None if rep_out is None else rep_out.detach(), grads


def _vsa(heads: int, sparsity: float = 0.5):
    """DistributedAttention_VSA (whole heads over the full sequence) with an uneven head split."""
    group = get_sequence_parallel_groups().sp_group
    seq = GRID[0] * GRID[1] * GRID[2]
    (q, k, v), _, _, freqs, w_out, _, gate = _inputs(heads, seq, seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    shards = [shard_sequence(t, group)[0] for t in leaves]
    out, _ = DistributedAttention_VSA(heads, D)(*shards[:3], gate_compress=shards[3], original_seq_len=seq,
                                              freqs_cis=freqs, grid_size=GRID, sparsity=sparsity)
    full = gather_sequence(out, group, 1, seq)
    (full * w_out).sum().backward()
    return full.detach(), [t.grad for t in leaves]


def _error(call) -> str | None:
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return None


def _world_body(rank: int, world: int) -> dict:
    results = {}
    for ulysses, ring in _splits(world):
        groups = init_sequence_parallel(world, ring=ring, cpu=True)
        assert (groups.ulysses_size, groups.ring_size, groups.sp_size) == (ulysses, ring, world)
        assert groups.sp_rank == groups.ring_rank * ulysses + groups.ulysses_rank == rank
        for heads in HEADS[world]:
            if heads < ulysses:  # impossible without a bigger ring: a clear error on every rank, no collective
                results[(ulysses, ring, heads, "error")] = _error(lambda h=heads: DistributedAttention(h, D)(
                    *(torch.randn(B, 2, h, D) for _ in range(3))))
                continue
            for replicated in (False, True):
                results[(ulysses, ring, heads, replicated)] = _distributed(heads, replicated)
        if ring in (1, world // 2):  # VSA ignores the ring: pure Ulysses over the SP group, uneven heads
            results[(ulysses, ring, "vsa")] = _vsa(max(HEADS[world]))
        if ring == world:
            results["ring_causal"] = _error(lambda: DistributedAttention(2 * world, D, causal=True)(
                *(torch.randn(B, 2, 2 * world, D) for _ in range(3))))
    if world == 8:  # SP 4 = 2 x 2 inside a world of 8 (dp 2): the mesh keeps DP outside SP
        groups = init_sequence_parallel(4, ulysses=2, cpu=True)
        assert (groups.dp_size, groups.ring_size, groups.sp_rank) == (2, 2, rank % 4)
        results[("dp2", 6)] = _distributed(6, True)
        results["ring_fa3"] = _error(lambda: DistributedAttention(6, D, default_backend="flash_attn_3")(
            *(torch.randn(B, 4, 6, D) for _ in range(3))))
    return results


def _check(world: int, results: list[dict]) -> float:
    worst = 0.0
    for r in results:
        for key, value in r.items():
            if key == "ring_causal":
                assert value is not None and "causal=True is not supported with ring attention" in value
                continue
            if key == "ring_fa3":
                assert value is not None and "flash_attn_3 returns no log-sum-exp" in value and "ring=1" in value
                continue
            if key[-1] == "error":
                assert value is not None and f"{key[2]} attention heads cannot be split" in value and "ring" in value
                continue
            if key[-1] == "vsa":
                ref_out, ref_grads = _vsa_reference(max(HEADS[world]))
                out, grads = value
                errs = [(out - ref_out).abs().max()] + [(g - rg).abs().max() for g, rg in zip(grads, ref_grads,
                                                                                               strict=True)]
            else:
                heads, replicated = (6, True) if key[0] == "dp2" else key[2:]
                ref_out, ref_rep, ref_grads = _reference(heads, replicated)
                out, rep_out, grads = value
                errs = [(out - ref_out).abs().max()]
                if replicated:
                    errs.append((rep_out - ref_rep).abs().max())
                errs += [(g - rg).abs().max() for g, rg in zip(grads, ref_grads, strict=True)]
            err = max(float(e) for e in errs)
            assert err <= TOL, (world, key, err)
            worst = max(worst, err)
    return worst


@functools.cache
def _vsa_reference(heads: int):
    seq = GRID[0] * GRID[1] * GRID[2]
    (q, k, v), _, _, freqs, w_out, _, gate = _inputs(heads, seq, seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    out, _ = DistributedAttention_VSA(heads, D)(*leaves[:3], gate_compress=leaves[3], original_seq_len=seq,
                                              freqs_cis=freqs, grid_size=GRID, sparsity=0.5)
    (out * w_out).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_every_split_equals_single_process(world):
    results = run_distributed(world, _world_body, timeout=240)
    worst = _check(world, results)
    assert worst <= TOL
    for key, value in results[0].items():  # the replicated output is bitwise identical on every rank
        if isinstance(key, tuple) and key[-1] is True:
            assert all(torch.equal(r[key][1], value[1]) for r in results), key


# ---------------------------------------------------------------------------------------------------------------
# Single-process pieces: LSE kernel, ring with one rank, planner-facing errors
# ---------------------------------------------------------------------------------------------------------------
def test_dense_attention_with_lse_matches_reference_and_gradcheck():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    out, lse = dense_attention_with_lse(q, k, v, key_mask=mask)
    assert torch.isinf(lse[1]).all() and out[1].abs().max() == 0  # no valid key: zeros, -inf, no NaN
    mask[1] = True
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 2 + torch.where(mask[:, None, None], 0.0, float("-inf"))
    out, lse = dense_attention_with_lse(q, k, v, key_mask=mask)
    assert torch.allclose(lse, scores.logsumexp(-1))
    assert torch.allclose(out, torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v))
    assert torch.autograd.gradcheck(lambda *t: dense_attention_with_lse(*t, key_mask=mask), (q, k, v))


def test_lse_merge_of_two_halves_is_exact():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    full, full_lse, _ = attention_forward_with_lse(q, k, v, 8**-0.5)
    parts = [attention_forward_with_lse(q, k[:, i:i + 3], v[:, i:i + 3], 8**-0.5)[:2] for i in (0, 3)]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    merged = sum(o * torch.exp(p_lse - lse).transpose(1, 2)[..., None] for o, p_lse in parts)
    assert (merged - full).abs().max() < 1e-6 and (lse - full_lse).abs().max() < 1e-6


def test_world_one_paths_and_head_split():
    x = torch.randn(2, 5, 3, 4)
    assert sequence_to_heads(x, None) is x and heads_to_sequence(x, None, 3) is x and all_gather_heads(x, None, 3) is x
    assert head_split(12, 8) == [2, 2, 2, 2, 1, 1, 1, 1] and head_split(6, 3) == [2, 2, 2]
    with pytest.raises(ValueError, match="every rank needs at least one head"):
        head_split(3, 4)
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    assert torch.allclose(ring_attention(q, k, v, None), LocalAttention(2, 8)(q, k, v), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Tiny Wan and HunyuanVideo (the adapters' own test builders) at 8 ranks with 4 heads: every hybrid split
# ---------------------------------------------------------------------------------------------------------------
def _model_body(rank: int, world: int) -> dict:
    from test_hunyuan_video import loss_weights, make_model
    from test_wan_parallel import build_case

    from diffusers_dist_attn.models import parallelize

    results = {}
    for ring in (2, 4, 8):  # 4 heads: ulysses 4, 2, 1
        init_sequence_parallel(world, ring=ring, cpu=True)
        for name, build in (("wan", lambda: build_case("t2v")), ("hunyuan", make_model)):
            model, inputs = build()
            handle = parallelize(model)
            with torch.no_grad():
                results[(name, ring)] = model(**inputs, return_dict=False)[0]
            if ring == 2:  # parameter gradients, averaged over the SP group (FastVideo's convention)
                out = model(**inputs, return_dict=False)[0]
                (out * loss_weights(out.shape)).sum().backward()
                grads = {}
                for pname, param in model.named_parameters():
                    grad = param.grad if param.grad is not None else torch.zeros_like(param)
                    dist.all_reduce(grad, op=dist.ReduceOp.AVG)
                    grads[pname] = grad
                results[(name, "grads")] = grads
            handle.remove()
    return results


def test_tiny_wan_and_hunyuan_video_at_8_ranks_equal_single_process():
    pytest.importorskip("test_hunyuan_video")
    pytest.importorskip("test_wan_parallel")
    from test_hunyuan_video import loss_weights, make_model
    from test_wan_parallel import build_case

    refs, ref_grads = {}, {}
    for name, build in (("wan", lambda: build_case("t2v")), ("hunyuan", make_model)):
        model, inputs = build()
        assert model.config.num_attention_heads == 4
        with torch.no_grad():
            refs[name] = model(**inputs, return_dict=False)[0]
        out = model(**inputs, return_dict=False)[0]
        (out * loss_weights(out.shape)).sum().backward()
        ref_grads[name] = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    for res in run_distributed(8, _model_body, timeout=240):
        for key, value in res.items():
            if key[1] == "grads":  # parameter grads sum over all tokens: the adapters' tests' atol 1e-5, rtol 1e-4
                for pname, grad in value.items():
                    torch.testing.assert_close(grad, ref_grads[key[0]][pname], atol=TOL, rtol=1e-4)
            else:
                err = float((value - refs[key[0]]).abs().max())
                assert err <= TOL, (key, err)
