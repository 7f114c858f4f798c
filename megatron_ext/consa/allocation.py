"""Allocations: which units use full attention, from rules, learned gates, or an allocation.json.

An allocation is a bool matrix ``[num_layers, units_per_layer]`` (True = full attention), with
``units_per_layer`` = 1 (layer granularity) or the number of KV heads. ``allocation.json`` keeps
it with what produced it::

    {"granularity": "kv_head", "window": 512, "target": 0.5, "achieved_swa_fraction": 0.5,
     "method": "consa", "layers": [{"layer": 0, "full_attention": [1, 0, ...], "log_alpha": [...]}]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch


def rule_layer_pattern(num_layers: int, target: float) -> str:
    """round(target * L) SWA layers with the full-attention layers spread evenly, the last layer full
    (Mistral / Gemma-2 style "k SWA layers, then one FA layer"): ``SSSF`` at L = 4, rho = 0.75. [choice]"""
    full = num_layers - round(target * num_layers)
    fa_layers = {round(j * num_layers / full) - 1 for j in range(1, full + 1)} if full else set()
    return "".join("F" if i in fa_layers else "S" for i in range(num_layers))


def rule_layer_allocation(num_layers: int, pattern: str) -> torch.Tensor:
    """Layer i is full attention where ``pattern[i % len(pattern)] == 'F'``; [num_layers, 1]."""
    return torch.tensor([[pattern[i % len(pattern)] == "F"] for i in range(num_layers)])


def rule_head_allocation(num_layers: int, num_kv_heads: int, target: float) -> torch.Tensor:
    """The same round(rho * heads) SWA KV heads ([choice] the lowest indices) in every layer."""
    swa = round(target * num_kv_heads)
    row = torch.arange(num_kv_heads) >= swa
    return row.expand(num_layers, num_kv_heads).clone()


def swa_fraction(allocation: torch.Tensor) -> float:
    return float((~allocation).float().mean())


def write_allocation(
    path: Path,
    allocation: torch.Tensor,
    *,
    granularity: str,
    window: int,
    target: float,
    method: str,
    log_alpha: Optional[torch.Tensor] = None,
    diagnostics: Optional[dict] = None,
) -> None:
    """Write allocation.json atomically; ``diagnostics`` (of a learned allocation: polarization,
    constraint gap, ``warnings``) go in as they are."""
    layers = []
    for i, row in enumerate(allocation.tolist()):
        entry = {"layer": i, "full_attention": [int(x) for x in row]}
        if log_alpha is not None:
            entry["log_alpha"] = [round(float(x), 6) for x in log_alpha[i]]
        layers.append(entry)
    record = {
        "granularity": granularity,
        "window": window,
        "target": target,
        "achieved_swa_fraction": swa_fraction(allocation),
        "method": method,
        "layers": layers,
    }
    if diagnostics is not None:
        record["diagnostics"] = diagnostics
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def read_allocation(path: str | Path, num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """Read allocation.json and check it fits the model; returns [num_layers, units] bool."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hybrid_attention.allocation: {path} does not exist")
    try:  # JSON and decoding errors are ValueErrors
        record = json.loads(path.read_text(encoding="utf-8"))
        rows = [list(layer["full_attention"]) for layer in sorted(record["layers"], key=lambda x: x["layer"])]
    except (ValueError, KeyError, TypeError) as err:
        what = f"no key {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise ValueError(
            f"{path} is not an allocation file ({what}): expected JSON with "
            '"layers": [{"layer": 0, "full_attention": [1, 0, ...]}, ...], as a ConSA run writes it'
        ) from None
    if len(rows) != num_layers:
        raise ValueError(f"{path}: allocation for {len(rows)} layers, the model has {num_layers}")
    widths = {len(r) for r in rows}
    if widths not in ({1}, {num_kv_heads}):
        raise ValueError(f"{path}: rows of {sorted(widths)} units; expected 1 (layer) or {num_kv_heads} (KV heads)")
    return torch.tensor(rows, dtype=torch.bool)
