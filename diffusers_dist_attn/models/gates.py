"""VSA gate checkpoints: reading `to_gate_compress` tensors from state dicts, safetensors and torch files.

Shared by the model adapters; each adapter supplies the key pattern of its blocks and maps keys to modules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["GateLoadReport", "checkpoint_files", "read_matching_tensors"]


@dataclass
class GateLoadReport:
    """Outcome of `load_gate_compress`: checkpoint keys used / not used, and blocks left without a loaded gate."""

    used: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing_blocks: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return (f"gate_compress: {len(self.used)} keys used, {len(self.unused)} unused, "
                f"{len(self.missing_blocks)} blocks without a gate in the checkpoint (left as they were)")


_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"gate checkpoint {path} does not exist")
    files = sorted(path.rglob("*.safetensors")) or sorted(p for p in path.rglob("*") if p.suffix in _TORCH_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no *.safetensors (or {', '.join(_TORCH_SUFFIXES)}) files under {path}")
    return files


def read_matching_tensors(
    source: str | Path | Mapping[str, torch.Tensor], pattern: re.Pattern[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors whose keys match `pattern`, and all other key names, from a state dict, a safetensors or
    `.pt/.bin` file, or a folder of them. safetensors are read lazily (only matching tensors); torch files with
    `torch.load(weights_only=True)`, which never unpickles arbitrary objects."""
    if isinstance(source, Mapping):
        matched = {k: v for k, v in source.items() if pattern.match(k)}
        return matched, [k for k in source if k not in matched]
    matched: dict[str, torch.Tensor] = {}
    other: list[str] = []
    for file in checkpoint_files(Path(source)):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if pattern.match(key):
                        matched[key] = handle.get_tensor(key)
                    else:
                        other.append(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
            if not isinstance(state, Mapping):
                raise ValueError(f"{file} does not hold a state dict (got {type(state).__name__})")
            part, rest = read_matching_tensors(state, pattern)
            matched.update(part)
            other.extend(rest)
    return matched, other
