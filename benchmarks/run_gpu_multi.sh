#!/usr/bin/env bash
# One device call on a 4-GPU machine: Wan pipeline benchmark (1, 2, 4 GPUs; hybrid ring layouts at 4),
# HunyuanVideo benchmark (1, 2, 4 GPUs) and the `generate` main job on the real Wan 1.3B shape.
# Everything lands in $OUT/multi_<PHASE>.tar.gz (+ multi.log). Carried wheels (diffusers, ftfy) in .carry/whl/ are
# installed to /tmp/site. The scaling measurement in one command: benchmarks/run_gpu_scaling.sh.
#   PHASE="a|b|gen|prof ..."|all OUT=/tmp/out bash benchmarks/run_gpu_multi.sh
# a: Wan benchmark on 1/2/4 GPUs + generate; b: HunyuanVideo + hybrid layouts; gen: only generate on 1/2/4;
# compile: eager vs torch.compile'd blocks (4 then 1 GPU); gputests: rotary + Triton VSA GPU tests; kern: CUDA VSA variants + rotary kernel tests; a1 / a24: phase a's benchmark on 1 / on 2 and 4 GPUs;
# prof: one profiled forward per variant (kernel time per category) on 1 and 4 GPUs (issue 8's breakdown).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT="${OUT:-/tmp/multi_out}"
RES="$OUT/res"
mkdir -p "$RES/hunyuan" "$RES/generate"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/multi.log"; }
if ls .carry/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl >>"$OUT/multi.log" 2>&1 \
    && export PYTHONPATH="$PWD:/tmp/site" || log "wheel install failed"
fi
nvidia-smi --query-gpu=name,driver_version --format=csv | tee -a "$OUT/multi.log"
NGPU=$(nvidia-smi -L | wc -l)
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  log "start $name"
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
  log "end $name (exit $?)"
  tail -n 20 "$OUT/$name.log" | tee -a "$OUT/multi.log"
}
TR="torchrun --standalone"
BP="benchmarks/bench_pipeline.py --out $RES --work-dir /tmp/dda_work ${BP_ARGS:-}"
HB="benchmarks/bench_hunyuan_gpu.py --out $RES/hunyuan --work-dir /tmp/dda_work_hv --check --attention dense vsa --sparsity 0.875"
GEN="-m diffusers_dist_attn generate --preset wan2.1-t2v-1.3b --height 480 --width 832 --num-frames 81 --steps 3 --dtype bf16 --format png"
PHASE="${PHASE:-all}"
has() { [ "$PHASE" = all ] || [[ " $PHASE " == *" $1 "* ]]; }
only() { [[ " $PHASE " == *" $1 "* ]]; }  # phases that "all" does not include
if only kern; then  # one GPU: the CUDA VSA forward's compile-time variants, the fused rotary kernel's GPU tests
  step 300 cuda_sweep env DIFFUSERS_DIST_ATTN_VSA_CUDA=1 DIFFUSERS_DIST_ATTN_CACHE=/tmp/dda_cache \
    python3 benchmarks/sweep_cuda_fwd.py --out "$RES" --variants base stages3
  step 120 rotary_tests python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_rotary_triton.py
fi
if only gputests; then  # one GPU: fused rotary kernel + Triton VSA GPU tests (JUnit XML kept)
  step 300 gpu_tests python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_rotary_triton.py \
    tests/gpu/test_vsa_triton.py --junitxml="$RES/gpu_tests.xml"
fi
if only compile; then  # regional torch.compile (fullgraph) vs eager: 4 GPUs, then 1 GPU (forward)
  CP="benchmarks/bench_pipeline.py --out $RES/compile --work-dir /tmp/dda_work --compile --no-backward --no-diffusers-cp --sparsity 0.875 --iters 5 --warmup 2"
  [ "$NGPU" -ge 4 ] && step 190 comp4 $TR --nproc_per_node 4 $CP --variants ours_dense ours_vsa_0.875 ours_dense_compiled ours_vsa_0.875_compiled
  step 100 comp1 $TR --nproc_per_node 1 $CP --variants ours_dense ours_vsa_0.875 ours_dense_compiled ours_vsa_0.875_compiled
fi
if only a1; then  # Wan on 1 GPU only (forward; fwd+bwd does not fit)
  step 150 wan1 $TR --nproc_per_node 1 $BP --no-backward
fi
if only a24; then  # Wan on 2 and 4 GPUs
  [ "$NGPU" -ge 2 ] && step 150 wan2 $TR --nproc_per_node 2 $BP
  [ "$NGPU" -ge 4 ] && step 150 wan4 $TR --nproc_per_node 4 $BP
fi
if has a; then  # Wan: 1, 2, 4 GPUs
  step 130 wan1 $TR --nproc_per_node 1 $BP --no-backward  # 1 GPU: fwd+bwd of the 1.3B model at 480p does not fit
  [ "$NGPU" -ge 2 ] && step 100 wan2 $TR --nproc_per_node 2 $BP
  [ "$NGPU" -ge 4 ] && step 100 wan4 $TR --nproc_per_node 4 $BP
fi
if has prof; then  # where the time goes: 1 GPU (stock, ours dense, VSA) and 4 GPUs (ours dense, VSA, diffusers CP)
  PP="benchmarks/bench_pipeline.py --out $RES/profile --work-dir /tmp/dda_work --profile --no-backward --iters 3 --warmup 1 --sparsity 0.875"
  step 150 prof1 $TR --nproc_per_node 1 $PP --variants stock ours_dense ours_vsa_0.875
  [ "$NGPU" -ge 4 ] && step 150 prof4 $TR --nproc_per_node 4 $PP --variants ours_dense ours_vsa_0.875 diffusers_cp
fi
if has a || has gen; then  # the main job on the real 1.3B shape: generate on 1, 2, 4 GPUs
  for n in 1 2 4; do  # the main job on the real 1.3B shape: per-step time and per-GPU peak memory (JSON report)
    [ "$NGPU" -ge $n ] && step 120 "gen$n" $TR --nproc_per_node $n $GEN --output-dir "$RES/generate" --name "wan1.3b_480p_sp$n"
  done
fi
if has b; then  # HunyuanVideo 1, 2, 4 GPUs; hybrid ring layouts at 4
  for n in 1 2 4; do [ "$NGPU" -ge $n ] && step 70 "hv$n" $TR --nproc_per_node $n $HB; done
  [ "$NGPU" -ge 4 ] && step 60 wan4r2 $TR --nproc_per_node 4 $BP --ring 2 --no-backward --sparsity
  [ "$NGPU" -ge 4 ] && step 60 wan4r4 $TR --nproc_per_node 4 $BP --ring 4 --no-backward --sparsity
fi
python3 benchmarks/bench_pipeline.py --plot "$RES" >"$RES/pipeline_table.md" 2>&1
cat "$RES/pipeline_table.md" | tee -a "$OUT/multi.log"
rm -rf "$RES"/generate/*/ "$RES"/generate/*.png
tar -czf "$OUT/multi_${PHASE// /_}.tar.gz" -C "$RES" . 2>/dev/null
log "done"
