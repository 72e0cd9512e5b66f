"""The Triton kernels run by Triton's CPU interpreter (`TRITON_INTERPRET=1`) against their PyTorch formulas: the VSA
kernels (coarse stage, size-class index lists, fine forward and backward; dK/dV launched longest list first or in
block order) against the fp64 reference, the fused text
merge of VSA with text keys, and the tile permutation.

Skipped without Triton (CI installs it for this). The interpreter must be on before the kernels are decorated, so
each check runs in a fresh subprocess. The interpreter's bf16 matmuls are wrong (it has no bf16 type), so the VSA
check runs in fp16; the GPU tests cover bf16.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (CPU interpreter)")

# Triton 3.6's interpreter converts a scalar kernel argument (a 1-element array) with int(), which NumPy >= 2.3
# refuses ("only 0-dimensional arrays ..."): every `range(0, N)` over a runtime N failed. Read the element instead.
_COMPAT = """
import triton.runtime.interpreter as _interp
_patch_tensor = _interp._patch_lang_tensor
def _patched(tensor, scope):
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
_interp._patch_lang_tensor = _patched
"""

_VSA = """
import torch
from diffusers_dist_attn.vsa import triton_kernels, triton_ops
from diffusers_dist_attn.vsa.reference import real_slots, vsa_tiled_reference
from diffusers_dist_attn.vsa.tiling import tile_layout
triton_kernels.POISON_OUTPUTS = True
torch.manual_seed(0)
rel = lambda a, w: ((a.double() - w).norm() / w.norm()).item()
# (5, 6, 7): blocks of 64, 48 (64-row class), 32, 24 (32-row class), 16, 12, 8, 6 (16-row class)
for grid, b, h, d, topk in (((5, 6, 7), 2, 2, 64, 3), ((6, 5, 9), 1, 2, 128, 5), ((5, 6, 7), 1, 1, 64, 8)):
    layout = tile_layout(grid)
    sizes, real = layout.block_sizes, real_slots(layout.block_sizes)[:, None]
    q, k, v, g = (torch.randn(b, h, layout.tiled_len, d, dtype=torch.float64) * real for _ in range(4))
    dout = torch.randn(b, h, layout.tiled_len, d, dtype=torch.float64)  # nonzero at pad slots too: ignored there
    results = {}
    for split, longest_first in ((True, 1), (False, 1), ("in order", 0)):
        triton_kernels.SIZE_CLASSES = bool(split)
        triton_kernels.CONFIGS["dkdv"]["longest_first"] = longest_first
        leaves = [x.half().requires_grad_() for x in (q, k, v, g)]
        out = triton_ops.vsa_tiled_triton(*leaves, sizes, topk)
        out.backward(dout.half())
        results[split] = [out.detach()] + [x.grad for x in leaves]
    for a, c in zip(results[True], results["in order"]):  # dK/dV programs launched in block order: same bits
        assert torch.equal(a, c)
    ref_leaves = [x.half().double().requires_grad_() for x in (q, k, v, g)]
    ref = vsa_tiled_reference(*ref_leaves, sizes, topk)
    ref.backward(dout)
    for got, want in zip(results[True], [ref.detach()] + [x.grad for x in ref_leaves]):
        assert torch.isfinite(got).all()
        assert rel(got, want) < 2e-3, (grid, d, rel(got, want))
        assert (got * ~real).abs().max() == 0  # zero at pad slots
    for a, c in zip(results[True], results[False]):  # same result with one 64-row class
        assert rel(a, c.double()) < 2e-3
    # the lists: grouped by size class, ascending inside a group, the ends as the CPU mirror has them
    triton_kernels.SIZE_CLASSES = True
    qc, kc, vc = triton_kernels.block_means(q.half(), k.half(), v.half(), sizes)
    _, scores, sel, idx, num = triton_kernels.coarse_select(qc, kc, vc, topk, d ** -0.5, sizes)
    want_sel, want_idx, want_num = triton_ops.topk_select_torch(scores, topk, sizes)
    assert torch.equal(sel, want_sel) and torch.equal(idx, want_idx) and torch.equal(num, want_num)
    k2q, k2q_num = triton_kernels.build_k2q(sel, sizes)
    want, want_num = triton_ops.k2q_from_mask_torch(sel, sizes)
    assert torch.equal(k2q_num, want_num)
    valid = torch.arange(k2q.shape[-1]) < k2q_num[..., 2:]
    assert torch.equal(k2q[valid], want[valid])
print("ok")
"""

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
    sizes = torch.tensor([64, 23], dtype=torch.int32)  # a partial block: zero at its pad slots
    got = merge_text(out_s, lse2, out_t, lse_t, out_c, gate, sizes)
    want = vsa_joint._merge_torch(out_s, lse2, out_t, lse_t, out_c, gate, sizes)
    assert (got[0][:, :, 64 + 23:] == 0).all() and (got[1][:, :, 64 + 23:] == 0).all()
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


@pytest.mark.parametrize("script", [_VSA, _MERGE, _PERMUTE], ids=["vsa", "text_merge", "tile_permutation"])
def test_kernel_in_the_triton_interpreter(script):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _COMPAT + script], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
