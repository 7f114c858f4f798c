"""Elastic ultra-sparse MoE (ERNIE 5.0, arXiv 2602.04705) as a :class:`~megatron_ext.capability.Capability`.

Config: the ``moe``, ``routing`` and ``elastic`` sections. Model: Megatron's ``MoELayer`` (alltoall
dispatcher) in the layers of ``moe.layer_pattern`` / after ``moe.first_k_dense``, with our router
(:mod:`megatron_ext.moe.router`). Training: :class:`MoECallback` (elastic sub-networks, expert bias,
load statistics); the forward step hands each micro-batch's modality ids to the routers (the
modality-isolated baseline routes by them, every router counts load by them). Sub-models: the kept
experts of every kept MoE layer (weights, router rows, expert-bias entries), renumbered, and the new
top-k.

Modules that import torch or Megatron are imported inside the hooks, so that the run config stays
light to load.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from megatron_ext.capability import Capability
from megatron_ext.moe.config import ElasticConfig, MoEConfig, RoutingConfig

_EXPERT = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)\.(.*)$")
_PER_EXPERT_ROWS = ("mlp.router.weight", "mlp.router.bias", "mlp.router.expert_bias")


class MixtureOfExperts(Capability):
    name = "moe"
    sections = {"moe": MoEConfig, "routing": RoutingConfig, "elastic": ElasticConfig}
    stage_fields = {  # read by MoECallback.on_step_begin from the stage's config at every step
        "routing": ("bias_update_rate", "bias_update_rate_schedule"),
        "elastic": ("depth_full_prob", "width_full_prob", "topk_default_prob"),
    }

    def enabled(self, cfg) -> bool:
        return cfg.moe.enabled

    def check(self, cfg, *, world_size: int, data_parallel: int, cuda: bool) -> List[str]:
        m, p, t, moe, e = cfg.model, cfg.parallel, cfg.train, cfg.moe, cfg.elastic
        problems = self._stage_problems(cfg)
        if not moe.enabled:
            if p.expert > 1:
                problems.append(f"parallel.expert={p.expert} needs moe.enabled: true")
            if e.enabled:
                problems.append("elastic.enabled needs moe.enabled: true (elastic training samples MoE sub-networks)")
            return problems
        if moe.num_experts % p.expert:
            problems.append(f"moe.num_experts={moe.num_experts} is not divisible by parallel.expert={p.expert}")
        if t.precision == "fp8":
            from megatron_ext.models.backend import fp8_size_problems

            problems.extend(
                fp8_size_problems(
                    {
                        "moe.expert_ffn_hidden_size": moe.expert_ffn_hidden_size,
                        "moe.shared_expert_ffn_hidden_size": moe.shared_expert_ffn_hidden_size,
                    }
                )
            )
        expert_tp = p.expert_tensor or p.tensor
        if not cuda and p.expert > 1 and expert_tp > 1:
            problems.append(
                f"parallel.expert={p.expert} with expert tensor parallelism {expert_tp} "
                "(parallel.expert_tensor, default parallel.tensor) fails on gloo: Megatron's "
                "variable-size all-gather of the expert-TP group needs NCCL; on CPU set "
                "parallel.expert_tensor: 1"
            )
        if moe.score_function == "softmax" and moe.top_k == 1 and not moe.router_pre_softmax:
            problems.append(
                "moe.top_k=1 with moe.score_function='softmax' needs moe.router_pre_softmax: true (a "
                "softmax over the one selected score is 1 and trains no router), or use 'sigmoid'"
            )
        if p.tensor > 1 and not p.sequence_parallel:
            problems.append(
                "parallel.sequence_parallel must be true for MoE with parallel.tensor > 1 (Megatron requires it)"
            )
        pattern = moe.layer_pattern_for(m.num_layers)
        if len(pattern) != m.num_layers:
            problems.append(f"moe.layer_pattern has {len(pattern)} entries for model.num_layers={m.num_layers}")
        elif not any(pattern):
            problems.append("moe.enabled is true but no layer is an MoE layer (moe.first_k_dense / layer_pattern)")
        problems.extend(cfg.routing.problems_with_model(moe.num_experts, moe.top_k, moe.score_function))
        if e.enabled:
            problems.extend(e.problems_with_model(m.num_layers, moe.num_experts, moe.top_k))
        if cfg.routing.mode == "modality_isolated" and (e.enabled and e.width_full_prob < 1 or t.recompute == "full"):
            problems.append(
                "routing.mode='modality_isolated' cannot be combined with elastic width or train.recompute='full'"
            )
        return problems

    @staticmethod
    def _stage_problems(cfg) -> List[str]:
        """Stage overrides of the routing and elastic sections that the run would not act on."""
        problems = []
        for i, stage in enumerate(cfg.stages):
            routing, elastic = stage.overrides()["routing"], stage.overrides()["elastic"]
            if routing and not (cfg.moe.enabled and cfg.routing.expert_bias):
                problems.append(
                    f"stages[{i}].routing sets {', '.join(sorted(routing))}, but the run has no expert bias to "
                    "update: set moe.enabled and routing.expert_bias true, or remove the override"
                )
            if elastic and not cfg.elastic.enabled:
                problems.append(
                    f"stages[{i}].elastic sets {', '.join(sorted(elastic))}, but elastic.enabled is false: the "
                    "run samples no sub-networks (enable it for the run; a stage sets the probabilities to 1 "
                    "to train the full network only)"
                )
            if cfg.routing.mode == "modality_isolated" and elastic.get("width_full_prob", 1.0) < 1:
                problems.append(
                    f"stages[{i}].elastic.width_full_prob={elastic['width_full_prob']}: routing.mode="
                    "'modality_isolated' cannot be combined with elastic width"
                )
        return problems

    def transformer_config(self, cfg) -> Dict[str, Any]:
        moe = cfg.moe
        return dict(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
            moe_layer_freq=moe.layer_pattern_for(cfg.model.num_layers),
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type=moe.load_balancing,
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_z_loss_coeff=moe.z_loss_coeff,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_router_score_function=moe.score_function,
            moe_router_pre_softmax=moe.router_pre_softmax,
            moe_router_dtype="fp32",
            moe_router_enable_expert_bias=cfg.routing.expert_bias,
            moe_router_bias_update_rate=cfg.routing.bias_update_rate,
            # The TE backend runs the experts as grouped GEMMs (TEGroupedMLP).
            moe_grouped_gemm=cfg.model.backend == "te",
        )

    def routed_experts(self, cfg) -> Optional[int]:
        return cfg.moe.num_experts

    def active_share(self, cfg, name: str) -> Optional[Fraction]:
        return Fraction(cfg.moe.top_k, cfg.moe.num_experts) if ".experts." in name else None

    def layer_specs(self, cfg, specs: list, backend: str) -> list:
        from megatron_ext.models.layer_spec import map_specs, mlp_spec, replace_mlp
        from megatron_ext.moe.router import with_router

        mlp = with_router(mlp_spec(num_experts=cfg.moe.num_experts, backend=backend), cfg.routing)
        as_moe = map_specs(specs, lambda spec: replace_mlp(spec, mlp, backend))
        pattern = cfg.moe.layer_pattern_for(cfg.model.num_layers)
        return [moe_spec if is_moe else spec for spec, moe_spec, is_moe in zip(specs, as_moe, pattern)]

    def callback(self, cfg, log, consumed_tokens):
        from megatron_ext.moe.callback import MoECallback

        moe = cfg.moe
        aux = {"aux_loss": ["load_balancing_loss"], "seq_aux_loss": ["seq_load_balancing_loss"]}.get(
            moe.load_balancing, []
        )
        aux += ["z_loss"] if moe.z_loss_coeff else []
        return MoECallback(
            cfg.elastic,
            cfg.routing,
            cfg.model.num_layers,
            moe.num_experts,
            moe.top_k,
            seed=cfg.train.seed,
            capacity_factor=moe.capacity_factor,
            aux_losses=aux,
        )

    def batch_hook(self, cfg):
        from megatron_ext.moe.router import set_modality_ids

        return lambda model_chunk, batch: set_modality_ids(model_chunk, batch["modality_ids"])

    # -- sub-models: the kept experts, renumbered in order, and the new top-k ---------------------------
    def check_submodel(self, cfg, sub) -> List[str]:
        if not cfg.moe.enabled:
            if sub.experts is not None or sub.top_k is not None:
                return [
                    "the model has no MoE layers (moe.enabled is false): kept experts and a top-k need an MoE model"
                ]
            return []
        e = cfg.moe.num_experts
        experts = list(sub.experts) if sub.experts is not None else list(range(e))
        if any(not 0 <= x < e for x in experts) or experts != sorted(set(experts)):
            return [f"experts {experts} must be distinct, ascending indices in [0, {e})"]
        if cfg.routing.mode == "modality_isolated":
            # The sub-model's partitions are again equal and contiguous: each must keep as many experts.
            modalities = cfg.routing.partition_modalities
            size = e // len(modalities)
            kept = {m: sum(1 for x in experts if x // size == i) for i, m in enumerate(modalities)}
            if len(set(kept.values())) > 1:
                return [
                    f"experts {experts} keep {kept} experts of the modality partitions (routing.mode="
                    f"'modality_isolated', {size} each): keep the same number of every partition, or "
                    "experts would change modality"
                ]
        top_k = cfg.moe.top_k if sub.top_k is None else sub.top_k
        if not 1 <= top_k <= len(experts):
            return [f"top-k {top_k} must be in [1, {len(experts)}] (the kept experts)"]
        return []

    def apply_subnetwork(self, cfg, model_chunks, sub) -> bool:
        from megatron_ext.moe import elastic

        elastic.apply(model_chunks, sub)  # what elastic training ran: skipped layers, expert subset, top-k
        return True

    def submodel_config(self, cfg, small, sub, output: Path) -> None:
        pattern = cfg.moe.layer_pattern_for(cfg.model.num_layers)
        small.moe.layer_pattern = [pattern[i] for i in sub.layers]
        if sub.experts is not None:
            small.moe.num_experts = len(sub.experts)
        if sub.top_k is not None:
            small.moe.top_k = sub.top_k
        small.elastic.enabled = False  # a standalone sub-model: no sub-networks of its own

    def submodel_tensor(self, cfg, name: str, tensor, sub):
        num_experts = cfg.moe.num_experts
        experts = list(sub.experts) if sub.experts is not None else list(range(num_experts))
        expert = _EXPERT.match(name)
        if expert is not None:
            if int(expert.group(2)) not in experts:
                return None
            return f"{expert.group(1)}{experts.index(int(expert.group(2)))}.{expert.group(3)}", tensor
        if name in _PER_EXPERT_ROWS and tensor is not None and tensor.shape[0] == num_experts:
            return name, tensor[experts].clone()
        return name, tensor

    # -- HF interop: softmax routing as Qwen3-MoE, sigmoid + expert bias + shared experts as dots1 ----------
    def hf_config(self, cfg, callback, hf: Dict[str, Any]) -> List[str]:
        moe, routing, layers = cfg.moe, cfg.routing, cfg.model.num_layers
        if not moe.enabled:
            return []
        problems = []
        if hf["model_type"] == "llama":
            problems.append(
                "moe.enabled=true: the HF MoE classes (Qwen3-MoE, dots1) have QK-norm; the model has "
                "model.qk_layernorm=false"
            )
        if routing.mode != "agnostic":
            problems.append(
                f"routing.mode={routing.mode!r}: HF MoE classes route every token over all experts "
                "(no modality partitions)"
            )
        if moe.capacity_factor is not None:
            problems.append(
                f"moe.capacity_factor={moe.capacity_factor}: HF MoE classes never drop tokens, so the "
                "exported model would not compute what was trained; export a dropless model"
            )
        pattern = moe.layer_pattern_for(layers)
        common = dict(
            num_experts_per_tok=moe.top_k,
            moe_intermediate_size=moe.expert_ffn_hidden_size,
            output_router_logits=False,
            router_aux_loss_coef=moe.aux_loss_coeff,
        )
        if moe.score_function == "softmax":
            if moe.shared_expert_ffn_hidden_size:
                problems.append(
                    f"moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size} with "
                    "moe.score_function='softmax': Qwen3-MoE has no shared expert and dots1 routes by "
                    "sigmoid; no HF class matches"
                )
            # top-k of the logits, softmax over the k = softmax over all, top-k, renormalised.
            hf.update(
                model_type="qwen3_moe",
                architectures=["Qwen3MoeForCausalLM"],
                num_experts=moe.num_experts,
                norm_topk_prob=not moe.router_pre_softmax,
                decoder_sparse_step=1,
                mlp_only_layers=[i for i, p in enumerate(pattern) if not p],
                **common,
            )
            return problems
        shared = moe.shared_expert_ffn_hidden_size or 0
        if shared % moe.expert_ffn_hidden_size:
            problems.append(
                f"moe.shared_expert_ffn_hidden_size={shared} is not a multiple of "
                f"moe.expert_ffn_hidden_size={moe.expert_ffn_hidden_size}: dots1 has n_shared_experts "
                "experts of moe_intermediate_size each"
            )
        dense = pattern.index(1) if 1 in pattern else layers
        if pattern != [0] * dense + [1] * (layers - dense):
            problems.append(
                f"moe.layer_pattern={pattern}: dots1 keeps dense MLPs in its first layers only (first_k_dense_replace)"
            )
        hf.update(
            model_type="dots1",
            architectures=["Dots1ForCausalLM"],
            n_routed_experts=moe.num_experts,
            n_shared_experts=shared // moe.expert_ffn_hidden_size,
            first_k_dense_replace=dense,
            # Megatron-Core normalises the k gates for k > 1; at k = 1 as routing.normalize_top1 says.
            norm_topk_prob=True if moe.top_k > 1 else routing.normalize_top1,
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            **common,
        )
        return problems

    def hf_sections(self, hf: Mapping[str, Any], output: Path, problems: List[str]) -> Dict[str, Dict[str, Any]]:
        from megatron_ext.hf.config import base_model_type

        base, layers = base_model_type(hf), hf["num_hidden_layers"]
        if base == "qwen3_moe":
            step, dense_only = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or [])
            experts = hf.get("num_experts", hf.get("num_local_experts", 0))  # transformers 4 / 5 spelling
            pattern = [int(i not in dense_only and experts > 0 and (i + 1) % step == 0) for i in range(layers)]
            if not any(pattern):
                return {"moe": {"enabled": False}}
            return {
                "moe": {
                    "enabled": True,
                    "num_experts": experts,
                    "top_k": hf["num_experts_per_tok"],
                    "expert_ffn_hidden_size": hf["moe_intermediate_size"],
                    "shared_expert_ffn_hidden_size": None,
                    "layer_pattern": pattern,
                    "capacity_factor": None,
                    "score_function": "softmax",
                    "router_pre_softmax": not hf.get("norm_topk_prob", False),
                },
                "routing": {"mode": "agnostic", "expert_bias": False},
            }
        if base != "dots1":
            return {"moe": {"enabled": False}}
        for name in ("n_group", "topk_group"):
            if (hf.get(name) or 1) != 1:
                problems.append(f"{name}={hf[name]}: group-limited routing is not supported (use 1)")
        if float(hf.get("routed_scaling_factor", 1.0)) != 1.0:
            problems.append(
                f"routed_scaling_factor={hf['routed_scaling_factor']}: only 1.0 maps (the gates are the "
                "normalised sigmoid scores)"
            )
        top_k, normalize = hf["num_experts_per_tok"], bool(hf.get("norm_topk_prob", False))
        if top_k > 1 and not normalize:
            problems.append(
                f"norm_topk_prob=false with num_experts_per_tok={top_k}: Megatron-Core normalises the "
                "sigmoid gates of k > 1 experts"
            )
        shared = (hf.get("n_shared_experts") or 0) * hf["moe_intermediate_size"]
        return {
            "moe": {
                "enabled": True,
                "num_experts": hf["n_routed_experts"],
                "top_k": top_k,
                "expert_ffn_hidden_size": hf["moe_intermediate_size"],
                "shared_expert_ffn_hidden_size": shared or None,
                "layer_pattern": None,
                "first_k_dense": hf.get("first_k_dense_replace") or 0,
                "capacity_factor": None,
                "score_function": "sigmoid",
            },
            "routing": {"mode": "agnostic", "expert_bias": True, "normalize_top1": normalize},
        }

    def hf_layer_rules(self, cfg, layer: int):
        from megatron_ext.hf.rules import constant, same, swiglu_mlp

        moe = cfg.moe
        if not moe.layer_pattern_for(cfg.model.num_layers)[layer]:
            return None
        ours, hf = f"decoder.layers.{layer}.mlp.", f"model.layers.{layer}.mlp."
        rules = [same(f"{ours}router.weight", f"{hf}gate.weight")]
        if cfg.routing.expert_bias:
            rules.append(same(f"{ours}router.expert_bias", f"{hf}gate.e_score_correction_bias"))
        elif moe.score_function == "sigmoid":  # dots1 has the bias buffer: zeros are no bias
            rules.append(constant(f"{hf}gate.e_score_correction_bias", [moe.num_experts]))
        for e in range(moe.num_experts):
            rules += swiglu_mlp(f"{ours}experts.local_experts.{e}.", f"{hf}experts.{e}.", moe.expert_ffn_hidden_size)
        if moe.shared_expert_ffn_hidden_size:
            rules += swiglu_mlp(f"{ours}shared_experts.", f"{hf}shared_experts.", moe.shared_expert_ffn_hidden_size)
        return rules
