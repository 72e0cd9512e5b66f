"""Wan text-to-video for `diffusers-dist-attn generate`: an embedded tiny pipeline built offline, and local folders.

The tiny pipeline is built entirely in code (no download): a UMT5 encoder from a small config, a T5 tokenizer built
from an in-code vocabulary (transformers 5 `T5Tokenizer(vocab=[(piece, score), ...])`; `T5Tokenizer(vocab_file=...)`
would silently yield a 4-token vocabulary), a small `AutoencoderKLWan`, a Wan transformer and a flow-matching
scheduler; random weights from a fixed seed, so every process builds the same pipeline.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from . import check_pipeline_folder, vae_config_int

__all__ = [
    "NAME",
    "DEFAULTS",
    "TRANSFORMER_PRESETS",
    "tiny_transformer_config",
    "build_tiny_tokenizer",
    "build_tiny_pipeline",
    "load_pipeline",
    "check_folder",
    "temporal_compression",
    "SIZE_MULTIPLE",
    "call_kwargs",
    "cast_keeping_fp32_modules",
]

NAME = "wan"
SIZE_MULTIPLE = 16  # WanPipeline.check_inputs: height and width divisible by 16 (VAE 8 x patch 2)

DEFAULTS: dict[str, Any] = {
    "height": 64,
    "width": 96,
    "num_frames": 9,
    "steps": 4,
    "guidance_scale": 5.0,
    "prompt": "a red car drives in the park under a blue sky",
    "negative_prompt": "blurry video",
}

# Transformer configs by name. "tiny": diffusers' own test config with 4 heads (so SP 1, 2, 4 all work);
# "wan2.1-t2v-1.3b": the real Wan 2.1 1.3B transformer shape (random weights), for GPU benchmarks.
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ),
    "wan2.1-t2v-1.3b": dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
}

_WORDS = ("a an the red blue green cat dog car bird drives runs flies walks in on under over park street sky "
          "grass water video of and with blurry low quality").split()


def tiny_transformer_config(preset: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A `WanTransformer3DModel` config dict (a copy of `TRANSFORMER_PRESETS[preset]` with `overrides`)."""
    if preset not in TRANSFORMER_PRESETS:
        raise ValueError(f"unknown Wan transformer preset {preset!r}; known: {sorted(TRANSFORMER_PRESETS)}")
    return {**TRANSFORMER_PRESETS[preset], **overrides}


def build_tiny_tokenizer():
    """A T5 (unigram) tokenizer built in code: `<pad>`, `</s>`, `<unk>` at ids 0, 1, 2, word pieces, characters."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS] + [(c, -20.0) for c in chars] + [("\u2581", -30.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_pipeline(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    transformer_preset: str = "tiny",
    two_transformers: bool = False,
    **transformer_overrides: Any,
):
    """The embedded tiny Wan text-to-video pipeline (offline, random weights from `seed`).

    `two_transformers=True` builds a Wan 2.2 A14B-style pipeline (`transformer` for high noise, `transformer_2` for
    low noise, `boundary_ratio=0.875`). The VAE stays fp32; transformer and text encoder use `dtype`.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    config = tiny_transformer_config(transformer_preset, **transformer_overrides)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=config["text_dim"], d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=config["in_channels"], dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    transformer = WanTransformer3DModel(**config).eval()
    transformer_2 = WanTransformer3DModel(**config).eval() if two_transformers else None
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler, transformer_2=transformer_2,
                       boundary_ratio=0.875 if two_transformers else None)
    if dtype != torch.float32:
        text_encoder.to(dtype)
        for model in (transformer, transformer_2):
            if model is not None:
                cast_keeping_fp32_modules(model, dtype)
    return pipe


def cast_keeping_fp32_modules(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)` except the modules diffusers keeps in fp32 (as `from_pretrained(torch_dtype=...)` does)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if not any(part in keep for part in name.split(".")):
            param.data = param.data.to(dtype)


def temporal_compression(path: str | Path | None = None) -> int:
    """Frames per latent frame of the VAE (`scale_factor_temporal` in `path/vae/config.json`; 4 for the embedded
    VAE and when the folder does not say): `WanPipeline` decodes `4k + 1` frames and rounds other counts down."""
    return vae_config_int(path, "scale_factor_temporal", default=4)


def check_folder(path: str | Path) -> Path:
    """`path` if it is a local diffusers Wan text-to-video folder (`WanPipeline`, Wan 2.1 or 2.2) -- checked from
    its JSON files, no weights read; `ValueError` naming what was found otherwise."""
    return check_pipeline_folder(path, "wan", ("WanPipeline",), "WanTransformer3DModel")


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """A local diffusers Wan text-to-video folder (`WanPipeline`, Wan 2.1 or 2.2); the VAE is loaded in fp32.

    Raises `ValueError` naming what was found when `path` is not such a folder (`check_folder`).
    """
    from diffusers import AutoencoderKLWan, WanPipeline

    root = check_folder(path)
    vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32)
    return WanPipeline.from_pretrained(root, vae=vae, torch_dtype=dtype)


def call_kwargs(args: argparse.Namespace | Any) -> dict[str, Any]:
    """Keyword arguments for `WanPipeline.__call__` from the CLI options (`cli.RunConfig` or a namespace)."""
    return dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        num_frames=args.num_frames, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
    )
