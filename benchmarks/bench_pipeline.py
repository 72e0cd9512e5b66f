"""Wan transformer step benchmark on 1, 2, 4 GPUs: stock diffusers vs diffusers' context parallelism vs ours.

Run once per GPU count (random weights, no download; every rank builds the same model from the same seed):

    torchrun --nproc_per_node 1 benchmarks/bench_pipeline.py --out benchmarks/results
    torchrun --nproc_per_node 2 benchmarks/bench_pipeline.py --out benchmarks/results
    torchrun --nproc_per_node 4 benchmarks/bench_pipeline.py --out benchmarks/results
    python benchmarks/bench_pipeline.py --plot benchmarks/results      # table + PNG from the JSON files

Variants per run: `stock` (1 GPU only), `diffusers_cp` (diffusers' `enable_parallelism` with
`ContextParallelConfig(ulysses_degree=P)`, P > 1), `ours_dense` (`parallelize(attention="dense")`), `ours_local`
(1 GPU, `LocalAttention` processors), `ours_dense_u<U>xr<R>` (`--ring R`: hybrid Ulysses x ring), `ours_vsa_<s>`
(`parallelize(attention="vsa", sparsity=s)`, zero gates). Each: median transformer forward and forward+backward
time (CUDA events), peak memory per GPU (weights included), and for `ours_dense` the max abs difference against
the 1-GPU stock output (saved by the 1-GPU run in `--work-dir`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

WAN_CONFIGS = {
    "wan-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "wan-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}
COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}  # (height, width); latent = /8, frames (81-1)/4+1 = 21


def _build(args, device):
    from diffusers import WanTransformer3DModel

    config = {**COMMON, **WAN_CONFIGS[args.model]}
    if args.layers:
        config["num_layers"] = args.layers
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(torch.bfloat16)
    height, width = RESOLUTIONS[args.resolution]
    frames = (args.frames - 1) // 4 + 1
    gen = torch.Generator(device).manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, frames, height // 8, width // 8, device=device, dtype=torch.bfloat16, generator=gen),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16, generator=gen),
        return_dict=False,
    )
    return model, inputs, config


def _time(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier() if dist.is_initialized() else None
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


# Kernel-name patterns -> where the time goes (first match wins; lower-case names).
KERNEL_CATEGORIES = (
    ("communication", ("nccl",)),
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn", "_fwd_kernel", "_bwd_", "_coarse_kernel",
                   "_block_mean_kernel", "_k2q_kernel", "vsa_fwd_kernel")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "splitk")),
    ("copies", ("copy", "cat", "memcpy", "memset", "fill", "pad", "index", "gather", "scatter", "transpose",
                "permute", "clone")),
    ("norm_elementwise", ("norm", "elementwise", "vectorized", "reduce", "softmax", "triton_")),
)


def _category(name: str) -> str:
    low = name.lower()
    for category, keys in KERNEL_CATEGORIES:
        if any(key in low for key in keys):
            return category
    return "other"


def _profile_forward(model, inputs) -> dict:
    """One profiled transformer forward: GPU kernel time per category (ms), the busy time (union of kernel
    intervals, streams overlapped), the step's wall time, and the 12 most expensive kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(**inputs)  # warm
        torch.cuda.synchronize()
        dist.barrier() if dist.is_initialized() else None
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**inputs)
            end.record()
            torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    by_cat: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for name, t0, t1 in kernels:
        by_cat[_category(name)] = by_cat.get(_category(name), 0.0) + (t1 - t0) / 1e3
        by_name[name] = by_name.get(name, 0.0) + (t1 - t0) / 1e3
    busy, last = 0.0, None
    for _, t0, t1 in sorted(kernels, key=lambda k: k[1]):
        if last is None or t0 > last:
            busy, last = busy + (t1 - t0), t1
        elif t1 > last:
            busy, last = busy + (t1 - last), t1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"wall_ms": start.elapsed_time(end), "busy_ms": busy / 1e3, "kernel_ms": dict(sorted(by_cat.items())),
            "top_kernels": [{"name": n[:160], "ms": t, "category": _category(n)} for n, t in top]}


def _measure(name, model, inputs, args, device) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        fwd = _time(lambda: model(**inputs), args.iters, args.warmup)
    fwd_peak = torch.cuda.max_memory_allocated(device)
    with torch.no_grad():
        out = model(**inputs)[0].float()
    result = {"variant": name, "fwd_ms": statistics.median(fwd), "fwd_all_ms": fwd,
              "fwd_peak_gib": fwd_peak / 2**30}
    if args.profile:
        prof = _profile_forward(model, inputs)
        if dist.is_initialized():  # every rank's breakdown (load imbalance shows up as NCCL wait)
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, prof)
            prof = {"rank0": ranks[0], "per_rank_kernel_ms": [r["kernel_ms"] for r in ranks]}
        else:
            prof = {"rank0": prof, "per_rank_kernel_ms": [prof["kernel_ms"]]}
        result["profile_fwd"] = prof
    if args.backward:
        torch.cuda.reset_peak_memory_stats(device)

        def step():
            model(**inputs)[0].float().square().mean().backward()
            model.zero_grad(set_to_none=True)

        try:
            bwd = _time(step, max(args.iters // 2, 2), 1)
            result.update(fwdbwd_ms=statistics.median(bwd), fwdbwd_all_ms=bwd,
                          fwdbwd_peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)
        except torch.OutOfMemoryError:  # e.g. the 1.3B model at 480p without activation checkpointing on 1 GPU
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            result.update(fwdbwd_ms=None, fwdbwd_error="out of memory")
    return result, out


def run(args) -> None:
    from diffusers_dist_attn import init_sequence_parallel
    from diffusers_dist_attn.attention import rotary
    from diffusers_dist_attn.models import parallelize

    groups = init_sequence_parallel(ring=args.ring if args.ring > 1 else None)
    world, rank = groups.world_size, groups.rank
    device = groups.device
    model, inputs, config = _build(args, device)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stock_path = work / f"stock_{args.model}_{args.resolution}_{config['num_layers']}l.pt"
    results = []
    wanted = (lambda name: True) if not args.variants else (lambda name: name in args.variants)
    if world == 1 and (wanted("stock") or not stock_path.exists()):
        res, out = _measure("stock", model, inputs, args, device)
        torch.save(out.cpu(), stock_path)
        results.append(res)
    variants = [("ours_dense", "dense", 0.0)] + [(f"ours_vsa_{s}", "vsa", s) for s in args.sparsity]
    if world == 1:
        variants.insert(1, ("ours_local", "local", 0.0))  # LocalAttention processors: no sharding machinery
    if args.compare_rotary:  # same layers with the PyTorch rotary formula instead of the fused Triton kernel
        variants += [(f"{name}_torch_rotary", attention, sparsity) for name, attention, sparsity in list(variants)
                     if attention != "vsa"]
    if args.compile:  # regional torch.compile of the transformer blocks (fullgraph), as `generate --compile`
        variants += [(f"{name}_compiled", attention, sparsity) for name, attention, sparsity in list(variants)
                     if not name.endswith("_torch_rotary")]
    if args.ring > 1:  # hybrid layout: dense attention is Ulysses x ring; VSA always runs pure Ulysses
        variants = [(f"ours_dense_u{world // args.ring}xr{args.ring}", "dense", 0.0)]
    for name, attention, sparsity in [v for v in variants if wanted(v[0])]:
        os.environ[rotary.ROTARY_ENV] = "torch" if name.endswith("_torch_rotary") else "auto"
        with parallelize(model, attention=attention, sparsity=sparsity):
            if name.endswith("_compiled"):
                model.compile_repeated_blocks(fullgraph=True)
            try:
                res, out = _measure(name, model, inputs, args, device)
            except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
                print(f"{world} GPU {name}: FAILED {type(exc).__name__}: {str(exc)[:500]}", flush=True)
                res, out = {"variant": name, "fwd_ms": float("nan"), "fwd_peak_gib": float("nan"),
                            "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}, None
            finally:
                if name.endswith("_compiled"):
                    for block in model.blocks:
                        block._compiled_call_impl = None
                    torch._dynamo.reset()
        os.environ[rotary.ROTARY_ENV] = "auto"
        if out is None:
            results.append(res)
            continue
        if attention in ("dense", "local") and stock_path.exists():
            res["max_abs_diff_vs_stock_1gpu"] = (out - torch.load(stock_path).to(device)).abs().max().item()
        results.append(res)
    if world > 1 and args.diffusers_cp and args.ring == 1 and wanted("diffusers_cp"):
        from diffusers import ContextParallelConfig

        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        res, _ = _measure("diffusers_cp", model, inputs, args, device)
        results.append(res)
    if rank == 0:
        record = {
            "benchmark": "bench_pipeline", "model": args.model, "resolution": args.resolution, "frames": args.frames,
            "layers": config["num_layers"], "gpus": world, "ring": args.ring, "card": torch.cuda.get_device_name(device),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__, "dtype": "bfloat16", "results": results,
        }
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        ring = f"_ring{args.ring}" if args.ring > 1 else ""
        path = out_dir / f"pipeline_{args.model}_{args.resolution}_{config['num_layers']}l_{world}gpu{ring}.json"
        path.write_text(json.dumps(record, indent=1))
        for r in results:
            if "profile_fwd" in r:
                p0 = r["profile_fwd"]["rank0"]
                cats = "  ".join(f"{k} {v:.1f}" for k, v in p0["kernel_ms"].items())
                print(f"{world} GPU {r['variant']:>16}: profiled fwd wall {p0['wall_ms']:.1f} ms, GPU busy "
                      f"{p0['busy_ms']:.1f} ms; kernel ms (rank 0): {cats}")
            print(f"{world} GPU {r['variant']:>16}: fwd {r['fwd_ms']:8.1f} ms  fwd+bwd {r.get('fwdbwd_ms') or float('nan'):8.1f} ms"
                  f"  peak {r.get('fwdbwd_peak_gib', r['fwd_peak_gib']):6.2f} GiB"
                  + (f"  diff {r['max_abs_diff_vs_stock_1gpu']:.3g}" if "max_abs_diff_vs_stock_1gpu" in r else ""))


def plot(folder: str) -> None:
    """Table (speedup vs stock 1 GPU, scaling efficiency) and a PNG from all pipeline_*.json in `folder`."""
    records = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("pipeline_*.json"))]
    groups: dict[tuple, dict[int, dict]] = {}
    for rec in records:
        by_gpus = groups.setdefault((rec["model"], rec["resolution"], rec["layers"]), {})
        if rec["gpus"] in by_gpus:  # a hybrid (ring) run at the same GPU count: merge its rows
            by_gpus[rec["gpus"]]["results"] += rec["results"]
        else:
            by_gpus[rec["gpus"]] = rec
    lines = []
    for key, by_gpus in sorted(groups.items()):
        one = {r["variant"]: r for r in by_gpus.get(1, {}).get("results", [])}
        base = one.get("stock", {}).get("fwd_ms")
        lines.append(f"\n{key[0]} {key[1]} ({key[2]} layers), card: {next(iter(by_gpus.values()))['card']}")
        lines.append("| GPUs | variant | fwd ms | speedup vs stock 1 GPU | scaling eff. | fwd+bwd ms | peak GiB (fwd+bwd if run, else fwd) |")
        lines.append("|---|---|---|---|---|---|---|")
        for gpus, rec in sorted(by_gpus.items()):
            for r in rec["results"]:
                single = one.get(r["variant"] if r["variant"] != "diffusers_cp" else "stock", {}).get("fwd_ms")
                eff = f"{single / (gpus * r['fwd_ms']):.0%}" if single else "-"
                speed = f"{base / r['fwd_ms']:.2f}x" if base else "-"
                peak = r.get("fwdbwd_peak_gib", r["fwd_peak_gib"])
                lines.append(f"| {gpus} | {r['variant']} | {r['fwd_ms']:.1f} | {speed} | {eff} | "
                             f"{r.get('fwdbwd_ms') or float('nan'):.1f} | {peak:.2f} |")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for key, by_gpus in groups.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        variants = sorted({r["variant"] for rec in by_gpus.values() for r in rec["results"]})
        for v in variants:
            xs = [g for g, rec in sorted(by_gpus.items()) for r in rec["results"] if r["variant"] == v]
            ys = [r["fwd_ms"] for g, rec in sorted(by_gpus.items()) for r in rec["results"] if r["variant"] == v]
            ax.plot(xs, ys, marker="o", label=v)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("transformer forward (ms, median)")
        ax.set_xticks(sorted(by_gpus))
        ax.set_yscale("log")
        ax.set_title(f"{key[0]} {key[1]} ({key[2]} layers) on {next(iter(by_gpus.values()))['card']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(folder) / f"pipeline_{key[0]}_{key[1]}_{key[2]}l.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(WAN_CONFIGS), default="wan-1.3b")
    parser.add_argument("--layers", type=int, default=0, help="fewer layers than the real config (0 = real)")
    parser.add_argument("--resolution", choices=sorted(RESOLUTIONS), default="480p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--ring", type=int, default=1, help="ring degree of a hybrid ulysses x ring layout (dense only)")
    parser.add_argument("--sparsity", type=float, nargs="*", default=[0.875, 0.9])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-backward", dest="backward", action="store_false")
    parser.add_argument("--no-diffusers-cp", dest="diffusers_cp", action="store_false")
    parser.add_argument("--profile", action="store_true", help="also profile one forward per variant (kernel time "
                        "per category: attention, GEMMs, communication, copies, norms/elementwise)")
    parser.add_argument("--compare-rotary", action="store_true",
                        help="also run ours dense with the PyTorch rotary formula (DIFFUSERS_DIST_ATTN_ROTARY=torch)")
    parser.add_argument("--compile", action="store_true",
                        help="also run ours with the transformer blocks torch.compile'd (fullgraph, regional)")
    parser.add_argument("--variants", nargs="*", help="only these variants (e.g. stock ours_dense ours_vsa_0.875 "
                        "diffusers_cp)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work-dir", default=os.environ.get("TMPDIR", "/tmp") + "/dda_bench")
    parser.add_argument("--plot", metavar="FOLDER", help="only print the table and write PNGs from FOLDER")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_pipeline.py needs CUDA GPUs (run under torchrun on a GPU machine)")
    run(args)


if __name__ == "__main__":
    main()
