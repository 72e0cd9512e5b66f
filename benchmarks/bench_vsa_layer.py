"""VSA on the grids real videos have, through the public layer and the bare kernel, beside cuDNN dense.

    python benchmarks/bench_vsa_layer.py --out benchmarks/results --tag h200

Cases (one GPU, bf16, D 128; H = the heads one GPU holds): Wan 480p 21x30x52 H12, Wan 720p 21x45x80 H10,
HunyuanVideo 720p/129f 33x45x80 H6 (a 4-GPU shard) with 256 text tokens (200 valid). Methods, side by side in one
run: cuDNN dense SDPA over the video tokens (+ all text tokens for HunyuanVideo), our Triton kernel on pre-tiled
input (`vsa_tiled_triton`), fastvideo-kernel on the same tiled input (when importable), and the public layer
`DistributedAttention_VSA` (world 1, `[B, S, H, D]` in and out) on Triton and (`--cuda`) on the compiled sm_90a
forward (`kernel_cuda` / `layer_cuda`), and with text on the automatic choice; `--one-class` adds the Triton
kernel and layer with every block read as a 64-row tile (`*_1class`: no size classes, the kernels before the
split) beside the default, `--dkdv-in-order` the layer with dK/dV programs in block order (not longest list
first); at sparsity 0 `layer_auto` is the automatic choice (dense attention + coarse stage). Inputs: `random` (normal)
and `smooth` (low-frequency fields over (t, h, w) plus noise, so neighbouring tiles select overlapping key
blocks as real video attention does). Timing: `triton.testing.do_bench` medians (see `bench_vsa.py`); TFLOP/s on
the computed 64x64 blocks (`4 B H N 64 topk 64 D`, x3.5 for forward+backward). Writes `vsa_layer_<tag>.json` and
`.png`, prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vsa import FWD_BWD_FACTOR, _time_pair  # noqa: E402

from diffusers_dist_attn import DistributedAttention_VSA  # noqa: E402
from diffusers_dist_attn.attention import selection_report  # noqa: E402
from diffusers_dist_attn.vsa import cuda_ops, triton_kernels, triton_ops  # noqa: E402
from diffusers_dist_attn.vsa.tiling import tile, tile_layout, topk_for_sparsity  # noqa: E402

CASES = [  # name, grid, heads, text tokens (valid)
    ("wan480", (21, 30, 52), 12, None),
    ("wan720", (21, 45, 80), 10, None),
    ("hunyuan720", (33, 45, 80), 6, (256, 200)),
]


def smooth_field(grid: tuple[int, int, int], channels: int, gen: torch.Generator, modes: int = 8) -> torch.Tensor:
    """`[S, channels]`: a sum of `modes` low-frequency cosines over (t, h, w) per channel, plus 0.3 noise."""
    t, h, w = grid
    coords = torch.stack(torch.meshgrid(*(torch.arange(n, device="cuda", dtype=torch.float32) for n in grid),
                                        indexing="ij"), -1).reshape(-1, 3)
    out = 0.3 * torch.randn(coords.shape[0], channels, device="cuda", generator=gen)
    for _ in range(modes):
        freq = torch.rand(3, device="cuda", generator=gen) * 0.35
        phase = torch.rand(channels, device="cuda", generator=gen) * 2 * math.pi
        amp = torch.randn(channels, device="cuda", generator=gen) / math.sqrt(modes)
        out += torch.cos((coords @ freq)[:, None] + phase[None]) * amp[None]
    return out


def make_inputs(kind: str, grid, heads: int, d: int, seed: int) -> list[torch.Tensor]:
    """q, k, v, gate `[1, S, H, D]` bf16."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    s = math.prod(grid)
    tensors = []
    for i in range(4):
        if kind == "smooth" and i < 2:
            x = smooth_field(grid, heads * d, gen).reshape(1, s, heads, d)
        else:
            x = torch.randn(1, s, heads, d, device="cuda", generator=gen)
        tensors.append(x.bfloat16())
    tensors[3] = tensors[3] * 0.1  # a small learned-gate scale
    return tensors


def _fastvideo() -> dict[str, object]:
    """fastvideo-kernel's VSA entry point per backend it can run here: `fastvideo_tk` (its compiled sm_90
    ThunderKittens kernels; the wheel's extension must load against this torch) and `fastvideo_triton`."""
    try:
        import fastvideo_kernel

        fv_sparse = importlib.import_module("fastvideo_kernel.block_sparse_attn")  # the package shadows it
        sm90 = fv_sparse._is_sm90() and all(op is not None for op in fv_sparse._get_sm90_ops())  # private API
    except Exception as exc:  # noqa: BLE001 - optional dependency (and its private helpers may change)
        print(f"fastvideo_kernel not usable: {type(exc).__name__}: {exc}")
        return {}

    def backend(force_triton: bool):
        def run(*args, **kwargs):
            os.environ["FASTVIDEO_VSA_TRITON"] = "1" if force_triton else "0"  # read per call
            return fastvideo_kernel.video_sparse_attn(*args, **kwargs)

        return run

    found = {"fastvideo_triton": backend(True)}
    if sm90:
        found["fastvideo_tk"] = backend(False)
    else:
        print("fastvideo_kernel: no sm_90 extension here (its wheel is built for another torch); Triton only")
    print(f"fastvideo_kernel {fastvideo_kernel.__version__}: {sorted(found)}", flush=True)
    return found


@contextlib.contextmanager
def kernel_settings(size_classes: bool = True, dkdv_longest_first: bool = True):
    """Triton kernel switches for side-by-side rows (read at every launch, forward and backward)."""
    saved = triton_kernels.SIZE_CLASSES, triton_kernels.CONFIGS["dkdv"]["longest_first"]
    triton_kernels.SIZE_CLASSES = size_classes
    triton_kernels.CONFIGS["dkdv"]["longest_first"] = int(dkdv_longest_first)
    try:
        yield
    finally:
        triton_kernels.SIZE_CLASSES, triton_kernels.CONFIGS["dkdv"]["longest_first"] = saved


def run_case(name, grid, heads, text, kind, sparsity, fastvideo) -> list[dict]:
    d = 128
    layout = tile_layout(grid, "cuda")
    n = layout.num_blocks
    topk = topk_for_sparsity(sparsity, n)
    s = layout.seq_len
    q, k, v, g = make_inputs(kind, grid, heads, d, seed=sum(map(ord, name + kind)))
    computed = 4.0 * heads * n * 64 * topk * 64 * d
    info = {"case": name, "grid": list(grid), "heads": heads, "head_dim": d, "input": kind, "sparsity": sparsity,
            "tokens": s, "tiles": n, "pad_fraction": 1 - s / layout.tiled_len, "topk": topk}
    rows = []

    def add(method, fn, inputs, flops=computed, **settings):
        try:
            with kernel_settings(**settings):
                fwd, fwdbwd = _time_pair(fn, inputs)
        except Exception as exc:  # noqa: BLE001 - a method that fails is reported, not fatal
            print(f"{name} {kind} {method}: FAILED {type(exc).__name__}: {exc}")
            return
        rows.append({**info, "method": method, "fwd_ms": fwd, "fwdbwd_ms": fwdbwd,
                     "fwd_tflops": flops / fwd / 1e9, "fwdbwd_tflops": FWD_BWD_FACTOR * flops / fwdbwd / 1e9})
        print(f"{name:11s} {kind:6s} s={sparsity} {method:22s} fwd {fwd:8.2f} ms  fwd+bwd {fwdbwd:8.2f} ms", flush=True)

    text_len = 0 if text is None else text[0]
    tq, tk, tv = (torch.randn(1, text_len, heads, d, device="cuda").bfloat16() for _ in range(3))
    if sparsity == CLI_SPARSITIES[0]:  # dense once per case and input kind
        dense_flops = 4.0 * heads * (s + text_len) ** 2 * d

        def cudnn(q, k, v):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        joint = [torch.cat([x, t], 1).transpose(1, 2).contiguous() for x, t in zip((q, k, v), (tq, tk, tv), strict=True)]
        add("cudnn_dense", cudnn, joint, dense_flops)
    tiled = [tile(x, layout) for x in (q, k, v, g)]
    sizes = layout.block_sizes
    add("kernel_triton", lambda q, k, v, g: triton_ops.vsa_tiled_triton(q, k, v, g, sizes, topk), tiled)
    if ONE_CLASS:
        add("kernel_triton_1class", lambda q, k, v, g: triton_ops.vsa_tiled_triton(q, k, v, g, sizes, topk), tiled,
            size_classes=False)
    if CUDA_BUILT:
        add("kernel_cuda", lambda q, k, v, g: cuda_ops.vsa_tiled_cuda(q, k, v, g, sizes, topk), tiled)
    for method, fastvideo_vsa in fastvideo.items():
        add(method, lambda q, k, v, g, fn=fastvideo_vsa: fn(q, k, v, sizes, sizes, topk, (4, 4, 4),
                                                            compress_attn_weight=g), tiled)
    layer = DistributedAttention_VSA(heads, d)
    for impl in ("triton", "cuda") if CUDA_BUILT else ("triton",):
        add(f"layer_{impl}", lambda q, k, v, g, impl=impl: layer(q, k, v, gate_compress=g, grid_size=grid,
                                                                  sparsity=sparsity, implementation=impl)[0],
            [q, k, v, g])
    def layer_triton(q, k, v, g):
        return layer(q, k, v, gate_compress=g, grid_size=grid, sparsity=sparsity, implementation="triton")[0]

    if ONE_CLASS:
        add("layer_triton_1class", layer_triton, [q, k, v, g], size_classes=False)
    if DKDV_IN_ORDER:
        add("layer_triton_dkdv_in_order", layer_triton, [q, k, v, g], dkdv_longest_first=False)
    if topk == n:  # every block: the automatic choice runs dense attention + the coarse stage
        add("layer_auto", lambda q, k, v, g: layer(q, k, v, gate_compress=g, grid_size=grid, sparsity=sparsity)[0],
            [q, k, v, g])
    if text is not None:
        mask = torch.zeros(1, text_len, dtype=torch.bool, device="cuda")
        mask[:, :text[1]] = True

        def with_text(q, k, v, g, tq, tk, tv):
            out, rep = layer(q, k, v, tq, tk, tv, g, grid_size=grid, sparsity=sparsity, replicated_mask=mask)
            return torch.cat([out, rep], 1)

        add("layer_text", with_text, [q, k, v, g, tq, tk, tv])
    return rows


CLI_SPARSITIES = [0.875, 0.9]
CUDA_BUILT = False  # set by --cuda when the sm_90a extension builds
ONE_CLASS = False  # set by --one-class
DKDV_IN_ORDER = False  # set by --dkdv-in-order


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sel = [r for r in rows if r["sparsity"] in (CLI_SPARSITIES[0], None) or r["method"] == "cudnn_dense"]
    labels = sorted({(r["case"], r["input"]) for r in sel})
    methods = [m for m in ("cudnn_dense", "fastvideo_tk", "fastvideo_triton", "kernel_triton", "kernel_cuda", "layer_triton", "layer_cuda",
                           "layer_text") if any(r["method"] == m for r in sel)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key in zip(axes, ("fwd_ms", "fwdbwd_ms"), strict=True):
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            vals = [next((r[key] for r in sel if (r["case"], r["input"]) == lab and r["method"] == method), 0)
                    for lab in labels]
            ax.bar([j + i * width for j in range(len(labels))], vals, width, label=method)
        ax.set_xticks([j + 0.4 for j in range(len(labels))], [f"{c}\n{i}" for c, i in labels], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{key.replace('_ms', '')} ms (median, log)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"VSA s={CLI_SPARSITIES[0]} on real grids, {torch.cuda.get_device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    global CUDA_BUILT, ONE_CLASS, DKDV_IN_ORDER
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--tag", default="gpu")
    parser.add_argument("--cases", nargs="*", default=[c[0] for c in CASES])
    parser.add_argument("--inputs", nargs="*", default=["random", "smooth"])
    parser.add_argument("--sparsity", type=float, nargs="*", default=CLI_SPARSITIES)
    parser.add_argument("--cuda", action="store_true", help="also the compiled sm_90a forward (builds it)")
    parser.add_argument("--one-class", action="store_true",
                        help="also the Triton kernel and layer without size classes (every tile 64 rows)")
    parser.add_argument("--dkdv-in-order", action="store_true",
                        help="also the Triton layer with dK/dV programs launched in block order (not longest first)")
    args = parser.parse_args(argv)
    ONE_CLASS = args.one_class
    DKDV_IN_ORDER = args.dkdv_in_order
    CLI_SPARSITIES[:] = args.sparsity
    if args.cuda:
        os.environ[cuda_ops.ENABLE_ENV] = "1"  # the compiled forward, run by name (the automatic choice is Triton)
        CUDA_BUILT = cuda_ops.is_available()
        print("sm_90a VSA forward:", "built" if CUDA_BUILT else "NOT usable", flush=True)
    fastvideo = _fastvideo()
    rows: list[dict] = []
    for name, grid, heads, text in CASES:
        if name not in args.cases:
            continue
        for kind in args.inputs:
            for sparsity in args.sparsity:
                rows += run_case(name, grid, heads, text, kind, sparsity, fastvideo)
                torch.cuda.empty_cache()
    result = {"meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "card": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "backends": selection_report()}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"vsa_layer_{args.tag}.json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out / f"vsa_layer_{args.tag}.png")
    print("\n## VSA on real grids (ms, median)")
    for r in rows:
        print(f"| {r['case']} | {r['input']} | {r['sparsity']} | {r['method']} | {r['fwd_ms']:.2f} | "
              f"{r['fwdbwd_ms']:.2f} | {r['fwd_tflops']:.0f} |")


if __name__ == "__main__":
    main()
