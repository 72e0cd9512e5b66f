"""Pipeline adapters for the `diffusers-dist-attn generate` command: a registry `name -> module`.

Every adapter module (e.g. `pipelines/wan.py`) provides:

| name | signature | what |
|---|---|---|
| `NAME` | `str` | the `--pipeline` name |
| `DEFAULTS` | `dict[str, Any]` | default call settings for the embedded tiny pipeline: `height`, `width`, `num_frames`, `steps`, `guidance_scale`, `prompt`, `negative_prompt` |
| `build_tiny_pipeline` | `(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> DiffusionPipeline` | a small pipeline built in code, offline, random weights, deterministic for a seed |
| `load_pipeline` | `(path: str, dtype: torch.dtype) -> DiffusionPipeline` | a local diffusers folder; raises `ValueError` naming what was found when the folder is not this model |
| `call_kwargs` | `(settings) -> dict` | keyword arguments for `pipe(...)` from an object with the CLI options as attributes (`cli.RunConfig` or an `argparse.Namespace`: `prompt`, `negative_prompt`, `height`, `width`, `num_frames`, `steps`, `guidance_scale`); the CLI adds `generator`, `output_type`, callbacks |

Optional (the CLI checks inputs with them before loading weights; without them nothing is checked):

| name | signature | what |
|---|---|---|
| `check_folder` | `(path) -> Path` | the folder checks of `load_pipeline` without loading weights (`ValueError`); returns the folder |
| `SIZE_MULTIPLE` | `int` | height and width must be multiples of it (the diffusers pipeline's `check_inputs`) |
| `temporal_compression` | `(path=None) -> int` | the VAE's temporal compression `t` (of a folder's `vae/config.json`, else the embedded VAE's): the pipeline decodes `t*k + 1` frames |

`get_pipeline_module(name)` imports the adapter and checks this interface; an unknown name or a missing adapter
raises `ValueError` listing the known names. `check_video_size(module, height, width, num_frames, path)` applies
the size and frame-count rules.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

__all__ = ["PIPELINES", "REQUIRED_ATTRIBUTES", "get_pipeline_module", "check_video_size", "nearest_frame_counts"]

PIPELINES: dict[str, str] = {
    "wan": "diffusers_dist_attn.pipelines.wan",
    "hunyuan-video": "diffusers_dist_attn.pipelines.hunyuan_video",
}

REQUIRED_ATTRIBUTES = ("NAME", "DEFAULTS", "build_tiny_pipeline", "load_pipeline", "call_kwargs")


def class_name_of(path: Path) -> str | None:
    """The `_class_name` of a diffusers JSON file, or None when unreadable."""
    try:
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def check_pipeline_folder(path: str | Path, name: str, pipelines: tuple[str, ...], transformer: str) -> Path:
    """`path` if it is a local diffusers folder of one of `pipelines` with a `transformer` -- checked from its JSON
    files, no weights read; `ValueError` naming what was found otherwise (`name`: the pipeline, for messages)."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--model {root}: not a directory (expected a local diffusers {name} folder)")
    pipeline_class = class_name_of(root / "model_index.json")
    if pipeline_class is None:
        raise ValueError(f"--model {root}: no readable model_index.json; not a diffusers pipeline folder")
    if pipeline_class not in pipelines:
        raise ValueError(f"--model {root}: model_index.json names {pipeline_class!r}; the {name} pipeline needs a "
                         f"text-to-video {pipelines[0]!r} folder")
    transformer_class = class_name_of(root / "transformer" / "config.json")
    if transformer_class != transformer:
        raise ValueError(f"--model {root}: transformer/config.json names {transformer_class!r}, not {transformer!r}")
    return root


def vae_config_int(path: str | Path | None, key: str, default: int) -> int:
    """A positive int `key` of `path/vae/config.json`, or `default` (no path, no file, no such key)."""
    if path is not None:
        try:
            value = json.loads((Path(path) / "vae" / "config.json").read_text()).get(key)
            if isinstance(value, int) and value > 0:
                return value
        except (OSError, ValueError, AttributeError):
            pass
    return default


def get_pipeline_module(name: str) -> ModuleType:
    """The adapter module registered as `name` (imported on first use)."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {sorted(PIPELINES)}")
    try:
        module = importlib.import_module(PIPELINES[name])
    except ModuleNotFoundError as exc:
        if exc.name != PIPELINES[name]:
            raise
        raise ValueError(f"pipeline {name!r} is registered but its adapter {PIPELINES[name]} is not available "
                         f"in this installation") from None
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(module, a)]
    if missing:
        raise ValueError(f"pipeline adapter {PIPELINES[name]} lacks {missing} (required: {list(REQUIRED_ATTRIBUTES)})")
    return module


def nearest_frame_counts(num_frames: int, temporal: int) -> tuple[int, ...]:
    """The valid frame counts (`temporal * k + 1`) nearest to `num_frames`: one or two values, ascending."""
    below = (num_frames - 1) // temporal * temporal + 1
    return (below, below + temporal) if below >= 1 else (below + temporal,)


def check_video_size(module: ModuleType, height: int, width: int, num_frames: int, path: str | Path | None = None
                     ) -> None:
    """`ValueError` (one line, naming the option and the nearest valid values) when the pipeline of `module` would
    not produce exactly `num_frames` frames of `height` x `width`: diffusers' Wan and HunyuanVideo pipelines decode
    `t*k + 1` frames (VAE temporal compression `t`; other counts are rounded down with at most a warning) and
    reject sizes that are not multiples of 16."""
    name = getattr(module, "NAME", module.__name__)
    multiple = getattr(module, "SIZE_MULTIPLE", 1)
    for option, value in (("--height", height), ("--width", width)):
        if value % multiple:
            below, above = value // multiple * multiple, value // multiple * multiple + multiple
            nearest = f"{below} or {above}" if below else f"{above}"
            raise ValueError(f"{option} {value}: {name} needs a multiple of {multiple}; nearest valid: {nearest}")
    temporal = getattr(module, "temporal_compression", lambda path=None: 1)(path)
    if temporal > 1 and num_frames % temporal != 1:
        nearest = " or ".join(str(n) for n in nearest_frame_counts(num_frames, temporal))
        raise ValueError(f"--num-frames {num_frames}: {name} decodes {temporal}k+1 frames (VAE temporal compression "
                         f"{temporal}); nearest valid: {nearest}")
