"""The run config: the core sections and those of every registered capability, in one dataclass."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from megatron_ext.capability import Capability
from megatron_ext.config import apply_overrides, compose_run_config, from_dict, load_yaml
from megatron_ext.run.registry import CAPABILITIES


def _enabled_capabilities(cfg) -> Tuple[Capability, ...]:
    """The capabilities this run uses, in registry order."""
    return tuple(capability for capability in CAPABILITIES if capability.enabled(cfg))


def _sections():
    sections = {}
    for capability in CAPABILITIES:
        for name, cls in capability.sections.items():
            if name in sections:
                raise ValueError(f"config section {name!r} is claimed by two capabilities")
            sections[name] = cls
    return sections


RunConfig = compose_run_config(_sections(), module=__name__, methods={"capabilities": property(_enabled_capabilities)})


def routed_experts(cfg) -> Optional[int]:
    """Routed experts per MoE layer of ``cfg`` (the enabled capability that adds them), None: a dense model."""
    return next((n for c in cfg.capabilities if (n := c.routed_experts(cfg)) is not None), None)


def load_config(path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read ``path``, apply ``section.key=value`` overrides, build and validate the sections."""
    return from_dict(RunConfig, apply_overrides(load_yaml(path), overrides))
