"""The degree planner and the degree errors: valid (ulysses, ring) choices and errors that name the fix."""

import pytest
import torch
from distributed_utils import run_distributed

from diffusers_dist_attn import init_sequence_parallel
from diffusers_dist_attn.attention.backends import lse_capable
from diffusers_dist_attn.distributed import plan_degrees


def test_degree_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"ulysses=2 x ring=2 = 4 must equal the sequence-parallel degree sp=1"):
        init_sequence_parallel(1, ulysses=2, ring=2)
    with pytest.raises(ValueError, match=r"ring=3 must be a positive divisor.*plan_degrees"):
        init_sequence_parallel(ring=3)
    with pytest.raises(ValueError, match="must multiply to the sequence-parallel degree 8"):
        plan_degrees(12, 8, ulysses=4, ring=4)
    with pytest.raises(ValueError, match="returns no log-sum-exp.*ring=1"):
        plan_degrees(12, 8, ring=2, can_ring=lse_capable("flash_attn_3"))
    assert lse_capable("auto") and lse_capable("sdpa_math") and not lse_capable("flash_attn_3")
    with pytest.raises(ValueError, match="video sparse attention.*ring=1"):
        plan_degrees(12, 8, ring=2, full_heads=True)
    with pytest.raises(ValueError, match="must be positive degrees"):
        plan_degrees(8, 8, ring=0)
    with pytest.raises(ValueError, match="without a ring"):
        plan_degrees(4, 8, full_heads=True)


@pytest.mark.parametrize(
    "args,expected",
    [
        ((12, 8, 8), (4, 2)),  # Wan 1.3B on 8 GPUs: even Ulysses 4 + ring 2 beats uneven Ulysses 8
        ((40, 8, 8), (8, 1)),  # Wan 14B: Ulysses only
        ((24, 16, 8), (8, 2)),  # HunyuanVideo on 2 nodes: Ulysses in the node, ring across
        ((4, 8, 8), (4, 2)),  # fewer heads than ranks: ring for the rest
        ((12, 16, 4), (4, 4)),  # 4 GPUs per node: Ulysses never crosses a node
    ],
)
def test_planner_choices(args, expected):
    plan = plan_degrees(*args, seq_len=32760)
    assert (plan.ulysses, plan.ring) == expected and plan.sp == args[1] and plan.reason


def test_planner_without_ring_splits_heads_unevenly():
    plan = plan_degrees(12, 8, 8, full_heads=True)
    assert (plan.ulysses, plan.ring, plan.head_split, plan.even) == (8, 1, (2, 2, 2, 2, 1, 1, 1, 1), False)
    assert "video sparse attention" in plan.reason


def _parallelize_plans_degrees(rank, world, attention):
    """A launched job without groups yet: `parallelize` lays out ulysses x ring with the planner."""
    import os

    from test_wan_parallel import _forward, build_case

    from diffusers_dist_attn.distributed import set_sequence_parallel_groups
    from diffusers_dist_attn.models import parallelize

    set_sequence_parallel_groups(None)  # back to "launched, nothing set up yet"
    os.environ["LOCAL_WORLD_SIZE"] = "2"  # pretend 2 GPUs per node: Ulysses stays inside it
    model, inputs = build_case("t2v")  # 4 heads
    with torch.no_grad():
        reference = _forward(model, inputs)
        with parallelize(model, attention=attention) as handle:
            result = _forward(model, inputs)
            layout = (handle.groups.ulysses_size, handle.groups.ring_size)
    return layout, float((result - reference).abs().max())


def test_parallelize_uses_the_planner_in_a_launched_job():
    for layout, err in run_distributed(4, _parallelize_plans_degrees, "dense"):
        assert layout == (2, 2) and err <= 1e-5  # Ulysses in the node, ring across
    for layout, err in run_distributed(4, _parallelize_plans_degrees, "vsa"):
        assert layout == (4, 1) and err <= 1e-5  # VSA needs whole heads: pure Ulysses (sparsity 0, zero gates)


def _explicit_ulysses_that_does_not_divide(rank, world):
    from test_wan_parallel import build_case

    from diffusers_dist_attn.models import parallelize

    model, _ = build_case("t2v")
    try:
        parallelize(model, attention="dense", ulysses=3)
    except ValueError as exc:
        return str(exc)
    return None


def test_explicit_degrees_are_checked_not_ignored():
    for message in run_distributed(4, _explicit_ulysses_that_does_not_divide):
        assert message is not None and "ulysses=3" in message
