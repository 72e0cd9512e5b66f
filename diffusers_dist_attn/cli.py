"""`diffusers-dist-attn generate` (also `python -m diffusers_dist_attn generate`): text-to-video with this package's
attention, sequence-parallel over however many processes the launcher started.

    diffusers-dist-attn generate                                    # one process, embedded tiny Wan, CPU is fine
    torchrun --nproc_per_node 2 -m diffusers_dist_attn generate --check
    accelerate launch --multi_gpu --num_processes 2 -m diffusers_dist_attn generate --check     # gloo on CPU hosts
    accelerate launch --num_processes 4 -m diffusers_dist_attn generate --model ./Wan2.1-T2V-1.3B-Diffusers \\
        --height 480 --width 832 --num-frames 81 --attention vsa --sparsity 0.9 --gate-checkpoint ./vsa.safetensors

Rank and world size come from `torch.distributed` (torchrun / accelerate / single process). `--sp` defaults to
all processes; with fewer (`--sp 4` on 8 GPUs, or `stock` / `dense-local`, which do not shard) the data-parallel
replicas generate seeds `seed + dp_rank`. Every process of one SP group builds the same pipeline and latents;
global rank 0 shows the progress bar, SP rank 0 writes the video and the JSON report. Bad input fails before any work with one line on stderr and exit status 2; outputs are written to
temporary names and renamed at the very end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ATTENTIONS = ("stock", "dense", "dense-local", "vsa")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["main", "build_parser", "ATTENTIONS"]


class UsageError(ValueError):
    """Bad input found before any work started."""


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .pipelines import PIPELINES

    parser = argparse.ArgumentParser(prog="diffusers-dist-attn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a video (sequence parallel across the launched processes)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--pipeline", choices=sorted(PIPELINES), default="wan")
    gen.add_argument("--model", default=None, help="local diffusers pipeline folder (default: embedded tiny pipeline)")
    gen.add_argument("--preset", default=None,
                     help="transformer preset of the embedded pipeline (wan: tiny, wan2.1-t2v-1.3b; "
                          "hunyuan-video: tiny, hunyuan-video); random weights")
    gen.add_argument("--attention", choices=ATTENTIONS, default="dense",
                     help="stock: diffusers' processors; dense-local: this package's dense kernel without sequence "
                          "parallelism; dense: Ulysses sequence parallelism; vsa: Video Sparse Attention + Ulysses")
    gen.add_argument("--sparsity", type=float, default=None, help="VSA sparsity in [0, 1) (default 0.9 with vsa)")
    gen.add_argument("--dense-steps", type=int, default=0, help="VSA: dense attention for the first N steps")
    gen.add_argument("--gate-checkpoint", default=None,
                     help="VSA: FastVideo-format to_gate_compress weights for `transformer` (file or folder)")
    gen.add_argument("--gate-checkpoint-2", default=None, help="VSA: gate weights for `transformer_2` (Wan 2.2 A14B)")
    gen.add_argument("--vsa-implementation", choices=("auto", "cuda", "triton", "torch"), default=None)
    gen.add_argument("--sp", type=int, default=None, help="sequence-parallel degree (default: all processes)")
    gen.add_argument("--ring", type=int, default=1,
                     help="ring degree of a hybrid ulysses x ring layout (dense attention; Ulysses = sp / ring)")
    gen.add_argument("--prompt", default=None)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--num-frames", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None, help="denoising steps")
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on CPU, bf16 on GPU")
    gen.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (fullgraph)")
    gen.add_argument("--cpu-offload", action="store_true", help="pipe.enable_model_cpu_offload() after parallelize")
    gen.add_argument("--output-dir", default="outputs")
    gen.add_argument("--name", default=None, help="output file stem (default: <pipeline>-<attention>-sp<P>)")
    gen.add_argument("--format", choices=("auto", "mp4", "gif", "png"), default="auto",
                     help="auto: mp4 when imageio + imageio-ffmpeg are installed, else GIF")
    gen.add_argument("--fps", type=int, default=16)
    gen.add_argument("--check", action="store_true",
                     help="also run one process on rank 0 (stock diffusers processors; VSA: VSA at P=1) and report "
                          "the max abs difference of the videos")
    kern = sub.add_parser("build-kernels", help="prebuild the compiled VSA kernel (sm_90a, opt-in) and print "
                                                "where it went or why it could not be built")
    kern.add_argument("--force", action="store_true", help="delete the cached build for these sources first")
    kern.add_argument("--no-gpu-check", action="store_true",
                      help="build even without an sm_90 GPU present (still needs CUDA torch and nvcc)")
    kern.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    return parser


def _validate(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Fill defaults and reject bad values (before any model is built)."""
    for key in ("height", "width", "num_frames", "steps", "guidance_scale", "prompt", "negative_prompt"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.attention == "vsa":
        args.sparsity = 0.9 if args.sparsity is None else args.sparsity
        if not 0.0 <= args.sparsity < 1.0:
            raise UsageError(f"--sparsity must be in [0, 1) (fraction of key blocks skipped); got {args.sparsity}")
        if args.dense_steps < 0:
            raise UsageError(f"--dense-steps must be >= 0; got {args.dense_steps}")
    else:
        if args.sparsity is not None or args.gate_checkpoint or args.gate_checkpoint_2 or args.dense_steps \
                or args.vsa_implementation:
            raise UsageError("--sparsity, --dense-steps, --gate-checkpoint and --vsa-implementation need --attention vsa")
    for key in ("height", "width", "num_frames", "steps", "fps"):
        if getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be positive; got {getattr(args, key)}")
    for key in ("gate_checkpoint", "gate_checkpoint_2"):
        path = getattr(args, key)
        if path and not Path(path).exists():
            raise UsageError(f"--{key.replace('_', '-')} {path}: no such file or folder")
    if args.model and args.preset:
        raise UsageError("--preset applies to the embedded pipeline; it cannot be combined with --model")
    if args.sp is not None and args.sp < 1:
        raise UsageError(f"--sp must be positive; got {args.sp}")
    if args.ring < 1:
        raise UsageError(f"--ring must be positive; got {args.ring}")
    if args.ring > 1 and args.attention != "dense":
        raise UsageError("--ring needs --attention dense (video sparse attention needs whole heads over the full "
                         "sequence; stock and dense-local do not shard)")


def _config_heads(model_path: str) -> int | None:
    try:
        return int(json.loads((Path(model_path) / "transformer" / "config.json").read_text())["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Per-step wall times (pipeline callback) and per-transformer-forward times (forward hooks)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[float] = []
        self.forwards: list[float] = []
        self._t0 = self._f0 = 0.0
        self._hooks: list = []

    def start(self) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def step_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        _sync(self.device)
        now = time.perf_counter()
        self.steps.append(now - self._t0)
        self._t0 = now
        return callback_kwargs

    def attach(self, modules: list[torch.nn.Module]) -> None:
        for module in modules:
            self._hooks.append(module.register_forward_pre_hook(self._pre))
            self._hooks.append(module.register_forward_hook(self._post))

    def _pre(self, module, args) -> None:
        _sync(self.device)
        self._f0 = time.perf_counter()

    def _post(self, module, args, output) -> None:
        _sync(self.device)
        self.forwards.append(time.perf_counter() - self._f0)

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _peak_memory(device: torch.device) -> dict[str, float]:
    peak = {"cpu_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        peak["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return peak


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def _mp4_available() -> bool:
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _video_format(requested: str) -> str:
    if requested == "mp4" and not _mp4_available():
        raise UsageError("--format mp4 needs imageio and imageio-ffmpeg (pip install 'diffusers_dist_attn[video]')")
    if requested == "auto":
        return "mp4" if _mp4_available() else "gif"
    return requested


def _write_video(frames, path: Path, fmt: str, fps: int) -> None:
    """`frames` float `[F, H, W, 3]` in [0, 1] -> `path` (a file; a folder of PNGs for `png`)."""
    import numpy as np

    images = (np.clip(frames, 0.0, 1.0) * 255).round().astype("uint8")
    if fmt == "mp4":
        import imageio

        imageio.mimwrite(path, list(images), fps=fps, format="FFMPEG", codec="libx264", macro_block_size=1)
        return
    from PIL import Image

    pil = [Image.fromarray(image) for image in images]
    if fmt == "gif":
        pil[0].save(path, format="GIF", save_all=True, append_images=pil[1:], duration=int(1000 / fps), loop=0)
    else:
        path.mkdir()
        for i, image in enumerate(pil):
            image.save(path / f"frame_{i:04d}.png")


@contextmanager
def _staged_outputs(final_paths: list[Path]):
    """Yield temporary paths next to `final_paths`; on success rename them all, on failure delete them."""
    staged = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in final_paths]
    try:
        yield staged
        for tmp, final in zip(staged, final_paths, strict=True):
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(tmp, final)
    finally:
        for tmp in staged:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()


# ---------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------
def _apply_attention(pipe, args, groups):
    """Install the requested attention; returns the `ParallelHandle` (None for stock)."""
    from .models import load_gates, parallelize
    from .models.sharding import get_plan

    if args.attention == "stock":
        return None
    if args.attention == "dense-local":
        plans = [get_plan(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        kind = "local" if all("local" in p.attentions for p in plans if p is not None) else "dense"
        return parallelize(pipe, attention=kind, groups=groups)
    sparsity = _sparsity_schedule(args) if args.attention == "vsa" else 0.0
    options = {"vsa_implementation": args.vsa_implementation} if args.attention == "vsa" else {}
    handle = parallelize(pipe, attention="vsa" if args.attention == "vsa" else "dense", sparsity=sparsity,
                         groups=groups, **options)
    for component, path in (("transformer", args.gate_checkpoint), ("transformer_2", args.gate_checkpoint_2)):
        if path:
            if component not in handle.transformers:
                raise UsageError(f"--gate-checkpoint for {component}: the pipeline has no {component}")
            report = load_gates(handle.transformers[component], path)
            if not report.used:
                raise UsageError(f"{path}: no to_gate_compress.* keys found ({len(report.unused)} other keys)")
            args.gate_reports[component] = {"used": len(report.used), "unused": len(report.unused),
                                            "missing_blocks": report.missing_blocks}
    return handle


def _run_pipeline(pipe, module, args, device, timer: _Timer | None):
    """Frames `[F, H, W, 3]` (numpy, [0, 1]) and the final latents (before the VAE)."""
    final: dict[str, torch.Tensor] = {}

    def on_step_end(pipe, step, timestep, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].detach().float().cpu()
        return timer.step_callback(pipe, step, timestep, callback_kwargs) if timer is not None else callback_kwargs

    kwargs = module.call_kwargs(args)
    kwargs["generator"] = torch.Generator("cpu").manual_seed(args.video_seed)
    kwargs["output_type"] = "np"
    kwargs["callback_on_step_end"] = on_step_end
    if timer is not None:
        timer.start()
    with torch.inference_mode():
        frames = pipe(**kwargs).frames
    return frames[0], final.get("latents")


def _reference_frames(pipe, module, args, handle, single_groups, device):
    """On SP rank 0: the same generation in one process (stock processors; VSA: VSA at P = 1, same gates)."""
    from .distributed import get_sequence_parallel_groups, set_sequence_parallel_groups
    from .models import load_gates, parallelize

    gates = {name: {k: v.detach().clone() for k, v in model.state_dict().items() if "to_gate_compress" in k}
             for name, model in handle.transformers.items()} if handle is not None else {}
    if handle is not None:
        handle.remove()
    if args.attention != "vsa":
        return *_run_pipeline(pipe, module, args, device, None), "stock diffusers processors, 1 process"
    previous = get_sequence_parallel_groups()
    set_sequence_parallel_groups(single_groups)
    try:
        ref_handle = parallelize(pipe, attention="vsa", sparsity=_sparsity_schedule(args), groups=single_groups,
                                 vsa_implementation=args.vsa_implementation)
        for name, state in gates.items():
            load_gates(ref_handle.transformers[name], state)
        frames, latents = _run_pipeline(pipe, module, args, device, None)
        ref_handle.remove()
    finally:
        set_sequence_parallel_groups(previous)
    return frames, latents, "vsa at P=1, same gates, 1 process"


def _sparsity_schedule(args: argparse.Namespace):
    from .models import DenseThenSparse

    return DenseThenSparse(args.sparsity, args.dense_steps) if args.dense_steps else args.sparsity


def generate(args: argparse.Namespace) -> dict[str, Any]:
    from .attention.validation import check_head_split
    from .distributed import SequenceParallelGroups, init_sequence_parallel
    from .pipelines import get_pipeline_module

    module = get_pipeline_module(args.pipeline)
    _validate(args, module.DEFAULTS)
    args.gate_reports = {}
    fmt = _video_format(args.format)
    uses_sp = args.attention in ("dense", "vsa")
    groups = init_sequence_parallel(args.sp if uses_sp else 1, ring=args.ring if args.ring > 1 else None)
    if not uses_sp and groups.world_size > 1 and args.sp not in (None, 1):
        raise UsageError(f"--attention {args.attention} runs without sequence parallelism; drop --sp {args.sp}")
    rank, device = groups.rank, groups.device
    heads = _config_heads(args.model) if args.model else None
    if heads is not None and uses_sp:  # before loading weights; parallelize checks again for the embedded model
        check_head_split(heads, groups.sp_size, ulysses=groups.ulysses_size, video_sparse=args.attention == "vsa")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # Data-parallel replicas (world > SP degree) generate different seeds; rank 0 of each SP group writes its video.
    writer = groups.sp_rank == 0
    args.video_seed = args.seed + groups.dp_rank
    stem = args.name or f"{args.pipeline}-{args.attention}-sp{groups.sp_size if uses_sp else 1}"
    if groups.dp_size > 1:
        stem += f"-seed{args.video_seed}"
    out_dir = Path(args.output_dir)
    video_path = out_dir / f"{stem}{'' if fmt == 'png' else '.' + fmt}"
    report_path = out_dir / f"{stem}.json"

    if args.model:
        pipe = module.load_pipeline(args.model, dtype)
    else:
        pipe = module.build_tiny_pipeline(seed=args.seed, dtype=dtype,
                                          **({"transformer_preset": args.preset} if args.preset else {}))
    pipe.set_progress_bar_config(disable=rank != 0)
    if not args.cpu_offload:
        pipe.to(device)
    handle = _apply_attention(pipe, args, groups)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    transformers = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                    and type(m).__name__.endswith("Transformer3DModel")]
    if args.compile:
        for model in transformers:
            model.compile_repeated_blocks(fullgraph=True)

    timer = _Timer(device)
    timer.attach(transformers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    frames, latents = _run_pipeline(pipe, module, args, device, timer)
    total = time.perf_counter() - started
    timer.detach()
    peak = _peak_memory(device)
    peaks = [peak]
    if dist.is_initialized() and dist.get_world_size() > 1:
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak)

    check = None
    failure: BaseException | None = None
    if args.check and writer:  # the other ranks wait below for this rank's single-process reference
        try:
            reference, ref_latents, what = _reference_frames(pipe, module, args, handle,
                                                             SequenceParallelGroups(device=device), device)
            check = {"reference": what, "max_abs_diff": float(abs(frames - reference).max()),
                     "max_abs_diff_latents": None if latents is None or ref_latents is None
                     else float((latents - ref_latents).abs().max())}
        except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank has heard of it
            failure = exc
    elif handle is not None:
        handle.remove()
    if args.check and dist.is_initialized():
        # an all-reduce instead of a barrier: a failed reference run (e.g. out of memory at full length) stops
        # every rank with an error instead of leaving the others waiting forever
        failed = torch.tensor([failure is not None], dtype=torch.int32, device=device)
        dist.all_reduce(failed)
        if failure is not None:
            raise failure
        if int(failed):
            raise RuntimeError("--check: the single-process reference run failed on another rank (see its error)")

    report = {
        "pipeline": args.pipeline,
        "model": args.model or f"embedded tiny ({args.preset or 'tiny'} transformer, random weights, seed {args.seed})",
        "attention": args.attention,
        "sparsity": args.sparsity if args.attention == "vsa" else None,
        "dense_steps": args.dense_steps if args.attention == "vsa" else None,
        "gate_checkpoints": args.gate_reports or None,
        "world_size": groups.world_size,
        "sp": groups.sp_size if uses_sp else 1,
        "ulysses_x_ring": [groups.ulysses_size, groups.ring_size] if uses_sp else [1, 1],
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "height": args.height, "width": args.width, "num_frames": args.num_frames, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "seed": args.video_seed, "prompt": args.prompt,
        "dp": groups.dp_size,
        "compile": args.compile,
        "step_times_s": timer.steps,
        "mean_step_s": sum(timer.steps[1:]) / max(len(timer.steps) - 1, 1) if len(timer.steps) > 1
        else (timer.steps[0] if timer.steps else None),
        "transformer_forward_ms": [t * 1000 for t in timer.forwards],
        "total_s": total,
        "peak_memory_per_rank": peaks,
        "video": str(video_path),
        "video_shape": list(frames.shape),
        "check": check,
        "versions": _versions(),
    }
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        with _staged_outputs([video_path, report_path]) as (tmp_video, tmp_report):
            _write_video(frames, tmp_video, fmt, args.fps)
            tmp_report.write_text(json.dumps(report, indent=2) + "\n")
        summary = f"wrote {video_path} and {report_path}; mean step {report['mean_step_s']:.3f} s"
        if check is not None:
            summary += f"; --check max abs diff vs {check['reference']}: {check['max_abs_diff']:.3e}"
        print(summary, flush=True)
    return report


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {"diffusers_dist_attn": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def build_kernels(args: argparse.Namespace) -> int:
    """`build-kernels`: 0 and the build folder when built, 1 and the reason otherwise."""
    from .vsa import cuda_build

    result = cuda_build.build(require_gpu=not args.no_gpu_check, force=args.force, verbose=args.verbose)
    if result.module is None:
        print(f"diffusers-dist-attn build-kernels: not built: {result.reason}", file=sys.stderr, flush=True)
        return 1
    print(f"built {result.module.__name__} (sm_90a; use it with DIFFUSERS_DIST_ATTN_VSA_CUDA=1) in {result.path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build-kernels":
            return build_kernels(args)
        if args.command == "generate":
            generate(args)
            if dist.is_available() and dist.is_initialized():
                # leave together: a rank that tears gloo down while a peer still writes its files can abort
                # (SIGABRT from gloo's worker threads, seen about once in 12 CPU runs without this barrier)
                dist.barrier()
        return 0
    except (UsageError, ValueError, FileNotFoundError) as exc:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            print(f"diffusers-dist-attn: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
