"""`diffusers-dist-attn generate` end to end: 2 CPU processes (torchrun and accelerate launch) with `--check`,
single-process runs in-process, and bad input that must fail before any work and leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers_dist_attn.cli import _staged_outputs, main
from diffusers_dist_attn.pipelines.wan import build_tiny_pipeline

BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def _launch(launcher: list[str], args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, "-m", "diffusers_dist_attn", "generate", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def _gif_frames(path: Path) -> int:
    with Image.open(path) as image:
        return image.n_frames


def _gates(path: Path, dim: int = 48, layers: int = 2, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        tensors[f"blocks.{i}.to_gate_compress.weight"] = torch.randn(dim, dim, generator=g) * 0.3
        tensors[f"blocks.{i}.to_gate_compress.bias"] = torch.randn(dim, generator=g) * 0.3
    save_file(tensors, path)
    return path


@pytest.mark.slow
def test_generate_two_processes_torchrun_check(tmp_path):
    out = tmp_path / "out"
    proc = _launch(TORCHRUN, ["--output-dir", str(out), "--check", "--format", "gif"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "wan-dense-sp2.json").read_text())
    assert report["world_size"] == 2 and report["sp"] == 2 and report["attention"] == "dense"
    assert report["check"]["reference"].startswith("stock diffusers")
    assert report["check"]["max_abs_diff"] <= 1e-5  # decoded video
    assert report["check"]["max_abs_diff_latents"] <= 1e-5  # final latents, before the VAE
    assert len(report["step_times_s"]) == report["steps"] == 4
    assert len(report["transformer_forward_ms"]) == 8  # 4 steps x (cond + uncond)
    assert len(report["peak_memory_per_rank"]) == 2
    assert _gif_frames(out / "wan-dense-sp2.gif") == report["num_frames"] == 9
    assert sorted(p.name for p in out.iterdir()) == ["wan-dense-sp2.gif", "wan-dense-sp2.json"]
    assert "--check max abs diff" in proc.stdout and proc.stdout.count("wrote ") == 1  # rank 0 only


@pytest.mark.slow
def test_generate_two_processes_accelerate_vsa_with_gates(tmp_path):
    out = tmp_path / "out"
    gates = _gates(tmp_path / "gates.safetensors")
    proc = _launch(ACCELERATE, ["--output-dir", str(out), "--check", "--attention", "vsa", "--sparsity", "0.5",
                                "--dense-steps", "1", "--gate-checkpoint", str(gates), "--height", "128",
                                "--width", "128", "--num-frames", "17", "--steps", "3", "--name", "v"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "v.json").read_text())
    assert report["world_size"] == 2 and report["sp"] == 2
    assert report["sparsity"] == 0.5 and report["dense_steps"] == 1
    assert report["gate_checkpoints"]["transformer"] == {"used": 4, "unused": 0, "missing_blocks": []}
    assert report["check"]["reference"].startswith("vsa at P=1")
    assert report["check"]["max_abs_diff"] <= 1e-5 and report["check"]["max_abs_diff_latents"] <= 1e-5


@pytest.mark.slow
def test_generate_two_processes_rejects_head_count(tmp_path):
    """A model with fewer heads than the SP degree fails before loading weights, naming what works."""
    model = tmp_path / "one-head"
    build_tiny_pipeline(num_attention_heads=1, attention_head_dim=48).save_pretrained(model)
    out = tmp_path / "out"
    proc = _launch(TORCHRUN, ["--model", str(model), "--output-dir", str(out)], timeout=120)
    assert proc.returncode != 0
    assert "1 attention heads cannot be split over a sequence-parallel degree of 2" in proc.stderr
    assert not out.exists()


def test_generate_local_folder_dense_local_in_process(tmp_path):
    model = tmp_path / "tiny-wan"
    build_tiny_pipeline(seed=5).save_pretrained(model)
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(model), "--attention", "dense-local", "--dtype", "fp32", "--steps", "2",
               "--height", "32", "--width", "32", "--num-frames", "5", "--output-dir", str(out), "--check",
               "--format", "png"])
    assert rc == 0
    report = json.loads((out / "wan-dense-local-sp1.json").read_text())
    assert report["model"] == str(model) and report["world_size"] == 1
    assert report["check"]["max_abs_diff"] <= 1e-5
    assert len(list((out / "wan-dense-local-sp1").glob("frame_*.png"))) == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention", "vsa", "--sparsity", "1.0"], r"--sparsity must be in [0, 1)"),
        (["--attention", "vsa", "--sparsity", "-0.2"], r"--sparsity must be in [0, 1)"),
        (["--sparsity", "0.5"], "need --attention vsa"),
        (["--model", "{tmp}"], "no readable model_index.json; not a diffusers pipeline folder"),
        (["--model", "{tmp}/missing"], "not a directory"),
        (["--attention", "vsa", "--gate-checkpoint", "{bad_gates}"],
         "gate key 'blocks.0.to_gate_compress.bias' has shape (40,) but the model's "
         "blocks.0.attn1.to_gate_compress.bias has shape (48,)"),
        (["--attention", "vsa", "--gate-checkpoint", "{tmp}/none.safetensors"], "no such file or folder"),
        (["--sp", "2"], "sp=2 must be a positive divisor of the world size 1"),
    ],
)
def test_generate_bad_input_fails_cleanly(tmp_path, capsys, args, message):
    bad_gates = _gates(tmp_path / "bad.safetensors", dim=40)
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path, bad_gates=bad_gates) for a in args]
    assert main(["generate", "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "diffusers-dist-attn: error:" in err and message in err, err
    assert not out.exists() or not any(out.iterdir())


def test_unknown_attention_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--attention", "flash"])
    assert exc.value.code == 2
    assert "invalid choice: 'flash'" in capsys.readouterr().err


def test_failed_write_leaves_nothing(tmp_path):
    final = [tmp_path / "video.gif", tmp_path / "report.json"]
    with pytest.raises(RuntimeError), _staged_outputs(final) as staged:
        staged[0].write_bytes(b"partial video")
        raise RuntimeError("crash between writing the video and the report")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("diffusers-dist-attn", path=str(BIN)) is None, reason="package not installed")
def test_console_script_is_installed():
    proc = subprocess.run([str(BIN / "diffusers-dist-attn"), "generate", "--help"], capture_output=True, text=True,
                          env=_env(), timeout=60)
    assert proc.returncode == 0 and "--attention {stock,dense,dense-local,vsa}" in proc.stdout


@pytest.mark.slow
def test_generate_data_parallel_replicas_write_their_own_seeds(tmp_path):
    """`--sp 1` on 2 processes: 2 data-parallel replicas, seeds 0 and 1, one video + report each."""
    out = tmp_path / "out"
    proc = _launch(TORCHRUN, ["--output-dir", str(out), "--sp", "1", "--steps", "2", "--height", "32", "--width", "32",
                              "--num-frames", "5", "--check", "--format", "gif"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((out / f"wan-dense-sp1-seed{s}.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in reports] == [0, 1] and all(r["dp"] == 2 and r["sp"] == 1 for r in reports)
    assert all(r["check"]["max_abs_diff"] <= 1e-5 for r in reports)
    assert (out / "wan-dense-sp1-seed0.gif").read_bytes() != (out / "wan-dense-sp1-seed1.gif").read_bytes()


@pytest.mark.slow
def test_generate_four_processes_hybrid_ring_check(tmp_path):
    """`--ring 2` on 4 processes: Ulysses 2 x ring 2 over the embedded tiny Wan equals one process."""
    out = tmp_path / "out"
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "4"]
    proc = _launch(launcher, ["--output-dir", str(out), "--check", "--ring", "2", "--steps", "2", "--name", "r"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "r.json").read_text())
    assert report["world_size"] == 4 and report["sp"] == 4 and report["ulysses_x_ring"] == [2, 2]
    assert report["check"]["max_abs_diff"] <= 1e-5 and report["check"]["max_abs_diff_latents"] <= 1e-5


def test_ring_needs_dense_attention(capsys):
    from diffusers_dist_attn.cli import main

    assert main(["generate", "--attention", "vsa", "--ring", "2"]) == 2
    assert "--ring needs --attention dense" in capsys.readouterr().err
