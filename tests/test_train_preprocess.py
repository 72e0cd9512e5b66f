"""`diffusers-dist-attn preprocess`: videos + captions -> samples that `train` reads; resumable; bad videos."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open

from diffusers_dist_attn.cli import main


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _gif(path: Path, frames: int = 10, caption: str | None = "a red car drives in the park") -> None:
    rng = np.random.default_rng(len(path.name))
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=60, loop=0)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_preprocess_then_train(tmp_path):
    videos, samples = tmp_path / "videos", tmp_path / "samples"
    videos.mkdir()
    _gif(videos / "a.gif")
    _gif(videos / "b.gif")
    (videos / "c.mp4").write_bytes(b"not a video")
    (videos / "c.txt").write_text("a cat")
    size = ["--height", "32", "--width", "32", "--no-progress"]
    code, _, err = _run(["preprocess", "--videos", str(videos), "--output-dir", str(samples), *size])
    assert code == 2 and err.count("\n") == 1 and "c.mp4: cannot be read" in err
    assert sorted(p.name for p in samples.iterdir()) == ["a.safetensors", "b.safetensors"]  # finished ones kept
    (videos / "c.mp4").unlink()
    (videos / "c.txt").unlink()
    _gif(videos / "c.gif", caption=None)
    code, _, err = _run(["preprocess", "--videos", str(videos), "--output-dir", str(samples), *size])
    assert code == 2 and "c.gif: no caption file c.txt" in err
    (videos / "c.txt").write_text("a cat")
    before = (samples / "a.safetensors").stat().st_mtime_ns
    code, out, err = _run(["preprocess", "--videos", str(videos), "--output-dir", str(samples), *size])
    assert code == 0, err
    assert "wrote 1 samples" in out and "2 existed" in out  # resumable: done files skipped
    assert (samples / "a.safetensors").stat().st_mtime_ns == before
    with safe_open(str(samples / "a.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
        assert f.metadata()["caption"] == "a red car drives in the park"
    assert shapes["latents"] == [16, 3, 4, 4] and shapes["prompt_embeds"][1] == 32
    assert shapes["prompt_mask"] == shapes["prompt_embeds"][:1]
    code, _, err = _run(["train", "--data", str(samples), "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                         "--batch-size", "3", "--no-progress", "--no-plot", "--text-length", "16"])
    assert code == 0, err


def test_preprocess_refuses_too_short_video(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    _gif(videos / "short.gif", frames=4)
    code, _, err = _run(["preprocess", "--videos", str(videos), "--output-dir", str(tmp_path / "s"), "--height", "32",
                         "--width", "32", "--no-progress"])
    assert code == 2 and "short.gif: 4 frames" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").iterdir())
