"""HunyuanVideo transformer forward: time and peak memory per rank at 720p-like token counts on 1, 2, 4 GPUs.

The real HunyuanVideo 13B transformer shape (24 heads x 128 = 3072, mlp ratio 4, patch 1x2x2, text 256 x 4096,
rope (16, 56, 56)) with random weights (seeded, identical on every rank). By default it keeps only part of the
20 dual-stream + 40 single-stream blocks (`--layers`, `--single-layers`; the JSON records how many) so that one
run fits the device budget: per-block costs are uniform, so the full model's forward time is about
`dual_ms * 20 + single_ms * 40` (the JSON also gives the per-block split from `--profile-blocks`).

    torchrun --nproc_per_node 1 benchmarks/bench_hunyuan_gpu.py --out benchmarks/results/hunyuan
    torchrun --nproc_per_node 2 benchmarks/bench_hunyuan_gpu.py --out benchmarks/results/hunyuan
    torchrun --nproc_per_node 4 benchmarks/bench_hunyuan_gpu.py --out benchmarks/results/hunyuan
    # full model (26 GB of bf16 weights on every rank): --layers 20 --single-layers 40
    # sparse: --attention vsa --sparsity 0.9 (replicated text keys run VSA's PyTorch reference: slow, for memory)
    # all three on one 4-GPU machine (about 3-4 minutes with the default 2 + 4 blocks), with a P = 1 check:
    for n in 1 2 4; do torchrun --standalone --nproc_per_node $n benchmarks/bench_hunyuan_gpu.py \
        --out benchmarks/results/hunyuan --check --profile-blocks; done
    # CPU smoke test: python benchmarks/bench_hunyuan_gpu.py --preset tiny --frames 5 --height 16 --width 16 \
    #     --text-len 32 --dtype fp32 --out /tmp/hv_bench

Default input: 1280x720, 129 frames -> latent 33 x 90 x 160 -> post-patch grid 33 x 45 x 80 = 118,800 video
tokens + 256 text tokens of which `--text-valid` (default 64) are valid: at batch 1 the padded text tokens are
dropped (the processors' unmasked fast path); `--batch 2` with `--text-valid-2` exercises the masked path.
Rank 0 writes `<out>/hunyuan_<attention>_sp<P>_<dual>d<single>s.json`: every timed forward (ms, CUDA events,
after `--warmup` untimed ones), their mean / median, peak allocated / reserved memory of every rank (GiB; the
weights included), and with `--check` the max abs / relative difference to the same forward at P = 1 on rank 0.
`--attention stock` (one GPU) is diffusers' own processor, which always attends with the joint `[B, 1, 1, N]`
mask (masked SDPA at 118,800 tokens: slow, possibly a fallback kernel); ours drops padded text at batch 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

REAL = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, guidance_embeds=True,
    text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56),
)
TINY = dict(
    in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=1, num_single_layers=1,
    num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
    pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the JSON report")
    p.add_argument("--preset", choices=("real", "tiny"), default="real")
    p.add_argument("--layers", type=int, default=2, help="dual-stream blocks (real model: 20)")
    p.add_argument("--single-layers", type=int, default=4, help="single-stream blocks (real model: 40)")
    p.add_argument("--frames", type=int, default=33, help="latent frames (129 video frames -> 33)")
    p.add_argument("--height", type=int, default=90, help="latent height (720 px -> 90)")
    p.add_argument("--width", type=int, default=160, help="latent width (1280 px -> 160)")
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--text-valid", type=int, default=64, help="valid (unpadded) text tokens of sample 0")
    p.add_argument("--text-valid-2", type=int, default=40, help="valid text tokens of sample 1 (with --batch 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attention", choices=("dense", "vsa", "stock"), default="dense",
                   help="stock: diffusers' own processors, one process only (baseline)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--backend", default=None, help="dense backend override (e.g. sdpa_cudnn, flash_attn_3)")
    p.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default: all ranks; rest is ring)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--profile-blocks", action="store_true", help="also time one dual and one single block")
    p.add_argument("--check", action="store_true",
                   help="rank 0 also runs the same forward on one GPU (this package, P = 1) and reports the difference")
    return p.parse_args()


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Random-weight transformer created directly on `device` in `dtype` (no fp32 copy), seeded."""
    from diffusers import HunyuanVideoTransformer3DModel

    config = dict(REAL if args.preset == "real" else TINY, num_layers=args.layers, num_single_layers=args.single_layers)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = HunyuanVideoTransformer3DModel(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model.requires_grad_(False), config


def make_inputs(args, config, device, dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1)
    b, length = args.batch, args.text_len
    valid = [args.text_valid, args.text_valid_2][:b] + [args.text_valid] * max(0, b - 2)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, n in enumerate(valid):
        mask[i, :n] = 1

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return dict(
        hidden_states=rnd(b, config["in_channels"], args.frames, args.height, args.width),
        timestep=torch.full((b,), 500.0, device=device, dtype=dtype),
        encoder_hidden_states=rnd(b, length, config["text_embed_dim"]),
        encoder_attention_mask=mask.to(device),
        pooled_projections=rnd(b, config["pooled_projection_dim"]),
        guidance=torch.full((b,), 6000.0, device=device, dtype=dtype),
    )


class Timer:
    """Wall time of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000


def main() -> None:
    args = parse_args()
    from diffusers_dist_attn.distributed import init_sequence_parallel
    from diffusers_dist_attn.models.sharding import parallelize

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    groups = init_sequence_parallel(None, ulysses=args.ulysses) if args.ulysses else init_sequence_parallel()
    device, rank = groups.device, groups.rank
    if args.attention == "stock" and groups.world_size > 1:
        raise SystemExit("--attention stock is the single-process baseline; run it with --nproc_per_node 1")
    model, config = build_model(args, device, dtype)
    inputs = make_inputs(args, config, device, dtype)
    handle = None
    if args.attention != "stock":
        options = {"backend": args.backend} if args.backend else {}
        sparsity = args.sparsity if args.attention == "vsa" else 0.0
        handle = parallelize(model, attention=args.attention, sparsity=sparsity, **options)
    timer = Timer(device)
    grid = (args.frames // config["patch_size_t"], args.height // config["patch_size"],
            args.width // config["patch_size"])

    out = {}

    def run() -> None:
        with torch.inference_mode():
            out["sample"] = model(**inputs, return_dict=False)[0]

    for _ in range(args.warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = [timer(run) for _ in range(args.iters)]
    finite = bool(torch.isfinite(out["sample"].float()).all())
    memory = {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
              "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30} if device.type == "cuda" else {}

    blocks = {}
    if args.profile_blocks:
        blocks = profile_blocks(model, inputs, timer, args)
    check = None
    if args.check and args.attention != "stock" and groups.sp_size > 1:
        check = single_gpu_check(model, inputs, out["sample"], handle, groups, args)
        handle = None

    per_rank = [{"rank": rank, **memory}]
    if dist.is_initialized() and dist.get_world_size() > 1:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, {"rank": rank, **memory})
    if rank == 0:
        import diffusers

        report = {
            "model": f"HunyuanVideo transformer ({args.preset} shape, random weights), {args.layers} of 20 dual-stream "
                     f"+ {args.single_layers} of 40 single-stream blocks",
            "config": {k: config[k] for k in ("num_attention_heads", "attention_head_dim", "num_layers",
                                              "num_single_layers", "patch_size", "patch_size_t", "mlp_ratio")
                       if k in config},
            "attention": args.attention, "sparsity": args.sparsity if args.attention == "vsa" else None,
            "backend": args.backend, "dtype": args.dtype, "batch": args.batch,
            "latent": [args.frames, args.height, args.width], "grid": list(grid),
            "video_tokens": grid[0] * grid[1] * grid[2], "text_tokens": args.text_len,
            "text_valid": [args.text_valid, args.text_valid_2][: args.batch],
            "world_size": groups.world_size, "sp": groups.sp_size, "ulysses": groups.ulysses_size,
            "ring": groups.ring_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "warmup": args.warmup, "forward_ms": times, "mean_forward_ms": statistics.mean(times),
            "median_forward_ms": statistics.median(times), "output_finite": finite,
            "memory_per_rank": per_rank, "blocks_ms": blocks or None, "check_vs_1gpu": check,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        }
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"hunyuan_{args.attention}_sp{groups.sp_size}_{args.layers}d{args.single_layers}s.json"
        (folder / name).write_text(json.dumps(report, indent=2))
        peak = max((m or {}).get("peak_allocated_gib", float("nan")) for m in per_rank)
        print(f"{name}: mean forward {report['mean_forward_ms']:.1f} ms over {args.iters}, "
              f"peak allocated {peak:.2f} GiB")
    if handle is not None:
        handle.remove()
    if dist.is_initialized():
        dist.barrier()


def single_gpu_check(model, inputs, sample, handle, groups, args) -> dict | None:
    """Rank 0: the same forward with P = 1 (same weights and inputs) -> max abs / max relative difference."""
    from diffusers_dist_attn.distributed import SequenceParallelGroups, set_sequence_parallel_groups
    from diffusers_dist_attn.models.sharding import parallelize

    handle.remove()
    result = None
    if groups.rank == 0:
        sparsity = args.sparsity if args.attention == "vsa" else 0.0
        options = {"backend": args.backend} if args.backend else {}
        single = SequenceParallelGroups(device=groups.device)
        set_sequence_parallel_groups(single)
        try:
            with parallelize(model, attention=args.attention, sparsity=sparsity, groups=single, **options):
                with torch.inference_mode():
                    ref = model(**inputs, return_dict=False)[0].float()
        finally:
            set_sequence_parallel_groups(groups)
        diff = (sample.float() - ref).abs().max().item()
        result = {"max_abs_diff": diff, "max_rel_diff": diff / max(ref.abs().max().item(), 1e-12),
                  "reference": f"{args.attention} at P=1 on rank 0"}
    if dist.is_initialized():
        dist.barrier()
    return result


def profile_blocks(model, inputs, timer: Timer, args) -> dict[str, float]:
    """Median time of the first dual-stream and the first single-stream block inside full forwards (forward
    pre/post hooks with synchronisation; adds a little overhead, so only with --profile-blocks)."""
    times: dict[str, list[float]] = {"dual": [], "single": []}
    hooks = []
    for key, blocks in (("dual", model.transformer_blocks), ("single", model.single_transformer_blocks)):
        if not len(blocks):
            continue
        block = blocks[0]

        def pre(module, a, key=key):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            module._bench_t0 = time.perf_counter()

        def post(module, a, o, key=key):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[key].append((time.perf_counter() - module._bench_t0) * 1000)

        hooks += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    with torch.inference_mode():
        for _ in range(max(2, args.iters // 2)):
            model(**inputs, return_dict=False)
    for h in hooks:
        h.remove()
    return {k: statistics.median(v) for k, v in times.items() if v}


if __name__ == "__main__":
    main()
