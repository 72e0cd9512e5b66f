"""Cost of the per-forward cross-rank check of `parallelize` on the Wan 1.3B 480p/81f transformer forward (one GPU).

The check runs only at P > 1; on one GPU it is exercised with a groups object that says P = 2 but has no process
group, so everything local runs (checksums of every tensor argument with their host syncs, the fingerprint, the
agreement call) and only the 16-byte all-gather is missing. Forward with the check beside the forward without it
(`DIFFUSERS_DIST_ATTN_CHECK_RANKS=0`), alternating, same process; writes `check_cost_<tag>.json`.

    python benchmarks/bench_check_cost.py --out benchmarks/results --tag h200
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import _build, _time  # noqa: E402

from diffusers_dist_attn import SequenceParallelGroups  # noqa: E402
from diffusers_dist_attn.envs import CHECK_RANKS  # noqa: E402
from diffusers_dist_attn.models import parallelize  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--tag", default="gpu")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    build_args = argparse.Namespace(model="wan-1.3b", layers=0, dtype="bf16", resolution="480p", frames=81,
                                    text_len=512)
    model, inputs, _ = _build(build_args, device)
    groups = SequenceParallelGroups(sp_size=2, device=device)  # P = 2 by its sizes, no process group
    times: dict[str, list[float]] = {"check": [], "no_check": []}
    with torch.no_grad(), parallelize(model, groups=groups, attention="dense"):
        for _ in range(args.rounds):
            for name, flag in (("check", "1"), ("no_check", "0")):
                os.environ[CHECK_RANKS.name] = flag
                times[name] += _time(lambda: model(**inputs), iters=3, warmup=1, device=device)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "card": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "what": "Wan 1.3B 480p/81f transformer forward, bf16, one GPU, check local part only"},
              "median_ms": med, "times_ms": times, "cost_ms": med["check"] - med["no_check"],
              "cost_fraction": (med["check"] - med["no_check"]) / med["no_check"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"check_cost_{args.tag}.json").write_text(json.dumps(result, indent=1))
    print(f"forward with check {med['check']:.1f} ms, without {med['no_check']:.1f} ms, "
          f"cost {result['cost_ms']:.2f} ms ({100 * result['cost_fraction']:.2f}%)")


if __name__ == "__main__":
    main()
