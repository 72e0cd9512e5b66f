"""Which SDPA kernel runs for the Wan layout, and what it costs: B1 H12 S32760 D128 bf16, q/k/v as
`[B, S, H, D]` linear outputs viewed as `[B, H, S, D]` (what diffusers' processors and ours pass) vs contiguous
`[B, H, S, D]`. Prints a table of medians (triton.testing.do_bench) and the kernel the profiler saw."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from diffusers_dist_attn.attention.backends import dense_attention

B, S, H, D = 1, 32760, 12, 128


def kernel_name(fn) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    top = max(events, key=lambda e: e.self_device_time_total)
    return top.key[:70]


def main() -> None:
    torch.manual_seed(0)
    bshd = [torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    views = [t.transpose(1, 2) for t in bshd]  # [B, H, S, D] strided view
    contig = [t.contiguous() for t in views]
    cases = {
        "sdpa default, view": lambda: F.scaled_dot_product_attention(*views),
        "sdpa default, contiguous": lambda: F.scaled_dot_product_attention(*contig),
        "ours dense_attention (BSHD in)": lambda: dense_attention(*bshd),
    }
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        for layout, tensors in (("view", views), ("contiguous", contig)):
            def run(tensors=tensors, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(*tensors)
            cases[f"sdpa {name} only, {layout}"] = run
    rows = []
    for name, fn in cases.items():
        try:
            ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
            rows.append({"case": name, "ms": ms, "kernel": kernel_name(fn)})
        except Exception as exc:  # noqa: BLE001 - a backend that rejects the layout is a result
            rows.append({"case": name, "ms": None, "kernel": f"error: {str(exc)[:80]}"})
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, B{B} H{H} S{S} D{D} bf16")
    for r in rows:
        print(f"{r['case']:<34} {r['ms'] if r['ms'] is None else round(r['ms'], 3)!s:>8} ms  {r['kernel']}")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
