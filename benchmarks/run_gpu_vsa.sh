#!/usr/bin/env bash
# One device call: GPU tests of the Triton VSA path, then the benchmark. Logs, JUnit XML, JSON and PNG go to
# $OUT (default /tmp/vsa_out). Optional: fastvideo-kernel wheel in .carry/vsa_whl/ (carried, git-ignored).
#   bash benchmarks/run_gpu_vsa.sh [extra bench_vsa.py args]
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp/vsa_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/vsa_gpu_info.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/vsa_gpu_info.txt"
if ls .carry/vsa_whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/vsa_whl/*.whl \
    && export PYTHONPATH="$PWD:/tmp/site"
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_vsa_triton.py \
    --junitxml="$OUT/vsa_gpu_tests.xml" --durations=8 > "$OUT/vsa_gpu_tests.log" 2>&1
  echo "pytest exit $?" >> "$OUT/vsa_gpu_tests.log"
  tail -n 25 "$OUT/vsa_gpu_tests.log"
fi
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_vsa.py --out "$OUT" --tag "${TAG:-h100}" "$@" > "$OUT/vsa_bench.log" 2>&1
echo "bench exit $?" >> "$OUT/vsa_bench.log"
grep -E "^  sweep|sweep best|breakdown|FAILED|not usable|^profile|^   " "$OUT/vsa_bench.log" | head -90
sed -n '/^## VSA benchmark/,$p' "$OUT/vsa_bench.log"
