"""Compare compile-time variants of the sm_90a VSA forward on the fine stage alone (GPU).

Each variant is a copy of `diffusers_dist_attn/kernels/` with one `sed` edit, built under its own cache key (the source hash), checked
against the Triton fine stage (`diag_vsa_cuda.case`), then timed next to Triton's fine stage on the same lists
(B1 H12 S32768 D128, sparsity 0.875). Prints a table and writes `cuda_fwd_sweep_<tag>.json`.

    DIFFUSERS_DIST_ATTN_VSA_CUDA=1 python benchmarks/sweep_cuda_fwd.py --out /tmp/out
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
import diag_vsa_cuda  # noqa: E402

from diffusers_dist_attn.vsa import cuda_build  # noqa: E402
from diffusers_dist_attn.vsa import triton_kernels as kern  # noqa: E402

KERNELS = cuda_build.packaged_kernels_dir()
# name -> (pattern, replacement) applied to vsa_fwd_sm90.cu; "base" is the source as committed
VARIANTS = {
    "base": None,
    "stages3": (r"constexpr int kStages = 2;", "constexpr int kStages = 3;"),
    "l2_promo_128": (r"CU_TENSOR_MAP_L2_PROMOTION_L2_256B", "CU_TENSOR_MAP_L2_PROMOTION_L2_128B"),
}


def _variant_dir(name: str, edit) -> Path:
    if edit is None:
        return KERNELS
    folder = Path(f"/tmp/dda_kernels_{name}")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(KERNELS, folder)
    src = folder / "vsa_fwd_sm90.cu"
    text, count = re.subn(edit[0], edit[1], src.read_text())
    if count == 0:
        raise ValueError(f"variant {name}: pattern {edit[0]!r} not found")
    src.write_text(text)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--tag", default="h100")
    args = parser.parse_args()
    shape, sparsity = (1, 12, 32768, 128), 0.875
    st = bench_vsa._stage_state(shape, sparsity)
    q, k, v, g, bs, scale = (st[x] for x in ("q", "k", "v", "g", "bs", "scale"))
    fine = 4.0 * shape[0] * shape[1] * shape[2] * 64 * st["topk"] * shape[3]
    rows = {"triton": bench_vsa._median_ms(
        lambda: kern.sparse_fwd(q, k, v, g, st["out_c"], st["idx"], st["num"], bs, scale, False))}
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    for name in args.variants:
        os.environ[cuda_build.KERNELS_ENV] = str(_variant_dir(name, VARIANTS[name]))
        built = cuda_build.build()
        if built.module is None:
            print(f"{name}: build failed: {built.reason}")
            continue
        ext = built.module
        ok = all(diag_vsa_cuda.case(ext, d, n, mk, bh, last)
                 for d in (64, 128) for n, mk, bh, last in ((12, 5, 3, 40), (7, 7, 2, 8)))
        ms = bench_vsa._median_ms(
            lambda ext=ext: ext.sparse_fwd(q, k, v, g, st["out_c"], st["idx"], st["num"], bs, scale, out, None, lse))
        rows[name] = ms if ok else None
        print(f"{name}: correct={ok} fine fwd {ms:.3f} ms")
    table = {name: {"ms": ms, "tflops": None if ms is None else fine / ms / 1e9} for name, ms in rows.items()}
    print(f"\nfine stage, B1 H12 S32768 D128, sparsity {sparsity}, {torch.cuda.get_device_name()}")
    for name, r in table.items():
        print(f"  {name:>14}: {r['ms'] if r['ms'] is None else round(r['ms'], 3)} ms, "
              f"{r['tflops'] and round(r['tflops'])} TFLOP/s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cuda_fwd_sweep_{args.tag}.json").write_text(json.dumps(
        {"card": torch.cuda.get_device_name(), "shape": shape, "sparsity": sparsity, "rows": table}, indent=1))


if __name__ == "__main__":
    main()
