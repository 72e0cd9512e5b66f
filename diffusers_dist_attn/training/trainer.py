"""Flow-matching training of Wan transformers with this package's attention (dense or VSA) under sequence
parallelism, data parallel across SP groups.

Layout: `init_sequence_parallel(sp)` splits the world into `dp_size` groups of `sp` ranks. Every rank of an SP
group trains on the same samples (its shard of their tokens, through `parallelize`); the groups see different
samples (the global batch is split by `groups.dp_rank`).

Gradients: every SP rank computes the loss from the gathered output, so (package convention, see
`distributed/collectives.py`) each SP rank holds P x its partial gradient and the SP-group sum is P x the
single-process gradient. One all-reduce *mean over the whole world* therefore gives
`(1 / (P * D)) * sum_groups (P * grad_group) = mean over DP groups of the single-process gradient`, i.e. exactly the
gradient of the global-batch mean loss. Nothing else is reduced (no separate SP average: that would count twice).

Loss (diffusers' flow-matching examples, Wan / SD3 style): `u = compute_density_for_timestep_sampling(...)`,
`sigma = scheduler.sigmas[int(u * 1000)]` (FlowMatchEulerDiscreteScheduler with `flow_shift`),
`noisy = (1 - sigma) * latents + sigma * noise`, `timestep = sigma * 1000`, `target = noise - latents`,
`loss = mean(compute_loss_weighting_for_sd3(...) * (pred - target) ** 2)` per sample, then the batch mean.
Noise and sigma of a sample come from a generator seeded by `(seed, micro-step, position in the global batch)`, so
the run is identical whatever the SP / DP layout, and `--resume` continues it exactly.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import atomic
from ..distributed import SequenceParallelGroups, agree, get_sequence_parallel_groups
from . import checkpoint as ckpt
from .data import ModelSpec, check_samples, collate, folder_samples, synthetic_samples
from .schedules import SparsitySchedule

__all__ = ["TrainConfig", "Trainer", "TRAINABLE", "WEIGHTING_SCHEMES", "LORA_TARGETS", "train"]

logger = logging.getLogger(__name__)

TRAINABLE = ("gates", "lora", "full")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections of every WanAttention
MIXED_PRECISION = ("no", "bf16")
# `--compile`: the compiled blocks are specialised on the sparsity value (and on grad mode), so a schedule with
# many distinct values would recompile the blocks at most of its steps
MAX_COMPILED_SPARSITIES = 16
NUM_TRAIN_TIMESTEPS = 1000
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
GATES_FILE = "gates.safetensors"
# fields of the config a resumed run must share with the checkpoint (others, e.g. --max-steps, may change)
_RESUME_KEYS = ("model", "train", "attention", "lora_rank", "lora_alpha", "seed", "batch_size",
                "gradient_accumulation_steps", "data", "synthetic", "synthetic_grid", "weighting_scheme",
                "flow_shift", "fixed_noise", "text_length")


@dataclass(frozen=True)
class TrainConfig:
    """One training run, as the `train` command's options (see `diffusers-dist-attn train --help`)."""

    model: str | None = None
    data: str | None = None
    synthetic: int | None = None
    synthetic_grid: tuple[int, int, int] = (3, 16, 16)
    output_dir: str = "train-output"
    train: tuple[str, ...] = ("gates",)
    attention: str = "vsa"
    sparsity: float = 0.9
    sparsity_warmup_steps: int = 0
    sparsity_schedule: str = "linear"
    sparsity_decay_interval: int = 1
    sparsity_decay_rate: float | None = None
    vsa_implementation: str | None = None
    gate_checkpoint: str | None = None
    lora_rank: int = 16
    lora_alpha: float = 16.0
    sp: int | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    lr: float = 1e-4
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    compile: bool = False
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float = 3.0
    text_length: int = 512
    fixed_noise: bool = False
    save_every: int = 0
    resume: str | None = None
    overwrite: bool = False
    plot: bool = True
    progress: bool = True

    def sparsity_at(self) -> SparsitySchedule:
        return SparsitySchedule(self.sparsity, self.sparsity_warmup_steps, self.sparsity_schedule,
                                self.sparsity_decay_interval, self.sparsity_decay_rate)


def _world_group() -> dist.ProcessGroup | None:
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's resident peak


def _model_spec(config: TrainConfig) -> ModelSpec:
    """The transformer's shape from `--model`'s `transformer/config.json` (no weights read) or the tiny preset."""
    from ..pipelines import wan

    if config.model is None:
        return ModelSpec.from_config(wan.tiny_transformer_config())
    root = wan.check_folder(config.model)
    return ModelSpec.from_config(json.loads((root / "transformer" / "config.json").read_text()))


def _check_config(config: TrainConfig) -> None:
    """Option checks that need no files (`ValueError` naming the option)."""
    positive = {"--max-steps": config.max_steps, "--batch-size": config.batch_size,
                "--gradient-accumulation-steps": config.gradient_accumulation_steps, "--lora-rank": config.lora_rank,
                "--text-length": config.text_length}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} {value}: must be >= 1")
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise ValueError(f"--lr {config.lr}: must be a positive number")
    for name, value in (("--save-every", config.save_every), ("--lr-warmup-steps", config.lr_warmup_steps)):
        if value < 0:
            raise ValueError(f"{name} {value}: must be >= 0")
    unknown = [t for t in config.train if t not in TRAINABLE]
    if unknown or not config.train:
        raise ValueError(f"--train {','.join(config.train)}: choose from {list(TRAINABLE)} (comma-separated)")
    if "full" in config.train and "lora" in config.train:
        raise ValueError("--train full already trains every weight; LoRA on top of it is not supported")
    if "gates" in config.train and config.attention != "vsa":
        raise ValueError("--train gates: the VSA gates (to_gate_compress) are only used by --attention vsa")
    if config.attention not in ("dense", "vsa"):
        raise ValueError(f"--attention {config.attention!r}: choose dense or vsa")
    if config.attention == "vsa":
        config.sparsity_at()  # validates target, warm-up, kind, interval, rate
    if config.compile and config.attention == "vsa":
        values = config.sparsity_at().distinct_values(config.max_steps)
        if values > MAX_COMPILED_SPARSITIES:
            raise ValueError(
                f"--compile compiles the blocks once per distinct sparsity, and this schedule uses {values} values in "
                f"{config.max_steps} steps (at most {MAX_COMPILED_SPARSITIES}): use --sparsity-schedule fastvideo "
                "with a --sparsity-decay-interval giving fewer steps, a shorter --sparsity-warmup-steps, or drop "
                "--compile")
    if config.gate_checkpoint is not None and config.attention != "vsa":
        raise ValueError("--gate-checkpoint: gates are only used by --attention vsa")
    if (config.data is None) == (config.synthetic is None):
        raise ValueError("give exactly one of --data FOLDER and --synthetic N")
    if config.synthetic is not None and config.synthetic < 1:
        raise ValueError(f"--synthetic {config.synthetic}: must be >= 1")
    if config.weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"--weighting-scheme {config.weighting_scheme!r}: choose from {list(WEIGHTING_SCHEMES)}")
    if config.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"--mixed-precision {config.mixed_precision!r}: choose from {list(MIXED_PRECISION)}")
    if "lora" in config.train:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ValueError("--train lora needs peft: pip install 'diffusers_dist_attn[train]' (or peft)") from None


def _check_output(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None: start fresh); `ValueError` when the output folder cannot be used."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is an existing file, not a folder")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not parent.is_dir() or not _writable(parent):
        raise ValueError(f"--output-dir {out}: {parent} is not a writable folder")
    model = Path(config.model).resolve() if config.model is not None else None
    if (out / "model_index.json").exists() or (model is not None and out.resolve() == model):
        raise ValueError(f"--output-dir {out} holds a diffusers model (model_index.json or --model): training "
                         "writes transformer/ and weights there; choose another folder")
    resume: Path | None = None
    if config.resume is not None:
        if config.resume == "latest":
            resume = ckpt.latest_checkpoint(out)  # none yet: start fresh (diffusers' examples do the same)
        else:
            resume = Path(config.resume)
            if not (resume / "state.json").is_file():
                raise ValueError(f"--resume {resume}: not a checkpoint folder (no state.json)")
        if resume is not None:
            saved = json.loads((resume / "state.json").read_text())["config"]
            mine = _jsonable(asdict(config))
            differs = [k for k in _RESUME_KEYS if saved.get(k) != mine.get(k)]
            if differs:
                raise ValueError(f"--resume {resume}: the checkpoint was trained with other settings: " + ", ".join(
                    f"{k}={saved.get(k)!r} (now {mine.get(k)!r})" for k in differs))
    if resume is None and out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) \
            and not config.overwrite:
        hint = "it has no checkpoint to resume; " if config.resume is not None else "pass --resume to continue its run, "
        raise ValueError(f"--output-dir {out} is not empty; {hint}--overwrite to replace this command's outputs there "
                         "(other files are kept), or another folder")
    return resume


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK | os.X_OK)


def _jsonable(value: Any) -> Any:
    """Tuples as lists (what a JSON round trip gives), for comparing with a saved config."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class TrainResult:
    """What `Trainer.fit` did: per-step records (loss, lr, sparsity, times, memory) and where outputs went."""

    records: list[dict[str, Any]] = field(default_factory=list)
    output_dir: Path | None = None
    start_step: int = 0

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]


class Trainer:
    """`Trainer(config).fit()`: validate (every rank agrees before anything is written), build, train, save.

    The process groups must exist (`init_sequence_parallel(config.sp)`); `config.sp` must match them.
    `on_step(trainer, step)`: optional callback after every optimizer step (tests read gradients there).
    """

    def __init__(self, config: TrainConfig, groups: SequenceParallelGroups | None = None,
                 on_step: Callable[[Trainer, int], None] | None = None) -> None:
        self.config = config
        self.groups = groups or get_sequence_parallel_groups()
        self.on_step = on_step
        self.model: nn.Module | None = None
        self.handle = None
        self.records: list[dict[str, Any]] = []
        self.start_step = 0

    # -- validation ---------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.groups.rank == 0

    @property
    def batch_per_group(self) -> int:
        return self.config.batch_size // self.groups.dp_size

    def validate(self) -> None:
        """Every check that needs no model weights; the first error of any rank is raised on every rank
        (`ValueError`), before anything is written."""
        config, groups = self.config, self.groups
        error = None
        try:
            _check_config(config)
            if config.sp is not None and config.sp != groups.sp_size:
                raise ValueError(f"--sp {config.sp} does not match the process groups (sp {groups.sp_size})")
            if config.batch_size % groups.dp_size:
                raise ValueError(f"--batch-size {config.batch_size} does not divide over the {groups.dp_size} "
                                 f"data-parallel groups (world {groups.world_size} / sp {groups.sp_size}); use a "
                                 f"multiple of {groups.dp_size}")
            self.spec = _model_spec(config)
            from ..attention.validation import check_head_split

            check_head_split(self.spec.num_heads, groups.sp_size, video_sparse=config.attention == "vsa")
            if config.data is not None:
                self.samples = folder_samples(config.data)
            else:
                self.samples = synthetic_samples(config.synthetic, self.spec, config.synthetic_grid, config.seed)
            check_samples(self.samples, self.spec, groups.sp_size, self.batch_per_group, config.text_length)
            if len(self.samples) < config.batch_size:
                raise ValueError(f"--batch-size {config.batch_size} is larger than the dataset ({len(self.samples)} "
                                 "samples)")
            self.resume_from = _check_output(config)
        except (ValueError, FileNotFoundError, OSError) as exc:
            error = " ".join(str(exc).split()) or type(exc).__name__
        agree(_world_group(), {}, where="train", error=error)
        self.validated = True

    # -- set-up -------------------------------------------------------------------------------------------------
    def _prepare_output(self) -> None:
        """Rank 0: create the folder, remove temp files of killed runs, and with --overwrite (fresh run) the
        checkpoints of the earlier run (only `checkpoint-N` folders this command wrote)."""
        out = Path(self.config.output_dir)
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic.remove_stale_temps(out)
            if self.config.overwrite and self.resume_from is None:
                for _, path in ckpt.list_checkpoints(out):
                    shutil.rmtree(path)
        if _world_group() is not None:
            dist.barrier()

    def _build_model(self) -> nn.Module:
        from ..pipelines import wan

        config = self.config
        if config.model is None:
            model = wan.build_tiny_pipeline(config.seed).transformer  # the `generate` command's tiny transformer
        else:
            from diffusers import WanTransformer3DModel

            model = WanTransformer3DModel.from_pretrained(config.model, subfolder="transformer",
                                                          torch_dtype=torch.float32)  # fp32 master weights
        return model.to(self.groups.device)

    def _setup_trainable(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        from ..models import load_gates
        from ..models.wan import add_gate_compress

        config = self.config
        model.requires_grad_(False)
        if config.attention == "vsa":
            add_gate_compress(model)  # zero gates: VSA at sparsity 0 is then exactly dense attention
            if config.gate_checkpoint is not None:
                report = load_gates(model, config.gate_checkpoint)
                logger.info("%s", report.summary())
        if "lora" in config.train:
            from peft import LoraConfig

            torch.manual_seed(config.seed)  # LoRA A init: identical on every rank
            model.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights=True,
                                         target_modules=list(LORA_TARGETS)))
            for name, param in model.named_parameters():
                param.requires_grad_("lora_" in name)
        if "full" in config.train:
            model.requires_grad_(True)
        if "gates" in config.train:
            for name, param in model.named_parameters():
                if ".to_gate_compress." in name:
                    param.requires_grad_(True)
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def setup(self) -> None:
        """Build the model, trainable parameters, optimizer, sparsity schedule; load a checkpoint to resume."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.optimization import get_scheduler

        from ..models import parallelize

        config = self.config
        self._prepare_output()
        torch.manual_seed(config.seed)
        model = self._build_model()
        self.trainable = self._setup_trainable(model)
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        options = {"vsa_implementation": config.vsa_implementation} if config.attention == "vsa" else {}
        self.handle = parallelize(model, attention=config.attention, sparsity=0.0, groups=self.groups, **options)
        if config.compile:
            # after parallelize: the compiled blocks trace the sharding hooks and this package's processors. One
            # graph per sparsity value and grad mode (+ slack): raise dynamo's per-code recompile limit to match.
            values = self.schedule_values()
            dynamo = torch._dynamo.config  # the limit is `cache_size_limit` before torch 2.7
            limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
            setattr(dynamo, limit, max(getattr(dynamo, limit), 2 * values + 4))
            model.compile_repeated_blocks(fullgraph=True)
        self.model = model
        params = [p for _, p in self.trainable]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.lr_scheduler = get_scheduler("constant_with_warmup", self.optimizer,
                                          num_warmup_steps=config.lr_warmup_steps)
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                                                               shift=config.flow_shift)
        self.schedule = config.sparsity_at() if config.attention == "vsa" else None
        if self.resume_from is not None:
            self._load(self.resume_from)

    def schedule_values(self) -> int:
        """Distinct sparsities of the whole run (1 for dense or a constant sparsity)."""
        config = self.config
        return config.sparsity_at().distinct_values(config.max_steps) if config.attention == "vsa" else 1

    # -- one step -----------------------------------------------------------------------------------------------
    def batch_indices(self, micro_step: int) -> tuple[list[int], list[int]]:
        """`(sample indices, positions in the global batch)` of this DP group at global micro-step `micro_step`:
        a fresh permutation per epoch (seeded), incomplete last batches dropped."""
        n, size = len(self.samples), self.config.batch_size
        per_epoch = n // size
        epoch, pos = divmod(micro_step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))
        start = self.groups.dp_rank * self.batch_per_group
        positions = list(range(start, start + self.batch_per_group))
        return [int(perm[pos * size + j]) for j in positions], positions

    def _noise(self, latents: torch.Tensor, micro_step: int, position: int, index: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(noise like latents [C, T, H, W], sigma [1])` for one sample, from its own seeded generator."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        config = self.config
        key = (config.seed, 0, index) if config.fixed_noise else (config.seed, micro_step, position)
        gen = torch.Generator().manual_seed(hash_seed(*key))
        u = compute_density_for_timestep_sampling(config.weighting_scheme, 1, config.logit_mean, config.logit_std,
                                                  config.mode_scale, generator=gen)
        idx = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        return torch.randn(latents.shape, generator=gen), self.noise_scheduler.sigmas[idx].float()

    def micro_step_loss(self, micro_step: int) -> tuple[torch.Tensor, int]:
        """Forward + loss of this DP group's batch at `micro_step` -> `(loss [], local tokens)`."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        config, device = self.config, self.groups.device
        indices, positions = self.batch_indices(micro_step)
        items = [self.samples.load(i) for i in indices]
        noises, sigmas = zip(*(self._noise(item["latents"], micro_step, p, i)
                               for item, p, i in zip(items, positions, indices, strict=True)), strict=True)
        batch = collate(items, config.text_length)
        latents = batch["latents"].to(device)  # [B, C, T, H, W]
        noise = torch.stack(noises).to(device)
        sigma = torch.cat(sigmas).to(device)  # [B]
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1.0 - s) * latents + s * noise
        timestep = sigma * NUM_TRAIN_TIMESTEPS  # [B]
        target = noise - latents
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16"):
            pred = self.model(hidden_states=noisy, timestep=timestep,
                              encoder_hidden_states=batch["prompt_embeds"].to(device), return_dict=False)[0]
        weight = compute_loss_weighting_for_sd3(config.weighting_scheme, sigma).view(-1, 1, 1, 1, 1)
        per_sample = (weight * (pred.float() - target) ** 2).flatten(1).mean(1)  # [B]
        tokens = sum(self.samples.infos[i].tokens(self.spec) for i in indices)
        return per_sample.mean(), tokens

    def _all_reduce_mean(self, extras: torch.Tensor) -> torch.Tensor:
        """Average every trainable gradient over the whole world, in place, with `extras` appended to the last
        bucket (one collective for loss and per-rank stats); returns the reduced extras."""
        params = [p for _, p in self.trainable]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        world = self.groups.world_size
        if world == 1:
            return extras
        buckets: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in params:  # ~64 MiB fp32 buckets: one flat copy of all gradients would double their memory
            if size and size + p.numel() > 2**24:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += p.numel()
        out = extras
        for i, bucket in enumerate(buckets):
            flat = torch.cat([p.grad.reshape(-1).float() for p in bucket]
                             + ([extras.to(self.groups.device)] if i == len(buckets) - 1 else []))
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
            if i == len(buckets) - 1:
                out = flat[offset:].cpu()
        return out

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (`gradient_accumulation_steps` micro-steps) -> its log record."""
        config, groups = self.config, self.groups
        sparsity = self.schedule(step) if self.schedule is not None else None
        for state in self.handle.states.values():
            state.schedule = sparsity if sparsity is not None else 0.0
        start = time.perf_counter()
        accum = config.gradient_accumulation_steps
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for micro in range(accum):
            loss, n = self.micro_step_loss(step * accum + micro)
            (loss / accum).backward()
            loss_sum += loss.detach().double().cpu() / accum
            tokens += n
        compute_s = time.perf_counter() - start
        # extras: [loss, then per rank (compute seconds, peak MiB) in its own slots: a sum-reduce gathers them]
        extras = torch.zeros(1 + 2 * groups.world_size, dtype=torch.float64)
        extras[0] = loss_sum
        extras[1 + 2 * groups.rank] = compute_s
        extras[2 + 2 * groups.rank] = _peak_memory_mb(groups.device)
        reduced = self._all_reduce_mean(extras.float() if groups.device.type != "cpu" else extras).double()
        reduced[1:] *= groups.world_size
        params = [p for _, p in self.trainable]
        grad_norm = (float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)) if config.max_grad_norm > 0
                     else float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        if self.on_step is not None:
            self.on_step(self, step)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - start
        # tokens of the whole job: every DP group's samples once (SP ranks share theirs)
        global_tokens = tokens * groups.dp_size
        per_rank = [{"rank": r, "compute_s": round(float(reduced[1 + 2 * r]), 6),
                     "peak_memory_mb": round(float(reduced[2 + 2 * r]), 1)} for r in range(groups.world_size)]
        return {"step": step + 1, "loss": float(reduced[0]), "lr": lr, "sparsity": sparsity,
                "grad_norm": grad_norm, "step_time_s": round(step_s, 6),
                "tokens_per_s": round(global_tokens / step_s, 2),
                "tokens_per_s_per_rank": round(tokens / groups.sp_size / step_s, 2),  # this rank's token shard
                "per_rank": per_rank}

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _gate_state(self) -> dict[str, torch.Tensor]:
        from ..models.wan import WAN_GATES

        state = {}
        for path, attn in WAN_GATES.attentions(self.model).items():
            gate = getattr(attn, "to_gate_compress", None)
            if gate is not None:
                for kind, value in gate.state_dict().items():
                    state[f"{path}.to_gate_compress.{kind}"] = value.detach().cpu().contiguous().clone()
        return state

    def _write_outputs(self, folder: Path, step: int, *, optimizer: bool) -> None:
        from safetensors.torch import save_file

        trainable = {n: p.detach().cpu().contiguous().clone() for n, p in self.trainable}
        save_file(trainable, str(folder / "trainable.safetensors"))
        if self.config.attention == "vsa":
            save_file(self._gate_state(), str(folder / GATES_FILE))
        if "lora" in self.config.train:
            from diffusers import WanPipeline, training_utils
            from peft.utils import get_peft_model_state_dict

            # the adapter config (rank, alpha, targets) travels in the file's metadata, so load_lora_weights
            # rebuilds the same scaling; a private diffusers helper, absent in some releases
            collate = getattr(training_utils, "_collate_lora_metadata", None)
            metadata = collate({"transformer": self.model}) if collate is not None else {}
            WanPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(self.model),
                                          safe_serialization=True, **metadata)
        if optimizer:
            torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()},
                       folder / "optimizer.pt")
        ckpt.write_json(folder / "state.json", {"step": step, "config": _jsonable(asdict(self.config)),
                                                 "records": self.records})

    def save_checkpoint(self, step: int) -> Path | None:
        """Rank 0 writes `checkpoint-<step>` atomically (all ranks hold identical weights)."""
        if not self.is_main:
            return None
        final = Path(self.config.output_dir) / f"checkpoint-{step}"
        return atomic.atomic_dir(final, lambda tmp: self._write_outputs(tmp, step, optimizer=True), replace=True)

    def _load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "trainable.safetensors"))
        names = {n for n, _ in self.trainable}
        if set(tensors) != names:
            raise ValueError(f"--resume {folder}: its trainable parameters differ from this run's "
                             f"({len(set(tensors) ^ names)} names differ)")
        with torch.no_grad():
            for name, param in self.trainable:
                param.copy_(tensors[name])
        opt = torch.load(folder / "optimizer.pt", map_location=self.groups.device, weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.lr_scheduler.load_state_dict(opt["lr_scheduler"])
        self.start_step = int(state["step"])
        self.records = [r for r in state["records"] if r["step"] <= self.start_step]
        logger.info("resumed from %s at step %d", folder, self.start_step)

    def _write_final(self) -> None:
        """Rank 0: root outputs (gates, LoRA, full transformer weights), the JSON log and the loss plot."""
        out = Path(self.config.output_dir)
        step = self.records[-1]["step"] if self.records else self.start_step
        if step and not (out / f"checkpoint-{step}").exists():
            self.save_checkpoint(step)
        latest = out / f"checkpoint-{step}"
        for name in (GATES_FILE, LORA_FILE):
            if (latest / name).is_file():
                atomic.atomic_file(out / name, lambda tmp, src=latest / name: shutil.copyfile(src, tmp))
        if "full" in self.config.train:
            self._write_full(out / "transformer")
        log = {"config": _jsonable(asdict(self.config)), "world_size": self.groups.world_size,
               "sp": self.groups.sp_size, "dp": self.groups.dp_size, "trainable_parameters":
               sum(p.numel() for _, p in self.trainable), "steps": self.records}
        atomic.atomic_file(out / "train_log.json", lambda tmp: ckpt.write_json(tmp, log))
        if self.config.plot and self.records:
            self._plot(out / "loss.png")

    def _write_full(self, final: Path) -> None:
        """`transformer/` (config.json + diffusion_pytorch_model.safetensors) without the gates, which live in
        gates.safetensors: `WanTransformer3DModel.from_pretrained` reads it."""
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            self.model.save_config(tmp)
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
                     if ".to_gate_compress." not in k}
            save_file(state, str(tmp / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

        atomic.atomic_dir(final, write, replace=True)

    def _plot(self, path: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.info("matplotlib is not installed: no loss plot")
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in self.records], [r["loss"] for r in self.records])
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss")
        ax.set_yscale("log")
        ax.set_title(f"{','.join(self.config.train)} / {self.config.attention} / sp {self.groups.sp_size} x dp "
                     f"{self.groups.dp_size}")
        fig.tight_layout()
        atomic.atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=100))
        plt.close(fig)

    # -- the loop -----------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """validate -> set up -> train `max_steps` (from a resumed step) -> final outputs (rank 0)."""
        if not getattr(self, "validated", False):
            self.validate()
        self.setup()
        config = self.config
        bar = None
        if config.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.max_steps, initial=self.start_step, desc="train", file=sys.stderr,
                       dynamic_ncols=True)
        try:
            for step in range(self.start_step, config.max_steps):
                record = self.train_step(step)
                self.records.append(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4g}", step_s=f"{record['step_time_s']:.3f}")
                    bar.update(1)
                if config.save_every and (step + 1) % config.save_every == 0:
                    self.save_checkpoint(step + 1)
        finally:
            if bar is not None:
                bar.close()
        if self.is_main:
            self._write_final()
        if _world_group() is not None:
            dist.barrier()  # leave together (outputs complete before any rank returns)
        return TrainResult(self.records, Path(config.output_dir), self.start_step)


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 mixing), identical in every process."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return value >> 1


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """`Trainer(config, **kwargs).fit()` on the current process groups."""
    return Trainer(config, **kwargs).fit()

