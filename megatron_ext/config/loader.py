"""YAML <-> typed dataclass configs, with ``section.key=value`` overrides and type checking.

The dataclasses are the source of truth; YAML is their serialized form. Loading walks the
dataclass fields: an unknown key is an error that suggests the closest valid name, a value of
the wrong type is an error that names the field, the value and the expected type. Every problem
found is reported at once (``ConfigError`` lists them, one per line).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Sequence, Union

import yaml

from megatron_ext.config.checks import ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin in (dict, Dict):
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, problems: List[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        problems.append(f"{where}={value!r} is not allowed: use one of {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: List[str] = []
            result = _coerce(value, arg, where, trial)
            if not trial:
                return result
        problems.append(f"{where}={value!r} has the wrong type: expected {_type_name(tp)}")
        return value
    if origin in (list, List):
        if not isinstance(value, list):
            problems.append(f"{where}={value!r} has the wrong type: expected {_type_name(tp)}")
            return value
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            problems.append(f"{where}={value!r} has the wrong type: expected a mapping")
            return value
        return {
            _coerce(k, key_tp, f"{where} key", problems): _coerce(v, value_tp, f"{where}.{k}", problems)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}")
            return value
        return _build(tp, value, where, problems)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads exponent floats without a dot, such as 1e-3, as strings.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool):
        problems.append(f"{where}={value!r} has the wrong type: expected int")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    problems.append(f"{where}={value!r} has the wrong type: expected {_type_name(tp)}")
    return value


def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(sorted(valid))})"


def _build(cls, data: Dict[str, Any], where: str, problems: List[str]):
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    known_before = len(problems)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            problems.append(f"unknown key {path!r}{_suggest(key, list(fields))}")
            continue
        kwargs[key] = _coerce(value, hints[key], path, problems)
    if len(problems) > known_before:  # this section's values are wrong: do not construct it
        return None
    try:
        return cls(**kwargs)
    except ConfigError as err:  # the section names its fields; put its YAML path in front
        problems.extend(err.under(where).problems)
    except (ValueError, TypeError) as err:
        problems.append(f"{where}: {err}" if where else str(err))
    return None


def from_dict(cls, data: Dict[str, Any]):
    """Build dataclass ``cls`` from nested dicts; raise ConfigError listing every problem."""
    problems: List[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"the configuration must be a mapping of sections, got {type(data).__name__}"])
    result = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems)
    return result


def to_dict(obj) -> Dict[str, Any]:
    """Plain nested dict of a dataclass config (YAML-serializable)."""
    return dataclasses.asdict(obj)


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars) to nested dicts."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} is not of the form section.key=value")
            continue
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            problems.append(f"override {item!r} has an empty key")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problems.append(f"override {item!r}: the value is not valid YAML ({err})")
            continue
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {key!r} is not a section")
                break
        else:
            node[keys[-1]] = value
    if problems:
        raise ConfigError(problems)
    return data


def load_yaml(path: str | Path) -> Dict[str, Any]:
    """Read a YAML config file into nested dicts, with a clear error if it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            [
                f"config file {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                f"{err.start}): save it as UTF-8"
            ]
        ) from None
    except OSError as err:
        raise ConfigError([f"config file {str(path)!r} cannot be read ({err.strerror})"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError([f"config file {str(path)!r} is not valid YAML: {err}"]) from None
    if data is None:
        raise ConfigError(
            [
                f"config file {str(path)!r} is empty: give at least the name and the sections to set "
                "(see configs/smoke.yaml)"
            ]
        )
    if not isinstance(data, dict):
        raise ConfigError(
            [
                f"config file {str(path)!r} holds a {type(data).__name__}, not a mapping of sections "
                "(model:, train:, ...)"
            ]
        )
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def dump_yaml(obj, path: str | Path) -> None:
    """Write a dataclass config as YAML (atomically: a partial file never replaces a good one)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
    tmp.replace(path)
