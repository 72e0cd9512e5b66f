"""One table of attention backends and one function that chooses among them.

Every kernel this package can run is a row: `name -> (callable, constraints, capabilities, availability)`.
Dense kernels (flash-attn 3/2, PyTorch SDPA's cuDNN / flash / efficient / math backends) and the Video Sparse
Attention implementations (compiled CUDA, Triton, PyTorch reference) register here from `backends.py`; the
layers and ring attention ask `select_backend(kind, ...)` for the row that fits their inputs:

    explicit request  >  env (`DIFFUSERS_DIST_ATTN_BACKEND` / `DIFFUSERS_DIST_ATTN_VSA_IMPL`)  >  automatic

The automatic choice is the row with the lowest `priority` whose constraints hold, that is installed, and
that has the capabilities the caller needs (log-sum-exp for ring attention, extra always-on keys for VSA with
text). A request that cannot run falls back with one warning (`strict=True`: raises instead); the choice and its
reason are logged once per distinct situation, and `selection_report()` says what each kind last ran.

Selection is pure Python on static properties (device, dtype, head dim, flags, environment): a short scan of a
few rows per call in eager mode; under `torch.compile` it runs once at trace time
(`torch.compiler.assume_constant_result`), without a graph break. Modelled on diffusers' `_AttentionBackendRegistry.register(name, constraints=...)`.
"""

from __future__ import annotations

import enum
import functools
import logging
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import envs

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionBackendEnum",
    "Backend",
    "Query",
    "register_backend",
    "get_backend",
    "backends_of",
    "select_backend",
    "selection_report",
    "note_once",
]


class AttentionBackendEnum(enum.Enum):
    """Public backend names. `supported_attention_backends` of the layers takes members of this enum.

    `TORCH_SDPA` means "PyTorch SDPA with the automatic per-device preference"; `VIDEO_SPARSE_ATTN` names the VSA
    family (its implementation is chosen among the `vsa` rows); both are aliases, not rows.
    """

    FLASH_ATTN_3 = "flash_attn_3"
    FLASH_ATTN = "flash_attn"
    TORCH_SDPA = "torch_sdpa"
    SDPA_CUDNN = "sdpa_cudnn"
    SDPA_FLASH = "sdpa_flash"
    SDPA_EFFICIENT = "sdpa_efficient"
    SDPA_MATH = "sdpa_math"
    VIDEO_SPARSE_ATTN = "video_sparse_attn"

    @classmethod
    def parse(cls, value: AttentionBackendEnum | str) -> AttentionBackendEnum:
        if isinstance(value, cls):
            return value
        key = str(value).strip()
        for member in cls:
            if key.upper() == member.name or key.lower() == member.value:
                return member
        raise ValueError(f"unknown attention backend {value!r}; allowed: {[m.value for m in cls]}")


# request aliases: an alias lets the automatic choice pick among the rows of a family
_ALIASES = {"torch_sdpa": "sdpa", "auto": None, "video_sparse_attn": None}


@dataclass(frozen=True)
class Query:
    """What a caller needs: the static properties of its inputs and the capabilities it relies on."""

    kind: str  # "dense" or "vsa"
    device_type: str
    capability: tuple[int, int] | None  # CUDA compute capability, None off CUDA
    dtype: torch.dtype
    head_dim: int
    has_mask: bool = False
    needs_lse: bool = False
    extra_keys: bool = False


@dataclass(frozen=True)
class Backend:
    """One row of the table.

    Attributes:
        name: the request spelling (`sdpa_cudnn`, `flash_attn`, `triton`, ...).
        kind: `dense` (`fn(q, k, v, *, scale, causal, key_mask) -> out`, `[B, S, H, D]`) or `vsa`
            (`fn(q, k, v, gate, block_sizes, topk, scale, *, extra_k, extra_v, extra_mask) -> out`, tiled).
        fn: the implementation (resolved lazily for optional packages through `load`).
        family: rows a request alias may choose among (`sdpa` for the SDPA backends).
        priority: automatic order, lowest first.
        devices / dtypes / max_head_dim / head_dims / takes_mask / min_capability / max_capability: what inputs
            the kernel can take (None = anything).
        auto_capability: compute capabilities where the automatic choice may pick it (e.g. cuDNN on Hopper).
        returns_lse / extra_keys: capabilities (ring attention needs the LSE; VSA with text needs extra always-on
            keys).
        available: `() -> None` when installed and usable, else the reason it is not.
    """

    name: str
    kind: str
    fn: Callable | None = None
    load: Callable[[], Callable | None] | None = None
    family: str | None = None
    priority: int = 100
    devices: tuple[str, ...] = ("cuda", "cpu")
    dtypes: tuple[torch.dtype, ...] | None = None
    max_head_dim: int | None = None
    head_dims: tuple[int, ...] | None = None
    takes_mask: bool = True
    min_capability: tuple[int, int] | None = None
    max_capability: tuple[int, int] | None = None
    auto_capability: tuple[int, ...] | None = None
    returns_lse: bool = False
    extra_keys: bool = False
    available: Callable[[], str | None] = field(default=lambda: None)

    def why_not(self, query: Query) -> str | None:
        """None when this row can run `query`, else the reason it cannot."""
        if query.needs_lse and not self.returns_lse:
            return f"{self.name} returns no log-sum-exp"
        if query.extra_keys and not self.extra_keys:
            return f"{self.name} takes no replicated (text) keys"
        if query.device_type not in self.devices:
            return f"{self.name} does not run on {query.device_type}"
        if self.dtypes is not None and query.dtype not in self.dtypes:
            return f"{self.name} needs one of {[str(d) for d in self.dtypes]}, got {query.dtype}"
        if self.max_head_dim is not None and (query.head_dim > self.max_head_dim or query.head_dim % 8):
            return f"{self.name} takes head dims <= {self.max_head_dim} in multiples of 8, got {query.head_dim}"
        if self.head_dims is not None and query.head_dim not in self.head_dims:
            return f"{self.name} takes head dims {self.head_dims}, got {query.head_dim}"
        if query.has_mask and not self.takes_mask:
            return f"{self.name} takes no key mask"
        cap = query.capability
        if cap is not None and self.min_capability is not None and cap < self.min_capability:
            return f"{self.name} needs sm_{self.min_capability[0]}{self.min_capability[1]}+"
        if cap is not None and self.max_capability is not None and cap > self.max_capability:
            return f"{self.name} needs at most sm_{self.max_capability[0]}{self.max_capability[1]}"
        return self.available()

    def implementation(self) -> Callable:
        if self.fn is not None:
            return self.fn
        fn = self.load() if self.load is not None else None
        if fn is None:
            raise RuntimeError(f"attention backend {self.name} is not available")
        object.__setattr__(self, "fn", fn)  # resolved once; rows are otherwise immutable
        return fn


_REGISTRY: dict[str, dict[str, Backend]] = {"dense": {}, "vsa": {}}
_LAST: dict[str, str] = {}  # kind (+ ":lse") -> last chosen name, for reports


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a row."""
    _REGISTRY.setdefault(backend.kind, {})[backend.name] = backend
    return backend


def get_backend(kind: str, name: str) -> Backend:
    return _REGISTRY[kind][name]


def backends_of(kind: str) -> list[Backend]:
    """The rows of `kind`, in automatic order."""
    return sorted(_REGISTRY[kind].values(), key=lambda b: b.priority)


@functools.cache
def note_once(message: str, warn: bool) -> None:
    """Warn, or log at INFO, a message once per process."""
    if warn:
        warnings.warn(message, stacklevel=4)
    else:
        logger.info(message)


def _auto(query: Query, family: str | None, allowed: tuple[str, ...] | None) -> tuple[Backend, str]:
    """The first row that fits; rows outside their `auto_capability` only when no preferred row fits."""
    reasons: list[str] = []
    candidates = [row for row in backends_of(query.kind)
                  if (family is None or row.family == family) and (allowed is None or row.name in allowed)]
    for preferred_only in (True, False):
        for row in candidates:
            preferred = row.auto_capability is None or (query.capability is not None
                                                        and query.capability[0] in row.auto_capability)
            if preferred != preferred_only:
                continue
            why = row.why_not(query)
            if why is None:
                return row, "automatic: " + "; ".join(reasons + [f"{row.name} fits"])
            reasons.append(why)
    raise ValueError(f"no {query.kind} attention backend can run these inputs ({query.device_type}, {query.dtype}, "
                     f"head dim {query.head_dim}{', LSE needed' if query.needs_lse else ''}"
                     f"{', allowed: ' + str(list(allowed)) if allowed is not None else ''}): " + "; ".join(reasons))


@torch.compiler.assume_constant_result
def _select(kind: str, device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int,
            flags: tuple[bool, bool, bool], request: str | None, from_env: bool, allowed: tuple[str, ...] | None,
            strict: bool) -> str:
    """The chosen row's name; its implementation is imported here, eagerly (never inside traced code).

    Plain arguments only: dynamo passes constants, not dataclasses, to `assume_constant_result` functions.
    """
    query = Query(kind, device_type, capability, dtype, head_dim, *flags)
    name = _choose(query, request, from_env, allowed, strict)
    _REGISTRY[query.kind][name].implementation()
    _LAST[kind + (":lse" if flags[1] else "")] = name  # here, not in traced code: dynamo would guard on the dict
    return name


def _situation(query: Query) -> str:
    """`cuda sm_90 torch.bfloat16 head dim 128 (mask, LSE)`: what a choice was made for, in log lines."""
    device = query.device_type if query.capability is None else f"{query.device_type} sm_{query.capability[0]}{query.capability[1]}"
    flags = [name for name, on in (("mask", query.has_mask), ("LSE", query.needs_lse), ("text keys", query.extra_keys))
             if on]
    return f"{device} {query.dtype} head dim {query.head_dim}" + (f" ({', '.join(flags)})" if flags else "")


def _choose(query: Query, request: str | None, from_env: bool, allowed: tuple[str, ...] | None,
            strict: bool) -> str:
    family = None
    if request is not None and request in _ALIASES:
        family, request = _ALIASES[request], None
    if request is not None and allowed is not None and request not in allowed:
        note_once(f"{query.kind} backend {request} is not in the supported set {list(allowed)}; choosing "
                  "automatically", True)
        request = None
    if request is not None:
        row = _REGISTRY[query.kind].get(request)
        why = f"unknown {query.kind} backend {request!r}; known: {sorted(_REGISTRY[query.kind])}" if row is None \
            else row.why_not(query)
        if why is None:
            note_once(f"{query.kind} attention: {request} for {_situation(query)} ({'env' if from_env else 'requested'})",
                      False)
            return request
        if strict and not from_env:
            raise ValueError(f"{query.kind} attention backend {request!r} was requested but cannot run here: {why}")
        fallback, _ = _auto(query, family, allowed)
        note_once(f"{query.kind} attention backend {request} requested but {why}; using {fallback.name}", True)
        return fallback.name
    row, reason = _auto(query, family, allowed)
    note_once(f"{query.kind} attention: {row.name} for {_situation(query)} ({reason})", False)
    return row.name


def select_backend(
    kind: str,
    like: torch.Tensor,
    *,
    requested: AttentionBackendEnum | str | None = None,
    supported: tuple[AttentionBackendEnum | str, ...] | None = None,
    has_mask: bool = False,
    needs_lse: bool = False,
    extra_keys: bool = False,
    strict: bool = False,
) -> Backend:
    """The row for `like`'s device, dtype and head dim (last dim): explicit request > env > automatic.

    `requested` and `supported` take enum members or names (dense) or implementation names (vsa). A request
    that cannot run falls back with one warning, or raises `ValueError` when `strict` (an explicit request that
    must not be silently replaced); a request from the environment always falls back.
    """
    device = like.device
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    request, from_env = _request_name(kind, requested), False
    if request is None:
        request, from_env = _request_name(kind, envs.get(envs.BACKEND if kind == "dense" else envs.VSA_IMPL)), True
    allowed = None
    if supported is not None:
        names = tuple(_request_name(kind, s) for s in supported)
        if kind == "dense":  # VIDEO_SPARSE_ATTN in a dense layer's set says nothing about its dense kernel
            names = tuple(n for n in names if n is not None)
            names = tuple(r.name for r in backends_of("dense") if r.name in names or (r.family and r.family in
                          {_ALIASES.get(n) for n in names}))
        allowed = names or None
    # operator.index: a head dim that torch.compile made symbolic (it changed between calls) becomes a guarded constant
    name = _select(kind, device.type, capability, like.dtype, operator.index(like.shape[-1]), (has_mask, needs_lse, extra_keys),
                   request, from_env, allowed, strict)
    return _REGISTRY[kind][name]


def _request_name(kind: str, value: AttentionBackendEnum | str | None) -> str | None:
    if value is None:
        return None
    if kind == "dense":
        text = str(value).strip()
        if not text or text.lower() == "auto":
            return "auto"
        try:
            return AttentionBackendEnum.parse(value).value
        except ValueError:
            return text.lower()
    return str(value).strip().lower() or "auto"


@torch.compiler.assume_constant_result
def record_choice(kind: str, name: str, message: str) -> str:
    """Record (and return) a choice a caller made from its data rather than from the registry (e.g. VSA with every
    block selected running dense attention): logged once at INFO and shown by `selection_report`. When traced it
    runs once, eagerly, as `_select` does, so its bookkeeping is not part of the graph (nor guarded on)."""
    note_once(f"{kind} attention: {name} ({message})", False)
    _LAST[kind] = name
    return name


def selection_report() -> dict[str, str]:
    """What each kind of attention last ran in this process: e.g. `{"dense": "sdpa_cudnn", "vsa": "triton"}` (for
    compiled code: what was chosen when it was last traced)."""
    return dict(_LAST)
