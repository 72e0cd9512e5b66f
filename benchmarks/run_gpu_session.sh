#!/usr/bin/env bash
# One device call: the GPU tests (tests/gpu/), then the VSA benchmark on real grids through the public layer.
# Logs, JUnit XML, JSON and PNG go to $OUT. Carried wheels (diffusers, ftfy) in .carry/whl/ are installed to /tmp/site.
#   bash benchmarks/run_gpu_session.sh [bench_vsa_layer.py args]
set -u
source benchmarks/gpu_env.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%FT%TZ
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/gpu_info.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu --junitxml="$OUT/gpu_tests.xml" \
    --durations=5 > "$OUT/gpu_tests.log" 2>&1
  echo "pytest exit $?" >> "$OUT/gpu_tests.log"
  grep -E "passed|failed|FAILED|ERROR|exit" "$OUT/gpu_tests.log" | tail -n 30
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_vsa_layer.py --out "$OUT" --tag "${TAG:-h200}" "$@" \
    > "$OUT/vsa_layer.log" 2>&1
  echo "bench exit $?" >> "$OUT/vsa_layer.log"
  grep -E "FAILED|not usable|exit|^\|" "$OUT/vsa_layer.log"
fi
