"""Inputs of a parallelized transformer must be identical on every SP rank: checked once per forward.

Real gloo ranks and tiny Wan models. One rank gets other latents / timestep / prompt embeds / frame count (or an
input the plan does not fit): every rank must raise the same `ValueError` naming the argument, quickly, instead of
computing a silently wrong video or hanging in an all-to-all. One spawn per world size computes every case.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import pytest
import torch
from diffusers import WanTransformer3DModel
from distributed_utils import run_distributed

from diffusers_dist_attn.distributed.agreement import layer_check_needed
from diffusers_dist_attn.models import parallelize
from diffusers_dist_attn.pipelines.wan import tiny_transformer_config

TOL = 1e-5
LATENT = (3, 10, 14)  # 3 x 5 x 7 = 105 post-patch tokens: uneven over 2 and 3 ranks
VSA_LATENT = (5, 18, 18)  # grid 5 x 9 x 9, partial VSA tiles on every axis
RAISE_WITHIN_S = 10.0


def _model(seed: int = 0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    config = dict(in_channels=4, out_channels=4, text_dim=16)
    return WanTransformer3DModel(**tiny_transformer_config(**{**config, **overrides})).eval()


def _inputs(seed: int = 0, frames: int = LATENT[0], channels: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, channels, frames, *LATENT[1:], generator=generator),
            "timestep": torch.tensor([700]),
            "encoder_hidden_states": torch.randn(1, 12, 16, generator=generator)}


def _forward(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


# case -> (how the last rank's inputs differ, what the message must name)
MISMATCHES: dict[str, tuple[Callable[[dict], dict], tuple[str, ...]]] = {
    "latents": (lambda x: {**x, "hidden_states": _inputs(seed=1)["hidden_states"]}, ("hidden_states differs",)),
    "timestep": (lambda x: {**x, "timestep": torch.tensor([600])}, ("timestep differs",)),
    "prompt_embeds": (lambda x: {**x, "encoder_hidden_states": _inputs(seed=1)["encoder_hidden_states"]},
                      ("encoder_hidden_states differs",)),
    "num_frames": (lambda x: {**x, "hidden_states": _inputs(frames=2)["hidden_states"]},
                   ("hidden_states.shape differs", "grid differs")),
}


def _count_agree(sharding) -> list[str]:
    """Wrap `sharding.agree` to record each call's `where` (the check must run once per transformer forward)."""
    calls: list[str] = []
    original = getattr(sharding, "agree", None)
    if original is None:  # a sharding module without the check: nothing to count
        return calls

    def counting(group, fields, *, where, error=None):
        calls.append(where)
        return original(group, fields, where=where, error=error)

    sharding.agree = counting
    return calls


def _mismatch_worker(rank: int, world: int) -> dict:
    from diffusers_dist_attn.models import sharding

    last = rank == world - 1
    out: dict = {"cases": {}}
    model, inputs = _model(), _inputs()
    with torch.no_grad():
        reference = _forward(model, inputs)
        handle = parallelize(model, attention="dense")
        calls = _count_agree(sharding)
        inside = []  # layer_check_needed() inside a block: the layers skip their own check in a checked forward
        hook = model.blocks[0].attn1.register_forward_pre_hook(lambda *_: inside.append(layer_check_needed()))
        out["match_err"] = float((_forward(model, inputs) - reference).abs().max())
        hook.remove()
        out["agree_calls_per_forward"] = len(calls)
        out["inside_block_check_needed"] = inside
        for name, (change, _) in MISMATCHES.items():
            start = time.monotonic()
            try:
                _forward(model, change(inputs) if last else inputs)
                out["cases"][name] = (None, time.monotonic() - start)
            except ValueError as exc:
                out["cases"][name] = (str(exc), time.monotonic() - start)
        # after the errors: the ranks are still in step and the checked region was left every time
        out["after_err"] = float((_forward(model, inputs) - reference).abs().max())
        out["check_needed_after"] = layer_check_needed()

        os.environ["DIFFUSERS_DIST_ATTN_CHECK_RANKS"] = "0"  # the documented escape hatch: no check, no collective
        try:
            calls.clear()
            changed = MISMATCHES["latents"][0](inputs) if last else inputs
            out["disabled_silent_err"] = float((_forward(model, changed) - reference).abs().max())
            out["disabled_agree_calls"] = len(calls)
        finally:
            del os.environ["DIFFUSERS_DIST_ATTN_CHECK_RANKS"]
        handle.remove()

        # a local validation error on one rank only (Wan 2.2 TI2V per-token timestep that does not fit the grid)
        model = _model(in_channels=48, out_channels=48)
        ti2v = _inputs(channels=48)
        tokens = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
        ti2v["timestep"] = torch.full((1, tokens + (1 if last else 0)), 700.0)
        handle = parallelize(model, attention="dense")
        start = time.monotonic()
        try:
            _forward(model, ti2v)
            out["cases"]["plan_misfit"] = (None, time.monotonic() - start)
        except ValueError as exc:
            out["cases"]["plan_misfit"] = (str(exc), time.monotonic() - start)
        # the same misfit on every rank: the plain error, not the "same inputs on every rank" hint
        ti2v["timestep"] = torch.full((1, tokens + 1), 700.0)
        try:
            _forward(model, ti2v)
            out["cases"]["plan_misfit_everywhere"] = (None, 0.0)
        except ValueError as exc:
            out["cases"]["plan_misfit_everywhere"] = (str(exc), 0.0)
        handle.remove()
    return out


@functools.cache
def mismatch_results(world: int) -> list[dict]:
    return run_distributed(world, _mismatch_worker, timeout=60)


@pytest.mark.parametrize("world", [2, 3])  # 3: 4 heads split unevenly; 105 tokens padded to 105 (35 per rank)
@pytest.mark.parametrize("case", list(MISMATCHES))
def test_rank_with_different_input_raises_same_error_everywhere(world, case):
    results = mismatch_results(world)
    messages = [res["cases"][case][0] for res in results]
    assert all(m is not None for m in messages), f"P={world} {case}: some rank did not raise: {messages}"
    assert len(set(messages)) == 1, f"P={world} {case}: ranks raised different errors: {messages}"
    message = messages[0]
    assert message.startswith("Wan forward:"), message
    for needle in MISMATCHES[case][1]:
        assert needle in message, message
    assert "same generator seed / the same inputs on every rank" in message, message
    for res in results:
        assert res["cases"][case][1] < RAISE_WITHIN_S


@pytest.mark.parametrize("world", [2, 3])
def test_local_validation_error_on_one_rank_raises_on_every_rank(world):
    results = mismatch_results(world)
    messages = [res["cases"]["plan_misfit"][0] for res in results]
    assert all(m is not None for m in messages) and len(set(messages)) == 1, messages
    assert f"bad input on 1 of {world} ranks" in messages[0] and "does not fit" in messages[0], messages[0]
    assert "timestep" in messages[0]
    assert all(res["cases"]["plan_misfit"][1] < RAISE_WITHIN_S for res in results)


@pytest.mark.parametrize("world", [2, 3])
def test_same_error_on_every_rank_is_not_called_a_disagreement(world):
    messages = [res["cases"]["plan_misfit_everywhere"][0] for res in mismatch_results(world)]
    assert all(m is not None for m in messages) and len(set(messages)) == 1, messages
    assert "does not fit" in messages[0] and "same generator seed" not in messages[0], messages[0]


@pytest.mark.parametrize("world", [2, 3])
def test_check_runs_once_per_forward_and_matching_inputs_pass(world):
    for res in mismatch_results(world):
        assert res["match_err"] <= TOL
        assert res["agree_calls_per_forward"] == 1
        assert res["inside_block_check_needed"] == [False]  # the layers rely on the forward's check
        assert res["after_err"] <= TOL  # errors leave the ranks in step
        assert res["check_needed_after"] is True  # the checked region was exited, also on the error paths


def test_check_can_be_disabled():
    results = mismatch_results(2)
    assert all(res["disabled_agree_calls"] == 0 for res in results)
    assert results[-1]["disabled_silent_err"] > 1e-2  # what the check exists for: a silently wrong result


def _named_vsa_worker(rank: int, world: int) -> tuple[str | None, float]:
    """`vsa_implementation="torch"` that cannot run on the last rank only (its registry row reports it missing, as a
    failed build would): every rank must raise before the all-to-alls."""
    import dataclasses

    from diffusers_dist_attn.attention.registry import get_backend, register_backend

    row = get_backend("vsa", "torch")
    if rank == world - 1:
        register_backend(dataclasses.replace(row, available=lambda: "not installed on this rank"))
    model, inputs = _model(), _inputs()
    handle = parallelize(model, attention="vsa", sparsity=0.5, vsa_implementation="torch")
    start = time.monotonic()
    try:
        with torch.no_grad():
            _forward(model, inputs)
        return None, time.monotonic() - start
    except ValueError as exc:
        return str(exc), time.monotonic() - start
    finally:
        handle.remove()
        register_backend(row)


def test_named_vsa_implementation_missing_on_one_rank_raises_on_every_rank():
    results = run_distributed(2, _named_vsa_worker, timeout=60)
    messages = [message for message, _ in results]
    assert all(m is not None for m in messages) and len(set(messages)) == 1, messages
    assert "vsa implementation can run here differs" in messages[0], messages[0]
    assert all(seconds < RAISE_WITHIN_S for _, seconds in results)


def test_unknown_vsa_implementation_is_refused_before_any_change():
    model = _model()
    with pytest.raises(ValueError, match="vsa_implementation='tritn'"):
        parallelize(model, attention="vsa", sparsity=0.5, vsa_implementation="tritn")
    assert "_dda_parallel" not in model.__dict__


# ---------------------------------------------------------------------------------------------------------------
# torch.compile: the check runs in the root hooks, outside blocks compiled with compile_repeated_blocks
# ---------------------------------------------------------------------------------------------------------------
def _vsa_gates(model) -> dict[str, torch.Tensor]:
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    generator = torch.Generator().manual_seed(5)
    gates = {}
    for i in range(model.config.num_layers):
        gates[f"blocks.{i}.to_gate_compress.weight"] = torch.randn(dim, dim, generator=generator) * 0.2
        gates[f"blocks.{i}.to_gate_compress.bias"] = torch.randn(dim, generator=generator) * 0.2
    return gates


def _compile_worker(rank: int, world: int) -> dict:
    from diffusers_dist_attn.models import load_gate_compress, sharding
    from diffusers_dist_attn.vsa import tiling

    out: dict = {}
    # VSA first, from an empty tile-layout cache (as in a fresh process; the fork may have inherited a filled one)
    tiling._DEVICE_CACHE.clear()
    tiling._layout_cpu.cache_clear()
    vsa_inputs = {"hidden_states": torch.randn(1, 4, *VSA_LATENT, generator=torch.Generator().manual_seed(3)),
                  "timestep": torch.tensor([500]), "encoder_hidden_states": torch.randn(1, 12, 16)}
    with torch.no_grad():
        model = _model(seed=1)
        handle = parallelize(model, attention="vsa", sparsity=0.5)
        load_gate_compress(model, _vsa_gates(model))
        torch._dynamo.reset()
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        try:
            compiled = _forward(model, vsa_inputs)
            out["vsa_compile_error"] = None
        except Exception as exc:  # noqa: BLE001 - reported to the test
            compiled, out["vsa_compile_error"] = None, f"{type(exc).__name__}: {str(exc)[:2000]}"
        handle.remove()
        eager_model = _model(seed=1)
        handle = parallelize(eager_model, attention="vsa", sparsity=0.5)
        load_gate_compress(eager_model, _vsa_gates(eager_model))
        eager = _forward(eager_model, vsa_inputs)
        handle.remove()
        out["vsa_err"] = None if compiled is None else float((compiled - eager).abs().max())

        # dense: compiled blocks + the per-forward check (twice: the second call reuses the graph)
        model, inputs = _model(), _inputs()
        reference = _forward(model, inputs)
        handle = parallelize(model, attention="dense")
        torch._dynamo.reset()
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        calls = _count_agree(sharding)
        out["dense_err"] = max(float((_forward(model, inputs) - reference).abs().max()) for _ in range(2))
        out["dense_agree_calls"] = len(calls)
        changed = MISMATCHES["timestep"][0](inputs) if rank == world - 1 else inputs
        try:
            _forward(model, changed)
            out["dense_mismatch"] = None
        except ValueError as exc:
            out["dense_mismatch"] = str(exc)
        handle.remove()
    return out


@functools.cache
def compile_results() -> list[dict]:
    return run_distributed(2, _compile_worker, timeout=300)


def test_compile_repeated_blocks_fullgraph_keeps_the_check():
    for res in compile_results():
        assert res["dense_err"] <= TOL
        assert res["dense_agree_calls"] == 2
        assert res["dense_mismatch"] is not None and "timestep differs" in res["dense_mismatch"]


def test_vsa_compile_repeated_blocks_from_an_empty_tile_cache():
    for res in compile_results():
        assert res["vsa_compile_error"] is None, res["vsa_compile_error"]
        assert res["vsa_err"] <= TOL
