"""`parallelize` guards on real gloo ranks: diffusers' own context parallelism is refused, and the attention
layers get the `SequenceParallelGroups` object (hybrid Ulysses x ring read from it, not looked up by id)."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from distributed_utils import run_distributed

from diffusers_dist_attn.distributed import SINGLE_PROCESS, SequenceParallelGroups, get_sequence_parallel_groups
from diffusers_dist_attn.models import parallelize
from diffusers_dist_attn.pipelines.wan import tiny_transformer_config

TOL = 1e-5


def _model(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**tiny_transformer_config(in_channels=4, out_channels=4, text_dim=16)).eval()


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 4, 3, 10, 14, generator=generator), "timestep": torch.tensor([700]),
            "encoder_hidden_states": torch.randn(1, 12, 16, generator=generator)}


def _diffusers_cp_worker(rank: int, world: int) -> dict:
    from diffusers import ContextParallelConfig

    # diffusers computes `rank % torch.accelerator.device_count()` in enable_parallelism, which divides by zero on
    # a CPU-only machine; one "accelerator" lets it build its gloo CPU mesh as it would on GPUs.
    torch.accelerator.device_count = lambda: 1
    model = _model()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    processors = {k: type(p) for k, p in model.attn_processors.items()}
    try:
        parallelize(model, attention="dense")
        message = None
    except ValueError as exc:
        message = str(exc)
    return {"message": message, "untouched": {k: type(p) for k, p in model.attn_processors.items()} == processors,
            "marked": "_dda_parallel" in model.__dict__}


def test_parallelize_refuses_diffusers_context_parallelism():
    for res in run_distributed(2, _diffusers_cp_worker, timeout=120):
        message = res["message"]
        assert message is not None, "parallelize must refuse a model with diffusers' context parallelism"
        assert "diffusers' own parallelism is enabled" in message and "context_parallel_config" in message, message
        assert "fresh transformer" in message and "remove_context_parallel" in message, message  # how to switch
        assert res["untouched"] and not res["marked"]  # refused before any change


def _hybrid_worker(rank: int, world: int) -> dict:
    groups = get_sequence_parallel_groups()
    model, inputs = _model(), _inputs()
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
        handle = parallelize(model, attention="dense")
        out = {"layer_group_is_groups": handle.state.layer_group is groups,
               "sp_group_is_group": handle.state.sp_group is groups.sp_group,
               "ring": groups.ring_size,
               "err": float((model(**inputs, return_dict=False)[0] - reference).abs().max())}
        handle.remove()
        with parallelize(model, attention="dense", groups=SequenceParallelGroups()) as single:
            out["single_is_sentinel"] = single.state.layer_group is SINGLE_PROCESS
    return out


def test_layers_get_the_groups_object_hybrid_ulysses_x_ring():
    # world 2 = ulysses 1 x ring 2: the layers can only run ring attention if they read it from the groups object
    for res in run_distributed(2, _hybrid_worker, ring=2, timeout=120):
        assert res["ring"] == 2
        assert res["layer_group_is_groups"] and res["sp_group_is_group"] and res["single_is_sentinel"]
        assert res["err"] <= TOL
