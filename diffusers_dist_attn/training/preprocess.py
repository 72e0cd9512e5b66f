"""`diffusers-dist-attn preprocess`: videos + captions -> a folder of training samples, with the pipeline's own VAE
and text encoder (the embedded tiny Wan pipeline, or `--model FOLDER`).

Input: a folder of videos (`.mp4 .webm .mov .mkv .avi .gif`), each with a caption in a sidecar `NAME.txt`.
Output: `OUT/NAME.safetensors` with `latents [C, T, H, W]` (normalised as WanPipeline's latents: `(z - mean) / std`
of the VAE config), `prompt_embeds [L, D]` (the valid tokens of the text encoder output) and `prompt_mask [L]`.

Resumable: outputs that exist are skipped (each is written to a temp name, fsynced and renamed, so an existing one
is complete); `--overwrite` recomputes them. Under `torchrun` / `accelerate launch` every rank encodes its share.
A video that cannot be decoded (or is too short) stops the run with exit 2 naming the file; finished samples stay.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .. import atomic

__all__ = ["add_parser", "run", "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


def add_parser(sub: Any) -> None:
    pre = sub.add_parser("preprocess", help="encode videos + captions into a training sample folder (VAE latents, "
                                            "text embeddings)", description=__doc__.split("\n\n")[0])
    pre.add_argument("--videos", required=True, help="folder of videos, each with a NAME.txt caption")
    pre.add_argument("--output-dir", required=True, help="sample folder to write (created if missing)")
    pre.add_argument("--model", default=None,
                     help="local diffusers Wan folder (its vae, tokenizer, text_encoder); default: the embedded tiny "
                          "pipeline (random weights from --seed)")
    pre.add_argument("--height", type=int, default=64, help="pixels, a multiple of 16; default: 64")
    pre.add_argument("--width", type=int, default=64, help="pixels, a multiple of 16; default: 64")
    pre.add_argument("--num-frames", type=int, default=9,
                     help="first N frames of each video, 4k+1; default: 9")
    pre.add_argument("--max-sequence-length", type=int, default=512, help="text tokens; default: 512")
    pre.add_argument("--seed", type=int, default=0, help="embedded pipeline weights; default: 0")
    pre.add_argument("--overwrite", action="store_true", help="recompute samples that exist")
    pre.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    pre.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning",
                     help="default: warning")


def _videos(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """`[(video, caption)]` sorted by name; `ValueError` for every input problem that needs no decoding."""
    from ..pipelines import check_video_size, get_pipeline_module

    folder = Path(args.videos)
    if not folder.is_dir():
        raise ValueError(f"--videos {folder}: no such folder")
    module = get_pipeline_module("wan")
    check_video_size(module, args.height, args.width, args.num_frames, args.model)
    if args.model is not None:
        module.check_folder(args.model)
    if args.max_sequence_length < 1:
        raise ValueError(f"--max-sequence-length {args.max_sequence_length}: must be >= 1")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is an existing file, not a folder")
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not videos:
        raise ValueError(f"--videos {folder}: no videos ({' '.join(VIDEO_SUFFIXES)})")
    stems: dict[str, Path] = {}
    pairs = []
    for video in videos:
        if video.stem in stems:
            raise ValueError(f"videos {stems[video.stem].name} and {video.name} would both write {video.stem}"
                             ".safetensors; rename one")
        stems[video.stem] = video
        caption_file = video.with_suffix(".txt")
        if not caption_file.is_file():
            raise ValueError(f"video {video}: no caption file {caption_file.name}")
        caption = caption_file.read_text(encoding="utf-8").strip()
        if not caption:
            raise ValueError(f"video {video}: caption file {caption_file.name} is empty")
        pairs.append((video, caption))
    return pairs


def _read_frames(video: Path, num_frames: int) -> list:
    from diffusers.utils import load_video

    try:
        frames = load_video(str(video))
    except Exception as exc:  # noqa: BLE001 - decoders raise many types for a broken file
        raise ValueError(f"video {video}: cannot be read ({' '.join(str(exc).split())[:160] or type(exc).__name__})"
                         ) from None
    if len(frames) < num_frames:
        raise ValueError(f"video {video}: {len(frames)} frames, --num-frames {num_frames} needs at least that many")
    return [frame.convert("RGB") for frame in frames[:num_frames]]  # a GIF's first frame can be palette mode


@torch.no_grad()
def _encode(pipe: Any, frames: list, caption: str, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """frames -> `latents [C, T, H, W]`; caption -> `prompt_embeds [L, D]`, `prompt_mask [L]` (valid tokens)."""
    vae = pipe.vae
    device = vae.device
    video = pipe.video_processor.preprocess_video([frames], args.height, args.width)  # [1, 3, F, H, W], [-1, 1]
    z = vae.encode(video.to(device, vae.dtype)).latent_dist.mode()  # [1, C, T, h, w]; mode: deterministic
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    latents = ((z.float() - mean) / std)[0]  # WanPipeline decodes latents * std + mean
    embeds, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False,
                                   max_sequence_length=args.max_sequence_length, device=device)
    tokens = pipe.tokenizer(caption, max_length=args.max_sequence_length, truncation=True, add_special_tokens=True,
                            return_attention_mask=True)
    length = max(1, int(sum(tokens["attention_mask"])))
    return {"latents": latents.cpu().contiguous(), "prompt_embeds": embeds[0, :length].float().cpu().contiguous(),
            "prompt_mask": torch.ones(length)}


def run(args: argparse.Namespace) -> int:
    """Validate everything cheap first (exit 2), then encode the pending videos of this rank."""
    from safetensors.torch import save_file

    from .. import cli
    from ..pipelines import wan

    with cli._user_errors():
        pairs = _videos(args)
    out = Path(args.output_dir)
    pending = [(v, c) for v, c in pairs if args.overwrite or not (out / f"{v.stem}.safetensors").is_file()]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    mine = pending[rank::world]
    skipped = len(pairs) - len(pending)
    if not mine:
        if rank == 0:
            print(f"preprocess: nothing to do ({skipped} of {len(pairs)} samples exist in {out})", flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic.remove_stale_temps(out)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    pipe = (wan.build_tiny_pipeline(args.seed) if args.model is None
            else wan.load_pipeline(args.model, torch.bfloat16 if device.type == "cuda" else torch.float32))
    pipe.to(device)
    bar = None
    if args.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc="preprocess", file=sys.stderr, dynamic_ncols=True)
    try:
        for video, caption in mine:
            with cli._user_errors():
                frames = _read_frames(video, args.num_frames)
            sample = _encode(pipe, frames, caption, args)
            meta = {"caption": caption, "source": video.name}
            atomic.atomic_file(out / f"{video.stem}.safetensors",
                             lambda tmp, s=sample, m=meta: save_file(s, str(tmp), metadata=m))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    print(f"preprocess: rank {rank} wrote {len(mine)} samples to {out} ({skipped} existed)", flush=True)
    return 0
