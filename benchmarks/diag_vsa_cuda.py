"""Where does the sm_90a VSA forward differ from the Triton fine stage? (GPU; prints one line per case.)

Runs `ext.sparse_fwd` and `triton_kernels.sparse_fwd` on identical inputs and index lists and reports the LSE error
(wrong => the S = Q K^T / softmax half) and the out_s error per 64-column half (wrong => the P V half), so a failing
kernel says which descriptor to look at. Exit status 1 when any case is off.

    DIFFUSERS_DIST_ATTN_VSA_CUDA=1 python benchmarks/diag_vsa_cuda.py
"""

from __future__ import annotations

import sys

import torch

from diffusers_dist_attn.vsa import cuda_build
from diffusers_dist_attn.vsa import triton_kernels as kern


def case(ext, d: int, n: int, maxk: int, bh: int = 2, valid_last: int = 64) -> bool:
    gen = torch.Generator(device="cuda").manual_seed(d + n)
    q, k, v, g = (torch.randn(1, bh, 64 * n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    bs = torch.full((n,), 64, device="cuda", dtype=torch.int32)
    bs[-1] = valid_last
    idx = torch.rand(1, bh, n, n, device="cuda", generator=gen).topk(maxk, -1).indices.sort(-1).values.int().contiguous()
    num = torch.full((1, bh, n), maxk, device="cuda", dtype=torch.int32)
    out_c = torch.randn(1, bh, n, d, device="cuda", generator=gen)
    scale = d**-0.5
    want_out, want_lse, want_os = kern.sparse_fwd(q, k, v, g, out_c, idx, num, bs, scale, True)
    out = torch.full_like(q, float("nan"))
    out_s = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    ext.sparse_fwd(q, k, v, g, out_c, idx, num, bs, scale, out, out_s, lse)
    torch.cuda.synchronize()
    lse_err = (lse - want_lse).abs().max().item()
    halves = [(out_s[..., h * 64:(h + 1) * 64].float() - want_os[..., h * 64:(h + 1) * 64].float()).abs().max().item()
              for h in range(d // 64)]
    out_err = (out.float() - want_out.float()).abs().max().item()
    ok = lse_err <= 2e-2 and max(halves) <= 3e-2 and out_err <= 6e-2
    print(f"d={d} n={n} maxk={maxk} bh={bh} last={valid_last}: lse err {lse_err:.3g}, out_s err per 64-col half "
          f"{[f'{x:.3g}' for x in halves]}, out err {out_err:.3g} -> {'ok' if ok else 'WRONG'}")
    return ok


def main() -> int:
    result = cuda_build.build(verbose=False)
    if result.module is None:
        print("build failed:", result.reason)
        return 2
    ok = True
    for d in (64, 128):
        for n, maxk, bh, last in ((1, 1, 1, 64), (4, 2, 1, 64), (12, 5, 3, 40), (7, 7, 2, 8)):
            ok &= case(result.module, d, n, maxk, bh, last)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
