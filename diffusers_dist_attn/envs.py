"""Every `DIFFUSERS_DIST_ATTN_*` environment variable, in one place (the launchers' `WORLD_SIZE`, `RANK`,
`LOCAL_RANK`, `LOCAL_WORLD_SIZE` and the toolchains' `TRITON_INTERPRET`, `CUDA_HOME` keep their usual meaning).

Each setting is read when it is used (not at import time), so a test or a benchmark can change it with
`monkeypatch.setenv` / `os.environ` between calls. Selections that depend on a setting are cached per value
(the backend registry logs its choice once per distinct situation).

| name | default | meaning | read |
|---|---|---|---|
| `DIFFUSERS_DIST_ATTN_BACKEND` | `auto` | dense attention backend (`sdpa_cudnn`, `flash_attn`, `sdpa_math`, ...) | each backend selection |
| `DIFFUSERS_DIST_ATTN_VSA_IMPL` | `auto` | VSA implementation (`cuda`, `triton`, `torch`) | each VSA call |
| `DIFFUSERS_DIST_ATTN_VSA_CUDA` | `0` | `1` enables the compiled sm_90a VSA forward | each VSA selection |
| `DIFFUSERS_DIST_ATTN_ROTARY` | `auto` | `torch` forces the PyTorch rotary formula (else fused Triton on CUDA) | each rotary call |
| `DIFFUSERS_DIST_ATTN_KERNELS_DIR` | packaged sources | folder with the CUDA sources to build | each kernel build |
| `DIFFUSERS_DIST_ATTN_CACHE` | `~/.cache/diffusers_dist_attn` | build cache of compiled kernels | each kernel build |
| `DIFFUSERS_DIST_ATTN_TIMEOUT` | `600` | seconds a collective may wait for a peer before the group fails | `init_sequence_parallel` |
| `DIFFUSERS_DIST_ATTN_CHECK_RANKS` | `1` | `0` skips the cross-rank agreement check before each communicating call | each layer call |
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Setting", "SETTINGS", "BACKEND", "VSA_IMPL", "VSA_CUDA", "ROTARY", "KERNELS_DIR", "CACHE_DIR",
           "TIMEOUT", "CHECK_RANKS", "get", "get_bool", "get_float"]


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, default (as the string a user would write) and meaning."""

    name: str
    default: str
    meaning: str

    def read(self) -> str:
        """The current value, stripped; the default when unset or empty."""
        value = os.environ.get(self.name, "").strip()
        return value if value else self.default


BACKEND = Setting("DIFFUSERS_DIST_ATTN_BACKEND", "auto", "dense attention backend")
VSA_IMPL = Setting("DIFFUSERS_DIST_ATTN_VSA_IMPL", "auto", "VSA implementation: auto, cuda, triton, torch")
VSA_CUDA = Setting("DIFFUSERS_DIST_ATTN_VSA_CUDA", "0", "1 enables the compiled sm_90a VSA forward")
ROTARY = Setting("DIFFUSERS_DIST_ATTN_ROTARY", "auto", "torch forces the PyTorch rotary formula")
KERNELS_DIR = Setting("DIFFUSERS_DIST_ATTN_KERNELS_DIR", "", "folder with the CUDA sources to build")
CACHE_DIR = Setting("DIFFUSERS_DIST_ATTN_CACHE", "", "build cache of compiled kernels")
TIMEOUT = Setting("DIFFUSERS_DIST_ATTN_TIMEOUT", "600", "seconds a collective waits for a peer")
CHECK_RANKS = Setting("DIFFUSERS_DIST_ATTN_CHECK_RANKS", "1", "0 skips the cross-rank agreement check")

SETTINGS: tuple[Setting, ...] = (BACKEND, VSA_IMPL, VSA_CUDA, ROTARY, KERNELS_DIR, CACHE_DIR, TIMEOUT, CHECK_RANKS)


def get(setting: Setting) -> str:
    """`setting`'s current value (a string)."""
    return setting.read()


def get_bool(setting: Setting) -> bool:
    """True for `1`, `true`, `yes`, `on` (any case); False otherwise."""
    return setting.read().lower() in ("1", "true", "yes", "on")


def get_float(setting: Setting) -> float:
    """The value as a float; `ValueError` naming the variable when it is not a number."""
    value = setting.read()
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{setting.name}={value!r} is not a number ({setting.meaning})") from None
