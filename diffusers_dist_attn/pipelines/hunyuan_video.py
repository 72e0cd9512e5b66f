"""HunyuanVideo text-to-video for `diffusers-dist-attn generate --pipeline hunyuan-video`: an embedded tiny
pipeline built offline, and local diffusers folders (the registry interface of `pipelines/__init__.py`).

The tiny pipeline is built entirely in code, nothing is downloaded, random weights from a fixed seed (so every
process builds the same one): a Llama tokenizer (WordPiece over a few words, single characters and `##`
continuations, so any ASCII prompt tokenizes; chat special tokens) and a CLIP tokenizer (byte-level BPE without
merges), both made with the `tokenizers` library and wrapped in transformers' `LlamaTokenizer` / `CLIPTokenizer`;
a 3-layer `LlamaModel` and a 2-layer `CLIPTextModel` from configs; a tiny `AutoencoderKLHunyuanVideo`; diffusers'
tiny HunyuanVideo test transformer with 4 heads; `FlowMatchEulerDiscreteScheduler`. The prompt template is a short
HunyuanVideo-style chat template whose prefix length (`crop_start`) is computed from the tokenizer; text is padded
to 256 tokens as in the real pipeline, so the text mask is partly padded.
"""

from __future__ import annotations

import argparse
import functools
import string
from pathlib import Path
from typing import Any

import torch

from . import check_pipeline_folder, class_name_of, vae_config_int

__all__ = [
    "NAME",
    "DEFAULTS",
    "TRANSFORMER_PRESETS",
    "TinyHunyuanVideoPipeline",  # noqa: F822 - provided by the module __getattr__ (built on first use)
    "build_tokenizers",
    "tiny_prompt_template",
    "build_tiny_pipeline",
    "load_pipeline",
    "check_folder",
    "temporal_compression",
    "SIZE_MULTIPLE",
    "call_kwargs",
]

NAME = "hunyuan-video"
SIZE_MULTIPLE = 16  # HunyuanVideoPipeline.check_inputs: height and width divisible by 16

DEFAULTS: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "num_frames": 9,  # latent 3 x 4 x 4 = 48 tokens (VAE 4x temporal, 8x spatial; patch 1)
    "steps": 2,
    "guidance_scale": 6.0,  # HunyuanVideo's embedded (distilled) guidance; true CFG needs true_cfg_scale > 1
    "prompt": "A cat walks on the grass, realistic",
    "negative_prompt": "",
}

# Transformer configs: "tiny" = diffusers' test config with 4 heads (SP 1, 2, 4); "hunyuan-video" = the real 13B
# shape (24 heads x 128, 20 dual + 40 single blocks, random weights), for GPU benchmarks.
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ),
    "hunyuan-video": dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56),
    ),
}

# A short HunyuanVideo-style chat template; the tiny tokenizer's `crop_start` is computed from its prefix.
_SYSTEM = "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video.<|eot_id|>"
_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
_LLAMA_SPECIALS = ["<pad>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
_CLIP_SPECIALS = ["<|endoftext|>", "<unk>", "<|startoftext|>"]
_WORDS = ("a an the of and in on with to is are at by from describe video system user cat dog walks runs grass "
          "realistic red blue green car city night sky water tree man woman street camera slowly moving").split()


def _wordpiece(specials: list[str], bos: str, eos: str | None):
    """A `tokenizers.Tokenizer`: WordPiece over words, characters and `##` continuations; BOS (+ EOS) template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = specials + _WORDS + list(string.ascii_letters + string.digits + string.punctuation)
    pieces += ["##" + c for c in string.ascii_letters + string.digits]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    single = f"{bos} $A" + (f" {eos}" if eos else "")
    special_ids = [(s, vocab[s]) for s in (bos, eos) if s]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special_ids)
    return tok


def build_tokenizers():
    """`(llama_tokenizer, clip_tokenizer)`, built offline (transformers' tokenizers-backed classes).

    The Llama-side tokenizer is a `PreTrainedTokenizerFast` over the WordPiece model (transformers' `LlamaTokenizer`
    would rebuild a BPE model from files on reload and not round-trip through `save_pretrained`)."""
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

    llama = PreTrainedTokenizerFast(
        tokenizer_object=_wordpiece(_LLAMA_SPECIALS, "<|begin_of_text|>", None), bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>", pad_token="<pad>", unk_token="<unk>", padding_side="right", model_max_length=512,
    )
    # CLIP: byte-level BPE over the 256-symbol byte alphabet, each symbol also with the end-of-word suffix, and no
    # merges (one token per character) -- CLIPTokenizer builds the normaliser, pre-tokeniser and BOS/EOS template.
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = _CLIP_SPECIALS + symbols + [s + "</w>" for s in symbols]
    clip = CLIPTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>",
                         padding_side="right", model_max_length=77)
    return llama, clip


def tiny_prompt_template(llama_tokenizer) -> dict[str, Any]:
    """The tiny template; `crop_start` = tokens before the prompt (BOS + system turn + user header)."""
    prefix = llama_tokenizer(_SYSTEM + _USER, add_special_tokens=True)["input_ids"]
    return {"template": _SYSTEM + _USER + "{}<|eot_id|>", "crop_start": len(prefix)}


@functools.cache
def _tiny_pipeline_class() -> type:
    # built on first use: importing diffusers' HunyuanVideo pipeline (and transformers) costs ~1.5 s, which every
    # command would otherwise pay when it reads this module's DEFAULTS for its help text
    from diffusers import HunyuanVideoPipeline
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    class TinyHunyuanVideoPipeline(HunyuanVideoPipeline):
        """`HunyuanVideoPipeline` whose default prompt template fits its embedded tokenizer.

        diffusers' default template crops the first 95 tokens (the real Llama tokenizer's template prefix); the
        tiny tokenizer splits text differently, so the default is replaced by `tiny_prompt_template(self.tokenizer)`.
        An explicitly passed template is used as given.
        """

        def _get_llama_prompt_embeds(self, prompt, prompt_template, *args, **kwargs):
            if prompt_template == DEFAULT_PROMPT_TEMPLATE:
                prompt_template = tiny_prompt_template(self.tokenizer)
            return super()._get_llama_prompt_embeds(prompt, prompt_template, *args, **kwargs)

    TinyHunyuanVideoPipeline.__module__ = __name__
    TinyHunyuanVideoPipeline.__qualname__ = "TinyHunyuanVideoPipeline"  # importable by name (module __getattr__)
    return TinyHunyuanVideoPipeline


def __getattr__(name: str) -> Any:
    if name == "TinyHunyuanVideoPipeline":
        return _tiny_pipeline_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_tiny_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32, *, transformer_preset: str = "tiny", **transformer_overrides: Any
):
    """The embedded tiny HunyuanVideo text-to-video pipeline (offline, random weights from `seed`).

    Tokenizers built in code (`build_tokenizers`), a 3-layer `LlamaModel` (hidden 16; the pipeline takes its
    third-to-last hidden state) and a 2-layer `CLIPTextModel` (hidden 8 = pooled projection dim) from configs, a
    tiny `AutoencoderKLHunyuanVideo` (4 latent channels, 4x temporal / 8x spatial compression), the transformer
    preset (`TRANSFORMER_PRESETS`, with `transformer_overrides`), `FlowMatchEulerDiscreteScheduler(shift=7)`.
    Transformer and text encoders use `dtype`; the VAE stays fp32.
    """
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    if transformer_preset not in TRANSFORMER_PRESETS:
        raise ValueError(f"unknown HunyuanVideo transformer preset {transformer_preset!r}; "
                         f"known: {sorted(TRANSFORMER_PRESETS)}")
    config = {**TRANSFORMER_PRESETS[transformer_preset], **transformer_overrides}
    llama_tok, clip_tok = build_tokenizers()
    torch.manual_seed(seed)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(llama_tok), hidden_size=config["text_embed_dim"], intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=llama_tok.pad_token_id, bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id,
    )).eval()
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=config["pooled_projection_dim"], intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, projection_dim=8, max_position_embeddings=77,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
    )).eval()
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=config["in_channels"], block_out_channels=(8, 8, 8, 8),
        layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
    ).eval()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # create the transformer's weights in `dtype` (the real-shape preset: 26 GB bf16)
    try:
        transformer = HunyuanVideoTransformer3DModel(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    pipe = _tiny_pipeline_class()(
        tokenizer=llama_tok, text_encoder=text_encoder, tokenizer_2=clip_tok, text_encoder_2=text_encoder_2,
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    if dtype != torch.float32:
        for model in (text_encoder, text_encoder_2):
            for param in model.parameters():  # (ModelMixin.to(dtype) would warn about fp32-kept modules: none here)
                param.data = param.data.to(dtype)
    return pipe


_PIPELINE_CLASSES = ("HunyuanVideoPipeline", "TinyHunyuanVideoPipeline")


def temporal_compression(path: str | Path | None = None) -> int:
    """Frames per latent frame of the VAE (`temporal_compression_ratio` in `path/vae/config.json`; 4 for the
    embedded VAE and when the folder does not say): the pipeline makes `(num_frames - 1) // 4 + 1` latent frames,
    so it decodes `4k + 1` frames and silently rounds other counts down."""
    return vae_config_int(path, "temporal_compression_ratio", default=4)


def check_folder(path: str | Path) -> Path:
    """`path` if it is a local diffusers HunyuanVideo text-to-video folder -- checked from its JSON files, no
    weights read; `ValueError` naming what was found otherwise."""
    return check_pipeline_folder(path, "hunyuan-video", _PIPELINE_CLASSES, "HunyuanVideoTransformer3DModel")


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """A local diffusers HunyuanVideo text-to-video folder (`HunyuanVideoPipeline`, or a saved tiny pipeline); the
    VAE is loaded in fp32 with tiling on. Raises `ValueError` naming what was found when `path` is not such a
    folder (`check_folder`)."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline

    root = check_folder(path)
    classes = {"HunyuanVideoPipeline": HunyuanVideoPipeline, "TinyHunyuanVideoPipeline": _tiny_pipeline_class()}
    vae = AutoencoderKLHunyuanVideo.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32)
    vae.enable_tiling()
    return classes[class_name_of(root / "model_index.json")].from_pretrained(root, vae=vae, torch_dtype=dtype)


def call_kwargs(args: argparse.Namespace | Any) -> dict[str, Any]:
    """Keyword arguments for `HunyuanVideoPipeline.__call__` from the CLI options.

    `guidance_scale` is HunyuanVideo's embedded guidance; a non-empty `negative_prompt` is passed along but only
    takes effect with true classifier-free guidance (`true_cfg_scale > 1`, not set here).
    """
    kwargs = dict(prompt=args.prompt, height=args.height, width=args.width, num_frames=args.num_frames,
                  num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    if getattr(args, "negative_prompt", None):
        kwargs["negative_prompt"] = args.negative_prompt
    return kwargs
