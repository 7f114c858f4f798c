"""A run config's sections from a HF ``config.json`` (for ``pretrain.hf import`` and for
``train.init_from`` naming a HF directory): the core model section and every registered
capability's (:meth:`~megatron_ext.capability.Capability.hf_sections`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple

from megatron_ext.hf.config import model_section
from megatron_ext.run.registry import CAPABILITIES

TRAINING_ONLY = {
    "model": {"max_position_embeddings", "init_method_std", "attention_dropout"},
    "moe": {"capacity_factor"},
}
"""Derived fields a run may set otherwise without changing the function of the imported weights."""


def is_hf_dir(path) -> bool:
    """A HF model directory: ``config.json`` beside safetensors weights."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def read_hf_config(hf_dir) -> Dict[str, Any]:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def sections_from_hf(hf: Mapping[str, Any], output: Path, problems: List[str]) -> Dict[str, Dict[str, Any]]:
    """``{section: {field: value}}`` that the HF config determines (files they name go to ``output``)."""
    sections = {"model": model_section(hf, problems)}
    if problems:
        return sections
    for capability in CAPABILITIES:
        for name, values in capability.hf_sections(hf, output, problems).items():
            sections.setdefault(name, {}).update(values)
    return sections


def conflicts(
    derived: Mapping[str, Mapping[str, Any]], value: Callable[[str, str], Tuple[bool, Any]], where: str
) -> List[str]:
    """Fields where ``value(section, field)`` -> (given, value) disagrees with what the HF config gives."""
    problems = []
    for section, fields in derived.items():
        for name, hf_value in fields.items():
            if name in TRAINING_ONLY.get(section, ()):
                continue
            given, ours = value(section, name)
            if (
                given
                and ours != hf_value
                and not (
                    isinstance(ours, (int, float))
                    and isinstance(hf_value, (int, float))
                    and float(ours) == float(hf_value)
                )
            ):
                problems.append(f"{section}.{name}: {where} has {ours!r}, the HF config.json gives {hf_value!r}")
    return problems


def effective_model_value(cfg, name: str):
    """A model field as the model uses it (None defaults resolved)."""
    m = cfg.model
    if name == "num_query_groups":
        return m.num_query_groups or m.num_attention_heads
    if name == "kv_channels":
        return m.kv_channels or m.hidden_size // m.num_attention_heads
    if name == "rope_scaling":  # the section as the import writes it: the keys that are set
        return {k: v for k, v in dataclasses.asdict(m.rope_scaling).items() if v is not None}
    return getattr(m, name)


def init_from_problems(cfg, hf_dir, scratch: Path) -> List[str]:
    """Why ``train.init_from: hf_dir`` cannot initialize ``cfg``'s model (empty when it can)."""
    problems: List[str] = []
    derived = sections_from_hf(read_hf_config(hf_dir), scratch, problems)
    if problems:
        return [f"train.init_from={str(hf_dir)!r}: {p}" for p in problems]

    def value(section, name):
        if section == "model":
            return True, effective_model_value(cfg, name)
        if section == "hybrid_attention" and name == "allocation":
            return False, None  # a file of the import; the allocations are compared by the run's own check
        return True, getattr(getattr(cfg, section), name)

    return [f"train.init_from={str(hf_dir)!r}: {p}" for p in conflicts(derived, value, "the run config")]
