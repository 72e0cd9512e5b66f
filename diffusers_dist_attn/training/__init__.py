"""Training with this package's attention (dense / VSA) under sequence parallelism: `diffusers-dist-attn train`.

- `Trainer(TrainConfig(...)).fit()` / `train(config)`: flow-matching training of a Wan transformer's VSA gates,
  LoRA or all weights; SP inside groups (`parallelize`), data parallel across them (see `trainer.py`).
- `data`: sample folders (safetensors) and synthetic samples; `checkpoint`: atomic writes; `schedules`: sparsity.
"""

from .data import ModelSpec, SampleInfo, SampleSet, folder_samples, synthetic_samples
from .schedules import SparsitySchedule
from .trainer import TrainConfig, Trainer, TrainResult, train

__all__ = ["TrainConfig", "Trainer", "TrainResult", "train", "SparsitySchedule", "ModelSpec", "SampleInfo",
           "SampleSet", "folder_samples", "synthetic_samples"]
