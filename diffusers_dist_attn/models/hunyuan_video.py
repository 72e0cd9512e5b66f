"""HunyuanVideo in diffusers: sequence-parallel and sparse attention processors and the sharding plan.

Covers `HunyuanVideoTransformer3DModel` (20 dual-stream + 40 single-stream blocks; T2V and both I2V variants:
`latent_concat`, and `token_replace` whose global first-frame token count is translated per rank) and
`HunyuanVideo15Transformer3DModel` (dual-stream only; its dense `[B, 1, S, S]` mask is never built: the processor
takes the `[B, L]` text mask the model passes). Layout under sequence parallelism of degree P (FastVideo's
replicated-text design, registered with `models.sharding`):

- latent (video) tokens are sharded after the patch embedding (input of the first block): rank r holds rows
  `[r*S_loc, (r+1)*S_loc)` of the post-patch sequence, zero-padded to `P*S_loc`; text tokens (after the token
  refiner, which keeps its stock local attention over the full text) are replicated on every rank;
- every joint attention runs `DistributedAttention`: one all-to-all gives each rank the full video sequence for
  its share of the heads (uneven shares and Ulysses x ring layouts are the layer's business), RoPE is applied
  there with the full rotary tables, the rank's heads of the text are appended after the video (key order
  `[video ; text]`, the stock joint order), padded text keys never get weight, and the text output is
  all-gathered over heads, so it is identical on every rank;
- single-stream blocks concatenate `[local latent shard ; full text]` before their norm and MLP; both are
  per-token, so every row stays right, and the processor splits at `-L` exactly like the stock one;
- the output of `proj_out` (per-token; `p_t*p*p*C_out` = 64 channels instead of 3072 for the real model, 48x
  fewer bytes than gathering before it) is all-gathered and the padding dropped before unpatchify.

Video Sparse Attention (`attention="vsa"`), beyond FastVideo (which refuses replicated tokens with VSA): video
queries attend to their top-k 4x4x4 video tiles (chosen per head by the coarse tile-mean stage, which sees video
only) *and* to all valid text keys, in one softmax; text queries attend densely to every video token and valid
text key; the coarse output is added to video rows through the per-block gate `attn.to_gate_compress`
(`Linear(dim, dim)`, zero-initialised, so a dense checkpoint starts as "sparse fine stage + dense text"). At
sparsity 0 with a zero gate this is exactly dense joint attention.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..attention.layers import DistributedAttention, DistributedAttention_VSA
from ..attention.rotary import RotaryTables
from .gates import GateLayout, GateLoadReport
from .processors import SequenceParallelAttnProcessor, install_processors
from .sharding import ShardingPlan, ShardingState, ShardInput, register_plan

__all__ = [
    "HunyuanVideoDistributedAttnProcessor",
    "HUNYUAN_VIDEO_PLAN",
    "HUNYUAN_VIDEO_15_PLAN",
    "text_key_mask",
    "joint_attention_modules",
    "add_gate_compress",
    "remove_gate_compress",
    "load_gate_compress",
    "HUNYUAN_VIDEO_GATES",
]


def text_key_mask(
    attention_mask: torch.Tensor | None, batch: int, text_len: int, video_lens: tuple[int, ...], where: str
) -> torch.Tensor | None:
    """The text key-padding mask `[B, L]` (bool, True = attend) from the mask a block passes to attention.

    HunyuanVideo passes a bool key mask `[B, 1, 1, N]` over the joint keys `[latent ; text]` (`N = S + L`, every
    latent key True, valid text first); whether `S` is the full or this rank's token count, its last `L` entries
    are the text key mask. HunyuanVideo-1.5 passes the text key mask `[B, L]` itself. Anything else (a
    query-dependent `[B, 1, N, N]` mask, a float additive mask, a wrong length) raises, naming `where`.
    """
    if attention_mask is None:
        return None
    joint = [[batch, 1, 1, s + text_len] for s in video_lens]
    if attention_mask.dtype != torch.bool:
        raise ValueError(f"{where}: the attention mask must be bool (True = attend); got {attention_mask.dtype}")
    shape = list(attention_mask.shape)
    if shape == [batch, text_len]:
        return attention_mask
    if shape in joint:
        return attention_mask[:, 0, 0, -text_len:]
    raise ValueError(
        f"{where}: attention mask has shape {shape}; expected the text key mask [batch, text_tokens] = "
        f"{[batch, text_len]} or the joint key mask [batch, 1, 1, video_tokens + text_tokens] = one of {joint}"
    )


class HunyuanVideoDistributedAttnProcessor(SequenceParallelAttnProcessor):
    """Drop-in for `HunyuanVideoAttnProcessor2_0` / `HunyuanVideo15AttnProcessor2_0` (dual- and single-stream).

    `__call__(attn, hidden_states [B, S_loc, C], encoder_hidden_states [B, L, C], attention_mask, image_rotary_emb
    (cos, sin) [S, D] over the full grid) -> (latent [B, S_loc, C], text [B, L, C])`. Dual-stream blocks
    (`attn.add_q_proj` set) project the text with the added projections and apply `to_out` / `to_add_out`;
    single-stream blocks (`pre_only`) project `[latent ; text]` with shared weights and return both parts
    unprojected, as the stock processor does.

    `attention` (see `models/processors.py`): `"local"` joint attention over the full sequence on this process,
    `"dense"` Ulysses, `"vsa"` Video Sparse Attention with the gate `attn.to_gate_compress` (see
    `add_gate_compress`). Per-forward values come from `state` (a `ShardingState`: unpadded video length, grid,
    this step's sparsity, where `None` = dense at this step); without a state it is a single-process dense drop-in.
    `backend`: dense attention backend override.

    Padded text tokens are inert: their keys never get weight and their attention outputs are zero (as
    HunyuanVideo-1.5's query-and-key mask makes them; HunyuanVideo computes values for them that nothing reads).
    When every sample's valid text is a prefix of the same length `n` (always at batch 1, i.e. every denoising
    call of the pipeline), the padded text tokens are dropped instead of masked, so attention runs without a mask
    (flash / cuDNN kernels); `n` is read once per forward (one device sync) and cached in `state.extras` (not
    under `torch.compile`, which takes the masked path).
    """

    def build_layers(self, num_heads: int, head_dim: int) -> None:
        layer_args = {**self.layer_args(), "prefix": self.name}  # "local": the joint layer without communication
        self.dense = DistributedAttention(num_heads, head_dim, **layer_args)
        if self.attention == "vsa":
            self.sparse = DistributedAttention_VSA(num_heads, head_dim, **layer_args)
        self._cache: dict[str, Any] = {}  # without a state: one-entry cache of the text prefix length

    @staticmethod
    def _qkv(
        projections: tuple[nn.Module, nn.Module, nn.Module], norms: tuple[nn.Module | None, nn.Module | None],
        x: torch.Tensor, heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`x [B, S, C]` -> q, k, v `[B, S, H, D]`, with the per-head QK-norm (RMSNorm over D)."""
        q, k, v = (proj(x).unflatten(2, (heads, -1)) for proj in projections)
        q = norms[0](q) if norms[0] is not None else q
        k = norms[1](k) if norms[1] is not None else k
        return q, k, v

    def _text_prefix_len(self, attention_mask: torch.Tensor, text_mask: torch.Tensor) -> int | None:
        """`n` when every row of `text_mask [B, L]` is `n >= 1` True entries followed by False ones, else None.

        Cached per mask tensor (the model passes one mask object to every block of a forward). Under
        `torch.compile` (e.g. `compile_repeated_blocks`) it returns None: the masked path needs no device sync."""
        if torch.compiler.is_compiling():
            return None
        cache = self.state.extras if self.state is not None else self._cache
        hit = cache.get("hunyuan_text_prefix")
        if hit is not None and hit[0] is attention_mask:
            return hit[1]
        lengths = text_mask.sum(1)  # [B]
        prefix = torch.arange(text_mask.shape[1], device=text_mask.device) < lengths[:, None]
        is_prefix, n = torch.stack([(text_mask == prefix).all() & (lengths == lengths[0]).all(), lengths[0]]).tolist()
        result = int(n) if is_prefix and n >= 1 else None
        cache["hunyuan_text_prefix"] = (attention_mask, result)
        return result

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: RotaryTables | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_call()
        if encoder_hidden_states is None:
            raise ValueError(f"{self.name}: HunyuanVideo joint attention needs encoder_hidden_states (text tokens)")
        seq_len = self.seq_len
        batch, video_len, _ = hidden_states.shape  # video: [B, S_loc, C]
        text_len = encoder_hidden_states.shape[1]  # text:  [B, L, C]
        text_mask = text_key_mask(attention_mask, batch, text_len, (video_len, seq_len or video_len), self.name)

        # 1. Projections + per-head QK-norm: video q, k, v [B, S_loc, H, D]; text tq, tk, tv [B, L, H, D].
        norms = (attn.norm_q, attn.norm_k)
        if attn.add_q_proj is not None:  # dual-stream: separate text projections
            q, k, v = self._qkv((attn.to_q, attn.to_k, attn.to_v), norms, hidden_states, attn.heads)
            tq, tk, tv = self._qkv((attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                                   (attn.norm_added_q, attn.norm_added_k), encoder_hidden_states, attn.heads)
        else:  # single-stream: shared projections over [latent ; text]
            joint = torch.cat([hidden_states, encoder_hidden_states], dim=1)  # [B, S_loc + L, C]
            qkv = self._qkv((attn.to_q, attn.to_k, attn.to_v), norms, joint, attn.heads)
            (q, tq), (k, tk), (v, tv) = (t.split([video_len, text_len], dim=1) for t in qkv)

        # 2. Attention over [video (all ranks) ; text]: RoPE on video only (after the all-to-all, full tables),
        #    padded text keys dropped (common valid prefix of n tokens) or masked. Out: video [B, S_loc, H, D]
        #    (this shard), text [B, n or L, H, D] (all heads, identical on every rank).
        valid = self._text_prefix_len(attention_mask, text_mask) if text_mask is not None else None
        if valid is not None:
            tq, tk, tv, text_mask = tq[:, :valid], tk[:, :valid], tv[:, :valid], None
        common = {"original_seq_len": seq_len, "freqs_cis": image_rotary_emb, "replicated_mask": text_mask}
        sparsity = self.sparsity
        if sparsity is not None:
            gate = self.gate(attn, hidden_states)  # [B, S_loc, H, D]
            out, text_out = self.sparse(q, k, v, tq, tk, tv, gate, grid_size=self.state.grid, sparsity=sparsity,
                                        implementation=self.vsa_implementation, **common)
        else:
            out, text_out = self.dense(q, k, v, tq, tk, tv, **common)
        if valid is not None:  # padded text rows: zero
            text_out = torch.nn.functional.pad(text_out, (0, 0, 0, 0, 0, text_len - valid))
        elif text_mask is not None:
            text_out = text_out * text_mask[:, :, None, None]
        hidden_states = out.flatten(2, 3).to(q.dtype)  # [B, S_loc, C]
        encoder_hidden_states = text_out.flatten(2, 3).to(q.dtype)  # [B, L, C]

        # 3. Output projections (dual-stream only; single-stream blocks project after their MLP).
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


# ---------------------------------------------------------------------------------------------------------------
# Model checks
# ---------------------------------------------------------------------------------------------------------------
_PROCESSOR_PARAMS = ("attn", "hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
_BLOCK_LISTS = (("transformer_blocks", True), ("single_transformer_blocks", False))


def joint_attention_modules(transformer: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """`{"transformer_blocks.i.attn": (attention, True), "single_transformer_blocks.j.attn": (attention, False)}`.

    Raises `ValueError` naming the module when a block does not look like HunyuanVideo's: not a diffusers
    `Attention`, missing projections, or a processor whose `__call__` lacks `HunyuanVideoAttnProcessor2_0`'s
    arguments (the legacy `Attention.forward` silently drops keywords a processor does not declare).
    """
    from diffusers.models.attention_processor import Attention

    found: dict[str, tuple[nn.Module, bool]] = {}
    for list_name, dual in _BLOCK_LISTS:
        blocks = getattr(transformer, list_name, None)
        if blocks is None and not dual:
            continue  # HunyuanVideo-1.5 has dual-stream blocks only
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{type(transformer).__name__} has no ModuleList `{list_name}`; not a HunyuanVideo model")
        for i, block in enumerate(blocks):
            name = f"{list_name}.{i}.attn"
            attn = getattr(block, "attn", None)
            if not isinstance(attn, Attention):
                raise ValueError(f"{name}: expected a diffusers `Attention`, found {type(attn).__name__}")
            needed = ("to_q", "to_k", "to_v") + (("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_out")
                                                  if dual else ())
            missing = [p for p in needed if getattr(attn, p, None) is None]
            if missing:
                raise ValueError(f"{name}: {'dual' if dual else 'single'}-stream attention lacks {missing}")
            if not dual and (attn.add_q_proj is not None or getattr(attn, "to_out", None) is not None):
                raise ValueError(f"{name}: a single-stream block must have no text projections and no to_out "
                                 "(pre_only=True)")
            processor = attn.get_processor()
            params = set(inspect.signature(processor.__call__).parameters)
            if not set(_PROCESSOR_PARAMS[1:]) <= params:
                raise ValueError(
                    f"{name}: processor {type(processor).__name__}{inspect.signature(processor.__call__)} does not "
                    f"match HunyuanVideoAttnProcessor2_0's signature {_PROCESSOR_PARAMS} "
                    f"(missing {sorted(set(_PROCESSOR_PARAMS[1:]) - params)})"
                )
            found[name] = (attn, dual)
    return found


HUNYUAN_VIDEO_GATES = GateLayout(
    attentions=lambda model: {name: attn for name, (attn, _dual) in joint_attention_modules(model).items()},
    key=re.compile(r"^(?:.*\.)?(?P<blocks>transformer_blocks|single_transformer_blocks)\.(?P<index>\d+)\."
                   r"(?:attn\.)?to_gate_compress\.(?P<param>weight|bias)$"),
    module_of=lambda match: f"{match['blocks']}.{int(match['index'])}.attn",
)
"""HunyuanVideo's gates: `{transformer_blocks,single_transformer_blocks}.N.attn.to_gate_compress` (keys
`[prefix.]{transformer_blocks,single_transformer_blocks}.N[.attn].to_gate_compress.*`); `missing_blocks` holds
attention module names."""

add_gate_compress = HUNYUAN_VIDEO_GATES.add
"""`add_gate_compress(model) -> [module name]`: a zero-initialised gate for every joint attention without one."""
remove_gate_compress = HUNYUAN_VIDEO_GATES.remove
"""`remove_gate_compress(model, names=None)`: delete the gates (default: every joint attention's)."""
load_gate_compress: Callable[[nn.Module, Any], GateLoadReport] = HUNYUAN_VIDEO_GATES.load
"""`load_gate_compress(model, source) -> GateLoadReport`: gates from a state dict, a safetensors / `.pt` file or a
folder, all or nothing (see `GateLayout.load`)."""


# ---------------------------------------------------------------------------------------------------------------
# The sharding plans
# ---------------------------------------------------------------------------------------------------------------
def _grid(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[int, int, int]:
    """Post-patch `(T, H, W)` from `hidden_states [B, C, F, H, W]`; also checks the text masks (it runs in the
    sharding hook's validation, so a bad mask on one rank fails every rank)."""
    _check_text_masks(inputs)
    latents = inputs.get("hidden_states")
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        raise ValueError("HunyuanVideo expects hidden_states [batch, channels, frames, height, width]; got "
                         f"{None if latents is None else getattr(latents, 'shape', type(latents).__name__)}")
    cfg = model.config
    _, _, frames, height, width = latents.shape
    return frames // cfg.patch_size_t, height // cfg.patch_size, width // cfg.patch_size


def _check_text_masks(inputs: Mapping[str, Any]) -> None:
    """Every `encoder_attention_mask*` must be `[batch, tokens]` of its `encoder_hidden_states*`."""
    for suffix in ("", "_2"):
        text, mask = inputs.get(f"encoder_hidden_states{suffix}"), inputs.get(f"encoder_attention_mask{suffix}")
        if not (isinstance(text, torch.Tensor) and isinstance(mask, torch.Tensor)):
            continue
        if tuple(mask.shape) != tuple(text.shape[:2]):
            raise ValueError(
                f"encoder_attention_mask{suffix} has shape {list(mask.shape)}; expected [batch, text_tokens] = "
                f"{list(text.shape[:2])} matching encoder_hidden_states{suffix} {list(text.shape)}"
            )


def _install(
    model: nn.Module, state: ShardingState, *, vsa_implementation: str | None = None, backend: str | None = None,
) -> Callable[[], None]:
    """Install the processors (and VSA gates), input checks and the I2V token-replace translation; returns undo."""
    modules = {name: attn for name, (attn, _dual) in joint_attention_modules(model).items()}
    cfg = model.config
    added_gates = add_gate_compress(model) if state.attention == "vsa" else []
    install_processors(modules, {name: HunyuanVideoDistributedAttnProcessor(
        cfg.num_attention_heads, cfg.attention_head_dim, state=state, attention=state.attention, name=name,
        vsa_implementation=vsa_implementation, backend=backend,
    ) for name in modules})
    hooks = []
    if getattr(cfg, "image_condition_type", None) == "token_replace":
        for list_name, _dual in _BLOCK_LISTS:
            for block in getattr(model, list_name):
                hooks.append(block.register_forward_pre_hook(_token_replace_hook(state), with_kwargs=True))

    def undo() -> None:
        for hook in hooks:
            hook.remove()
        remove_gate_compress(model, added_gates)

    return undo


def _token_replace_hook(state: ShardingState):
    """I2V `token_replace` blocks modulate the first `num_tokens` (global: first frame) rows separately; on rank r
    the first-frame rows of its shard are its first `clamp(num_tokens - r*S_loc, 0, S_loc)` rows."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if state.sp_size == 1:
            return None
        local = state.local_seq_len
        if "num_tokens" in kwargs:
            return args, {**kwargs, "num_tokens": min(max(kwargs["num_tokens"] - state.sp_rank * local, 0), local)}
        if len(args) < 7:
            raise ValueError(f"{type(module).__name__}: expected num_tokens as the 7th argument of a "
                             "token-replace block")
        num_tokens = min(max(args[6] - state.sp_rank * local, 0), local)
        return (*args[:6], num_tokens, *args[7:]), kwargs

    return hook


HUNYUAN_VIDEO_PLAN = ShardingPlan(
    name="HunyuanVideo",
    shard_inputs={"transformer_blocks.0": (ShardInput("hidden_states"),)},  # patch-embedded latent [B, S, dim]
    gather_output="proj_out",  # [B, S_loc, p_t*p*p*C_out] -> [B, S, ...]
    grid=_grid,
    num_heads=lambda model: model.config.num_attention_heads,
    install=_install,
    attentions=("dense", "vsa", "local"),
    load_gates=load_gate_compress,
)
HUNYUAN_VIDEO_15_PLAN = dataclasses.replace(HUNYUAN_VIDEO_PLAN, name="HunyuanVideo-1.5")  # same cut points
register_plan("HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO_PLAN)
register_plan("HunyuanVideo15Transformer3DModel", HUNYUAN_VIDEO_15_PLAN)
