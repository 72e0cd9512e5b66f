#!/usr/bin/env bash
# Device calls for the VSA layer, by PHASES (default "build tests s0"): build = the sm_90a forward and compute-sanitizer
# memcheck on the Triton VSA kernels (ragged grid, forward + backward: dK/dV launched longest list first); tests = all
# GPU tests; s0 = the Wan 480p grid at sparsity 0 (the automatic dense route beside the kernels and cuDNN); bench =
# every real grid at s = 0.875 with every implementation (fastvideo-kernel too when its wheel is carried in
# .carry/whl and runs here); pipeline = Wan 1.3B 480p/81f forward at VSA sparsity 0 and 0.875 beside dense.
#   bash benchmarks/run_gpu_layer.sh ; PHASES="tests bench" bash benchmarks/run_gpu_layer.sh
set -u
source benchmarks/gpu_env.sh
vsa_script_start layer.log
# fastvideo-kernel's wheel bundles its own CUDA driver library and targets another torch: try it in a separate
# process first and drop it when it does not run, so it cannot take the benchmark process down with it.
if [ -d /tmp/site/fastvideo_kernel ]; then
  timeout 120 python3 -c "
import importlib, torch, fastvideo_kernel as fv
b = importlib.import_module('fastvideo_kernel.block_sparse_attn')
print('sm90 ops:', [op is not None for op in b._get_sm90_ops()])
q = torch.randn(1, 2, 512, 128, device='cuda', dtype=torch.bfloat16)
sizes = torch.full((8,), 64, device='cuda', dtype=torch.int32)
print('ok', fv.video_sparse_attn(q, q, q, sizes, sizes, 2, (4, 4, 4)).shape)" > "$OUT/fastvideo_probe.log" 2>&1 \
    || { log "fastvideo-kernel does not run here (see fastvideo_probe.log): dropped"; rm -rf /tmp/site/fastvideo_kernel*; }
fi
phase() { [[ " ${PHASES:-build tests s0} " == *" $1 "* ]]; }
if phase build; then
  python3 -m diffusers_dist_attn build-kernels --verbose > "$OUT/build.log" 2>&1; log "build exit $?"
  timeout 150 compute-sanitizer --tool memcheck python3 -m pytest -x -q -p no:cacheprovider tests/gpu/test_vsa_triton.py \
    -k "gradients and 5x7x9 and s0.5" > "$OUT/sanitizer_triton.log" 2>&1; log "sanitizer triton exit $?"
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_triton.log" | tail -2
fi
if phase tests; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu --junitxml="$OUT/gpu_tests_$TAG.xml" \
    --durations=5 > "$OUT/gpu_tests.log" 2>&1; log "tests exit $?"
  grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -n 30
fi
if phase s0; then
  timeout 200 python3 benchmarks/bench_vsa_layer.py --cases wan480 --sparsity 0 --out "$OUT" --tag "${TAG}_s0" \
    > "$OUT/bench_s0.log" 2>&1; log "bench s0 exit $?"; grep -E "FAILED|^\|" "$OUT/bench_s0.log"
fi
if phase pipeline; then  # Wan 1.3B 480p/81f forward: VSA at sparsity 0 (the dense route) beside dense and 0.875
  timeout 400 torchrun --standalone --nproc_per_node 1 benchmarks/bench_pipeline.py --sparsity 0 0.875 --compile \
    --no-backward --no-diffusers-cp --variants ${PIPELINE_VARIANTS:-stock ours_dense ours_vsa_0 ours_vsa_0.875 ours_vsa_0.875_compiled} \
    --tag "_${TAG}_vsa" --out "$OUT" > "$OUT/pipeline.log" 2>&1; log "pipeline exit $?"; grep -E "GPU " "$OUT/pipeline.log"
fi
if phase bench; then
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_vsa_layer.py --cuda --dkdv-in-order --sparsity 0.875 --out "$OUT" \
    --tag "$TAG" > "$OUT/bench.log" 2>&1; log "bench exit $?"; grep -E "FAILED|fastvideo|^\|" "$OUT/bench.log"
fi
