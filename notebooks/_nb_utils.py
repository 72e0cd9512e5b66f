"""Small helpers shared by the notebooks (kept out of the cells so they stay short).

- `REPO`, `RESULTS`: the repository root and `benchmarks/results/`.
- `free_port()`: a free TCP port for `notebook_launcher(use_port=...)`.
- `gpu_count()`: CUDA devices, without initialising CUDA in the notebook process (fork-safe).
- `measure(fn, device)`: run `fn()` once; return `(result, seconds, peak MiB)`. On CUDA the peak is
  `torch.cuda.max_memory_allocated` above the allocation before the call; on CPU it is the peak resident set size
  (sampled every millisecond from `/proc/self/statm`) above the RSS before the call.
- `repeat_timings(fn, repeats, device)`, `spread(seconds)`: several timed calls of `fn`; their median, min and max.
- `save_figure(fig, name)`: when the environment variable `DDA_SAVE_FIGURES` names a folder (relative paths are
  relative to the repository root, e.g. `DDA_SAVE_FIGURES=docs`), also write the figure there as `<name>.png`.
- `recorded_date(path)`, `vsa_benchmarks()`, `load_vsa_benchmark(path)`, `plot_vsa_speed(bench)`: read and plot the
  GPU VSA benchmark JSON written by `benchmarks/bench_vsa.py`, newest first by the date recorded inside each file
  (file times say nothing after a clone).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

__all__ = [
    "REPO", "RESULTS", "free_port", "gpu_count", "measure", "repeat_timings", "spread", "save_figure",
    "recorded_date", "vsa_benchmarks", "load_vsa_benchmark", "plot_vsa_speed",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_count() -> int:
    """CUDA devices, counted through NVML so that CUDA stays uninitialised (forked workers can still use it)."""
    old = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    finally:
        if old is None:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK")
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = old


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the (monotone) peak RSS
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """glibc: serve allocations >= 64 KiB with mmap and give freed memory back at once, so RSS tracks live tensors
    (by default freed memory stays in malloc's arenas and a second measurement would see no growth)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (a fixed value also stops glibc from raising it)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak is coarser but still an upper bound
        pass


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, float, float]:
    """`(fn(), wall seconds, peak MiB above the starting point)`."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return out, seconds, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _tune_malloc()
    base = peak = _rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    peak = max(peak, _rss_bytes())
    return out, seconds, (peak - base) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeat_timings(fn: Callable[[], Any], repeats: int = 5, device: torch.device | str = "cpu") -> tuple[Any, list[float]]:
    """`(last result, [seconds of each of `repeats` calls])`; no warm-up here (call `fn` once before if needed)."""
    device = torch.device(device)
    seconds, out = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return out, seconds


def spread(seconds: list[float], scale: float = 1.0) -> dict[str, float]:
    """`{"median", "min", "max", "n"}` of `seconds` times `scale` (e.g. 1e3 for ms)."""
    xs = [x * scale for x in seconds]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def save_figure(fig, name: str) -> Path | None:
    """Write `fig` to `$DDA_SAVE_FIGURES/<name>.png` when that variable is set; returns the path (else None)."""
    folder = os.environ.get("DDA_SAVE_FIGURES")
    if not folder:
        return None
    path = Path(folder)
    if not path.is_absolute():
        path = REPO / path
    path.mkdir(parents=True, exist_ok=True)
    path = path / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------------------------------------------
# The GPU VSA benchmark (benchmarks/bench_vsa.py -> benchmarks/results/vsa_bench_<tag>.json)
# ----------------------------------------------------------------------------------------------------------------
def recorded_date(path: Path | str) -> datetime | None:
    """The measurement date written inside a results JSON (`meta.date`, else a top-level `date` or `timestamp`),
    as an aware UTC datetime; None when the file has none or cannot be read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    for value in (meta.get("date"), meta.get("timestamp"), data.get("date"), data.get("timestamp")):
        if isinstance(value, str) and value:
            try:
                when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            except ValueError:
                continue
            return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return None


def vsa_benchmarks(results: Path | str = RESULTS) -> list[Path]:
    """The VSA benchmark JSON files in `results`, newest first by the date recorded inside each file (not the file
    time, which a clone or checkout sets to the same value for all); files without a date come last, by name."""
    dated, undated = [], []
    for path in sorted(Path(results).glob("vsa_*.json")):
        when = recorded_date(path)
        (undated if when is None else dated).append((when, path))
    dated.sort(key=lambda item: item[0], reverse=True)
    return [path for _, path in dated + undated]


def _shape_label(row: dict) -> str:
    """`B1 H12 S32768 D128` (bench_vsa.py's `shape`) or `wan480 21x30x52 H12, random` (bench_vsa_layer.py)."""
    shape = row.get("shape")
    if isinstance(shape, (list, tuple)) and len(shape) == 4:
        return "B{} H{} S{} D{}".format(*shape)
    if "case" in row:
        grid = "x".join(map(str, row.get("grid", [])))
        return f"{row['case']} {grid} H{row.get('heads', '?')}, {row.get('input', '')}".rstrip(", ")
    return str(shape)


def load_vsa_benchmark(path: Path | str) -> dict:
    """`{"path", "card", "date", "rows": [{"shape", "label", "fwd_ms", "fwdbwd_ms", "x_cudnn"}]}` from one JSON file.

    Layouts: `benchmarks/bench_vsa.py` (`meta.card`, `meta.date`, `rows` with `shape [B, H, S, D]`, `method`,
    `sparsity` (null for dense), `fwd_ms`, `fwdbwd_ms`, `fwd_x_cudnn`) and `benchmarks/bench_vsa_layer.py` (rows with
    `case`, `grid`, `heads`, `input`, `method`, `sparsity` also on the `cudnn_dense` row); `x_cudnn` is then the
    cuDNN row's forward time over this row's, per shape.
    """
    path = Path(path)
    data = json.loads(path.read_text())
    meta = data.get("meta", {}) if isinstance(data, dict) else {}
    rows = []
    for r in data.get("rows", []) if isinstance(data, dict) else []:
        if not isinstance(r, dict) or not isinstance(r.get("fwd_ms"), (int, float)):
            continue
        method = str(r.get("method", r.get("name", "?")))
        sparsity = None if method.startswith("cudnn") else r.get("sparsity")
        rows.append({
            "shape": _shape_label(r),
            "label": method if sparsity is None else f"{method} s={sparsity:g}",
            "fwd_ms": float(r["fwd_ms"]),
            "fwdbwd_ms": r.get("fwdbwd_ms"),
            "x_cudnn": r.get("fwd_x_cudnn"),
        })
    dense = {r["shape"]: r["fwd_ms"] for r in rows if r["label"].startswith("cudnn")}
    for r in rows:
        if r["x_cudnn"] is None and r["shape"] in dense:
            r["x_cudnn"] = dense[r["shape"]] / r["fwd_ms"]
    return {
        "path": path,
        "card": meta.get("card") or meta.get("gpu") or "unknown card",
        "date": meta.get("date") or "unknown date",
        "dtype": meta.get("dtype", ""),
        "rows": rows,
    }


def plot_vsa_speed(bench: dict):
    """One panel per shape (three per line): forward and forward+backward medians (ms) per method."""
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in bench["rows"]))
    cols = min(3, len(shapes))
    lines = -(-len(shapes) // cols)
    per_panel = max(sum(r["shape"] == shape for r in bench["rows"]) for shape in shapes)
    fig, axes = plt.subplots(lines, cols, figsize=(5.5 * cols, (0.45 * per_panel + 1.2) * lines), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(shapes):]:
        ax.set_visible(False)
    for ax, shape in zip(axes.flat, shapes, strict=False):
        rows = [r for r in bench["rows"] if r["shape"] == shape]
        ys = range(len(rows))
        fwd = ax.barh([y - 0.2 for y in ys], [r["fwd_ms"] for r in rows], 0.4, label="forward")
        both = ax.barh([y + 0.2 for y in ys], [r["fwdbwd_ms"] or 0.0 for r in rows], 0.4, label="forward + backward")
        for bars in (fwd, both):
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_yticks(list(ys), [r["label"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.margins(x=0.15)
        ax.set(xlabel="median time (ms)", title=f"{shape} {bench['dtype']}".strip())
        ax.title.set_fontsize(9)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"VSA vs dense attention on {bench['card']} ({bench['date']})")
    return fig
