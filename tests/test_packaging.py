"""The wheel carries what an installed package needs, and the declared dependency floors are the ones CI runs.

- the wheel (built offline from a copy of the source tree) holds the CUDA sources, `py.typed`, the LICENSE and the
  SPDX license expression; `cuda_build.build_plan()` run from the unpacked wheel finds the sources there;
- every `>=` floor in pyproject.toml equals the pin in `ci/constraints-lowest.txt` (the lowest-versions CI job).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from diffusers_dist_attn.vsa import cuda_build

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = (*cuda_build.SOURCES, *cuda_build.HEADERS)


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    return tomllib


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources, without build isolation (offline: the venv's setuptools)."""
    try:
        import setuptools
    except ImportError:
        pytest.skip("setuptools is not installed (pip install -e '.[test]' brings it)")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build the SPDX license field offline "
                    "(pip install -e '.[test]' brings a newer one)")
    # A copy, so the build neither writes build/ or *.egg-info into the checkout nor picks up stale files there.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "diffusers_dist_attn", src / "diffusers_dist_attn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout}\n{proc.stderr}"
    (whl,) = out.glob("diffusers_dist_attn-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for name in KERNEL_FILES:
        assert f"diffusers_dist_attn/kernels/{name}" in names, name
    assert "diffusers_dist_attn/py.typed" in names
    assert any(re.fullmatch(r"diffusers_dist_attn-[^/]+\.dist-info/licenses/LICENSE", n) for n in names), names
    assert not any(n.startswith(("tests/", "benchmarks/", "kernels/")) for n in names)
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
    assert "Apache License" in zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("/licenses/LICENSE"))).decode()


def test_build_plan_finds_packaged_sources(wheel, tmp_path):
    """Imported from the unpacked wheel (a pure-Python wheel unpacks to its installed layout), not the checkout."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from diffusers_dist_attn.vsa import cuda_build as c; p = c.build_plan(); "
            "print(c.__file__); print(*p.sources, sep='\\n'); print('reason:', p.reason)")
    env = {k: v for k, v in os.environ.items() if k != cuda_build.KERNELS_ENV}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", code], cwd=site, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    module, *sources, reason = proc.stdout.strip().splitlines()[-(len(KERNEL_FILES) + 2):]
    assert Path(module).is_relative_to(site), module
    assert [Path(s).name for s in sources] == list(KERNEL_FILES)
    for source in map(Path, sources):
        assert source.parent == site / "diffusers_dist_attn" / "kernels" and source.is_file(), source
    assert "not found" not in reason, reason


def test_build_plan_here(monkeypatch, tmp_path):
    """In the checkout / editable install: the packaged folder, a per-source cache folder, a reason or None."""
    monkeypatch.delenv(cuda_build.KERNELS_ENV, raising=False)
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path / "cache"))
    plan = cuda_build.build_plan()
    assert [p.parent for p in plan.sources] == [cuda_build.packaged_kernels_dir()] * len(KERNEL_FILES)
    assert all(p.is_file() for p in plan.sources)
    assert plan.arch == cuda_build.ARCH and plan.cache_dir.parent == tmp_path / "cache"
    assert re.fullmatch(r"dda_vsa_sm90_[0-9a-f]{16}", plan.cache_dir.name)
    if not torch.cuda.is_available():
        assert plan.reason  # no GPU here: a build cannot run, and the plan says why
    monkeypatch.setenv(cuda_build.KERNELS_ENV, str(tmp_path / "nowhere"))
    plan = cuda_build.build_plan()
    assert plan.sources[0].parent == tmp_path / "nowhere" and "not found" in plan.reason


def _floors() -> dict[str, str]:
    from packaging.requirements import Requirement

    deps = _tomllib().loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in map(Requirement, deps):
        lows = [spec.version for spec in dep.specifier if spec.operator == ">="]
        if lows:
            floors[dep.name.lower()] = lows[0]
    return floors


def test_lowest_constraints_match_declared_floors():
    from packaging.version import Version

    pins = {}
    for line in (ROOT / "ci" / "constraints-lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    floors = _floors()
    floors.pop("torch")  # only the local torch==2.13.0 CPU wheel exists in CI; see the constraints file
    assert set(pins) == set(floors), "ci/constraints-lowest.txt and the pyproject floors name different packages"
    for name, floor in floors.items():
        assert Version(pins[name]) == Version(floor), f"{name}: floor {floor}, CI pins {pins[name]}"
