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
