#!/usr/bin/env bash
# One device call (one H100): build the sm_90a VSA forward, locate errors (diag), GPU tests, then the VSA benchmark
# with the CUDA kernel next to Triton / cuDNN / fastvideo-kernel. If the diag fails it retries once with the V
# descriptor's LBO/SBO swapped (the suspect named in diffusers_dist_attn/kernels/README.md) and says so. Everything goes to $OUT.
#   OUT=/tmp/out bash benchmarks/run_gpu_cuda.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" DIFFUSERS_DIST_ATTN_VSA_CUDA=1 DIFFUSERS_DIST_ATTN_CACHE=/tmp/dda_cache
OUT="${OUT:-/tmp/cuda_out}"
mkdir -p "$OUT"
pack() {  # few files come back from the device: one archive + the main log
  tar -czf /tmp/cuda_run.tar.gz -C "$OUT" --exclude=cuda.log . && find "$OUT" -mindepth 1 ! -name cuda.log -delete \
    && mv /tmp/cuda_run.tar.gz "$OUT/"
}
trap pack EXIT
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/cuda.log"; }
log "build"
python3 -m diffusers_dist_attn build-kernels --verbose > "$OUT/build.log" 2>&1; log "build exit $?"; tail -3 "$OUT/build.log"
timeout 120 python3 benchmarks/diag_vsa_cuda.py 2>&1 | tee -a "$OUT/cuda.log"; diag=${PIPESTATUS[0]}
if [ "$diag" != 0 ] && [ "${NO_SWAP:-0}" != 1 ]; then
  log "diag failed ($diag): retry with the V descriptor's LBO/SBO swapped"
  sed -i 's/make_desc_sw128(v_addr + kk \* 16 \* 128, kHalfBytes, 1024)/make_desc_sw128(v_addr + kk * 16 * 128, 1024, kHalfBytes)/' diffusers_dist_attn/kernels/vsa_fwd_sm90.cu
  grep -n "desc_v =" diffusers_dist_attn/kernels/vsa_fwd_sm90.cu | tee -a "$OUT/cuda.log"
  timeout 200 python3 benchmarks/diag_vsa_cuda.py 2>&1 | tee -a "$OUT/cuda.log"; diag=${PIPESTATUS[0]}
fi
[ "$diag" != 0 ] && { log "diag still failing ($diag): stop"; exit 1; }
log "compute-sanitizer"
timeout 150 compute-sanitizer --tool memcheck python3 -m pytest -x -q -p no:cacheprovider \
  tests/gpu/test_vsa_cuda.py -k "fine_stage_without_out_s" > "$OUT/sanitizer.log" 2>&1; log "sanitizer exit $?"
tail -5 "$OUT/sanitizer.log"
log "tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_vsa_cuda.py \
  --junitxml="$OUT/vsa_cuda_tests.xml" > "$OUT/vsa_cuda_tests.log" 2>&1; log "tests exit $?"
tail -15 "$OUT/vsa_cuda_tests.log"
log "bench"
OUT="$OUT" SKIP_TESTS=1 TAG="${TAG:-h100_cuda}" bash benchmarks/run_gpu_vsa.sh "$@" 2>&1 | tail -40
cp diffusers_dist_attn/kernels/vsa_fwd_sm90.cu "$OUT/vsa_fwd_sm90.used.cu"
log "done"
