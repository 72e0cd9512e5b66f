"""Checkpoints: written through `atomic` (a hidden temporary folder, every file fsynced, then renamed into place as
`checkpoint-N`), so a kill leaves either no `checkpoint-N` or a complete one; single files the same way.

Layout of `checkpoint-N/`: `trainable.safetensors` (every trained parameter, by name: what `--resume` loads),
`optimizer.pt` (optimizer + LR scheduler state), `gates.safetensors` (VSA gates, the keys `load_gates` reads),
`pytorch_lora_weights.safetensors` (LoRA in diffusers' format), `state.json` (step, config, log; written last).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINT_RE", "list_checkpoints", "latest_checkpoint", "write_json"]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (`checkpoint-N` with a `state.json`) in `output_dir`, by step."""
    if not output_dir.is_dir():
        return []
    found = []
    for item in output_dir.iterdir():
        match = CHECKPOINT_RE.match(item.name)
        if match and item.is_dir() and (item / "state.json").is_file():
            found.append((int(match.group(1)), item))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None

