"""The Triton kernels that have no GPU-free twin, run by Triton's CPU interpreter (`TRITON_INTERPRET=1`) against
their PyTorch formulas: the fused text merge of VSA with text keys, and the tile permutation.

Skipped without Triton (CI installs it for this). The interpreter must be on before the kernels are decorated, so
each check runs in a fresh subprocess.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (CPU interpreter)")

_MERGE = """
import torch
from diffusers_dist_attn.attention import vsa_joint
from diffusers_dist_attn.attention.vsa_joint_triton import merge_text
torch.manual_seed(0)
for d, gated, layout in ((64, True, "bshd"), (128, False, "bhsd"), (128, True, "bshd")):
    b, h, n = 2, 3, 2
    s = 64 * n
    out_s = torch.randn(b, h, s, d).bfloat16()
    lse2 = torch.randn(b, h, s) * 3
    # the text output as the kernels return it ([B, S, H, D] memory) or contiguous [B, H, S, D]
    out_t = (torch.randn(b, s, h, d).bfloat16().transpose(1, 2) if layout == "bshd"
             else torch.randn(b, h, s, d).bfloat16())
    lse_t = (torch.randn(b, h, s + 32) * 3)[..., :s]  # a padded LSE, sliced
    lse_t[1, 2, :64] = float("-inf")  # a row block without valid text keys
    out_c = torch.randn(b, h, n, d)
    gate = torch.randn(b, h, s, d).bfloat16() if gated else None
    got = merge_text(out_s, lse2, out_t, lse_t, out_c, gate)
    want = vsa_joint._merge_torch(out_s, lse2, out_t, lse_t, out_c, gate)
    for g, w in zip(got[:2], want[:2]):
        assert torch.isfinite(g).all()
        rel = ((g.float() - w.float()).norm() / w.float().norm()).item()
        assert rel < 1e-2, rel  # bf16 outputs
    assert (got[2] - want[2]).abs().max().item() < 1e-5
print("ok")
"""

_PERMUTE = """
import torch
from diffusers_dist_attn.vsa import tiling
from diffusers_dist_attn.vsa.tiling_triton import permute_rows
for grid, d in (((5, 7, 9), 64), ((3, 5, 6), 80)):
    layout = tiling.tile_layout(grid)
    x = torch.randn(2, layout.seq_len, 4, d)[:, :, 1:]  # strided: a head slice of a wider buffer
    tiled = permute_rows(x, layout.tile_index, True)
    want = x.transpose(1, 2).index_select(2, layout.source_index)
    want[:, :, layout.pad_slots] = 0
    assert torch.equal(tiled, want)
    assert torch.equal(permute_rows(tiled, layout.untile_index, False), x)
print("ok")
"""


@pytest.mark.parametrize("script", [_MERGE, _PERMUTE], ids=["text_merge", "tile_permutation"])
def test_kernel_in_the_triton_interpreter(script):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
