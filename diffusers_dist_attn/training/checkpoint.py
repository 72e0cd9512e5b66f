"""Atomic outputs: checkpoints are written into a hidden temporary folder, every file fsynced, then renamed into
place (`checkpoint-N`), so a kill leaves either no `checkpoint-N` or a complete one; single files the same way.

Layout of `checkpoint-N/`: `trainable.safetensors` (every trained parameter, by name: what `--resume` loads),
`optimizer.pt` (optimizer + LR scheduler state), `gates.safetensors` (VSA gates, the keys `load_gates` reads),
`pytorch_lora_weights.safetensors` (LoRA in diffusers' format), `state.json` (step, config, log; written last).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINT_RE", "fsync_dir", "atomic_dir", "atomic_file", "list_checkpoints", "latest_checkpoint",
           "remove_stale_temps", "write_json"]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TEMP_RE = re.compile(r"^\..+\.tmp-\d+(\.[A-Za-z0-9]+)?$")  # what atomic_dir / atomic_file name their temps


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            with open(item, "rb+") as f:
                os.fsync(f.fileno())
    for folder in sorted({p.parent for p in path.rglob("*")} | {path}, key=lambda p: -len(p.parts)):
        fsync_dir(folder)


def atomic_dir(final: Path, write: Callable[[Path], None], *, replace: bool = False) -> Path:
    """`write(tmp)` fills a hidden temp folder next to `final`, which is then fsynced and renamed to `final`.

    An existing `final` is refused (`FileExistsError`) unless `replace`, then it is moved aside first and deleted
    after the rename (a kill in between leaves the old one under a temp name, cleaned by `remove_stale_temps`)."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        _fsync_tree(tmp)
        old = None
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} exists")
            old = final.parent / f".{final.name}.old.tmp-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def atomic_file(final: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes a hidden temp file next to `final` (same suffix), fsynced and renamed over `final`."""
    tmp = final.parent / f".{final.stem}.tmp-{os.getpid()}{final.suffix}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


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


def remove_stale_temps(output_dir: Path) -> list[Path]:
    """Delete temp folders / files of killed runs (only names this module writes: `.NAME.tmp-PID[.suffix]`)."""
    removed = []
    if not output_dir.is_dir():
        return removed
    for item in output_dir.iterdir():
        if _TEMP_RE.match(item.name):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
            removed.append(item)
    return removed
