"""Wan (`diffusers.WanTransformer3DModel`, Wan 2.1 / 2.2): attention processors, VSA gates and the sharding plan.

Processors are drop-ins for diffusers' `WanAttnProcessor.__call__(attn, hidden_states, encoder_hidden_states=None,
attention_mask=None, rotary_emb=None)` and reproduce it step by step: Wan 2.1 I2V image/text context split, q/k/v
projections (fused or not, via diffusers' own helpers), Q/K RMS norm across all heads before the head split, RoPE
on self-attention, the I2V image branch added to the text output, `to_out`. Attention itself runs on this package's
layers:

| processor | self-attention (`attn1`) | cross-attention (`attn2`) |
|---|---|---|
| `WanLocalAttnProcessor` | `LocalAttention` (full sequence, one device) | `LocalAttention` |
| `WanDistributedAttnProcessor` | `DistributedAttention` (Ulysses over the sharded sequence) | `LocalAttention` (local query shard x replicated text / image K/V: exact) |
| `WanVSAAttnProcessor` | `DistributedAttention_VSA` with the block's `to_gate_compress` | `LocalAttention` |

`set_wan_attn_processors(model, attention, state)` installs them on every block in one call; `parallelize(pipe,
attention="dense"|"vsa")` (see `models/sharding.py`) also shards the sequence and uses the plan registered here.

VSA gates: every self-attention gets `to_gate_compress = Linear(dim, dim, bias=True)`, zero-initialised, stored as
`blocks.N.attn1.to_gate_compress.{weight,bias}` in the transformer's `state_dict` (FastVideo names it
`blocks.N.to_gate_compress.*`; `load_gate_compress` maps both).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanTransformer3DModel,
    _get_added_kv_projections,
    _get_qkv_projections,
)
from torch import nn

from ..attention.layers import DistributedAttention, DistributedAttention_VSA, LocalAttention
from ..distributed.groups import get_sequence_parallel_groups
from .gates import GateLoadReport, load_matching_gates
from .sharding import ShardingPlan, ShardingState, ShardInput, register_plan

__all__ = [
    "WAN_TEXT_LEN",
    "WanLocalAttnProcessor",
    "WanDistributedAttnProcessor",
    "WanVSAAttnProcessor",
    "set_wan_attn_processors",
    "add_gate_compress",
    "remove_gate_compress",
    "load_gate_compress",
    "GateLoadReport",
    "WAN_PLAN",
]

WAN_TEXT_LEN = 512  # diffusers' Wan: the last 512 context tokens are text, the ones before are image tokens
GATE_NAME = "to_gate_compress"


def _heads(attn: WanAttention) -> tuple[int, int]:
    return attn.heads, attn.inner_dim // attn.heads


class WanLocalAttnProcessor:
    """`WanAttnProcessor` on `LocalAttention`: no communication (single device, or cross-attention under SP)."""

    def __init__(self, num_heads: int, head_dim: int, *, backend: str | None = None) -> None:
        self.local = LocalAttention(num_heads, head_dim, default_backend=backend)

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`hidden_states [B, S_q, dim]` (a sequence shard under SP), `encoder_hidden_states [B, L, dim]` (replicated;
        Wan 2.1 I2V: `[image ; 512 text]`), `rotary_emb` `(cos, sin)` each `[1, S, 1, D]` over the full sequence
        -> `[B, S_q, dim]`."""
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} takes no attention_mask (diffusers' Wan passes None)")
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None and encoder_hidden_states is not None:
            image_len = encoder_hidden_states.shape[1] - WAN_TEXT_LEN
            encoder_hidden_states_img = encoder_hidden_states[:, :image_len]  # [B, L_img, dim]
            encoder_hidden_states = encoder_hidden_states[:, image_len:]  # [B, 512, dim]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)  # [B, S, H*D]
        query, key = attn.norm_q(query), attn.norm_k(key)  # RMS norm across all heads, before the head split
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, S, H, D]

        if encoder_hidden_states is None:
            out = self.self_attention(attn, hidden_states, query, key, value, rotary_emb)  # [B, S_q, H, D]
        else:
            out = self.local(query, key, value)  # [B, S_q, H, D]
        out = out.flatten(2, 3).type_as(query)  # [B, S_q, H*D]

        if encoder_hidden_states_img is not None:  # Wan 2.1 I2V: image branch, added to the text output
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)  # [B, L_img, H*D]
            key_img = attn.norm_added_k(key_img)
            key_img, value_img = (t.unflatten(2, (attn.heads, -1)) for t in (key_img, value_img))
            out = out + self.local(query, key_img, value_img).flatten(2, 3).type_as(query)

        out = attn.to_out[0](out)  # Linear
        return attn.to_out[1](out)  # Dropout

    def self_attention(
        self, attn: WanAttention, hidden_states: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """q, k, v `[B, S, H, D]` (the full sequence) -> `[B, S, H, D]`."""
        return self.local(query, key, value, freqs_cis=rotary_emb)


class WanDistributedAttnProcessor(WanLocalAttnProcessor):
    """Ulysses self-attention on a sequence shard; cross-attention stays local.

    Reads `state.original_seq_len` (the unpadded token count set by the sharding hook); without a state the input
    is taken as unpadded. RoPE is applied after the all-to-all with the full tables `[1, S, 1, D]`.
    """

    def __init__(
        self, num_heads: int, head_dim: int, state: ShardingState | None = None, *, backend: str | None = None
    ) -> None:
        super().__init__(num_heads, head_dim, backend=backend)
        if state is None and get_sequence_parallel_groups().sp_size > 1:
            raise ValueError(f"{type(self).__name__} without a ShardingState under sequence parallelism (P = "
                             f"{get_sequence_parallel_groups().sp_size}): the token sequence must be sharded too; "
                             "use diffusers_dist_attn.models.parallelize(...)")
        self.state = state
        group = None if state is None else state.layer_group
        self.attention = DistributedAttention(num_heads, head_dim, process_group=group, default_backend=backend)

    def _seq_len(self) -> int | None:
        return None if self.state is None else self.state.original_seq_len

    def self_attention(self, attn, hidden_states, query, key, value, rotary_emb):
        """q, k, v `[B, S_loc, H, D]` (this rank's shard) -> `[B, S_loc, H, D]`."""
        out, _ = self.attention(query, key, value, original_seq_len=self._seq_len(), freqs_cis=rotary_emb)
        return out


class WanVSAAttnProcessor(WanDistributedAttnProcessor):
    """Video Sparse Attention (distributed) for self-attention; cross-attention stays local.

    Reads the post-patch grid and this step's sparsity from the `ShardingState` (`None` = dense attention for this
    step); the gate is `attn.to_gate_compress(hidden_states)` (see `add_gate_compress`).
    """

    def __init__(
        self, num_heads: int, head_dim: int, state: ShardingState, *, implementation: str | None = None,
        backend: str | None = None,
    ) -> None:
        if state is None:
            raise ValueError("WanVSAAttnProcessor needs a ShardingState (grid and sparsity); use parallelize(...)")
        super().__init__(num_heads, head_dim, state, backend=backend)
        self.implementation = implementation
        self.sparse = DistributedAttention_VSA(num_heads, head_dim, process_group=state.layer_group,
                                               default_backend=backend)

    def self_attention(self, attn, hidden_states, query, key, value, rotary_emb):
        """q, k, v `[B, S_loc, H, D]`, gate from `hidden_states [B, S_loc, dim]` -> `[B, S_loc, H, D]`."""
        if self.state.sparsity is None:
            return super().self_attention(attn, hidden_states, query, key, value, rotary_emb)
        gate_proj = getattr(attn, GATE_NAME, None)
        if gate_proj is None:
            raise ValueError(f"VSA needs attn1.{GATE_NAME}; call add_gate_compress(model) (parallelize does)")
        gate = gate_proj(hidden_states).unflatten(2, (attn.heads, -1))  # [B, S_loc, H, D]
        out, _ = self.sparse(
            query, key, value, gate_compress=gate, original_seq_len=self._seq_len(), freqs_cis=rotary_emb,
            grid_size=self.state.grid, sparsity=self.state.sparsity, implementation=self.implementation,
        )
        return out


# --------------------------------------------------------------------------------------------------------------
# Installing processors
# --------------------------------------------------------------------------------------------------------------
PROCESSOR_KINDS = ("local", "dense", "vsa")


def _attention_modules(model: nn.Module) -> dict[str, WanAttention]:
    """`{processor key: attention module}` in `model.attn_processors` order."""
    return {key: model.get_submodule(key.rsplit(".processor", 1)[0]) for key in model.attn_processors}


def set_wan_attn_processors(
    model: WanTransformer3DModel,
    attention: str = "dense",
    state: ShardingState | None = None,
    *,
    vsa_implementation: str | None = None,
    backend: str | None = None,
) -> None:
    """Install processors on every self- and cross-attention of a Wan transformer in one call.

    `attention`: `"local"` (LocalAttention everywhere, no sharding), `"dense"` (Ulysses self-attention) or `"vsa"`
    (needs `state` and gates, see `add_gate_compress`). Cross-attention always gets `WanLocalAttnProcessor`.
    """
    if attention not in PROCESSOR_KINDS:
        raise ValueError(f"unknown Wan attention {attention!r}; choose one of {list(PROCESSOR_KINDS)}")
    processors = {}
    for key, attn in _attention_modules(model).items():
        heads, head_dim = _heads(attn)
        if attn.is_cross_attention or attention == "local":
            processors[key] = WanLocalAttnProcessor(heads, head_dim, backend=backend)
        elif attention == "dense":
            processors[key] = WanDistributedAttnProcessor(heads, head_dim, state, backend=backend)
        else:
            processors[key] = WanVSAAttnProcessor(heads, head_dim, state, implementation=vsa_implementation,
                                                  backend=backend)
    model.set_attn_processor(processors)  # consumes the dict


# --------------------------------------------------------------------------------------------------------------
# VSA gates
# --------------------------------------------------------------------------------------------------------------
def add_gate_compress(model: WanTransformer3DModel) -> list[int]:
    """Give every block's `attn1` a zero-initialised `to_gate_compress = Linear(dim, dim, bias=True)` (in the
    model's dtype and device) where it has none. Returns the block indices that got a new gate."""
    added = []
    for index, block in enumerate(model.blocks):
        attn = block.attn1
        if getattr(attn, GATE_NAME, None) is not None:
            continue
        ref = attn.to_out[0].weight
        gate = nn.Linear(attn.inner_dim, attn.inner_dim, bias=True, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(gate.weight)
        nn.init.zeros_(gate.bias)
        attn.add_module(GATE_NAME, gate)
        added.append(index)
    return added


def remove_gate_compress(model: WanTransformer3DModel, blocks: list[int] | None = None) -> None:
    """Delete `to_gate_compress` from the given blocks (default: all)."""
    for index, block in enumerate(model.blocks):
        if (blocks is None or index in blocks) and hasattr(block.attn1, GATE_NAME):
            delattr(block.attn1, GATE_NAME)


_GATE_KEY = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.(?:attn1\.)?to_gate_compress\.(weight|bias)$")


def load_gate_compress(
    model: WanTransformer3DModel, source: str | Path | Mapping[str, torch.Tensor]
) -> GateLoadReport:
    """Load VSA gates from a FastVideo-format checkpoint into `model`.

    `source`: a safetensors file, a `.pt/.bin` file (read with `torch.load(weights_only=True)`), a folder (its own
    `*.safetensors`, not subfolders), or a state dict. Accepted keys: `[prefix.]blocks.N.to_gate_compress.{weight,bias}` (FastVideo)
    and `[prefix.]blocks.N.attn1.to_gate_compress.{weight,bias}` (this package). Blocks without a gate get a zero one
    first. Every key is checked before anything is copied: a shape mismatch or a block index the model lacks raises
    `ValueError` naming the key and both shapes.
    """
    def resolve(match):
        index, kind = int(match.group(1)), match.group(2)
        if index >= len(model.blocks):
            raise ValueError(f"gate key {match.string!r} refers to block {index}, but the model has "
                             f"{len(model.blocks)} blocks")
        return index, getattr(model.blocks[index].attn1, GATE_NAME).get_parameter(kind), \
            f"blocks.{index}.attn1.{GATE_NAME}.{kind}"

    added = add_gate_compress(model)
    try:
        return load_matching_gates(source, _GATE_KEY, resolve, range(len(model.blocks)))
    except BaseException:
        remove_gate_compress(model, added)  # leave the model as it was
        raise


# --------------------------------------------------------------------------------------------------------------
# The sharding plan
# --------------------------------------------------------------------------------------------------------------
def _wan_grid(model: WanTransformer3DModel, inputs: Mapping[str, Any]) -> tuple[int, int, int]:
    """Post-patch `(T, H, W)` from `hidden_states [B, C, F, H, W]`."""
    hidden_states = inputs["hidden_states"]
    p_t, p_h, p_w = model.config.patch_size
    _, _, frames, height, width = hidden_states.shape
    return frames // p_t, height // p_h, width // p_w


def _install_wan(model: WanTransformer3DModel, state: ShardingState, *, vsa_implementation: str | None = None,
                 backend: str | None = None):
    added = add_gate_compress(model) if state.attention == "vsa" else []
    set_wan_attn_processors(model, state.attention, state, vsa_implementation=vsa_implementation, backend=backend)
    return (lambda: remove_gate_compress(model, added)) if added else None


WAN_PLAN = ShardingPlan(
    name="Wan",
    shard_inputs={
        "": (ShardInput("timestep", dim=1, ndim=2),),  # Wan 2.2 TI2V per-token timesteps [B, S]
        "blocks.0": (ShardInput("hidden_states", dim=1),),  # post-patch tokens [B, S, dim]
    },
    gather_output="proj_out",  # [B, S_loc, C_out*prod(patch)]: gathering after proj_out moves the fewest bytes
    grid=_wan_grid,
    num_heads=lambda model: model.config.num_attention_heads,
    install=_install_wan,
    attentions=("dense", "vsa", "local"),
    load_gates=load_gate_compress,
)
register_plan(WanTransformer3DModel, WAN_PLAN)
