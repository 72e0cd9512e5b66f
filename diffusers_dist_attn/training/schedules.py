"""VSA sparsity schedules for training: from 0 (all key blocks kept: with zero gates exactly dense attention) to
the target sparsity.

- `linear`: `target * min(1, step / warmup_steps)`.
- `fastvideo`: FastVideo's stepwise decay, `min(target, rate * (step // interval))` (its `VSA_decay_rate`,
  `VSA_decay_interval_steps`); `rate` defaults to `target * interval / warmup_steps`, so it also reaches the target
  after `warmup_steps`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SparsitySchedule", "SCHEDULES"]

SCHEDULES = ("linear", "fastvideo")


@dataclass(frozen=True)
class SparsitySchedule:
    """`schedule(step) -> sparsity in [0, target]` for a training step (0-based)."""

    target: float
    warmup_steps: int = 0
    kind: str = "linear"
    interval: int = 1
    rate: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"--sparsity {self.target}: must be in [0, 1) (fraction of key blocks skipped)")
        if self.warmup_steps < 0:
            raise ValueError(f"--sparsity-warmup-steps {self.warmup_steps}: must be >= 0")
        if self.kind not in SCHEDULES:
            raise ValueError(f"--sparsity-schedule {self.kind!r}: choose one of {list(SCHEDULES)}")
        if self.interval < 1:
            raise ValueError(f"--sparsity-decay-interval {self.interval}: must be >= 1")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"--sparsity-decay-rate {self.rate}: must be > 0")

    def distinct_values(self, steps: int) -> int:
        """How many different sparsities steps 0 .. steps-1 use (`--compile` builds a graph per value)."""
        return len({self(step) for step in range(steps)})

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0 and self.rate is None:
            return self.target
        if self.kind == "linear":
            return self.target * min(1.0, step / self.warmup_steps)
        rate = self.rate if self.rate is not None else self.target * self.interval / self.warmup_steps
        return min(self.target, rate * (step // self.interval))
