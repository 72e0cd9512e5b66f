"""Attention strategies: what runs between a layer's all-to-alls (FastVideo's `AttentionImpl` split).

A layer (`layers.py`) owns the flow: validate -> agree across ranks -> all-to-all -> rotary -> attend -> back.
A strategy owns the attention step on this rank's heads over the full sequence:

- `check(seq_len, options)` validates its per-call options on every rank before any communication and returns
  them resolved (e.g. VSA: grid, sparsity, top-k); `fields(options)` is what must agree across ranks;
- `attend(q, k, v, gate, replicated, options)` runs it: `q, k, v [B, S, H_r, D]` (this rank's heads, the unpadded
  sequence), replicated tokens `[B, L, H_r, D]` with their key mask, returns `(out [B, S, H_r, D],
  replicated_out [B, L, H_r, D] or None)`.

`DenseImpl` (one device), `RingImpl` (dense over a ring sub-group; exact through log-sum-exp merges) and `VSAImpl`
(Video Sparse Attention). Only dense attention can ring (`can_ring`): VSA needs whole heads over the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import envs
from ..distributed.collectives import broadcast_from_first, group_rank, group_size
from ..numerics import acc as _acc
from ..vsa.reference import block_mean
from ..vsa.tiling import (
    BLOCK,
    TileLayout,
    num_blocks,
    tile,
    tile_layout,
    topk_for_sparsity,
    untile,
)
from .backends import (
    VSA_IMPLEMENTATIONS,
    dense_attention,
    lse_backend,
    names_vsa_implementation,
    vsa_attention_tiled,
)
from .registry import record_choice, select_backend
from .ring import joint_key_mask, ring_attention
from .validation import check_grid, check_sparsity

__all__ = ["Replicated", "AttentionImpl", "DenseImpl", "RingImpl", "VSAImpl"]


@dataclass(frozen=True)
class Replicated:
    """Tokens identical on every rank (e.g. text), sliced to this rank's heads: `[B, L, H_r, D]`, mask `[B, L]`."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None


class AttentionImpl:
    """One attention strategy of a layer; see the module docstring."""

    can_ring = False

    def __init__(self, layer: Any) -> None:
        self.layer = layer  # the owning layer: scale, causal flag, backend preferences

    def check(self, q: torch.Tensor, seq_len: int, options: dict[str, Any]) -> dict[str, Any]:
        """Resolved options of one call (`q`: this rank's `[B, S_loc, H, D]` input); raises on bad ones."""
        if options:
            raise TypeError(f"unexpected arguments {sorted(options)}")
        return {}

    def fields(self, options: dict[str, Any]) -> dict[str, Any]:
        return dict(options)

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
        layer = self.layer
        return dense_attention(q, k, v, scale=layer.softmax_scale, causal=layer.causal, key_mask=key_mask,
                               backend=layer.backend, supported=layer.supported_attention_backends)

    def dense_joint(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    replicated: Replicated | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense attention of `[video ; replicated]` queries over `[video ; valid replicated]` keys, split back
        into `(out [B, S, H, D], replicated_out [B, L, H, D] or None)`."""
        if replicated is None:
            return self.dense(q, k, v), None
        video_len = q.shape[1]
        out = self.dense(torch.cat([q, replicated.q], 1), torch.cat([k, replicated.k], 1),
                         torch.cat([v, replicated.v], 1), joint_key_mask(video_len, replicated.mask))
        return out[:, :video_len], out[:, video_len:]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
               replicated: Replicated | None, options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class DenseImpl(AttentionImpl):
    """Dense softmax attention over `[video ; replicated]` keys on this rank's heads."""

    can_ring = True

    def attend(self, q, k, v, gate, replicated, options):
        return self.dense_joint(q, k, v, replicated)


class RingImpl(AttentionImpl):
    """Dense attention whose video K/V blocks are spread over a ring sub-group (hybrid Ulysses x ring).

    This rank holds the contiguous token block `[start, start + valid)` of the unpadded sequence. Replicated tokens
    are keys once per ring rank (in its local step) and queries only on ring rank 0, whose replicated output is
    broadcast over the ring, so it is bitwise identical on every rank.
    """

    can_ring = True

    def __init__(self, layer: Any, ring: dist.ProcessGroup, block: int, seq_len: int, backend: str) -> None:
        super().__init__(layer)
        self.ring, self.block, self.seq_len, self.backend = ring, block, seq_len, backend

    def attend(self, q, k, v, gate, replicated, options):
        ring = self.ring
        lens = [min(max(self.seq_len - r * self.block, 0), self.block) for r in range(group_size(ring))]
        first = group_rank(ring) == 0
        rep = replicated
        queries = torch.cat([q, rep.q], 1) if rep is not None and first else q
        out = ring_attention(queries, k, v, ring, scale=self.layer.softmax_scale, block_lens=lens,
                             extra_k=None if rep is None else rep.k, extra_v=None if rep is None else rep.v,
                             extra_mask=None if rep is None else rep.mask, backend=self.backend)
        valid = q.shape[1]
        if rep is None:
            return out, None
        if first:
            rep_out = out[:, valid:]
        else:  # a stand-in that takes part in autograd exactly when rank 0's output does (so every rank runs
            # the broadcast's backward collective)
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rep.q, rep.k, rep.v))
            rep_out = torch.zeros_like(rep.q).requires_grad_(needs_grad)
        return out[:, :valid], broadcast_from_first(rep_out, ring)


def ring_backend(layer: Any, q: torch.Tensor) -> str:
    """The LSE-capable dense backend ring attention runs for `layer` on `q`'s device, dtype and head dim; a
    `ValueError` naming the fix when there is none (raised in validation, before any collective)."""
    if layer.causal:
        raise ValueError("causal=True is not supported with ring attention; use ring=1 (pure Ulysses)")
    return lse_backend(q, layer.backend, layer.supported_attention_backends)


class VSAImpl(AttentionImpl):
    """Video Sparse Attention on the full `(T, H, W)` grid of this rank's heads.

    Tiles the grid into 4x4x4 cubes (64-token blocks) and computes `out = rep64(coarse) * gate + block_sparse(top-k
    blocks)`; top-k is per head, so the result does not depend on the SP degree. Replicated (text) tokens: video
    queries attend to their top-k video blocks *and* all valid text keys in one softmax (the coarse stage stays
    video-only); text queries attend densely to every video token and valid text key. When top-k keeps every block
    (sparsity 0) and no implementation is named, the fine part runs as exact dense attention (`_all_blocks`).
    """

    def check(self, q, seq_len, options):
        grid_size = options.pop("grid_size", None)
        sparsity = options.pop("sparsity", 0.0)
        implementation = options.pop("implementation", None)
        super().check(q, seq_len, options)
        if names_vsa_implementation(implementation) and str(implementation).strip().lower() not in VSA_IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r}; allowed: {('auto', *VSA_IMPLEMENTATIONS)}")
        runs_here = True  # an explicit implementation that cannot run on some rank must not surface after the
        if names_vsa_implementation(implementation):  # all-to-all: agreed on instead
            try:
                select_backend("vsa", q, requested=implementation, strict=True)
            except ValueError:
                runs_here = False
        grid = check_grid(grid_size, seq_len)
        sparsity = check_sparsity(sparsity)
        topk = topk_for_sparsity(sparsity, num_blocks(grid))
        # every block selected: exact dense attention (`_all_blocks`) unless a call or the environment names the kernels
        dense_route = topk == num_blocks(grid) and not names_vsa_implementation(implementation or envs.get(envs.VSA_IMPL))
        return {"grid": grid, "sparsity": sparsity, "topk": topk, "implementation": implementation,
                "runs_here": runs_here, "dense_route": dense_route}

    def fields(self, options):
        return {"grid_size": options["grid"], "sparsity": options["sparsity"],  # topk follows from these two
                "implementation": options["implementation"], "implementation runs here": options["runs_here"],
                "dense route (every block selected)": options["dense_route"]}

    def attend(self, q, k, v, gate, replicated, options):
        layout = tile_layout(options["grid"], q.device)
        if options["dense_route"]:
            return self._all_blocks(q, k, v, gate, replicated, layout)
        extra_k = extra_v = extra_mask = None
        if replicated is not None:
            extra_k, extra_v, extra_mask = replicated.k.transpose(1, 2), replicated.v.transpose(1, 2), replicated.mask
        out = vsa_attention_tiled(
            tile(q, layout), tile(k, layout), tile(v, layout), None if gate is None else tile(gate, layout),
            layout.block_sizes, options["topk"], self.layer.softmax_scale, implementation=options["implementation"],
            extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask,
        )
        out = untile(out, layout)
        if replicated is None:
            return out, None
        rep_out = self.dense(replicated.q, torch.cat([k, replicated.k], 1), torch.cat([v, replicated.v], 1),
                             joint_key_mask(q.shape[1], replicated.mask))
        return out, rep_out

    def _all_blocks(self, q, k, v, gate, replicated, layout: TileLayout):
        """Every key block selected (sparsity 0): the fine part is then dense attention over all tokens (and the
        valid text keys), so it runs exactly on the dense backend over the untiled sequence, which has no pad
        slots (the tiled kernels compute ~1.5x the dense FLOPs on the Wan grids); the coarse part is added per
        token. A named implementation (the call's or `DIFFUSERS_DIST_ATTN_VSA_IMPL`) keeps the tiled kernels."""
        record_choice("vsa", "dense", "every key block is selected: dense attention + coarse stage")
        out, rep_out = self.dense_joint(q, k, v, replicated)
        means = [_acc(block_mean(tile(x, layout), layout.block_sizes)) for x in (q, k, v)]  # [B, H, N, D]
        # SDPA, not `reference.coarse_attention`: no [N, N] score matrix (448 MB fp32 on a HunyuanVideo shard)
        out_c = F.scaled_dot_product_attention(*means, scale=self.layer.softmax_scale).to(q.dtype)
        coarse = out_c.transpose(1, 2).index_select(1, layout.slot_index // BLOCK)  # [B, S, H, D]
        return (out + coarse if gate is None else torch.addcmul(out, coarse, gate)), rep_out
