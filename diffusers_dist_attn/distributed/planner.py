"""Choose the hybrid sequence-parallel degrees `sp = ulysses x ring` (and the Ulysses head split).

Rules, in order:
1. Ulysses needs at least one head per rank (`ulysses <= heads`); uneven splits are allowed (12 heads over 8
   ranks as 2,2,2,2,1,1,1,1). Video sparse attention (`full_heads=True`) needs whole heads over the whole
   sequence, and a backend without a log-sum-exp cannot ring: both force `ring = 1`.
2. Ulysses stays inside a node (its all-to-all rides NVLink): `ulysses` divides `gpus_per_node`; the ring
   (point-to-point, overlapped with compute) crosses nodes.
3. Least attention work on the busiest rank: `ceil(heads / ulysses) / ring` (uneven head splits idle some ranks).
4. Then the largest Ulysses degree (fewer, larger all-to-alls instead of ring steps).
"""

from __future__ import annotations

from dataclasses import dataclass

from .collectives import head_split
from .groups import valid_degrees

__all__ = ["DegreePlan", "plan_degrees"]


@dataclass(frozen=True)
class DegreePlan:
    """A choice of degrees: `init_sequence_parallel(sp, ulysses=plan.ulysses, ring=plan.ring)`."""

    ulysses: int
    ring: int
    head_split: tuple[int, ...]  # heads per Ulysses rank
    reason: str

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def even(self) -> bool:
        return len(set(self.head_split)) == 1


def _ring_allowed(can_ring: bool, full_heads: bool) -> str | None:
    """None when a ring is allowed, else why not."""
    if full_heads:
        return "video sparse attention needs whole heads over the full sequence"
    if not can_ring:
        return "the attention backend returns no log-sum-exp"
    return None


def plan_degrees(
    num_heads: int,
    sp_size: int,
    gpus_per_node: int | None = None,
    seq_len: int | None = None,
    *,
    ulysses: int | None = None,
    ring: int | None = None,
    can_ring: bool = True,
    full_heads: bool = False,
) -> DegreePlan:
    """Choose (or check) `(ulysses, ring)` for `num_heads` heads over an SP group of `sp_size` ranks.

    Args:
        gpus_per_node: ranks per node (default: all in one node).
        seq_len: tokens in the sequence (checks every rank gets at least one; reported in the reason).
        ulysses, ring: explicit degrees to validate instead of choosing (either or both).
        can_ring: whether the attention backend can run over a ring (it returns its log-sum-exp; flash-attn 3
            does not: `attention.backends.lse_capable(backend)` answers it).
        full_heads: the attention needs whole heads over the whole sequence (video sparse attention).
    Raises `ValueError` naming the fix when no valid split exists or explicit degrees are invalid.
    """
    heads, sp = int(num_heads), int(sp_size)
    node = sp if gpus_per_node is None else max(1, int(gpus_per_node))
    if heads < 1 or sp < 1:
        raise ValueError(f"num_heads ({num_heads}) and sp_size ({sp_size}) must be positive")
    if seq_len is not None and int(seq_len) < sp:
        raise ValueError(f"a sequence of {seq_len} tokens cannot be split over {sp} ranks; use sp <= {seq_len}")
    no_ring = _ring_allowed(can_ring, full_heads)
    if (ulysses is not None and int(ulysses) < 1) or (ring is not None and int(ring) < 1):
        raise ValueError(f"ulysses={ulysses} and ring={ring} must be positive degrees (or omitted)")
    if ulysses is not None or ring is not None:
        u = sp // int(ring) if ulysses is None else int(ulysses)
        r = sp // u if ring is None and u > 0 else (1 if ring is None else int(ring))
        if u < 1 or r < 1 or u * r != sp:
            raise ValueError(f"ulysses={ulysses} x ring={ring} must multiply to the sequence-parallel degree {sp}; "
                             f"valid Ulysses degrees: {valid_degrees(sp, heads)}, or omit both to let the planner choose")
        if r > 1 and no_ring:
            raise ValueError(f"ring={r} is not possible: {no_ring}; use ring=1 (ulysses={sp}, heads split "
                             f"{head_split(heads, sp) if heads >= sp else 'impossible'}) or a backend that returns its "
                             "log-sum-exp (sdpa_flash, sdpa_math)")
        if u > heads:
            raise ValueError(f"ulysses={u} exceeds the {heads} heads (one head per rank at least); use ulysses in "
                             f"{valid_degrees(sp, heads)} with ring = {sp} / ulysses")
        return DegreePlan(u, r, tuple(head_split(heads, u)), "explicit degrees")
    candidates = [u for u in valid_degrees(sp, heads) if no_ring is None or u == sp]
    if not candidates:
        raise ValueError(f"{heads} heads cannot be split over {sp} ranks without a ring ({no_ring}); "
                         f"use sp <= {heads}, or a dense LSE backend with ring > 1")

    def cost(u: int) -> tuple:
        r = sp // u
        intra = node % u == 0 or (u % node == 0 and sp <= node)
        return (not intra, -(-heads // u) / r, -u)

    u = min(candidates, key=cost)
    r = sp // u
    split = head_split(heads, u)
    why = [f"{heads} heads over sp={sp}"]
    if no_ring:
        why.append(f"ring=1 because {no_ring}")
    why.append(f"Ulysses {u} {'inside a node of ' + str(node) if node % u == 0 else 'spans nodes'} "
               f"(all-to-all on NVLink), heads per rank {split if len(set(split)) > 1 else split[0]}")
    if r > 1:
        why.append(f"ring {r} {'across nodes' if u * r > node else 'for the rest'} (P2P overlapped with compute)")
        if len(set(split)) == 1 and heads % sp and heads >= sp:
            why.append(f"ulysses={sp} would idle ranks (uneven {head_split(heads, sp)})")
    if seq_len is not None:
        why.append(f"{-(-int(seq_len) // sp)} tokens per rank")
    return DegreePlan(u, r, tuple(split), "; ".join(why))
