"""Pipeline adapters for the `diffusers-dist-attn generate` command: a registry `name -> module`.

Every adapter module (e.g. `pipelines/wan.py`) provides:

| name | signature | what |
|---|---|---|
| `NAME` | `str` | the `--pipeline` name |
| `DEFAULTS` | `dict[str, Any]` | default call settings for the embedded tiny pipeline: `height`, `width`, `num_frames`, `steps`, `guidance_scale`, `prompt`, `negative_prompt` |
| `build_tiny_pipeline` | `(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> DiffusionPipeline` | a small pipeline built in code, offline, random weights, deterministic for a seed |
| `load_pipeline` | `(path: str, dtype: torch.dtype) -> DiffusionPipeline` | a local diffusers folder; raises `ValueError` naming what was found when the folder is not this model |
| `call_kwargs` | `(args: argparse.Namespace) -> dict` | keyword arguments for `pipe(...)` from the parsed CLI options (`prompt`, `negative_prompt`, `height`, `width`, `num_frames`, `steps`, `guidance_scale`); the CLI adds `generator`, `output_type`, callbacks |

`get_pipeline_module(name)` imports the adapter and checks this interface; an unknown name or a missing adapter
raises `ValueError` listing the known names.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["PIPELINES", "REQUIRED_ATTRIBUTES", "get_pipeline_module"]

PIPELINES: dict[str, str] = {
    "wan": "diffusers_dist_attn.pipelines.wan",
    "hunyuan-video": "diffusers_dist_attn.pipelines.hunyuan_video",
}

REQUIRED_ATTRIBUTES = ("NAME", "DEFAULTS", "build_tiny_pipeline", "load_pipeline", "call_kwargs")


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
