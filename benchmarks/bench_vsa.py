"""Benchmark Video Sparse Attention against dense attention: forward and forward+backward medians.

One run prints a table and writes `vsa_bench_<tag>.json` (+ `vsa_bench_<tag>.png` when matplotlib is present):

    python benchmarks/bench_vsa.py                         # default shapes and sparsities
    python benchmarks/bench_vsa.py --extra 2 24 16384 64   # plus a user shape B H S D (S a multiple of 64)
    python benchmarks/bench_vsa.py --sweep all             # first tune the Triton launch configs, then measure
    python benchmarks/bench_vsa.py --sweep sparse --grid 21 30 52 --heads 12 --sweep-only   # tune on a real grid

Methods: SDPA with the cuDNN backend and with the flash backend, flash-attn (if importable), our Triton VSA,
and fastvideo-kernel's Triton VSA (if importable; `FASTVIDEO_VSA_TRITON=1`). VSA runs on tiled tensors with all
blocks full (S = 64 * N); inputs are random bf16 with a random gate. Timing: `triton.testing.do_bench` (CUDA
events, L2 flushed between runs, warm-up first), median. TFLOP/s: dense-equivalent `4*B*H*S^2*D` (fwd; x3.5 for
fwd+bwd) and actual sparse `4*B*H*S*(64*topk)*D` for VSA, both over the measured time; `x cuDNN` is the cuDNN
dense time over the method's time, measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_dist_attn.vsa.reference import real_slots  # noqa: E402
from diffusers_dist_attn.vsa.tiling import num_blocks, tile_layout, topk_for_sparsity  # noqa: E402

DEFAULT_SHAPES = [(1, 12, 32768, 128), (1, 10, 75648, 128)]
GRID: tuple[int, int, int] | None = None  # --grid: the stage timings and the sweep use this grid's block sizes
DEFAULT_SPARSITY = [0.875, 0.9]
FWD_BWD_FACTOR = 3.5  # backward = 2.5x forward matmul work (FlashAttention convention)


def _median_ms(fn, grad_to_none=None) -> float:
    import triton.testing

    fn()  # compile / autotune / handle creation
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    rep = min(3000.0, max(300.0, 10 * est))
    return float(triton.testing.do_bench(fn, warmup=max(25.0, 2 * est), rep=rep, grad_to_none=grad_to_none,
                                         return_mode="median"))  # fmt: skip


def _time_pair(forward, inputs) -> tuple[float, float]:
    """(forward ms under no_grad, forward+backward ms)."""
    with torch.no_grad():
        fwd = _median_ms(lambda: forward(*inputs))
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = forward(*leaves)
    dout = torch.randn_like(out)
    del out

    def step():
        forward(*leaves).backward(dout)

    return fwd, _median_ms(step, grad_to_none=leaves)


def _dense_methods():
    methods = {
        "sdpa_cudnn": lambda q, k, v, g: _sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": lambda q, k, v, g: _sdpa(q, k, v, SDPBackend.FLASH_ATTENTION),
    }
    try:
        from flash_attn import flash_attn_func

        methods["flash_attn"] = lambda q, k, v, g: flash_attn_func(q, k, v)  # BSHD inputs, see _layout
    except ImportError:
        pass
    return methods


def _sdpa(q, k, v, backend):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def _sparse_methods(topk: int, block_sizes: torch.Tensor):
    from diffusers_dist_attn.vsa import triton_ops

    methods = {"vsa_triton": lambda q, k, v, g: triton_ops.vsa_tiled_triton(q, k, v, g, block_sizes, topk)}
    cuda_ext = _cuda_ext()
    if cuda_ext is not None:
        from diffusers_dist_attn.vsa import cuda_ops

        methods["vsa_cuda"] = lambda q, k, v, g: cuda_ops.vsa_tiled_cuda(q, k, v, g, block_sizes, topk)
    try:
        os.environ.setdefault("FASTVIDEO_VSA_TRITON", "1")
        import fastvideo_kernel

        methods["fastvideo_triton"] = lambda q, k, v, g: fastvideo_kernel.video_sparse_attn(
            q, k, v, block_sizes, block_sizes, topk, (4, 4, 4), compress_attn_weight=g
        )
    except Exception as exc:  # noqa: BLE001 - optional dependency, any import failure means "absent"
        print(f"fastvideo_kernel not usable: {type(exc).__name__}: {exc}")
    return methods


def _cuda_ext():
    """The built sm_90a extension when `cuda_ops.is_available()` (env opt-in, sm_90, built), else None."""
    from diffusers_dist_attn.vsa import cuda_ops

    if not cuda_ops.is_available():
        return None
    from diffusers_dist_attn.vsa.cuda_build import load_extension

    return load_extension()


def _row(shape, method, sparsity, topk, fwd, fwdbwd, cudnn) -> dict:
    b, h, s, d = shape
    dense = 4.0 * b * h * s * s * d
    sparse = dense if topk is None else 4.0 * b * h * s * (64 * topk) * d
    return {
        "shape": list(shape), "method": method, "sparsity": sparsity, "topk": topk,
        "fwd_ms": fwd, "fwdbwd_ms": fwdbwd,
        "fwd_dense_tflops": dense / fwd / 1e9, "fwdbwd_dense_tflops": FWD_BWD_FACTOR * dense / fwdbwd / 1e9,
        "fwd_sparse_tflops": sparse / fwd / 1e9, "fwdbwd_sparse_tflops": FWD_BWD_FACTOR * sparse / fwdbwd / 1e9,
        "fwd_x_cudnn": cudnn[0] / fwd if cudnn else None, "fwdbwd_x_cudnn": cudnn[1] / fwdbwd if cudnn else None,
    }  # fmt: skip


def _inputs(shape, layout="bhsd"):
    b, h, s, d = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    dims = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
    return [torch.randn(dims, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4)]


def _safe(fn, label):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - report and continue with the other methods
        print(f"  {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        torch.cuda.empty_cache()
        return None


_STATE: dict = {}


def _stage_state(shape, sparsity) -> dict:
    """Inputs and intermediate tensors of every VSA stage at one shape (cached for the last shape/sparsity)."""
    from diffusers_dist_attn.vsa import triton_kernels as kern
    from diffusers_dist_attn.vsa import triton_ops

    key = (tuple(shape), sparsity)
    if _STATE.get("key") == key:
        return _STATE
    _STATE.clear()
    q, k, v, g = _inputs(shape)
    n = shape[2] // 64
    st = {"key": key, "q": q, "k": k, "v": v, "g": g, "topk": topk_for_sparsity(sparsity, n), "scale": shape[3] ** -0.5}
    if GRID is None:
        st["bs"] = torch.full((n,), 64, device="cuda", dtype=torch.int32)
    else:  # the grid's partial blocks (size classes), zero in their pad slots
        st["bs"] = tile_layout(GRID, "cuda").block_sizes
        real = real_slots(st["bs"])[:, None]
        for name in ("q", "k", "v", "g"):
            st[name] = st[name] * real
        q, k, v, g = (st[name] for name in ("q", "k", "v", "g"))
    st["qc"], st["kc"], st["vc"] = kern.block_means(q, k, v, st["bs"])
    st["out_c"], _, st["sel"], st["idx"], st["num"] = kern.coarse_select(
        st["qc"], st["kc"], st["vc"], st["topk"], st["scale"], st["bs"]
    )
    st["out"], st["lse"], st["out_s"] = kern.sparse_fwd(
        q, k, v, g, st["out_c"], st["idx"], st["num"], st["bs"], st["scale"], True
    )
    st["dout"] = torch.randn_like(q)
    st["delta"], _, st["doc"] = kern.bwd_preprocess(st["dout"], st["out_s"], g, st["out_c"], st["bs"])
    st["dqc"], st["dkc"], st["dvc"] = triton_ops.coarse_backward(st["doc"], st["qc"], st["kc"], st["vc"], st["scale"])
    st["k2q"], st["k2qn"] = kern.build_k2q(st["sel"], st["bs"])
    _STATE.update(st)
    return _STATE


def _stage_fns(st: dict) -> dict:
    """One zero-argument callable per stage (forward: 3 launches; backward: preprocess, torch, 3 launches)."""
    from diffusers_dist_attn.vsa import triton_kernels as kern
    from diffusers_dist_attn.vsa import triton_ops

    q, k, v, g, bs, scale, topk = (st[x] for x in ("q", "k", "v", "g", "bs", "scale", "topk"))
    grad = (q, k, v, st["dout"], st["lse"], st["delta"])
    fns = {
        "block_means": lambda: kern.block_means(q, k, v, bs),
        "coarse_select": lambda: kern.coarse_select(st["qc"], st["kc"], st["vc"], topk, scale, bs),
        "sparse_fwd": lambda: kern.sparse_fwd(q, k, v, g, st["out_c"], st["idx"], st["num"], bs, scale, False),
        "bwd_preprocess": lambda: kern.bwd_preprocess(st["dout"], st["out_s"], g, st["out_c"], bs),
        "coarse_backward_torch": lambda: triton_ops.coarse_backward(st["doc"], st["qc"], st["kc"], st["vc"], scale),
        "bwd_dq": lambda: kern.sparse_bwd_dq(*grad, st["dqc"], st["idx"], st["num"], bs, scale),
        "build_k2q": lambda: kern.build_k2q(st["sel"], bs),
        "bwd_dkdv": lambda: kern.sparse_bwd_dkdv(
            *grad, st["dkc"], st["dvc"], st["k2q"], st["k2qn"], bs, scale, topk == bs.numel()
        ),
    }
    ext = _cuda_ext()
    if ext is not None:  # the sm_90a fine-stage forward on the same lists, writing into preallocated outputs
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
        fns["sparse_fwd_cuda"] = lambda: ext.sparse_fwd(
            q, k, v, g, st["out_c"], st["idx"], st["num"], bs, scale, out, None, lse
        )
    return fns


def breakdown(shape, sparsity) -> dict:
    """Median ms of each stage of our VSA at one shape, and the fine kernels' actual TFLOP/s."""
    st = _stage_state(shape, sparsity)
    res = {name: _median_ms(fn) for name, fn in _stage_fns(st).items()}
    fine = 4.0 * shape[0] * shape[1] * shape[2] * 64 * st["topk"] * shape[3]
    res["sparse_fwd_tflops"] = fine / res["sparse_fwd"] / 1e9
    if "sparse_fwd_cuda" in res:
        res["sparse_fwd_cuda_tflops"] = fine / res["sparse_fwd_cuda"] / 1e9
    res["bwd_dq_tflops"] = 1.5 * fine / res["bwd_dq"] / 1e9  # 3 matmuls
    res["bwd_dkdv_tflops"] = 2.0 * fine / res["bwd_dkdv"] / 1e9  # 4 matmuls
    res["profile_fwdbwd"] = _profile_fwdbwd(st)
    return res


def _profile_fwdbwd(st: dict) -> list:
    """GPU time per kernel over 3 forward+backward steps of the public entry point (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from diffusers_dist_attn.vsa import triton_ops

    leaves = [st[x].detach().requires_grad_() for x in ("q", "k", "v", "g")]

    def step():
        triton_ops.vsa_tiled_triton(*leaves, st["bs"], st["topk"]).backward(st["dout"])

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        cuda_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if cuda_us:
            rows.append({"name": e.key[:80], "calls": e.count, "ms_per_step": cuda_us / 3e3})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    print(f"profile fwd+bwd: {total:.3f} ms GPU time per step")
    for r in rows[:14]:
        print(f"  {r['ms_per_step']:8.3f} ms  x{r['calls'] // 3:<3d} {r['name']}")
    return rows


# (tma, num_warps, num_stages) per fine-stage kernel; `*_dense` run at sparsity 0 (two blocks per program)
SWEEP_SPACE = {
    "fwd": [(1, 4, 2), (1, 4, 3), (1, 4, 4), (1, 4, 5), (0, 4, 2), (0, 4, 3), (1, 8, 2), (1, 8, 3)],
    "dq": [(1, 4, 1), (1, 4, 2), (1, 4, 3), (1, 4, 4), (0, 4, 2), (1, 8, 2), (1, 8, 3)],
    "dkdv": [(1, 4, 1), (1, 4, 2), (1, 4, 3), (0, 4, 2), (0, 4, 3), (1, 8, 2), (1, 8, 3)],
    "fwd_dense": [(1, 8, 2), (1, 8, 3), (0, 8, 3)],
    "dq_dense": [(1, 8, 2), (1, 8, 3), (0, 8, 2)],
    "dkdv_dense": [(1, 8, 2), (1, 8, 3), (0, 8, 2)],
}
# the dense sweep also times one block per program (the sparse config) and keeps grouping only if it wins
_SWEEP_STAGE = {"fwd": "sparse_fwd", "dq": "bwd_dq", "dkdv": "bwd_dkdv"}


def sweep(shape, sparsity, which: str) -> dict:
    """Time each launch config of the fine-stage kernels (each checked against the first config's result) and
    set the fastest in `triton_kernels.CONFIGS`. `which`: sparse (at `sparsity`), dense (at 0) or all."""
    from diffusers_dist_attn.vsa import triton_kernels as kern

    results = {}
    for kernel, space in SWEEP_SPACE.items():
        dense = kernel.endswith("_dense")
        if which != "all" and which != ("dense" if dense else "sparse"):
            continue
        st = _stage_state(shape, 0.0 if dense else sparsity)
        fn = _stage_fns(st)[_SWEEP_STAGE[kernel.removesuffix("_dense")]]
        default = dict(kern.CONFIGS[kernel])
        first = fn()
        rows = []
        candidates = [
            {"tma": t, "num_warps": w, "num_stages": s, **({"group": 2} if dense else {})} for t, w, s in space
        ]
        if dense:
            candidates.append({**default, "group": 1})
        for cfg in candidates:
            kern.CONFIGS[kernel] = cfg

            def timed(fn=fn, first=first):
                for a, b in zip(fn(), first, strict=False):  # every config must compute the same thing
                    if a.numel() and not _rel(a, b) < 1e-2:
                        raise RuntimeError(f"config disagrees with the default (rel err {_rel(a, b):.2e})")
                return _median_ms(fn)

            ms = _safe(timed, f"{kernel} {cfg}")
            rows.append({**cfg, "ms": ms})
            print(f"  sweep {kernel:10s} {cfg}: {ms if ms is None else round(ms, 3)}")
        ok = [r for r in rows if r["ms"] is not None]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        kern.CONFIGS[kernel] = {k: v for k, v in best.items() if k != "ms"} if best else default
        results[kernel] = {"rows": rows, "best": kern.CONFIGS[kernel]}
    return results


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run(
    shapes, sparsities, sparsity0_shapes, out_dir: Path, tag: str, do_sweep: str | None, do_breakdown: bool,
    sweep_only: bool = False,
) -> dict:
    from diffusers_dist_attn.vsa import triton_kernels as kern

    card = torch.cuda.get_device_name()
    meta = {
        "card": card, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": __import__("triton").__version__, "dtype": "bfloat16",
    }  # fmt: skip
    print(f"# {card}  {meta['date']}  torch {meta['torch']}  triton {meta['triton']}")
    result = {"meta": meta, "rows": []}
    if do_sweep:
        result["sweep"] = sweep(shapes[0], sparsities[0], do_sweep)
        print("sweep best", json.dumps({k: v["best"] for k, v in result["sweep"].items()}))
        if sweep_only:  # in sweeps/: notebook 03 charts the newest results/vsa_*.json, and a sweep has no rows
            (out_dir / "sweeps").mkdir(parents=True, exist_ok=True)
            (out_dir / "sweeps" / f"vsa_sweep_{tag}.json").write_text(json.dumps(result, indent=1))
            return result
    result["configs"] = {k: dict(v) for k, v in kern.CONFIGS.items()}
    if do_breakdown:
        result["breakdown"] = {str(sparsities[0]): breakdown(shapes[0], sparsities[0])}
        brief = {k: v for k, v in result["breakdown"][str(sparsities[0])].items() if k != "profile_fwdbwd"}
        print("breakdown", json.dumps(brief))
    _STATE.clear()
    torch.cuda.empty_cache()
    for i, shape in enumerate(shapes):
        b, h, s, d = shape
        n = s // 64
        bs = torch.full((n,), 64, device="cuda", dtype=torch.int32)
        cudnn = None
        for name, fn in _dense_methods().items():
            layout = "bshd" if name == "flash_attn" else "bhsd"
            inputs = _inputs(shape, layout)[:3]
            times = _safe(lambda fn=fn, inputs=inputs: _time_pair(lambda q, k, v: fn(q, k, v, None), inputs), name)
            del inputs
            if times is None:
                continue
            cudnn = times if name == "sdpa_cudnn" else cudnn
            result["rows"].append(_row(shape, name, None, None, *times, cudnn))
            print(f"  {shape} {name}: fwd {times[0]:.3f} ms, fwd+bwd {times[1]:.3f} ms")
            torch.cuda.empty_cache()
        sp_list = ([0.0] if i in sparsity0_shapes else []) + list(sparsities)
        for sp in sp_list:
            topk = topk_for_sparsity(sp, n)
            for name, fn in _sparse_methods(topk, bs).items():
                if name != "vsa_triton" and sp == 0.0:
                    continue
                inputs = _inputs(shape)
                times = _safe(lambda fn=fn, inputs=inputs: _time_pair(fn, inputs), f"{name} s={sp}")
                del inputs
                if times is None:
                    continue
                result["rows"].append(_row(shape, name, sp, topk, *times, cudnn))
                print(f"  {shape} {name} s={sp} k={topk}: fwd {times[0]:.3f} ms, fwd+bwd {times[1]:.3f} ms")
                torch.cuda.empty_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"vsa_bench_{tag}.json").write_text(json.dumps(result, indent=1))
    _plot(result, out_dir / f"vsa_bench_{tag}.png")
    print_table(result)
    return result


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(f"\n## VSA benchmark: {meta['card']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, bf16")
    print("| shape B,H,S,D | method | sparsity | topk | fwd ms | fwd+bwd ms | fwd TF/s dense-eq | fwd TF/s sparse"
          " | f+b TF/s dense-eq | f+b TF/s sparse | fwd x cuDNN | f+b x cuDNN |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        sp = "dense" if r["sparsity"] is None else f"{r['sparsity']:g}"

        def f(x, p=2):
            return "-" if x is None else f"{x:.{p}f}"

        print(f"| {','.join(map(str, r['shape']))} | {r['method']} | {sp} | {r['topk'] or '-'} | {f(r['fwd_ms'], 3)}"
              f" | {f(r['fwdbwd_ms'], 3)} | {f(r['fwd_dense_tflops'], 0)} | {f(r['fwd_sparse_tflops'], 0)}"
              f" | {f(r['fwdbwd_dense_tflops'], 0)} | {f(r['fwdbwd_sparse_tflops'], 0)} | {f(r['fwd_x_cudnn'])}"
              f" | {f(r['fwdbwd_x_cudnn'])} |")  # fmt: skip
    targets = check_targets(result)
    if targets:
        print("\ntargets (B1 H12 S32768 D128):")
        for name, (value, limit, ok) in targets.items():
            print(f"  {name}: {value:.3f} vs {limit:.3f} -> {'MET' if ok else 'missed'}")


def check_targets(result: dict) -> dict:
    rows = {(tuple(r["shape"]), r["method"], r["sparsity"]): r for r in result["rows"]}
    shape = (1, 12, 32768, 128)
    out = {}
    r = rows.get((shape, "vsa_triton", 0.875))
    if r:
        out["fwd ms @0.875 <= 2.0"] = (r["fwd_ms"], 2.0, r["fwd_ms"] <= 2.0)
        out["fwd+bwd ms @0.875 <= 7.0"] = (r["fwdbwd_ms"], 7.0, r["fwdbwd_ms"] <= 7.0)
    r0, rc = rows.get((shape, "vsa_triton", 0.0)), rows.get((shape, "sdpa_cudnn", None))
    if r0 and rc:
        for key in ("fwd_ms", "fwdbwd_ms"):
            ratio = r0[key] / rc[key]
            out[f"{key} @0 / cuDNN <= 1.3"] = (ratio, 1.3, ratio <= 1.3)
    return out


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = sorted({tuple(r["shape"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        rows = [r for r in result["rows"] if tuple(r["shape"]) == shape]
        labels = [r["method"] + ("" if r["sparsity"] is None else f"\ns={r['sparsity']:g}") for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["fwd_ms"] for r in rows], 0.4, label="forward")
        ax.bar([i + 0.2 for i in x], [r["fwdbwd_ms"] for r in rows], 0.4, label="forward+backward")
        ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"B,H,S,D = {shape}")
        ax.legend()
    fig.suptitle(f"{result['meta']['card']} {result['meta']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, nargs=4, action="append", metavar=("B", "H", "S", "D"),
                        help="replace the default shapes (repeatable)")  # fmt: skip
    parser.add_argument("--extra", type=int, nargs=4, action="append", metavar=("B", "H", "S", "D"),
                        help="add a shape to the defaults (repeatable)")  # fmt: skip
    parser.add_argument("--sparsity", type=float, nargs="+", default=DEFAULT_SPARSITY)
    parser.add_argument("--sparsity0", type=int, nargs="*", default=[0], help="indices of shapes also run at s=0")
    parser.add_argument("--sweep", choices=["all", "sparse", "dense"], help="tune fine-stage launch configs first")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--grid", type=int, nargs=3, metavar=("T", "H", "W"),
                        help="a real video grid: one shape (1, --heads, 64 N, 128) with its partial blocks")
    parser.add_argument("--heads", type=int, help="heads of the --grid shape (default 12)")
    parser.add_argument("--sweep-only", action="store_true",
                        help="stop after the sweep (writes <out>/sweeps/vsa_sweep_<tag>.json)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--tag", default=dt.date.today().isoformat())
    args = parser.parse_args(argv)
    if args.grid and (args.shapes or args.extra):
        parser.error("--grid sets the one shape; it cannot be combined with --shapes or --extra")
    if args.heads is not None and not args.grid:
        parser.error("--heads applies to --grid only")
    shapes = [tuple(s) for s in (args.shapes or DEFAULT_SHAPES)] + [tuple(s) for s in (args.extra or [])]
    if args.grid:
        global GRID
        GRID = tuple(args.grid)
        shapes = [(1, args.heads or 12, 64 * num_blocks(GRID), 128)]
    for s in shapes:
        if s[2] % 64:
            parser.error(f"S must be a multiple of 64: {s}")
    if args.sweep_only and not args.sweep:
        parser.error("--sweep-only needs --sweep")
    args.out.mkdir(parents=True, exist_ok=True)
    run(shapes, args.sparsity, args.sparsity0, args.out, args.tag, args.sweep, not args.no_breakdown, args.sweep_only)


if __name__ == "__main__":
    main()
