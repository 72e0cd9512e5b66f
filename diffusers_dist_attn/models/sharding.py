"""One sequence-sharding mechanism for every model adapter ("one mechanism, several model plans").

A model adapter says *where* to cut with a `ShardingPlan` and registers it for its transformer class;
`parallelize(pipe_or_transformer, ...)` does the rest with plain torch forward hooks:

| hook | on | does |
|---|---|---|
| forward pre-hook | the transformer (root) | fills the per-forward `ShardingState` (unpadded sequence length, post-patch grid `(T, H, W)`, denoising step, sparsity), checks that the SP ranks agree on the inputs (see "Failure behaviour"), pre-builds the VSA tile layout, and shards root inputs listed under `""` in `plan.shard_inputs` (e.g. Wan 2.2 TI2V per-token timesteps `[B, S]`) |
| forward hook (`always_call`) | the transformer (root) | ends the checked region the pre-hook entered, also when the forward raised |
| forward pre-hook | each module listed in `plan.shard_inputs` | zero-pads the token sequence to a multiple of P and keeps this rank's chunk (`distributed.shard_sequence`) |
| forward hook | `plan.gather_output` | all-gathers the sequence and drops the padding (`distributed.gather_sequence`) |
| `plan.install` | attention modules | installs the model's processors, which read the `ShardingState` (diffusers' `attention_kwargs` never reach processors) |

Rotary tables stay **full** (`[1, S, 1, D]`): `DistributedAttention` applies RoPE after its all-to-all, on the full
unpadded sequence (`freqs_cis=`), so nothing rotary needs sharding.

Gradients follow FastVideo's convention (see `distributed/collectives.py`): every SP rank computes the same loss on
the gathered output; averaging parameter gradients over the SP group gives the single-process gradients.

Order with diffusers offloading: call `parallelize` first, then `pipe.enable_model_cpu_offload()`. torch forward
hooks run before accelerate's wrapped `forward`, so both orders work, but the documented one is parallelize ->
offload; `handle.remove()` leaves the offload hooks in place. Caches that decide from tensor *values* whether to
skip blocks (diffusers' first-block cache, MagCache, SeaCache) would decide per shard, so ranks could skip
different blocks and deadlock in an all-to-all: with P > 1 the first forward raises instead.

Failure behaviour (P > 1): inputs of a parallelized transformer must be identical on every SP rank (each rank
keeps its own shard of the *same* sequence); a rank with other latents, timestep, text embeddings or frame count
would silently produce a wrong video, or hang in an all-to-all when shapes differ. So once per transformer
forward the root pre-hook fingerprints every tensor argument (`tensor_checksums`: sum, sum of squares, weighted
sum; shape and dtype) together with the grid, unpadded length, step, sparsity and attention kind, and calls
`agree(sp_group, ...)`: one all-gather of two int64 per rank; on a mismatch every rank raises the same
`ValueError` naming the argument and each rank's value, plus the fix (same generator seed / same inputs on
every rank). A local validation error in the pre-hook (the plan does not fit the input, a value-dependent cache)
is funnelled through the same `agree(..., error=...)`, so every rank raises it instead of one rank raising and
its peers waiting. We *check and raise* rather than broadcast rank 0's inputs: a broadcast would hide the
caller's bug (different seeds mean the ranks also disagree on everything outside the transformer, e.g. the
scheduler's noise and the decoded video each rank saves) and would move the whole latent and text tensors every
forward, while the checksum moves 16 bytes per rank. The forward is then marked as a checked region
(`enter_checked_region` / `exit_checked_region`, the latter in an `always_call` forward hook, so it also runs
when the forward raises), so the attention layers inside skip their own per-call check. The hooks run on the
root module, outside blocks compiled with `compile_repeated_blocks`; under a whole-model `torch.compile` the
check is skipped (`agreement_enabled()` is False while tracing). `DIFFUSERS_DIST_ATTN_CHECK_RANKS=0` disables it.

`parallelize` refuses a model on which diffusers' own parallelism (`enable_parallelism`, `from_pretrained(...,
parallel_config=...)`) is enabled: both would shard the same sequence.

Writing a plan for a new model (see `models/wan.py`)::

    register_plan("MyTransformer", ShardingPlan(
        name="my-model",
        shard_inputs={"blocks.0": (ShardInput("hidden_states"),)},   # first block input: [B, S, C]
        gather_output="proj_out",                                    # [B, S_loc, C'] -> [B, S, C']
        grid=lambda model, inputs: my_post_patch_grid(model, inputs["hidden_states"]),
        num_heads=lambda model: model.config.num_attention_heads,
        install=my_install,   # (model, state, **options) -> undo callable or None
    ))
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..attention.backends import VSA_IMPLEMENTATIONS, lse_capable, names_vsa_implementation
from ..attention.registry import get_backend
from ..attention.validation import check_head_split, check_sparsity
from ..distributed.agreement import (
    RankDisagreementError,
    agree,
    agreement_enabled,
    enter_checked_region,
    exit_checked_region,
    tensor_checksums,
)
from ..distributed.collectives import gather_sequence, padded_length, shard_sequence
from ..distributed.groups import (
    SINGLE_PROCESS,
    SequenceParallelGroups,
    get_sequence_parallel_groups,
    init_sequence_parallel,
    launched_world_size,
    local_world_size,
)
from ..distributed.planner import plan_degrees
from ..vsa.tiling import tile_layout

logger = logging.getLogger(__name__)

__all__ = [
    "ShardInput",
    "ShardingPlan",
    "ShardingState",
    "DenseThenSparse",
    "ParallelHandle",
    "register_plan",
    "get_plan",
    "load_gates",
    "parallelize",
    "resolve_sparsity",
]

Grid = tuple[int, int, int]
SparsitySchedule = float | Callable[[int], float | None]
"""A constant sparsity in [0, 1), or `step -> sparsity` where `None` means "dense attention at this step"."""


# --------------------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInput:
    """One forward argument to shard along `dim` (by name; positional calls are resolved via the signature).

    `ndim`: shard only when the tensor has exactly this many dims (others pass through unchanged), e.g. Wan's
    timestep is sharded only in its per-token `[B, S]` form.
    """

    name: str
    dim: int = 1
    ndim: int | None = None


@dataclass(frozen=True)
class ShardingPlan:
    """Where a model is cut for sequence parallelism.

    Attributes:
        name: short model name for messages.
        shard_inputs: module path (`""` = the transformer itself) -> arguments to shard. Every sharded tensor must
            have the full token sequence (length `T*H*W`) on its `dim`.
        gather_output: module path whose (tensor or first tuple element) output is all-gathered on `gather_dim`
            and trimmed to the unpadded length.
        grid: `(model, inputs) -> (T, H, W)`, the post-patch token grid from the transformer's forward arguments
            (`inputs` maps argument names to values).
        num_heads: `model -> attention heads` (Ulysses needs `heads % P == 0`).
        install: `(model, state, **options) -> undo or None`: installs the attention processors (and any extra
            modules or hooks). Processors are snapshotted and restored by the mechanism; `undo` removes the rest.
        attentions: attention kinds `install` accepts.
        load_gates: `(model, source) -> report` loading VSA `to_gate_compress` weights (file, folder or state
            dict); the report has `used`, `unused` and `missing_blocks`. None: the model has no VSA gates.
    """

    name: str
    shard_inputs: Mapping[str, tuple[ShardInput, ...]]
    gather_output: str
    grid: Callable[[nn.Module, Mapping[str, Any]], Grid]
    num_heads: Callable[[nn.Module], int]
    install: Callable[..., Callable[[], None] | None]
    attentions: tuple[str, ...] = ("dense", "vsa")
    gather_dim: int = 1
    load_gates: Callable[[nn.Module, Any], Any] | None = None


_PLANS: dict[str, ShardingPlan] = {}
# Adapters imported on first use, keyed by transformer class name: importing the module registers its plan.
_BUILTIN_ADAPTERS = {
    "WanTransformer3DModel": "diffusers_dist_attn.models.wan",
    "HunyuanVideoTransformer3DModel": "diffusers_dist_attn.models.hunyuan_video",
    "HunyuanVideo15Transformer3DModel": "diffusers_dist_attn.models.hunyuan_video",
}


def register_plan(transformer_class: type | str, plan: ShardingPlan) -> None:
    """Register `plan` for a transformer class (or its class name); subclasses inherit it."""
    name = transformer_class if isinstance(transformer_class, str) else transformer_class.__name__
    _PLANS[name] = plan


def load_gates(model: nn.Module, source: Any) -> Any:
    """Load VSA gates into `model` through its plan's `load_gates` (any registered model)."""
    plan = get_plan(model)
    if plan is None or plan.load_gates is None:
        raise ValueError(f"{type(model).__name__} has no VSA gate loader (no registered plan with load_gates)")
    return plan.load_gates(model, source)


def get_plan(model: nn.Module) -> ShardingPlan | None:
    """The plan registered for `model`'s class or nearest base class (importing built-in adapters lazily)."""
    for klass in type(model).__mro__:
        if klass.__name__ not in _PLANS and klass.__name__ in _BUILTIN_ADAPTERS:
            try:
                importlib.import_module(_BUILTIN_ADAPTERS[klass.__name__])
            except ImportError:
                continue
        if klass.__name__ in _PLANS:
            return _PLANS[klass.__name__]
    return None


# --------------------------------------------------------------------------------------------------------------
# Sparsity schedules
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseThenSparse:
    """Dense attention for the first `dense_steps` denoising steps, then VSA at `sparsity`."""

    sparsity: float
    dense_steps: int = 0

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if int(self.dense_steps) < 0:
            raise ValueError(f"dense_steps must be >= 0; got {self.dense_steps}")

    def __call__(self, step: int) -> float | None:
        return None if step < self.dense_steps else self.sparsity


def resolve_sparsity(schedule: SparsitySchedule, step: int) -> float | None:
    """The sparsity at `step` (validated to lie in [0, 1)); `None` means dense attention."""
    value = schedule(step) if callable(schedule) else schedule
    return None if value is None else check_sparsity(value)


# --------------------------------------------------------------------------------------------------------------
# Per-forward state
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ShardingState:
    """What the processors of one transformer read during its forward.

    Set by the root pre-hook at the start of every forward: `original_seq_len` (unpadded token count `T*H*W`),
    `grid` (post-patch `(T, H, W)`), `step` (denoising step index, from the pipeline's scheduler or, without one,
    counted from changes of the timestep), `sparsity` (this step's value of `schedule`; `None` = dense).
    `vsa_implementation`: the VSA implementation the processors name (None: automatic).
    """

    groups: SequenceParallelGroups
    attention: str = "dense"
    schedule: SparsitySchedule = 0.0
    step_source: Callable[[Any], int] | None = None
    original_seq_len: int | None = None
    grid: Grid | None = None
    step: int = 0
    sparsity: float | None = 0.0
    vsa_implementation: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # free slot for model adapters

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        return self.groups.sp_group

    @property
    def layer_group(self) -> SequenceParallelGroups | object:
        """What the attention layers take as `process_group`: the `SequenceParallelGroups` (the layers read the
        Ulysses x ring split from it), or `SINGLE_PROCESS` at P = 1 (so a single-process state never falls back to
        the current, possibly larger, groups). The sharding collectives use `sp_group`."""
        return self.groups if self.groups.sp_size > 1 else SINGLE_PROCESS

    @property
    def sp_size(self) -> int:
        return self.groups.sp_size

    @property
    def sp_rank(self) -> int:
        return self.groups.sp_rank

    @property
    def local_seq_len(self) -> int | None:
        """Tokens per rank after sharding (`ceil(S / P)`)."""
        if self.original_seq_len is None:
            return None
        return padded_length(self.original_seq_len, self.sp_size) // self.sp_size


class StepCounter:
    """Denoising step index: the pipeline's *current* scheduler's `step_index` when it has one, else counted from
    timesteps.

    The scheduler is looked up on every call (`pipe.scheduler = ...` after `parallelize` is common), through a weak
    reference to the pipeline. Counting: a new step starts whenever the (max) timestep changes, and a larger
    timestep than the previous one starts a new generation at step 0; classifier-free-guidance calls share one
    step. It is used only for callable sparsity schedules (reading the timestep costs a device sync).
    """

    def __init__(self, pipeline: Any = None) -> None:
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._last: float | None = None
        self._step = 0

    @property
    def scheduler(self) -> Any:
        pipeline = self._pipeline() if self._pipeline is not None else None
        return getattr(pipeline, "scheduler", None)

    def __call__(self, timestep: Any) -> int:
        index = getattr(self.scheduler, "step_index", None)  # None before the scheduler's first step()
        if index is not None:
            return int(index)  # no device sync to read the timestep
        if isinstance(timestep, torch.Tensor | int | float):
            value = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
            if self._last is not None and value != self._last:
                self._step = 0 if value > self._last else self._step + 1
            self._last = value
        return self._step


# --------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------
def _positions(module: nn.Module) -> dict[str, int]:
    """Positional index (without `self`) of every named forward parameter; computed once at install time, so the
    hooks themselves stay traceable by torch.compile (blocks compiled with `compile_repeated_blocks` run them)."""
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return {p.name: i for i, p in enumerate(params)
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}


def _get_arg(positions: dict[str, int], args: tuple, kwargs: dict, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = positions.get(name)
    return args[index] if index is not None and index < len(args) else None


def _set_arg(positions: dict[str, int], args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    if name in kwargs:
        return args, {**kwargs, name: value}
    index = positions[name]
    return args[:index] + (value,) + args[index + 1:], kwargs


def _shard_args(positions, args, kwargs, specs: tuple[ShardInput, ...], state: ShardingState, where: str):
    for spec in specs:
        value = _get_arg(positions, args, kwargs, spec.name)
        if not isinstance(value, torch.Tensor) or (spec.ndim is not None and value.ndim != spec.ndim):
            continue
        if state.original_seq_len is not None and value.shape[spec.dim] != state.original_seq_len:
            raise ValueError(
                f"{where}: input {spec.name!r} has {value.shape[spec.dim]} tokens on dim {spec.dim}, but the "
                f"post-patch grid {state.grid} has {state.original_seq_len}; the sharding plan does not fit this input"
            )
        local, _ = shard_sequence(value, state.sp_group, dim=spec.dim)
        args, kwargs = _set_arg(positions, args, kwargs, spec.name, local)
    return args, kwargs


# diffusers hooks that skip blocks depending on this rank's activations (a per-shard decision under SP)
_VALUE_DEPENDENT_CACHE_HOOKS = ("fbc_leader_block_hook", "mag_cache_leader_block_hook", "sea_cache_root")


def _check_no_value_dependent_cache(plan: ShardingPlan, state: ShardingState, model: nn.Module) -> None:
    if state.sp_size == 1:
        return
    for path in ("", *plan.shard_inputs):
        registry = getattr(model.get_submodule(path) if path else model, "_diffusers_hook", None)
        found = [name for name in getattr(registry, "hooks", {}) if name in _VALUE_DEPENDENT_CACHE_HOOKS]
        if found:
            raise ValueError(f"{plan.name}: cache hook {found[0]!r} decides per rank from activation values, so under "
                             f"sequence parallelism (P = {state.sp_size}) ranks could skip different blocks and "
                             "deadlock; disable it or use a step-based cache (FasterCache, pyramid attention broadcast)")


_SAME_INPUTS_HINT = (
    "Under parallelize every SP rank computes its shard of one shared forward: pass the same generator seed / "
    "the same inputs on every rank (latents, timestep, prompt or prompt embeds, num_frames, height, width)"
)


class _Region:
    """How many checked regions this root's pre-hook entered and its forward hook has not exited yet.

    The `always_call` forward hook also runs when a pre-hook registered before ours raised (then ours never
    entered), so it exits only what was entered: the global region count never goes out of balance.
    """

    def __init__(self) -> None:
        self.depth = 0


def _agreement_fields(state: ShardingState, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """What must be equal on every SP rank: a checksum, shape and dtype of every tensor argument, plain scalar
    arguments, and the per-forward state derived from them."""
    fields: dict[str, Any] = {"grid": state.grid, "original_seq_len": state.original_seq_len, "step": state.step,
                              "sparsity": state.sparsity, "attention": state.attention}
    tensors = {name: value for name, value in inputs.items() if isinstance(value, torch.Tensor)}
    if state.attention == "vsa" and names_vsa_implementation(state.vsa_implementation):
        # a named implementation raises where it cannot run, which is inside the layers, between all-to-alls
        row = get_backend("vsa", str(state.vsa_implementation).strip().lower())
        fields["vsa implementation can run here"] = row.available() is None
    for (name, value), checksum in zip(tensors.items(), tensor_checksums(list(tensors.values())), strict=True):
        fields[f"{name}.shape"] = (tuple(value.shape), str(value.dtype).removeprefix("torch."))
        fields[name] = checksum  # one host sync for all tensor arguments
    for name, value in inputs.items():
        if value is None or isinstance(value, bool | int | float | str):
            fields[name] = value
    return fields


def _prebuild_tile_layout(state: ShardingState, inputs: Mapping[str, Any]) -> None:
    """Build (and cache) the VSA tile layout of this forward's grid before the blocks run: a block compiled with
    `compile_repeated_blocks(fullgraph=True)` can read the cache but cannot build index tensors into it."""
    hidden = inputs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        hidden = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
    if hidden is not None and state.grid is not None:
        tile_layout(state.grid, hidden.device)


def _prepare(plan: ShardingPlan, state: ShardingState, positions: dict[str, int], module: nn.Module, args: tuple,
             kwargs: dict, check: bool) -> tuple[Any, dict[str, Any]]:
    """Fill `state` for this forward and shard root inputs; returns `(hook result, agreement fields)`."""
    _check_no_value_dependent_cache(plan, state, module)
    inputs = {**{n: args[i] for n, i in positions.items() if i < len(args)}, **kwargs}
    grid = tuple(int(g) for g in plan.grid(module, inputs))
    state.grid = grid
    state.original_seq_len = math.prod(grid)
    if state.step_source is not None and callable(state.schedule):
        state.step = state.step_source(inputs.get("timestep"))
    state.sparsity = resolve_sparsity(state.schedule, state.step)
    fields = _agreement_fields(state, inputs) if check else {}
    if state.attention == "vsa":
        _prebuild_tile_layout(state, inputs)
    specs = plan.shard_inputs.get("")
    result = _shard_args(positions, args, kwargs, specs, state, plan.name) if specs else None
    return result, fields


def _root_pre_hook(plan: ShardingPlan, state: ShardingState, positions: dict[str, int], region: _Region,
                   module, args, kwargs):
    # Entered first, before anything can raise: the always_call exit hook then always has something to exit.
    enter_checked_region()
    region.depth += 1
    # Once per transformer forward (not per layer); skipped at P = 1, when disabled, and while torch.compile traces.
    check = state.sp_size > 1 and agreement_enabled()
    if not check:
        return _prepare(plan, state, positions, module, args, kwargs, check)[0]
    result, fields, local = None, {}, None
    try:
        result, fields = _prepare(plan, state, positions, module, args, kwargs, check)
    except Exception as exc:  # noqa: BLE001 - every rank must fail with it, not only this one (peers would hang)
        local = exc
    where = f"{plan.name} forward"
    try:
        agree(state.sp_group, fields, where=where,
              error=None if local is None else (str(local) if isinstance(local, ValueError | TypeError)
                                                else f"{type(local).__name__}: {local}"))
    except RankDisagreementError as exc:
        raise RankDisagreementError(f"{str(exc).rstrip('.')}. {_SAME_INPUTS_HINT}") from local
    except ValueError:
        if local is not None and not isinstance(local, ValueError | TypeError):
            raise local from None  # this rank's own failure (e.g. out of memory) stays what it is; peers got word
        raise
    return result


def _root_exit_hook(region: _Region, module, args, output) -> None:
    if region.depth > 0:
        region.depth -= 1
        exit_checked_region()


def _shard_pre_hook(specs: tuple[ShardInput, ...], state: ShardingState, positions: dict[str, int], where: str,
                    module, args, kwargs):
    return _shard_args(positions, args, kwargs, specs, state, where)


def _gather_hook(plan: ShardingPlan, state: ShardingState, module, args, output):
    first = output[0] if isinstance(output, tuple) else output
    full = gather_sequence(first, state.sp_group, dim=plan.gather_dim, original_length=state.original_seq_len)
    return (full, *output[1:]) if isinstance(output, tuple) else full


# --------------------------------------------------------------------------------------------------------------
# parallelize / remove
# --------------------------------------------------------------------------------------------------------------
class ParallelHandle:
    """What `parallelize` changed; `remove()` restores the stock behaviour (also on `with ...:` exit)."""

    def __init__(self, groups: SequenceParallelGroups) -> None:
        self.groups = groups
        self.transformers: dict[str, nn.Module] = {}
        self.states: dict[str, ShardingState] = {}
        self._undo: list[Callable[[], None]] = []

    @property
    def state(self) -> ShardingState:
        """The state of the first (or only) transformer."""
        if not self.states:
            raise RuntimeError("this ParallelHandle was removed; call parallelize(...) again")
        return next(iter(self.states.values()))

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        for model in self.transformers.values():
            model.__dict__.pop("_dda_parallel", None)
        self.transformers.clear()
        self.states.clear()

    def __enter__(self) -> ParallelHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(self.transformers) or "removed"
        return f"ParallelHandle(sp={self.groups.sp_size}, transformers=[{names}])"


def _resolve_groups(
    sp: int | None, groups: SequenceParallelGroups | None, *, num_heads: int, attention: str,
    ulysses: int | None = None, ring: int | None = None, can_ring: bool = True,
) -> SequenceParallelGroups:
    """Explicit groups, else the current ones when they fit, else new ones laid out by the degree planner."""
    if groups is not None:
        if sp is not None and groups.sp_size != sp:
            raise ValueError(f"sp={sp} contradicts the given groups (sp_size {groups.sp_size})")
        return groups
    current = get_sequence_parallel_groups()
    launched = launched_world_size() > 1
    initialised = current.world_size > 1 or not launched  # a launched job whose groups are still the default: no
    if initialised and (sp is None or current.sp_size == int(sp)):
        if (ulysses is None or current.ulysses_size == int(ulysses)) and (ring is None or current.ring_size == int(ring)):
            return current
    if not launched:
        return init_sequence_parallel(sp, ulysses=ulysses, ring=ring)
    sp_size = launched_world_size() if sp is None else int(sp)
    node = local_world_size()
    degrees = plan_degrees(num_heads, sp_size, node, ulysses=ulysses, ring=ring, can_ring=can_ring,
                           full_heads=attention == "vsa")
    logger.info("sequence parallel degrees: ulysses %d x ring %d (%s)", degrees.ulysses, degrees.ring, degrees.reason)
    return init_sequence_parallel(sp_size, ulysses=degrees.ulysses, ring=degrees.ring)


# names of the hooks diffusers' context parallelism registers (`diffusers.hooks.context_parallel`)
_DIFFUSERS_CP_HOOK_PREFIXES = ("cp_input---", "cp_output---")


def _diffusers_parallelism(model: nn.Module) -> str | None:
    """What of diffusers' own parallelism is enabled on `model` (None: nothing).

    diffusers records `enable_parallelism(config=...)` / `from_pretrained(..., parallel_config=...)` as
    `model._parallel_config`, sets `_parallel_config` on the attention processors, and registers context-parallel
    input/output hooks in the modules' `_diffusers_hook` registries; any of the three counts.
    """
    config = getattr(model, "_parallel_config", None)
    if config is not None:
        kinds = [kind for kind in ("context_parallel_config", "tensor_parallel_config")
                 if getattr(config, kind, None) is not None]
        return f"_parallel_config with {' and '.join(kinds) or type(config).__name__}"
    for path, module in model.named_modules():
        hooks = [h for h in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
                 if h.startswith(_DIFFUSERS_CP_HOOK_PREFIXES)]
        if hooks:
            return f"context-parallel hook {hooks[0]!r} on {path or 'the transformer'}"
        if getattr(getattr(module, "processor", None), "_parallel_config", None) is not None:
            return f"a context-parallel attention processor on {path}"
    return None


def _transformers_of(target: Any, components: tuple[str, ...] | None) -> tuple[dict[str, nn.Module], Any]:
    """`{name: transformer}` with a registered plan, and the pipeline (None for a bare transformer)."""
    if isinstance(target, nn.Module):
        if get_plan(target) is None:
            raise ValueError(f"no sharding plan is registered for {type(target).__name__}; known: "
                             f"{sorted(set(_PLANS) | set(_BUILTIN_ADAPTERS))}")
        return {"transformer": target}, None
    names = components or tuple(getattr(target, "components", {}).keys())
    unknown = [n for n in components or () if not isinstance(getattr(target, n, None), nn.Module)]
    if unknown:
        raise ValueError(f"components {unknown} are not modules of {type(target).__name__}")
    found = {n: getattr(target, n, None) for n in names}
    found = {n: m for n, m in found.items() if isinstance(m, nn.Module) and get_plan(m) is not None}
    if not found:
        raise ValueError(f"{type(target).__name__} has no component with a registered sharding plan "
                         f"(looked at {list(names)})")
    return found, target


def parallelize(
    pipe_or_transformer: Any,
    sp: int | None = None,
    attention: str = "dense",
    sparsity: SparsitySchedule = 0.0,
    *,
    groups: SequenceParallelGroups | None = None,
    components: tuple[str, ...] | None = None,
    ulysses: int | None = None,
    ring: int | None = None,
    **options: Any,
) -> ParallelHandle:
    """Shard the token sequence of every transformer of a pipeline (or of one transformer) over the SP group.

    Args:
        pipe_or_transformer: a diffusers pipeline (every component with a registered plan is parallelized, e.g.
            Wan 2.2 A14B's `transformer` and `transformer_2`) or a transformer.
        sp: sequence-parallel degree; default: the current groups (`init_sequence_parallel`), else the world.
        attention: an attention kind of the plan (`"dense"` Ulysses, `"vsa"` Video Sparse Attention; plans may
            offer `"local"`: single-device attention, only with `sp=1`).
        sparsity: VSA sparsity, a constant in [0, 1) or `step -> sparsity | None` (`None` = dense at that step),
            e.g. `DenseThenSparse(0.9, dense_steps=10)`.
        groups: explicit process groups (overrides `sp`); `SequenceParallelGroups()` runs single-process.
            Without them, the current groups are used (`init_sequence_parallel`); in a launched job that has
            none yet, the degree planner (`distributed.plan_degrees`) lays out `sp = ulysses x ring` (Ulysses
            inside a node, ring across nodes; VSA: pure Ulysses) and logs why.
        ulysses, ring: explicit hybrid degrees (their product must be the SP degree; checked by the planner).
        components: pipeline attribute names to parallelize (default: all with a plan).
        **options: passed to the plan's `install` (e.g. Wan: `vsa_implementation`).

    Returns a `ParallelHandle`; `handle.remove()` restores stock processors and removes all hooks.
    Raises `ValueError` before any change on a bad attention name, sparsity, or head count / SP degree.
    """
    found, pipeline = _transformers_of(pipe_or_transformer, components)
    resolve_sparsity(sparsity, 0)  # validate early (a schedule is validated again at every step)
    vsa_implementation = options.get("vsa_implementation")
    if names_vsa_implementation(vsa_implementation) and str(vsa_implementation).strip().lower() not in VSA_IMPLEMENTATIONS:
        raise ValueError(f"vsa_implementation={vsa_implementation!r}; allowed: {('auto', *VSA_IMPLEMENTATIONS)}")
    num_heads = min(get_plan(model).num_heads(model) for model in found.values())
    for model in found.values():  # before _resolve_groups, which may create and install process groups
        plan = get_plan(model)
        if attention not in plan.attentions:
            raise ValueError(f"unknown attention {attention!r} for {plan.name}; choose one of {list(plan.attentions)}")
    # ring attention needs a dense backend that returns its log-sum-exp (the automatic choice does)
    can_ring = attention != "dense" or lse_capable(options.get("backend") or "auto")
    groups = _resolve_groups(sp, groups, num_heads=num_heads, attention=attention, ulysses=ulysses, ring=ring,
                             can_ring=can_ring)
    for name, model in found.items():
        plan = get_plan(model)
        if attention == "local" and groups.sp_size > 1:
            raise ValueError(f"attention='local' runs without sequence parallelism; use sp=1 (got {groups.sp_size})")
        try:  # Ulysses needs at least one head per rank of its degree
            check_head_split(plan.num_heads(model), groups.sp_size, ulysses=groups.ulysses_size,
                             video_sparse=attention == "vsa")
        except ValueError as exc:
            raise ValueError(f"{plan.name} {name}: {exc}") from None
        if "_dda_parallel" in model.__dict__:
            raise ValueError(f"{name} is already parallelized; call handle.remove() first")
        enabled = _diffusers_parallelism(model)
        if enabled is not None:  # both would shard the same sequence (and diffusers' hooks cannot be undone)
            raise ValueError(
                f"{plan.name} {name}: diffusers' own parallelism is enabled on this model ({enabled}); "
                "diffusers_dist_attn.parallelize shards the sequence itself and cannot run on top of it. Use only "
                "parallelize: build (or from_pretrained) a fresh transformer without enable_parallelism(...) / "
                "parallel_config=..., or unhook this one first (diffusers.hooks.context_parallel."
                "remove_context_parallel(model, model._cp_plan), then set _parallel_config = None on the model and "
                "on each of its attention processors)")

    handle = ParallelHandle(groups)
    step_source = StepCounter(pipeline)
    try:
        for name, model in found.items():
            plan = get_plan(model)
            state = ShardingState(groups=groups, attention=attention, schedule=sparsity, step_source=step_source,
                                  vsa_implementation=vsa_implementation)
            _apply(handle, model, plan, state, options)
            handle.transformers[name] = model
            handle.states[name] = state
            model.__dict__["_dda_parallel"] = handle
    except BaseException:
        handle.remove()
        raise
    return handle


def _apply(handle: ParallelHandle, model: nn.Module, plan: ShardingPlan, state: ShardingState, options) -> None:
    saved = dict(model.attn_processors) if hasattr(model, "attn_processors") else None
    if saved is not None:
        handle._undo.append(lambda: model.set_attn_processor(dict(saved)))  # set_attn_processor empties its dict
    undo = plan.install(model, state, **options)
    if undo is not None:
        handle._undo.append(undo)
    region = _Region()
    hooks: list = []
    handle._undo.append(lambda: [h.remove() for h in hooks])  # registered first: a failure below removes them too
    hooks += [
        model.register_forward_pre_hook(functools.partial(_root_pre_hook, plan, state, _positions(model), region),
                                        with_kwargs=True),
        # always_call: the checked region ends even when the forward (or a pre-hook) raises
        model.register_forward_hook(functools.partial(_root_exit_hook, region), always_call=True),
    ]
    for path, specs in plan.shard_inputs.items():
        if path:
            module = model.get_submodule(path)
            hook = functools.partial(_shard_pre_hook, specs, state, _positions(module), f"{plan.name} {path}")
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    hooks.append(model.get_submodule(plan.gather_output).register_forward_hook(
        functools.partial(_gather_hook, plan, state)))
