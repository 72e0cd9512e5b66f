"""Locate a failure of the VSA text path at the HunyuanVideo shard shape (CUDA_LAUNCH_BLOCKING=1 recommended)."""

import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusers_dist_attn import DistributedAttention_VSA  # noqa: E402
from diffusers_dist_attn.attention.backends import attention_forward_with_lse  # noqa: E402

grid, h, d, L, valid = (33, 45, 80), 6, 128, 256, 200
s = grid[0] * grid[1] * grid[2]
mask = torch.zeros(1, L, dtype=torch.bool, device="cuda")
mask[:, :valid] = True


def step(name, fn):
    try:
        fn()
        torch.cuda.synchronize()
        print(f"{name}: ok", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: FAILED {type(exc).__name__}: {exc}".splitlines()[0], flush=True)
        traceback.print_exc(limit=6)
        sys.exit(1)


for n in (4096, 65536, 150000):
    q = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16)
    tk, tv = (torch.randn(1, L, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    step(f"efficient lse S_q={n}", lambda q=q, tk=tk, tv=tv: attention_forward_with_lse(q, tk, tv, d**-0.5, mask))
x = [torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
t = [torch.randn(1, L, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
layer = DistributedAttention_VSA(h, d)
step("layer no text", lambda: layer(*x[:3], gate_compress=x[3], grid_size=grid, sparsity=0.875))
step("layer text no mask", lambda: layer(*x[:3], *t, x[3], grid_size=grid, sparsity=0.875))
step("layer text mask", lambda: layer(*x[:3], *t, x[3], grid_size=grid, sparsity=0.875, replicated_mask=mask))
leaves = [z.requires_grad_() for z in x + t]
step("layer text mask fwd+bwd", lambda: torch.cat(layer(*leaves[:3], *leaves[4:], leaves[3], grid_size=grid,
                                                        sparsity=0.875, replicated_mask=mask), 1).sum().backward())
