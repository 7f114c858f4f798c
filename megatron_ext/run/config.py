"""The run config: the core sections and those of every registered capability, in one dataclass."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from megatron_ext.capability import Capability
from megatron_ext.config import ConfigError, apply_overrides, compose_run_config, from_dict, load_yaml
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


def _stage_fields():
    return {section: fields for capability in CAPABILITIES for section, fields in capability.stage_fields.items()}


RunConfig = compose_run_config(
    _sections(),
    module=__name__,
    methods={"capabilities": property(_enabled_capabilities)},
    stage_fields=_stage_fields(),
)


def routed_experts(cfg) -> Optional[int]:
    """Routed experts per MoE layer of ``cfg`` (the enabled capability that adds them), None: a dense model."""
    return next((n for c in cfg.capabilities if (n := c.routed_experts(cfg)) is not None), None)


def load_config(path, overrides: Sequence[str] = (), world_size: Optional[int] = None) -> RunConfig:
    """Read ``path``, apply ``section.key=value`` overrides, build and validate the sections. With
    ``world_size``, a config whose fields are refused also gets the problems of its parallel layout on
    that many ranks in the same ConfigError, so that one round of fixes serves both."""
    raw = apply_overrides(load_yaml(path), overrides)
    try:
        return from_dict(RunConfig, raw)
    except ConfigError as err:
        if world_size is None:
            raise
        raise ConfigError(list(err.problems) + _raw_layout_problems(raw, world_size)) from None


def _raw_layout_problems(raw: dict, world_size: int) -> list:
    """The layout problems of the ``parallel`` section as written (when its sizes are whole numbers
    >= 1; the field errors already name any that are not)."""
    from megatron_ext.parallel.sizes import layout_problems

    parallel = raw.get("parallel") if isinstance(raw, dict) else None
    parallel = parallel if isinstance(parallel, dict) else {}
    sizes = {name: parallel.get(name, 1) for name in ("tensor", "pipeline", "context", "expert")}
    sizes["expert_tensor"] = parallel.get("expert_tensor")
    given = [v for v in sizes.values() if v is not None]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in given):
        return []
    return layout_problems(world_size, **sizes)[1]
