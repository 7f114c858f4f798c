"""Multi-token prediction as a :class:`~megatron_ext.capability.Capability`: Megatron-Core's MTP
block (DeepSeek-V3, arXiv 2412.19437; ERNIE 5.0's next-group-of-tokens objective [paper]) on the
last pipeline stage, ``model.mtp_num_layers`` layers, layer k predicting the token k + 1 ahead.

Model: ``GPTModel(mtp_block_spec=...)``; [choice] an MTP layer is a plain decoder layer of the core
spec (full attention, dense MLP of ``model.ffn_hidden_size``): the capabilities' per-layer state
(a hybrid allocation, expert routers, loops) is indexed by the decoder's layers and does not
extend to it. Loss: Megatron adds ``mtp_weight / mtp_num_layers * sum_k L_k`` to the gradient
(``MTPLossAutoScaler``); the logged ``loss`` stays the next-token loss of the decoder, and
``mtp/loss_<k>`` the MTP layers' losses (means over the step's tokens). Training:
:class:`MTPCallback` sets the weight of each step (``train.mtp_weight`` -> ``mtp_weight_final``).
"""

from __future__ import annotations

from typing import Any, Dict, List

from megatron_ext.capability import Capability


class MultiTokenPrediction(Capability):
    name = "mtp"
    sections = {}

    def enabled(self, cfg) -> bool:
        return cfg.model.mtp_num_layers is not None

    def check(self, cfg, *, world_size: int, data_parallel: int, cuda: bool) -> List[str]:
        if cfg.model.mtp_num_layers is None:
            return []
        problems = []
        if cfg.parallel.virtual_pipeline is not None:
            problems.append(
                "model.mtp_num_layers with parallel.virtual_pipeline: MTP is supported on a plain "
                "pipeline (its block on the last stage); set virtual_pipeline: null"
            )
        if cfg.model.position_embedding != "rope":
            problems.append("model.mtp_num_layers needs model.position_embedding: rope")
        return problems

    def transformer_config(self, cfg) -> Dict[str, Any]:
        return dict(mtp_num_layers=cfg.model.mtp_num_layers, mtp_loss_scaling_factor=cfg.train.mtp_weight)

    def gpt_model_kwargs(self, cfg, config, core_spec, vp_stage, backend: str) -> Dict[str, Any]:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec_for_backend

        from megatron_ext.models.layer_spec import spec_provider

        provider = spec_provider(backend)
        return {"mtp_block_spec": get_gpt_mtp_block_spec_for_backend(config, core_spec, provider, vp_stage=vp_stage)}

    def callback(self, cfg, log, consumed_tokens):
        from megatron_ext.mtp.callback import MTPCallback

        return MTPCallback(cfg.model.mtp_num_layers, cfg.train.mtp_weight, cfg.train.mtp_weight_final, cfg.train.steps)

    def hf_unexported(self, cfg):
        # A training aid: the HF classes predict the next token only (DeepSeek-V3's HF model, too,
        # ignores its MTP layer); an imported model's MTP layers start from their initialisation.
        return ("mtp.",)
