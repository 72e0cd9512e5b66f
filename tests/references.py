"""Single-process references shared by the multi-process tests (one definition, several test files).

`joint_attention_reference(qkv, rep, mask, freqs, w_out, w_rep, replicated)`: `LocalAttention` over the joint
sequence `[video ; text]` with the text key mask (HunyuanVideo-style replicated tokens), optional RoPE on the video
q and k, and the backward of `sum(out * w_out) + sum(rep_out * w_rep)`. It is what `DistributedAttention` must equal
on any number of ranks (outputs and q/k/v/replicated gradients).
"""

from __future__ import annotations

import torch

from diffusers_dist_attn import LocalAttention
from diffusers_dist_attn.attention import apply_rotary


def joint_attention_reference(
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rep: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    freqs: tuple[torch.Tensor, torch.Tensor] | None,
    w_out: torch.Tensor,
    w_rep: torch.Tensor,
    replicated: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """`(out, rep_out or None, grads)`; `grads` holds the gradients of q, k, v, rq, rk, rv in that order (the
    replicated ones are None when `replicated` is False). Inputs are `[B, S, H, D]` (video) and `[B, L, H, D]`
    (text, `mask`: `[B, L]`, True = a real key); `freqs = None` skips RoPE."""
    leaves = [t.clone().requires_grad_() for t in (*qkv, *rep)]
    q, k, v, rq, rk, rv = leaves
    batch, seq, heads, dim = q.shape
    if freqs is not None:
        q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
    layer = LocalAttention(heads, dim)
    if replicated:
        key_mask = torch.cat([torch.ones(batch, seq, dtype=torch.bool), mask], 1)
        out = layer(torch.cat([q, rq], 1), torch.cat([k, rk], 1), torch.cat([v, rv], 1), key_mask=key_mask)
        out, rep_out = out[:, :seq], out[:, seq:]
        loss = (out * w_out).sum() + (rep_out * w_rep).sum()
    else:
        out, rep_out = layer(q, k, v), None
        loss = (out * w_out).sum()
    loss.backward()
    return out.detach(), None if rep_out is None else rep_out.detach(), [t.grad for t in leaves]
