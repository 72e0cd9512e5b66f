#!/usr/bin/env bash
# One device call: VSA text-path GPU tests, the real-grid VSA benchmark, and the Wan 1.3B 480p/81f transformer
# forward on one GPU (stock / ours dense / ours VSA 0.875, eager and compiled). Everything goes to $OUT.
set -u
source benchmarks/gpu_env.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_vsa_text.py tests/gpu/test_tiling_triton.py \
  > "$OUT/gpu_text_tests.log" 2>&1; tail -n 3 "$OUT/gpu_text_tests.log"
timeout 260 python3 benchmarks/bench_vsa_layer.py --out "$OUT" --tag h200 --sparsity 0.875 > "$OUT/vsa_layer.log" 2>&1
grep -E "FAILED|^\|" "$OUT/vsa_layer.log"
timeout 240 python3 benchmarks/bench_pipeline.py --model wan-1.3b --resolution 480p --frames 81 --no-backward \
  --no-diffusers-cp --compile --sparsity 0.875 --iters 3 --warmup 1 --out "$OUT" --tag _h200 > "$OUT/pipeline.log" 2>&1
echo "pipeline exit $?"; tail -n 25 "$OUT/pipeline.log"
