#!/usr/bin/env bash
# One device call: a Wan 2.1 1.3B-shaped training step (random weights saved as a local model folder) at 480p/81f
# (latent 21 x 60 x 104), LoRA (+ gates for VSA), gradient checkpointing, bf16: dense vs VSA 0.875, one GPU. Logs to $OUT.
set -u
source benchmarks/gpu_env.sh
MODEL=/tmp/wan13b
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
for attention in dense vsa; do
  parts=lora; [ "$attention" = vsa ] && parts=lora,gates  # gates exist only for VSA
  timeout 100 python3 -m diffusers_dist_attn train --model "$MODEL" --synthetic 2 --synthetic-grid 21,60,104 \
    --train "$parts" --attention "$attention" --sparsity 0.875 --gradient-checkpointing --mixed-precision bf16 \
    --max-steps 3 --no-plot --no-progress --output-dir "$OUT/train_$attention" > "$OUT/train_$attention.log" 2>&1
  echo "$attention exit $?"; tail -n 3 "$OUT/train_$attention.log"
done
python3 - <<'PY'
import json, os, statistics
out = os.environ.get("OUT", "/tmp/gpu_out")
for attention in ("dense", "vsa"):
    try:
        log = json.load(open(f"{out}/train_{attention}/train_log.json"))
    except Exception as exc:
        print(attention, "no log:", exc); continue
    steps = log.get("steps", log) if isinstance(log, dict) else log
    times = [s.get("step_time_s") for s in steps if isinstance(s, dict) and s.get("step_time_s") is not None]
    mem = [s["per_rank"][0]["peak_memory_mb"] for s in steps if isinstance(s, dict) and s.get("per_rank")]
    print(attention, "step times", times, "median of last 3", statistics.median(times[-3:]) if times else None,
          "peak", mem[-1] if mem else None)
PY
