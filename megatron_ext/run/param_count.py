"""Parameter counts of a config, from a model built on the meta device (no memory, no init).

total         every parameter of the unsharded model
embedding     input embedding, plus the output layer when it is not tied
non_embedding total - embedding
active        parameters a token passes through: a parameter that an enabled capability makes
              conditional counts its share of tokens (routed experts: top_k / num_experts;
              everything else counts fully)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from megatron_ext.run.builder import build_on_meta

if TYPE_CHECKING:
    from megatron_ext.run.config import RunConfig


@dataclass
class ParamReport:
    total: int
    embedding: int
    non_embedding: int
    routed_experts: int
    active: int
    active_non_embedding: int

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        def b(n: int) -> str:
            return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"

        return (
            f"total {b(self.total)} | embedding {b(self.embedding)} | non-embedding "
            f"{b(self.non_embedding)} | routed experts {b(self.routed_experts)} | active/token "
            f"{b(self.active)} (non-embedding {b(self.active_non_embedding)})"
        )


def count_parameters(cfg: RunConfig) -> ParamReport:
    """Counts for the whole model; needs Megatron's parallel state at TP = PP = EP = 1."""
    from megatron.core import parallel_state

    if (
        parallel_state.get_tensor_model_parallel_world_size() != 1
        or parallel_state.get_pipeline_model_parallel_world_size() != 1
        or parallel_state.get_expert_model_parallel_world_size() != 1
    ):
        raise RuntimeError("count_parameters needs an unsharded parallel state (TP = PP = EP = 1)")
    model = build_on_meta(cfg)
    total = embedding = routed = 0
    active_routed = Fraction(0)
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if "embedding.word_embeddings" in name or name.startswith("output_layer."):
            embedding += n
        share = next((s for c in cfg.capabilities if (s := c.active_share(cfg, name)) is not None), None)
        if share is not None:
            routed += n
            active_routed += n * share
    active = total - routed + math.floor(active_routed)
    return ParamReport(
        total=total,
        embedding=embedding,
        non_embedding=total - embedding,
        routed_experts=routed,
        active=active,
        active_non_embedding=active - embedding,
    )
