"""Wan under sequence parallelism on real gloo groups: P = 1, 2, 4 equal the stock single-process model.

One spawn per world size computes everything for that size (spawning dominates the runtime); each test asserts
one part of it. Tiny Wan models from diffusers' test config with 4 heads, fp32, uneven token counts.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from distributed_utils import run_distributed

from diffusers_dist_attn.distributed import get_sequence_parallel_groups
from diffusers_dist_attn.models import DenseThenSparse, load_gate_compress, parallelize
from diffusers_dist_attn.pipelines.wan import tiny_transformer_config

TOL = 1e-5
COMPILE_BACKEND = "inductor"

# name -> (config overrides, latent (F, H, W), fuse projections, per-token timestep, image tokens)
CASES = {
    "t2v": (dict(in_channels=4, out_channels=4, text_dim=16), (3, 10, 14), False, False, 0),  # 105 tokens
    "t2v_fused": (dict(in_channels=4, out_channels=4, text_dim=16), (3, 10, 14), True, False, 0),
    "i2v": (dict(in_channels=4, out_channels=4, text_dim=16, image_dim=20, added_kv_proj_dim=48), (2, 6, 10), False,
            False, 7),  # 30 tokens, 7 image + 512 text context tokens
    "i2v_fused": (dict(in_channels=4, out_channels=4, text_dim=16, image_dim=20, added_kv_proj_dim=48), (2, 6, 10),
                  True, False, 7),
    "ti2v": (dict(in_channels=48, out_channels=48, text_dim=16), (3, 6, 10), False, True, 0),  # Wan 2.2 TI2V, 45
}
VSA_LATENT = (5, 18, 18)  # grid 5 x 9 x 9 = 405 tokens, 2 x 3 x 3 = 18 VSA tiles (partial tiles on every axis)


def build_case(name: str, seed: int = 0) -> tuple[WanTransformer3DModel, dict[str, torch.Tensor]]:
    """A tiny Wan transformer and its inputs, identical on every rank for a seed."""
    overrides, (frames, height, width), fuse, per_token, image_tokens = CASES[name]
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**tiny_transformer_config(**overrides)).eval()
    if fuse:
        model.fuse_qkv_projections()
    channels = overrides["in_channels"]
    inputs = {"hidden_states": torch.randn(1, channels, frames, height, width)}
    text_len = 512 if image_tokens else 12
    inputs["encoder_hidden_states"] = torch.randn(1, text_len, overrides["text_dim"])
    if image_tokens:
        inputs["encoder_hidden_states_image"] = torch.randn(1, image_tokens, overrides["image_dim"])
    if per_token:  # first latent frame is the conditioning image (timestep 0), the rest at t
        tokens = frames * (height // 2) * (width // 2)
        timestep = torch.full((1, tokens), 700.0)
        timestep[:, : (height // 2) * (width // 2)] = 0.0
        inputs["timestep"] = timestep
    else:
        inputs["timestep"] = torch.tensor([700])
    return model, inputs


def handle_tokens(inputs) -> int:
    frames, height, width = inputs["hidden_states"].shape[2:]
    return frames * (height // 2) * (width // 2)


def _forward(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def _grads(model, inputs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _forward(model, inputs).square().mean().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _vsa_model(seed: int = 1) -> tuple[WanTransformer3DModel, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A tiny T2V model, inputs on the VSA grid, and random FastVideo-format gates."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**tiny_transformer_config(in_channels=4, out_channels=4, text_dim=16)).eval()
    inputs = {"hidden_states": torch.randn(1, 4, *VSA_LATENT), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 12, 16)}
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    gates = {}
    for i in range(model.config.num_layers):
        gates[f"blocks.{i}.to_gate_compress.weight"] = torch.randn(dim, dim) * 0.2
        gates[f"blocks.{i}.to_gate_compress.bias"] = torch.randn(dim) * 0.2
    return model, inputs, gates


def _compile_block(rank: int, world: int) -> dict[str, float]:
    """One Wan block with our distributed processor under torch.compile(fullgraph=True) vs eager, on shards."""
    from diffusers_dist_attn.models.sharding import ShardingState
    from diffusers_dist_attn.models.wan import set_wan_attn_processors

    model, inputs = build_case("t2v")
    groups = get_sequence_parallel_groups()
    state = ShardingState(groups=groups)
    set_wan_attn_processors(model, "dense", state)
    with torch.no_grad():  # the block inputs exactly as the model builds them
        rotary = model.rope(inputs["hidden_states"])
        hidden = model.patch_embedding(inputs["hidden_states"]).flatten(2).transpose(1, 2).contiguous()
        _, temb, context, _ = model.condition_embedder(inputs["timestep"], inputs["encoder_hidden_states"])
        temb = temb.unflatten(1, (6, -1))
    state.original_seq_len = hidden.shape[1]
    s_loc = -(-hidden.shape[1] // world)
    local = torch.nn.functional.pad(hidden, (0, 0, 0, s_loc * world - hidden.shape[1]))[:, rank * s_loc:(rank + 1) * s_loc]
    block = model.blocks[0]
    with torch.no_grad():
        eager = block(local, context, temb, rotary)
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend=COMPILE_BACKEND)(local, context, temb, rotary)
    result = {"max_err": float((compiled - eager).abs().max())}

    # The whole parallelized model with compiled blocks: the sharding hook on blocks.0 runs inside the graph.
    model, inputs = build_case("ti2v")
    with torch.no_grad():
        reference = _forward(model, inputs)
        handle = parallelize(model, attention="dense")
        torch._dynamo.reset()
        model.compile_repeated_blocks(fullgraph=True, backend=COMPILE_BACKEND)
        result["model_err"] = float((_forward(model, inputs) - reference).abs().max())
        handle.remove()
    return result


def _worker(rank: int, world: int, with_extras: bool) -> dict:
    torch.use_deterministic_algorithms(True)
    group = get_sequence_parallel_groups().sp_group
    out: dict = {"forward": {}, "grads": {}, "vsa": {}}
    with torch.no_grad():
        for name in CASES:
            model, inputs = build_case(name)
            reference = _forward(model, inputs)
            handle = parallelize(model, attention="dense")
            seen = []  # tokens per rank inside the blocks: proves the sequence is sharded
            hook = model.blocks[-1].register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].shape[1]))
            result = _forward(model, inputs)
            hook.remove()
            handle.remove()
            restored = _forward(model, inputs)
            out["forward"][name] = {"max_err": float((result - reference).abs().max()),
                                    "restored_err": float((restored - reference).abs().max()),
                                    "shape_ok": result.shape == reference.shape,
                                    "block_tokens": seen[0], "tokens": handle_tokens(inputs)}

        # VSA: sparsity 0 with zero gates == dense; sparse with random gates (kept for the P-comparison)
        model, inputs, gates = _vsa_model()
        reference = _forward(model, inputs)
        handle = parallelize(model, attention="vsa", sparsity=0.0)
        out["vsa"]["zero_gate_s0_vs_dense"] = float((_forward(model, inputs) - reference).abs().max())
        report = load_gate_compress(model, gates)
        out["vsa"]["gates_used"] = len(report.used)
        handle.remove()
        handle = parallelize(model, attention="vsa", sparsity=0.5)
        load_gate_compress(model, gates)
        out["vsa"]["sparse_out"] = _forward(model, inputs)
        handle.remove()
        handle = parallelize(model, attention="vsa", sparsity=DenseThenSparse(0.5, dense_steps=1))
        out["vsa"]["dense_step_vs_dense"] = float((_forward(model, inputs) - reference).abs().max())
        handle.remove()

    if with_extras:
        for name in ("t2v", "i2v_fused", "ti2v", "t2v_checkpointing"):
            model, inputs = build_case(name.removesuffix("_checkpointing"))
            model.train()
            if name.endswith("_checkpointing"):
                model.enable_gradient_checkpointing()
            reference = _grads(model, inputs)
            handle = parallelize(model, attention="dense")
            grads = _grads(model, inputs)
            handle.remove()
            worst, scale = 0.0, 0.0
            for n, g in grads.items():
                if group is not None:
                    dist.all_reduce(g, op=dist.ReduceOp.AVG, group=group)  # the SP gradient convention
                worst = max(worst, float((g - reference[n]).abs().max()))
                scale = max(scale, float(reference[n].abs().max()))
            out["grads"][name] = {"max_err": worst, "max_grad": scale, "count": len(grads),
                                  "same_keys": set(grads) == set(reference)}
        out["compile"] = _compile_block(rank, world)
        out["a14b"] = _a14b_pipeline()
    return out


def _a14b_pipeline() -> dict:
    """Wan 2.2 A14B-style pipeline (two transformers): parallelize, then CPU offload (the documented order)."""
    from diffusers_dist_attn.pipelines.wan import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=3, two_transformers=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red car", negative_prompt="blurry", height=32, width=48, num_frames=5,
                  num_inference_steps=4, guidance_scale=5.0, output_type="np")
    reference = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    handle = parallelize(pipe, attention="dense")
    pipe.enable_model_cpu_offload(device="cpu")
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(pipe, name).register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1))
    frames = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    return {"max_err": float(abs(frames - reference).max()), "calls": calls,
            "parallelized": sorted(handle.transformers)}


@functools.cache
def results(world: int) -> list[dict]:
    return run_distributed(world, _worker, world == 2, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])  # 3: 4 heads split unevenly (2, 1, 1)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_stock(world, case):
    for rank, res in enumerate(results(world)):
        r = res["forward"][case]
        assert r["shape_ok"]
        assert r["block_tokens"] == -(-r["tokens"] // world), "blocks must see ceil(S / P) tokens"
        assert r["max_err"] <= TOL, f"P={world} rank {rank} {case}: {r['max_err']:.3e}"
        assert r["restored_err"] == 0.0, "handle.remove() must restore the stock model exactly"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["t2v", "i2v_fused", "ti2v", "t2v_checkpointing"])
def test_gradients_match_single_process(case):
    for res in results(2):
        r = res["grads"][case]
        assert r["same_keys"] and r["count"] > 30
        assert r["max_err"] <= TOL * max(1.0, r["max_grad"]), r


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_vsa_zero_gate_sparsity0_equals_dense(world):
    for res in results(world):
        assert res["vsa"]["zero_gate_s0_vs_dense"] <= TOL
        assert res["vsa"]["dense_step_vs_dense"] <= TOL  # DenseThenSparse: step 0 runs dense attention
        assert res["vsa"]["gates_used"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_vsa_output_independent_of_sp_degree(world):
    single = results(1)[0]["vsa"]["sparse_out"]
    for res in results(world):
        assert float((res["vsa"]["sparse_out"] - single).abs().max()) <= TOL


@pytest.mark.slow
def test_vsa_sparse_differs_from_dense():
    """Guard against a VSA path that silently runs dense: sparsity 0.5 with real gates changes the output."""
    model, inputs, _ = _vsa_model()
    with torch.no_grad():
        dense = _forward(model, inputs)
    assert float((results(1)[0]["vsa"]["sparse_out"] - dense).abs().max()) > 1e-3


@pytest.mark.slow
def test_compile_fullgraph_block_matches_eager():
    for res in results(2):
        assert res["compile"]["max_err"] <= TOL
        assert res["compile"]["model_err"] <= TOL  # compile_repeated_blocks(fullgraph=True) with sharding hooks


@pytest.mark.slow
def test_a14b_pipeline_both_transformers_with_cpu_offload():
    for res in results(2):
        r = res["a14b"]
        assert r["parallelized"] == ["transformer", "transformer_2"]
        assert r["calls"]["transformer"] > 0 and r["calls"]["transformer_2"] > 0, r["calls"]
        assert r["max_err"] <= TOL, r


def _single_process_groups_inside_a_job(rank: int, world: int) -> float:
    """`parallelize(..., groups=SequenceParallelGroups())` runs without communication even while the current
    groups span the whole job (e.g. a per-rank reference run inside a launched job)."""
    from diffusers_dist_attn.distributed import SequenceParallelGroups

    model, inputs = build_case("t2v")
    with torch.no_grad():
        reference = _forward(model, inputs)
        with parallelize(model, attention="dense", groups=SequenceParallelGroups()):
            result = _forward(model, inputs)
    return float((result - reference).abs().max())


def test_single_process_groups_inside_a_launched_job():
    for err in run_distributed(2, _single_process_groups_inside_a_job):
        assert err <= 1e-5


def test_sparsity_schedule_follows_a_scheduler_replaced_after_parallelize():
    """`pipe.scheduler = ...` after `parallelize` (as diffusers' Wan examples do): the schedule still advances."""
    from diffusers import UniPCMultistepScheduler

    from diffusers_dist_attn.pipelines.wan import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    handle = parallelize(pipe, attention="vsa", sparsity=DenseThenSparse(0.5, dense_steps=2))
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda *_: seen.append(handle.state.sparsity))
    pipe(prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=1.0,
         output_type="latent")
    hook.remove()
    handle.remove()
    assert seen == [None, None, 0.5, 0.5]  # dense for the first two steps, then VSA


def _first_block_cache_under_sp(rank: int, world: int) -> str | None:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    model, inputs = build_case("t2v")
    handle = parallelize(model, attention="dense")
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.05))
    try:
        with torch.no_grad():
            _forward(model, inputs)
    except ValueError as exc:
        return str(exc)
    finally:
        handle.remove()
    return None


def test_value_dependent_cache_is_refused_under_sequence_parallelism():
    for message in run_distributed(2, _first_block_cache_under_sp):
        assert message is not None and "fbc_leader_block_hook" in message and "deadlock" in message
