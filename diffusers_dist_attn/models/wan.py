"""Wan (`diffusers.WanTransformer3DModel`, Wan 2.1 / 2.2): attention processor, VSA gates and the sharding plan.

`WanDistributedAttnProcessor` is a drop-in for diffusers' `WanAttnProcessor.__call__(attn, hidden_states,
encoder_hidden_states=None, attention_mask=None, rotary_emb=None)` and reproduces it step by step: Wan 2.1 I2V
image/text context split, q/k/v projections (fused or not), Q/K RMS norm across all heads before the head split, RoPE
on self-attention, the I2V image branch added to the text output, `to_out`. Attention itself runs on this package's
layers, chosen by `attention=` (see `models/processors.py`):

| attention | self-attention (`attn1`) | cross-attention (`attn2`) |
|---|---|---|
| `"local"` | `LocalAttention` (full sequence, one device) | `LocalAttention` |
| `"dense"` | `DistributedAttention` (Ulysses over the sharded sequence) | `LocalAttention` (local query shard x replicated text / image K/V: exact) |
| `"vsa"` | `DistributedAttention_VSA` with the block's `to_gate_compress` | `LocalAttention` |

`set_wan_attn_processors(model, attention, state)` installs them on every block in one call; `parallelize(pipe,
attention="dense"|"vsa")` (see `models/sharding.py`) also shards the sequence and uses the plan registered here.

VSA gates (`models/gates.py`): every self-attention gets `to_gate_compress = Linear(dim, dim, bias=True)`,
zero-initialised, stored as `blocks.N.attn1.to_gate_compress.{weight,bias}` in the transformer's `state_dict`
(FastVideo names it `blocks.N.to_gate_compress.*`; `load_gate_compress` maps both).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers.models.transformers import transformer_wan
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformer3DModel
from torch import nn

from ..attention.layers import DistributedAttention, DistributedAttention_VSA, LocalAttention
from .gates import GateLayout, GateLoadReport
from .processors import ATTENTION_KINDS, SequenceParallelAttnProcessor, install_processors
from .sharding import ShardingPlan, ShardingState, ShardInput, register_plan

__all__ = [
    "WAN_TEXT_LEN",
    "WanDistributedAttnProcessor",
    "set_wan_attn_processors",
    "add_gate_compress",
    "remove_gate_compress",
    "load_gate_compress",
    "GateLoadReport",
    "WAN_GATES",
    "WAN_PLAN",
    "wan_qkv_projections",
    "wan_added_kv_projections",
]

WAN_TEXT_LEN = 512  # diffusers' Wan: the last 512 context tokens are text, the ones before are image tokens


# --------------------------------------------------------------------------------------------------------------
# Projections: diffusers' private helpers when they exist, else the same computation here
# --------------------------------------------------------------------------------------------------------------
def wan_qkv_projections(
    attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q from `hidden_states [B, S, dim]`, k, v from `encoder_hidden_states [B, L, dim]` (self-attention: None,
    i.e. `hidden_states`) -> each `[B, S or L, H*D]`; fused (`to_qkv` / `to_kv`) or separate projections, as
    diffusers' `_get_qkv_projections` computes them."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:  # self-attention: one fused QKV linear
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        key, value = attn.to_kv(context).chunk(2, dim=-1)  # cross-attention: only K and V fused
        return attn.to_q(hidden_states), key, value
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def wan_added_kv_projections(
    attn: WanAttention, encoder_hidden_states_img: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan 2.1 I2V image K, V from `encoder_hidden_states_img [B, L_img, dim]` -> each `[B, L_img, H*D]`
    (diffusers' `_get_added_kv_projections`)."""
    if getattr(attn, "fused_projections", False):
        return attn.to_added_kv(encoder_hidden_states_img).chunk(2, dim=-1)
    return attn.add_k_proj(encoder_hidden_states_img), attn.add_v_proj(encoder_hidden_states_img)


def projection_helpers(module: Any = transformer_wan) -> tuple[Callable, Callable]:
    """diffusers' private `(_get_qkv_projections, _get_added_kv_projections)` from `module`, or ours where a
    diffusers release renamed or dropped them (they are private; the computation is the same)."""
    return (getattr(module, "_get_qkv_projections", wan_qkv_projections),
            getattr(module, "_get_added_kv_projections", wan_added_kv_projections))


_get_qkv_projections, _get_added_kv_projections = projection_helpers()


# --------------------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------------------
class WanDistributedAttnProcessor(SequenceParallelAttnProcessor):
    """Drop-in for `WanAttnProcessor` on this package's layers; `attention` picks the self-attention strategy.

    Cross-attention (`encoder_hidden_states` given) always runs `LocalAttention`: this rank's query shard against
    the replicated text / image keys is exact. Self-attention: `"local"` `LocalAttention` over the full sequence;
    `"dense"` Ulysses on a sequence shard (reads `state.original_seq_len`, the unpadded token count set by the
    sharding hook; without a state the input is taken as unpadded); `"vsa"` Video Sparse Attention with the grid
    and this step's sparsity from the state (`None` = dense at this step) and the gate
    `attn.to_gate_compress(hidden_states)` (see `add_gate_compress`). RoPE is applied after the all-to-all with
    the full tables `[1, S, 1, D]`. `backend`: dense attention backend override.
    """

    def build_layers(self, num_heads: int, head_dim: int) -> None:
        args = self.layer_args()
        self.local = LocalAttention(num_heads, head_dim, default_backend=args["default_backend"])
        if self.attention != "local":
            self.dense = DistributedAttention(num_heads, head_dim, **args)
        if self.attention == "vsa":
            self.sparse = DistributedAttention_VSA(num_heads, head_dim, **args)

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
        self.check_call()
        if attention_mask is not None:
            raise ValueError(f"{self.name}: {type(self).__name__} takes no attention_mask (diffusers' Wan passes None)")
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None and encoder_hidden_states is not None:
            image_len = encoder_hidden_states.shape[1] - WAN_TEXT_LEN
            encoder_hidden_states_img = encoder_hidden_states[:, :image_len]  # [B, L_img, dim]
            encoder_hidden_states = encoder_hidden_states[:, image_len:]  # [B, 512, dim]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)  # [B, S, H*D]
        query, key = attn.norm_q(query), attn.norm_k(key)  # RMS norm across all heads, before the head split
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, S, H, D]

        if encoder_hidden_states is None:
            out = self._self_attention(attn, hidden_states, query, key, value, rotary_emb)  # [B, S_q, H, D]
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

    def _self_attention(
        self, attn: WanAttention, hidden_states: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """q, k, v `[B, S_loc, H, D]` (this rank's shard; `"local"`: the full sequence) -> `[B, S_loc, H, D]`."""
        if self.dense is None:
            return self.local(query, key, value, freqs_cis=rotary_emb)
        sparsity = self.sparsity
        if sparsity is None:
            out, _ = self.dense(query, key, value, original_seq_len=self.seq_len, freqs_cis=rotary_emb)
            return out
        out, _ = self.sparse(
            query, key, value, gate_compress=self.gate(attn, hidden_states), original_seq_len=self.seq_len,
            freqs_cis=rotary_emb, grid_size=self.state.grid, sparsity=sparsity,
            implementation=self.vsa_implementation,
        )
        return out


# --------------------------------------------------------------------------------------------------------------
# Installing processors
# --------------------------------------------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> dict[str, WanAttention]:
    """`{module path: attention module}` in `model.attn_processors` order (`blocks.N.attn1`, `blocks.N.attn2`)."""
    paths = (key.rsplit(".processor", 1)[0] for key in model.attn_processors)
    return {path: model.get_submodule(path) for path in paths}


def set_wan_attn_processors(
    model: WanTransformer3DModel,
    attention: str = "dense",
    state: ShardingState | None = None,
    *,
    vsa_implementation: str | None = None,
    backend: str | None = None,
) -> None:
    """Install a `WanDistributedAttnProcessor` on every self- and cross-attention of a Wan transformer in one call.

    `attention`: `"local"` (LocalAttention everywhere, no sharding), `"dense"` (Ulysses self-attention) or `"vsa"`
    (needs `state` and gates, see `add_gate_compress`). Cross-attention always gets `attention="local"`. A backend
    set earlier with diffusers' `set_attention_backend` is kept.
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"unknown Wan attention {attention!r}; choose one of {list(ATTENTION_KINDS)}")
    modules = _attention_modules(model)
    processors = {}
    for path, attn in modules.items():
        kind = "local" if attn.is_cross_attention else attention
        processors[path] = WanDistributedAttnProcessor(
            attn.heads, attn.inner_dim // attn.heads, state=state, attention=kind, name=path,
            vsa_implementation=vsa_implementation, backend=backend)
    install_processors(modules, processors)


# --------------------------------------------------------------------------------------------------------------
# VSA gates
# --------------------------------------------------------------------------------------------------------------
WAN_GATES = GateLayout(
    attentions=lambda model: {f"blocks.{i}.attn1": block.attn1 for i, block in enumerate(model.blocks)},
    key=re.compile(r"^(?:.*\.)?blocks\.(?P<index>\d+)\.(?:attn1\.)?to_gate_compress\.(?P<param>weight|bias)$"),
    module_of=lambda match: f"blocks.{int(match['index'])}.attn1",
    label=lambda path: int(path.split(".")[1]),
    unit="block",
)
"""Wan's gates: `blocks.N.attn1.to_gate_compress` (keys `[prefix.]blocks.N[.attn1].to_gate_compress.*`: this
package's and FastVideo's naming); `missing_blocks` holds block indices."""

add_gate_compress = WAN_GATES.add
"""`add_gate_compress(model) -> [module path]`: a zero-initialised gate for every block's `attn1` without one."""
remove_gate_compress = WAN_GATES.remove
"""`remove_gate_compress(model, paths=None)`: delete the gates (default: every block's)."""
load_gate_compress: Callable[[nn.Module, Any], GateLoadReport] = WAN_GATES.load
"""`load_gate_compress(model, source) -> GateLoadReport`: FastVideo-format gates from a safetensors / `.pt` file, a
folder (its own files, not subfolders) or a state dict, all or nothing (see `GateLayout.load`)."""


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
                 backend: str | None = None) -> Callable[[], None] | None:
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
