"""`diffusers-dist-attn train` on CPU with the embedded tiny Wan transformer (fp32), real gloo processes.

- SP = 2 equals one process (dense and VSA): per-step losses and the averaged first-step gradients of every
  weight (checks the gradient convention: one world mean gives the single-process gradient);
- data parallel (and SP x DP) equals one process with the same global batch;
- overfitting one fixed batch, save / reload of gates and LoRA (bit-identical outputs), exact resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed

from diffusers_dist_attn.training import TrainConfig, Trainer

RTOL = 1e-5
# grid 5 x 9 x 9 = 405 post-patch tokens (uneven over 2 ranks), 2 x 3 x 3 VSA tiles with partial tiles
GRID = (5, 18, 18)


def _config(out: Path, **overrides) -> TrainConfig:
    # text_length 16 (the synthetic prompts' length) instead of Wan's 512: keeps the CPU tests fast
    values = dict(synthetic=4, synthetic_grid=GRID, max_steps=3, lr=1e-3, output_dir=str(out), progress=False,
                  plot=False, text_length=16)
    return TrainConfig(**{**values, **overrides})


def _train(rank: int, world: int, config: TrainConfig, grads_of_step: int | None = 0):
    """Train on this rank; returns (losses, {name: reduced gradient at step `grads_of_step`})."""
    grads: dict[str, torch.Tensor] = {}

    def on_step(trainer: Trainer, step: int) -> None:
        if step == grads_of_step:
            grads.update({n: p.grad.detach().clone() for n, p in trainer.trainable})

    result = Trainer(config, on_step=on_step).fit()
    return result.losses, grads


def _assert_close_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= RTOL * abs(w), (got, want)


def _assert_close_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item() + 1e-12
        err = (got[name] - want[name]).abs().max().item()
        assert err <= 1e-4 * scale + 1e-9, f"{name}: max err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["dense", "vsa"])
def test_sp2_matches_single_process(tmp_path, attention):
    """2 ranks, SP = 2 (uneven tokens), all weights trained: same losses and gradients as one process. VSA: the
    sparsity rises 0 -> 0.5 over the steps; the SP run also uses gradient checkpointing."""
    extra = dict(attention=attention, train=("full",))
    if attention == "vsa":
        extra.update(sparsity=0.5, sparsity_warmup_steps=2)
    else:
        extra.update(attention="dense")
    one = run_distributed(1, _train, _config(tmp_path / "p1", **extra))[0]
    two = run_distributed(2, _train, _config(tmp_path / "p2", sp=2, gradient_checkpointing=True, **extra), sp=2)
    losses, grads = one
    assert losses[0] > 0
    for rank_losses, rank_grads in two:
        _assert_close_losses(rank_losses, losses)
        _assert_close_grads(rank_grads, grads)
    assert (tmp_path / "p2" / "train_log.json").is_file()
    log = json.loads((tmp_path / "p2" / "train_log.json").read_text())
    assert [r["step"] for r in log["steps"]] == [1, 2, 3]
    assert len(log["steps"][0]["per_rank"]) == 2 and all(r["peak_memory_mb"] > 0 for r in log["steps"][0]["per_rank"])
    if attention == "vsa":
        assert [r["sparsity"] for r in log["steps"]] == [0.0, 0.25, 0.5]


@pytest.mark.slow
def test_data_parallel_matches_single_process_batch(tmp_path):
    """DP = 2 (batch 2 over 2 groups) and SP = 2 x DP = 2 (4 ranks) equal one process with batch 2: each DP group
    sees its half of the global batch and one world mean averages the gradients."""
    extra = dict(attention="vsa", train=("lora", "gates"), batch_size=2, sparsity=0.5, lora_rank=4, lora_alpha=4,
                 synthetic_grid=(3, 16, 16), lr=1e-2)
    losses, grads = run_distributed(1, _train, _config(tmp_path / "one", **extra))[0]
    dp = run_distributed(2, _train, _config(tmp_path / "dp", sp=1, **extra), sp=1)
    for rank_losses, rank_grads in dp:
        _assert_close_losses(rank_losses, losses)
        _assert_close_grads(rank_grads, grads)
    spdp = run_distributed(4, _train, _config(tmp_path / "spdp", sp=2, **extra), sp=2, timeout=240)
    for rank_losses, rank_grads in spdp:
        _assert_close_losses(rank_losses, losses)
        _assert_close_grads(rank_grads, grads)


def test_overfit_one_batch(tmp_path):
    """One fixed sample, fixed noise and sigma, all weights: the loss falls by at least half within 60 steps."""
    config = _config(tmp_path, synthetic=1, synthetic_grid=(3, 16, 16), max_steps=60, train=("full",), lr=3e-3,
                     fixed_noise=True)
    losses = Trainer(config).fit().losses
    assert min(losses) <= 0.5 * losses[0], losses


def _tiny_inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 16, 3, 16, 16, generator=gen),
            "encoder_hidden_states": torch.randn(1, 16, 32, generator=gen), "timestep": torch.tensor([600.0])}


def test_saved_gates_and_lora_reload_bit_identical(tmp_path):
    """gates.safetensors (read by load_gates) and the diffusers-format LoRA (read by pipe.load_lora_weights) give
    a fresh tiny pipeline exactly the trained transformer's outputs."""
    pytest.importorskip("peft")
    from diffusers_dist_attn.models import load_gates, parallelize
    from diffusers_dist_attn.pipelines.wan import build_tiny_pipeline

    config = _config(tmp_path, synthetic=2, synthetic_grid=(3, 16, 16), train=("lora", "gates"), lr=1e-2,
                     sparsity=0.5, lora_rank=4, lora_alpha=8)
    trainer = Trainer(config)
    trainer.fit()
    inputs = _tiny_inputs()
    trained = trainer.model.eval()
    with torch.no_grad():
        want = trained(**inputs, return_dict=False)[0]
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # training moved the zero-initialised LoRA B

    pipe = build_tiny_pipeline(config.seed)
    pipe.load_lora_weights(str(tmp_path / "pytorch_lora_weights.safetensors"))
    report = load_gates(pipe.transformer, tmp_path / "gates.safetensors")
    assert not report.unused and not report.missing_blocks
    with parallelize(pipe.transformer, attention="vsa", sparsity=0.5):
        with torch.no_grad():
            got = pipe.transformer.eval()(**inputs, return_dict=False)[0]
    assert torch.equal(got, want)


def test_resume_continues_the_loss_curve_exactly(tmp_path):
    """4 steps straight == 2 steps, then --resume to 4 (model, optimizer, LR schedule, data order, noise)."""
    extra = dict(synthetic=3, synthetic_grid=(3, 16, 16), train=("lora", "gates"), lr=1e-2, lr_warmup_steps=3,
                 sparsity=0.5, sparsity_warmup_steps=3, lora_rank=4, lora_alpha=4)
    straight = Trainer(_config(tmp_path / "a", max_steps=4, **extra)).fit().losses
    first = Trainer(_config(tmp_path / "b", max_steps=2, save_every=1, **extra)).fit().losses
    assert (tmp_path / "b" / "checkpoint-1").is_dir() and (tmp_path / "b" / "checkpoint-2").is_dir()
    resumed = Trainer(_config(tmp_path / "b", max_steps=4, resume="latest", **extra)).fit()
    assert resumed.start_step == 2
    assert first + resumed.losses[2:] == straight
    log = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert [r["loss"] for r in log["steps"]] == straight
    assert not [p for p in (tmp_path / "b").iterdir() if ".tmp-" in p.name]


def _train_compiled(rank: int, world: int, config: TrainConfig) -> tuple[list[float], bool, int]:
    from torch._dynamo.utils import counters

    trainer = Trainer(config)
    losses = trainer.fit().losses
    compiled = all(block._compiled_call_impl is not None for block in trainer.model.blocks)
    return losses, compiled, int(counters["stats"]["unique_graphs"])


def test_compiled_blocks_train_the_same(tmp_path):
    """`--compile` (regional torch.compile of the blocks, fullgraph, after `parallelize`) gives the eager losses,
    VSA with LoRA + gates, gradient checkpointing and a sparsity rising over the steps (a graph per value: more than
    dynamo's default limit of 8 with fullgraph). Inductor runs in a child process: its compile thread pool must not
    live in the pytest process, whose later tests fork workers that compile."""
    extra = dict(attention="vsa", train=("lora", "gates"), sparsity=0.5, sparsity_warmup_steps=4, lora_rank=4,
                 lora_alpha=4, max_steps=5, synthetic_grid=(3, 16, 16), gradient_checkpointing=True)
    eager = Trainer(_config(tmp_path / "eager", **extra)).fit().losses
    compiled, all_compiled, graphs = run_distributed(
        1, _train_compiled, _config(tmp_path / "compiled", compile=True, **extra), timeout=400)[0]
    assert all_compiled and graphs > 8
    assert len(compiled) == len(eager) == 5
    for got, want in zip(compiled, eager, strict=True):
        assert abs(got - want) <= 1e-4 * abs(want), (compiled, eager)


def test_compile_refuses_a_schedule_of_many_sparsities(tmp_path):
    config = _config(tmp_path / "out", compile=True, attention="vsa", sparsity=0.5, sparsity_warmup_steps=100,
                     max_steps=100)
    with pytest.raises(ValueError, match="compiles the blocks once per distinct sparsity, and this schedule uses 100"):
        Trainer(config).validate()
    assert not (tmp_path / "out").exists()
