"""Rank bodies of the context-parallel tests (importable by the spawned gloo ranks)."""

from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext.config import from_dict
from megatron_ext.consa.attention import HybridCoreAttention
from megatron_ext.models.context_attention import context_parallel_attention
from megatron_ext.models.documents import document_starts
from megatron_ext.parallel import full_named_tensors, load_full_named_tensors, main_grad_or_grad
from megatron_ext.parallel.context import ContextParallel
from megatron_ext.run import RunConfig
from megatron_ext.run.builder import build_model
from megatron_ext.sgt.looped_layer import LoopedTransformerLayer
from megatron_ext.testing.callbacks import StartFrom
from megatron_ext.training.ddp import wrap_with_ddp
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from megatron_ext.training.step import gpt_forward_step
from tests.configs import TINY, merge

VOCAB = 128
CONFIG = merge(
    TINY,
    {
        "model": {"vocab_size": VOCAB, "qk_layernorm": True},
        "data": {"seq_length": 32},
        "train": {"steps": 4, "warmup_steps": 1, "lr": 1.0e-2, "adam_eps": 1.0e-5},
        "checkpoint": {"save_at_end": False},
    },
)


def zigzag(x: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    """This CP rank's chunks ``rank`` and ``2 size - 1 - rank`` of ``x`` along ``dim``."""
    chunks = x.chunk(2 * size, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]], dim=dim)


def attention_grads(q, k, v, grad_out, window, sink=0):
    """Output and q / k / v gradients of CP attention on this rank's chunks of the full tensors."""
    cp = ContextParallel(parallel_state.get_context_parallel_group())
    q, k, v, grad_out = (zigzag(x, 2, cp.size, cp.rank) for x in (q, k, v, grad_out))
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = context_parallel_attention(q, k, v, cp, window=window, sink=sink)
    out.backward(grad_out)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "bytes": dict(cp.received_bytes)}


def run_config(sections: dict) -> RunConfig:
    return from_dict(RunConfig, merge(CONFIG, sections))


def initial_weights(sections):
    return full_named_tensors(build_model(run_config(sections), cuda=False)[0])


def make_batch(index, micro_batch=2, seq=32, eod=None, mask_documents=True):
    """A micro-batch of random tokens; with ``eod`` each row packs documents of random lengths ending
    with that token, and (``mask_documents``) the batch carries their ``document_starts``."""
    g = torch.Generator().manual_seed(2000 + index)
    tokens = torch.randint(0, VOCAB, (micro_batch, seq + 1), generator=g)
    if eod is not None:
        tokens[tokens == eod] = eod + 1
        for row in range(micro_batch):  # 3 to 4 documents per row, boundaries anywhere
            tokens[row, torch.randperm(seq - 1, generator=g)[:3] + 1] = eod
    loss_mask = torch.ones(micro_batch, seq)
    loss_mask[0, : seq // 3] = 0.0  # unequal token counts on the CP ranks: the loss must weigh them right
    zeros = torch.zeros(micro_batch, seq, dtype=torch.long)
    batch = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(seq).expand(micro_batch, seq).contiguous(),
        "modality_ids": zeros,
        "label_modality_ids": zeros.clone(),
    }
    if eod is not None and mask_documents:
        batch["document_starts"] = document_starts(batch["tokens"], eod)
        batch["position_ids"] = torch.arange(seq) - batch["document_starts"]  # as data.reset_position_ids
    return batch


def set_structure(model, structure: dict) -> None:
    """Put every hybrid core attention and looped layer of ``model`` into the state ``structure`` names:
    ``{"gates": [[z per KV head] per layer]}`` (mask learning with fixed gates), ``{"allocation":
    [[full? per KV head] per layer]}`` (static hybrid), ``{"loop": (layer, depth, kept query heads)}``."""
    for module in model.modules():
        if isinstance(module, HybridCoreAttention):
            layer = module.layer_index
            if "gates" in structure:
                z = torch.tensor(structure["gates"][layer])
                module.set_gated(lambda training, z=z: z)
            if "allocation" in structure:
                module.set_static(structure["allocation"][layer])
        if isinstance(module, LoopedTransformerLayer) and "loop" in structure:
            layer, depth, kept = structure["loop"]
            if module.layer_index == layer:
                module.set_loop(depth)
                module.set_head_factors([1.0 if h in kept else 0.0 for h in range(module.num_heads)])


def model_gradients(sections, weights, structure, num_microbatches=2, entropy=False, eod=None, mask_documents=True):
    """Loss and full (unsharded, DDP-reduced) gradients of one forward / backward of the model of
    ``sections`` from ``weights`` in the given structure, on this data-parallel rank's micro-batches;
    with ``entropy``, also every looped layer's last-query entropy of the ordinary pass; with ``eod``,
    on packed documents, under document masking unless ``mask_documents`` is False."""
    cfg = run_config(sections)
    chunks = build_model(cfg, cuda=False)
    load_full_named_tensors(chunks[0], weights)
    for chunk in chunks:
        set_structure(chunk, structure)
    observed = {}
    if entropy:
        for module in chunks[0].modules():
            if isinstance(module, LoopedTransformerLayer):
                module.set_entropy_sink(
                    lambda first, last, layer=module.layer_index: observed.setdefault(layer, []).append(first)
                )
    model = wrap_with_ddp(chunks)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    indices = range(dp_rank * num_microbatches, (dp_rank + 1) * num_microbatches)
    losses = get_forward_backward_func()(
        forward_step_func=gpt_forward_step,
        data_iterator=iter([make_batch(i, eod=eod, mask_documents=mask_documents) for i in indices]),
        model=model,
        num_microbatches=num_microbatches,
        seq_length=cfg.data.seq_length,
        micro_batch_size=2,
        forward_only=False,
    )
    loss = torch.stack([d["lm loss"] for d in losses]).mean() if losses else torch.tensor(float("nan"))
    return {
        "loss": loss,
        "grads": full_named_tensors(model[0], main_grad_or_grad),
        "entropy": {layer: torch.stack(values) for layer, values in observed.items()},
        "dp_size": dp_size,
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
    }


def train_metrics(run_dir, sections, weights):
    """The training loop's metrics records, from ``weights``."""
    Trainer(run_config(sections), Path(run_dir), [StartFrom(weights)], log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def train_and_evaluate_config(run_dir, sections, context):
    """Train ``sections`` at ``parallel.context = context`` (the training loop, its own init) and return
    the last metrics record (with its validation loss)."""
    cfg = run_config({**sections, "parallel": {"context": context}})
    Trainer(cfg, Path(run_dir), log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")[-1]


def evaluate_at(run_dir, sections, context, batches):
    """Validation loss of the run's checkpoint at ``parallel.context = context``."""
    from megatron_ext.training.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(run_config({**sections, "parallel": {"context": context}}), Path(run_dir), batches)
