# Sourced by the benchmarks/run_gpu_*.sh scripts on a device machine: $OUT exists, the wheels carried in
# .carry/whl/ (diffusers, ftfy, wcwidth: `pip download --no-deps -d .carry/whl diffusers==0.42.1 ftfy wcwidth`) are
# installed to /tmp/site without touching the image's torch, and PYTHONPATH sees the checkout first.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
if ls .carry/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
fi
export PYTHONPATH="$PWD:/tmp/site"
# The card, driver, date and versions into $OUT/gpu_info.txt.
gpu_info() {
  { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%FT%TZ
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/gpu_info.txt"
}
# Start of the VSA kernel scripts: the compiled sm_90a forward enabled (built into /tmp), TAG (default h200), `log`
# into $OUT/$1, the card info.
vsa_script_start() {
  export DIFFUSERS_DIST_ATTN_VSA_CUDA=1 DIFFUSERS_DIST_ATTN_CACHE=/tmp/dda_cache
  TAG="${TAG:-h200}"
  LOG_FILE="$OUT/$1"
  gpu_info
}
log() { echo "[$(date +%T)] $*" | tee -a "${LOG_FILE:-$OUT/run.log}"; }
