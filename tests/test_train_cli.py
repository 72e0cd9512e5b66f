"""`diffusers-dist-attn train` command line: launchers, outputs, and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed
from safetensors.torch import save_file

from diffusers_dist_attn.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--no-plot", "--max-steps", "2", "--synthetic-grid", "3,8,8", "--text-length", "16"]


def _run_main(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _main_on_rank(rank: int, world: int, argv: list[str]) -> tuple[int, str]:
    return _run_main(argv)


def _sample(path: Path, latents=(16, 3, 8, 8), embeds=(7, 32), mask: int | None = 7) -> Path:
    tensors = {"latents": torch.randn(latents), "prompt_embeds": torch.randn(embeds)}
    if mask is not None:
        tensors["prompt_mask"] = torch.ones(mask)
    save_file(tensors, str(path))
    return path


def _one_error_line(text: str, *needles: str) -> None:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("diffusers-dist-attn: error: "), text
    for needle in needles:
        assert needle in lines[0], text


def test_data_folder_trains_and_writes_outputs(tmp_path):
    """A folder of samples (masks, different text lengths): gates, checkpoint, JSON log; the log has loss, step
    time, tokens/s and per-rank peak memory."""
    data = tmp_path / "data"
    data.mkdir()
    _sample(data / "a.safetensors", embeds=(7, 32), mask=7)
    _sample(data / "b.safetensors", embeds=(11, 32), mask=None)
    out = tmp_path / "out"
    code, err = _run_main(["train", "--data", str(data), "--output-dir", str(out), "--batch-size", "2", *FAST])
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"checkpoint-2", "gates.safetensors", "train_log.json"}
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == {
        "trainable.safetensors", "gates.safetensors", "optimizer.pt", "state.json"}
    log = json.loads((out / "train_log.json").read_text())
    step = log["steps"][0]
    assert step["loss"] > 0 and step["step_time_s"] > 0 and step["tokens_per_s"] > 0
    assert step["per_rank"][0]["peak_memory_mb"] > 0


@pytest.mark.slow
def test_torchrun_sp2_and_python_m(tmp_path):
    """The real launchers: `torchrun ... -m diffusers_dist_attn train` (SP = 2) and `python -m` agree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["-m", "diffusers_dist_attn", "train", "--synthetic", "2", *FAST]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *common, "--output-dir", str(tmp_path / "two"), "--sp", "2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *common, "--output-dir", str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    losses = [[r["loss"] for r in json.loads((tmp_path / d / "train_log.json").read_text())["steps"]]
              for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("case", ["missing-folder", "empty-folder", "patch", "channels", "text-dim", "corrupt",
                                  "mask", "gates-dense", "model-missing", "batch-too-large", "bad-sparsity"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    argv = ["train", "--output-dir", str(tmp_path / "out"), *FAST]
    needle = ""
    if case == "missing-folder":
        argv += ["--data", str(tmp_path / "nope")]
        needle = "no such folder"
    elif case == "empty-folder":
        argv += ["--data", str(data)]
        needle = "no *.safetensors"
    elif case == "patch":
        _sample(data / "odd.safetensors", latents=(16, 3, 9, 8))
        argv += ["--data", str(data)]
        needle = "odd.safetensors: latent grid [3, 9, 8] does not fit the model's patch size"
    elif case == "channels":
        _sample(data / "c.safetensors", latents=(4, 3, 8, 8))
        argv += ["--data", str(data)]
        needle = "4 channels"
    elif case == "text-dim":
        _sample(data / "t.safetensors", embeds=(7, 64))
        argv += ["--data", str(data)]
        needle = "text_dim"
    elif case == "corrupt":
        (data / "broken.safetensors").write_bytes(b"not a safetensors file")
        argv += ["--data", str(data)]
        needle = "broken.safetensors: not a readable safetensors file"
    elif case == "mask":
        _sample(data / "m.safetensors", mask=5)
        argv += ["--data", str(data)]
        needle = "prompt_mask"
    elif case == "gates-dense":
        argv += ["--synthetic", "2", "--attention", "dense"]
        needle = "--train gates"
    elif case == "model-missing":
        argv += ["--synthetic", "2", "--model", str(tmp_path / "no-model")]
        needle = "not a directory"
    elif case == "batch-too-large":
        argv += ["--synthetic", "2", "--batch-size", "3"]
        needle = "larger than the dataset"
    elif case == "bad-sparsity":
        argv += ["--synthetic", "2", "--sparsity", "1.0"]
        needle = "--sparsity 1.0"
    code, err = _run_main(argv)
    assert code == 2
    _one_error_line(err, needle)
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    code, err = _run_main(["train", "--synthetic", "2", "--output-dir", str(out), *FAST])
    assert code == 2
    _one_error_line(err, "is not empty")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    code, err = _run_main(["train", "--synthetic", "2", "--output-dir", str(out), "--overwrite", *FAST])
    assert code == 0, err
    assert (out / "mine.txt").read_text() == "user data" and (out / "gates.safetensors").is_file()


def test_python_m_bad_input_is_one_line(tmp_path):
    """The real process: stderr is exactly one line, exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "diffusers_dist_attn", "train", "--data", str(tmp_path / "nope"),
                           "--output-dir", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "no such folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sp-divides", "batch-dp", "tokens-sp"])
def test_bad_input_on_two_ranks_every_rank_exits_2(tmp_path, case):
    """World 2: an SP degree that does not divide it, a batch that does not split over 2 DP groups, a sample with
    fewer tokens than SP ranks: every rank returns 2, rank 0 prints one line, nothing is written."""
    argv = ["train", "--output-dir", str(tmp_path / "out"), *FAST]
    if case == "sp-divides":
        argv += ["--synthetic", "2", "--sp", "3"]
        needle = "sp=3 must be a positive divisor of the world size 2"
    elif case == "batch-dp":
        argv += ["--synthetic", "3", "--sp", "1", "--batch-size", "3"]
        needle = "--batch-size 3 does not divide over the 2 data-parallel groups"
    else:
        argv += ["--synthetic", "2", "--sp", "2", "--synthetic-grid", "1,2,2", "--attention", "dense", "--train", "full"]
        needle = "1 tokens cannot be split over --sp 2 ranks"
    results = run_distributed(2, _main_on_rank, argv, sp=1)
    assert [code for code, _ in results] == [2, 2]
    _one_error_line(results[0][1], needle)
    assert results[1][1].strip() == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_run_leaves_only_complete_checkpoints_and_resumes(tmp_path):
    """SIGKILL while checkpoints are written every step: every `checkpoint-N` is complete, temp folders are not
    taken for checkpoints, and `--resume` continues from the latest one (removing the temps)."""
    import signal
    import time

    out = tmp_path / "out"
    argv = ["-m", "diffusers_dist_attn", "train", "--synthetic", "2", "--synthetic-grid", "3,8,8", "--no-progress",
            "--no-plot", "--text-length", "16", "--train", "lora,gates", "--lora-rank", "2", "--save-every", "1", "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, *argv, "--max-steps", "100000"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (out / "checkpoint-5").exists():
            time.sleep(0.01)
        time.sleep(0.137)  # somewhere inside a later write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert done and done[0] == 1
    for step in done:
        folder = out / f"checkpoint-{step}"
        assert json.loads((folder / "state.json").read_text())["step"] == step
        assert {p.name for p in folder.iterdir()} == {"trainable.safetensors", "gates.safetensors", "optimizer.pt",
                                                     "pytorch_lora_weights.safetensors", "state.json"}
    last = done[-1]
    resumed = subprocess.run([sys.executable, *argv, "--max-steps", str(last + 2), "--resume"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert [r["step"] for r in log["steps"]] == list(range(1, last + 3))
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    from diffusers_dist_attn.atomic import atomic_dir
    from diffusers_dist_attn.training.checkpoint import latest_checkpoint

    def write(folder: Path) -> None:
        (folder / "state.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "checkpoint-7", write)
    assert list(tmp_path.iterdir()) == [] and latest_checkpoint(tmp_path) is None


def test_a_folder_replace_killed_between_its_renames_is_rolled_back(tmp_path):
    """`publish(replace=True)` renames the old folder away, then the new one in; a process killed in between leaves
    only temporaries. The next stale-temp cleanup renames the old copy back instead of deleting both."""
    from diffusers_dist_attn.atomic import remove_stale_temps, temp_path

    dead_pid = 2**22 + 12345  # above Linux's pid_max default range: not a running process
    old = temp_path(tmp_path / "transformer.old", dead_pid, keep_suffix=False)
    new = temp_path(tmp_path / "transformer", dead_pid, keep_suffix=False)
    for folder, text in ((old, "old weights"), (new, "new weights")):
        folder.mkdir()
        (folder / "w.safetensors").write_text(text)
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer"]
    assert (tmp_path / "transformer" / "w.safetensors").read_text() == "old weights"


def test_output_dir_holding_a_model_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, err = _run_main(["train", "--synthetic", "2", "--output-dir", str(model), *FAST, *extra])
        assert code == 2
        _one_error_line(err, "holds a diffusers model")
    assert [p.name for p in model.iterdir()] == ["model_index.json"]


def test_resume_without_a_checkpoint_still_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    code, err = _run_main(["train", "--synthetic", "2", "--output-dir", str(out), "--resume", *FAST])
    assert code == 2
    _one_error_line(err, "it has no checkpoint to resume")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
