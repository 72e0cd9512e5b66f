"""HunyuanVideo transformer forward: time and peak memory per rank at 720p-like token counts on 1, 2, 4 GPUs.

The real HunyuanVideo 13B transformer shape (24 heads x 128 = 3072, mlp ratio 4, patch 1x2x2, text 256 x 4096,
rope (16, 56, 56)) with random weights (seeded, identical on every rank). By default it keeps only part of the
20 dual-stream + 40 single-stream blocks (`--layers`, `--single-layers`; the JSON records how many) so that one
run fits the device budget: per-block costs are uniform, so the full model's forward time is about
`dual_ms * 20 + single_ms * 40` (the JSON also gives the per-block split from `--profile-blocks`).

Several attentions run one after the other in one process (`--attention stock dense vsa`, same weights and
inputs): `stock` is diffusers' own processor (one process only; skipped at P > 1), `dense` is this package's
Ulysses attention, `vsa` is Video Sparse Attention at `--sparsity` on the video tokens with the text tokens as
dense keys (the text path: sparse part + dense text part merged through LSEs, on the kernels).

    torchrun --nproc_per_node 1 benchmarks/bench_hunyuan_gpu.py --out R --attention stock dense vsa --sparsity 0.875
    torchrun --nproc_per_node 4 benchmarks/bench_hunyuan_gpu.py --out R --attention dense vsa --sparsity 0.875
    python benchmarks/bench_hunyuan_gpu.py --table R                   # short table from R/hunyuan_*.json
    # full model (26 GB of bf16 weights on every rank): --layers 20 --single-layers 40
    # CPU dry run (tiny shape, fp32, gloo, 1 timed forward):
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_hunyuan_gpu.py --dry-run --out /tmp/hv_dry

Default input: 1280x720, 129 frames -> latent 33 x 90 x 160 -> post-patch grid 33 x 45 x 80 = 118,800 video
tokens + 256 text tokens of which `--text-valid` (default 64) are valid: at batch 1 the padded text tokens are
dropped (the processors' unmasked fast path); `--batch 2` with `--text-valid-2` exercises the masked path.
Rank 0 writes `<out>/hunyuan_<variant>_sp<P>_<dual>d<single>s<tag>.json` per attention (variant: `stock`,
`dense`, `vsa<sparsity>`): card, GPU count, date, every timed forward (ms, CUDA events; wall clock on CPU, after
`--warmup` untimed ones), their mean / median, peak allocated / reserved memory of every rank (GiB; the weights
included), the max abs / relative difference to the 1-process stock output (`diff_vs_stock_1gpu`; saved in
`--work-dir` by a P = 1 run with `stock`, else computed on rank 0) and to the same attention at P = 1
(`check_vs_1gpu`; saved by the P = 1 run, else computed on rank 0 with `--check`).
The stock processor always attends with the joint `[B, 1, 1, N]` mask (masked SDPA at 118,800 tokens: slow,
possibly a fallback kernel); ours drops padded text at batch 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for the JSON reports (required unless --table)")
    p.add_argument("--table", metavar="FOLDER", help="only print a short table from FOLDER/hunyuan_*.json")
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
    p.add_argument("--attention", nargs="+", choices=("dense", "vsa", "stock"), default=["dense"],
                   help="one or more, run in this order (stock: diffusers' own processors, one process only)")
    p.add_argument("--sparsity", type=float, default=0.875)
    p.add_argument("--backend", default=None, help="dense backend override (e.g. sdpa_cudnn, flash_attn_3)")
    p.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default: all ranks; rest is ring)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="cpu: gloo and CPU tensors")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--profile-blocks", action="store_true", help="also time one dual and one single block")
    p.add_argument("--check", action="store_true",
                   help="at P > 1 without a saved P = 1 output of the same attention, rank 0 also runs the same "
                        "forward on one GPU (this package, P = 1) and reports the difference")
    p.add_argument("--work-dir", default=os.environ.get("TMPDIR", "/tmp") + "/dda_bench_hv",
                   help="1-process outputs (stock and each attention) shared between the P = 1 and P > 1 runs")
    p.add_argument("--tag", default="", help="suffix of the JSON file names (e.g. _h200)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shape (5 x 16 x 16 latent, 32 text tokens of which 20 valid), fp32, CPU/gloo, "
                        "1 timed forward, no warm-up")
    args = p.parse_args(argv)
    if args.dry_run:
        args.preset, args.frames, args.height, args.width = "tiny", 5, 16, 16
        args.text_len, args.text_valid, args.text_valid_2 = 32, 20, 12
        args.dtype, args.warmup, args.iters = "fp32", 0, 1
        args.device = "cpu" if args.device == "auto" else args.device
    if not args.table and not args.out:
        p.error("--out is required (or --table FOLDER)")
    return args


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
        if dist.is_initialized():
            dist.barrier()
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


def _variant(attention: str, sparsity: float) -> str:
    return f"vsa{sparsity:g}" if attention == "vsa" else attention


def _diff(sample: torch.Tensor, ref: torch.Tensor, reference: str) -> dict:
    ref = ref.to(sample.device).float()
    diff = (sample.float() - ref).abs().max().item()
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(ref.abs().max().item(), 1e-12), "reference": reference}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    from diffusers_dist_attn.distributed import init_sequence_parallel

    dtype = DTYPES[args.dtype]
    cpu = True if args.device == "cpu" else (False if args.device == "cuda" else None)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (use --device cpu or --dry-run)")
    groups = init_sequence_parallel(None, ulysses=args.ulysses, cpu=cpu) if args.ulysses \
        else init_sequence_parallel(cpu=cpu)
    device, rank = groups.device, groups.rank
    model, config = build_model(args, device, dtype)
    inputs = make_inputs(args, config, device, dtype)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    key = (f"{args.preset}_{args.layers}d{args.single_layers}s_{args.frames}x{args.height}x{args.width}"
           f"_t{args.text_len}v{args.text_valid}_b{args.batch}_{args.dtype}")
    stock_path = work / f"stock_{key}.pt"
    attentions = list(args.attention)
    if "stock" in attentions and groups.world_size > 1:
        if rank == 0:
            print("--attention stock is the single-process baseline: skipped at P > 1", flush=True)
        attentions.remove("stock")
    if groups.world_size > 1 and not stock_path.exists():  # the 1-process stock reference, once, on rank 0
        if rank == 0:
            try:
                with torch.inference_mode():
                    torch.save(model(**inputs, return_dict=False)[0].float().cpu(), stock_path)
                print(f"stock reference computed on rank 0 -> {stock_path}", flush=True)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the runs go on without that diff
                print(f"stock reference on rank 0 FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if dist.is_initialized():
            dist.barrier()
    for attention in attentions:
        run_variant(model, config, inputs, attention, groups, args, work, key, stock_path)
    if dist.is_initialized():
        dist.barrier()


def run_variant(model, config, inputs, attention, groups, args, work: Path, key: str, stock_path: Path) -> None:
    from diffusers_dist_attn.models.sharding import parallelize

    device, rank = groups.device, groups.rank
    variant = _variant(attention, args.sparsity)
    handle = None
    if attention != "stock":
        options = {"backend": args.backend} if args.backend else {}
        sparsity = args.sparsity if attention == "vsa" else 0.0
        handle = parallelize(model, attention=attention, sparsity=sparsity, **options)
    timer = Timer(device)
    grid = (args.frames // config["patch_size_t"], args.height // config["patch_size"],
            args.width // config["patch_size"])
    out = {}

    def run() -> None:
        with torch.inference_mode():
            out["sample"] = model(**inputs, return_dict=False)[0]

    error = None
    times: list[float] = []
    try:
        for _ in range(args.warmup):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        times = [timer(run) for _ in range(args.iters)]
    except Exception as exc:  # noqa: BLE001 - one attention failing (OOM, kernel) is reported, not fatal
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:2000]}"
        print(f"{variant} sp{groups.sp_size} (rank {rank}): FAILED {error[:500]}", flush=True)
        out.pop("sample", None)
    sample = out.get("sample")
    finite = bool(torch.isfinite(sample.float()).all()) if sample is not None else False
    memory = {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
              "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30} if device.type == "cuda" else {}

    blocks = {}
    if args.profile_blocks and sample is not None:
        blocks = profile_blocks(model, inputs, timer, args)
    same_path = work / f"{variant}_{key}.pt"
    check = stock_diff = None
    if groups.sp_size == 1 and sample is not None and rank == 0:
        torch.save(sample.float().cpu(), stock_path if attention == "stock" else same_path)
    if handle is not None:
        handle.remove()
        handle = None
    if attention != "stock" and groups.sp_size > 1 and sample is not None:
        if same_path.exists():
            check = _diff(sample, torch.load(same_path), f"{variant} at P=1 (saved by the P=1 run)")
        elif args.check:
            check = single_gpu_check(model, inputs, sample, groups, args, attention)
    if sample is not None and attention != "stock" and stock_path.exists() and rank == 0:
        stock_diff = _diff(sample, torch.load(stock_path), "stock diffusers processor at P=1")

    per_rank = [{"rank": rank, **memory}]
    if dist.is_initialized() and dist.get_world_size() > 1:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, {"rank": rank, **memory})
    if rank == 0:
        import diffusers

        report = {
            "benchmark": "bench_hunyuan_gpu", "variant": variant,
            "model": f"HunyuanVideo transformer ({args.preset} shape, random weights), {args.layers} of 20 dual-stream "
                     f"+ {args.single_layers} of 40 single-stream blocks",
            "config": {k: config[k] for k in ("num_attention_heads", "attention_head_dim", "num_layers",
                                              "num_single_layers", "patch_size", "patch_size_t", "mlp_ratio")
                       if k in config},
            "attention": attention, "sparsity": args.sparsity if attention == "vsa" else None,
            "backend": args.backend, "dtype": args.dtype, "batch": args.batch,
            "latent": [args.frames, args.height, args.width], "grid": list(grid),
            "video_tokens": grid[0] * grid[1] * grid[2], "text_tokens": args.text_len,
            "text_valid": [args.text_valid, args.text_valid_2][: args.batch],
            "gpus": groups.world_size, "world_size": groups.world_size, "sp": groups.sp_size,
            "ulysses": groups.ulysses_size, "ring": groups.ring_size, "device_type": device.type,
            "card": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()})",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "dry_run": args.dry_run,
            "warmup": args.warmup, "forward_ms": times,
            "mean_forward_ms": statistics.mean(times) if times else None,
            "median_forward_ms": statistics.median(times) if times else None, "output_finite": finite,
            "memory_per_rank": per_rank, "blocks_ms": blocks or None, "check_vs_1gpu": check,
            "diff_vs_stock_1gpu": stock_diff, "error": error,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        }
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"hunyuan_{variant}_sp{groups.sp_size}_{args.layers}d{args.single_layers}s{args.tag}.json"
        (folder / name).write_text(json.dumps(report, indent=2))
        peaks = [m.get("peak_allocated_gib") for m in per_rank if m and m.get("peak_allocated_gib") is not None]
        print(f"{name}: " + (f"median forward {report['median_forward_ms']:.1f} ms over {args.iters}" if times
                             else f"FAILED {error[:200]}")
              + (f", peak allocated {max(peaks):.2f} GiB" if peaks else "")
              + (f", diff vs stock P=1 {stock_diff['max_abs_diff']:.3g}" if stock_diff else "")
              + (f", vs {variant} P=1 {check['max_abs_diff']:.3g}" if check else ""), flush=True)
    if dist.is_initialized():
        dist.barrier()


def single_gpu_check(model, inputs, sample, groups, args, attention: str) -> dict | None:
    """Rank 0: the same forward with P = 1 (same weights and inputs) -> max abs / max relative difference."""
    from diffusers_dist_attn.distributed import SequenceParallelGroups, set_sequence_parallel_groups
    from diffusers_dist_attn.models.sharding import parallelize

    result = None
    if groups.rank == 0:
        sparsity = args.sparsity if attention == "vsa" else 0.0
        options = {"backend": args.backend} if args.backend else {}
        single = SequenceParallelGroups(device=groups.device)
        set_sequence_parallel_groups(single)
        try:
            with parallelize(model, attention=attention, sparsity=sparsity, groups=single, **options):
                with torch.inference_mode():
                    ref = model(**inputs, return_dict=False)[0].float()
        finally:
            set_sequence_parallel_groups(groups)
        result = _diff(sample, ref, f"{_variant(attention, args.sparsity)} at P=1 on rank 0")
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


def table(folder: str) -> str:
    """One row per (variant, SP degree): median forward, speed-up vs stock at P = 1, peak memory, diffs."""
    reports = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("hunyuan_*.json"))]
    if not reports:
        return f"(no hunyuan_*.json in {folder})"
    base = {(r["model"], tuple(r["latent"])): r["median_forward_ms"] for r in reports
            if r.get("attention") == "stock" and r.get("median_forward_ms")}
    first = reports[0]
    dates = sorted({r.get("date", "?")[:10] for r in reports})
    lines = [f"\n{first['model']}; latent {first['latent']}, "
             f"{first['video_tokens']} video + {first['text_tokens']} text tokens ({first['text_valid']} valid); "
             f"{first.get('card', first.get('device', '?'))}, {first['dtype']}, {', '.join(dates)}",
             "| variant | SP | fwd ms (median) | vs stock P=1 | peak GiB/GPU | diff vs stock P=1 | diff vs same P=1 |",
             "|---|---|---|---|---|---|---|"]

    def fmt(v, spec=".3g"):
        return "-" if v is None else format(v, spec)

    for r in sorted(reports, key=lambda r: (r.get("variant", r["attention"]) != "stock", r.get("variant", ""), r["sp"])):
        ms = r.get("median_forward_ms")
        stock = base.get((r["model"], tuple(r["latent"])))
        peaks = [m.get("peak_allocated_gib") for m in r.get("memory_per_rank", []) if m and m.get("peak_allocated_gib")]
        lines.append(f"| {r.get('variant', r['attention'])} | {r['sp']} | {fmt(ms, '.1f') if ms else 'ERR'} | "
                     f"{f'{stock / ms:.2f}x' if stock and ms else '-'} | {fmt(max(peaks) if peaks else None, '.2f')} | "
                     f"{fmt((r.get('diff_vs_stock_1gpu') or {}).get('max_abs_diff'))} | "
                     f"{fmt((r.get('check_vs_1gpu') or {}).get('max_abs_diff'))} |"
                     + (f" {r['error'][:80]}" if r.get("error") else ""))
    _plot(reports, Path(folder), f"{first.get('card', '?')}, {first['dtype']}, {', '.join(dates)}")
    return "\n".join(lines)


def _plot(reports: list[dict], folder: Path, title: str) -> None:
    """`hunyuan_forward.png`: median forward per variant (bars) at each SP degree (the GPU count)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    variants = sorted({r.get("variant", r["attention"]) for r in reports}, key=lambda v: (v != "stock", v))
    sps = sorted({r["sp"] for r in reports})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(sps), 1)
    for j, sp in enumerate(sps):
        ys = [next((r.get("median_forward_ms") or 0.0 for r in reports
                    if r["sp"] == sp and r.get("variant", r["attention"]) == v), 0.0) for v in variants]
        ax.bar([i + j * width for i in range(len(variants))], ys, width, label=f"{sp} GPU" + ("s" if sp > 1 else ""))
    ax.set_xticks([i + width * (len(sps) - 1) / 2 for i in range(len(variants))], variants)
    ax.set_ylabel("transformer forward (ms, median)")
    ax.set_title(f"HunyuanVideo {reports[0]['video_tokens']} video + {reports[0]['text_tokens']} text tokens; "
                 f"{title}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "hunyuan_forward.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
