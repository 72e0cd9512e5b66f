"""Input checks shared by the layers. Every check runs on every rank before any collective, so bad input
raises a clear `ValueError` everywhere instead of hanging one rank in an all-to-all."""

from __future__ import annotations

import numbers
import operator

import torch

from ..distributed.groups import get_sequence_parallel_groups, valid_degrees

__all__ = ["check_qkv", "check_head_dim", "check_head_split", "check_replicated", "check_seq_len", "check_sparsity",
           "check_grid"]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_length: bool = True, allow_gqa: bool = False
) -> None:
    """q, k, v are 4-D `[B, S, H, D]` on one device with one dtype; k and v have equal shapes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq_len, heads, head_dim]; got shape {_shape(t)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype {t.dtype} differs from q.dtype {q.dtype}; all must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all must be on one device")
    if k.shape != v.shape:
        raise ValueError(f"k {_shape(k)} and v {_shape(v)} must have the same shape")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q {_shape(q)} and k {_shape(k)} must agree in batch (dim 0) and head_dim (dim 3)")
    if same_length and k.shape[1] != q.shape[1]:
        raise ValueError(f"q {_shape(q)} and k {_shape(k)} must have the same sequence length (dim 1)")
    if k.shape[2] != q.shape[2]:
        if not allow_gqa:
            raise ValueError(
                f"q has {q.shape[2]} heads but k/v have {k.shape[2]}; this layer needs equal head counts "
                "(repeat k/v heads, or use LocalAttention for grouped-query attention)"
            )
        if q.shape[2] % k.shape[2]:
            raise ValueError(f"q heads {q.shape[2]} must be a multiple of k/v heads {k.shape[2]} (GQA)")


def check_head_split(num_heads: int, world: int, *, ulysses: int | None = None, video_sparse: bool = False) -> None:
    """Ulysses needs at least one head per rank of its group; the heads need not divide the degree.

    `world` is the sequence-parallel degree, `ulysses` the Ulysses degree inside it (default: the current
    groups' when their SP degree is `world`, else `world`, i.e. no ring; `video_sparse`: always `world`).
    Uneven head counts are split with `head_split` (12 heads over 8 ranks: 2,2,2,2,1,1,1,1).
    """
    if video_sparse:  # whole heads over the whole sequence: Ulysses over the full SP group, never a ring
        ulysses = world
    elif ulysses is None:
        current = get_sequence_parallel_groups()
        ulysses = current.ulysses_size if current.sp_size == world else world
    if num_heads >= ulysses:
        return
    if video_sparse:
        fix = ("video sparse attention needs whole heads over the full sequence (no ring); use a "
               f"sequence-parallel degree <= {num_heads}")
    else:
        fix = (f"run the rest as ring attention, e.g. init_sequence_parallel({world}, ulysses=u, ring={world}//u) "
               f"with u in {valid_degrees(world, num_heads)} (plan_degrees(...) chooses; CLI: --ring)")
    raise ValueError(
        f"{num_heads} attention heads cannot be split over a sequence-parallel degree of {world} "
        f"(Ulysses degree {ulysses} needs at least one head per rank); {fix}"
    )


def check_replicated(
    q: torch.Tensor,
    replicated: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    replicated_mask: torch.Tensor | None,
) -> bool:
    """Validate replicated (text) tokens; returns whether they are present."""
    for name, t in zip(("replicated_q", "replicated_k", "replicated_v"), replicated, strict=True):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__} {t!r}; FastVideo's later "
                            "positional `original_seq_len` is keyword-only here: pass original_seq_len=...")
    given = [t is not None for t in replicated]
    if any(given) and not all(given):
        missing = [n for n, g in zip(("replicated_q", "replicated_k", "replicated_v"), given, strict=True) if not g]
        raise ValueError(f"replicated_q, replicated_k and replicated_v must be given together; missing {missing}")
    if not any(given):
        if replicated_mask is not None:
            raise ValueError("replicated_mask was given without replicated_q/k/v")
        return False
    rq, rk, rv = replicated
    for name, t in (("replicated_q", rq), ("replicated_k", rk), ("replicated_v", rv)):
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D [batch, text_len, heads, head_dim]; got shape {_shape(t)}")
        if t.shape != rq.shape:
            raise ValueError(f"{name} {_shape(t)} must have the shape of replicated_q {_shape(rq)}")
        if t.shape[0] != q.shape[0] or t.shape[2:] != q.shape[2:]:
            raise ValueError(
                f"{name} {_shape(t)} must match q {_shape(q)} in batch, heads and head_dim (all heads on every rank)"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}); got {t.dtype}, {t.device}")
    if replicated_mask is not None:
        if replicated_mask.dtype != torch.bool or replicated_mask.shape != (rq.shape[0], rq.shape[1]):
            raise ValueError(
                f"replicated_mask must be a bool tensor [batch, text_len] = {(rq.shape[0], rq.shape[1])}; "
                f"got {replicated_mask.dtype} {_shape(replicated_mask)}"
            )
        if replicated_mask.device != q.device:
            raise ValueError(f"replicated_mask is on {replicated_mask.device}; it must be on {q.device}")
    return True


def check_head_dim(q: torch.Tensor, head_size: int, softmax_scale: float) -> None:
    """q's head dim must be the constructor's `head_size`: the softmax scale was derived from it."""
    if q.shape[-1] != head_size:
        raise ValueError(f"q has head_dim {q.shape[-1]} but the layer was built with head_size={head_size} (softmax "
                         f"scale {softmax_scale:.4g}); build the layer with head_size={q.shape[-1]}, or pass "
                         "softmax_scale= explicitly and a matching head_size")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral | torch.SymInt) and not isinstance(value, bool)


def check_seq_len(original_seq_len: int | None, local_len: int, world: int) -> int:
    """The unpadded sequence length: `original_seq_len` (a positive int) or, when None, all `local_len * world`
    rows; it must leave fewer than `world` pad rows."""
    padded_len = local_len * world
    if original_seq_len is None:
        return padded_len
    if not _is_int(original_seq_len) or original_seq_len < 1:
        raise ValueError(f"original_seq_len must be a positive int (the unpadded token count) or None; got "
                         f"{type(original_seq_len).__name__} {original_seq_len!r}")
    if not padded_len - world < original_seq_len <= padded_len:
        raise ValueError(f"original_seq_len={original_seq_len} is inconsistent with {world} shards of "
                         f"{local_len} tokens (allowed: {max(padded_len - world + 1, 1)}..{padded_len})")
    return int(original_seq_len)


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) and not (
            isinstance(sparsity, torch.Tensor) and sparsity.numel() == 1 and sparsity.is_floating_point()):
        raise ValueError(f"sparsity must be a real number in [0, 1); got {type(sparsity).__name__} {sparsity!r}")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (fraction of key blocks skipped); got {sparsity}")
    return sparsity


def check_grid(grid_size: tuple[int, int, int] | None, seq_len: int) -> tuple[int, int, int]:
    if grid_size is None:
        raise ValueError("grid_size=(T, H, W) of the post-patch video grid is required for video sparse attention")
    if len(grid_size) != 3 or not all(_is_int(g) and g >= 1 for g in grid_size):
        raise ValueError(f"grid_size must be three positive ints (T, H, W); got {grid_size}")
    # operator.index specializes a traced SymInt to a constant (with a guard): torch.compile turns int arguments that
    # change between calls (a second video size) into SymInts, but the tile layout is built per grid, eagerly
    grid = tuple(operator.index(g) for g in grid_size)
    if grid[0] * grid[1] * grid[2] != seq_len:
        raise ValueError(
            f"grid_size {grid} has {grid[0] * grid[1] * grid[2]} tokens but the (unpadded) sequence has {seq_len}"
        )
    return grid
