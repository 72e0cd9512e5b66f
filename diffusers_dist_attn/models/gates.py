"""VSA gates (`to_gate_compress`) for every model adapter: add, remove, and load from checkpoints, all or nothing.

A model adapter describes where its gates live with one `GateLayout` (which attention modules get a gate, the
checkpoint key pattern, how a key names a module); `add`, `remove` and `load` are written once, here.

Loading is all or nothing: every tensor is read and checked (dense strided floating-point tensor, finite, the
parameter's shape, still finite in the parameter's dtype) before anything is copied; on any failure the model's
parameters and modules are exactly what they were (gates added for the load are removed again).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "GATE_NAME",
    "GateLayout",
    "GateLoadReport",
    "checkpoint_files",
    "read_matching_tensors",
    "check_gate_tensor",
]

GATE_NAME = "to_gate_compress"


@dataclass
class GateLoadReport:
    """Outcome of `load_gate_compress`: checkpoint keys used / not used, and blocks left without a loaded gate."""

    used: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing_blocks: list[Hashable] = field(default_factory=list)

    def summary(self) -> str:
        return (f"gate_compress: {len(self.used)} keys used, {len(self.unused)} unused, "
                f"{len(self.missing_blocks)} blocks without a gate in the checkpoint (left as they were)")


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------------------------
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_SUFFIXES = (".safetensors", *_TORCH_SUFFIXES)


def _hub_blob(target: Path, folder: Path) -> bool:
    """Whether `target` is a blob of the Hugging Face cache repo that holds `folder` (a snapshot folder or one of
    its subfolders): the hub stores snapshot files as links into `models--*/blobs/`."""
    parts = folder.parts
    if "snapshots" not in parts:
        return False
    repo = Path(*parts[:len(parts) - 1 - parts[::-1].index("snapshots")])
    return repo.name.startswith("models--") and target.parent == repo / "blobs"


def _inside(file: Path, folder: Path) -> Path:
    """`file` resolved; `ValueError` when it is a link that leaves `folder` (other than into the hub's blobs)."""
    target = file.resolve()
    root = folder.resolve()
    if target.is_relative_to(root) or _hub_blob(target, root):
        return target
    raise ValueError(f"gate checkpoint {file} links to {target}, outside the checkpoint folder {root}; "
                     "links are followed only inside the folder (or into a Hugging Face cache's blobs/)")


def checkpoint_files(path: Path) -> list[Path]:
    """The checkpoint files of `path`: the file itself, or a folder's own `*.safetensors` (else `.pt/.pth/.bin`).

    Subfolders are not searched: a Wan 2.2 folder has `transformer/` and `transformer_2/`, a training run several
    `checkpoint-N/`; name the one you mean. Links inside a folder must stay inside it (`ValueError` otherwise).
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"gate checkpoint {path} does not exist")
    files = sorted(path.glob("*.safetensors")) or sorted(p for p in path.glob("*") if p.suffix in _TORCH_SUFFIXES)
    if not files:
        nested = sorted({str(p.parent.relative_to(path)) for p in path.rglob("*") if p.suffix in _SUFFIXES})
        hint = f"; subfolders with checkpoints: {nested[:8]} (pass one of them)" if nested else ""
        raise FileNotFoundError(f"no *.safetensors (or {', '.join(_TORCH_SUFFIXES)}) files in {path}{hint}")
    for file in files:
        _inside(file, path)
    return files


def read_matching_tensors(
    source: str | Path | Mapping[str, torch.Tensor], pattern: re.Pattern[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Values whose keys match `pattern`, and all other key names, from a state dict, a safetensors or
    `.pt/.bin` file, or a folder of them. safetensors are read lazily (only matching tensors); torch files with
    `torch.load(weights_only=True)`, which never unpickles arbitrary objects. Values are not checked here."""
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


def check_gate_tensor(key: str, value: object, param: torch.Tensor, where: str) -> torch.Tensor:
    """`value` as a CPU tensor in `param`'s dtype, or `ValueError` naming `key` and what is wrong with it.

    Refused: non-tensors, sparse / nested / quantized / meta tensors, non-floating dtypes (int, bool, complex),
    NaN or inf, a shape other than `param`'s, values that overflow `param`'s dtype (fp64 1e300 -> bf16 is inf).
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"gate key {key!r} holds a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided or value.is_nested or value.is_quantized or value.is_meta:
        kind = "meta" if value.is_meta else "quantized" if value.is_quantized else "nested" if value.is_nested \
            else str(value.layout)
        raise ValueError(f"gate key {key!r} is a {kind} tensor; gates must be dense (strided) tensors with data")
    if not value.is_floating_point():
        raise ValueError(f"gate key {key!r} has dtype {value.dtype}; gates must be floating point "
                         "(int, bool and complex tensors are refused)")
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"gate key {key!r} has shape {tuple(value.shape)} but the model's {where} has shape "
                         f"{tuple(param.shape)}")
    value = value.detach().to("cpu")
    wide = value if value.element_size() >= 2 else value.float()  # fp8 has no isfinite; fp64 must stay fp64
    bad = int((~torch.isfinite(wide)).sum())
    if bad:
        raise ValueError(f"gate key {key!r} has {bad} non-finite (NaN or inf) values")
    converted = value.to(param.dtype)
    if not bool(torch.isfinite(converted).all()):
        peak = float(wide.abs().max().double())
        raise ValueError(f"gate key {key!r} overflows the model's {param.dtype} (max |value| {peak:.3g} > "
                         f"{torch.finfo(param.dtype).max:.3g}) for {where}")
    return converted


# ---------------------------------------------------------------------------------------------------------------
# One layout per model family
# ---------------------------------------------------------------------------------------------------------------
Attentions = Callable[[nn.Module], Mapping[str, nn.Module]]


@dataclass(frozen=True)
class GateLayout:
    """Where a model family keeps its VSA gates, and the gate operations on such models.

    Attributes:
        attentions: `model -> {module path: attention module}`: the attention modules that get a gate (and that
            raise `ValueError` for a model that is not of this family).
        key: checkpoint key pattern with named groups; `(?P<param>weight|bias)` names the gate parameter.
        module_of: key match -> module path (e.g. `blocks.3.attn1`), whether or not the model has it.
        label: module path -> its entry in `GateLoadReport.missing_blocks` (e.g. Wan's block index).
        unit: what a label counts, for messages (`"block"`).

    Gates are `Linear(attn.to_q.in_features, attn.inner_dim, bias=True)`, zero-initialised (so a dense checkpoint
    starts as "sparse fine stage only"), in `to_q`'s dtype and device, stored as `<module path>.to_gate_compress`.
    """

    attentions: Attentions
    key: re.Pattern[str]
    module_of: Callable[[re.Match[str]], str]
    label: Callable[[str], Hashable] = str
    unit: str = "attention module"

    def add(self, model: nn.Module) -> list[str]:
        """Give every attention module without one a zero gate; returns the module paths that got one."""
        added = []
        for path, attn in self.attentions(model).items():
            if getattr(attn, GATE_NAME, None) is not None:
                continue
            ref = attn.to_q.weight
            gate = nn.Linear(attn.to_q.in_features, attn.inner_dim, bias=True, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
            attn.add_module(GATE_NAME, gate)
            added.append(path)
        return added

    def remove(self, model: nn.Module, paths: Sequence[str] | None = None) -> None:
        """Delete the gates of the given module paths (default: every attention module of the layout)."""
        for path in self.attentions(model) if paths is None else paths:
            attn = model.get_submodule(path)
            if hasattr(attn, GATE_NAME):
                delattr(attn, GATE_NAME)

    def load(self, model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> GateLoadReport:
        """Load gates from a state dict, a safetensors / `.pt` file or a folder of them, all or nothing.

        Missing gates are added zero-initialised first. Every matching key is checked before anything is copied
        (`ValueError` naming the key: a module the model lacks, two keys for one parameter, see also
        `check_gate_tensor`); on any failure the gates added here are removed and every parameter overwritten so
        far is restored, so the model is bit-identical to before. The report's `missing_blocks` lists the modules
        (as `label`s) no key reached; those keep their gate as it was.
        """
        modules = self.attentions(model)
        tensors, other = read_matching_tensors(source, self.key)
        added = self.add(model)
        backups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its old value) of gates that existed
        try:
            staged = self._check(modules, tensors)
            with torch.no_grad():
                for path, param, value in staged.values():
                    if path not in added:  # a copy that fails half-way (device error, interrupt) is undone below
                        backups.append((param, param.detach().to("cpu", copy=True)))
                    param.copy_(value)
        except BaseException:
            with torch.no_grad():
                for param, saved in reversed(backups):
                    param.copy_(saved)
            self.remove(model, added)
            raise
        loaded = {path for path, _, _ in staged.values()}
        return GateLoadReport(used=sorted(staged), unused=sorted(other),
                              missing_blocks=[self.label(p) for p in modules if p not in loaded])

    def _check(
        self, modules: Mapping[str, nn.Module], tensors: Mapping[str, object]
    ) -> dict[str, tuple[str, torch.nn.Parameter, torch.Tensor]]:
        """`{key: (module path, parameter, value in the parameter's dtype)}` once every key has passed."""
        staged: dict[str, tuple[str, torch.nn.Parameter, torch.Tensor]] = {}
        owner: dict[str, str] = {}
        for key in sorted(tensors):
            match = self.key.match(key)
            path, kind = self.module_of(match), match.group("param")
            if path not in modules:
                raise ValueError(f"gate key {key!r} refers to {self.unit} {self.label(path)}, but the model has "
                                 f"{len(modules)} {self.unit}s")
            where = f"{path}.{GATE_NAME}.{kind}"
            if where in owner:
                raise ValueError(f"gate keys {owner[where]!r} and {key!r} both map to {where}; pass the checkpoint "
                                 "(or a state dict filtered by prefix) of one transformer")
            owner[where] = key
            param = getattr(modules[path], GATE_NAME).get_parameter(kind)
            staged[key] = (path, param, check_gate_tensor(key, tensors[key], param, where))
        return staged
