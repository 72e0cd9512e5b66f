"""Build-on-first-use of the compiled Hopper VSA kernel (`diffusers_dist_attn/kernels/`, opt-in; see its README).

`build()` compiles the sources with `torch.utils.cpp_extension.load` (ninja) for sm_90a into a folder named by a
hash of the sources, the arch, and the torch / CUDA / nvcc / Python versions, under `~/.cache/diffusers_dist_attn/`
(override: env `DIFFUSERS_DIST_ATTN_CACHE`). A changed source or an upgraded torch gives a new folder, so a stale
binary (e.g. an undefined-symbol failure after a torch upgrade) is never loaded; an unchanged one is reused
without recompiling. `load_extension()` is the cached, quiet entry point: the module, or None after one warning
that says why (no CUDA build of torch, no nvcc, no sm_90 GPU, build failure). Nothing here raises.

`build_plan()` says what a build would read and where it would go, and why it could not run here, without
compiling (`diffusers-dist-attn build-kernels --dry-run`); `build()` runs the same checks first.

The sources ship inside the package (wheel package data), found through `importlib.resources`, so checkouts,
editable installs and wheels read the same files; env `DIFFUSERS_DIST_ATTN_KERNELS_DIR` points elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from ..envs import CACHE_DIR, KERNELS_DIR, get

__all__ = [
    "ARCH",
    "CACHE_ENV",
    "KERNELS_ENV",
    "SOURCES",
    "BuildPlan",
    "BuildResult",
    "build",
    "build_plan",
    "cache_root",
    "kernels_dir",
    "load_extension",
    "packaged_kernels_dir",
]

CACHE_ENV = CACHE_DIR.name
KERNELS_ENV = KERNELS_DIR.name
ARCH = "9.0a"  # TORCH_CUDA_ARCH_LIST spelling of -gencode=arch=compute_90a,code=sm_90a (wgmma, setmaxnreg)
SOURCES = ("vsa_binding.cpp", "vsa_fwd_sm90.cu")
HEADERS = ("sm90_ptx.cuh", "vsa_fwd_sm90.h")
NVCC_FLAGS = ("-O3", "-lineinfo")  # the C++ standard is torch's choice (C++17 up to 2.12, C++20 from 2.13)
CXX_FLAGS = ("-O3",)


@dataclass
class BuildResult:
    """`module` when built and imported; otherwise `reason` says why not. `path`: the build folder."""

    module: ModuleType | None
    reason: str | None = None
    path: Path | None = None


@dataclass
class BuildPlan:
    """What a build reads and where it goes; `reason` is None when a build could run here, else why not."""

    sources: list[Path]
    cache_dir: Path
    arch: str
    nvcc: str | None
    reason: str | None = None


def packaged_kernels_dir() -> Path:
    """The CUDA sources shipped with the package (`diffusers_dist_attn/kernels/`)."""
    # nvcc needs real files: wheels and editable installs unpack to the file system, so this is a plain path.
    return Path(str(importlib.resources.files("diffusers_dist_attn") / "kernels"))


def kernels_dir() -> Path:
    """Folder holding the CUDA sources (env `DIFFUSERS_DIST_ATTN_KERNELS_DIR`, else the packaged ones)."""
    override = get(KERNELS_DIR)
    return Path(override).expanduser() if override else packaged_kernels_dir()


def cache_root() -> Path:
    """Root of the build cache (env `DIFFUSERS_DIST_ATTN_CACHE`, else `~/.cache/diffusers_dist_attn`)."""
    override = get(CACHE_DIR)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "diffusers_dist_attn"


def _nvcc() -> str | None:
    """Path of nvcc: `$CUDA_HOME/bin`, torch's CUDA_HOME, then PATH."""
    from torch.utils import cpp_extension

    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@functools.cache
def _nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = [line for line in out.splitlines() if "release" in line]
    return lines[-1].strip() if lines else "unknown"


def cache_key(nvcc: str | None) -> str:
    """Hash of the sources and headers, the arch, and the torch / CUDA / nvcc / Python versions (16 hex digits)."""
    digest = hashlib.sha256()
    root = kernels_dir()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    for part in (ARCH, torch.__version__, str(torch.version.cuda), _nvcc_version(nvcc) if nvcc else "no-nvcc",
                 platform.python_version(), " ".join((*NVCC_FLAGS, *CXX_FLAGS))):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _gpu_reason() -> str | None:
    """None when the current CUDA device is an sm_90 (Hopper) GPU, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"the GPU is sm_{major}{minor} ({torch.cuda.get_device_name()}); the kernel needs sm_90 (H100/H200)"
    return None


@contextlib.contextmanager
def _env(**values: str):
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build(*, require_gpu: bool = True, force: bool = False, verbose: bool = False) -> BuildResult:
    """Compile (or reuse) and import the extension. Never raises; a failure comes back as `reason`.

    `require_gpu=False` builds without an sm_90 GPU present (a CUDA build of torch and nvcc are still needed: the
    library links against torch's CUDA libraries). `force` deletes the cached build folder first.
    """
    try:
        return _build(require_gpu=require_gpu, force=force, verbose=verbose)
    except Exception as exc:  # noqa: BLE001 - any build/import problem means "not available", with the reason
        return BuildResult(None, f"build failed: {type(exc).__name__}: {str(exc).strip()[-2000:]}")


def build_plan(*, require_gpu: bool = True) -> BuildPlan:
    """The files a build reads, its folder, and why it could not run here (None: it could). Compiles nothing.

    The checks run cheapest first and the first failing one is the reason: sources, a CUDA build of torch, an
    sm_90 GPU (unless `require_gpu=False`), nvcc, ninja. `cache_dir` is the per-source build folder when the
    sources are there, else the cache root.
    """
    root = kernels_dir()
    files = [root / name for name in (*SOURCES, *HEADERS)]
    nvcc = _nvcc()
    plan = BuildPlan(sources=files, cache_dir=cache_root(), arch=ARCH, nvcc=nvcc)
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        plan.reason = (f"kernel sources not found in {root} (missing {', '.join(missing)}); unset {KERNELS_ENV} "
                       f"or point it at a folder holding them")
        return plan
    plan.cache_dir = cache_root() / f"dda_vsa_sm90_{cache_key(nvcc)}"
    plan.reason = _toolchain_reason(require_gpu, nvcc)
    return plan


def _toolchain_reason(require_gpu: bool, nvcc: str | None) -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA libraries to link against)"
    if require_gpu and (reason := _gpu_reason()) is not None:
        return reason
    if nvcc is None:
        return "nvcc not found (set CUDA_HOME or put the CUDA toolkit's bin/ on PATH)"
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja not found (pip install ninja, or the system package)"
    return None


def _build(*, require_gpu: bool, force: bool, verbose: bool) -> BuildResult:
    plan = build_plan(require_gpu=require_gpu)
    if plan.reason is not None:
        return BuildResult(None, plan.reason)
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        cpp_extension.CUDA_HOME = str(Path(plan.nvcc).resolve().parents[1])
    path = plan.cache_dir
    if force and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    root = plan.sources[0].parent
    with _env(TORCH_CUDA_ARCH_LIST=ARCH):
        module = cpp_extension.load(
            name=path.name,
            sources=[str(root / src) for src in SOURCES],
            extra_cflags=list(CXX_FLAGS),
            extra_cuda_cflags=list(NVCC_FLAGS),
            extra_include_paths=[str(root)],
            build_directory=str(path),
            verbose=verbose,
        )
    return BuildResult(module, None, path)


@functools.cache
def load_extension() -> ModuleType | None:
    """The built extension (built now if needed), or None after a single warning with the reason."""
    result = build()
    if result.module is None:
        warnings.warn(f"diffusers_dist_attn: compiled VSA kernel unavailable ({result.reason}); using Triton",
                      stacklevel=2)
    return result.module
