"""Wan transformer step benchmark on 1, 2, 4 GPUs: stock diffusers vs diffusers' context parallelism vs ours.

Run once per GPU count (random weights, no download; every rank builds the same model from the same seed):

    torchrun --nproc_per_node 1 benchmarks/bench_pipeline.py --out benchmarks/results
    torchrun --nproc_per_node 2 benchmarks/bench_pipeline.py --out benchmarks/results
    torchrun --nproc_per_node 4 benchmarks/bench_pipeline.py --out benchmarks/results
    python benchmarks/bench_pipeline.py --plot benchmarks/results      # table + PNG from the JSON files
    # CPU dry run (tiny Wan, fp32, gloo, 1 timed step): the same code paths, no GPU
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_pipeline.py --dry-run --out /tmp/bp_dry

Variants per run: `stock` (1 GPU only), `diffusers_cp` (diffusers' `enable_parallelism` with
`ContextParallelConfig(ulysses_degree=P)`, P > 1), `ours_dense` (`parallelize(attention="dense")`), `ours_local`
(1 GPU, `LocalAttention` processors), `ours_dense_u<U>xr<R>` (`--ring R`: hybrid Ulysses x ring), `ours_vsa_<s>`
(`parallelize(attention="vsa", sparsity=s)`, zero gates), `*_compiled` (`--compile`: regional `torch.compile` of
the blocks), `*_torch_rotary` (`--compare-rotary`). Each: median transformer forward and forward+backward time
(CUDA events; wall clock on CPU), peak memory of every GPU (weights included), and the max abs / max relative
difference of the output against the 1-process stock output (saved by the 1-GPU run in `--work-dir`, or computed
on rank 0 when missing) and, for variants that the 1-GPU run also ran, against that variant's 1-process output
(VSA differs from dense by design; the same-variant diff is what checks the sharding). Rank 0 rewrites the JSON
after every variant, so a run stopped by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

WAN_CONFIGS = {
    "wan-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "wan-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    # CPU dry runs: 4 heads (SP 1, 2, 4 all work), VSA-compatible head dim
    "tiny": dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32,
                 rope_max_seq_len=32),
}
COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# (height, width) in pixels; latent = /8, frames (81-1)/4+1 = 21. "tiny": latent 16 x 16 -> grid 8 x 8 per frame.
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280), "tiny": (128, 128)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------------------------
# device helpers: CUDA events / memory stats on GPU, wall clock and no memory numbers on CPU
# --------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _card(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _time(fn, iters: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        _barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def _gather(value):
    """`value` of every rank (a one-element list without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------
def _build(args, device):
    from diffusers import WanTransformer3DModel

    config = {**COMMON, **WAN_CONFIGS[args.model]}
    if args.layers:
        config["num_layers"] = args.layers
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype)
    height, width = RESOLUTIONS[args.resolution]
    frames = (args.frames - 1) // 4 + 1
    gen = torch.Generator("cpu").manual_seed(1)  # CPU generator: the same inputs on every device type

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    inputs = dict(
        hidden_states=rnd(1, config["in_channels"], frames, height // 8, width // 8),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=rnd(1, args.text_len, config["text_dim"]),
        return_dict=False,
    )
    return model, inputs, config


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
        _barrier()
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


def _measure(name, model, inputs, args, device) -> tuple[dict, torch.Tensor]:
    _reset_peak(device)
    with torch.no_grad():
        fwd = _time(lambda: model(**inputs), args.iters, args.warmup, device)
    fwd_peak = _peak_gib(device)
    with torch.no_grad():
        out = model(**inputs)[0].float()
    result = {"variant": name, "fwd_ms": statistics.median(fwd), "fwd_all_ms": fwd, "fwd_peak_gib": fwd_peak}
    if args.profile and device.type == "cuda":
        prof = _profile_forward(model, inputs)
        ranks = _gather(prof)  # every rank's breakdown (load imbalance shows up as NCCL wait)
        result["profile_fwd"] = {"rank0": ranks[0], "per_rank_kernel_ms": [r["kernel_ms"] for r in ranks]}
    bwd_peak = None
    if args.backward:
        _reset_peak(device)

        def step():
            model(**inputs)[0].float().square().mean().backward()
            model.zero_grad(set_to_none=True)

        try:
            bwd = _time(step, max(args.iters // 2, 1 if args.iters == 1 else 2), min(args.warmup, 1), device)
            bwd_peak = _peak_gib(device)
            result.update(fwdbwd_ms=statistics.median(bwd), fwdbwd_all_ms=bwd, fwdbwd_peak_gib=bwd_peak)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory without activation checkpointing on 1 GPU;
            model.zero_grad(set_to_none=True)  # the forward numbers are kept
            if device.type == "cuda":
                torch.cuda.empty_cache()
            error = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"
            print(f"{name} fwd+bwd FAILED {' '.join(error.split())[:300]}", flush=True)
            result.update(fwdbwd_ms=None, fwdbwd_error=error[:2000])
    peaks = _gather((fwd_peak, bwd_peak))  # peak memory of every GPU (rank order)
    result["fwd_peak_gib_per_rank"] = [p[0] for p in peaks]
    if args.backward:
        result["fwdbwd_peak_gib_per_rank"] = [p[1] for p in peaks]
    return result, out


def _diff(out: torch.Tensor, ref_path: Path) -> dict | None:
    if not ref_path.exists():
        return None
    ref = torch.load(ref_path).to(out.device)
    if ref.shape != out.shape:
        return {"error": f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"}
    diff = (out - ref).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(ref.abs().max().item(), 1e-12), "finite": bool(out.isfinite().all())}


# --------------------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------------------
def _variants(args, world: int) -> list[tuple[str, str, float]]:
    variants = [("ours_dense", "dense", 0.0)] + [(f"ours_vsa_{s:g}", "vsa", s) for s in args.sparsity]
    if world == 1:
        variants.insert(1, ("ours_local", "local", 0.0))  # LocalAttention processors: no sharding machinery
    if args.compare_rotary:  # same layers with the PyTorch rotary formula instead of the fused Triton kernel
        variants += [(f"{name}_torch_rotary", attention, s) for name, attention, s in list(variants)
                     if attention != "vsa"]
    if args.ring > 1:  # hybrid layout: dense attention is Ulysses x ring; VSA always runs pure Ulysses
        variants = [(f"ours_dense_u{world // args.ring}xr{args.ring}", "dense", 0.0)]
    if args.compile:  # regional torch.compile of the transformer blocks (fullgraph), as `generate --compile`
        variants += [(f"{name}_compiled", attention, s) for name, attention, s in list(variants)
                     if not name.endswith("_torch_rotary")]
    return variants


def run(args) -> None:
    from diffusers_dist_attn import envs, init_sequence_parallel
    from diffusers_dist_attn.models import parallelize

    cpu = True if args.device == "cpu" else (False if args.device == "cuda" else None)
    groups = init_sequence_parallel(ring=args.ring if args.ring > 1 else None, cpu=cpu)
    world, rank = groups.world_size, groups.rank
    device = groups.device
    model, inputs, config = _build(args, device)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    key = f"{args.model}_{args.resolution}_{args.frames}f_{config['num_layers']}l_t{args.text_len}_{args.dtype}"
    stock_path = work / f"stock_{key}.pt"

    def same_path(variant: str) -> Path:  # each variant's 1-process output
        return work / f"{variant}_{key}.pt"

    out_dir = Path(args.out)
    ring = f"_ring{args.ring}" if args.ring > 1 else ""
    path = out_dir / f"pipeline_{args.model}_{args.resolution}_{config['num_layers']}l_{world}gpu{ring}{args.tag}.json"
    record = {
        "benchmark": "bench_pipeline", "model": args.model, "resolution": args.resolution, "frames": args.frames,
        "text_len": args.text_len, "layers": config["num_layers"], "gpus": world, "device_type": device.type,
        "ring": args.ring, "ulysses": groups.ulysses_size, "card": _card(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "dtype": args.dtype, "iters": args.iters, "warmup": args.warmup,
        "dry_run": args.dry_run, "results": [],
    }
    results = record["results"]

    def save(res: dict) -> None:
        results.append(res)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1))
            _print_row(world, res)

    def attach_diffs(res: dict, out: torch.Tensor | None, variant: str) -> None:
        if out is None or rank != 0:
            return
        stock = _diff(out, stock_path)
        if stock is not None:
            res["diff_vs_stock_1gpu"] = stock
            if "max_abs" in stock:
                res["max_abs_diff_vs_stock_1gpu"] = stock["max_abs"]
        if world > 1:  # a hybrid layout's reference is the same variant without the layout suffix; a compiled
            base = re.sub(r"_u\d+xr\d+", "", variant)  # variant's is its eager twin when no 1-GPU compiled run
            for ref in dict.fromkeys((base, base.removesuffix("_compiled"))):
                same = _diff(out, same_path(ref))
                if same is not None:
                    res["diff_vs_same_variant_1gpu"] = {**same, "reference": f"{ref} at 1 GPU"}
                    break

    wanted = (lambda name: True) if not args.variants else (lambda name: name in args.variants)
    if world == 1 and (wanted("stock") or not stock_path.exists()):
        try:
            res, out = _measure("stock", model, inputs, args, device)
            torch.save(out.cpu(), stock_path)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            res, out = _failed("stock", exc, world), None
        save(res)
    elif world > 1 and not stock_path.exists():  # no 1-GPU run before this one: rank 0 makes the reference
        if rank == 0:
            try:
                with torch.no_grad():
                    torch.save(model(**inputs)[0].float().cpu(), stock_path)
                print(f"{world} GPU: stock reference computed on rank 0 -> {stock_path}", flush=True)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the variants run without that diff
                print(f"{world} GPU: stock reference on rank 0 FAILED {type(exc).__name__}: {str(exc)[:300]}",
                      flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        _barrier()
    for name, attention, sparsity in [v for v in _variants(args, world) if wanted(v[0])]:
        os.environ[envs.ROTARY.name] = "torch" if name.endswith("_torch_rotary") else "auto"  # read at call time
        out = None
        try:
            with parallelize(model, attention=attention, sparsity=sparsity):
                if name.endswith("_compiled"):  # ring attention is a deliberate graph break (p2p ops do not trace)
                    model.compile_repeated_blocks(fullgraph=args.ring == 1)
                try:
                    res, out = _measure(name, model, inputs, args, device)
                finally:
                    if name.endswith("_compiled"):
                        for block in model.blocks:
                            block._compiled_call_impl = None
                        torch._dynamo.reset()
        except Exception as exc:  # noqa: BLE001 - a variant that fails (to compile, OOM) is reported, not fatal
            res = _failed(name, exc, world)
        os.environ[envs.ROTARY.name] = "auto"
        if out is not None and world == 1:
            torch.save(out.cpu(), same_path(name))
        attach_diffs(res, out, name)
        save(res)
    if world > 1 and args.diffusers_cp and args.ring == 1 and wanted("diffusers_cp"):
        out = None
        try:
            from diffusers import ContextParallelConfig

            count = torch.accelerator.device_count
            if device.type == "cpu":  # diffusers places rank r on device r % device_count(): 0 on a CPU-only host
                torch.accelerator.device_count = lambda: 1
            try:
                model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
            finally:
                torch.accelerator.device_count = count
            res, out = _measure("diffusers_cp", model, inputs, args, device)
        except Exception as exc:  # noqa: BLE001
            res = _failed("diffusers_cp", exc, world)
        attach_diffs(res, out, "stock")  # its same-variant reference is the 1-GPU stock output
        res.pop("diff_vs_same_variant_1gpu", None)
        save(res)
    if rank == 0:
        print(f"wrote {path}", flush=True)


def _failed(name: str, exc: BaseException, world: int) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
    print(f"{world} GPU {name} (rank {rank}): FAILED {type(exc).__name__}: {str(exc)[:500]}", flush=True)
    return {"variant": name, "fwd_ms": float("nan"), "fwd_peak_gib": None,
            "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}


def _short_error(r: dict, n: int = 100) -> str:
    return " ".join(r["error"].split())[:n]


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _print_row(world: int, r: dict) -> None:
    if "profile_fwd" in r:
        p0 = r["profile_fwd"]["rank0"]
        cats = "  ".join(f"{k} {v:.1f}" for k, v in p0["kernel_ms"].items())
        print(f"{world} GPU {r['variant']:>24}: profiled fwd wall {p0['wall_ms']:.1f} ms, GPU busy "
              f"{p0['busy_ms']:.1f} ms; kernel ms (rank 0): {cats}")
    peak = r.get("fwdbwd_peak_gib") or r.get("fwd_peak_gib")
    diff = r.get("diff_vs_stock_1gpu", {}).get("max_abs")
    same = r.get("diff_vs_same_variant_1gpu", {}).get("max_abs")
    print(f"{world} GPU {r['variant']:>24}: fwd {_fmt(r['fwd_ms']):>8} ms  fwd+bwd {_fmt(r.get('fwdbwd_ms')):>8} ms"
          f"  peak {_fmt(peak, '.2f'):>6} GiB  diff vs stock {_fmt(diff, '.3g')}  vs same 1-GPU {_fmt(same, '.3g')}"
          + (f"  ERROR {_short_error(r)}" if "error" in r else ""), flush=True)


# --------------------------------------------------------------------------------------------------------------
# tables and plots
# --------------------------------------------------------------------------------------------------------------
def _load_groups(folder: str) -> dict[tuple, dict[int, dict]]:
    records = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("pipeline_*.json"))]
    groups: dict[tuple, dict[int, dict]] = {}
    for rec in records:
        by_gpus = groups.setdefault((rec["model"], rec["resolution"], rec["layers"], rec.get("card", "?")), {})
        if rec["gpus"] in by_gpus:  # a hybrid (ring) run at the same GPU count: merge its rows
            by_gpus[rec["gpus"]] = {**by_gpus[rec["gpus"]],
                                    "results": by_gpus[rec["gpus"]]["results"] + rec["results"]}
        else:
            by_gpus[rec["gpus"]] = rec
    return groups


def _title(key: tuple, by_gpus: dict[int, dict]) -> str:
    first = next(iter(by_gpus.values()))
    dates = sorted({rec.get("date", "?")[:10] for rec in by_gpus.values()})
    return (f"{key[0]} {key[1]} ({key[2]} layers), {first['card']} x {'/'.join(map(str, sorted(by_gpus)))}, "
            f"{first.get('dtype', 'bf16')}, {', '.join(dates)}")


def _base_variant(variant: str) -> str:
    """The 1-GPU row a multi-GPU row's scaling efficiency is computed against."""
    return "stock" if variant == "diffusers_cp" else re.sub(r"_u\d+xr\d+", "", variant)


def _max_peak(r: dict) -> float | None:
    """The largest per-GPU peak (fwd+bwd if run, else fwd) of one result row."""
    peaks = [p for p in (r.get("fwdbwd_peak_gib_per_rank") or r.get("fwd_peak_gib_per_rank") or []) if p is not None]
    return max(peaks) if peaks else (r.get("fwdbwd_peak_gib") or r.get("fwd_peak_gib"))  # older files: rank 0


def summary(folder: str) -> str:
    """Short pivot: one row per variant, `fwd / fwd+bwd ms` per GPU count, scaling efficiency at the most GPUs,
    and the largest diff vs the 1-GPU stock output."""
    lines = [] if list(Path(folder).glob("pipeline_*.json")) else [f"(no pipeline_*.json in {folder})"]
    for key, by_gpus in sorted(_load_groups(folder).items()):
        gpus = sorted(by_gpus)
        rows: dict[str, dict[int, dict]] = {}
        for g in gpus:
            for r in by_gpus[g]["results"]:
                rows.setdefault(r["variant"], {})[g] = r
        lines.append(f"\n{_title(key, by_gpus)}   [fwd / fwd+bwd ms; eff = 1-GPU fwd / (P x fwd) at P = {gpus[-1]}]")
        lines.append("| variant | " + " | ".join(f"{g} GPU" for g in gpus) + " | eff | max diff vs stock | peak GiB/GPU |")
        lines.append("|---|" + "---|" * len(gpus) + "---|---|---|")
        for variant, per in rows.items():
            cells = []
            for g in gpus:
                r = per.get(g)
                cells.append("-" if r is None else ("ERR" if "error" in r else
                             f"{_fmt(r['fwd_ms'])} / {_fmt(r.get('fwdbwd_ms'))}"))
            one = rows.get(_base_variant(variant), {}).get(1)
            last = per.get(gpus[-1])
            eff = "-"
            if one and last and gpus[-1] > 1 and not math.isnan(one["fwd_ms"]) and not math.isnan(last["fwd_ms"]):
                eff = f"{one['fwd_ms'] / (gpus[-1] * last['fwd_ms']):.0%}"
            diffs = [r.get("diff_vs_stock_1gpu", {}).get("max_abs", r.get("max_abs_diff_vs_stock_1gpu"))
                     for r in per.values()]
            diffs = [d for d in diffs if d is not None]
            peak = "/".join(_fmt(_max_peak(per[g]), ".1f") if g in per else "-" for g in gpus)
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {eff} | {_fmt(max(diffs) if diffs else None, '.3g')} | {peak} |")
    return "\n".join(lines)


def plot(folder: str) -> None:
    """Table (speedup vs stock 1 GPU, scaling efficiency) and a PNG from all pipeline_*.json in `folder`."""
    groups = _load_groups(folder)
    lines = []
    for key, by_gpus in sorted(groups.items()):
        one = {r["variant"]: r for r in by_gpus.get(1, {}).get("results", [])}
        base = one.get("stock", {}).get("fwd_ms")
        lines.append(f"\n{_title(key, by_gpus)}")
        lines.append("| GPUs | variant | fwd ms | speedup vs stock 1 GPU | scaling eff. | fwd+bwd ms | peak GiB per GPU "
                     "(fwd+bwd if run, else fwd) | max abs diff vs stock 1 GPU | vs same variant 1 GPU |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for gpus, rec in sorted(by_gpus.items()):
            for r in rec["results"]:
                single = one.get(_base_variant(r["variant"]), {}).get("fwd_ms")
                ok = not math.isnan(r["fwd_ms"])
                eff = f"{single / (gpus * r['fwd_ms']):.0%}" if single and ok else "-"
                speed = f"{base / r['fwd_ms']:.2f}x" if base and ok else "-"
                peaks = r.get("fwdbwd_peak_gib_per_rank") or r.get("fwd_peak_gib_per_rank") or [_max_peak(r)]
                peak = "/".join(_fmt(p, ".2f") for p in peaks)
                lines.append(f"| {gpus} | {r['variant']} | {_fmt(r['fwd_ms'])} | {speed} | {eff} | "
                             f"{_fmt(r.get('fwdbwd_ms'))} | {peak} | "
                             f"{_fmt(r.get('diff_vs_stock_1gpu', {}).get('max_abs', r.get('max_abs_diff_vs_stock_1gpu')), '.3g')} | "
                             f"{_fmt(r.get('diff_vs_same_variant_1gpu', {}).get('max_abs'), '.3g')} |"
                             + (f" error: {_short_error(r, 80)}" if "error" in r else ""))
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for key, by_gpus in groups.items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        variants = sorted({r["variant"] for rec in by_gpus.values() for r in rec["results"]})
        colors = {v: plt.get_cmap("tab20")(i % 20) for i, v in enumerate(variants)}  # same colour in both panels
        for ax, metric, label in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "forward+backward")):
            for v in variants:
                pts = [(g, r.get(metric)) for g, rec in sorted(by_gpus.items()) for r in rec["results"]
                       if r["variant"] == v and r.get(metric) is not None and not math.isnan(r[metric])]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v, color=colors[v])
            ax.set_xlabel("GPUs")
            ax.set_ylabel(f"transformer {label} (ms, median)")
            ax.set_xticks(sorted(by_gpus))
            ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle(_title(key, by_gpus), fontsize=9)
        fig.tight_layout()
        name = f"pipeline_{key[0]}_{key[1]}_{key[2]}l"
        if sum(k[:3] == key[:3] for k in groups) > 1:  # the same shape on several cards: one PNG per card
            name += "_" + re.sub(r"[^A-Za-z0-9]+", "_", key[3]).strip("_").lower()
        fig.savefig(Path(folder) / f"{name}.png", dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(WAN_CONFIGS), default="wan-1.3b")
    parser.add_argument("--layers", type=int, default=0, help="fewer layers than the real config (0 = real)")
    parser.add_argument("--resolution", choices=sorted(RESOLUTIONS), default="480p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--text-len", type=int, default=512, help="text tokens (Wan: 512)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cpu: gloo process group and CPU tensors (dry runs)")
    parser.add_argument("--ring", type=int, default=1, help="ring degree of a hybrid ulysses x ring layout (dense only)")
    parser.add_argument("--sparsity", type=float, nargs="*", default=[0.875, 0.9])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-backward", dest="backward", action="store_false")
    parser.add_argument("--no-diffusers-cp", dest="diffusers_cp", action="store_false")
    parser.add_argument("--profile", action="store_true", help="also profile one forward per variant (kernel time "
                        "per category: attention, GEMMs, communication, copies, norms/elementwise; CUDA only)")
    parser.add_argument("--compare-rotary", action="store_true",
                        help="also run ours dense with the PyTorch rotary formula (DIFFUSERS_DIST_ATTN_ROTARY=torch)")
    parser.add_argument("--compile", action="store_true",
                        help="also run ours with the transformer blocks torch.compile'd (fullgraph, regional)")
    parser.add_argument("--variants", nargs="*", help="only these variants (e.g. stock ours_dense ours_vsa_0.875 "
                        "ours_vsa_0.875_compiled diffusers_cp)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny Wan config, fp32, CPU/gloo, 1 timed step, no warm-up (checks the code paths)")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name (e.g. _h200)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work-dir", default=os.environ.get("TMPDIR", "/tmp") + "/dda_bench")
    parser.add_argument("--plot", metavar="FOLDER", help="only print the table and write PNGs from FOLDER")
    parser.add_argument("--summary", metavar="FOLDER", help="only print the short pivot table from FOLDER")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return
    if args.summary:
        print(summary(args.summary))
        return
    if args.dry_run:
        args.model, args.resolution, args.frames, args.text_len = "tiny", "tiny", 17, 16
        args.dtype, args.iters, args.warmup = "fp32", 1, 0
        args.device = "cpu" if args.device == "auto" else args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (use --device cpu or --dry-run for a CPU run)")
    run(args)


if __name__ == "__main__":
    main()
