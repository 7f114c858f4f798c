"""Datasets of the project's local lm-eval tasks, generated here (no download, no copied benchmark data).

Each function is a task's ``custom_dataset`` (see the YAML files beside it): deterministic, so that a
score is comparable between runs and machines.

* ``mx_python_syntax`` (multiple choice, loglikelihood): the start of a Python statement and three
  continuations of which one is valid Python (``for x in items`` -> ``:`` rather than ``;`` or
  `` {``). A model trained on code, e.g. the built-in corpus (the standard library's sources), can
  learn it; chance is 1/3.
* ``mx_copy_words`` (generation): ``Repeat: w1 w2 w3`` and the model must write the same words
  (exact match): in-context copying, the induction ability long-context tasks build on.
"""

from __future__ import annotations

import random

NAMES = ["item", "value", "node", "line", "key", "path", "name", "data", "result", "entry", "token", "count"]
SEQUENCES = ["items", "values", "self.nodes", "lines", "keys", "paths", "names", "range(10)", "args", "entries"]
CLASSES = ["Parser", "Reader", "Handler", "Buffer", "Config", "Node", "Queue", "Record"]
ERRORS = ["ValueError", "KeyError", "OSError", "TypeError", "IndexError", "RuntimeError"]
WORDS = ["red", "green", "blue", "apple", "river", "stone", "cloud", "paper", "light", "music", "table", "garden"]


def _statements(rng: random.Random):
    """(context, correct continuation, two wrong ones) of one generated statement. Every context ends
    with a letter or digit, so that no byte-level BPE merges its end with a punctuation choice (a
    continuation must be tokens of its own)."""
    v, seq, cls, err = rng.choice(NAMES), rng.choice(SEQUENCES), rng.choice(CLASSES), rng.choice(ERRORS)
    block = [":", ";", " {"]
    return rng.choice(
        [
            (f"for {v} in {seq}", *block),
            (f"while {v} is not None", *block),
            (f"if {v} == 0", *block),
            (f"class {cls}", *block),
            (f"elif {v} > 1", *block),
            (f"except {err} as exc", *block),
            (f"with open({v}) as f", *block),
            (f"{v} = [1, 2, 3", "]", ")", "}"),
            (f"{v} = {{'a': 1, 'b': 2", "}", "]", ")"),
            (f"{v} = ({v}, 1", ")", "]", "}"),
            (f"print({v}", ")", "]", "}"),
            (f"return self.{v}", "\n", ":", " {"),
        ]
    )


def python_syntax(count: int = 120, seed: int = 1234, **kwargs):
    """``count`` generated statements; fields ``context``, ``choices`` (shuffled), ``answer`` (index)."""
    import datasets

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        context, good, *bad = _statements(rng)
        choices = [good, *bad]
        rng.shuffle(choices)
        rows.append({"context": context, "choices": choices, "answer": choices.index(good)})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def copy_words(count: int = 60, seed: int = 4321, **kwargs):
    """``count`` prompts ``Repeat: w1 .. wn\\nAgain:`` (n from 2 to 5) with target `` w1 .. wn``."""
    import datasets

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        rows.append({"prompt": f"Repeat: {words}\nAgain:", "target": f" {words}"})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
