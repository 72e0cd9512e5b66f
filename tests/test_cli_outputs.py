"""What `diffusers-dist-attn generate` writes and never destroys: mp4 / gif through diffusers' exporters, existing
paths refused unless `--overwrite` (files only), the output folder checked before any model is loaded, staged
writes that survive a kill, stale temporary files removed, internal errors logged to a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from diffusers_dist_attn.cli import _temp_path, main, remove_stale_temp_files

SMALL = ["--height", "32", "--width", "32", "--num-frames", "5", "--steps", "1"]


def _gif_frames(path: Path) -> int:
    with Image.open(path) as image:
        return image.n_frames


def _mp4_frames(path: Path) -> int:
    import imageio

    with imageio.get_reader(path, format="FFMPEG") as reader:
        return sum(1 for _ in reader)


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("diffusers-dist-attn: error: "), err
    return lines[0]


def _mp4_or_skip() -> None:
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        pytest.skip("mp4 needs imageio + imageio-ffmpeg (pip install 'diffusers_dist_attn[video]')")


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_video_formats_written_completely(tmp_path, fmt):
    """Today mp4 fails: the staged name `.x.mp4.tmp-PID` hides the suffix ffmpeg picks the format from."""
    if fmt == "mp4":
        _mp4_or_skip()
    out = tmp_path / "out"
    assert main(["generate", "--output-dir", str(out), "--format", fmt, "--attention", "dense-local", *SMALL]) == 0
    report = json.loads((out / "wan-dense-local-sp1.json").read_text())
    video = out / f"wan-dense-local-sp1.{fmt}"
    frames = _mp4_frames(video) if fmt == "mp4" else _gif_frames(video)
    assert frames == report["num_frames"] == 5 and report["format"] == fmt and report["video"] == str(video)
    assert sorted(p.name for p in out.iterdir()) == sorted([video.name, "wan-dense-local-sp1.json"])


def test_temp_names_keep_the_suffix():
    assert _temp_path(Path("d/wan-dense-sp1.mp4"), pid=42) == Path("d/.wan-dense-sp1.tmp-42.mp4")
    assert _temp_path(Path("d/wan-dense-sp1.json"), pid=42) == Path("d/.wan-dense-sp1.tmp-42.json")
    assert _temp_path(Path("d/run.v2"), pid=42) == Path("d/.run.v2.tmp-42")  # a png folder: no suffix to keep


def test_existing_folder_of_the_name_is_never_deleted(tmp_path, capsys):
    """Today `--name X --format png` deletes an existing folder X; now exit 2 naming it, even with --overwrite."""
    out = tmp_path / "out"
    mine = out / "X"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    assert main(["generate", "--output-dir", str(out), "--name", "X", "--format", "png", *SMALL]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{mine} already exists" in line and "--name" in line
    assert main(["generate", "--output-dir", str(out), "--name", "X", "--format", "png", "--overwrite", *SMALL]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(mine) in line and "never a folder" in line and "--name" in line
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["X"]


def test_existing_files_are_replaced_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "v.gif").write_bytes(b"my own gif")
    args = ["generate", "--output-dir", str(out), "--name", "v", "--format", "gif", *SMALL]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{out / 'v.gif'} already exists; pass --overwrite to replace it or another --name" in line
    assert (out / "v.gif").read_bytes() == b"my own gif" and not (out / "v.json").exists()

    (out / "v.json").mkdir()  # a folder where the report would go: never replaced
    assert main([*args, "--overwrite"]) == 2
    assert "v.json exists and is not a regular file" in _one_error_line(capsys.readouterr().err)
    assert (out / "v.gif").read_bytes() == b"my own gif"

    (out / "v.json").rmdir()
    (out / "v.json").write_text("{}")
    assert main([*args, "--overwrite"]) == 0
    assert _gif_frames(out / "v.gif") == json.loads((out / "v.json").read_text())["num_frames"] == 5


def test_output_dir_is_checked_before_the_model(tmp_path, capsys):
    """An output "folder" that is a file fails first (today: after the whole generation, with a traceback) --
    before even the --model folder check."""
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["generate", "--output-dir", str(a_file), "--model", str(not_a_model), *SMALL]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--output-dir {a_file} is not a directory" in line
    assert main(["generate", "--output-dir", str(a_file / "sub"), *SMALL]) == 2
    assert f"cannot be created: {a_file} is not a directory" in _one_error_line(capsys.readouterr().err)
    assert a_file.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only folders")
def test_unwritable_output_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(["generate", "--output-dir", str(locked / "out"), *SMALL]) == 2
        assert f"--output-dir {locked / 'out'} is not writable" in _one_error_line(capsys.readouterr().err)
    finally:
        locked.chmod(0o700)


def test_a_failed_run_leaves_no_folder_it_created(tmp_path, capsys):
    """A model folder that is no pipeline is found after the output folder was created: the folder goes again."""
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    out = tmp_path / "a" / "b"
    assert main(["generate", "--output-dir", str(out), "--model", str(not_a_model), *SMALL]) == 2
    assert "no readable model_index.json" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "a").exists()


def test_stale_temp_files_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead, alive = _dead_pid(), os.getppid()
    stale = [out / f".wan-dense-sp1.tmp-{dead}.gif", out / f".wan-dense-sp1.tmp-{dead}.json",
             out / f".other.tmp-{dead}.mp4"]
    stale_frames = out / f".frames.tmp-{dead}"
    kept = [out / f".wan-dense-sp1.tmp-{alive}.gif", out / f"keep.tmp-{dead}.gif", out / f".notes.tmp-{dead}.txt",
            out / ".hidden"]
    for path in stale + kept:
        path.write_bytes(b"x")
    stale_frames.mkdir()
    (stale_frames / "frame_0000.png").write_bytes(b"x")
    not_ours = out / f".mine.tmp-{dead}"  # a folder of that pattern holding something else: not ours, kept
    not_ours.mkdir()
    (not_ours / "data.bin").write_bytes(b"x")

    assert main(["generate", "--output-dir", str(out), "--format", "gif", "--name", "new", *SMALL]) == 0
    assert not any(p.exists() for p in [*stale, stale_frames])
    assert all(p.exists() for p in [*kept, not_ours / "data.bin"])
    assert (out / "new.gif").exists() and (out / "new.json").exists()


def test_kill_before_the_rename_leaves_the_old_state(tmp_path):
    """SIGKILL after the new video and report are written under their temporary names, before they are renamed:
    the previous video and report are untouched; the leftovers are removed by the next run's clean-up."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "v.mp4").write_bytes(b"old video")
    (out / "v.json").write_text('{"old": true}')
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from diffusers_dist_attn.cli import _staged_outputs
        out = Path({str(out)!r})
        with _staged_outputs([out / "v.mp4", out / "v.json"], overwrite=True) as (video, report):
            video.write_bytes(b"new video")
            report.write_text('{{"new": true}}')
            print(video.name, report.name, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -9, stderr[-2000:]
    names = stdout.split()
    assert names == [f".v.tmp-{proc.pid}.mp4", f".v.tmp-{proc.pid}.json"]  # the real suffix stays last
    assert (out / "v.mp4").read_bytes() == b"old video" and (out / "v.json").read_text() == '{"old": true}'
    assert sorted(remove_stale_temp_files(out)) == sorted(out / n for n in names)
    assert sorted(p.name for p in out.iterdir()) == ["v.json", "v.mp4"]


def test_internal_error_prints_one_line_and_logs_the_traceback(tmp_path, capsys, monkeypatch):
    """A failure inside the pipeline is not the user's: exit 1, one line naming a log file with the traceback,
    nothing written, the output folder this run created removed again."""
    from diffusers import WanPipeline

    def broken_call(self, *args, **kwargs):  # a fault injected into the real pipeline (nothing else fails here)
        raise RuntimeError("injected failure in the denoising loop")

    monkeypatch.setattr(WanPipeline, "__call__", broken_call)
    out = tmp_path / "out"
    assert main(["generate", "--output-dir", str(out), "--format", "gif", *SMALL]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffusers-dist-attn: internal error (rank 0): RuntimeError: "
                                                   "injected failure in the denoising loop; full traceback in "), lines
    log = Path(lines[0].rsplit("full traceback in ", 1)[1])
    try:
        text = log.read_text()
        assert "Traceback (most recent call last)" in text and "broken_call" in text
    finally:
        log.unlink()
    assert not out.exists()
