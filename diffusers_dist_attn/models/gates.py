"""VSA gate checkpoints: reading `to_gate_compress` tensors from state dicts, safetensors and torch files.

Shared by the model adapters; each adapter supplies the key pattern of its blocks and maps keys to modules.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["GateLoadReport", "checkpoint_files", "read_matching_tensors", "load_matching_gates"]


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
    """The checkpoint files of `path`: the file itself, or a folder's own `*.safetensors` (else `.pt/.pth/.bin`).

    Subfolders are not searched: a Wan 2.2 folder has `transformer/` and `transformer_2/`, a training run several
    `checkpoint-N/`; name the one you mean.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"gate checkpoint {path} does not exist")
    files = sorted(path.glob("*.safetensors")) or sorted(p for p in path.glob("*") if p.suffix in _TORCH_SUFFIXES)
    if not files:
        nested = sorted({str(p.parent.relative_to(path)) for p in path.rglob("*")
                         if p.suffix in (".safetensors", *_TORCH_SUFFIXES)})
        hint = f"; subfolders with checkpoints: {nested[:8]} (pass one of them)" if nested else ""
        raise FileNotFoundError(f"no *.safetensors (or {', '.join(_TORCH_SUFFIXES)}) files in {path}{hint}")
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


Resolver = Callable[[re.Match[str]], tuple[Hashable, torch.nn.Parameter, str]]


def load_matching_gates(
    source: str | Path | Mapping[str, torch.Tensor], pattern: re.Pattern[str], resolve: Resolver,
    all_targets: Sequence[Hashable],
) -> GateLoadReport:
    """Copy the tensors of `source` whose keys match `pattern` into the parameters `resolve(match)` names.

    `resolve` returns `(target, parameter, description)` for a key or raises `ValueError` (e.g. a block the model
    lacks). Every key is checked before anything is copied: a shape mismatch names the key and both shapes; two keys
    for one parameter (e.g. `transformer.` and `transformer_2.` prefixes in one file) name both keys. The report's
    `missing_blocks` lists the `all_targets` no key reached.
    """
    tensors, other = read_matching_tensors(source, pattern)
    targets: dict[str, tuple[Hashable, torch.nn.Parameter, torch.Tensor]] = {}
    owner: dict[int, str] = {}
    for key, tensor in sorted(tensors.items()):
        target, param, where = resolve(pattern.match(key))
        if id(param) in owner:
            raise ValueError(f"gate keys {owner[id(param)]!r} and {key!r} both map to {where}; pass the checkpoint "
                             "(or a state dict filtered by prefix) of one transformer")
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"gate key {key!r} has shape {tuple(tensor.shape)} but the model's {where} has shape "
                             f"{tuple(param.shape)}")
        owner[id(param)] = key
        targets[key] = (target, param, tensor)
    with torch.no_grad():
        for _, param, tensor in targets.values():
            param.copy_(tensor.to(param.dtype))
    loaded = {target for target, _, _ in targets.values()}
    return GateLoadReport(used=sorted(targets), unused=sorted(other),
                          missing_blocks=[t for t in all_targets if t not in loaded])
