"""Attention behaviour per layer and KV head (the ConSA paper's head analysis), and the per-layer SWA
fraction of a learned allocation (its "W shape").

For every KV head we look at the attention row of the *last* token of a validation sequence of ``T``
tokens (the row that sees every earlier key), ``p_j`` over key positions ``j = 0..T-1``, and measure

    entropy        H = -sum_j p_j ln p_j / ln T          (normalised: 1 = uniform over all T keys)
    local mass     m = sum_{j >= T-W} p_j                  (the share a sliding window of W keys keeps)
    distance       d = sum_j p_j (T - 1 - j)               (mean attended distance, in tokens)

averaged over the query heads of the KV group and the sequences. A head that attends to a sliding
window or sinks in the run (a hybrid layer's sparse heads) is measured on the keys it really sees,
its probabilities renormalised over them, with ln T as the entropy's scale still.

Behaviour classes, tested in this order [choice]:

    uniform          H >= 0.9              the row is spread over (nearly) every key: at T = 256 a
                                           uniform row over T^0.9 ~ 147 keys has H = 0.9
    strongly local   m >= 0.9              nearly all of the mass within the window: SWA keeps the head
    weakly local     0.5 <= m < 0.9        most of the mass within the window, a material part beyond
    sparse-broad     m < 0.5, H < 0.5      most mass beyond the window, on a few keys (H = 0.5 is a
                                           uniform row over sqrt(T) keys): sinks, retrieval heads
    dense-broad      m < 0.5, H >= 0.5     most mass beyond the window, spread widely

How they were chosen: not fitted to any run. The mass thresholds say "nearly all" (0.9) and "most"
(0.5) of the row within the window, the one question a full / sliding-window choice asks of a head;
the entropy thresholds are readable points of the normalised scale (T^0.9 and T^0.5 keys). The
planted extremes fall far from every boundary: a head on the previous token only has m = 1, H = 0;
a uniform head has H = 1 (and m = W / T).

The probabilities come from the model's own attention inputs: a forward pre-hook on each layer's
``self_attention.core_attention`` (as SGT's entropy measurement, :mod:`megatron_ext.sgt.entropy`)
takes the post-RoPE query ``[s, b, nq, hn]`` and key ``[s, b, nkv, hn]`` of the ordinary forward of
:class:`~megatron_ext.evaluation.model.EvalModel` (the checkpoint as training left it), and the last
query's row is ``softmax(scale * q_last k^T)`` over the keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

__all__ = [
    "CLASSES",
    "HeadStatistics",
    "attention_statistics",
    "classify",
    "analyze_run",
    "swa_profile",
    "plot_head_classes",
    "plot_swa_profile",
]

CLASSES = ("uniform", "strongly local", "weakly local", "sparse-broad", "dense-broad")
UNIFORM_ENTROPY = 0.9
STRONG_LOCAL_MASS = 0.9
WEAK_LOCAL_MASS = 0.5
SPARSE_ENTROPY = 0.5


@dataclass
class HeadStatistics:
    """Per layer and KV head (``[L, H_kv]`` each): normalised entropy, mass within the window, mean
    attended distance (tokens), and the class names."""

    entropy: torch.Tensor
    local_mass: torch.Tensor
    distance: torch.Tensor
    window: int
    seq_length: int

    @property
    def classes(self) -> List[List[str]]:
        return [
            [classify(float(h), float(m)) for h, m in zip(row_h, row_m)]
            for row_h, row_m in zip(self.entropy, self.local_mass)
        ]

    def to_json(self) -> dict:
        return {
            "window": self.window,
            "seq_length": self.seq_length,
            "thresholds": {
                "uniform_entropy": UNIFORM_ENTROPY,
                "strong_local_mass": STRONG_LOCAL_MASS,
                "weak_local_mass": WEAK_LOCAL_MASS,
                "sparse_entropy": SPARSE_ENTROPY,
            },
            "layers": [
                {
                    "layer": i,
                    "entropy": [round(float(x), 6) for x in self.entropy[i]],
                    "local_mass": [round(float(x), 6) for x in self.local_mass[i]],
                    "mean_distance": [round(float(x), 3) for x in self.distance[i]],
                    "class": self.classes[i],
                }
                for i in range(self.entropy.shape[0])
            ],
            "counts": {name: sum(row.count(name) for row in self.classes) for name in CLASSES},
        }


def classify(entropy: float, local_mass: float) -> str:
    """The behaviour class of a head (thresholds and their order in the module doc)."""
    if entropy >= UNIFORM_ENTROPY:
        return "uniform"
    if local_mass >= STRONG_LOCAL_MASS:
        return "strongly local"
    if local_mass >= WEAK_LOCAL_MASS:
        return "weakly local"
    return "sparse-broad" if entropy < SPARSE_ENTROPY else "dense-broad"


def attention_statistics(probs: torch.Tensor, window: int) -> Dict[str, torch.Tensor]:
    """``probs [..., T]`` last-token attention rows (each sums to 1) -> ``entropy``, ``local_mass``,
    ``distance`` ``[...]`` (see the module doc)."""
    t = probs.shape[-1]
    p = probs.double()
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
    entropy = -plogp.sum(-1) / math.log(t) if t > 1 else torch.zeros(p.shape[:-1], dtype=p.dtype)
    local_mass = p[..., max(0, t - window) :].sum(-1)
    distance = (p * torch.arange(t - 1, -1, -1, dtype=p.dtype)).sum(-1)
    return {"entropy": entropy, "local_mass": local_mass, "distance": distance}


def last_token_probabilities(
    query: torch.Tensor, key: torch.Tensor, scale: float, plans: Optional[Sequence] = None
) -> torch.Tensor:
    """``query [s, b, nq, hn]`` and ``key [s, b, nkv, hn]`` (post-RoPE, a core attention's inputs) ->
    ``[b, nq, s]`` attention of the last query over the keys each head sees (``plans[kv]`` =
    ``(window, sink)``, window None = every key; default all full)."""
    s, _, nq, _ = query.shape
    nkv = key.shape[2]
    q_last = query[-1].double()  # [b, nq, hn]
    k = key.permute(1, 2, 0, 3).double().repeat_interleave(nq // nkv, dim=1)  # [b, nq, s, hn]
    logits = torch.einsum("bhd,bhsd->bhs", q_last, k) * scale
    plans = list(plans) if plans is not None else [(None, 0)] * nkv
    positions = torch.arange(s)
    visible = torch.ones(nq, s, dtype=torch.bool)
    for head in range(nq):
        window, sink = plans[head // (nq // nkv)]
        if window is not None:
            visible[head] = (positions >= s - window) | (positions < sink)
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


def _validation_tokens(cfg, count: int) -> torch.Tensor:
    """``[count, T]`` tokens of the first ``count`` validation samples of the run's data."""
    from megatron_ext.run.datasets import build_datasets

    _, valid = build_datasets(cfg)
    try:
        samples = [torch.as_tensor(valid[i]["tokens"]) for i in range(count)]
    except IndexError:
        raise ValueError(f"--sequences {count}: the run's validation split has fewer samples; ask for fewer") from None
    return torch.stack(samples).long()


def collect_statistics(model, tokens: torch.Tensor, window: int, batch_size: int = 8) -> HeadStatistics:
    """Statistics of ``model`` (an :class:`EvalModel`) over ``tokens [n, T]``, ``batch_size`` sequences
    per forward."""
    from megatron_ext.models.protocols import KeyPlanAttention

    layers = model.model.decoder.layers
    rows: Dict[int, List[Dict[str, torch.Tensor]]] = {i: [] for i in range(len(layers))}
    seen = set()
    handles = []

    def hook_for(index, core):
        def hook(module, args, kwargs):
            if index in seen:  # loop passes of an SGT layer: the ordinary pass only
                return None
            seen.add(index)
            query = args[0] if len(args) > 0 else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            scale = getattr(core, "softmax_scale", None) or 1.0 / math.sqrt(query.shape[-1])
            plans = core.attended_keys() if isinstance(core, KeyPlanAttention) else None
            probs = last_token_probabilities(query.detach(), key.detach(), scale, plans)  # [b, nq, s]
            nkv = key.shape[2]
            stats = attention_statistics(probs, window)  # each [b, nq]
            rows[index].append({k: v.reshape(v.shape[0], nkv, -1).mean(-1) for k, v in stats.items()})  # [b, nkv]

        return hook

    for index, layer in enumerate(layers):
        core = layer.self_attention.core_attention
        handles.append(core.register_forward_pre_hook(hook_for(index, core), with_kwargs=True))
    try:
        for start in range(0, tokens.shape[0], batch_size):
            seen.clear()
            model.logits(tokens[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    merged = {
        name: torch.stack([torch.cat([r[name] for r in rows[i]]).mean(0) for i in range(len(layers))]).float()
        for name in ("entropy", "local_mass", "distance")
    }
    return HeadStatistics(
        merged["entropy"], merged["local_mass"], merged["distance"], window=window, seq_length=tokens.shape[1]
    )


def swa_profile(allocation_path: Path) -> Optional[List[float]]:
    """Per-layer SWA fraction of an ``allocation.json`` (None: no such file): the share of a layer's
    units (KV heads, or the layer itself) on the sliding window."""
    path = Path(allocation_path)
    if not path.is_file():
        return None
    layers = sorted(json.loads(path.read_text())["layers"], key=lambda x: x["layer"])
    return [1.0 - sum(layer["full_attention"]) / len(layer["full_attention"]) for layer in layers]


def plot_head_classes(path: Path, stats: HeadStatistics, title: str) -> None:
    """Two panels: each head's local mass against its entropy, coloured by class (the thresholds
    drawn), and the class of each (layer, KV head) as a grid."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from megatron_ext.plotting import pyplot

    plt = pyplot()
    colours = ["#9e9e9e", "#1f77b4", "#8fbbd9", "#d62728", "#ff9f80"]
    classes = stats.classes
    fig, (ax, grid) = plt.subplots(1, 2, figsize=(10, 4))
    for name, colour in zip(CLASSES, colours):
        points = [
            (float(stats.entropy[i, j]), float(stats.local_mass[i, j]))
            for i, row in enumerate(classes)
            for j, c in enumerate(row)
            if c == name
        ]
        if points:
            ax.scatter(*zip(*points), color=colour, label=f"{name} ({len(points)})", s=22)
    for i in range(stats.entropy.shape[0]):
        for j in range(stats.entropy.shape[1]):
            ax.annotate(f"L{i}H{j}", (float(stats.entropy[i, j]), float(stats.local_mass[i, j])), fontsize=5)
    ax.axvline(UNIFORM_ENTROPY, color="grey", linestyle=":", linewidth=0.8)
    ax.axvline(SPARSE_ENTROPY, color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(STRONG_LOCAL_MASS, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(WEAK_LOCAL_MASS, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("normalised entropy of the last token's attention")
    ax.set_ylabel(f"attention mass within the last W={stats.window} keys")
    ax.legend(fontsize=6, loc="lower left")
    index = torch.tensor([[CLASSES.index(c) for c in row] for row in classes])
    grid.imshow(index.numpy(), cmap=ListedColormap(colours), vmin=-0.5, vmax=len(CLASSES) - 0.5, aspect="auto")
    for i in range(index.shape[0]):
        for j in range(index.shape[1]):
            grid.text(j, i, f"{float(stats.distance[i, j]):.0f}", ha="center", va="center", fontsize=6)
    grid.set_xlabel("KV head (cells: mean attended distance, tokens)")
    grid.set_ylabel("layer")
    grid.set_xticks(range(index.shape[1]))
    grid.set_yticks(range(index.shape[0]))
    grid.legend(
        handles=[Patch(color=c, label=n) for n, c in zip(CLASSES, colours)],
        fontsize=6,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_swa_profile(path: Path, profiles: Dict[str, List[float]], title: str) -> None:
    """One line per allocation: the SWA fraction of each layer (the "W shape": low in the middle)."""
    from megatron_ext.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, profile in profiles.items():
        ax.plot(range(len(profile)), profile, "o-", label=label, markersize=3)
    ax.set_xlabel("layer")
    ax.set_ylabel("SWA fraction of the layer's units")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyze_run(
    run_dir: Path, *, sequences: int, window: Optional[int], step: Optional[int] = None, output: Optional[Path] = None
) -> dict:
    """Load ``run_dir`` (one process; needs Megatron's parallel state at sizes 1), measure its heads on
    its first ``sequences`` validation samples, write ``attention.json`` / ``attention.png`` (and
    ``swa_profile.png`` when the run has an ``allocation.json``) under ``output`` (default
    ``run_dir/analysis``); returns the JSON record."""
    from megatron_ext.evaluation.model import EvalModel

    run_dir = Path(run_dir)
    model = EvalModel.load(run_dir, step)
    window = window if window is not None else model.cfg.hybrid_attention.window
    tokens = _validation_tokens(model.cfg, sequences)
    stats = collect_statistics(model, tokens, window)
    output = Path(output) if output is not None else run_dir / "analysis"
    output.mkdir(parents=True, exist_ok=True)
    record = {"run_dir": str(run_dir), "step": model.step, "sequences": sequences, **stats.to_json()}
    profile = swa_profile(run_dir / "allocation.json")
    if profile is not None:
        record["swa_profile"] = profile
        plot_swa_profile(output / "swa_profile.png", {run_dir.name: profile}, f"{run_dir}: SWA fraction per layer")
    (output / "attention.json").write_text(json.dumps(record, indent=1))
    plot_head_classes(
        output / "attention.png",
        stats,
        f"{run_dir} step {model.step}: last-token attention of {sequences} validation sequences (T={tokens.shape[1]})",
    )
    return record
