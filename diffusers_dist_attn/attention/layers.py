"""The three attention layers of FastVideo's `fastvideo.attention.layer`, model-agnostic.

Tensors are `[B, S, H, D]`. Constructor and `forward` signatures follow FastVideo's API page; what FastVideo
added later (`original_seq_len`, rotary tables) and what this package adds (key masks, grid, sparsity, explicit
process group, backend override) are keyword-only extras, so code written against that page runs unchanged.
FastVideo's current models also pass `original_seq_len` as the fourth positional argument: an int there is taken
as `original_seq_len` (a tensor there is `replicated_q`, as the API page has it), and `dropout_rate=0.0` is
accepted (a non-zero rate raises in training mode: attention dropout is not implemented).

A layer owns the flow (validate -> agree across ranks -> all-to-all -> rotary -> attend -> all-to-all back);
the attention step itself is a strategy from `impls.py` (dense, ring or VSA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed.agreement import agree, layer_check_needed, peer_failures
from ..distributed.collectives import (
    all_gather_heads,
    group_rank,
    group_size,
    head_offset,
    heads_to_sequence,
    sequence_to_heads,
)
from ..distributed.groups import SINGLE_PROCESS, SequenceParallelGroups, current_groups
from .backends import AttentionBackendEnum, dense_attention
from .impls import AttentionImpl, DenseImpl, Replicated, RingImpl, VSAImpl, ring_backend
from .rotary import RotaryTables, apply_rotary, normalize_rotary_tables
from .validation import check_head_dim, check_head_split, check_qkv, check_replicated, check_seq_len

__all__ = ["LocalAttention", "DistributedAttention", "DistributedAttention_VSA"]

_EXTRA_ARGS = ("process_group", "default_backend", "dropout_rate")


class _AttentionBase(nn.Module):
    """Shared constructor: sizes, scale, backend preference."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        num_kv_heads: int | None = None,
        softmax_scale: float | None = None,
        causal: bool = False,
        supported_attention_backends: Sequence[AttentionBackendEnum] | None = None,
        **extra_impl_args,
    ) -> None:
        super().__init__()
        unknown = set(extra_impl_args) - set(_EXTRA_ARGS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; extra arguments allowed: {list(_EXTRA_ARGS)}")
        if int(num_heads) < 1 or int(head_size) < 1:
            raise ValueError(f"num_heads ({num_heads}) and head_size ({head_size}) must be positive")
        self.num_heads = int(num_heads)
        self.head_size = int(head_size)
        self.num_kv_heads = self.num_heads if num_kv_heads is None else int(num_kv_heads)
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        self.softmax_scale = self.head_size**-0.5 if softmax_scale is None else float(softmax_scale)
        self.causal = bool(causal)
        self.supported_attention_backends = (
            None if supported_attention_backends is None
            else tuple(AttentionBackendEnum.parse(b) for b in supported_attention_backends)
        )
        default = extra_impl_args.get("default_backend")
        self.backend = None if default is None else AttentionBackendEnum.parse(default)
        # None: the current groups (read at call time); SINGLE_PROCESS: no communication; a ProcessGroup: pure
        # Ulysses over it; SequenceParallelGroups: its Ulysses x ring layout
        self.process_group: dist.ProcessGroup | SequenceParallelGroups | None = extra_impl_args.get("process_group")
        self.dropout_rate = float(extra_impl_args.get("dropout_rate") or 0.0)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1); got {self.dropout_rate}")

    def _check_dropout(self) -> None:
        if self.dropout_rate and self.training:
            raise ValueError(f"dropout_rate={self.dropout_rate} in training mode: attention dropout is not "
                             "implemented; pass dropout_rate=0.0 (or call .eval() for inference)")

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_size={self.head_size}, num_kv_heads={self.num_kv_heads}, causal={self.causal}"


class LocalAttention(_AttentionBase):
    """Dense attention on one device, on the best available kernel (flash-attn, else PyTorch SDPA).

    Used for cross-attention (each rank's query shard against replicated text keys) and for anything that
    needs no communication. `key_mask` (bool `[B, S_k]`, True = attend) masks padded keys.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        num_kv_heads: int | None = None,
        softmax_scale: float | None = None,
        causal: bool = False,
        supported_attention_backends: Sequence[AttentionBackendEnum] | None = None,
        default_backend: AttentionBackendEnum | str | None = None,
        **extra_impl_args,
    ) -> None:
        super().__init__(num_heads, head_size, num_kv_heads, softmax_scale, causal, supported_attention_backends,
                         default_backend=default_backend, **extra_impl_args)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        freqs_cis: RotaryTables | None = None,
        *,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`q [B, S_q, H, D]`, `k, v [B, S_k, H_kv, D]` -> `[B, S_q, H, D]`; RoPE on q and k if `freqs_cis`."""
        check_qkv(q, k, v, same_length=False, allow_gqa=True)
        if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (k.shape[0], k.shape[1])):
            raise ValueError(f"key_mask must be bool [batch, kv_len] = {(k.shape[0], k.shape[1])}; got "
                             f"{key_mask.dtype} {tuple(key_mask.shape)}")
        check_head_dim(q, self.head_size, self.softmax_scale)
        self._check_dropout()
        if freqs_cis is not None:
            freqs_cis = normalize_rotary_tables(freqs_cis, q.shape[-1])  # once for q and k
            q, k = apply_rotary(q, freqs_cis), apply_rotary(k, freqs_cis)
        return dense_attention(q, k, v, scale=self.softmax_scale, causal=self.causal, key_mask=key_mask,
                               backend=self.backend, supported=self.supported_attention_backends)


@dataclass(frozen=True)
class LayerCall:
    """One call of a distributed layer, as given: `q, k, v, gate [B, S_loc, H, D]`, replicated q/k/v `[B, L, H, D]`
    (or Nones), the unpadded length, rotary tables, the replicated key mask `[B, L]`, strategy options."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    replicated: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
    gate: torch.Tensor | None
    original_seq_len: int | None
    freqs_cis: RotaryTables | None
    replicated_mask: torch.Tensor | None
    options: dict

    @staticmethod
    def of(q, k, v, replicated, gate, original_seq_len, freqs_cis, replicated_mask, options) -> LayerCall:
        """The call; an int in the fourth position (FastVideo's current models pass `original_seq_len` there) is
        taken as `original_seq_len` (a tensor there is `replicated_q`, as the seed API page has it)."""
        if isinstance(replicated[0], int) and not isinstance(replicated[0], bool):
            if original_seq_len is not None:
                raise TypeError("original_seq_len was given twice (fourth positional argument and keyword)")
            original_seq_len, replicated = replicated[0], (None, *replicated[1:])
        return LayerCall(q, k, v, replicated, gate, original_seq_len, freqs_cis, replicated_mask, options)


@dataclass(frozen=True)
class CheckedCall:
    """A validated call: the unpadded length, normalized rotary tables, resolved options, and the fields every
    rank must agree on."""

    seq_len: int
    freqs_cis: RotaryTables | None
    options: dict
    fields: dict
    ring_backend: str | None = None  # the LSE backend of ring attention (ring degree > 1)


@dataclass(frozen=True)
class Groups:
    """The process groups of one call: the whole SP group (agreement), the Ulysses all-to-all group, the ring."""

    sp: dist.ProcessGroup | None
    ulysses: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None

    @property
    def world(self) -> int:
        """The sequence-parallel degree of this call (Ulysses x ring)."""
        return group_size(self.ulysses) * group_size(self.ring)


class DistributedAttention(_AttentionBase):
    """Ulysses sequence-parallel attention (FastVideo semantics).

    In: this rank's shard `[B, S_loc, H, D]` of the (padded) video sequence, all heads. One all-to-all moves
    q, k, v together to `[B, S_pad, H/P, D]`; the sequence is trimmed to `original_seq_len`; RoPE (if given)
    is applied on the full sequence; replicated tokens (`[B, L, H, D]`, identical on every rank, e.g. text)
    are sliced to this rank's heads and appended after the video tokens; dense attention runs over
    `[video ; replicated]` (padded replicated keys masked by `replicated_mask`); the replicated output is
    all-gathered over heads; the video output is re-padded and sent back with the reverse all-to-all.

    Heads that do not divide the Ulysses degree are split unevenly (12 over 8 ranks: 2,2,2,2,1,1,1,1).

    Hybrid (USP): with `init_sequence_parallel(ring=R)` (or a `SequenceParallelGroups` with `ring_size > 1` as
    `process_group`), the all-to-all runs over the Ulysses sub-group (each rank then holds a contiguous block of
    `U * S_loc` tokens for its heads) and exact ring attention runs over the ring sub-group (`impls.RingImpl`).

    Before any communication every rank validates its inputs and the ranks agree (one tiny collective) on what
    must match; bad or mismatched input raises the same `ValueError` on every rank (`distributed.agreement`).

    Returns `(out [B, S_loc, H, D], replicated_out [B, L, H, D] or None)`.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        num_kv_heads: int | None = None,
        softmax_scale: float | None = None,
        causal: bool = False,
        supported_attention_backends: Sequence[AttentionBackendEnum] | None = None,
        prefix: str = "",
        **extra_impl_args,
    ) -> None:
        super().__init__(num_heads, head_size, num_kv_heads, softmax_scale, causal, supported_attention_backends,
                         **extra_impl_args)
        self.prefix = prefix
        self.impl: AttentionImpl = self._make_impl()

    def _make_impl(self) -> AttentionImpl:
        return DenseImpl(self)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        replicated_q: torch.Tensor | int | None = None,
        replicated_k: torch.Tensor | None = None,
        replicated_v: torch.Tensor | None = None,
        *,
        original_seq_len: int | None = None,
        freqs_cis: RotaryTables | None = None,
        replicated_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`q, k, v [B, S_loc, H, D]` -> `(out [B, S_loc, H, D], replicated_out [B, L, H, D] or None)`."""
        return self._flow(LayerCall.of(q, k, v, (replicated_q, replicated_k, replicated_v), None, original_seq_len,
                                       freqs_cis, replicated_mask, {}))

    def _groups(self) -> Groups:
        """The groups of this call; the ring only when the strategy can ring."""
        group = self.process_group
        if group is SINGLE_PROCESS:
            return Groups(None, None, None)
        if group is None:
            group = current_groups()
        if group is None or isinstance(group, dist.ProcessGroup):
            return Groups(group, group, None)
        if group.ring_size > 1 and self.impl.can_ring:
            return Groups(group.sp_group, group.ulysses_group, group.ring_group)
        return Groups(group.sp_group, group.sp_group, None)

    def _flow(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """validate -> agree -> all-to-all -> rotary -> attend -> all-to-all back (see the class docstring)."""
        groups = self._groups()
        error, checked = None, None
        try:
            checked = self._validate(call, groups)
        except (ValueError, TypeError) as exc:
            if groups.world == 1 or not layer_check_needed():
                raise
            error = str(exc)
        if groups.world > 1 and layer_check_needed():
            agree(groups.sp, {} if checked is None else checked.fields, where=type(self).__name__, error=error)
        with peer_failures(groups.sp, type(self).__name__):
            return self._communicate(call, checked, groups)

    def _validate(self, call: LayerCall, groups: Groups) -> CheckedCall:
        """Every check of one call, run on every rank before any collective: the resolved arguments and the
        fields the ranks must agree on."""
        q, gate, replicated = call.q, call.gate, call.replicated
        check_qkv(q, call.k, call.v)
        check_head_dim(q, self.head_size, self.softmax_scale)
        self._check_dropout()
        if gate is not None and (gate.shape != q.shape or gate.dtype != q.dtype or gate.device != q.device):
            raise ValueError(f"gate_compress must match q in shape, dtype and device {tuple(q.shape)}, {q.dtype}; "
                             f"got {tuple(gate.shape)}, {gate.dtype}")
        check_head_split(q.shape[2], groups.world, ulysses=group_size(groups.ulysses),
                         video_sparse=not self.impl.can_ring)
        has_rep = check_replicated(q, replicated, call.replicated_mask)
        if has_rep and self.causal:
            raise ValueError("causal=True cannot be combined with replicated tokens")
        seq_len = check_seq_len(call.original_seq_len, q.shape[1], groups.world)
        options = self.impl.check(q, seq_len, dict(call.options))
        ring = ring_backend(self, q) if group_size(groups.ring) > 1 else None
        freqs_cis, rotary_len = call.freqs_cis, None
        if freqs_cis is not None:  # checked here, not after the all-to-all: a rank-local error there would hang peers
            freqs_cis = normalize_rotary_tables(freqs_cis, q.shape[-1])
            rotary_len = freqs_cis[0].shape[1]
            if rotary_len != seq_len:
                raise ValueError(f"rotary tables cover {rotary_len} tokens but the (unpadded) sequence has {seq_len}; "
                                 "pass tables for the full sequence (RoPE is applied after the all-to-all)")
        fields = {
            "q/k/v shape": tuple(q.shape), "dtype": str(q.dtype), "original_seq_len": seq_len,
            "gate_compress": None if gate is None else tuple(gate.shape),
            "replicated_q/k/v shape": tuple(replicated[0].shape) if has_rep else None,
            "replicated_mask": call.replicated_mask is not None, "freqs_cis (rotary) tokens": rotary_len,
            **self.impl.fields(options),
        }
        return CheckedCall(seq_len, freqs_cis, options, fields, ring)

    def _communicate(self, call: LayerCall, checked: CheckedCall, groups: Groups
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_heads, group, ring = call.q.shape[2], groups.ulysses, groups.ring
        ring_world = group_size(ring)
        tensors = [call.q, call.k, call.v] if call.gate is None else [call.q, call.k, call.v, call.gate]
        # this rank's contiguous token block [start, start + valid) of the unpadded sequence (all of it without ring)
        block = call.q.shape[1] * groups.world // ring_world
        start = group_rank(ring) * block
        valid = min(max(checked.seq_len - start, 0), block)
        q, k, v, *rest = self._to_heads(tensors, group, valid)
        freqs_cis = checked.freqs_cis
        if freqs_cis is not None:
            if ring_world > 1:
                freqs_cis = (freqs_cis[0][:, start:start + valid], freqs_cis[1][:, start:start + valid])
            q, k = apply_rotary(q, freqs_cis), apply_rotary(k, freqs_cis)
            if torch.is_grad_enabled() and v.requires_grad:
                # v is a view of the received q/k/v buffer: attention would save it for backward and keep the
                # whole buffer (3x v) alive per layer. A copy of v lets the stale q/k rows go (training memory).
                v = v.clone()
        rep = None
        if call.replicated[0] is not None:
            first = head_offset(num_heads, group_size(group), group_rank(group))
            rq, rk, rv = (t[:, :, first:first + q.shape[2]] for t in call.replicated)
            rep = Replicated(rq, rk, rv, call.replicated_mask)
        impl = self.impl if ring_world == 1 else RingImpl(self, ring, block, checked.seq_len, checked.ring_backend)
        out, rep_out = impl.attend(q, k, v, rest[0] if rest else None, rep, checked.options)
        if rep_out is not None:
            rep_out = all_gather_heads(rep_out, group, num_heads)
        if block != valid:
            out = F.pad(out, (0, 0, 0, 0, 0, block - valid))
        return heads_to_sequence(out, group, num_heads), rep_out

    @staticmethod
    def _to_heads(tensors: list[torch.Tensor], group, seq_len: int) -> list[torch.Tensor]:
        """Sequence-sharded `[B, S_loc, H, D]` tensors -> head-sharded `[B, seq_len, H_r, D]` (one all-to-all).

        `seq_len` keeps the first rows (drops the padding); `H_r` is this rank's share of the heads.
        """
        if group_size(group) == 1:
            return [t[:, :seq_len] for t in tensors]
        stacked = sequence_to_heads(tensors, group)[:, :seq_len]
        return list(stacked.chunk(len(tensors), 0))


class DistributedAttention_VSA(DistributedAttention):  # noqa: N801 - FastVideo's public name
    """Ulysses sequence parallelism + Video Sparse Attention (`impls.VSAImpl`).

    Always pure Ulysses over the whole SP group (also under a hybrid `ulysses x ring` layout): VSA needs whole
    heads over the full sequence; heads that do not divide the degree are split unevenly. `grid_size` and
    `sparsity` are per-call inputs. Replicated (text) tokens, beyond FastVideo: video queries attend to their
    top-k video blocks *and* all valid text keys in one softmax; text queries attend densely to everything.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        num_kv_heads: int | None = None,
        softmax_scale: float | None = None,
        causal: bool = False,
        supported_attention_backends: Sequence[AttentionBackendEnum] | None = None,
        prefix: str = "",
        **extra_impl_args,
    ) -> None:
        super().__init__(num_heads, head_size, num_kv_heads, softmax_scale, causal, supported_attention_backends,
                         prefix, **extra_impl_args)
        if self.causal:
            raise ValueError("causal=True is not supported by video sparse attention")

    def _make_impl(self) -> AttentionImpl:
        return VSAImpl(self)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        replicated_q: torch.Tensor | int | None = None,
        replicated_k: torch.Tensor | None = None,
        replicated_v: torch.Tensor | None = None,
        gate_compress: torch.Tensor | None = None,
        *,
        original_seq_len: int | None = None,
        freqs_cis: RotaryTables | None = None,
        grid_size: tuple[int, int, int] | None = None,
        sparsity: float = 0.0,
        replicated_mask: torch.Tensor | None = None,
        implementation: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `DistributedAttention.forward`, plus `gate_compress [B, S_loc, H, D]` (None: gate of ones),
        `grid_size=(T, H, W)` with `T*H*W == original_seq_len`, `sparsity` in [0, 1), and `implementation`
        (`cuda`, `triton`, `torch`; default automatic; an explicit one that cannot run raises)."""
        options = {"grid_size": grid_size, "sparsity": sparsity, "implementation": implementation}
        return self._flow(LayerCall.of(q, k, v, (replicated_q, replicated_k, replicated_v), gate_compress,
                                       original_seq_len, freqs_cis, replicated_mask, options))
