"""Compare compile-time variants of the sm_90a VSA forward on the fine stage alone, on a real video grid (GPU).

Each variant is a copy of `diffusers_dist_attn/kernels/` with one edit (a regex substitution, or a whole
replacement `.cu` file), built under its own cache key (the source hash), checked against the Triton fine stage on
the same index lists (out, out_s, LSE), then timed next to it. Grid: Wan 480p 21x30x52, H12, D128, bf16; inputs
`random` and `smooth` (from `bench_vsa_layer.py`) at sparsity 0.875, and random at 0 (every block). The lists are
the real coarse top-k of those inputs; the table also gives how much two neighbouring query blocks' lists
overlap (|A u B| / (|A| + |B|): 0.5 = identical, 1 = disjoint). Writes `cuda_fwd_sweep_<tag>.json`.

    DIFFUSERS_DIST_ATTN_VSA_CUDA=1 python benchmarks/sweep_cuda_fwd.py --out /tmp/out [--variant-file NAME=PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_vsa  # noqa: E402
import bench_vsa_layer  # noqa: E402

from diffusers_dist_attn.vsa import cuda_build  # noqa: E402
from diffusers_dist_attn.vsa import triton_kernels as kern  # noqa: E402
from diffusers_dist_attn.vsa.reference import real_slots  # noqa: E402
from diffusers_dist_attn.vsa.tiling import tile, tile_layout, topk_for_sparsity  # noqa: E402

KERNELS = cuda_build.packaged_kernels_dir()
SOURCE = "vsa_fwd_sm90.cu"
# name -> None (the source as it is) or (pattern, replacement) applied to vsa_fwd_sm90.cu
VARIANTS: dict[str, tuple[str, str] | None] = {
    "base": None,
    "stages2": (r"constexpr int kStages = 3;", "constexpr int kStages = 2;"),
}
GRID, HEADS, D = (21, 30, 52), 12, 128
INPUTS = (("random", 0.875), ("smooth", 0.875), ("random", 0.0))


def _variant_dir(name: str, edit: tuple[str, str] | None, file: Path | None) -> Path:
    if edit is None and file is None:
        return KERNELS
    folder = Path(f"/tmp/dda_kernels_{name}")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(KERNELS, folder)
    src = folder / SOURCE
    if file is not None:
        shutil.copy(file, src)
    else:
        text, count = re.subn(edit[0], edit[1], src.read_text())
        if count == 0:
            raise ValueError(f"variant {name}: pattern {edit[0]!r} not found")
        src.write_text(text)
    return folder


def _lists(kind: str, sparsity: float) -> dict:
    layout = tile_layout(GRID, "cuda")
    q, k, v, g = (tile(x, layout) for x in bench_vsa_layer.make_inputs(kind, GRID, HEADS, D, seed=11))
    bs = layout.block_sizes
    topk = topk_for_sparsity(sparsity, layout.num_blocks)
    qc, kc, vc = kern.block_means(q, k, v, bs)
    out_c, _, _, idx, num = kern.coarse_select(qc, kc, vc, topk, D**-0.5, bs)
    with bench_vsa_layer.kernel_settings(size_classes=False):  # the same lists as one 64-row class
        idx_1class, num_1class = kern.coarse_select(qc, kc, vc, topk, D**-0.5, bs)[3:]
    n = layout.num_blocks
    sel = torch.zeros(*idx.shape[:3], n, dtype=torch.bool, device="cuda").scatter_(-1, idx.long(), True)
    pair_union = (sel[:, :, 0:n - 1:2] | sel[:, :, 1::2]).sum(-1).float()
    overlap = (pair_union / (2 * topk)).mean().item()
    return {"q": q, "k": k, "v": v, "g": g, "bs": bs, "out_c": out_c, "idx": idx, "num": num, "topk": topk,
            "idx_1class": idx_1class, "num_1class": num_1class,
            "overlap": overlap, "flops": 4.0 * HEADS * n * 64 * topk * 64 * D}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--variant-file", action="append", default=[], metavar="NAME=PATH",
                        help="a variant whose vsa_fwd_sm90.cu is the file PATH")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--tag", default="h200")
    args = parser.parse_args()
    if any(not re.fullmatch(r"[A-Za-z0-9_-]+=.+", item) for item in args.variant_file):
        parser.error(f"--variant-file takes NAME=PATH with NAME of letters, digits, '_' or '-'; got {args.variant_file}")
    files = dict(item.split("=", 1) for item in args.variant_file)
    unknown = [name for name in args.variants if name not in VARIANTS] + [name for name in files if name in VARIANTS]
    if unknown:
        parser.error(f"unknown or doubly given variants {unknown}; --variants takes {list(VARIANTS)}")
    cases = {f"{kind} s={s}": _lists(kind, s) for kind, s in INPUTS}
    scale = D**-0.5
    rows: dict[str, dict] = {}
    for case, st in cases.items():
        fine = (st["q"], st["k"], st["v"], st["g"], st["out_c"], st["idx"], st["num"], st["bs"], scale)
        rows.setdefault("triton", {})[case] = bench_vsa._median_ms(lambda fine=fine: kern.sparse_fwd(*fine, False))
        one = (*fine[:5], st["idx_1class"], st["num_1class"], *fine[7:])
        rows.setdefault("triton_1class", {})[case] = bench_vsa._median_ms(lambda one=one: kern.sparse_fwd(*one, False))
    for name in [*args.variants, *files]:
        os.environ[cuda_build.KERNELS_ENV] = str(_variant_dir(name, VARIANTS.get(name), files.get(name)))
        built = cuda_build.build()
        if built.module is None:
            print(f"{name}: build failed: {built.reason}", flush=True)
            continue
        ext = built.module
        for case, st in cases.items():
            fine = (st["q"], st["k"], st["v"], st["g"], st["out_c"], st["idx"], st["num"], st["bs"], scale)
            want_out, want_lse, want_os = kern.sparse_fwd(*fine, True)
            out, out_s = torch.full_like(st["q"], float("nan")), torch.full_like(st["q"], float("nan"))
            lse = torch.full(st["q"].shape[:3], float("nan"), device="cuda")
            ext.sparse_fwd(*fine, out, out_s, lse)
            err = max(bench_vsa._rel(out, want_out), bench_vsa._rel(out_s, want_os))
            lse_err = (lse - want_lse)[..., real_slots(st["bs"])].abs().max().item()  # pad slots: no contract
            ok = err <= 2e-2 and lse_err <= 2e-2
            ms = bench_vsa._median_ms(lambda ext=ext, fine=fine, out=out, lse=lse: ext.sparse_fwd(*fine, out, None, lse))
            rows.setdefault(name, {})[case] = ms if ok else None
            print(f"{name:>12} {case:14s} rel err {err:.2e} lse err {lse_err:.2e} {'ok' if ok else 'WRONG'} "
                  f"{ms:.3f} ms", flush=True)
    print(f"\nfine stage, Wan 480p {GRID} H{HEADS} D{D}, {torch.cuda.get_device_name()}: ms (TFLOP/s on computed blocks)")
    print("| variant | " + " | ".join(f"{c} (overlap {st['overlap']:.2f})" for c, st in cases.items()) + " |")
    for name, per_case in rows.items():
        cells = [("WRONG" if ms is None else f"{ms:.3f} ({cases[c]['flops'] / ms / 1e9:.0f})")
                 for c, ms in per_case.items()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cuda_fwd_sweep_{args.tag}.json").write_text(json.dumps(
        {"card": torch.cuda.get_device_name(), "grid": GRID, "heads": HEADS, "head_dim": D,
         "overlap": {c: st["overlap"] for c, st in cases.items()}, "ms": rows}, indent=1))


if __name__ == "__main__":
    main()
