"""Backend choices are visible through diffusers' own logging controls."""

from __future__ import annotations

import logging

import torch

from diffusers_dist_attn.attention.registry import select_backend


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_diffusers_verbosity_shows_backend_choices():
    import diffusers.utils.logging as diffusers_logging

    capture = _Records()
    diffusers_root = logging.getLogger("diffusers")
    diffusers_root.addHandler(capture)
    before = diffusers_logging.get_verbosity()
    ours = logging.getLogger("diffusers_dist_attn")
    our_level = ours.level
    ours.setLevel(logging.NOTSET)  # not set by the user (e.g. `generate --log-level` in an earlier test): follow diffusers
    try:
        diffusers_logging.set_verbosity_warning()
        select_backend("dense", torch.zeros(1, 1, 1, 24, dtype=torch.float64))  # a situation not seen before
        assert not [r for r in capture.records if r.name.startswith("diffusers_dist_attn")]
        diffusers_logging.set_verbosity_info()
        select_backend("dense", torch.zeros(1, 1, 1, 40, dtype=torch.float64))
        records = [r for r in capture.records if r.name.startswith("diffusers_dist_attn")]
        assert records and "dense attention: sdpa_flash for cpu torch.float64 head dim 40" in records[-1].getMessage()
    finally:
        ours.setLevel(our_level)
        diffusers_logging.set_verbosity(before)
        diffusers_root.removeHandler(capture)
