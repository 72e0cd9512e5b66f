"""The VSA reference against an independent dense masked fp32 computation, and its SP invariance."""

import math

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_distributed

from diffusers_dist_attn import DistributedAttention_VSA, LocalAttention, get_sequence_parallel_groups
from diffusers_dist_attn.attention.registry import selection_report
from diffusers_dist_attn.distributed import gather_sequence, shard_sequence
from diffusers_dist_attn.vsa import tile, tile_layout, topk_for_sparsity, untile


def vsa_oracle(q, k, v, gate, grid, sparsity, text=None):
    """Token-level VSA on raster-order [B, S, H, D] with an S x S mask; shares no code with the package."""
    t, h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 3)
    n_t, n_h, n_w = (math.ceil(x / 4) for x in grid)
    tile_id = ((coords[:, 0] // 4) * n_h + coords[:, 1] // 4) * n_w + coords[:, 2] // 4
    n = n_t * n_h * n_w
    member = torch.nn.functional.one_hot(tile_id, n).double()  # [S, N]
    counts = member.sum(0)
    scale = q.shape[-1] ** -0.5
    qd, kd, vd = q.double(), k.double(), v.double()
    mean = lambda x: torch.einsum("sn,bshd->bhnd", member, x) / counts[:, None]  # noqa: E731
    scores = mean(qd) @ mean(kd).transpose(-1, -2) * scale  # [B, H, N, N]
    out_c = scores.softmax(-1) @ mean(vd)  # [B, H, N, D]
    keep = math.ceil((1 - sparsity) * n)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(keep, -1).indices, True)
    token_mask = chosen[:, :, tile_id][:, :, :, tile_id]  # [B, H, S, S]
    logits = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    logits = logits.masked_fill(~token_mask, -math.inf)
    values = vd
    if text is not None:
        tk, tv, tmask = text
        text_logits = torch.einsum("bqhd,bkhd->bhqk", qd, tk.double()) * scale
        logits = torch.cat([logits, text_logits.masked_fill(~tmask[:, None, None, :], -math.inf)], -1)
        values = torch.cat([vd, tv.double()], 1)
    out_s = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values)
    out_c_tok = out_c[:, :, tile_id].transpose(1, 2)  # [B, S, H, D]
    return (out_c_tok * gate.double() + out_s).float()


@pytest.mark.parametrize("grid", [(5, 6, 7), (4, 4, 4), (1, 3, 9)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_reference_equals_dense_masked_oracle(grid, sparsity):
    torch.manual_seed(hash((grid, sparsity)) % 1000)
    s = grid[0] * grid[1] * grid[2]
    q, k, v, gate = (torch.randn(2, s, 3, 16) for _ in range(4))
    out, _ = DistributedAttention_VSA(3, 16)(q, k, v, gate_compress=gate, grid_size=grid, sparsity=sparsity)
    assert (out - vsa_oracle(q, k, v, gate, grid, sparsity)).abs().max() <= 1e-5


def test_reference_with_text_equals_oracle():
    torch.manual_seed(1)
    grid, s, b, h, d, n_text = (5, 6, 7), 210, 2, 2, 8, 6
    q, k, v, gate = (torch.randn(b, s, h, d) for _ in range(4))
    rq, rk, rv = (torch.randn(b, n_text, h, d) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    out, rep = DistributedAttention_VSA(h, d)(
        q, k, v, rq, rk, rv, gate, grid_size=grid, sparsity=0.6, replicated_mask=mask
    )
    assert (out - vsa_oracle(q, k, v, gate, grid, 0.6, text=(rk, rv, mask))).abs().max() <= 1e-5
    key_mask = torch.cat([torch.ones(b, s, dtype=torch.bool), mask], 1)
    dense_rep = LocalAttention(h, d)(rq, torch.cat([k, rk], 1), torch.cat([v, rv], 1), key_mask=key_mask)
    assert (rep - dense_rep).abs().max() <= 1e-5


@pytest.mark.parametrize("with_text", [False, True])
@pytest.mark.parametrize("with_gate", [False, True])
def test_all_blocks_runs_dense_and_matches_the_tiled_reference(with_text, with_gate):
    """Sparsity 0 selects every block: the automatic choice runs dense attention + the coarse stage on the untiled
    sequence; output, text output and every gradient equal the tiled reference (`implementation="torch"`)."""
    torch.manual_seed(4)
    grid, b, h, d, n_text = (5, 6, 7), 2, 2, 8, 6
    s = grid[0] * grid[1] * grid[2]
    inputs = [torch.randn(b, s, h, d) for _ in range(4)] + [torch.randn(b, n_text, h, d) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool) if with_text else None
    results = {}
    for implementation in (None, "torch"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        q, k, v, gate, rq, rk, rv = leaves
        text = (rq, rk, rv) if with_text else (None, None, None)
        out, rep = DistributedAttention_VSA(h, d)(q, k, v, *text, gate if with_gate else None, grid_size=grid,
                                                  sparsity=0.0, replicated_mask=mask, implementation=implementation)
        loss = (out * inputs[0].flip(1)).sum() + (rep.square().sum() if with_text else 0)
        loss.backward()
        results[implementation] = (out, rep, [t.grad for t in leaves], selection_report()["vsa"])
    out, rep, grads, chosen = results[None]
    ref_out, ref_rep, ref_grads, ref_chosen = results["torch"]
    assert (chosen, ref_chosen) == ("dense", "torch")
    assert (out - ref_out).abs().max() <= 1e-5
    if with_text:
        assert (rep - ref_rep).abs().max() <= 1e-5
        assert (out - vsa_oracle(q, k, v, gate if with_gate else torch.ones_like(q), grid, 0.0,
                                 text=(rk, rv, mask))).abs().max() <= 1e-5
    for g, rg in zip(grads, ref_grads, strict=True):
        if rg is None:
            assert g is None or g.abs().max() == 0
        else:
            assert (g - rg).abs().max() <= 1e-5


def test_all_blocks_keeps_the_kernels_an_environment_names(monkeypatch):
    monkeypatch.setenv("DIFFUSERS_DIST_ATTN_VSA_IMPL", "torch")
    q, k, v = (torch.randn(1, 210, 2, 8) for _ in range(3))
    DistributedAttention_VSA(2, 8)(q, k, v, grid_size=(5, 6, 7), sparsity=0.0)
    assert selection_report()["vsa"] == "torch"


def test_switching_between_the_dense_route_and_the_kernels_compiles_two_graphs():
    """The choice bookkeeping runs outside the graph: alternating sparsity 0 and 0.5 must not recompile (dynamo
    would guard on the report dict if it were written in traced code)."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    layer = DistributedAttention_VSA(2, 8)
    compiled = torch.compile(layer, fullgraph=True, backend=counting_backend)
    q, k, v, g = (torch.randn(1, 90, 2, 8) for _ in range(4))
    for sparsity in (0.0, 0.0, 0.5, 0.5, 0.0, 0.5, 0.0):
        out = compiled(q, k, v, gate_compress=g, grid_size=(3, 5, 6), sparsity=sparsity)[0]
        ref = layer(q, k, v, gate_compress=g, grid_size=(3, 5, 6), sparsity=sparsity)[0]
        assert (out - ref).abs().max() <= 1e-5
    assert len(graphs) == 2


def test_sparsity_zero_and_zero_gate_equals_dense():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 5 * 6 * 7, 4, 16) for _ in range(3))
    out, _ = DistributedAttention_VSA(4, 16)(
        q, k, v, gate_compress=torch.zeros_like(q), grid_size=(5, 6, 7), sparsity=0.0
    )
    assert (out - LocalAttention(4, 16)(q, k, v)).abs().max() <= 1e-5


def test_tiling_layout_and_roundtrip():
    layout = tile_layout((5, 6, 7), "cpu")
    assert layout.tiles == (2, 2, 2) and layout.num_blocks == 8
    assert int(layout.block_sizes.sum()) == 210 and layout.block_sizes.tolist()[0] == 64
    assert layout.block_sizes.tolist()[-1] == 1 * 2 * 3  # clipped corner tile
    x = torch.randn(2, 210, 3, 4)
    tiled = tile(x, layout)
    assert tiled.shape == (2, 3, 512, 4)
    pad = torch.ones(512, dtype=torch.bool)
    pad[layout.slot_index] = False
    assert tiled[:, :, pad].abs().max() == 0  # pad slots exactly zero
    assert torch.equal(untile(tiled, layout), x)


def test_topk_formula_matches_fastvideo():
    assert topk_for_sparsity(0.95, 1440) == 73  # 1 - 0.95 = 0.050000000000000044
    assert topk_for_sparsity(0.0, 624) == 624
    assert topk_for_sparsity(0.9, 624) == 63
    assert topk_for_sparsity(0.8, 624) == 125
    assert topk_for_sparsity(0.999, 10) == 1


GRID = (3, 5, 6)  # 90 tokens: uneven over 4 ranks, partial tiles


def _vsa_inputs():
    torch.manual_seed(3)
    s = GRID[0] * GRID[1] * GRID[2]
    tensors = [torch.randn(2, s, 4, 8) for _ in range(4)]
    text = [torch.randn(2, 3, 4, 8) for _ in range(3)]
    mask = torch.tensor([[True, True, False], [True, True, True]])
    weight = torch.randn(2, s, 4, 8)
    return tensors, text, mask, weight


def _vsa_body(rank, world, with_text, sparsity=0.5):
    group = get_sequence_parallel_groups().sp_group
    tensors, text, mask, weight = _vsa_inputs()
    leaves = [t.clone().requires_grad_() for t in tensors]
    text_leaves = [t.clone().requires_grad_() for t in text]
    shards = [shard_sequence(t, group)[0] for t in leaves]
    s = tensors[0].shape[1]
    rep_args = text_leaves if with_text else [None, None, None]
    out, rep = DistributedAttention_VSA(4, 8)(
        *shards[:3], *rep_args, shards[3], original_seq_len=s, grid_size=GRID, sparsity=sparsity,
        replicated_mask=mask if with_text else None,
    )
    full = gather_sequence(out, group, 1, s)
    loss = (full * weight).sum() + (rep.square().sum() if rep is not None else 0)
    loss.backward()
    text_grads = [t.grad for t in text_leaves] if with_text else []
    if group is not None:
        for g in text_grads:
            dist.all_reduce(g, op=dist.ReduceOp.AVG, group=group)
    return full.detach(), None if rep is None else rep.detach(), [t.grad for t in leaves] + text_grads


@pytest.mark.parametrize("with_text", [False, True])
@pytest.mark.parametrize("sparsity", [0.5, 0.0])  # 0.0: every block, the dense route
def test_vsa_sequence_parallel_equals_single_process(with_text, sparsity):
    ref_out, ref_rep, ref_grads = _vsa_body(0, 1, with_text, sparsity)
    for world in (2, 4):
        for out, rep, grads in run_distributed(world, _vsa_body, with_text, sparsity):
            assert (out - ref_out).abs().max() <= 1e-5
            if with_text:
                assert (rep - ref_rep).abs().max() <= 1e-5
            for g, rg in zip(grads, ref_grads, strict=True):
                assert (g - rg).abs().max() <= 1e-5
