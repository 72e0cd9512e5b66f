#!/usr/bin/env bash
# One device call: a Wan 2.1 1.3B-shaped training step (random weights saved as a local model folder) at 480p/81f
# (latent 21 x 60 x 104), LoRA (+ gates for VSA), gradient checkpointing, bf16, one GPU: dense vs VSA 0.875 vs VSA
# 0.875 with compiled blocks. Per-run logs and `train_step_<tag>.json` (median step time of the steps after the
# first, peak memory) go to $OUT.
set -u
source benchmarks/gpu_env.sh
MODEL=/tmp/wan13b
STEPS="${STEPS:-5}"
export TAG="${TAG:-h200}"
python3 - <<'PY'
import sys
sys.path.insert(0, "benchmarks")
import torch
from bench_pipeline import COMMON, WAN_CONFIGS
from diffusers import WanTransformer3DModel
torch.manual_seed(0)
WanTransformer3DModel(**{**COMMON, **WAN_CONFIGS["wan-1.3b"]}).save_pretrained("/tmp/wan13b/transformer")
open("/tmp/wan13b/model_index.json", "w").write('{"_class_name": "WanPipeline"}')  # transformer only
PY
for run in dense vsa vsa_compiled; do
  case $run in
    dense) args=(--attention dense --train lora) ;;  # gates exist only for VSA
    vsa) args=(--attention vsa --train lora,gates) ;;
    vsa_compiled) args=(--attention vsa --train lora,gates --compile) ;;
  esac
  timeout 240 python3 -m diffusers_dist_attn train --model "$MODEL" --synthetic 2 --synthetic-grid 21,60,104 \
    "${args[@]}" --sparsity 0.875 --gradient-checkpointing --mixed-precision bf16 --max-steps "$STEPS" \
    --no-plot --no-progress --output-dir "$OUT/train_$run" > "$OUT/train_$run.log" 2>&1
  echo "$run exit $?"; tail -n 3 "$OUT/train_$run.log"
done
python3 - <<'PY'
import json, os, statistics, subprocess
import torch
out = os.environ.get("OUT", "/tmp/gpu_out")
rows = {}
for run in ("dense", "vsa", "vsa_compiled"):
    try:
        steps = json.load(open(f"{out}/train_{run}/train_log.json"))["steps"]
    except Exception as exc:
        print(run, "no log:", exc)
        continue
    times = [s["step_time_s"] for s in steps]
    rows[run] = {"step_times_s": times, "median_step_s": statistics.median(times[1:] or times),
                 "peak_memory_gib": max(r["peak_memory_mb"] for s in steps for r in s["per_rank"]) / 1024,
                 "tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps[1:] or steps)}
if "dense" in rows:
    for row in rows.values():
        row["ratio_to_dense"] = row["median_step_s"] / rows["dense"]["median_step_s"]
result = {"benchmark": "run_gpu_train.sh: Wan 2.1 1.3B shape, 480p/81f (latent 21x60x104, 32,760 tokens), batch 1, "
                       "LoRA r16 (+ gates for VSA), gradient checkpointing, bf16 autocast, VSA sparsity 0.875",
          "card": torch.cuda.get_device_name(), "date": subprocess.run(["date", "-u", "+%F"], capture_output=True,
                                                                       text=True).stdout.strip(),
          "torch": torch.__version__, "median_of": "steps 2.. (step 1 includes warm-up / compilation)",
          "target": "VSA step <= 0.5x dense", "runs": rows}
json.dump(result, open(f"{out}/train_step_{os.environ['TAG']}.json", "w"), indent=1)
print("| run | median step s | x dense | peak GiB |")
for name, row in rows.items():
    print(f"| {name} | {row['median_step_s']:.3f} | {row.get('ratio_to_dense', float('nan')):.3f} | "
          f"{row['peak_memory_gib']:.2f} |")
PY
