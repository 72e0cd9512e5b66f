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
    group_rank,
    group_size,
    heads_to_sequence,
    sequence_to_heads,
)
from ..distributed.groups import get_sequence_parallel_groups
from ..vsa.dispatch import vsa_tiled
from ..vsa.tiling import tile, tile_layout, topk_for_sparsity, untile
from .backends import AttentionBackendEnum, dense_attention
from .rotary import RotaryTables, apply_rotary
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

    def _group(self) -> dist.ProcessGroup | None:
        return self.process_group if self.process_group is not None else get_sequence_parallel_groups().sp_group

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
        group = self._group()
        world = group_size(group)
        check_qkv(q, k, v)
        if gate is not None and (gate.shape != q.shape or gate.dtype != q.dtype or gate.device != q.device):
            raise ValueError(f"gate_compress must match q in shape, dtype and device {tuple(q.shape)}, {q.dtype}; "
                             f"got {tuple(gate.shape)}, {gate.dtype}")
        check_head_split(q.shape[2], world)
        has_rep = check_replicated(q, replicated, replicated_mask)
        if has_rep and self.causal:
            raise ValueError("causal=True cannot be combined with replicated tokens")
        padded_len = q.shape[1] * world
        seq_len = padded_len if not original_seq_len else int(original_seq_len)
        if not padded_len - world < seq_len <= padded_len:
            raise ValueError(f"original_seq_len={original_seq_len} is inconsistent with {world} shards of "
                             f"{q.shape[1]} tokens (allowed: {max(padded_len - world + 1, 1)}..{padded_len})")
        attend_kwargs = self._check_attend_kwargs(seq_len, **attend_kwargs)

        tensors = [q, k, v] if gate is None else [q, k, v, gate]
        q, k, v, *rest = self._to_heads(tensors, group, seq_len)
        if freqs_cis is not None:
            q, k = apply_rotary(q, freqs_cis), apply_rotary(k, freqs_cis)
        rank, heads_loc = group_rank(group), q.shape[2]
        rq, rk, rv = (t[:, :, rank * heads_loc:(rank + 1) * heads_loc] if has_rep else None for t in replicated)
        out, rep_out = self._attend(q, k, v, rest[0] if rest else None, rq, rk, rv, replicated_mask, **attend_kwargs)
        if rep_out is not None:
            rep_out = all_gather_heads(rep_out, group)
        if padded_len != seq_len:
            out = F.pad(out, (0, 0, 0, 0, 0, padded_len - seq_len))
        return heads_to_sequence(out, group), rep_out

    @staticmethod
    def _to_heads(tensors: list[torch.Tensor], group, seq_len: int) -> list[torch.Tensor]:
        """Sequence-sharded `[B, S_loc, H, D]` tensors -> head-sharded `[B, seq_len, H/P, D]` (one all-to-all)."""
        if group_size(group) == 1:
            return [t[:, :seq_len] for t in tensors]
        stacked = sequence_to_heads(torch.cat(tensors, 0), group)[:, :seq_len]
        return list(stacked.chunk(len(tensors), 0))

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

    After the all-to-all every rank holds the full `(T, H, W)` grid for its heads, tiles it into 4x4x4 cubes
    (64-token blocks), and computes `out = rep64(coarse) * gate + block_sparse(top-k blocks)`; top-k is per
    head, so the result does not depend on the SP degree. `grid_size` and `sparsity` are per-call inputs.

    Replicated (text) tokens, beyond FastVideo: video queries attend to their top-k video blocks *and* all
    valid text keys in one softmax (the coarse stage stays video-only); text queries attend densely to every
    video token and valid text key. Both are exact softmax attention over the selected keys.
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
