"""The three attention layers of FastVideo's `fastvideo.attention.layer`, model-agnostic.

Tensors are `[B, S, H, D]`. Constructor and `forward` signatures follow FastVideo's API page; what FastVideo
added later (`original_seq_len`, rotary tables) and what this package adds (key masks, grid, sparsity, explicit
process group, backend override) are keyword-only extras, so code written against that page runs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed.collectives import (
    all_gather_heads,
    broadcast_from_first,
    group_rank,
    group_size,
    head_offset,
    heads_to_sequence,
    sequence_to_heads,
)
from ..distributed.groups import SINGLE_PROCESS, current_layout, sp_layout
from ..distributed.ring import ring_attention
from ..vsa.dispatch import IMPLEMENTATIONS, vsa_tiled
from ..vsa.tiling import tile, tile_layout, topk_for_sparsity, untile
from .backends import AttentionBackendEnum, dense_attention, resolve_lse_backend
from .rotary import RotaryTables, apply_rotary, normalize_rotary_tables
from .validation import check_grid, check_head_split, check_qkv, check_replicated, check_sparsity

__all__ = ["LocalAttention", "DistributedAttention", "DistributedAttention_VSA"]

_EXTRA_ARGS = ("process_group", "default_backend")


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
        self.process_group: dist.ProcessGroup | None = extra_impl_args.get("process_group")
        # hybrid (ulysses x ring) split of an explicit group, looked up now: the lookup is keyed by id(group),
        # which torch.compile (2.11) cannot trace inside a forward
        explicit = self.process_group is not None and self.process_group is not SINGLE_PROCESS
        self._explicit_hybrid = sp_layout(self.process_group) if explicit else None

    def _dense(self, q, k, v, key_mask=None) -> torch.Tensor:
        return dense_attention(
            q, k, v, scale=self.softmax_scale, causal=self.causal, key_mask=key_mask,
            backend=self.backend, supported=self.supported_attention_backends,
        )

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
        if freqs_cis is not None:
            freqs_cis = normalize_rotary_tables(freqs_cis, q.shape[-1])  # once for q and k
            q, k = apply_rotary(q, freqs_cis), apply_rotary(k, freqs_cis)
        return self._dense(q, k, v, key_mask)


class DistributedAttention(_AttentionBase):
    """Ulysses sequence-parallel attention (FastVideo semantics).

    In: this rank's shard `[B, S_loc, H, D]` of the (padded) video sequence, all heads. One all-to-all moves
    q, k, v together to `[B, S_pad, H/P, D]`; the sequence is trimmed to `original_seq_len`; RoPE (if given)
    is applied on the full sequence; replicated tokens (`[B, L, H, D]`, identical on every rank, e.g. text)
    are sliced to this rank's heads and appended after the video tokens; dense attention runs over
    `[video ; replicated]` (padded replicated keys masked by `replicated_mask`); the replicated output is
    all-gathered over heads; the video output is re-padded and sent back with the reverse all-to-all.

    Heads that do not divide the Ulysses degree are split unevenly (12 over 8 ranks: 2,2,2,2,1,1,1,1).

    Hybrid (USP): when the SP group was created with `init_sequence_parallel(ring=R)`, the all-to-all runs over
    the Ulysses sub-group (each rank then holds a contiguous block of `U * S_loc` tokens for its heads) and
    exact ring attention runs over the ring sub-group (K/V blocks passed peer to peer). Replicated tokens are
    keys once per ring rank (in its local step, for its own queries) and queries only on ring rank 0, whose
    replicated output is then broadcast over the ring, so it is bitwise identical on every rank.

    Returns `(out [B, S_loc, H, D], replicated_out [B, L, H, D] or None)`.
    """

    _can_ring = True  # dense attention can run over a ring; video sparse attention needs whole heads

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

    def _layout(self) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """`(ulysses_group, ring_group)`: the SP group's hybrid split, or `(sp_group, None)` for pure Ulysses.

        `process_group`: None = the current SP group (read at call time); `SINGLE_PROCESS` = no communication.
        """
        if self.process_group is SINGLE_PROCESS:
            return None, None
        if self.process_group is None:
            group, hybrid = current_layout()
        else:
            group, hybrid = self.process_group, self._explicit_hybrid
        if hybrid is None or not self._can_ring:
            return group, None
        return hybrid.ulysses_group, hybrid.ring_group

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        replicated_q: torch.Tensor | None = None,
        replicated_k: torch.Tensor | None = None,
        replicated_v: torch.Tensor | None = None,
        *,
        original_seq_len: int | None = None,
        freqs_cis: RotaryTables | None = None,
        replicated_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._run(q, k, v, (replicated_q, replicated_k, replicated_v), None, original_seq_len, freqs_cis,
                         replicated_mask, {})

    # -- the shared flow: validate -> all-to-all -> trim -> RoPE -> attend -> re-pad -> all-to-all back --
    def _run(self, q, k, v, replicated, gate, original_seq_len, freqs_cis, replicated_mask, attend_kwargs):
        group, ring = self._layout()
        ring_world = group_size(ring)
        world = group_size(group) * ring_world
        check_qkv(q, k, v)
        if gate is not None and (gate.shape != q.shape or gate.dtype != q.dtype or gate.device != q.device):
            raise ValueError(f"gate_compress must match q in shape, dtype and device {tuple(q.shape)}, {q.dtype}; "
                             f"got {tuple(gate.shape)}, {gate.dtype}")
        num_heads = q.shape[2]
        check_head_split(num_heads, world, ulysses=group_size(group), video_sparse=not self._can_ring)
        has_rep = check_replicated(q, replicated, replicated_mask)
        if has_rep and self.causal:
            raise ValueError("causal=True cannot be combined with replicated tokens")
        lse_backend = None
        if ring_world > 1:
            if self.causal:
                raise ValueError("causal=True is not supported with ring attention; use ring=1 (pure Ulysses)")
            lse_backend = resolve_lse_backend(q, requested=self.backend, supported=self.supported_attention_backends)
        padded_len = q.shape[1] * world
        seq_len = padded_len if not original_seq_len else int(original_seq_len)
        if not padded_len - world < seq_len <= padded_len:
            raise ValueError(f"original_seq_len={original_seq_len} is inconsistent with {world} shards of "
                             f"{q.shape[1]} tokens (allowed: {max(padded_len - world + 1, 1)}..{padded_len})")
        attend_kwargs = self._check_attend_kwargs(seq_len, **attend_kwargs)
        if freqs_cis is not None:  # checked here, not after the all-to-all: a rank-local error there would hang peers
            cos, sin = normalize_rotary_tables(freqs_cis, q.shape[-1])
            if cos.shape[1] != seq_len:
                raise ValueError(f"rotary tables cover {cos.shape[1]} tokens but the (unpadded) sequence has {seq_len}; "
                                 "pass tables for the full sequence (RoPE is applied after the all-to-all)")
            freqs_cis = (cos, sin)

        tensors = [q, k, v] if gate is None else [q, k, v, gate]
        # this rank's contiguous token block [start, start + valid) of the unpadded sequence (all of it without ring)
        block = padded_len // ring_world
        start = group_rank(ring) * block
        valid = min(max(seq_len - start, 0), block)
        q, k, v, *rest = self._to_heads(tensors, group, valid)
        if freqs_cis is not None:
            if ring_world > 1:
                freqs_cis = (freqs_cis[0][:, start:start + valid], freqs_cis[1][:, start:start + valid])
            q, k = apply_rotary(q, freqs_cis), apply_rotary(k, freqs_cis)
            if torch.is_grad_enabled() and v.requires_grad:
                # v is a view of the received q/k/v buffer: attention would save it for backward and keep the
                # whole buffer (3x v) alive per layer. A copy of v lets the stale q/k rows go (training memory).
                v = v.clone()
        heads_loc = q.shape[2]
        first = head_offset(num_heads, group_size(group), group_rank(group))
        rq, rk, rv = (t[:, :, first:first + heads_loc] if has_rep else None for t in replicated)
        if ring_world > 1:
            out, rep_out = self._attend_ring(q, k, v, rq, rk, rv, replicated_mask, ring, block, seq_len, lse_backend)
        else:
            out, rep_out = self._attend(q, k, v, rest[0] if rest else None, rq, rk, rv, replicated_mask,
                                        **attend_kwargs)
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

    def _attend_ring(self, q, k, v, rq, rk, rv, replicated_mask, ring, block, seq_len, backend):
        """Ring attention of this rank's video block (and, on ring rank 0, the replicated queries) over all
        video blocks and the replicated keys.

        q, k, v `[B, valid, H_r, D]` (this rank's unpadded block rows); rq, rk, rv `[B, L, H_r, D]` or None.
        Returns `(out [B, valid, H_r, D], replicated_out [B, L, H_r, D] or None)`.
        """
        lens = [min(max(seq_len - r * block, 0), block) for r in range(group_size(ring))]
        first = group_rank(ring) == 0
        queries = torch.cat([q, rq], 1) if rq is not None and first else q
        out = ring_attention(queries, k, v, ring, scale=self.softmax_scale, block_lens=lens, extra_k=rk,
                             extra_v=rv, extra_mask=replicated_mask, backend=backend)
        valid = q.shape[1]
        if rq is None:
            return out, None
        if first:
            rep_out = out[:, valid:]
        else:  # a stand-in that takes part in autograd exactly when rank 0's output does (so every rank runs
            # the broadcast's backward collective)
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rq, rk, rv))
            rep_out = torch.zeros_like(rq).requires_grad_(needs_grad)
        return out[:, :valid], broadcast_from_first(rep_out, ring)

    def _check_attend_kwargs(self, seq_len: int) -> dict:
        return {}

    def _attend(self, q, k, v, gate, rq, rk, rv, replicated_mask):
        """Dense attention over `[video ; replicated]` on this rank's heads."""
        if rq is None:
            return self._dense(q, k, v), None
        video_len = q.shape[1]
        key_mask = None
        if replicated_mask is not None:
            key_mask = torch.cat([replicated_mask.new_ones(q.shape[0], video_len), replicated_mask], 1)
        out = self._dense(torch.cat([q, rq], 1), torch.cat([k, rk], 1), torch.cat([v, rv], 1), key_mask)
        return out[:, :video_len], out[:, video_len:]


class DistributedAttention_VSA(DistributedAttention):  # noqa: N801 - FastVideo's public name
    """Ulysses sequence parallelism + Video Sparse Attention.

    Always pure Ulysses over the whole SP group (also under a hybrid `ulysses x ring` layout): VSA needs whole
    heads over the full sequence; heads that do not divide the degree are split unevenly.

    After the all-to-all every rank holds the full `(T, H, W)` grid for its heads, tiles it into 4x4x4 cubes
    (64-token blocks), and computes `out = rep64(coarse) * gate + block_sparse(top-k blocks)`; top-k is per
    head, so the result does not depend on the SP degree. `grid_size` and `sparsity` are per-call inputs.

    Replicated (text) tokens, beyond FastVideo: video queries attend to their top-k video blocks *and* all
    valid text keys in one softmax (the coarse stage stays video-only); text queries attend densely to every
    video token and valid text key. Both are exact softmax attention over the selected keys.
    """

    _can_ring = False

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

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        replicated_q: torch.Tensor | None = None,
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
        `grid_size=(T, H, W)` with `T*H*W == original_seq_len`, and `sparsity` in [0, 1)."""
        attend_kwargs = {"grid_size": grid_size, "sparsity": sparsity, "implementation": implementation}
        return self._run(q, k, v, (replicated_q, replicated_k, replicated_v), gate_compress, original_seq_len,
                         freqs_cis, replicated_mask, attend_kwargs)

    def _check_attend_kwargs(self, seq_len: int, grid_size=None, sparsity=0.0, implementation=None) -> dict:
        if implementation is not None and str(implementation).lower() not in ("auto", *IMPLEMENTATIONS):
            raise ValueError(f"implementation={implementation!r}; allowed: {('auto', *IMPLEMENTATIONS)}")
        return {"grid": check_grid(grid_size, seq_len), "sparsity": check_sparsity(sparsity),
                "implementation": implementation}

    def _attend(self, q, k, v, gate, rq, rk, rv, replicated_mask, *, grid, sparsity, implementation):
        layout = tile_layout(grid, q.device)
        topk = topk_for_sparsity(sparsity, layout.num_blocks)
        extra_k = extra_v = None
        if rq is not None:
            extra_k, extra_v = rk.transpose(1, 2), rv.transpose(1, 2)
        out = vsa_tiled(
            tile(q, layout), tile(k, layout), tile(v, layout), None if gate is None else tile(gate, layout),
            layout.block_sizes, topk, self.softmax_scale, implementation=implementation,
            extra_k=extra_k, extra_v=extra_v, extra_mask=replicated_mask,
        )
        out = untile(out, layout)
        if rq is None:
            return out, None
        key_mask = None
        if replicated_mask is not None:
            key_mask = torch.cat([replicated_mask.new_ones(q.shape[0], q.shape[1]), replicated_mask], 1)
        rep_out = self._dense(rq, torch.cat([k, rk], 1), torch.cat([v, rv], 1), key_mask)
        return out, rep_out
