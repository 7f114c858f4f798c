"""Long-context evaluations of a trained run: synthetic retrieval (passkey, multi-key needle in a
haystack) per context length and needle depth, and length extrapolation (validation perplexity at
k x the training sequence length). Everything goes through :class:`~megatron_ext.evaluation.model.EvalModel`
(``generate``, ``token_logprobs``), so full-attention, hybrid (layer- or KV-head-wise) and looped models
are scored exactly as training left them.

Retrieval samples are generated here, from a seed, with the model's own tokenizer; no benchmark data
is read. A sample of length ``L`` is a prompt followed by its reference answer, ``L`` tokens in all
(so ``L = max_length`` stays within the training context)::

    [instruction] filler ... NEEDLE ... filler [question] | answer

* passkey (the passkey retrieval of Landmark Attention, arXiv 2305.16300; wording ours): one needle
  "The pass key is 48213. Remember it, 48213 is the pass key." in filler sentences; the question ends
  "The pass key is" and the answer is " 48213".
* needle (the multi-key needle in a haystack of RULER, arXiv 2404.06654; wording ours): ``keys`` needles
  "The special code for silver heron is 5120." with distinct names; one is asked for, the others are
  distractors at uniformly random places in the haystack.

The question repeats the head of its needle and the answer is the needle's tail, so retrieval is
"find the earlier occurrence, continue it" (what induction heads do). [choice] Depth ``d`` in [0, 1]: the asked
needle starts after ``round(d * F)`` of the ``F`` filler tokens (0: right after the instruction,
1: right before the question). Every prompt piece is encoded on its own and the ids concatenated, so
a prompt has exactly the stated length; the filler is cut at a token, not a sentence.

[choice] Runs on synthetic token data have no tokenizer (``EvalModel.tokenizer`` is None): the samples are
then token ids of the model's vocabulary ``V``. The filler counts up through ``[0, V // 2)`` (cyclically,
from a random id): a haystack a model predicts, like the repeated sentences of the passkey test, so
that training on such samples has nothing to learn but the retrieval. Key ids are drawn without
repetition from ``[V // 2, V - 1)`` (no filler id equals a key), and the marker ``V - 1`` opens every
needle and the question::

    passkey:  needle [MARK, k1..kn]           question [MARK]           answer [k1..kn]
    needle:   needle [MARK, name, v1..vn]     question [MARK, name]     answer [v1..vn]

There is no instruction. A text answer is right when the first number of the greedy continuation is
the key; an id answer when the continuation's ids equal it.

:data:`NATIVE_TASKS` gives the evaluation front end one callable per task name,
``fn(model, limit, options) -> dict``; see :data:`OPTION_KEYS` for the options.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

__all__ = [
    "NATIVE_TASKS",
    "OPTION_KEYS",
    "RetrievalSample",
    "default_lengths",
    "extrapolation",
    "make_sample",
    "needle",
    "passkey",
    "plot_retrieval",
]

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SAMPLES = 4
DEFAULT_KEY_LENGTH = 5
DEFAULT_KEYS = 4
DEFAULT_FACTORS = (1.0, 2.0, 3.0, 4.0)
DEFAULT_BATCHES = 4

# Our own wording (no benchmark text): an instruction, filler sentences without digits, needles.
_INSTRUCTION = {
    "passkey": "Somewhere in the long text below a pass key is hidden. Find it and remember it.\n",
    "needle": "The long text below hides special codes for several names. Remember each code.\n",
}
_FILLER = (
    " The river bends twice before it reaches the old stone bridge.",
    " Farmers bring their carts to the market square early in the morning.",
    " A light wind moves the tall grass along the edge of the field.",
    " The library keeps its oldest maps in a cool room under the stairs.",
    " Clouds gather over the hills whenever the season starts to turn.",
    " Children walk along the canal on their way home from school.",
    " The baker opens the shutters while the street is still quiet.",
    " Gulls circle the harbour as the fishing boats come back in.",
    " A narrow path climbs through the pine forest to a small lake.",
    " The clock on the town hall has rung the hours for many years.",
    " Lanterns line the garden wall and glow softly after sunset.",
    " Trains cross the valley on a long bridge of grey arches.",
)
_ADJECTIVES = ("silver", "amber", "quiet", "northern", "crimson", "hollow", "gentle", "rapid", "golden", "misty")
_NOUNS = ("heron", "lantern", "harbour", "meadow", "falcon", "orchard", "glacier", "willow", "compass", "beacon")

OPTION_KEYS: Dict[str, Dict[str, str]] = {
    "passkey": {
        "lengths": "context lengths in tokens, comma-separated; a k suffix multiplies by 1024 (default: "
        "default_lengths(max_length))",
        "depths": "needle depths in [0, 1], comma-separated (default 0,0.25,0.5,0.75,1)",
        "samples": f"samples per (length, depth) cell (default {DEFAULT_SAMPLES}; limit caps it)",
        "seed": "seed of the generated samples (default 0)",
        "key_length": f"digits of a text key, ids of a token-id key (default {DEFAULT_KEY_LENGTH})",
        "plot": "write the accuracy heatmap to this PNG path (default: none)",
    },
    "extrapolation": {
        "factors": "multiples k of the training sequence length, comma-separated (default 1,2,3,4)",
        "batches": f"global validation batches per factor (default {DEFAULT_BATCHES}; limit caps it)",
    },
}
OPTION_KEYS["needle"] = {
    **OPTION_KEYS["passkey"],
    "keys": f"needles per prompt, one asked for (default {DEFAULT_KEYS})",
}
"""The ``options`` each task of :data:`NATIVE_TASKS` takes (``key=value`` strings from the command line),
with their meaning and default."""


@dataclass
class RetrievalSample:
    """One generated retrieval sample: ``len(prompt) + len(answer) == length``."""

    prompt: List[int]
    answer: List[int]
    needle: List[int]
    """The ids of the asked needle, found in ``prompt`` at ``needle_position``."""
    needle_position: int
    filler_before: int
    """Filler tokens before the asked needle: ``round(depth * filler_tokens)``."""
    filler_tokens: int
    key: str
    """The expected answer: the key's digits (text) or its ids, space-separated (token ids)."""


# Sample generation.


def _token_layout(vocab_size: int):
    """(filler ids range end, key ids range, marker id) of a token-id sample (see the module doc)."""
    return vocab_size // 2, range(vocab_size // 2, vocab_size - 1), vocab_size - 1


def _pieces(task: str, tokenizer, vocab_size: int, keys: int, key_length: int, rng: random.Random):
    """(instruction ids, needles' ids (the asked one first), question ids, answer ids, key string)."""
    if tokenizer is None:
        _, key_ids, marker = _token_layout(vocab_size)
        per_needle = key_length + (task == "needle")
        if len(key_ids) < keys * per_needle:
            raise ValueError(
                f"vocab_size={vocab_size} leaves {len(key_ids)} key ids, too few for {keys} needle(s) of "
                f"{per_needle} distinct ids: lower key_length (or keys)"
            )
        ids = rng.sample(key_ids, keys * per_needle)
        needles = [[marker] + ids[i * per_needle : (i + 1) * per_needle] for i in range(keys)]
        head = needles[0][: 1 + (task == "needle")]
        answer = needles[0][len(head) :]
        return [], needles, head, answer, " ".join(map(str, answer))
    encode = tokenizer.encode
    values = [str(rng.randrange(10 ** (key_length - 1), 10**key_length)) for _ in range(keys)]
    if task == "passkey":
        key = values[0]
        needles = [encode(f" The pass key is {key}. Remember it, {key} is the pass key.")]
        question = encode("\nWhat is the pass key? The pass key is")
    else:
        names = rng.sample([f"{a} {n}" for a in _ADJECTIVES for n in _NOUNS], keys)
        key = values[0]
        needles = [encode(f" The special code for {name} is {value}.") for name, value in zip(names, values)]
        question = encode(f"\nWhat is the special code for {names[0]}? The special code for {names[0]} is")
    return encode(_INSTRUCTION[task]), needles, question, encode(f" {key}"), key


def _filler(tokenizer, vocab_size: int, count: int, rng: random.Random, sentences: List[List[int]]) -> List[int]:
    """``count`` filler ids: random sentences (text) or ids counting up below the key range (token ids)."""
    if tokenizer is None:
        end, _, _ = _token_layout(vocab_size)
        start = rng.randrange(end)
        return [(start + i) % end for i in range(count)]
    out: List[int] = []
    while len(out) < count:
        out.extend(rng.choice(sentences))
    return out[:count]


def make_sample(
    task: str,
    tokenizer,
    vocab_size: int,
    length: int,
    depth: float,
    seed,
    keys: int = 1,
    key_length: int = DEFAULT_KEY_LENGTH,
) -> RetrievalSample:
    """The retrieval sample of ``task`` ('passkey' or 'needle') with ``length`` tokens in all and the
    asked needle at ``depth``, determined by ``seed`` (an int or a string) alone.
    ``tokenizer`` None: a token-id sample of ``vocab_size`` (see the module doc)."""
    if task not in _INSTRUCTION:
        raise ValueError(f"task={task!r}: use 'passkey' or 'needle'")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if key_length < 1:
        raise ValueError(f"key_length={key_length} must be >= 1")
    rng = random.Random(seed)
    instruction, needles, question, answer, key = _pieces(task, tokenizer, vocab_size, keys, key_length, rng)
    fixed = len(instruction) + sum(map(len, needles)) + len(question) + len(answer)
    filler_tokens = length - fixed
    if filler_tokens < 0:
        raise ValueError(
            f"length {length} is too short for a {task} sample with these settings: it needs at least {fixed} "
            "tokens (instruction, needles, question and answer); give longer lengths"
        )
    sentences = None if tokenizer is None else [tokenizer.encode(s) for s in _FILLER]
    filler = _filler(tokenizer, vocab_size, filler_tokens, rng, sentences)
    asked_at = round(depth * filler_tokens)
    # (filler offset, needle ids): the asked needle first, so it precedes distractors at its offset.
    placed = [(asked_at, 0)] + [(rng.randint(0, filler_tokens), i) for i in range(1, len(needles))]
    prompt = list(instruction)
    cursor = 0
    for offset, index in sorted(placed):
        prompt.extend(filler[cursor:offset])
        cursor = offset
        if index == 0:
            needle_position = len(prompt)
        prompt.extend(needles[index])
    prompt.extend(filler[cursor:])
    prompt.extend(question)
    return RetrievalSample(
        prompt=prompt,
        answer=list(answer),
        needle=list(needles[0]),
        needle_position=needle_position,
        filler_before=asked_at,
        filler_tokens=filler_tokens,
        key=key,
    )


def default_lengths(max_length: int) -> List[int]:
    """Powers of two from 1024 (from ``max_length // 4`` for models trained on less than 4096 tokens)
    up to ``2 * max_length`` (beyond the training context: extrapolation), with ``max_length`` itself."""
    start = min(1024, max(1, max_length // 4))
    lengths = {max_length}
    p = 1 << max(0, math.ceil(math.log2(start)))
    while p <= 2 * max_length:
        lengths.add(p)
        p *= 2
    return sorted(lengths)


# Scoring.


def _correct(model, sample: RetrievalSample, generated: List[int]) -> bool:
    if model.tokenizer is None:
        return generated[: len(sample.answer)] == sample.answer
    found = re.match(r"\s*(\d+)", model.tokenizer.decode(generated))
    return found is not None and found.group(1) == sample.key


def _generated_text(model, generated: List[int]) -> str:
    return " ".join(map(str, generated)) if model.tokenizer is None else model.tokenizer.decode(generated)


def _retrieval(
    task: str,
    model,
    lengths: Optional[Sequence[int]],
    depths: Sequence[float],
    samples: int,
    seed: int,
    keys: int,
    key_length: int,
) -> dict:
    if lengths is None:  # the defaults with at least as much haystack as the rest of a sample
        rng = random.Random(f"{task}/{seed}")
        instruction, needles, question, answer, _ = _pieces(
            task, model.tokenizer, model.vocab_size, keys, key_length, rng
        )
        fixed = len(instruction) + sum(map(len, needles)) + len(question) + len(answer)
        lengths = [n for n in default_lengths(model.max_length) if n >= 2 * fixed]
    lengths = sorted(int(n) for n in lengths)
    depths = [float(d) for d in depths]
    if not lengths or not depths or samples < 1:
        raise ValueError(f"{task}: give at least one length, one depth and one sample (samples={samples})")
    stop = [] if model.eod is None else [model.eod]
    slack = 0 if model.tokenizer is None else 2  # text: see whether the number goes on
    accuracy: Dict[str, Dict[str, float]] = {}
    records = []
    for length in lengths:
        row = accuracy.setdefault(str(length), {})
        for depth in depths:
            hits = 0
            for i in range(samples):
                seeded_by = f"{task}/{seed}/{length}/{depth}/{i}"
                sample = make_sample(
                    task, model.tokenizer, model.vocab_size, length, depth, seeded_by, keys, key_length
                )
                generated = model.generate(sample.prompt, len(sample.answer) + slack, stop)
                correct = _correct(model, sample, generated)
                hits += correct
                records.append(
                    {
                        "length": length,
                        "depth": depth,
                        "needle_position": sample.needle_position,
                        "expected": sample.key,
                        "generated": _generated_text(model, generated),
                        "correct": correct,
                    }
                )
            row[f"{depth:g}"] = hits / samples
    by_length = {n: sum(row.values()) / len(row) for n, row in accuracy.items()}
    return {
        "task": task,
        "settings": {
            "lengths": lengths,
            "depths": depths,
            "samples": samples,
            "seed": seed,
            "keys": keys,
            "key_length": key_length,
            "mode": "token_ids" if model.tokenizer is None else "text",
            "max_length": model.max_length,
            "step": getattr(model, "step", None),
        },
        "accuracy": accuracy,
        "accuracy_by_length": by_length,
        "accuracy_mean": sum(by_length.values()) / len(by_length),
        "records": records,
    }


def passkey(
    model,
    lengths: Optional[Sequence[int]] = None,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    key_length: int = DEFAULT_KEY_LENGTH,
) -> dict:
    """Passkey retrieval accuracy of ``model`` (an :class:`EvalModel`) per context length and needle
    depth: ``samples`` generated samples per cell, answered greedily (a token-id model's samples:
    keys of ``key_length`` ids; see the module doc).

    Returns ``{"task", "settings", "accuracy": {length: {depth: fraction}}, "accuracy_by_length",
    "accuracy_mean", "records": [per sample: length, depth, needle_position, expected, generated,
    correct]}`` (JSON-serialisable; lengths and depths as strings in the keys, depths as ``f"{d:g}"``).
    ``lengths`` None: :func:`default_lengths` of the model, those at least twice as long as a sample's
    instruction, needles, question and answer together (shorter explicit lengths raise when too short)."""
    return _retrieval("passkey", model, lengths, depths, samples, seed, 1, key_length)


def needle(
    model,
    lengths: Optional[Sequence[int]] = None,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    keys: int = DEFAULT_KEYS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    key_length: int = DEFAULT_KEY_LENGTH,
) -> dict:
    """Multi-key needle-in-a-haystack accuracy: ``keys`` needles (name -> code) per prompt, the asked
    one at the cell's depth, the others at random places; the result as :func:`passkey`'s."""
    if keys < 1:
        raise ValueError(f"keys={keys} must be >= 1")
    return _retrieval("needle", model, lengths, depths, samples, seed, keys, key_length)


# Length extrapolation.


def extrapolation(model, factors: Sequence[float] = DEFAULT_FACTORS, batches: int = DEFAULT_BATCHES) -> dict:
    """Validation loss and perplexity of ``model`` on the run's own validation data built at
    ``round(k * T)`` tokens per sample, for each ``k`` of ``factors`` (``T``: the training length).

    The loss averages as the run's validation does (``pretrain.evaluate``): the masked mean of the
    per-token losses of each micro-batch (``loss_mask`` and ``data.loss_weights`` applied), then the
    mean over the micro-batches of ``batches`` global batches in the training order; so at ``k = 1``
    it is the run's validation loss. Each sample is scored as one sequence (positions from 0, no
    document mask; samples one at a time, to bound the memory of ``[s, vocab]`` logits). The
    log-likelihoods are :meth:`EvalModel.token_logprobs`, normalized over the model's vocabulary;
    training's loss normalizes over the output layer padded to a multiple of 128
    (:func:`~megatron_ext.models.vocab.padded_vocab_size`), so for other vocabulary sizes the two
    differ by the probability the padding logits take (which training drives towards 0). Needs a
    process group (:func:`~megatron_ext.parallel.state.parallel_job`): building indexed data
    synchronises the ranks.

    Returns ``{"task", "settings", "results": {k: {"seq_length", "loss", "perplexity", "tokens"}}}``
    (``k`` as ``f"{k:g}"``)."""
    from megatron_ext.data.synthetic import step_micro_batches
    from megatron_ext.data.vocab import MODALITIES
    from megatron_ext.run.datasets import build_datasets
    from megatron_ext.training.step import masked_mean_loss

    cfg = model.cfg
    if batches < 1 or not factors or any(k <= 0 for k in factors):
        raise ValueError(f"extrapolation: give batches >= 1 (got {batches}) and positive factors (got {factors})")
    t, d = cfg.train, cfg.data
    loss_weights = (  # as run_forward_step weighs the modalities
        None
        if d.loss_weights is None
        else torch.tensor([d.loss_weights.get(name, 1.0) for name in MODALITIES], device=model.device)
    )
    results = {}
    for k in factors:
        seq_length = int(round(k * model.max_length))
        longer = dataclasses.replace(copy.deepcopy(cfg), data=dataclasses.replace(d, seq_length=seq_length))
        if batches > t.eval_steps:  # the validation set is built for train.eval_steps batches per evaluation
            longer = dataclasses.replace(longer, train=dataclasses.replace(longer.train, eval_steps=batches))
        _, valid = build_datasets(longer)
        if valid is None:
            raise ValueError(
                f"{model.run_dir}: the run has no validation data (data.split={d.split!r} gives it no share): "
                "give validation documents (data.valid_paths or a split with a validation share) to measure "
                "extrapolation"
            )
        losses, tokens = [], 0
        for b in range(batches):
            for batch in step_micro_batches(
                valid, b * t.global_batch_size, t.global_batch_size, t.micro_batch_size, 0, 1
            ):
                batch = {name: value.to(model.device) for name, value in batch.items()}
                sequences = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)  # [b, s + 1]
                token_losses = -torch.cat([model.token_logprobs(row[None]) for row in sequences])  # [b, s]
                loss, _ = masked_mean_loss(batch, token_losses, loss_weights)
                losses.append(float(loss))
                tokens += int(batch["loss_mask"].sum())
        loss = sum(losses) / len(losses)
        results[f"{k:g}"] = {"seq_length": seq_length, "loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
    return {
        "task": "extrapolation",
        "settings": {
            "factors": [float(k) for k in factors],
            "batches": batches,
            "train_seq_length": model.max_length,
            "step": getattr(model, "step", None),
        },
        "results": results,
    }


# Plot.


def plot_retrieval(result: dict, path) -> None:
    """Heatmap of a retrieval result: accuracy per needle depth (rows) and context length (columns),
    each cell's value written in it, the training length marked by a dashed line."""
    from megatron_ext.plotting import pyplot

    plt = pyplot()
    settings = result["settings"]
    lengths, depths = settings["lengths"], settings["depths"]
    table = [[result["accuracy"][str(n)][f"{d:g}"] for n in lengths] for d in depths]  # [depths, lengths]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.8 * len(lengths)), max(2.5, 1.2 + 0.4 * len(depths))))
    image = ax.imshow(table, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{table[i][j]:.2f}", ha="center", va="center", fontsize=7)
    trained = [j for j, n in enumerate(lengths) if n <= settings["max_length"]]
    if trained and trained[-1] < len(lengths) - 1:
        ax.axvline(trained[-1] + 0.5, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels([f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    step = settings.get("step")
    ax.set_title(
        f"{result['task']} accuracy ({settings['samples']} per cell"
        + (f", step {step}" if step is not None else "")
        + f"; trained on {settings['max_length']})",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)


# The front end's registry.


def _ints(value) -> List[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    out = []
    for part in str(value).split(","):
        part = part.strip().lower()
        out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def _floats(value) -> List[float]:
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(part) for part in str(value).split(",")]


def _options(task: str, options: Mapping[str, object]) -> Dict[str, object]:
    unknown = sorted(set(options) - set(OPTION_KEYS[task]))
    if unknown:
        raise ValueError(f"{task}: unknown option(s) {unknown}; {task} takes {sorted(OPTION_KEYS[task])}")
    parse = {
        "lengths": _ints,
        "depths": _floats,
        "factors": _floats,
        "samples": int,
        "seed": int,
        "key_length": int,
        "keys": int,
        "batches": int,
        "plot": str,
    }
    parsed = {}
    for name, value in options.items():
        try:
            parsed[name] = parse[name](value)
        except ValueError:
            raise ValueError(f"{task}: option {name}={value!r} is not valid: {OPTION_KEYS[task][name]}") from None
    return parsed


def _limited(count: int, limit: Optional[int]) -> int:
    return count if limit is None else min(count, int(limit))


def _run_retrieval(task: str) -> Callable[..., dict]:
    def run(model, limit: Optional[int], options: Mapping[str, object]) -> dict:
        o = _options(task, options)
        kwargs = {
            "lengths": o.get("lengths"),
            "depths": o.get("depths", DEFAULT_DEPTHS),
            "samples": _limited(o.get("samples", DEFAULT_SAMPLES), limit),
            "seed": o.get("seed", 0),
            "key_length": o.get("key_length", DEFAULT_KEY_LENGTH),
        }
        result = (
            passkey(model, **kwargs) if task == "passkey" else needle(model, keys=o.get("keys", DEFAULT_KEYS), **kwargs)
        )
        if "plot" in o:
            plot_retrieval(result, o["plot"])
        return result

    run.__doc__ = f"{task} for the evaluation front end: options {sorted(OPTION_KEYS[task])}; limit caps samples."
    return run


def _run_extrapolation(model, limit: Optional[int], options: Mapping[str, object]) -> dict:
    """extrapolation for the evaluation front end: options factors, batches; limit caps batches."""
    o = _options("extrapolation", options)
    return extrapolation(model, o.get("factors", DEFAULT_FACTORS), _limited(o.get("batches", DEFAULT_BATCHES), limit))


NATIVE_TASKS: Dict[str, Callable[..., dict]] = {
    "passkey": _run_retrieval("passkey"),
    "needle": _run_retrieval("needle"),
    "extrapolation": _run_extrapolation,
}
"""Task name -> ``fn(model: EvalModel, limit: Optional[int], options: dict) -> dict`` (JSON-serialisable).
``options`` maps the keys of :data:`OPTION_KEYS` to ``key=value`` strings (or parsed values)."""
