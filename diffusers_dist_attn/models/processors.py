"""What every model adapter's processor shares: the attention kinds, `ShardingState` checks, and diffusers' own
attention controls (`transformer.set_attention_backend(...)`, `enable_parallelism(...)`).

One processor class per model takes `attention="local" | "dense" | "vsa"`:

| attention | self / joint attention | needs |
|---|---|---|
| `"local"` | the full sequence on this process, no communication | nothing |
| `"dense"` | Ulysses (`DistributedAttention`) over the state's group | a `ShardingState` under sequence parallelism |
| `"vsa"` | Video Sparse Attention (`DistributedAttention_VSA`), dense at steps whose sparsity is `None` | a `ShardingState` and gates |

diffusers' `ModelMixin.set_attention_backend(name)` sets `processor._attention_backend` on every processor that
has the attribute. Ours map the diffusers name to this package's dense backend (`DIFFUSERS_BACKENDS`) and hand it to
their layers, which read it whenever they run, so calling it before or after `parallelize` both work (before: the
backend is carried over from the processor being replaced). A name without a counterpart (flex, sage, xformers, ...)
warns once and leaves the choice to our layers; `reset_attention_backend()` restores the processor's `backend=`.
diffusers' context parallelism (`enable_parallelism`, which sets `processor._parallel_config`) would shard the
sequence a second time: our processors refuse to run with it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..attention import AttentionBackendEnum
from ..distributed.groups import SINGLE_PROCESS, get_sequence_parallel_groups
from .gates import GATE_NAME
from .sharding import ShardingState

__all__ = ["ATTENTION_KINDS", "DIFFUSERS_BACKENDS", "backend_for_diffusers", "SequenceParallelAttnProcessor",
           "install_processors"]

ATTENTION_KINDS = ("local", "dense", "vsa")

_B = AttentionBackendEnum
DIFFUSERS_BACKENDS: dict[str, AttentionBackendEnum] = {
    "native": _B.TORCH_SDPA,  # SDPA, PyTorch picks the kernel (ours: by device)
    "_native_cudnn": _B.SDPA_CUDNN,
    "_native_flash": _B.SDPA_FLASH,
    "_native_efficient": _B.SDPA_EFFICIENT,
    "_native_math": _B.SDPA_MATH,
    "flash": _B.FLASH_ATTN,
    "flash_varlen": _B.FLASH_ATTN,
    "flash_hub": _B.FLASH_ATTN,  # the same kernel from the Hub; ours imports the `flash_attn` package
    "flash_varlen_hub": _B.FLASH_ATTN,
    "_flash_3": _B.FLASH_ATTN_3,
    "_flash_varlen_3": _B.FLASH_ATTN_3,
    "_flash_3_hub": _B.FLASH_ATTN_3,
    "_flash_3_varlen_hub": _B.FLASH_ATTN_3,
}
"""diffusers `AttentionBackendName` value -> this package's dense backend (the others have no counterpart)."""


@functools.cache
def _warn_unmapped(name: str) -> None:
    warnings.warn(
        f"diffusers attention backend {name!r} has no counterpart in diffusers_dist_attn; its processors choose "
        f"their own kernel (mapped: {', '.join(sorted(DIFFUSERS_BACKENDS))})", UserWarning, stacklevel=5)  # the caller of set_attention_backend


def backend_for_diffusers(name: Any) -> AttentionBackendEnum | None:
    """Our dense backend for a diffusers backend name (`str` or `AttentionBackendName`); None (and one warning per
    name and process) when there is none."""
    value = str(getattr(name, "value", name)).lower()
    if value not in DIFFUSERS_BACKENDS:
        _warn_unmapped(value)
    return DIFFUSERS_BACKENDS.get(value)


class SequenceParallelAttnProcessor:
    """Base of the model processors: validates `attention` / `state`, owns the layers' backend.

    `(num_heads, head_dim, *, state=None, attention="dense", name="attn", vsa_implementation=None, backend=None)`;
    subclasses build their layers in `build_layers` (`LocalAttention` as `self.local`, `DistributedAttention` as
    `self.dense`, `DistributedAttention_VSA` as `self.sparse`, any of them None) with `**self.layer_args()`.
    """

    _parallel_config = None  # diffusers' context parallelism: refused in `check_call`
    _LAYERS = ("local", "dense", "sparse")

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        *,
        state: ShardingState | None = None,
        attention: str = "dense",
        name: str = "attn",
        vsa_implementation: str | None = None,
        backend: AttentionBackendEnum | str | None = None,
    ) -> None:
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"{name}: attention must be one of {list(ATTENTION_KINDS)}; got {attention!r}")
        if state is None and attention == "vsa":
            raise ValueError(f"{name}: attention='vsa' needs a ShardingState (grid and sparsity); use "
                             "diffusers_dist_attn.models.parallelize(...)")
        if state is None and attention == "dense" and get_sequence_parallel_groups().sp_size > 1:
            raise ValueError(f"{name}: without a ShardingState under sequence parallelism (P = "
                             f"{get_sequence_parallel_groups().sp_size}) the token sequence is not sharded; use "
                             "diffusers_dist_attn.models.parallelize(...)")
        self.attention = attention
        self.state = state
        self.name = name
        self.vsa_implementation = vsa_implementation
        self.backend = None if backend is None else AttentionBackendEnum.parse(backend)
        self._diffusers_backend: Any = None
        self.local: nn.Module | None = None
        self.dense: nn.Module | None = None
        self.sparse: nn.Module | None = None
        self.build_layers(num_heads, head_dim)

    def build_layers(self, num_heads: int, head_dim: int) -> None:
        """Set `self.local` / `self.dense` / `self.sparse` for `self.attention` (with `**self.layer_args()`)."""
        raise NotImplementedError

    def layer_args(self) -> dict[str, Any]:
        """Extra constructor arguments of the layers: the state's `layer_group` as given (`"local"`: none)."""
        if self.attention == "local":
            group = SINGLE_PROCESS
        else:
            group = self.state.layer_group if self.state is not None else None  # None: the current SP group
        return {"process_group": group, "default_backend": self.backend}

    # -- diffusers' controls --
    @property
    def _attention_backend(self) -> Any:
        """The diffusers backend name set by `set_attention_backend` (None: ours by `backend=` or automatic)."""
        return self._diffusers_backend

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        mapped = None if value is None else backend_for_diffusers(value)
        self._diffusers_backend = value
        for name in self._LAYERS:  # the layers read `backend` when they run: the next call uses it
            layer = getattr(self, name, None)
            if layer is not None:
                layer.backend = mapped if mapped is not None else self.backend

    def check_call(self) -> None:
        if self._parallel_config is not None:
            raise ValueError(f"{self.name}: diffusers' context parallelism (enable_parallelism) is on, but this "
                             "processor shards the sequence itself; use diffusers_dist_attn.models.parallelize(...) "
                             "or diffusers' parallelism, not both")

    # -- shared pieces of __call__ --
    @property
    def seq_len(self) -> int | None:
        """The unpadded token count of this forward (None without a state: the input is unpadded)."""
        return self.state.original_seq_len if self.state is not None else None

    @property
    def sparsity(self) -> float | None:
        """This step's VSA sparsity, None when this forward runs dense."""
        if self.sparse is None or self.state is None:
            return None
        return self.state.sparsity

    def gate(self, attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """VSA gate from `hidden_states [B, S_loc, C]` -> `[B, S_loc, H, D]`."""
        gate_proj = getattr(attn, GATE_NAME, None)
        if gate_proj is None:
            raise ValueError(f"{self.name}: VSA needs attn.{GATE_NAME}; call add_gate_compress(model) "
                             "(parallelize does)")
        return gate_proj(hidden_states).unflatten(2, (attn.heads, -1))


def install_processors(modules: Mapping[str, nn.Module], processors: Mapping[str, Any]) -> None:
    """`modules[path].set_processor(processors[path])`, carrying over the backend diffusers' `set_attention_backend`
    gave the processor being replaced (so it may be called before `parallelize` too)."""
    for path, processor in processors.items():
        attn = modules[path]
        previous = getattr(attn.processor, "_attention_backend", None)
        if previous is not None and isinstance(processor, SequenceParallelAttnProcessor):
            processor._attention_backend = previous
        attn.set_processor(processor)
