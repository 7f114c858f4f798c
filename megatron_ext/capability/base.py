"""The Capability seam: one registered object per method of the stack.

A capability (hybrid attention, MoE / elastic training, looping, ...) is everything one method
adds to the generic stack, in one object, so that the loop, the step, the model builder,
evaluation and extraction iterate over the enabled capabilities and never name a method:

==========================  ==================================================================
config                       :attr:`Capability.sections`: the YAML sections it owns (dataclasses
                             validated on construction) and :meth:`check`, the problems that need
                             other sections or the launch, reported before any work starts
model                        :meth:`transformer_config`: ``TransformerConfig`` keywords;
                             :meth:`layer_specs`: a transform of the per-layer ``ModuleSpec`` list
training                     :meth:`callback`: its per-step logic (and checkpointed state);
                             :meth:`batch_hook`: what it must hand the model before each
                             micro-batch's forward (if anything)
sub-models                   :meth:`check_submodel`, :meth:`submodel_config`,
                             :meth:`submodel_tensor`, :meth:`submodel_state`: what it contributes
                             to a model extracted from a checkpoint (``megatron_ext.training.extract``)
HF interop                   :meth:`hf_config` (export: its fields of ``config.json``, or why it
                             cannot be represented), :meth:`hf_sections` (import: its config
                             sections from a ``config.json``), :meth:`hf_layer_rules` (the weight
                             mapping of the layer parts it owns; ``megatron_ext.hf``)
==========================  ==================================================================

A new method is one package with its modules and a ``Capability`` subclass, and one line in
``megatron_ext/run/registry.py``. The shape follows torchtitan's model converters (an object per
transform, applied in registry order after the config is read) and Megatron-Core's ``ModuleSpec``
(a method enters the model by rewriting specs, not by subclassing the model).
"""

from __future__ import annotations

import abc
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from megatron_ext.capability.callbacks import Callback

BatchHook = Callable[[Any, Dict[str, Any]], None]
"""``hook(model_chunk, batch)``: called in the forward step before each micro-batch's forward."""


class Capability(abc.ABC):
    """One method of the stack. Subclasses set :attr:`name` and :attr:`sections` and override what
    they need; every hook has a neutral default."""

    name: str = ""
    """Registry key; also the prefix of its metrics and the key of its callback's checkpoint state."""
    sections: Mapping[str, type] = {}
    """``{yaml section: dataclass}`` this capability owns; the run config gets one field each."""
    stage_fields: Mapping[str, Tuple[str, ...]] = {}
    """``{section: fields}`` of its sections that a stage of a multi-stage run may override (``stages[i].
    <section>``): only fields its callback reads from the stage's config (``TrainContext.config``)
    at every step; the rest are fixed for the run."""

    # -- config ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def enabled(self, cfg) -> bool:
        """Whether the run uses this capability (its hooks run only then, except :meth:`check`)."""

    def check(self, cfg, *, world_size: int, data_parallel: int, cuda: bool) -> List[str]:
        """Problems of ``cfg`` that need other sections or the launch (one sentence each, naming the
        YAML paths); called for every registered capability, enabled or not, before any work."""
        return []

    # -- model ----------------------------------------------------------------------------------
    def te_unsupported(self, cfg) -> List[str]:
        """Why this (enabled) capability cannot run on ``model.backend: te`` (Transformer Engine modules),
        one phrase each naming the YAML path; empty: it can. ``auto`` then resolves to ``local``."""
        return []

    def transformer_config(self, cfg) -> Dict[str, Any]:
        """Keyword arguments this capability adds to Megatron's ``TransformerConfig``."""
        return {}

    def layer_specs(self, cfg, specs: List[Any], backend: str) -> List[Any]:
        """The per-layer ``ModuleSpec`` list (whole model, layer i at index i) after this
        capability's rewrite; specs are shared between layers, so copy before changing one.
        ``backend``: the resolved module backend, ``local`` or ``te``."""
        return specs

    def gpt_model_kwargs(self, cfg, config, core_spec, vp_stage, backend: str) -> Dict[str, Any]:
        """Keyword arguments this capability adds to ``GPTModel(...)`` of one chunk (``core_spec``: the
        core layer spec, before any capability's rewrite; ``backend``: the resolved module backend)."""
        return {}

    def routed_experts(self, cfg) -> Optional[int]:
        """The number of routed experts per MoE layer when this capability makes the model's MLPs
        routed experts (sharded over ``parallel.expert``); None: it adds none."""
        return None

    def active_share(self, cfg, name: str) -> Optional[Fraction]:
        """The share of tokens that pass through parameter ``name`` (an unsharded state-dict name) when
        this capability makes it conditional, e.g. a routed expert's ``top_k / num_experts``; None:
        every token does (or the parameter is not this capability's)."""
        return None

    # -- training -------------------------------------------------------------------------------
    def callback(self, cfg, log: Callable[[str], None], consumed_tokens: Callable[[int], int]) -> Optional[Callback]:
        """The training-loop callback of this capability (None: it has no per-step logic).

        ``consumed_tokens(step)`` is the number of training tokens after optimizer step ``step`` as the
        run's schedule draws them (a batch-size ramp-up, stages with their own sequence lengths; past
        the last step, as many per step as the last), for a callback whose phases are counted in tokens.
        """
        return None

    def batch_hook(self, cfg) -> Optional[BatchHook]:
        """What to call before each micro-batch's forward (None: nothing)."""
        return None

    # -- sub-models -----------------------------------------------------------------------------
    def check_submodel(self, cfg, sub) -> List[str]:
        """Problems with extracting the sub-network ``sub`` (kept ``layers``, ``experts``, ``top_k``);
        called for every registered capability, enabled or not."""
        return []

    def submodel_config(self, cfg, small, sub, output: Path) -> None:
        """Rewrite ``small`` (a copy of ``cfg`` with the kept layers only) for the sub-model."""

    def submodel_tensor(self, cfg, name: str, tensor, sub) -> Optional[Tuple[str, Any]]:
        """One tensor of a kept layer (``name`` relative to the layer, e.g. ``mlp.router.weight``):
        the ``(name, tensor)`` the sub-model keeps, or None to drop it."""
        return name, tensor

    def submodel_state(
        self, cfg, callback: Optional[Callback], sub, source_step: int, output: Path, is_writer: bool
    ) -> Optional[Dict[str, Any]]:
        """The sub-model's state of this capability's callback (None: start afresh); may write files
        into ``output`` (``is_writer``: this rank writes them)."""
        return None

    def apply_subnetwork(self, cfg, model_chunks: List[Any], sub) -> bool:
        """Make the loaded ``model_chunks`` compute the sub-network ``sub`` (evaluation of the full
        model under a sub-network); True when this capability applied all of it (layers included)."""
        return False

    # -- HF interop -----------------------------------------------------------------------------
    def hf_config(self, cfg, callback: Optional[Callback], hf: Dict[str, Any]) -> List[str]:
        """Export: add to ``hf`` (the ``config.json`` being written; the dense decoder's fields are
        there) what this capability changes in the model, from ``cfg`` and the trained state of its
        ``callback``; return what no HF config can represent (one sentence each, naming the field)."""
        return []

    def hf_sections(self, hf: Mapping[str, Any], output: Path, problems: List[str]) -> Dict[str, Dict[str, Any]]:
        """Import: the config sections (YAML form) this capability derives from the HF config ``hf``
        (may write files they name into ``output``); append what does not map to ``problems``."""
        return {}

    def hf_unexported(self, cfg) -> Tuple[str, ...]:
        """Prefixes of tensors (unsharded state-dict names) that an HF export leaves out: training-only
        parts no HF class has (e.g. multi-token prediction layers)."""
        return ()

    def hf_layer_rules(self, cfg, layer: int) -> Optional[List[Any]]:
        """The weight rules (:class:`megatron_ext.hf.rules.Rule`) of layer ``layer``'s MLP when this
        capability owns it (None: the dense MLP's rules apply)."""
        return None
