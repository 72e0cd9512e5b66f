"""diffusers' own attention controls on this package's processors: `set_attention_backend` / `reset_attention_backend`
(`processor._attention_backend`) and context parallelism (`processor._parallel_config`).

Real tiny diffusers models; which SDPA kernel ran is read from the torch profiler (CPU: the math backend runs
`aten::_scaled_dot_product_attention_math`, the automatic choice the fused `..._flash_attention_for_cpu`).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch.profiler import ProfilerActivity, profile

from diffusers_dist_attn.attention import AttentionBackendEnum
from diffusers_dist_attn.models import parallelize, set_wan_attn_processors
from diffusers_dist_attn.models import processors as controls
from diffusers_dist_attn.models.hunyuan_video import HunyuanVideoDistributedAttnProcessor
from diffusers_dist_attn.models.wan import WanDistributedAttnProcessor
from diffusers_dist_attn.pipelines.wan import tiny_transformer_config

TOL = 1e-5
MATH_OP = "aten::_scaled_dot_product_attention_math"
CPU_FUSED_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"
HV_CONFIG = dict(
    in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=10, num_layers=1, num_single_layers=1,
    num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
    pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
)


@pytest.fixture(autouse=True)
def _automatic_backend(monkeypatch):
    monkeypatch.delenv("DIFFUSERS_DIST_ATTN_BACKEND", raising=False)  # a process-wide preference would mask ours
    controls._warn_unmapped.cache_clear()
    yield
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)  # set_attention_backend is global too


def _wan():
    torch.manual_seed(0)
    model = WanTransformer3DModel(**tiny_transformer_config(in_channels=4, out_channels=4, text_dim=16)).eval()
    inputs = {"hidden_states": torch.randn(1, 4, 3, 6, 6), "timestep": torch.tensor([700]),
              "encoder_hidden_states": torch.randn(1, 12, 16)}
    return model, inputs


def _hunyuan():
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**HV_CONFIG).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 6, 5), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 12, 16), encoder_attention_mask=torch.ones(1, 12),
                  pooled_projections=torch.randn(1, 8), guidance=torch.tensor([3000.0]))
    return model, inputs


def _run(model, inputs) -> tuple[torch.Tensor, set[str]]:
    """Output and the SDPA ops that ran."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(**inputs, return_dict=False)[0]
    return out, {e.name for e in prof.events() if "scaled_dot_product" in e.name}


def _ours(model) -> list:
    return [p for p in model.attn_processors.values()
            if isinstance(p, WanDistributedAttnProcessor | HunyuanVideoDistributedAttnProcessor)]


def _layer_backends(model) -> set:
    return {getattr(p, name).backend for p in _ours(model) for name in ("local", "dense", "sparse")
            if getattr(p, name) is not None}


def test_processors_carry_diffusers_attributes():
    """Everything diffusers' own processors carry for its controls, ours carry too (None by default)."""
    for stock, ours in ((WanAttnProcessor, WanDistributedAttnProcessor(4, 12)),
                        (HunyuanVideoAttnProcessor2_0, HunyuanVideoDistributedAttnProcessor(4, 10))):
        names = [n for n in vars(stock) if n.startswith("_") and not n.startswith("__") and n != "_abc_impl"]
        assert {"_attention_backend", "_parallel_config"} <= set(names)
        for name in names:
            assert hasattr(ours, name) and getattr(ours, name) is None, (type(ours).__name__, name)


def test_backend_name_mapping():
    expected = {
        "native": "torch_sdpa", "_native_cudnn": "sdpa_cudnn", "_native_flash": "sdpa_flash",
        "_native_efficient": "sdpa_efficient", "_native_math": "sdpa_math", "flash": "flash_attn",
        "flash_hub": "flash_attn", "flash_varlen": "flash_attn", "_flash_3": "flash_attn_3",
        "_flash_3_hub": "flash_attn_3", "_flash_varlen_3": "flash_attn_3",
    }
    for name, ours in expected.items():
        assert controls.backend_for_diffusers(name) is AttentionBackendEnum(ours), name
        assert controls.backend_for_diffusers(AttentionBackendName(name)) is AttentionBackendEnum(ours), name
    known = {b.value for b in AttentionBackendName}
    assert set(controls.DIFFUSERS_BACKENDS) <= known  # every mapped name is a diffusers backend
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert controls.backend_for_diffusers("flex") is None
        assert controls.backend_for_diffusers(AttentionBackendName.FLEX) is None
    assert len(caught) == 1 and "'flex' has no counterpart" in str(caught[0].message)


@pytest.mark.parametrize("order", ["after", "before"])
def test_set_attention_backend_runs_our_layers_with_that_backend(order):
    """`set_attention_backend("_native_math")` after or before `parallelize`: our layers run SDPA math;
    `reset_attention_backend()` goes back to our automatic choice."""
    model, inputs = _wan()
    reference, ops = _run(model, inputs)
    if order == "before":
        model.set_attention_backend("_native_math")
    with parallelize(model):
        if order == "after":
            model.set_attention_backend("_native_math")
        assert _layer_backends(model) == {AttentionBackendEnum.SDPA_MATH}
        assert all(p._attention_backend == "_native_math" for p in _ours(model))
        out, ops = _run(model, inputs)
        assert MATH_OP in ops and CPU_FUSED_OP not in ops, ops
        assert (out - reference).abs().max() <= TOL
        model.reset_attention_backend()
        assert _layer_backends(model) == {None}
        _, ops = _run(model, inputs)
        assert CPU_FUSED_OP in ops and MATH_OP not in ops, ops


def test_reset_restores_the_processor_backend_argument():
    model, inputs = _wan()
    set_wan_attn_processors(model, "local", backend="sdpa_math")
    model.set_attention_backend("_native_flash")
    assert _layer_backends(model) == {AttentionBackendEnum.SDPA_FLASH}
    _, ops = _run(model, inputs)
    assert CPU_FUSED_OP in ops and MATH_OP not in ops, ops
    model.reset_attention_backend()
    assert _layer_backends(model) == {AttentionBackendEnum.SDPA_MATH}
    _, ops = _run(model, inputs)
    assert MATH_OP in ops and CPU_FUSED_OP not in ops, ops


def test_hunyuan_video_set_attention_backend():
    model, inputs = _hunyuan()
    reference, _ = _run(model, inputs)
    with parallelize(model, attention="dense"):
        model.set_attention_backend("_native_math")
        assert _layer_backends(model) == {AttentionBackendEnum.SDPA_MATH}
        out, ops = _run(model, inputs)
        # the token refiner keeps diffusers' AttnProcessor2_0 (its own SDPA call); ours all ran math
        assert MATH_OP in ops
        assert (out - reference).abs().max() <= TOL


def test_unmapped_backend_warns_once_and_leaves_the_choice_to_us():
    model, inputs = _wan()
    with parallelize(model):
        assert len(_ours(model)) == 4  # one warning for all of them, not one each
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.set_attention_backend("flex")
            model.set_attention_backend("flex")
        ours = [w for w in caught if "has no counterpart in diffusers_dist_attn" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "'flex'" in str(ours[0].message) and "choose their own kernel" in str(ours[0].message)
        assert _layer_backends(model) == {None}
        _, ops = _run(model, inputs)
        assert CPU_FUSED_OP in ops


def test_diffusers_context_parallelism_is_refused():
    """diffusers' `enable_parallelism` sets `processor._parallel_config`; both would shard the sequence."""
    model, inputs = _wan()
    set_wan_attn_processors(model, "dense")
    for processor in model.attn_processors.values():
        processor._parallel_config = object()  # what enable_parallelism(config=ContextParallelConfig(...)) sets
    with pytest.raises(ValueError, match=r"context parallelism \(enable_parallelism\) is on.*not both"):
        _run(model, inputs)
