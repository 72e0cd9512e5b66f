"""HunyuanVideo: sequence-parallel and sparse processors vs the stock single-process model (CPU, gloo, fp32).

Tiny HunyuanVideo from diffusers' test config with 4 heads, latent 3x6x5 = 90 tokens (uneven for P = 4: padded),
batch 2 with one fully valid and one partly padded text mask. One spawned run per world size computes everything
that needs that world size (spawns dominate the runtime); the tests read its results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel, HunyuanVideoTransformer3DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from distributed_utils import run_distributed

from diffusers_dist_attn.distributed import SequenceParallelGroups
from diffusers_dist_attn.models.hunyuan_video import (
    HunyuanVideoDistributedAttnProcessor,
    joint_attention_modules,
    text_key_mask,
)
from diffusers_dist_attn.models.sharding import parallelize

TOL = 1e-5
CONFIG = dict(
    in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=10, num_layers=1, num_single_layers=1,
    num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
    pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
)
CONFIG_I2V = {**CONFIG, "in_channels": 2, "image_condition_type": "token_replace"}  # first frame: 30 tokens
CONFIG_15 = dict(
    in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
    mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
    rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
)
TEXT_MASK = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])  # batch 2: full, and 5 padded text tokens
SPARSITY = 0.5  # grid 3x6x5 -> 1x2x2 tiles: top-2 of 4 key blocks


def make_model(kind: str = "t2v") -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A seeded tiny model and inputs (identical in every process)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "hv15":
        model = HunyuanVideo15Transformer3DModel(**CONFIG_15).eval()
        inputs = dict(
            hidden_states=torch.randn(2, 4, 3, 5, 6, generator=g), timestep=torch.tensor([3.0, 500.0]),
            encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
            encoder_attention_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
            encoder_hidden_states_2=torch.randn(2, 4, 8, generator=g),
            encoder_attention_mask_2=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), image_embeds=torch.zeros(2, 3, 12),
        )
        return model, inputs
    config = CONFIG_I2V if kind == "i2v" else CONFIG
    model = HunyuanVideoTransformer3DModel(**config).eval()
    inputs = dict(
        hidden_states=torch.randn(2, config["in_channels"], 3, 6, 5, generator=g), timestep=torch.tensor([3.0, 500.0]),
        encoder_hidden_states=torch.randn(2, 12, 16, generator=g), encoder_attention_mask=TEXT_MASK.clone(),
        pooled_projections=torch.randn(2, 8, generator=g), guidance=torch.tensor([1000.0, 3000.0]),
    )
    return model, inputs


def randomize_gates(model: torch.nn.Module) -> None:
    """Seeded non-zero VSA gates (the same in every process)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "to_gate_compress" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


def forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        # clone: at batch 1 the gathered output is a lazy funcol AsyncCollectiveTensor view, which torch.save (the
        # harness's transport) serialises without waiting for the all-gather (reported to the core's owner)
        return model(**inputs).sample.clone()


def loss_weights(shape: torch.Size) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


def pad_changed(inputs: dict) -> dict:
    """The inputs with every padded text token replaced by large random values."""
    text = inputs["encoder_hidden_states"].clone()
    padded = inputs["encoder_attention_mask"] == 0
    text[padded] = torch.randn(int(padded.sum()), text.shape[-1], generator=torch.Generator().manual_seed(5)) * 100
    return {**inputs, "encoder_hidden_states": text}


def batch1(inputs: dict) -> dict:
    """The partly padded sample alone (batch 1)."""
    return {k: v[1:] for k, v in inputs.items()}


def _sp_worker(rank: int, world: int) -> dict:
    """Everything computed at SP degree `world` (outputs from every rank, grads averaged over the SP group)."""
    import torch.distributed as dist

    from diffusers_dist_attn.distributed import init_sequence_parallel

    results = {}
    model, inputs = make_model()
    texts = []  # text stream after the last block: must be identical on every rank
    hook = model.single_transformer_blocks[-1].register_forward_hook(lambda m, a, out: texts.append(out[1].clone()))
    handle = parallelize(model)
    results["dense"] = forward(model, inputs)
    results["text"] = texts[-1]
    hook.remove()
    results["dense_b1"] = forward(model, batch1(inputs))  # common valid prefix: padded text dropped, no mask
    if world == 3:  # 4 heads over 3 ranks: uneven head split 2, 1, 1
        return results
    results["dense_pad_changed"] = forward(model, pad_changed(inputs))
    if world == 2:  # gradients, averaged over the SP group (FastVideo's convention)
        out = model(**inputs).sample
        (out * loss_weights(out.shape)).sum().backward()
        grads = {}
        for name, param in model.named_parameters():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad, op=dist.ReduceOp.AVG)
            grads[name] = grad
        results["grads"] = grads
    handle.remove()

    model, inputs = make_model()
    handle = parallelize(model, attention="vsa", sparsity=0.0)
    results["vsa0_zero_gate"] = forward(model, inputs)
    handle.remove()

    model, inputs = make_model()
    handle = parallelize(model, attention="vsa", sparsity=SPARSITY)
    randomize_gates(model)
    results["vsa"] = forward(model, inputs)
    results["vsa_b1"] = forward(model, batch1(inputs))
    results["vsa_pad_changed"] = forward(model, pad_changed(inputs))
    handle.remove()

    if world == 2:
        for kind in ("i2v", "hv15"):
            model, inputs = make_model(kind)
            parallelize(model)
            results[kind] = forward(model, inputs)
    if world == 4:  # hybrid Ulysses 2 x ring 2 (the core's ring path with replicated text)
        init_sequence_parallel(4, ulysses=2, ring=2, cpu=True)
        model, inputs = make_model()
        parallelize(model)
        results["ring"] = forward(model, inputs)
        results["ring_b1"] = forward(model, batch1(inputs))
    return results


@pytest.fixture(scope="module")
def reference() -> dict:
    """Single-process values: the stock model, its gradients, and VSA at P = 1."""
    ref = {}
    model, inputs = make_model()
    ref["stock"] = forward(model, inputs)
    ref["stock_pad_changed"] = forward(model, pad_changed(inputs))
    out = model(**inputs).sample
    (out * loss_weights(out.shape)).sum().backward()
    ref["grads"] = {name: p.grad for name, p in model.named_parameters()}
    for kind in ("i2v", "hv15"):
        model, inputs = make_model(kind)
        ref[kind] = forward(model, inputs)
    model, inputs = make_model()
    with parallelize(model, attention="vsa", sparsity=SPARSITY):
        randomize_gates(model)
        ref["vsa"] = forward(model, inputs)
        ref["vsa_b1"] = forward(model, batch1(inputs))
    return ref


@pytest.fixture(scope="module")
def sp_results() -> dict[int, list[dict]]:
    return {world: run_distributed(world, _sp_worker) for world in (2, 3, 4)}


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Dense Ulysses with replicated text
# ---------------------------------------------------------------------------------------------------------------
def test_p1_equals_stock(reference):
    model, inputs = make_model()
    with parallelize(model):
        assert all(isinstance(p, HunyuanVideoDistributedAttnProcessor) for k, p in model.attn_processors.items()
                   if "token_refiner" not in k)
        assert isinstance(model.attn_processors["context_embedder.token_refiner.refiner_blocks.0.attn.processor"],
                          AttnProcessor2_0)  # the token refiner keeps its local stock attention
        out = forward(model, inputs)
    assert _max_err(out, reference["stock"]) <= TOL
    assert _max_err(forward(model, inputs), reference["stock"]) == 0.0  # removed: stock processors are back
    # plain drop-in processors (no sharding plan, one process)
    for name, (attn, _dual) in joint_attention_modules(model).items():
        attn.set_processor(HunyuanVideoDistributedAttnProcessor(4, 10, name=name))
    assert _max_err(forward(model, inputs), reference["stock"]) <= TOL


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sp_equals_stock(sp_results, reference, world):
    """P = 2, 4 (P = 4: 90 tokens padded to 92) and P = 3 (uneven head split 2, 1, 1); masked (batch 2, different
    valid text lengths) and unmasked (batch 1: the padded text tokens are dropped) paths."""
    for rank, res in enumerate(sp_results[world]):
        err = _max_err(res["dense"], reference["stock"])
        assert err <= TOL, f"P={world} rank {rank}: max abs error {err:.3g}"
        err = _max_err(res["dense_b1"], reference["stock"][1:])
        assert err <= TOL, f"P={world} rank {rank}, batch 1: max abs error {err:.3g}"


def test_hybrid_ulysses_ring_equals_stock(sp_results, reference):
    for rank, res in enumerate(sp_results[4]):
        assert _max_err(res["ring"], reference["stock"]) <= TOL, f"ulysses 2 x ring 2, rank {rank}"
        assert _max_err(res["ring_b1"], reference["stock"][1:]) <= TOL, f"ulysses 2 x ring 2, batch 1, rank {rank}"


@pytest.mark.parametrize("world", [2, 4])
def test_text_stream_identical_on_all_ranks(sp_results, world):
    texts = [res["text"] for res in sp_results[world]]
    assert texts[0].shape == (2, 12, 40)
    for rank, text in enumerate(texts[1:], 1):
        assert torch.equal(text, texts[0]), f"rank {rank} text differs by {_max_err(text, texts[0]):.3g}"


def test_grads_p2_equal_single_process(sp_results, reference):
    ref = reference["grads"]
    for rank, res in enumerate(sp_results[2]):
        assert res["grads"].keys() == ref.keys()
        for name, grad in res["grads"].items():
            torch.testing.assert_close(grad, ref[name], atol=TOL, rtol=1e-4,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
    assert max(g.abs().max().item() for g in ref.values()) > 1e-2  # the check is not vacuous


def test_padded_text_tokens_do_not_matter(sp_results, reference):
    changed = _max_err(reference["stock_pad_changed"], reference["stock"])
    assert changed <= TOL  # stock model: padded text tokens never get weight
    for world in (2, 4):
        for res in sp_results[world]:
            assert _max_err(res["dense_pad_changed"], res["dense"]) <= TOL, f"P={world} dense"
            assert _max_err(res["vsa_pad_changed"], res["vsa"]) <= TOL, f"P={world} vsa"


def test_text_mask_is_used(reference):
    """Ignoring the mask would change the output: padded keys carry weight (guards the test above)."""
    model, inputs = make_model()
    with parallelize(model):
        unmasked = forward(model, {**inputs, "encoder_attention_mask": torch.ones_like(TEXT_MASK)})
    assert _max_err(unmasked[1], reference["stock"][1]) > 1e-3
    assert _max_err(unmasked[0], reference["stock"][0]) <= TOL  # the fully valid sample is unchanged


def test_i2v_token_replace_and_hunyuan_video_15(sp_results, reference):
    for kind in ("i2v", "hv15"):
        for rank, res in enumerate(sp_results[2]):
            err = _max_err(res[kind], reference[kind])
            assert err <= TOL, f"{kind} P=2 rank {rank}: max abs error {err:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# Video Sparse Attention with replicated text
# ---------------------------------------------------------------------------------------------------------------
def test_vsa_sparsity0_zero_gate_equals_dense(sp_results, reference):
    model, inputs = make_model()
    with parallelize(model, attention="vsa", sparsity=0.0):
        assert "transformer_blocks.0.attn.to_gate_compress.weight" in model.state_dict()
        assert "single_transformer_blocks.0.attn.to_gate_compress.bias" in model.state_dict()
        assert _max_err(forward(model, inputs), reference["stock"]) <= TOL
    assert not any("gate_compress" in k for k in model.state_dict())  # remove() drops the gates
    for res in sp_results[2]:
        assert _max_err(res["vsa0_zero_gate"], reference["stock"]) <= TOL


@pytest.mark.parametrize("world", [2, 4])
def test_vsa_sp_equals_p1(sp_results, reference, world):
    assert _max_err(reference["vsa"], reference["stock"]) > 1e-3  # sparse + gate really differs from dense
    assert _max_err(reference["vsa_b1"], reference["vsa"][1:]) <= TOL  # dropped padded text == masked padded text
    for rank, res in enumerate(sp_results[world]):
        err = _max_err(res["vsa"], reference["vsa"])
        assert err <= TOL, f"VSA P={world} rank {rank}: max abs error {err:.3g}"
        assert _max_err(res["vsa_b1"], reference["vsa_b1"]) <= TOL, f"VSA P={world} rank {rank}, batch 1"


def test_gate_checkpoint_roundtrip(tmp_path, reference):
    from safetensors.torch import save_file

    from diffusers_dist_attn.models.hunyuan_video import load_gate_compress

    model, _ = make_model()
    with parallelize(model, attention="vsa", sparsity=SPARSITY):
        randomize_gates(model)
        gates = {f"transformer.{k}": v.clone() for k, v in model.state_dict().items() if "to_gate_compress" in k}
    assert len(gates) == 4  # weight + bias for transformer_blocks.0 and single_transformer_blocks.0
    save_file(gates, str(tmp_path / "gates.safetensors"))
    model, inputs = make_model()
    with parallelize(model, attention="vsa", sparsity=SPARSITY):
        report = load_gate_compress(model, tmp_path / "gates.safetensors")
        assert len(report.used) == 4 and not report.unused and not report.missing_blocks
        assert _max_err(forward(model, inputs), reference["vsa"]) <= TOL
    with pytest.raises(ValueError, match=r"has shape \(3,\)"):
        load_gate_compress(model, {"transformer_blocks.0.attn.to_gate_compress.bias": torch.zeros(3)})


def test_vsa_dense_steps_schedule(reference):
    """`sparsity=None` at a step (schedule) runs the dense path even with VSA installed."""
    model, inputs = make_model()
    with parallelize(model, attention="vsa", sparsity=lambda step: None):
        randomize_gates(model)
        assert _max_err(forward(model, inputs), reference["stock"]) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def test_too_many_ranks_for_the_heads_names_valid_degrees():
    """4 heads cannot be split over 8 Ulysses ranks (uneven splits such as P = 3 work, see above): the error names
    the Ulysses degrees that would work; VSA (no ring) says so too."""
    model, _ = make_model()
    groups = SequenceParallelGroups(world_size=8, sp_size=8)  # checked before any communication
    message = r"4 attention heads cannot be split over a sequence-parallel degree of 8.*\[1, 2, 4\]"
    with pytest.raises(ValueError, match=message):
        parallelize(model, groups=groups)
    with pytest.raises(ValueError, match=r"degree of 8.*video sparse attention.*<= 4"):
        parallelize(model, groups=groups, attention="vsa")
    assert not any(isinstance(p, HunyuanVideoDistributedAttnProcessor) for p in model.attn_processors.values())


def test_text_mask_wrong_shape():
    model, inputs = make_model()
    with parallelize(model):
        bad = {**inputs, "encoder_attention_mask": torch.ones(2, 13, dtype=torch.long)}
        message = r"encoder_attention_mask has shape \[2, 13\]; expected \[batch, text_tokens\] = \[2, 12\]"
        with pytest.raises(ValueError, match=message):
            model(**bad)


def test_processor_rejects_bad_masks():
    with pytest.raises(ValueError, match=r"blocks.3.attn: attention mask has shape \[2, 1, 102, 102\]"):
        text_key_mask(torch.ones(2, 1, 102, 102, dtype=torch.bool), 2, 12, (90,), "blocks.3.attn")
    with pytest.raises(ValueError, match="must be bool"):
        text_key_mask(torch.zeros(2, 1, 1, 102), 2, 12, (90,), "blocks.3.attn")
    mask = torch.ones(2, 1, 1, 102, dtype=torch.bool)
    mask[1, 0, 0, -3:] = False
    assert torch.equal(text_key_mask(mask, 2, 12, (90,), "x"), mask[:, 0, 0, 90:])


def test_block_with_wrong_processor_is_named():
    model, _ = make_model()
    model.single_transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    message = r"single_transformer_blocks\.0\.attn: processor AttnProcessor2_0.*image_rotary_emb"
    with pytest.raises(ValueError, match=message):
        parallelize(model)
    model, _ = make_model()
    model.transformer_blocks[0].attn.to_add_out = None
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn: dual-stream attention lacks \['to_add_out'\]"):
        parallelize(model)


# ---------------------------------------------------------------------------------------------------------------
# The embedded tiny pipeline
# ---------------------------------------------------------------------------------------------------------------
def test_tiny_pipeline_offline_and_roundtrip(tmp_path, monkeypatch):
    import argparse

    from diffusers_dist_attn.pipelines import get_pipeline_module

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = get_pipeline_module("hunyuan-video")
    pipe = module.build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    kwargs = module.call_kwargs(argparse.Namespace(**module.DEFAULTS))
    _, _, text_mask = pipe.encode_prompt(module.DEFAULTS["prompt"], device="cpu")
    assert text_mask.shape == (1, 256) and 0 < int(text_mask.sum()) < 256  # partly padded text, as in the real one

    def frames(p):
        return p(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").frames

    first = frames(pipe)
    assert first.shape == (1, 9, 3, 32, 32)
    assert torch.equal(frames(module.build_tiny_pipeline(seed=0)), first)  # deterministic for a seed
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = module.load_pipeline(tmp_path / "tiny", torch.float32)
    loaded.set_progress_bar_config(disable=True)
    assert _max_err(frames(loaded), first) <= TOL  # tokenizers and weights round-trip
    with pytest.raises(ValueError, match="no readable model_index.json"):
        module.load_pipeline(tmp_path, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# The CLI: generate --pipeline hunyuan-video under 2 CPU processes
# ---------------------------------------------------------------------------------------------------------------
def _cli_available() -> bool:
    return (Path(__file__).parents[1] / "diffusers_dist_attn" / "cli.py").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _cli_available(), reason="diffusers_dist_attn/cli.py not present yet")
@pytest.mark.parametrize("attention", ["dense", "vsa"])
def test_generate_cli_two_processes(tmp_path, attention):
    """`generate --pipeline hunyuan-video --check` under 2 CPU processes (torchrun, gloo): the frames equal the
    single-process run (dense: stock diffusers processors; vsa: VSA at P = 1) within 1e-5."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "diffusers_dist_attn", "generate",
               "--pipeline", "hunyuan-video", "--attention", attention, "--check", "--format", "png",
               "--output-dir", str(tmp_path), "--name", "hv"]
    if attention == "vsa":
        command += ["--sparsity", "0.5"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "hv.json").read_text())
    assert report["pipeline"] == "hunyuan-video" and report["sp"] == 2 and report["world_size"] == 2
    assert report["video_shape"][0] == 9  # frames
    assert report["check"]["max_abs_diff"] <= TOL, report["check"]


# ---------------------------------------------------------------------------------------------------------------
# One processor class with an attention strategy (as Wan's), plans
# ---------------------------------------------------------------------------------------------------------------
def test_local_attention_equals_stock(reference):
    """`attention="local"`: the joint attention on one process without communication, like Wan's `"local"`."""
    model, inputs = make_model()
    with parallelize(model, attention="local"):
        processors = [p for k, p in model.attn_processors.items() if "token_refiner" not in k]
        assert all(isinstance(p, HunyuanVideoDistributedAttnProcessor) and p.attention == "local" and p.sparse is None
                   for p in processors)
        assert _max_err(forward(model, inputs), reference["stock"]) <= TOL
    with pytest.raises(ValueError, match="attention='local' runs without sequence parallelism"):
        parallelize(model, attention="local", groups=SequenceParallelGroups(world_size=2, sp_size=2))
    with pytest.raises(ValueError, match=r"attention must be one of \['local', 'dense', 'vsa'\]"):
        HunyuanVideoDistributedAttnProcessor(4, 10, attention="sparse")


def test_hunyuan_video_15_plan_is_the_10_plan_renamed():
    import dataclasses

    from diffusers_dist_attn.models.hunyuan_video import HUNYUAN_VIDEO_15_PLAN, HUNYUAN_VIDEO_PLAN
    from diffusers_dist_attn.models.sharding import get_plan

    assert HUNYUAN_VIDEO_15_PLAN == dataclasses.replace(HUNYUAN_VIDEO_PLAN, name="HunyuanVideo-1.5")
    assert get_plan(make_model("hv15")[0]) is HUNYUAN_VIDEO_15_PLAN
    assert get_plan(make_model()[0]) is HUNYUAN_VIDEO_PLAN
