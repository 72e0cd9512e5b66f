"""`diffusers-dist-attn generate` (also `python -m diffusers_dist_attn generate`): text-to-video with this package's
attention, sequence-parallel over however many processes the launcher started.

    diffusers-dist-attn generate                                    # one process, embedded tiny Wan, CPU is fine
    torchrun --nproc_per_node 2 -m diffusers_dist_attn generate --check
    accelerate launch --multi_gpu --num_processes 2 -m diffusers_dist_attn generate --check     # gloo on CPU hosts
    accelerate launch --num_processes 4 -m diffusers_dist_attn generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
        --height 480 --width 832 --num-frames 81 --attention vsa --sparsity 0.9 --gate-checkpoint ./vsa.safetensors

Rank and world size come from `torch.distributed` (torchrun / accelerate / single process). `--sp` defaults to
all processes; with fewer (`--sp 4` on 8 GPUs, or `stock` / `dense-local`, which do not shard) the data-parallel
replicas generate seeds `seed + dp_rank`. Every process of one SP group builds the same pipeline and latents;
global rank 0 shows the progress bar, SP rank 0 writes the video and the JSON report.

`generate` runs four steps around one frozen `RunConfig` (built and validated once from the parsed arguments):
set-up (process groups, model resolution, every input check, the output folder), run (build the pipeline, install
the attention, generate), check (`--check`: the single-process reference) and report (JSON + video).

Failure behaviour: bad input exits 2 with one line on stderr before any model is loaded; an internal error exits 1
with one line naming a log file that holds the traceback. Existing paths are never deleted or overwritten unless
`--overwrite` is given, and then only the two files this command writes (video and report; never a folder).
Outputs are written under temporary names in the output folder that keep the real suffix
(`.NAME.tmp-PID.mp4`), fsynced and renamed into place (video first, the report last), so a kill leaves each path
either as it was or complete; temporary files of killed runs are removed by the next run in the same folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import resource
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import attention, envs
from .atomic import remove_stale_temps, staged, temp_path

ATTENTIONS = ("stock", "dense", "dense-local", "vsa")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("auto", "mp4", "gif", "png")
PROG = "diffusers-dist-attn"

# Hugging Face Hub settings, read when `--model` names a Hub repository (not at import: huggingface_hub reads its
# own copies once at import, which a test or a wrapper setting the variables later would not see).
HF_HUB_OFFLINE = envs.Setting("HF_HUB_OFFLINE", "0", "1: use the local Hugging Face cache only, never the network")
HF_HUB_CACHE = envs.Setting("HF_HUB_CACHE", "", "Hugging Face cache folder (default: huggingface_hub's)")

__all__ = ["main", "build_parser", "generate", "RunConfig", "UsageError", "ATTENTIONS", "LOG_LEVELS"]

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad input (arguments, files, environment) found before or while setting up; exit status 2, one line.

    Raised alike on every rank (rank 0 prints it) unless `local` (then the rank that raised it prints it)."""

    local = False


class _LocalUsageError(UsageError):
    """A usage error seen by one rank only (e.g. a writer whose output name was taken meanwhile)."""

    local = True


@contextmanager
def _user_errors(prefix: str = "") -> Iterator[None]:
    """Within the block, `ValueError` / `FileNotFoundError` (raised by the adapters, `init_sequence_parallel`,
    `parallelize`, `load_gates` for bad input) become `UsageError`; anything else stays an internal error."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"{prefix}{_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`PROG generate: error: ... (see --help)`, exit 2) instead of usage + error."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _per_pipeline(key: str) -> str:
    """`wan: 64; hunyuan-video: 32` -- a default that comes from each pipeline adapter's `DEFAULTS`."""
    from .pipelines import PIPELINES, get_pipeline_module

    values = []
    for name in PIPELINES:
        try:
            value = get_pipeline_module(name).DEFAULTS[key]
        except (ValueError, KeyError, ImportError):  # an adapter not usable here: leave it out of the help text
            continue
        values.append(f"{name}: {value!r}" if isinstance(value, str) else f"{name}: {value}")
    return "; ".join(values)


def build_parser() -> argparse.ArgumentParser:
    """The `diffusers-dist-attn` parser. Every option's help states its real default once (`default: ...`)."""
    from . import __version__
    from .pipelines import PIPELINES

    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a video (sequence parallel across the launched processes)",
                         description=__doc__.split("\n\n")[0])
    gen.add_argument("--pipeline", choices=sorted(PIPELINES), default="wan", help="default: wan")
    gen.add_argument("--model", default=None,
                     help="local diffusers pipeline folder, or a Hugging Face Hub id (e.g. "
                          "Wan-AI/Wan2.1-T2V-1.3B-Diffusers; downloaded into the HF cache, or read from it when "
                          "HF_HUB_OFFLINE=1); default: the embedded tiny pipeline (random weights, offline)")
    gen.add_argument("--preset", default=None,
                     help="transformer preset of the embedded pipeline (wan: tiny, wan2.1-t2v-1.3b; "
                          "hunyuan-video: tiny, hunyuan-video), random weights; default: tiny")
    gen.add_argument("--attention", choices=ATTENTIONS, default="dense",
                     help="stock: diffusers' processors; dense-local: this package's dense kernel without sequence "
                          "parallelism; dense: Ulysses sequence parallelism; vsa: Video Sparse Attention + Ulysses; "
                          "default: dense")
    gen.add_argument("--sparsity", type=float, default=None,
                     help="VSA sparsity in [0, 1) (fraction of key blocks skipped); default: 0.9 with --attention vsa")
    gen.add_argument("--dense-steps", type=int, default=0,
                     help="VSA: dense attention for the first N steps; default: 0")
    gen.add_argument("--gate-checkpoint", default=None,
                     help="VSA: FastVideo-format to_gate_compress weights for `transformer` (file or folder); "
                          "default: none (zero-initialised gates)")
    gen.add_argument("--gate-checkpoint-2", default=None,
                     help="VSA: gate weights for `transformer_2` (Wan 2.2 A14B); default: none")
    gen.add_argument("--vsa-implementation", choices=("auto", "cuda", "triton", "torch"), default=None,
                     help="VSA kernel; an explicit choice that cannot run on this machine is an error; "
                          "default: auto (env DIFFUSERS_DIST_ATTN_VSA_IMPL, else the fastest available)")
    gen.add_argument("--sp", type=int, default=None, help="sequence-parallel degree; default: all processes")
    gen.add_argument("--ring", type=int, default=1,
                     help="ring degree of a hybrid ulysses x ring layout (dense attention; Ulysses = sp / ring); "
                          "default: 1")
    gen.add_argument("--prompt", default=None, help=f"default: {_per_pipeline('prompt')}")
    gen.add_argument("--negative-prompt", default=None, help=f"default: {_per_pipeline('negative_prompt')}")
    gen.add_argument("--height", type=int, default=None,
                     help=f"pixels, a multiple of 16; default: {_per_pipeline('height')}")
    gen.add_argument("--width", type=int, default=None,
                     help=f"pixels, a multiple of 16; default: {_per_pipeline('width')}")
    gen.add_argument("--num-frames", type=int, default=None,
                     help="frames, 4k+1 for both pipelines (VAE temporal compression 4: 1, 5, 9, ..., 81); "
                          f"default: {_per_pipeline('num_frames')}")
    gen.add_argument("--steps", type=int, default=None, help=f"denoising steps; default: {_per_pipeline('steps')}")
    gen.add_argument("--guidance-scale", type=float, default=None, help=f"default: {_per_pipeline('guidance_scale')}")
    gen.add_argument("--seed", type=int, default=0,
                     help="noise seed (data-parallel replica r uses seed + r; also the embedded weights); default: 0")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on CPU, bf16 on GPU")
    gen.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (fullgraph)")
    gen.add_argument("--cpu-offload", action="store_true", help="pipe.enable_model_cpu_offload() after parallelize")
    gen.add_argument("--output-dir", default="outputs", help="created if missing; default: outputs")
    gen.add_argument("--name", default=None, help="output file stem; default: <pipeline>-<attention>-sp<P>")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace an existing video / JSON report of the same name (files only, never a folder)")
    gen.add_argument("--format", choices=FORMATS, default="auto",
                     help="png: a folder of frames; default: auto (mp4 when imageio + imageio-ffmpeg are installed, "
                          "else gif)")
    gen.add_argument("--fps", type=int, default=16, help="frames per second of the mp4 / gif; default: 16")
    gen.add_argument("--check", action="store_true",
                     help="also run one process on rank 0 (stock diffusers processors; VSA: VSA at P=1) and report "
                          "the max abs difference of the videos")
    gen.add_argument("--log-level", choices=tuple(LOG_LEVELS), default="warning",
                     help="logging of this package and of diffusers; default: warning")
    kern = sub.add_parser("build-kernels", help="prebuild the compiled VSA kernel (sm_90a, opt-in) and print "
                                                "where it went or why it could not be built")
    kern.add_argument("--force", action="store_true", help="delete the cached build for these sources first")
    kern.add_argument("--no-gpu-check", action="store_true",
                      help="build even without an sm_90 GPU present (still needs CUDA torch and nvcc)")
    kern.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    kern.add_argument("--dry-run", action="store_true",
                      help="compile nothing: print the sources, the build folder and why a build could not run here")
    from .training.cli import add_parsers as add_training_parsers  # `train`, `preprocess`

    add_training_parsers(sub)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# RunConfig: the parsed arguments, defaults filled in and validated, once
# ---------------------------------------------------------------------------------------------------------------
_NAME_OK = re.compile(r"[^/\\\0]+")


@dataclass(frozen=True)
class RunConfig:
    """What one `generate` run does, fully resolved from the command line (no process state, no files touched).

    `sparsity` is None unless `attention == "vsa"`; `model` is the `--model` text as given (a folder or a Hub id).
    """

    pipeline: str
    model: str | None
    preset: str | None
    attention: str
    sparsity: float | None
    dense_steps: int
    gate_checkpoint: str | None
    gate_checkpoint_2: str | None
    vsa_implementation: str | None
    sp: int | None
    ring: int
    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float
    seed: int
    dtype: str | None
    compile: bool
    cpu_offload: bool
    output_dir: Path
    name: str | None
    overwrite: bool
    format: str
    fps: int
    check: bool
    log_level: str = "warning"

    @property
    def uses_sp(self) -> bool:
        """Whether the attention shards the sequence (dense, vsa) rather than running whole on each process."""
        return self.attention in ("dense", "vsa")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        """Defaults from the pipeline adapter, then every check that needs no process group, model or file write.
        Raises `UsageError` naming the option."""
        from .pipelines import check_video_size, get_pipeline_module

        with _user_errors():
            module = get_pipeline_module(args.pipeline)
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        for key in ("height", "width", "num_frames", "steps", "guidance_scale", "prompt", "negative_prompt"):
            if values[key] is None:
                values[key] = module.DEFAULTS[key]
        values["output_dir"] = Path(args.output_dir)
        if args.attention == "vsa":
            values["sparsity"] = 0.9 if args.sparsity is None else args.sparsity
            if not 0.0 <= values["sparsity"] < 1.0:
                raise UsageError(f"--sparsity must be in [0, 1) (fraction of key blocks skipped); got {args.sparsity}")
            if args.dense_steps < 0:
                raise UsageError(f"--dense-steps must be >= 0; got {args.dense_steps}")
        elif args.sparsity is not None or args.gate_checkpoint or args.gate_checkpoint_2 or args.dense_steps \
                or args.vsa_implementation:
            raise UsageError("--sparsity, --dense-steps, --gate-checkpoint and --vsa-implementation need "
                             "--attention vsa")
        for key in ("height", "width", "num_frames", "steps", "fps"):
            if values[key] < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be positive; got {values[key]}")
        for key in ("gate_checkpoint", "gate_checkpoint_2"):
            path = values[key]
            if path and not Path(path).exists():
                raise UsageError(f"--{key.replace('_', '-')} {path}: no such file or folder")
        if args.model and args.preset:
            raise UsageError("--preset applies to the embedded pipeline; it cannot be combined with --model")
        presets = getattr(module, "TRANSFORMER_PRESETS", None)
        if args.preset and presets is not None and args.preset not in presets:
            raise UsageError(f"--preset {args.preset}: unknown for --pipeline {args.pipeline}; "
                             f"known: {sorted(presets)}")
        if args.sp is not None and args.sp < 1:
            raise UsageError(f"--sp must be positive; got {args.sp}")
        if args.ring < 1:
            raise UsageError(f"--ring must be positive; got {args.ring}")
        if args.ring > 1 and args.attention != "dense":
            raise UsageError("--ring needs --attention dense (video sparse attention needs whole heads over the full "
                             "sequence; stock and dense-local do not shard)")
        if args.name is not None and (not _NAME_OK.fullmatch(args.name) or args.name in (".", "..")
                                      or args.name.startswith(".")):
            raise UsageError(f"--name {args.name!r}: must be a plain file name (no '/', not starting with '.')")
        # frame count / size rules with the pipeline's default VAE; set-up checks again with a --model's own VAE
        with _user_errors():
            check_video_size(module, values["height"], values["width"], values["num_frames"])
        return cls(**values)


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Per-step wall times (pipeline callback) and per-transformer-forward times (forward hooks)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[float] = []
        self.forwards: list[float] = []
        self._t0 = self._f0 = 0.0
        self._hooks: list = []

    def start(self) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def step_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        _sync(self.device)
        now = time.perf_counter()
        self.steps.append(now - self._t0)
        self._t0 = now
        return callback_kwargs

    def attach(self, modules: list[torch.nn.Module]) -> None:
        for module in modules:
            self._hooks.append(module.register_forward_pre_hook(self._pre))
            self._hooks.append(module.register_forward_hook(self._post))

    def _pre(self, module, args) -> None:
        _sync(self.device)
        self._f0 = time.perf_counter()

    def _post(self, module, args, output) -> None:
        _sync(self.device)
        self.forwards.append(time.perf_counter() - self._f0)

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _peak_memory(device: torch.device) -> dict[str, float]:
    peak = {"cpu_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        peak["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return peak


# ---------------------------------------------------------------------------------------------------------------
# Output files: checks before any work, staged writes, stale temporary files
# ---------------------------------------------------------------------------------------------------------------
_STAGED_SUFFIXES = (".mp4", ".gif", ".json")
# `.STEM.tmp-PID[.mp4|.gif|.json]`: the suffix stays last because imageio / ffmpeg / PIL pick the format from it
_FRAME_NAME = re.compile(r"frame_\d{4,}\.png")
_PROBE = "diffusers-dist-attn-probe"


def _temp_path(final: Path, pid: int | None = None) -> Path:
    """`dir/name.mp4` -> `dir/.name.tmp-PID.mp4`; a suffix other than this command's (a png folder) is not kept."""
    return temp_path(final, pid, keep_suffix=final.suffix in _STAGED_SUFFIXES)


def _mp4_available() -> bool:
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _video_format(requested: str) -> str:
    if requested == "mp4" and not _mp4_available():
        raise UsageError("--format mp4 needs imageio and imageio-ffmpeg (pip install 'diffusers_dist_attn[video]')")
    if requested == "auto":
        return "mp4" if _mp4_available() else "gif"
    return requested


def _write_video(frames, path: Path, fmt: str, fps: int) -> None:
    """`frames` float `[F, H, W, 3]` in [0, 1] -> `path` (a file; a folder of PNGs for `png`), through diffusers'
    own exporters; the format comes from `path`'s suffix, which the staged name keeps."""
    import numpy as np
    from diffusers.utils import export_to_gif, export_to_video
    from PIL import Image

    # uint8 PIL images: export_to_video scales float arrays by 255 without clipping or rounding
    images = [Image.fromarray(a) for a in (np.clip(frames, 0.0, 1.0) * 255).round().astype("uint8")]
    if fmt == "mp4":
        export_to_video(images, str(path), fps=fps)
    elif fmt == "gif":
        export_to_gif(images, str(path), fps=fps)
    elif fmt == "png":
        path.mkdir()
        for i, image in enumerate(images):
            image.save(path / f"frame_{i:04d}.png", format="PNG")
    else:
        raise ValueError(f"unknown video format {fmt!r}")


@contextmanager
def _staged_outputs(final_paths: list[Path], *, overwrite: bool = False) -> Iterator[list[Path]]:
    """Temporary paths next to `final_paths` (hidden, this command's suffix kept), published in order on success
    (`atomic.staged`: put the report last); without `overwrite` an existing final path is never replaced."""
    try:
        with staged(final_paths, replace=overwrite, keep_suffix=lambda p: p.suffix in _STAGED_SUFFIXES) as temps:
            yield temps
    except FileExistsError as exc:
        raise _LocalUsageError(f"{exc}: not replaced (pass --overwrite or another --name)") from None


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete this command's temporary outputs left in `folder` by processes that no longer run (killed runs):
    `.NAME.tmp-PID[.mp4|.gif|.json]` files, and `.NAME.tmp-PID` folders holding only `frame_NNNN.png`."""
    def frames_only(path: Path) -> bool:
        return all(_FRAME_NAME.fullmatch(p.name) and p.is_file() for p in path.iterdir())

    return remove_stale_temps(folder, suffixes=_STAGED_SUFFIXES, folder_ok=frames_only)


def _prepare_output_dir(out_dir: Path) -> list[Path]:
    """Make sure `out_dir` is a writable folder (creating it); returns the folders created here (outermost first)
    so a run that fails can remove them again. `UsageError` (one line, naming the path) otherwise."""
    missing = []
    probe_parent = out_dir
    while not probe_parent.exists() and not probe_parent.is_symlink():
        missing.append(probe_parent)
        if probe_parent.parent == probe_parent:
            break
        probe_parent = probe_parent.parent
    if not probe_parent.is_dir():
        what = ("is not a directory" if probe_parent == out_dir
                else f"cannot be created: {probe_parent} is not a directory")
        raise UsageError(f"--output-dir {out_dir} {what}; pass another --output-dir")
    created = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:  # another rank of this job made it between the check and here
                continue
            created.append(folder)
        probe = _temp_path(out_dir / _PROBE)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _remove_created(created)
        raise UsageError(f"--output-dir {out_dir} is not writable ({exc.strerror or _one_line(exc)}); "
                         "pass another --output-dir") from None
    return created


def _remove_created(created: list[Path]) -> None:
    """Remove folders this run created, innermost first, only while they are empty."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _check_targets(paths: list[Path], overwrite: bool) -> None:
    """Refuse (before any work) to replace what exists, unless `--overwrite` and it is a regular file."""
    for path in paths:
        if not (path.exists() or path.is_symlink()):
            continue
        is_file = stat.S_ISREG(os.lstat(path).st_mode)
        if not overwrite:
            fix = "pass --overwrite to replace it or another --name" if is_file else "pass another --name"
            raise UsageError(f"{path} already exists; {fix}")
        if not is_file:
            raise UsageError(f"{path} exists and is not a regular file; --overwrite replaces only the video and "
                             "report files this command writes, never a folder: pass another --name")


# ---------------------------------------------------------------------------------------------------------------
# Model: local folder or Hugging Face Hub id
# ---------------------------------------------------------------------------------------------------------------
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")


def resolve_model(model: str) -> Path:
    """`--model` -> a local folder: an existing path as is; else a Hub id (`org/name`) through
    `huggingface_hub.snapshot_download` (the local cache only when `HF_HUB_OFFLINE=1`). `UsageError` when neither."""
    path = Path(model).expanduser()
    if path.exists() or not _REPO_ID.fullmatch(model) or ".." in model:
        return path  # the adapter's folder check says what is wrong with a path that is no repository id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = envs.get_bool(HF_HUB_OFFLINE)
    cache_dir = envs.get(HF_HUB_CACHE) or None
    try:
        folder = snapshot_download(model, cache_dir=cache_dir, local_files_only=offline)
    except LocalEntryNotFoundError:
        where = f"the Hugging Face cache ({cache_dir or 'default location'})"
        if offline:
            raise UsageError(f"--model {model}: no local folder of that name, and the Hub repository is not in "
                             f"{where} while HF_HUB_OFFLINE=1 (download it once with network access, or pass a "
                             "local folder)") from None
        raise UsageError(f"--model {model}: no local folder of that name, the Hub cannot be reached and the "
                         f"repository is not in {where}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise UsageError(f"--model {model}: no local folder of that name and no such Hub repository (or it is "
                         f"private / gated: log in with `hf auth login`): {type(exc).__name__}") from None
    except HfHubHTTPError as exc:
        raise UsageError(f"--model {model}: the Hub refused the download: {_one_line(exc)}") from None
    except (OSError, ValueError) as exc:  # IncompleteSnapshotError, bad repo ids, cache folder errors
        raise UsageError(f"--model {model}: {_one_line(exc)}") from None
    logger.info("--model %s resolved to %s", model, folder)
    return Path(folder)


def _config_heads(model_path: Path) -> int | None:
    try:
        return int(json.loads((model_path / "transformer" / "config.json").read_text())["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# generate: set-up, run, check, report
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Setup:
    """Process state and paths of one run (from `RunConfig` + the process groups); every input checked."""

    module: Any
    groups: Any
    dtype: torch.dtype
    model_path: Path | None
    fmt: str
    writer: bool
    video_seed: int
    video_path: Path
    report_path: Path
    created_dirs: tuple[Path, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.groups.device


@dataclass
class _Run:
    """What the generation produced and measured."""

    pipe: Any
    handle: Any
    frames: Any  # numpy [F, H, W, 3] in [0, 1]
    latents: torch.Tensor | None
    timer: _Timer
    total_s: float
    peaks: list
    gate_reports: dict[str, dict] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)


def _agree(error: UsageError | None) -> None:
    """Raise the first rank's set-up error on every rank (a rank that failed alone would leave its peers waiting in
    the first collective of the run)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else str(error))
        first = next((m for m in messages if m is not None), None)
        if first is not None:
            raise UsageError(first) from error
    elif error is not None:
        raise error


def set_up(config: RunConfig) -> _Setup:
    """Process groups, model resolution and every check that needs them, the output folder (created and probed),
    stale temporary files removed; all before any model weights are loaded."""
    from .attention.validation import check_head_split
    from .distributed import init_sequence_parallel
    from .pipelines import check_video_size, get_pipeline_module

    module = get_pipeline_module(config.pipeline)
    fmt = _video_format(config.format)
    with _user_errors():
        groups = init_sequence_parallel(config.sp if config.uses_sp else 1,
                                        ring=config.ring if config.ring > 1 else None)
    if not config.uses_sp and groups.world_size > 1 and config.sp not in (None, 1):
        raise UsageError(f"--attention {config.attention} runs without sequence parallelism; drop --sp {config.sp}")
    device = groups.device
    # Data-parallel replicas (world > SP degree) generate different seeds; rank 0 of each SP group writes its video.
    writer = groups.sp_rank == 0
    video_seed = config.seed + groups.dp_rank
    stem = config.name or f"{config.pipeline}-{config.attention}-sp{groups.sp_size if config.uses_sp else 1}"
    if groups.dp_size > 1:
        stem += f"-seed{video_seed}"
    video_path = config.output_dir / f"{stem}{'' if fmt == 'png' else '.' + fmt}"
    report_path = config.output_dir / f"{stem}.json"

    error: UsageError | None = None
    created: list[Path] = []
    model_path = None
    try:
        if config.vsa_implementation not in (None, "auto"):
            available = attention.available_implementations(device)
            if config.vsa_implementation not in available:
                raise UsageError(f"--vsa-implementation {config.vsa_implementation} cannot run on {device} here "
                                 f"(available: {', '.join(available)}); pick one of those or auto")
        if writer:  # the output folder first: a model download or load must not come before a refusal here
            created = _prepare_output_dir(config.output_dir)
            for path in remove_stale_temp_files(config.output_dir):
                logger.info("removed %s (temporary file of a run that no longer runs)", path)
            _check_targets([video_path, report_path], config.overwrite)
        if config.model:
            model_path = resolve_model(config.model)
            with _user_errors():
                if hasattr(module, "check_folder"):
                    module.check_folder(model_path)
                check_video_size(module, config.height, config.width, config.num_frames, model_path)
            heads = _config_heads(model_path)
            if heads is not None and config.uses_sp:  # before loading weights; parallelize checks the embedded one
                with _user_errors():
                    check_head_split(heads, groups.sp_size, ulysses=groups.ulysses_size,
                                     video_sparse=config.attention == "vsa")
    except UsageError as exc:
        error = exc
    try:
        _agree(error)
    except UsageError:
        _remove_created(created)
        raise
    dtype = DTYPES[config.dtype] if config.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    logger.info("set-up: rank %d of %d, sp %d (ulysses %d x ring %d), dp %d, %s, %s; %s", groups.rank,
                groups.world_size, groups.sp_size, groups.ulysses_size, groups.ring_size, groups.dp_size, device,
                str(dtype).removeprefix("torch."), f"writes {video_path}" if writer else "writes nothing")
    return _Setup(module=module, groups=groups, dtype=dtype, model_path=model_path, fmt=fmt, writer=writer,
                  video_seed=video_seed, video_path=video_path, report_path=report_path, created_dirs=tuple(created))


def _sparsity_schedule(config: RunConfig):
    from .models import DenseThenSparse

    return DenseThenSparse(config.sparsity, config.dense_steps) if config.dense_steps else config.sparsity


def _apply_attention(pipe, config: RunConfig, groups) -> tuple[Any, dict[str, dict]]:
    """Install the requested attention; returns the `ParallelHandle` (None for stock) and the gate-load reports."""
    from .models import load_gates, parallelize
    from .models.sharding import get_plan

    if config.attention == "stock":
        return None, {}
    if config.attention == "dense-local":
        plans = [get_plan(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        kind = "local" if all("local" in p.attentions for p in plans if p is not None) else "dense"
        with _user_errors():
            return parallelize(pipe, attention=kind, groups=groups), {}
    sparsity = _sparsity_schedule(config) if config.attention == "vsa" else 0.0
    options = {"vsa_implementation": config.vsa_implementation} if config.attention == "vsa" else {}
    with _user_errors():
        handle = parallelize(pipe, attention="vsa" if config.attention == "vsa" else "dense", sparsity=sparsity,
                             groups=groups, **options)
    gate_reports = {}
    for component, path in (("transformer", config.gate_checkpoint), ("transformer_2", config.gate_checkpoint_2)):
        if path:
            if component not in handle.transformers:
                raise UsageError(f"--gate-checkpoint for {component}: the pipeline has no {component}")
            with _user_errors():
                report = load_gates(handle.transformers[component], path)
            if not report.used:
                raise UsageError(f"{path}: no to_gate_compress.* keys found ({len(report.unused)} other keys)")
            gate_reports[component] = {"used": len(report.used), "unused": len(report.unused),
                                       "missing_blocks": report.missing_blocks}
    return handle, gate_reports


def _run_pipeline(pipe, module, config: RunConfig, seed: int, timer: _Timer | None):
    """Frames `[F, H, W, 3]` (numpy, [0, 1]) and the final latents (before the VAE)."""
    final: dict[str, torch.Tensor] = {}

    def on_step_end(pipe, step, timestep, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].detach().float().cpu()
        return timer.step_callback(pipe, step, timestep, callback_kwargs) if timer is not None else callback_kwargs

    kwargs = module.call_kwargs(config)
    kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    kwargs["output_type"] = "np"
    kwargs["callback_on_step_end"] = on_step_end
    if timer is not None:
        timer.start()
    with torch.inference_mode():
        frames = pipe(**kwargs).frames
    return frames[0], final.get("latents")


def run(config: RunConfig, setup: _Setup) -> _Run:
    """Build (or load) the pipeline, install the attention, generate once with timings and peak memory."""
    module, device = setup.module, setup.device
    with _user_errors():
        if setup.model_path is not None:
            pipe = module.load_pipeline(setup.model_path, setup.dtype)
        else:
            pipe = module.build_tiny_pipeline(seed=config.seed, dtype=setup.dtype,
                                              **({"transformer_preset": config.preset} if config.preset else {}))
    pipe.set_progress_bar_config(disable=setup.groups.rank != 0)
    if not config.cpu_offload:
        pipe.to(device)
    handle, gate_reports = _apply_attention(pipe, config, setup.groups)
    if config.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    transformers = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                    and type(m).__name__.endswith("Transformer3DModel")]
    if config.compile:
        for model in transformers:
            model.compile_repeated_blocks(fullgraph=True)

    timer = _Timer(device)
    timer.attach(transformers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    frames, latents = _run_pipeline(pipe, module, config, setup.video_seed, timer)
    total = time.perf_counter() - started
    timer.detach()
    backends = {str(k): str(v) for k, v in attention.selection_report().items()}  # now, before --check's reference run selects its own
    peak = _peak_memory(device)
    peaks = [peak]
    if dist.is_initialized() and dist.get_world_size() > 1:
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak)
    return _Run(pipe=pipe, handle=handle, frames=frames, latents=latents, timer=timer, total_s=total, peaks=peaks,
                gate_reports=gate_reports, backends=backends)


def _reference_frames(pipe, module, config: RunConfig, seed: int, handle, single_groups, device):
    """On SP rank 0: the same generation in one process (stock processors; VSA: VSA at P = 1, same gates)."""
    from .distributed import get_sequence_parallel_groups, set_sequence_parallel_groups
    from .models import load_gates, parallelize

    gates = {name: {k: v.detach().clone() for k, v in model.state_dict().items() if "to_gate_compress" in k}
             for name, model in handle.transformers.items()} if handle is not None else {}
    if handle is not None:
        handle.remove()
    if config.attention != "vsa":
        return *_run_pipeline(pipe, module, config, seed, None), "stock diffusers processors, 1 process"
    previous = get_sequence_parallel_groups()
    set_sequence_parallel_groups(single_groups)
    try:
        ref_handle = parallelize(pipe, attention="vsa", sparsity=_sparsity_schedule(config), groups=single_groups,
                                 vsa_implementation=config.vsa_implementation)
        for name, state in gates.items():
            load_gates(ref_handle.transformers[name], state)
        frames, latents = _run_pipeline(pipe, module, config, seed, None)
        ref_handle.remove()
    finally:
        set_sequence_parallel_groups(previous)
    return frames, latents, "vsa at P=1, same gates, 1 process"


def check(config: RunConfig, setup: _Setup, result: _Run) -> dict[str, Any] | None:
    """`--check`: on each writer, the single-process reference and the max abs differences (None without
    `--check`). Removes the attention handle either way."""
    from .distributed import SequenceParallelGroups

    device = setup.device
    report = None
    failure: BaseException | None = None
    if config.check and setup.writer:  # the other ranks wait below for this rank's single-process reference
        try:
            reference, ref_latents, what = _reference_frames(result.pipe, setup.module, config, setup.video_seed,
                                                             result.handle, SequenceParallelGroups(device=device),
                                                             device)
            report = {"reference": what, "max_abs_diff": float(abs(result.frames - reference).max()),
                      "max_abs_diff_latents": None if result.latents is None or ref_latents is None
                      else float((result.latents - ref_latents).abs().max())}
        except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank has heard of it
            failure = exc
    elif result.handle is not None:
        result.handle.remove()
    if config.check and dist.is_initialized():
        # an all-reduce instead of a barrier: a failed reference run (e.g. out of memory at full length) stops
        # every rank with an error instead of leaving the others waiting forever
        failed = torch.tensor([failure is not None], dtype=torch.int32, device=device)
        dist.all_reduce(failed)
        if failure is not None:
            raise failure
        if int(failed):
            raise RuntimeError("--check: the single-process reference run failed on another rank (see its error)")
    elif failure is not None:
        raise failure
    return report


def build_report(config: RunConfig, setup: _Setup, result: _Run, check_report: dict | None) -> dict[str, Any]:
    """The JSON report: settings, layout, timings, memory, what ran (backends) and what was written."""
    groups, device, timer = setup.groups, setup.device, result.timer
    steps = timer.steps
    return {
        "pipeline": config.pipeline,
        "model": config.model or f"embedded tiny ({config.preset or 'tiny'} transformer, random weights, "
                                 f"seed {config.seed})",
        "model_path": None if setup.model_path is None else str(setup.model_path),
        "attention": config.attention,
        "sparsity": config.sparsity if config.attention == "vsa" else None,
        "dense_steps": config.dense_steps if config.attention == "vsa" else None,
        "vsa_implementation_requested": config.vsa_implementation if config.attention == "vsa" else None,
        "backends": result.backends,
        "gate_checkpoints": result.gate_reports or None,
        "world_size": groups.world_size,
        "sp": groups.sp_size if config.uses_sp else 1,
        "ulysses_x_ring": [groups.ulysses_size, groups.ring_size] if config.uses_sp else [1, 1],
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(setup.dtype).removeprefix("torch."),
        # num_frames: what the video holds (the pipeline decodes 4k+1 frames), not merely what was asked for
        "height": config.height, "width": config.width, "num_frames": int(result.frames.shape[0]),
        "steps": config.steps, "guidance_scale": config.guidance_scale, "seed": setup.video_seed,
        "prompt": config.prompt,
        "dp": groups.dp_size,
        "compile": config.compile,
        "step_times_s": steps,
        "mean_step_s": sum(steps[1:]) / max(len(steps) - 1, 1) if len(steps) > 1 else (steps[0] if steps else None),
        "transformer_forward_ms": [t * 1000 for t in timer.forwards],
        "total_s": result.total_s,
        "peak_memory_per_rank": result.peaks,
        "video": str(setup.video_path),
        "format": setup.fmt,
        "video_shape": list(result.frames.shape),
        "check": check_report,
        "versions": _versions(),
    }


def write_outputs(config: RunConfig, setup: _Setup, frames, report: dict[str, Any]) -> None:
    """Video, then report, staged and renamed into place (see `_staged_outputs`)."""
    with _staged_outputs([setup.video_path, setup.report_path], overwrite=config.overwrite) as (tmp_video, tmp_report):
        _write_video(frames, tmp_video, setup.fmt, config.fps)
        tmp_report.write_text(json.dumps(report, indent=2) + "\n")


def generate(config: RunConfig) -> dict[str, Any]:
    """Set up, run, check, report; returns the report (every rank; writers also write video and report)."""
    setup = set_up(config)
    written = False
    try:
        result = run(config, setup)
        check_report = check(config, setup, result)
        report = build_report(config, setup, result, check_report)
        if setup.writer:
            write_outputs(config, setup, result.frames, report)
            written = True
            summary = f"wrote {setup.video_path} and {setup.report_path}; mean step {report['mean_step_s']:.3f} s"
            if check_report is not None:
                summary += f"; --check max abs diff vs {check_report['reference']}: {check_report['max_abs_diff']:.3e}"
            print(summary, flush=True)
    finally:
        if not written:
            _remove_created(list(setup.created_dirs))
    return report


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {"diffusers_dist_attn": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


# ---------------------------------------------------------------------------------------------------------------
# build-kernels
# ---------------------------------------------------------------------------------------------------------------
def build_kernels(args: argparse.Namespace) -> int:
    """`build-kernels`: 0 and the build folder when built, 1 and the reason otherwise. `--dry-run`: the plan, 0."""
    from .vsa import cuda_build

    if args.dry_run:
        plan = cuda_build.build_plan(require_gpu=not args.no_gpu_check)
        sources = list(plan.sources)
        print(f"{PROG} build-kernels --dry-run: nothing compiled", flush=True)
        print(f"sources ({len(sources)}):", flush=True)
        for source in sources:
            print(f"  {source}", flush=True)
        print(f"arch: {plan.arch}", flush=True)
        print(f"nvcc: {plan.nvcc or 'not found'}", flush=True)
        print(f"would compile in: {plan.cache_dir}", flush=True)
        if args.force:
            print(f"--force: would delete {plan.cache_dir} first", flush=True)
        print(f"cannot build here: {plan.reason}" if plan.reason else "a build can run here", flush=True)
        return 0
    result = cuda_build.build(require_gpu=not args.no_gpu_check, force=args.force, verbose=args.verbose)
    if result.module is None:
        print(f"{PROG} build-kernels: not built: {result.reason}", file=sys.stderr, flush=True)
        return 1
    print(f"built {result.module.__name__} (sm_90a; use it with DIFFUSERS_DIST_ATTN_VSA_CUDA=1) in {result.path}",
          flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Writes to the current `sys.stderr` (looked up per record, so redirections after set-up are honoured)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return True


def configure_logging(level: str) -> None:
    """`--log-level`: this package's loggers (to stderr, with the rank) and diffusers' verbosity."""
    import diffusers.utils.logging as diffusers_logging

    numeric = LOG_LEVELS[level]
    package = logging.getLogger(__name__.rpartition(".")[0])
    package.setLevel(numeric)
    if not any(isinstance(h, _StderrHandler) for h in package.handlers):
        handler = _StderrHandler()
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter(f"{PROG} [rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
    diffusers_logging.set_verbosity(numeric)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _log_internal_error(exc: BaseException) -> Path | None:
    """The full traceback into a new log file in the temp folder; None if even that cannot be written."""
    try:
        fd, name = tempfile.mkstemp(prefix=f"{PROG}-rank{_rank()}-", suffix=".log")
        with os.fdopen(fd, "w") as log:
            log.write(f"{PROG} {' '.join(sys.argv[1:])}\n\n")
            log.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return Path(name)
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 done, 1 internal error (traceback in a log file), 2 bad input (one line), 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build-kernels":
            return build_kernels(args)
        if args.command in ("train", "preprocess"):
            from .training.cli import run as run_training

            return run_training(args)
        if args.command == "generate":
            configure_logging(args.log_level)
            generate(RunConfig.from_args(args))
            if dist.is_available() and dist.is_initialized():
                # leave together: a rank that tears gloo down while a peer still writes its files can abort
                # (SIGABRT from gloo's worker threads, seen about once in 12 CPU runs without this barrier)
                dist.barrier()
        return 0
    except UsageError as exc:
        if _rank() == 0 or exc.local:
            print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (rank {_rank()})", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - an internal error: one line here, the traceback in a file
        log = _log_internal_error(exc)
        where = f"full traceback in {log}" if log else "(the traceback could not be written to a log file)"
        print(f"{PROG}: internal error (rank {_rank()}): {type(exc).__name__}: {_one_line(exc)[:300]}; {where}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
