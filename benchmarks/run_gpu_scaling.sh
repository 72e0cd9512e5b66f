#!/usr/bin/env bash
# Multi-GPU scaling (issue "Multi-GPU scaling on H200s: re-measure and close the gap to linear") in ONE device call
# on a machine with 4 GPUs, within a total time budget (BUDGET seconds, default 560: fits a 600 s call).
#
#   bash benchmarks/run_gpu_scaling.sh                               # 4-GPU machine; results in $OUT
#   PHASES="hybrid wan14" bash benchmarks/run_gpu_scaling.sh         # a second call: what the first had no time for
#   DRY_RUN=1 OUT=/tmp/scaling_dry bash benchmarks/run_gpu_scaling.sh   # CPU: tiny configs, 1 and 2 gloo processes
#
# Phases, in priority order (each step has a time limit, cut to what is left of BUDGET; a step that has less than
# MIN_STEP seconds left is skipped and listed as such; every benchmark rewrites its JSON after each variant, so a
# step stopped by its limit keeps what it measured):
#   wan      Wan 1.3B 480p (30 layers) at 1/2/4 GPUs: stock (1 GPU), diffusers CP (ulysses, P > 1), ours dense,
#            ours VSA 0.875; forward and forward+backward; peak memory per GPU; diff vs the 1-GPU stock output
#   hv       HunyuanVideo real shape, 2 dual + 4 single blocks, 720p / 129 frames, 256 text tokens (64 valid):
#            stock + dense + VSA 0.875 (with text) at SP 1, dense + VSA 0.875 at SP 4; forward
#   compile  the same Wan variants torch.compile'd (regional, fullgraph): ours dense / VSA at 4, 1, 2 GPUs
#   hybrid   Wan 1.3B dense as ulysses x ring at 4 GPUs (u2 x r2, u1 x r4), fwd+bwd
#   wan14    Wan 14B 720p, 2 of 40 layers, at 1/2/4 GPUs (stock, diffusers CP, ours dense, VSA 0.875)
#
# $OUT gets at most 5 files: scaling.tar.gz (every JSON, log, PNG and table), summary.md (the short tables, also
# printed last), scaling.log (step log), pipeline_wan-1.3b_480p_30l.png and hunyuan_forward.png (plots with the card,
# GPU counts and date in their titles).
# Carried wheels (diffusers, ftfy) in .carry/whl/ are installed to /tmp/site (no network on the device machine).
set -u
T0=$(date +%s)
DRY_RUN="${DRY_RUN:-0}"
BUDGET="${BUDGET:-560}"      # seconds for everything, packaging included
RESERVE="${RESERVE:-25}"     # kept back for the tables and the tarball
MIN_STEP="${MIN_STEP:-30}"   # a step with less time left than this is skipped
PHASES="${PHASES:-wan hv compile hybrid wan14}"
OUT="${OUT:-/tmp/scaling_out}"
RES="${RES:-/tmp/dda_scaling_res}"
WORK="${WORK:-/tmp/dda_scaling_work}"
SP="${SPARSITY:-0.875}"
COMPILE_ARGS="${COMPILE_ARGS:-}"  # e.g. --no-backward: compiled forward only (compiling the backward takes longest)
VSA="ours_vsa_$SP"
rm -rf "$RES"  # $WORK (1-GPU reference outputs) is kept: a second call on a still-warm machine reuses them
mkdir -p "$OUT" "$RES/logs" "$RES/hunyuan" "$WORK"
LOG="$OUT/scaling.log"
: >"$LOG"
log() { echo "[$(date +%T) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export DIFFUSERS_DIST_ATTN_TIMEOUT="${DIFFUSERS_DIST_ATTN_TIMEOUT:-180}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/dda_inductor}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY_RUN" = 1 ]; then  # CPU: tiny configs (--dry-run), fp32, gloo, 1 timed step; "GPUs" are processes
  PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
  NGPU="${NPROC:-2}"
  SIZES="1 2"
  BP_MODE="--dry-run"
  HV_MODE="--dry-run"
  HV_SP="2"
  { echo "DRY RUN on CPU ($(nproc) cores), $(date -u +%FT%TZ)"; $PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } | tee "$RES/gpu_info.txt" | tee -a "$LOG"
else
  PY="${PY:-python3}"
  if ls .carry/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl >>"$LOG" 2>&1 \
      && export PYTHONPATH="$PWD:/tmp/site" || log "wheel install failed"
  fi
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
  SIZES=$(for n in 1 2 4; do [ "$NGPU" -ge "$n" ] && echo -n "$n "; done)
  BP_MODE="--iters ${ITERS:-3} --warmup ${WARMUP:-1}"
  HV_MODE="--iters ${HV_ITERS:-3} --warmup 1"
  HV_SP=$([ "$NGPU" -ge 4 ] && echo 4 || echo "$NGPU")
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; date -u +%FT%TZ
    $PY -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1; } | tee "$RES/gpu_info.txt" | tee -a "$LOG"
fi
log "phases: $PHASES; sizes: $SIZES; budget ${BUDGET}s"
TR="$PY -m torch.distributed.run --standalone"
BP="benchmarks/bench_pipeline.py --out $RES --work-dir $WORK $BP_MODE --sparsity $SP"
HB="benchmarks/bench_hunyuan_gpu.py --out $RES/hunyuan --work-dir $WORK/hv $HV_MODE --sparsity $SP --check"
STATUS=() SKIPPED=() SKIPPED_PHASES=()

step() {  # step LIMIT_S NAME COMMAND...: runs with min(LIMIT_S, time left - RESERVE), else skips
  local limit=$1 name=$2; shift 2
  local left=$(( BUDGET - RESERVE - ($(date +%s) - T0) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt "$MIN_STEP" ]; then
    log "skip $name (${left}s left)"; STATUS+=("$name: skipped (no time)"); SKIPPED+=("$name")
    SKIPPED_PHASES+=("$PHASE"); return
  fi
  log "start $name (limit ${limit}s): $*"
  local t=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$RES/logs/$name.log" 2>&1
  local rc=$? took=$(( $(date +%s) - t ))
  local fails; fails=$(grep -c "FAILED" "$RES/logs/$name.log"); [ "$fails" = 0 ] && fails=""
  case $rc in 0) s="ok";; 124|137) s="TIMEOUT";; *) s="exit $rc";; esac
  log "end $name: $s in ${took}s${fails:+, $fails FAILED lines}"
  STATUS+=("$name: $s, ${took}s${fails:+, $fails FAILED lines}")
  [ "$s" = TIMEOUT ] && SKIPPED+=("$name(timeout)") && SKIPPED_PHASES+=("$PHASE")
  grep -E "GPU .*(fwd|FAILED)|^hunyuan_|FAILED|Error" "$RES/logs/$name.log" | grep -v "^W" | cut -c1-220 | tail -n 12 | tee -a "$LOG"
}
has() { [[ " $PHASES " == *" $1 "* ]]; }
has_size() { [[ " $SIZES " == *" $1 "* ]]; }

if has wan; then PHASE=wan  # eager: every variant, fwd + fwd+bwd; the 1-GPU run saves the stock reference output
  has_size 1 && step 110 wan1 $TR --nproc_per_node 1 $BP --variants stock ours_dense "$VSA"
  for n in 2 4; do
    has_size $n && step 90 "wan$n" $TR --nproc_per_node $n $BP --variants ours_dense "$VSA" diffusers_cp
  done
fi
if has hv; then PHASE=hv  # HunyuanVideo real-shape subset, VSA + text (forward); SP 1 saves stock and P = 1 outputs
  has_size 1 && step 110 hv1 $TR --nproc_per_node 1 $HB --attention stock dense vsa
  [ "$HV_SP" -gt 1 ] && step 80 "hv$HV_SP" $TR --nproc_per_node "$HV_SP" $HB --attention dense vsa
fi
if has compile; then PHASE=compile  # regional torch.compile (fullgraph) of the blocks: largest GPU count first
  for n in $(echo "$SIZES" | tr ' ' '\n' | sort -rn); do
    step 150 "wan${n}_compiled" $TR --nproc_per_node "$n" $BP --compile --tag _compiled $COMPILE_ARGS \
      --variants ours_dense_compiled "${VSA}_compiled"
  done
fi
if has hybrid; then PHASE=hybrid  # ulysses x ring at the largest GPU count (dense only; VSA is pure Ulysses)
  big=$(echo "$SIZES" | tr ' ' '\n' | sort -n | tail -n 1)
  for r in 2 4; do
    [ "$r" -le "$big" ] && step 70 "wan${big}_ring$r" $TR --nproc_per_node "$big" $BP --ring "$r"
  done
fi
if has wan14; then PHASE=wan14  # Wan 14B 720p, a 2-layer subset (block costs are uniform; full model ~ x20)
  W14="--model wan-14b --resolution 720p --layers 2"
  [ "$DRY_RUN" = 1 ] && W14="--layers 1"  # the dry run's tiny config (1 layer: its own table) stands in
  has_size 1 && step 80 wan14_1 $TR --nproc_per_node 1 $BP $W14 --tag _w14 --variants stock ours_dense "$VSA"
  for n in 2 4; do
    has_size $n && step 70 "wan14_$n" $TR --nproc_per_node "$n" $BP $W14 --tag _w14 --variants ours_dense "$VSA" diffusers_cp
  done
fi

# tables (full + short), PNGs, tarball; the short tables are printed last
$PY benchmarks/bench_pipeline.py --plot "$RES" >"$RES/pipeline_table.md" 2>&1
{ echo "# Scaling run $(date -u +%FT%TZ) (DRY_RUN=$DRY_RUN)"; echo; echo '```'; cat "$RES/gpu_info.txt"; echo '```'
  echo; echo "## Steps"; for s in "${STATUS[@]}"; do echo "- $s"; done
  if [ ${#SKIPPED[@]} -gt 0 ]; then
    echo "- not run or not finished for lack of time: ${SKIPPED[*]}; next call: PHASES=\"$(printf '%s\n' "${SKIPPED_PHASES[@]}" | awk '!seen[$0]++' | tr '\n' ' ' | sed 's/ $//')\" bash benchmarks/run_gpu_scaling.sh"
  fi
  echo; echo "## Wan (bench_pipeline.py)"; $PY benchmarks/bench_pipeline.py --summary "$RES" 2>&1
  echo; echo "## HunyuanVideo (bench_hunyuan_gpu.py, forward)"; $PY benchmarks/bench_hunyuan_gpu.py --table "$RES/hunyuan" 2>&1
} >"$OUT/summary.md"
cp "$OUT/summary.md" "$RES/summary.md"
cp "$RES"/pipeline_wan-1.3b_480p_30l.png "$RES"/hunyuan/hunyuan_forward.png "$OUT/" 2>/dev/null
tar -czf "$OUT/scaling.tar.gz" -C "$RES" . 2>>"$LOG"
log "done: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/summary.md"
