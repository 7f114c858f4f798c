"""Validation of config sections: one helper, every problem at once, named by its YAML path.

A section's ``__post_init__`` builds a :class:`Checks` over itself and names its fields relative
to the section (``beta=0.0 must be > 0``); the loader, which knows where in the YAML the section
sits, puts the path in front (``hybrid_attention.hard_concrete.beta=0.0 must be > 0``). A problem
is one sentence: the field, its value, and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, List, Sequence


class ConfigError(ValueError):
    """One or more configuration problems; ``problems`` holds one sentence per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))

    def under(self, path: str) -> "ConfigError":
        """The same problems with the YAML path ``path`` in front of each."""
        return ConfigError([f"{path}.{p}" for p in self.problems] if path else self.problems)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Checks:
    """Collects the problems of one config object, then raises them together (:meth:`done`)."""

    def __init__(self, obj: Any):
        self.obj = obj
        self.problems: List[str] = []

    def _numbers(self, names: Iterable[str]):
        for name in names:
            value = getattr(self.obj, name)
            if value is None:
                continue
            if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
                self.problems.append(f"{name}={value!r} must be a finite number")
                continue
            yield name, value

    def positive(self, *names: str) -> None:
        """Each named field is None or > 0."""
        for name, value in self._numbers(names):
            if value <= 0:
                self.problems.append(f"{name}={value!r} must be positive")

    def non_negative(self, *names: str) -> None:
        """Each named field is None or >= 0."""
        for name, value in self._numbers(names):
            if value < 0:
                self.problems.append(f"{name}={value!r} must be >= 0")

    def within(self, name: str, low: float, high: float, *, high_open: bool = False) -> None:
        """``low <= field <= high`` (``< high`` with ``high_open``)."""
        for _, value in self._numbers([name]):
            if not (low <= value < high if high_open else low <= value <= high):
                self.problems.append(f"{name}={value!r} must be in [{low}, {high}{')' if high_open else ']'}")

    def finite(self, *names: str) -> None:
        """Each named field is a finite number."""
        for name, value in self._numbers(names):
            if not math.isfinite(value):
                self.problems.append(f"{name}={value!r} must be finite")

    def one_of(self, name: str, choices: Sequence[Any]) -> None:
        value = getattr(self.obj, name)
        if value not in choices:
            self.problems.append(f"{name}={value!r} is not allowed: use one of {', '.join(map(repr, choices))}")

    def require(self, condition: bool, problem: str) -> None:
        """Record ``problem`` (a sentence that starts with the field, ``name=value ...``) unless
        ``condition`` holds."""
        if not condition:
            self.problems.append(problem)

    def done(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)
