"""`--model ORG/NAME`: a Hugging Face Hub id resolved through `huggingface_hub.snapshot_download`, offline from a
cache laid out the way huggingface_hub writes it (`models--org--name/refs/main` + `snapshots/<commit>/...`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusers_dist_attn.cli import main
from diffusers_dist_attn.pipelines.wan import build_tiny_pipeline

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SMALL = ["--height", "32", "--width", "32", "--num-frames", "5", "--steps", "1", "--format", "gif"]


def _cached_repo(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in a Hub cache at `cache` (created), `refs/main` pointing at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_from_the_offline_cache(tmp_path, offline_cache):
    snapshot = _cached_repo(offline_cache, "tiny-org/tiny-wan")
    build_tiny_pipeline(seed=3).save_pretrained(snapshot)
    out = tmp_path / "out"
    assert main(["generate", "--model", "tiny-org/tiny-wan", "--attention", "dense-local", "--output-dir", str(out),
                 *SMALL]) == 0
    report = json.loads((out / "wan-dense-local-sp1.json").read_text())
    assert report["model"] == "tiny-org/tiny-wan" and Path(report["model_path"]) == snapshot.resolve()
    assert report["num_frames"] == 5


def test_cached_hub_id_is_validated_as_a_pipeline_folder(tmp_path, offline_cache, capsys):
    snapshot = _cached_repo(offline_cache, "tiny-org/not-a-pipeline")
    (snapshot / "README.md").write_text("a model card only")
    out = tmp_path / "out"
    assert main(["generate", "--model", "tiny-org/not-a-pipeline", "--output-dir", str(out), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"--model {snapshot.resolve()}: no readable model_index.json; not a diffusers pipeline folder" in err
    assert not out.exists()


def test_hub_id_not_cached_while_offline(tmp_path, offline_cache, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--model", "tiny-org/absent", "--output-dir", str(out), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert (f"--model tiny-org/absent: no local folder of that name, and the Hub repository is not in the Hugging "
            f"Face cache ({offline_cache}) while HF_HUB_OFFLINE=1") in err
    assert not out.exists()


def test_existing_local_folder_wins_over_a_hub_id(tmp_path, offline_cache, capsys, monkeypatch):
    """A relative path that looks like `org/name` and exists is the local folder (no Hub lookup)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert main(["generate", "--model", "org/name", "--output-dir", str(tmp_path / "out"), *SMALL]) == 2
    assert "--model org/name: no readable model_index.json" in capsys.readouterr().err
