#!/usr/bin/env bash
# One device call for the VSA size classes: build the sm_90a forward, compute-sanitizer memcheck on the Triton VSA
# kernels (small ragged grid, forward + backward), all GPU tests (the CUDA ones included), then the Wan 480p
# fine-stage sweep (Triton with and without size classes beside the CUDA forward). Everything goes to $OUT.
#   bash benchmarks/run_gpu_classes.sh        (TAG=h200 by default)
set -u
source benchmarks/gpu_env.sh
vsa_script_start classes.log
python3 -m diffusers_dist_attn build-kernels --verbose > "$OUT/build.log" 2>&1; log "build exit $?"
timeout 150 compute-sanitizer --tool memcheck python3 -m pytest -x -q -p no:cacheprovider tests/gpu/test_vsa_triton.py \
  -k "gradients and 5x7x9 and s0.5" > "$OUT/sanitizer_triton.log" 2>&1; log "sanitizer triton exit $?"
grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_triton.log" | tail -2
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu --junitxml="$OUT/gpu_tests.xml" \
  --durations=5 > "$OUT/gpu_tests.log" 2>&1; log "tests exit $?"
grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -n 30
timeout 200 python3 benchmarks/sweep_cuda_fwd.py --variants base --out "$OUT" --tag "$TAG" > "$OUT/sweep.log" 2>&1
log "sweep exit $?"; grep -E "WRONG|failed|^\|" "$OUT/sweep.log"
