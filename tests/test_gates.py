"""VSA gates, one implementation for every model (`models/gates.py`): add / remove, and loading all or nothing.

Real tiny diffusers models (Wan, HunyuanVideo); a failed load must leave every parameter bit-identical and no gate
added, whether the bad tensor is the last one checked or one half-way.
"""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel
from safetensors.torch import save_file

from diffusers_dist_attn.models import GATE_NAME, GateLayout, load_gates, wan
from diffusers_dist_attn.models import hunyuan_video as hv
from diffusers_dist_attn.pipelines.wan import tiny_transformer_config

HV_CONFIG = dict(
    in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=10, num_layers=1, num_single_layers=1,
    num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
    pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
)


def _wan(dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny_transformer_config(in_channels=4, out_channels=4, text_dim=16)).to(dtype)


def _hunyuan() -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(**HV_CONFIG)


def _with_random_gates(model: torch.nn.Module, layout: GateLayout) -> torch.nn.Module:
    layout.add(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if GATE_NAME in name:
                param.copy_(torch.randn(param.shape, generator=g).to(param.dtype))
    return model


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "modules added or removed"
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), f"{key} changed"


def _checkpoint(model: torch.nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    """Valid gates for every gated module of `model`, in this package's key naming (sorted = checking order)."""
    g = torch.Generator().manual_seed(seed)
    probe = _snapshot(model)
    return dict(sorted((k, torch.randn(v.shape, generator=g)) for k, v in probe.items() if GATE_NAME in k))


def _bad(kind: str, shape: tuple[int, ...]) -> object:
    """A tensor of `shape` (or an object) that must be refused."""
    n = int(torch.tensor(shape).prod())
    if kind == "nan":
        t = torch.zeros(shape)
        t.view(-1)[n // 2] = float("nan")
        return t
    if kind == "inf":
        return torch.full(shape, float("-inf"))
    if kind == "int":
        return torch.ones(shape, dtype=torch.int64)
    if kind == "bool":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "complex":
        return torch.ones(shape, dtype=torch.complex64)
    if kind == "overflow":  # finite in fp64, inf in fp32 / bf16
        return torch.full(shape, 1e300, dtype=torch.float64)
    if kind == "sparse":
        return torch.zeros(shape).to_sparse()
    if kind == "meta":
        return torch.empty(shape, device="meta")
    if kind == "shape":
        return torch.zeros(*shape, 2)
    if kind == "list":
        return [0.0] * n
    raise AssertionError(kind)


BAD = {
    "nan": "non-finite", "inf": "non-finite", "int": "dtype torch.int64", "bool": "dtype torch.bool",
    "complex": "dtype torch.complex64", "overflow": "overflows the model's torch.float32", "sparse": "sparse_coo",
    "meta": "meta tensor", "shape": "has shape", "list": "holds a list",
}
LAYOUTS = {"wan": (_wan, wan.WAN_GATES), "hunyuan": (_hunyuan, hv.HUNYUAN_VIDEO_GATES)}


# ---------------------------------------------------------------------------------------------------------------
# One implementation
# ---------------------------------------------------------------------------------------------------------------
def test_gate_handling_is_written_once():
    """Both adapters' add / remove / load are the shared `GateLayout` methods; `GATE_NAME` lives in gates.py."""
    for module, layout in ((wan, wan.WAN_GATES), (hv, hv.HUNYUAN_VIDEO_GATES)):
        assert isinstance(layout, GateLayout)
        for name, method in (("add_gate_compress", GateLayout.add), ("remove_gate_compress", GateLayout.remove),
                             ("load_gate_compress", GateLayout.load)):
            function = getattr(module, name)
            assert function.__func__ is method and function.__self__ is layout, (module.__name__, name)
        assert "GATE_NAME" not in vars(module), module.__name__


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_add_and_remove_round_trip(family):
    build, layout = LAYOUTS[family]
    model = build()
    keys = set(model.state_dict())
    added = layout.add(model)
    assert added == list(layout.attentions(model)) and len(added) == 2
    gates = {k: v for k, v in model.state_dict().items() if GATE_NAME in k}
    assert len(gates) == 4 and all(torch.count_nonzero(v) == 0 for v in gates.values())
    assert layout.add(model) == []  # idempotent
    layout.remove(model, added[:1])
    assert len([k for k in model.state_dict() if GATE_NAME in k]) == 2
    layout.remove(model)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_load_gates_dispatches_and_reports(family):
    build, layout = LAYOUTS[family]
    model = build()
    gates = _checkpoint(_with_random_gates(build(), layout))
    report = load_gates(model, {**gates, "proj_out.bias": torch.zeros(4)})
    assert report.used == sorted(gates) and report.unused == ["proj_out.bias"] and report.missing_blocks == []
    for key, value in gates.items():
        assert torch.equal(model.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------------------------
# All or nothing
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["last", "half-way"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_tensor_leaves_the_model_bit_identical(kind, where):
    """Existing (random) gates: a bad tensor last or half-way in checking order raises naming the key, and no
    parameter changes (today's loader copied every tensor checked before a bad one)."""
    model = _with_random_gates(_wan(), wan.WAN_GATES)
    before = _snapshot(model)
    gates = _checkpoint(model)
    keys = list(gates)
    bad_key = keys[-1] if where == "last" else keys[len(keys) // 2]
    gates[bad_key] = _bad(kind, tuple(before[bad_key].shape))
    with pytest.raises(ValueError, match=BAD[kind]) as info:
        wan.load_gate_compress(model, gates)
    assert repr(bad_key) in str(info.value)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_failed_load_removes_the_gates_it_added(family):
    build, layout = LAYOUTS[family]
    model = build()
    before = _snapshot(model)
    gates = _checkpoint(_with_random_gates(build(), layout))
    gates[list(gates)[-1]] = _bad("nan", tuple(gates[list(gates)[-1]].shape))
    with pytest.raises(ValueError, match="non-finite"):
        layout.load(model, gates)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_values_that_overflow_the_parameter_dtype_are_refused(dtype, tmp_path):
    model = _with_random_gates(_wan(dtype), wan.WAN_GATES)
    before = _snapshot(model)
    gates = {k: v.double() for k, v in _checkpoint(model).items()}
    last = list(gates)[-1]
    gates[last] = gates[last].clone()
    gates[last][0] = 1e300
    save_file(gates, tmp_path / "gates.safetensors")
    with pytest.raises(ValueError, match=rf"{last!r} overflows the model's {dtype}"):
        wan.load_gate_compress(model, tmp_path / "gates.safetensors")
    _assert_unchanged(model, before)
    gates[last][0] = 1.0  # in range: loads, converted to the model's dtype
    report = wan.load_gate_compress(model, gates)
    assert len(report.used) == 4 and model.blocks[1].attn1.to_gate_compress.weight.dtype == dtype


def test_bad_tensor_in_a_safetensors_folder_half_way(tmp_path):
    model = _with_random_gates(_wan(), wan.WAN_GATES)
    before = _snapshot(model)
    gates = _checkpoint(model)
    keys = list(gates)
    save_file({k: gates[k] for k in keys[:2]}, tmp_path / "part-1.safetensors")
    save_file({keys[2]: gates[keys[2]].to(torch.int32), keys[3]: gates[keys[3]]}, tmp_path / "part-2.safetensors")
    with pytest.raises(ValueError, match=rf"{keys[2]!r} has dtype torch.int32"):
        wan.load_gate_compress(model, tmp_path)
    _assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------------------------
def test_links_leaving_the_checkpoint_folder_are_not_followed(tmp_path):
    model = _with_random_gates(_wan(), wan.WAN_GATES)
    before = _snapshot(model)
    gates = _checkpoint(model)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file(gates, outside / "secret.safetensors")
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    os.symlink(outside / "secret.safetensors", folder / "gates.safetensors")
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        wan.load_gate_compress(model, folder)
    _assert_unchanged(model, before)

    inside = tmp_path / "inside"  # a link within the folder is fine
    inside.mkdir()
    save_file(gates, inside / "real.data")
    os.symlink("real.data", inside / "gates.safetensors")
    assert len(wan.load_gate_compress(model, inside).used) == 4


def test_hugging_face_cache_snapshot_links_into_blobs(tmp_path):
    """The hub cache stores snapshot files as links into the repo's `blobs/`: those are followed."""
    gates = _checkpoint(_with_random_gates(_wan(), wan.WAN_GATES))
    repo = tmp_path / "hub" / "models--org--wan-vsa"
    (repo / "blobs").mkdir(parents=True)
    save_file(gates, repo / "blobs" / "0123abcd")
    snapshot = repo / "snapshots" / "f00d" / "transformer"
    snapshot.mkdir(parents=True)
    os.symlink("../../../blobs/0123abcd", snapshot / "diffusion_pytorch_model.safetensors")
    model = _wan()
    report = wan.load_gate_compress(model, snapshot)
    assert report.used == sorted(gates) and report.missing_blocks == []
