"""Whether parallel sizes fit a world: the one check the config, the launch planner and the parallel
state share (pure arithmetic; no torch)."""

from __future__ import annotations

from typing import List, Optional, Tuple


def layout_problems(
    world_size: int,
    *,
    tensor: int,
    pipeline: int,
    context: int = 1,
    expert: int = 1,
    expert_tensor: Optional[int] = None,
) -> Tuple[int, List[str]]:
    """``(data-parallel size, problems)`` of ``world_size`` ranks split as Megatron does: dense ranks
    as TP x CP x DP x PP, expert ranks as ETP x EP x EDP x PP, EP x ETP carved out of one pipeline
    stage's DP x CP x TP ranks (``expert_tensor`` None: equal to ``tensor``). The data-parallel
    size is 0 when the dense sizes do not fit; problems name the ``parallel`` fields."""
    problems = []
    model_parallel = tensor * pipeline * context
    if world_size % model_parallel:
        problems.append(
            f"world size {world_size} is not divisible by parallel.tensor * parallel.pipeline * "
            f"parallel.context = {tensor}*{pipeline}*{context} = {model_parallel}: the world size must equal "
            "TP*PP*CP*DP; change the parallel sizes or the number of processes"
        )
        return 0, problems
    dp = world_size // model_parallel
    expert_tp = tensor if expert_tensor is None else expert_tensor
    if (dp * context * tensor) % (expert * expert_tp):
        problems.append(
            f"parallel.expert={expert} x expert_tensor={expert_tp} must divide data-parallel x context x tensor "
            f"= {dp}*{context}*{tensor} (Megatron carves expert parallelism out of the ranks of one pipeline "
            "stage)"
        )
    return dp, problems
