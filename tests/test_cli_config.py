"""`diffusers-dist-attn` options: the frozen `RunConfig`, `--help` / `--version`, frame-count and size rules,
`--log-level`, an explicit `--vsa-implementation` that cannot run here, `build-kernels --dry-run`."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest
import torch
from PIL import Image

import diffusers_dist_attn
from diffusers_dist_attn.cli import RunConfig, build_parser, generate, main

SMALL = ["--height", "32", "--width", "32", "--num-frames", "5", "--steps", "1", "--format", "gif"]


def test_run_config_is_frozen_and_the_namespace_is_left_alone(tmp_path):
    """The parsed arguments are read once into a frozen RunConfig (defaults filled there); nothing is written back
    onto the argparse namespace, before or after a whole run."""
    out = tmp_path / "out"
    args = build_parser().parse_args(["generate", "--output-dir", str(out), "--attention", "vsa", *SMALL])
    before = dict(vars(args))
    config = RunConfig.from_args(args)
    assert config.sparsity == 0.9 and config.prompt == "a red car drives in the park under a blue sky"
    assert config.height == 32 and config.num_frames == 5 and config.steps == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.height = 64  # type: ignore[misc]
    report = generate(config)
    assert vars(args) == before
    assert report["sparsity"] == 0.9 and report["num_frames"] == 5
    assert (out / "wan-vsa-sp1.gif").exists() and (out / "wan-vsa-sp1.json").exists()


def _option_help(text: str) -> dict[str, str]:
    """`--option` -> its help text, from argparse's formatted help."""
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    return {re.match(r"(-[-\w]+)", b.strip()).group(1).split(",")[0]: " ".join(b.split()) for b in blocks if b.strip()}


def test_help_states_each_default_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping inside "hunyuan-video"
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    options = _option_help(capsys.readouterr().out)
    value_options = [o for o, text in options.items() if re.search(rf"{o} [A-Z_{{]", text)]
    assert len(value_options) >= 20, options.keys()
    for option in value_options:
        assert options[option].count("default") == 1, (option, options[option])
    assert "(default: None)" not in " ".join(options.values())
    expected = {"--height": "default: wan: 64; hunyuan-video: 32", "--width": "default: wan: 96; hunyuan-video: 32",
                "--num-frames": "default: wan: 9; hunyuan-video: 9", "--seed": "default: 0", "--fps": "default: 16",
                "--output-dir": "default: outputs", "--steps": "default: wan: 4; hunyuan-video: 2",
                "--log-level": "default: warning", "--attention": "default: dense", "--ring": "default: 1"}
    for option, text in expected.items():
        assert text in options[option], (option, options[option])


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffusers-dist-attn {diffusers_dist_attn.__version__}"


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--num-frames", "many"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-frames: invalid int value: 'many'" in err, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-frames", "2"], "--num-frames 2: wan decodes 4k+1 frames (VAE temporal compression 4); "
                                "nearest valid: 1 or 5"),
        (["--num-frames", "80"], "nearest valid: 77 or 81"),
        (["--pipeline", "hunyuan-video", "--num-frames", "10"], "--num-frames 10: hunyuan-video decodes 4k+1 frames "
                                                                "(VAE temporal compression 4); nearest valid: 9 or 13"),
        (["--height", "40"], "--height 40: wan needs a multiple of 16; nearest valid: 32 or 48"),
        (["--pipeline", "hunyuan-video", "--width", "8"], "--width 8: hunyuan-video needs a multiple of 16; "
                                                          "nearest valid: 16"),
    ],
)
def test_frame_count_and_size_rules_fail_up_front(tmp_path, capsys, args, message):
    """Counts the VAE cannot decode exactly (today: 2 frames asked, 1 written, 2 reported) fail before any work."""
    out = tmp_path / "out"
    assert main(["generate", "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_frame_rule_of_a_local_model_comes_from_its_vae(tmp_path, capsys):
    """A folder whose VAE compresses time 8x: 9 frames (fine for the default VAE) is refused, 17 and 25 named."""
    from diffusers_dist_attn.pipelines import check_video_size, wan

    vae = tmp_path / "m" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "scale_factor_temporal": 8}))
    assert wan.temporal_compression(tmp_path / "m") == 8 and wan.temporal_compression(None) == 4
    check_video_size(wan, 32, 32, 17, tmp_path / "m")
    with pytest.raises(ValueError, match=r"decodes 8k\+1 frames .* nearest valid: 9 or 17"):
        check_video_size(wan, 32, 32, 10, tmp_path / "m")


@pytest.fixture
def _restore_logging():
    import diffusers.utils.logging as diffusers_logging

    package = logging.getLogger("diffusers_dist_attn")
    level, verbosity = package.level, diffusers_logging.get_verbosity()
    yield
    package.setLevel(level)
    diffusers_logging.set_verbosity(verbosity)


def test_log_level_sets_this_package_and_diffusers(tmp_path, capsys, _restore_logging):
    import diffusers.utils.logging as diffusers_logging

    out = tmp_path / "out"
    assert main(["generate", "--output-dir", str(out), "--log-level", "info", *SMALL]) == 0
    assert diffusers_logging.get_verbosity() == logging.INFO
    assert logging.getLogger("diffusers_dist_attn").getEffectiveLevel() == logging.INFO
    assert "[rank 0] INFO diffusers_dist_attn.cli: set-up: rank 0 of 1" in capsys.readouterr().err

    assert main(["generate", "--output-dir", str(out), "--name", "quiet", "--log-level", "error", *SMALL]) == 0
    assert diffusers_logging.get_verbosity() == logging.ERROR
    assert logging.getLogger("diffusers_dist_attn").getEffectiveLevel() == logging.ERROR
    assert "INFO" not in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine's refusal")
def test_explicit_vsa_implementation_that_cannot_run_is_an_error(tmp_path, capsys):
    """Today: a warning in the middle of the progress bar and a run on another kernel; now exit 2 before work."""
    out = tmp_path / "out"
    rc = main(["generate", "--output-dir", str(out), "--attention", "vsa", "--vsa-implementation", "triton", *SMALL])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--vsa-implementation triton cannot run on cpu here (available: torch)" in err
    assert not out.exists()


def test_build_kernels_dry_run(tmp_path, monkeypatch, capsys):
    """Prints the sources and the build folder (under DIFFUSERS_DIST_ATTN_CACHE) and, on this CPU machine, why it
    could not build; compiles and creates nothing; exit 0."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSERS_DIST_ATTN_CACHE", str(cache))
    assert main(["build-kernels", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  \S+vsa_fwd_sm90\.cu$", out, re.M) and re.search(r"^  \S+vsa_binding\.cpp$", out, re.M), out
    assert re.search(rf"^would compile in: {re.escape(str(cache))}", out, re.M), out
    assert "arch: 9.0a" in out
    if torch.version.cuda is None:
        assert "cannot build here: " in out
    assert not cache.exists()


def test_report_records_the_backends_that_ran(tmp_path):
    """`backends` from the registry's selection report: at least the dense backend after a dense run (this needs
    `attention.selection_report()`)."""
    out = tmp_path / "out"
    assert main(["generate", "--output-dir", str(out), *SMALL]) == 0
    report = json.loads((out / "wan-dense-sp1.json").read_text())
    assert "dense" in report["backends"], report["backends"]
    with Image.open(out / "wan-dense-sp1.gif") as image:
        assert image.n_frames == report["num_frames"] == 5
