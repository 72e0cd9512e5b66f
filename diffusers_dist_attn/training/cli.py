"""`diffusers-dist-attn train` (and `preprocess`): the subcommands' options and entry points.

    diffusers-dist-attn train --synthetic 8 --max-steps 20                        # tiny offline Wan, VSA gates
    torchrun --standalone --nproc_per_node 4 -m diffusers_dist_attn train --synthetic 8 --sp 2 --batch-size 2
    accelerate launch --num_processes 8 -m diffusers_dist_attn train --model ./Wan2.1-T2V-1.3B-Diffusers \\
        --data ./samples --sp 4 --train lora --attention vsa --sparsity 0.9 --sparsity-warmup-steps 500 \\
        --mixed-precision bf16 --gradient-checkpointing --max-steps 2000 --save-every 250

`cli.main` registers the parsers (`add_parsers`) and calls `run(args)`; bad input raises `cli.UsageError` on every
rank (exit 2, one line on rank 0) before anything is written.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parsers", "run", "config_from_args"]


def _int_tuple(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not T,H,W (three integers)") from None
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not T,H,W (three positive integers)")
    return values  # type: ignore[return-value]


def _trainable(text: str) -> tuple[str, ...]:
    from .trainer import TRAINABLE

    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in TRAINABLE]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(TRAINABLE)} (comma-separated)")
    return parts


def add_parsers(sub: Any) -> None:
    """Add `train` (and `preprocess`, when available) to the `diffusers-dist-attn` subparsers."""
    from .schedules import SCHEDULES
    from .trainer import MIXED_PRECISION, WEIGHTING_SCHEMES, TrainConfig

    d = TrainConfig()
    tr = sub.add_parser("train", help="train VSA gates / LoRA / the full Wan transformer (flow matching), "
                                      "sequence parallel inside groups, data parallel across them",
                        description=__doc__.split("\n\n")[0])
    src = tr.add_argument_group("model and data")
    src.add_argument("--model", default=None,
                     help="local diffusers Wan folder (its transformer/ is trained); default: the embedded tiny "
                          "transformer of `generate` (random weights from --seed, offline)")
    src.add_argument("--data", default=None,
                     help="folder of samples: *.safetensors with latents [C, T, H, W], prompt_embeds [L, D], "
                          "optional prompt_mask [L] (see `preprocess`)")
    src.add_argument("--synthetic", type=int, default=None, metavar="N",
                     help="N random samples for the model instead of --data (offline smoke runs)")
    src.add_argument("--synthetic-grid", type=_int_tuple, default=d.synthetic_grid, metavar="T,H,W",
                     help=f"latent frames, height, width of --synthetic samples; default: "
                          f"{','.join(map(str, d.synthetic_grid))}")
    what = tr.add_argument_group("what to train")
    what.add_argument("--train", type=_trainable, default=d.train, metavar="{gates,lora,full}",
                      help="comma-separated: gates (VSA to_gate_compress only), lora (peft LoRA on to_q, to_k, "
                           "to_v, to_out.0), full (every weight); e.g. lora,gates; default: gates")
    what.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"default: {d.lora_rank}")
    what.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"default: {d.lora_alpha:g}")
    what.add_argument("--gate-checkpoint", default=None,
                      help="start from these VSA gates (FastVideo / this package's keys); default: zero gates")
    att = tr.add_argument_group("attention")
    att.add_argument("--attention", choices=("dense", "vsa"), default=d.attention, help=f"default: {d.attention}")
    att.add_argument("--sparsity", type=float, default=d.sparsity,
                     help=f"VSA target sparsity in [0, 1); default: {d.sparsity}")
    att.add_argument("--sparsity-warmup-steps", type=int, default=d.sparsity_warmup_steps, metavar="N",
                     help="rise from 0 (with zero gates: dense) to --sparsity over N steps; default: 0 (target "
                          "from the start)")
    att.add_argument("--sparsity-schedule", choices=SCHEDULES, default=d.sparsity_schedule,
                     help="linear, or fastvideo: min(target, rate * (step // interval)); default: linear")
    att.add_argument("--sparsity-decay-interval", type=int, default=d.sparsity_decay_interval,
                     help="fastvideo schedule: steps between increases; default: 1")
    att.add_argument("--sparsity-decay-rate", type=float, default=None,
                     help="fastvideo schedule: increase per interval; default: target * interval / warm-up steps")
    att.add_argument("--vsa-implementation", choices=("auto", "cuda", "triton", "torch"), default=None,
                     help="VSA kernel; default: auto")
    par = tr.add_argument_group("parallelism and optimisation")
    par.add_argument("--sp", type=int, default=None,
                     help="sequence-parallel degree (must divide the world; the rest is data parallel); "
                          "default: all processes")
    par.add_argument("--batch-size", type=int, default=d.batch_size,
                     help="global batch per micro-step, split over the data-parallel groups; default: 1")
    par.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps,
                     help="default: 1")
    par.add_argument("--max-steps", type=int, default=d.max_steps, help=f"optimizer steps; default: {d.max_steps}")
    par.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate; default: {d.lr:g}")
    par.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps, help="linear LR warm-up; default: 0")
    par.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default: 0")
    par.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                     help="clip the global gradient norm (0: off); default: 1.0")
    par.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=d.mixed_precision,
                     help="bf16: autocast around the transformer forward (fp32 master weights); default: no")
    par.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    par.add_argument("--compile", action="store_true",
                     help="torch.compile the transformer blocks (fullgraph, inductor; first steps compile)")
    par.add_argument("--seed", type=int, default=d.seed,
                     help="data order, noise, sigmas, LoRA init, the embedded weights; default: 0")
    fm = tr.add_argument_group("flow matching")
    fm.add_argument("--weighting-scheme", choices=WEIGHTING_SCHEMES, default=d.weighting_scheme,
                    help="diffusers' compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3; "
                         f"default: {d.weighting_scheme}")
    fm.add_argument("--logit-mean", type=float, default=d.logit_mean, help="default: 0.0")
    fm.add_argument("--logit-std", type=float, default=d.logit_std, help="default: 1.0")
    fm.add_argument("--mode-scale", type=float, default=d.mode_scale, help="default: 1.29")
    fm.add_argument("--flow-shift", type=float, default=d.flow_shift,
                    help=f"FlowMatchEulerDiscreteScheduler shift of the training sigmas; default: {d.flow_shift}")
    fm.add_argument("--text-length", type=int, default=d.text_length,
                    help="text tokens the transformer sees: prompt embeds are zero-padded to it, as WanPipeline "
                         f"pads to max_sequence_length; default: {d.text_length}")
    fm.add_argument("--fixed-noise", action="store_true",
                    help="the same noise and sigma for a sample at every step (overfitting checks)")
    out = tr.add_argument_group("outputs")
    out.add_argument("--output-dir", default=d.output_dir, help=f"default: {d.output_dir}")
    out.add_argument("--save-every", type=int, default=d.save_every, metavar="N",
                     help="write checkpoint-<step> every N steps (the last step is always saved); default: 0")
    out.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                     help="continue from a checkpoint folder, or (no value) the latest in --output-dir")
    out.add_argument("--overwrite", action="store_true",
                     help="use a non-empty --output-dir: replace this command's outputs (other files are kept)")
    out.add_argument("--no-plot", dest="plot", action="store_false", help="no loss.png")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    out.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning",
                     help="default: warning")
    try:
        from . import preprocess
    except ImportError:
        return
    preprocess.add_parser(sub)


def config_from_args(args: argparse.Namespace) -> Any:
    """The `TrainConfig` of parsed `train` arguments."""
    import dataclasses

    from .trainer import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    """`train` / `preprocess`: 0 when done; bad input raises `cli.UsageError` on every rank (exit 2)."""
    from .. import cli

    cli.configure_logging(args.log_level)
    if args.command == "preprocess":
        from . import preprocess

        return preprocess.run(args)
    from ..distributed import init_sequence_parallel
    from .trainer import Trainer

    config = config_from_args(args)
    with cli._user_errors():
        groups = init_sequence_parallel(config.sp)
        trainer = Trainer(config, groups)
        trainer.validate()
    result = trainer.fit()
    if trainer.is_main and result.records:
        last = result.records[-1]
        print(f"trained to step {last['step']}: loss {last['loss']:.6g}; outputs in {result.output_dir}", flush=True)
    return 0
