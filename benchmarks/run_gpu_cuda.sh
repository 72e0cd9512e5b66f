#!/usr/bin/env bash
# One device call (an H100/H200): build the sm_90a VSA forward, compute-sanitizer (memcheck, synccheck) on one
# case, the CUDA GPU tests, the fine-stage variant sweep (`sweep_cuda_fwd.py`; SWEEP_ARGS adds variants), then the
# real-grid VSA benchmark with the compiled forward beside Triton, cuDNN and fastvideo-kernel (s = 0.875 on every
# grid; S0=1 adds s = 0 on Wan 480p). Everything goes to $OUT.
#   bash benchmarks/run_gpu_cuda.sh        (TAG=h200 by default)
set -u
source benchmarks/gpu_env.sh
vsa_script_start cuda.log
log "build"
python3 -m diffusers_dist_attn build-kernels --verbose > "$OUT/build.log" 2>&1; log "build exit $?"; tail -3 "$OUT/build.log"
for tool in memcheck synccheck; do
  timeout 120 compute-sanitizer --tool $tool python3 -m pytest -x -q -p no:cacheprovider tests/gpu/test_vsa_cuda.py \
    -k "fine_stage_matches_triton and ragged and 128 and nogate" > "$OUT/sanitizer_$tool.log" 2>&1; log "sanitizer $tool exit $?"
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -2
done
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_vsa_cuda.py tests/gpu/test_vsa_text.py \
  --junitxml="$OUT/vsa_cuda_tests.xml" > "$OUT/vsa_cuda_tests.log" 2>&1; log "tests exit $?"
grep -E "passed|failed|FAILED|Error" "$OUT/vsa_cuda_tests.log" | tail -15
if [ "${SKIP_SWEEP:-0}" != 1 ]; then
  timeout 240 python3 benchmarks/sweep_cuda_fwd.py --out "$OUT" --tag "$TAG" ${SWEEP_ARGS:-} > "$OUT/sweep.log" 2>&1
  log "sweep exit $?"; grep -E "WRONG|failed|^\|" "$OUT/sweep.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout 220 python3 benchmarks/bench_vsa_layer.py --cuda --out "$OUT" --tag "$TAG" --sparsity 0.875 \
    > "$OUT/vsa_layer.log" 2>&1; log "bench exit $?"
  if [ "${S0:-0}" = 1 ]; then
    timeout 100 python3 benchmarks/bench_vsa_layer.py --cuda --out "$OUT" --tag "${TAG}_s0" --cases wan480 \
      --sparsity 0.0 > "$OUT/vsa_layer_s0.log" 2>&1; log "bench s0 exit $?"
  fi
  grep -hE "FAILED|not usable|^\|" "$OUT"/vsa_layer*.log
fi
