"""Training samples: a folder of safetensors files, or synthetic samples for the embedded tiny model.

One sample is one safetensors file with

| key | shape | dtype |
|---|---|---|
| `latents` | `[C, T, H, W]` (VAE latents, already scaled as the transformer sees them) | floating |
| `prompt_embeds` | `[L, D]` (text encoder output) | floating |
| `prompt_mask` (optional) | `[L]` (1 = real token, 0 = padding) | any |

`diffusers-dist-attn preprocess` writes such folders. Samples are checked from their headers (shapes and dtypes,
no tensor data read) before training starts, so a bad file fails the job before any step runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["SampleInfo", "ModelSpec", "SampleSet", "folder_samples", "synthetic_samples", "collate", "check_samples"]

REQUIRED_KEYS = ("latents", "prompt_embeds")
SYNTHETIC_TEXT_LEN = 16


@dataclass(frozen=True)
class ModelSpec:
    """What a sample must match: `in_channels`, post-patch `patch_size (p_t, p_h, p_w)`, `text_dim`, `num_heads`."""

    in_channels: int
    patch_size: tuple[int, int, int]
    text_dim: int
    num_heads: int

    @classmethod
    def from_config(cls, config: Any) -> ModelSpec:
        get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
        return cls(int(get("in_channels")), tuple(int(p) for p in get("patch_size")), int(get("text_dim")),
                   int(get("num_attention_heads")))


@dataclass(frozen=True)
class SampleInfo:
    """A sample's name and shapes: `latents [C, T, H, W]`, `prompt_embeds [L, D]`, `mask` present or not."""

    name: str
    latents: tuple[int, ...]
    prompt_embeds: tuple[int, ...]
    has_mask: bool = False
    mask: tuple[int, ...] | None = None

    def tokens(self, spec: ModelSpec) -> int:
        """Post-patch token count `T/p_t * H/p_h * W/p_w`."""
        return math.prod(n // p for n, p in zip(self.latents[1:], spec.patch_size, strict=True))


class SampleSet:
    """An indexable set of samples: `infos[i]` (shapes) and `load(i) -> {name: tensor}` (fp32 on CPU)."""

    def __init__(self, infos: Sequence[SampleInfo], loader) -> None:
        self.infos = list(infos)
        self._loader = loader

    def __len__(self) -> int:
        return len(self.infos)

    def load(self, index: int) -> dict[str, torch.Tensor]:
        return self._loader(index)


def _header(path: Path) -> SampleInfo:
    """Shapes from a safetensors header (no tensor data read); `ValueError` naming the file and what is wrong."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: str(handle.get_slice(k).get_dtype()) for k in keys}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a corrupt file
        raise ValueError(f"sample {path}: not a readable safetensors file ({' '.join(str(exc).split())[:200]})"
                         ) from None
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if missing:
        raise ValueError(f"sample {path}: missing {missing} (a sample holds latents [C, T, H, W], prompt_embeds "
                         f"[L, D], optional prompt_mask [L]); has {sorted(keys)}")
    for key in REQUIRED_KEYS:
        if not dtypes[key].upper().startswith(("F", "BF")):  # safetensors names: F32, BF16, F16, F8_E4M3, I64...
            raise ValueError(f"sample {path}: {key} has dtype {dtypes[key]}; expected floating point")
    return SampleInfo(path.name, shapes["latents"], shapes["prompt_embeds"], "prompt_mask" in keys,
                      shapes.get("prompt_mask"))


def folder_samples(folder: str | Path) -> SampleSet:
    """Every `*.safetensors` file of `folder` (not subfolders), sorted by name; `FileNotFoundError` / `ValueError`
    naming the folder or file when it is missing, empty or unreadable."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder")
    files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not files:
        raise FileNotFoundError(f"--data {root}: no *.safetensors sample files in the folder")
    infos = [_header(p) for p in files]

    def load(index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(files[index]))
        except Exception as exc:  # noqa: BLE001 - a file changed or vanished after the header check
            raise ValueError(f"sample {files[index]}: could not be read ({exc})") from None
        return {k: v.float() for k, v in tensors.items() if k in (*REQUIRED_KEYS, "prompt_mask")}

    return SampleSet(infos, load)


def synthetic_samples(count: int, spec: ModelSpec, latent_grid: tuple[int, int, int], seed: int = 0) -> SampleSet:
    """`count` random samples `latents [C, T, H, W]` (`latent_grid` = (T, H, W)), `prompt_embeds [16, D]` and a
    `prompt_mask` whose valid length varies per sample; each one generated on demand from `(seed, index)`, so every
    rank sees the same sample i without storing them."""
    if count < 1:
        raise ValueError(f"--synthetic {count}: needs at least one sample")
    latents = (spec.in_channels, *latent_grid)
    infos = [SampleInfo(f"synthetic-{i:05d}", latents, (SYNTHETIC_TEXT_LEN, spec.text_dim), True,
                        (SYNTHETIC_TEXT_LEN,)) for i in range(count)]

    def load(index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index + 7)
        valid = SYNTHETIC_TEXT_LEN // 2 + index % (SYNTHETIC_TEXT_LEN // 2)
        mask = (torch.arange(SYNTHETIC_TEXT_LEN) < valid).float()
        return {"latents": torch.randn(latents, generator=gen),
                "prompt_embeds": torch.randn(SYNTHETIC_TEXT_LEN, spec.text_dim, generator=gen),
                "prompt_mask": mask}

    return SampleSet(infos, load)


def check_samples(samples: SampleSet, spec: ModelSpec, sp: int, batch_per_group: int, text_length: int) -> None:
    """`ValueError` naming the first sample that does not fit the model (`in_channels`, patch divisibility,
    `text_dim`, at most `text_length` text tokens), the SP degree (at least one token per rank), or its batch mates (samples of one batch are stacked:
    with a batch size > 1 every sample needs the same latent shape)."""
    first = samples.infos[0]
    for info in samples.infos:
        lat, emb = info.latents, info.prompt_embeds
        if len(lat) != 4:
            raise ValueError(f"sample {info.name}: latents have shape {list(lat)}; expected [C, T, H, W]")
        if lat[0] != spec.in_channels:
            raise ValueError(f"sample {info.name}: latents have {lat[0]} channels but the model takes "
                             f"in_channels={spec.in_channels}")
        bad = [f"{axis}={n} (patch {p})" for axis, n, p in zip("THW", lat[1:], spec.patch_size, strict=True)
               if n < p or n % p]
        if bad:
            raise ValueError(f"sample {info.name}: latent grid {list(lat[1:])} does not fit the model's patch size "
                             f"{list(spec.patch_size)}: {', '.join(bad)} must be positive multiples of the patch")
        if info.tokens(spec) < sp:
            raise ValueError(f"sample {info.name}: {info.tokens(spec)} tokens cannot be split over --sp {sp} ranks")
        if len(emb) != 2 or emb[1] != spec.text_dim:
            raise ValueError(f"sample {info.name}: prompt_embeds have shape {list(emb)}; the model takes [L, "
                             f"{spec.text_dim}] (text_dim)")
        if emb[0] > text_length:
            raise ValueError(f"sample {info.name}: {emb[0]} prompt_embeds tokens exceed --text-length {text_length}")
        if info.has_mask and info.mask != (emb[0],):
            raise ValueError(f"sample {info.name}: prompt_mask has shape {list(info.mask or ())}; expected "
                             f"[{emb[0]}] (one entry per prompt_embeds token)")
        if batch_per_group > 1 and lat != first.latents:
            raise ValueError(f"sample {info.name}: latents {list(lat)} differ from {first.name}'s {list(first.latents)};"
                             " with a batch size > 1 per data-parallel group all samples need one latent shape")


def collate(items: Sequence[dict[str, torch.Tensor]], text_length: int) -> dict[str, torch.Tensor]:
    """Stack samples: `latents [B, C, T, H, W]`, `prompt_embeds [B, text_length, D]` with masked tokens and the
    padding up to `text_length` set to zero: exactly what `WanPipeline` feeds at inference (its prompt embeds are
    zero-padded to `max_sequence_length`, 512; Wan takes no text mask, so the padding length matters)."""
    length = text_length
    embeds = []
    for item in items:
        emb = item["prompt_embeds"]
        if "prompt_mask" in item:
            emb = emb * (item["prompt_mask"] != 0).to(emb.dtype)[:, None]
        embeds.append(torch.nn.functional.pad(emb, (0, 0, 0, length - emb.shape[0])))
    return {"latents": torch.stack([item["latents"] for item in items]), "prompt_embeds": torch.stack(embeds)}
