"""Per-GPU memory estimate of a layout: weights, gradients, optimizer state and activations.

Parameters come from the model built on the meta device (no memory), split the way Megatron
shards them:

- decoder layers go to pipeline stages in equal contiguous blocks (with ``virtual_pipeline`` v,
  chunk c of L/(PP*v) layers goes to stage c mod PP; the count per stage is the same);
- the word embedding lives on the first stage, the output layer and final norm on the last; with
  tied embeddings and PP > 1 the last stage holds its own copy of the embedding matrix;
- weights are divided by TP, except those Megatron replicates over TP (norms, the MoE router:
  the parameters Megatron marks with a ``sequence_parallel`` attribute, and position embeddings);
  routed-expert weights are divided by EP * ETP instead.

Bytes per parameter (Megatron mixed precision, as the training loop configures it):

    bf16:  weight 2 + gradient 4 (fp32 main_grad buffer) + optimizer 12 (fp32 master, Adam m, v)
    fp32:  weight 4 + gradient 4                          + optimizer  8 (Adam m, v)

With the distributed optimizer (GPU and DP > 1) the optimizer bytes are sharded over the
data-parallel ranks: DP * CP for dense parameters, the expert-data-parallel size for experts
(Megatron's "6 + 12/DP bytes per parameter").

Activations per transformer layer and micro-batch, in bytes, with 16-bit activations
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
Table 2; s = tokens per CP rank, b = micro-batch size, h = hidden size, a = attention heads,
t = TP size):

    no recompute, TP + sequence parallel:   s*b*h * (34 + 5*a*s/h) / t
    no recompute, TP without SP:            s*b*h * (10 + 24/t + 5*a*s/(h*t))
    selective (core attention recomputed):  the same without the 5*a*s/h term
    full (layer recomputed from its input): 2*s*b*h per layer (/ t with SP), plus one layer's
                                            activations as the working set of the recompute

The 34 assumes a GPT layer with a 4h MLP (GELU) and attention dropout; it is a standard
order-of-magnitude estimate, not an account of GQA, SwiGLU or MoE layers. The 5as/h term is the
attention score matrix (scores, softmax output, dropout mask), counted only where the chosen
attention stores it (:func:`stores_attention_scores`): Megatron's unfused ``DotProductAttention``
(``model.attention_backend: local``) does; SDPA (flash / memory-efficient kernels, the CPU's fused
kernel), Transformer Engine's fused attention and the hybrid layers' kernels (FlexAttention, the
window kernels) keep one log-sum-exp per row instead, so there "none" costs what "selective" does.
With the 1F1B schedule pipeline stage p keeps
min(PP - p, M) micro-batches in flight (M micro-batches per step), so the first stage holds a whole
model's layers worth; interleaving (v chunks) multiplies the first stage by 1 + (PP-1)/(PP*v).
The last stage adds the fp32 logits of the vocabulary-parallel cross entropy, 4*s*b*V/t bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Literal, Optional

import torch

if TYPE_CHECKING:
    from megatron_ext.run import RunConfig


Shard = Literal["tp", "replicated", "expert"]
"""How a parameter is split: over TP, not at all (replicated over TP), over EP * ETP."""

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
GIB = 1024**3


@dataclass
class ParamInventory:
    """Unsharded parameter counts, by where they live and how they are sharded."""

    num_layers: int
    layers: List[Dict[str, int]]
    """Per decoder layer: {shard: count}."""
    first_stage: Dict[str, int] = field(default_factory=dict)
    """Embeddings: {shard: count}."""
    last_stage: Dict[str, int] = field(default_factory=dict)
    """Final norm and untied output layer: {shard: count}."""
    tied_embedding: int = 0
    """Size of the word embedding when it is tied to the output layer (copied to the last stage
    when PP > 1), else 0."""

    @property
    def total(self) -> int:
        return (
            sum(sum(layer.values()) for layer in self.layers)
            + sum(self.first_stage.values())
            + sum(self.last_stage.values())
        )


def _shard_of(name: str, param: torch.nn.Parameter) -> Shard:
    if ".experts." in name:
        return "expert"
    if hasattr(param, "sequence_parallel") or "position_embeddings" in name:
        return "replicated"
    return "tp"


def parameter_inventory(cfg: RunConfig) -> ParamInventory:
    """Build the unsharded model on the meta device and sort its parameters.

    Needs Megatron's parallel state at TP = PP = EP = 1 (as ``count_parameters``).
    """
    from megatron_ext.run.builder import build_on_meta

    model = build_on_meta(cfg)
    inventory = ParamInventory(num_layers=cfg.model.num_layers, layers=[{} for _ in range(cfg.model.num_layers)])
    for name, param in model.named_parameters():
        shard = _shard_of(name, param)
        match = _LAYER.match(name)
        if match:
            bucket = inventory.layers[int(match.group(1))]
        elif name.startswith("embedding."):
            bucket = inventory.first_stage
            if "word_embeddings" in name and cfg.model.tie_embeddings:
                inventory.tied_embedding = param.numel()
        else:
            bucket = inventory.last_stage
        bucket[shard] = bucket.get(shard, 0) + param.numel()
    return inventory


@dataclass(frozen=True)
class StageMemory:
    """Estimated bytes on one GPU of pipeline stage ``stage``."""

    stage: int
    params: int
    """Parameters held by one rank of this stage."""
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def bytes_per_parameter(cfg: RunConfig, cuda: bool) -> tuple:
    """(weight, gradient, optimizer) bytes per parameter before any optimizer sharding."""
    from megatron_ext.run.builder import params_dtype

    if params_dtype(cfg, cuda) == torch.bfloat16:
        return 2, 4, 12
    return 4, 4, 8


def stores_attention_scores(cfg: RunConfig) -> bool:
    """Whether the model's core attention keeps the ``s x s`` score matrix for backward: only
    Megatron's unfused attention (``model.attention_backend: local``) in layers of plain attention;
    hybrid layers (``hybrid_attention``) and the TE backend build their own fused core attention."""
    hybrid = any(capability.name == "hybrid_attention" for capability in cfg.capabilities)
    return cfg.model.attention_backend == "local" and cfg.model.backend != "te" and not hybrid


def layer_activation_bytes(cfg: RunConfig, recompute: Optional[str] = None) -> float:
    """Activation bytes of one transformer layer for one micro-batch on one rank (formulas above)."""
    m, p = cfg.model, cfg.parallel
    recompute = recompute or cfg.train.recompute
    s = cfg.data.seq_length / p.context
    b, h, a, t = cfg.train.micro_batch_size, m.hidden_size, m.num_attention_heads, p.tensor
    sp = p.sequence_parallel and t > 1
    sbh = s * b * h
    scores = 5 * a * s / h

    def stored(with_scores: bool) -> float:
        extra = scores if with_scores else 0.0
        if sp or t == 1:
            return sbh * (34 + extra) / t
        return sbh * (10 + 24 / t + extra / t)

    if recompute == "none":
        return stored(with_scores=stores_attention_scores(cfg))
    if recompute == "selective":
        return stored(with_scores=False)
    return 2 * sbh / (t if sp else 1)


def estimate_memory(cfg: RunConfig, inventory: ParamInventory, world: int, *, cuda: bool = True) -> List[StageMemory]:
    """Per-GPU memory of each pipeline stage for ``cfg`` on ``world`` ranks."""
    from megatron_ext.models.vocab import padded_vocab_size

    p, t = cfg.parallel, cfg.train
    tp, pp, cp, ep = p.tensor, p.pipeline, p.context, p.expert
    etp = p.expert_tensor or tp
    dp = world // (tp * pp * cp)
    edp = world // (etp * ep * pp)
    distributed_optimizer = cuda and dp > 1  # as the training loop's optimizer config
    weight_b, grad_b, optim_b = bytes_per_parameter(cfg, cuda)
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    per_stage = cfg.model.num_layers // pp
    vpp = p.virtual_pipeline or 1
    chunk = per_stage // vpp

    stages = []
    for stage in range(pp):
        layers = [i for i in range(cfg.model.num_layers) if (i // chunk) % pp == stage]
        counts: Dict[str, float] = {"tp": 0, "replicated": 0, "expert": 0}
        for i in layers:
            for shard, n in inventory.layers[i].items():
                counts[shard] += n
        if stage == 0:
            for shard, n in inventory.first_stage.items():
                counts[shard] += n
        if stage == pp - 1:
            for shard, n in inventory.last_stage.items():
                counts[shard] += n
            if pp > 1:
                counts["tp"] += inventory.tied_embedding
        dense = counts["tp"] / tp + counts["replicated"]
        expert = counts["expert"] / (ep * etp)
        if distributed_optimizer:
            optimizer = optim_b * (dense / (dp * cp) + expert / edp)
        else:
            optimizer = optim_b * (dense + expert)

        in_flight = min(pp - stage, num_micro) if pp > 1 else 1
        activations = layer_activation_bytes(cfg) * per_stage * in_flight
        if cfg.train.recompute == "full":
            activations += layer_activation_bytes(cfg, "none")  # one layer recomputed at a time
        if stage == 0 and vpp > 1:
            activations *= 1 + (pp - 1) / (pp * vpp)
        if stage == pp - 1:
            s, b = cfg.data.seq_length / cp, t.micro_batch_size
            activations += 4 * s * b * padded_vocab_size(cfg.model.vocab_size) / tp
        params = dense + expert
        stages.append(
            StageMemory(
                stage=stage,
                params=int(params),
                weights=weight_b * params,
                gradients=grad_b * params,
                optimizer=optimizer,
                activations=activations,
            )
        )
    return stages


def meta_parameter_inventory(cfg: RunConfig) -> ParamInventory:
    """:func:`parameter_inventory` in a private one-rank gloo world (an in-memory store, no network),
    so that it runs anywhere, including inside a SLURM or torchrun environment."""
    import torch.distributed as dist

    from megatron_ext.compat import enable_cpu_support
    from megatron_ext.parallel import ParallelSizes, destroy_parallel_state, initialize_parallel_state

    if dist.is_initialized():
        raise RuntimeError(
            "meta_parameter_inventory creates its own one-rank process group; "
            "call parameter_inventory inside an existing parallel state instead"
        )
    enable_cpu_support()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        initialize_parallel_state(ParallelSizes())
        try:
            return parameter_inventory(cfg)
        finally:
            destroy_parallel_state()
    finally:
        dist.destroy_process_group()
