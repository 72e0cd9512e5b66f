"""Wan processors, the sharding mechanism's single-process behaviour, VSA gates and their loader (no spawning)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from safetensors.torch import save_file
from test_wan_parallel import CASES, build_case

from diffusers_dist_attn.distributed import SequenceParallelGroups
from diffusers_dist_attn.models import (
    DenseThenSparse,
    WanDistributedAttnProcessor,
    add_gate_compress,
    load_gate_compress,
    parallelize,
    set_wan_attn_processors,
)
from diffusers_dist_attn.models.sharding import StepCounter, get_plan
from diffusers_dist_attn.pipelines import get_pipeline_module
from diffusers_dist_attn.pipelines.wan import build_tiny_pipeline, load_pipeline, tiny_transformer_config

TOL = 1e-5


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _tiny(seed=0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**tiny_transformer_config(in_channels=4, out_channels=4, text_dim=16,
                                                           **overrides)).eval()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["local", "dense"])
def test_processors_match_stock(case, kind):
    """`local` (LocalAttention) and `dense` (DistributedAttention, world 1) processors equal WanAttnProcessor."""
    model, inputs = build_case(case)
    reference = _forward(model, inputs)
    set_wan_attn_processors(model, kind)
    err = float((_forward(model, inputs) - reference).abs().max())
    assert err <= TOL, f"{case} {kind}: {err:.3e}"


def test_set_processors_installs_one_per_module():
    model = _tiny()
    set_wan_attn_processors(model, "dense")
    procs = model.attn_processors
    assert len(procs) == 2 * model.config.num_layers
    for key, proc in procs.items():
        assert type(proc) is WanDistributedAttnProcessor, key
        assert proc.attention == ("local" if ".attn2." in key else "dense"), key
        assert (proc.dense is None) == (".attn2." in key) and proc.sparse is None, key
    assert len({id(p) for p in procs.values()}) == len(procs)
    set_wan_attn_processors(model, "local")
    assert all(type(p) is WanDistributedAttnProcessor and p.attention == "local" and p.dense is None
               for p in model.attn_processors.values())
    with pytest.raises(ValueError, match="unknown Wan attention 'flash'"):
        set_wan_attn_processors(model, "flash")


def test_remove_restores_stock_model():
    model = _tiny()
    keys = set(model.state_dict())
    handle = parallelize(model, attention="vsa", sparsity=0.5)
    assert {k for k in model.state_dict() if "gate" in k} == {
        f"blocks.{i}.attn1.to_gate_compress.{p}" for i in range(2) for p in ("weight", "bias")}
    assert all(isinstance(p, WanDistributedAttnProcessor) and p.attention == ("local" if ".attn2." in k else "vsa")
               for k, p in model.attn_processors.items())
    handle.remove()
    assert set(model.state_dict()) == keys
    assert all(type(p) is WanAttnProcessor for p in model.attn_processors.values())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model.blocks[0]._forward_pre_hooks and not model.proj_out._forward_hooks


def test_parallelize_rejects_bad_input_before_changing_anything():
    model = _tiny()
    with pytest.raises(ValueError, match=r"unknown attention 'sparse' for Wan; choose one of \['dense', 'vsa', 'local'\]"):
        parallelize(model, attention="sparse")
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            parallelize(model, attention="vsa", sparsity=bad)
    with pytest.raises(ValueError, match=r"Wan transformer: 4 attention heads cannot be split over a sequence-parallel "
                                         r"degree of 8 .*u in \[1, 2, 4\]"):
        parallelize(model, groups=SequenceParallelGroups(world_size=8, sp_size=8))
    with pytest.raises(ValueError, match=r"4 attention heads cannot be split over .* 8 .*degree <= 4"):
        parallelize(model, attention="vsa", groups=SequenceParallelGroups(world_size=8, sp_size=8))
    with pytest.raises(ValueError, match="no sharding plan is registered for Linear"):
        parallelize(torch.nn.Linear(2, 2))
    assert all(type(p) is WanAttnProcessor for p in model.attn_processors.values())
    with pytest.raises(ValueError, match="attention='local' runs without sequence parallelism"):
        parallelize(model, attention="local", groups=SequenceParallelGroups(world_size=2, sp_size=2))
    handle = parallelize(model)
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize(model)
    handle.remove()
    parallelize(model).remove()  # parallelizable again after remove


def test_sparsity_schedule_is_validated_per_step():
    model, inputs = build_case("t2v")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        parallelize(model, attention="vsa", sparsity=lambda step: 1.2)  # step 0 is checked up front
    with parallelize(model, attention="vsa", sparsity=lambda step: 0.5 if step == 0 else 1.2):
        _forward(model, inputs)  # step 0 (timestep 700)
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\).*got 1.2"):
            _forward(model, {**inputs, "timestep": torch.tensor([600])})  # a new timestep: step 1


def test_state_carries_grid_step_and_sparsity():
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    with parallelize(pipe, attention="vsa", sparsity=DenseThenSparse(0.5, dense_steps=2)) as handle:
        state = handle.state
        pipe(prompt="a cat", negative_prompt="", height=32, width=64, num_frames=5, num_inference_steps=4,
             guidance_scale=5.0, output_type="latent",
             callback_on_step_end=lambda p, i, t, kw: (seen.append((i, state.step, state.sparsity, state.grid)), kw)[1])
    assert seen == [(i, i, None if i < 2 else 0.5, (2, 2, 4)) for i in range(4)]
    assert state.original_seq_len == 16 and state.local_seq_len == 16


def test_step_counter_without_scheduler():
    counter = StepCounter()
    steps = [counter(torch.tensor([t])) for t in (1000, 1000, 900, 900, 800, 1000, 950)]
    assert steps == [0, 0, 1, 1, 2, 0, 1]


def test_plan_registry():
    plan = get_plan(_tiny())
    assert plan.name == "Wan" and plan.gather_output == "proj_out"
    assert get_plan(torch.nn.Linear(2, 2)) is None


def test_vsa_processor_needs_a_gate():
    model, inputs = build_case("t2v")
    with parallelize(model, attention="vsa", sparsity=0.5):
        for block in model.blocks:
            del block.attn1.to_gate_compress
        with pytest.raises(ValueError, match="to_gate_compress; call add_gate_compress"):
            _forward(model, inputs)


# ---------------------------------------------------------------------------------------------------------------
# Gate loading
# ---------------------------------------------------------------------------------------------------------------
def _fastvideo_gates(layers=2, dim=48, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gates = {}
    for i in range(layers):
        gates[f"blocks.{i}.to_gate_compress.weight"] = torch.randn(dim, dim, generator=g)
        gates[f"blocks.{i}.to_gate_compress.bias"] = torch.randn(dim, generator=g)
    return gates


def _assert_gates_equal(model, gates):
    for key, value in gates.items():
        i, kind = key.split(".")[1], key.rsplit(".", 1)[1]
        assert torch.equal(getattr(model.blocks[int(i)].attn1.to_gate_compress, kind).detach(), value), key


def test_gate_loading_from_safetensors_file_folder_and_torch_file(tmp_path):
    gates = _fastvideo_gates()
    other = {"blocks.0.attn1.to_q.weight": torch.zeros(48, 48), "patch_embedding.bias": torch.zeros(48)}
    save_file({**gates, **other}, tmp_path / "model.safetensors")
    model = _tiny()
    report = load_gate_compress(model, tmp_path / "model.safetensors")
    assert report.used == sorted(gates) and report.unused == sorted(other) and report.missing_blocks == []
    _assert_gates_equal(model, gates)

    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({k: v for k, v in gates.items() if k.startswith("blocks.0")}, folder / "part-1.safetensors")
    save_file({**{k: v for k, v in gates.items() if k.startswith("blocks.1")}, **other}, folder / "part-2.safetensors")
    model = _tiny()
    report = load_gate_compress(model, folder)
    assert len(report.used) == 4 and len(report.unused) == 2
    _assert_gates_equal(model, gates)

    torch.save({"model." + k: v for k, v in gates.items()}, tmp_path / "gates.pt")
    model = _tiny()
    report = load_gate_compress(model, tmp_path / "gates.pt")
    assert len(report.used) == 4
    _assert_gates_equal(model, gates)


def test_gate_round_trip_through_state_dict():
    """Our own naming (`blocks.N.attn1.to_gate_compress.*`) round-trips through `state_dict`."""
    source = _tiny()
    load_gate_compress(source, _fastvideo_gates(seed=3))
    state = {k: v for k, v in source.state_dict().items()}
    target = _tiny(seed=1)
    report = load_gate_compress(target, state)
    assert len(report.used) == 4 and len(report.unused) == len(state) - 4
    for key in report.used:
        assert torch.equal(target.state_dict()[key], state[key])


def test_gate_loading_reports_missing_blocks_and_keeps_zero_gates():
    model = _tiny()
    report = load_gate_compress(model, {k: v for k, v in _fastvideo_gates().items() if k.startswith("blocks.1.")})
    assert report.missing_blocks == [0]
    assert torch.count_nonzero(model.blocks[0].attn1.to_gate_compress.weight) == 0
    assert "2 keys used, 0 unused, 1 blocks without" in report.summary()


def test_gate_loading_errors_name_key_and_shapes(tmp_path):
    model = _tiny()
    add_gate_compress(model)
    bad = {k: v for k, v in _fastvideo_gates(dim=40).items() if k.endswith("weight")}
    with pytest.raises(ValueError, match=r"'blocks\.0\.to_gate_compress\.weight' has shape \(40, 40\) but the "
                                         r"model's blocks\.0\.attn1\.to_gate_compress\.weight has shape \(48, 48\)"):
        load_gate_compress(model, bad)
    assert torch.count_nonzero(model.blocks[1].attn1.to_gate_compress.bias) == 0, "nothing copied on error"
    with pytest.raises(ValueError, match=r"refers to block 7, but the model has 2 blocks"):
        load_gate_compress(model, {"blocks.7.to_gate_compress.bias": torch.zeros(48)})
    with pytest.raises(FileNotFoundError):
        load_gate_compress(model, tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Pipeline adapter
# ---------------------------------------------------------------------------------------------------------------
def test_pipeline_registry_and_interface():
    module = get_pipeline_module("wan")
    assert module.NAME == "wan"
    with pytest.raises(ValueError, match=r"unknown pipeline 'sdxl'; known: \['hunyuan-video', 'wan'\]"):
        get_pipeline_module("sdxl")


def test_tiny_tokenizer_is_not_all_unk():
    pipe = build_tiny_pipeline()
    ids = pipe.tokenizer("a red car drives in the park")["input_ids"]
    assert pipe.tokenizer.unk_token_id not in ids and len(ids) == 8


def test_load_pipeline_rejects_non_wan_folders(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(ValueError, match="no readable model_index.json"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="names 'StableDiffusionPipeline'; the wan pipeline needs"):
        load_pipeline(tmp_path)


def test_load_pipeline_round_trip(tmp_path):
    pipe = build_tiny_pipeline(seed=2)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path, torch.float32)
    for (name, a), b in zip(pipe.transformer.state_dict().items(), loaded.transformer.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_gate_loading_refuses_two_keys_for_one_gate_and_leaves_the_model_unchanged(tmp_path):
    gates = _fastvideo_gates()
    both = {**{"transformer." + k: v for k, v in gates.items()}, **{"transformer_2." + k: -v for k, v in gates.items()}}
    model = _tiny()
    with pytest.raises(ValueError, match="both map to blocks.0.attn1.to_gate_compress"):
        load_gate_compress(model, both)
    assert not any(hasattr(b.attn1, "to_gate_compress") for b in model.blocks)  # nothing half-loaded
    (tmp_path / "transformer").mkdir()
    save_file(gates, tmp_path / "transformer" / "gates.safetensors")
    with pytest.raises(FileNotFoundError, match=r"subfolders with checkpoints: \['transformer'\]"):
        load_gate_compress(model, tmp_path)  # a pipeline folder: name the transformer's subfolder
    assert load_gate_compress(model, tmp_path / "transformer").missing_blocks == []


# ---------------------------------------------------------------------------------------------------------------
# diffusers' private projection helpers, and their fallback
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["self", "cross", "cross_i2v"])
def test_projection_fallback_equals_diffusers(kind, fused):
    """`wan_qkv_projections` / `wan_added_kv_projections` (used when diffusers drops its private helpers) compute
    exactly what diffusers' `_get_qkv_projections` / `_get_added_kv_projections` compute, fused or not."""
    from diffusers.models.transformers import transformer_wan
    from diffusers.models.transformers.transformer_wan import WanAttention

    from diffusers_dist_attn.models.wan import wan_added_kv_projections, wan_qkv_projections

    torch.manual_seed(0)
    attn = WanAttention(dim=48, heads=4, dim_head=12, cross_attention_dim_head=12 if kind != "self" else None,
                        added_kv_proj_dim=20 if kind == "cross_i2v" else None).eval()
    if fused:
        attn.fuse_projections()
        assert attn.fused_projections and hasattr(attn, "to_kv" if kind != "self" else "to_qkv")
    hidden = torch.randn(2, 9, 48)
    context = None if kind == "self" else torch.randn(2, 7, 48)
    with torch.no_grad():
        ours = wan_qkv_projections(attn, hidden, context)
        theirs = transformer_wan._get_qkv_projections(attn, hidden, context)
        lengths = (9, 9, 9) if context is None else (9, 7, 7)  # q from the video, k and v from the context
        for a, b, length in zip(ours, theirs, lengths, strict=True):
            assert a.shape == (2, length, 48) and torch.equal(a, b)
        if kind == "cross_i2v":
            image = torch.randn(2, 5, 20)
            ours = wan_added_kv_projections(attn, image)
            theirs = transformer_wan._get_added_kv_projections(attn, image)
            for a, b in zip(ours, theirs, strict=True):
                assert a.shape == (2, 5, 48) and torch.equal(a, b)


def test_projection_helpers_fall_back_when_diffusers_lacks_them():
    import types

    from diffusers.models.transformers import transformer_wan

    from diffusers_dist_attn.models import wan

    assert wan.projection_helpers(types.ModuleType("transformer_wan_without_helpers")) == (
        wan.wan_qkv_projections, wan.wan_added_kv_projections)
    assert wan.projection_helpers() == (transformer_wan._get_qkv_projections,
                                        transformer_wan._get_added_kv_projections)


# ---------------------------------------------------------------------------------------------------------------
# One processor class, lazy adapters
# ---------------------------------------------------------------------------------------------------------------
def test_processor_attention_strategies():
    model = _tiny()
    attn = model.blocks[0].attn1
    with pytest.raises(ValueError, match=r"attention must be one of \['local', 'dense', 'vsa'\]; got 'flash'"):
        WanDistributedAttnProcessor(4, 12, attention="flash")
    with pytest.raises(ValueError, match="attention='vsa' needs a ShardingState"):
        WanDistributedAttnProcessor(4, 12, attention="vsa")
    local = WanDistributedAttnProcessor(attn.heads, attn.inner_dim // attn.heads, attention="local")
    assert local.dense is None and local.sparse is None and local.local is not None


def test_import_models_does_not_import_every_diffusers_model():
    """`import diffusers_dist_attn.models` loads no adapter (and so no diffusers model module); the adapters' names
    are still importable from the package."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import diffusers_dist_attn.models as m\n"
        "loaded = sorted(k for k in sys.modules if k.startswith('diffusers.models.transformers.') or "
        "k in ('diffusers_dist_attn.models.wan', 'diffusers_dist_attn.models.hunyuan_video'))\n"
        "assert not loaded, loaded\n"
        "from diffusers_dist_attn.models import parallelize, set_wan_attn_processors, load_gate_compress, "
        "WanDistributedAttnProcessor, HunyuanVideoDistributedAttnProcessor, GateLoadReport\n"
        "assert 'diffusers_dist_attn.models.wan' in sys.modules\n"
        "assert set_wan_attn_processors.__module__ == 'diffusers_dist_attn.models.wan'\n"
        "assert {'set_wan_attn_processors', 'load_gate_compress'} <= set(dir(m))\n"
        "try:\n"
        "    m.no_such_name\n"
        "except AttributeError as exc:\n"
        "    assert 'no_such_name' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
