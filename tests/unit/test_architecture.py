"""The seams the layout promises: no import cycles between packages (``TYPE_CHECKING`` imports
included), a config package that is a leaf, building blocks (``models/``, ``data/``) below the run
assembly (``run/``), generic modules that name no method, and capabilities that plug in through the
registry."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.capability import Capability
from megatron_ext.config import CORE_SECTIONS, Checks, ConfigError, compose_run_config, from_dict
from megatron_ext.run import CAPABILITIES, RunConfig
from megatron_ext.testing.imports import cycles, module_imports, mutual_pairs, package_graph

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_ext"
METHOD_WORDS = re.compile(r"\b(consa|hybrid\w*|moe\w*|elastic\w*|rout(er|ing)\w*|sgt|looping|looped\w*)\b", re.I)


def test_packages_import_each_other_without_cycles():
    graph = package_graph(PACKAGE)
    assert mutual_pairs(graph) == []
    assert cycles(graph) == []


def test_type_checking_imports_are_edges_of_the_graph(tmp_path):
    package = tmp_path / "megatron_ext"
    (package / "low").mkdir(parents=True)
    (package / "high").mkdir()
    (package / "low" / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from megatron_ext.high import Thing\n"
    )
    (package / "high" / "__init__.py").write_text("from megatron_ext.low import helper\n")
    graph = package_graph(package)
    assert graph == {"megatron_ext.low": {"megatron_ext.high"}, "megatron_ext.high": {"megatron_ext.low"}}
    assert cycles(graph) == [["megatron_ext.high", "megatron_ext.low"]]


@pytest.mark.parametrize("package", ["models", "data"])
def test_building_blocks_never_name_the_run_assembly(package):
    modules = module_imports(PACKAGE)
    named = sorted(
        f"{module} -> {name}"
        for module, names in modules.items()
        if module.startswith(f"megatron_ext.{package}.") or module == f"megatron_ext.{package}"
        for name in names
        if name.startswith(("megatron_ext.run", "megatron_ext.training", "megatron_ext.launch"))
    )
    assert named == [], f"megatron_ext/{package} imports the run assembly: {named}"
    text = "\n".join(path.read_text() for path in (PACKAGE / package).rglob("*.py"))
    assert "RunConfig" not in text, f"megatron_ext/{package} names the run config"


def test_no_capability_imports_the_run_assembly():
    graph = package_graph(PACKAGE)
    for capability in CAPABILITIES:
        package = type(capability).__module__.rsplit(".", 1)[0]
        assert not graph[package] & {"megatron_ext.run", "megatron_ext.training", "megatron_ext.launch"}, package


def test_config_is_a_leaf_that_loads_without_torch():
    assert package_graph(PACKAGE)["megatron_ext.config"] == set()
    probe = (
        "import sys, megatron_ext.config; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('megatron')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == str(
        [
            "megatron_ext",
            "megatron_ext.config",
            "megatron_ext.config.checks",
            "megatron_ext.config.loader",
            "megatron_ext.config.sections",
        ]
    )


@pytest.mark.parametrize("path", ["training/loop.py", "training/step.py", "run/builder.py"])
def test_generic_modules_name_no_method(path):
    text = (PACKAGE / path).read_text()
    found = sorted({m.group(0) for m in METHOD_WORDS.finditer(text)})
    assert found == [], f"{path} names methods {found}: move the logic into the capability"


def test_registered_capabilities_own_distinct_kw_only_sections():
    names = [c.name for c in CAPABILITIES]
    assert len(set(names)) == len(names)
    sections = [s for c in CAPABILITIES for s in c.sections]
    assert len(set(sections)) == len(sections) and not set(sections) & set(CORE_SECTIONS)
    run_fields = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    for capability in CAPABILITIES:
        assert isinstance(capability, Capability)
        for section, cls in capability.sections.items():
            assert run_fields[section] is cls
    for cls in [*CORE_SECTIONS.values(), *(c for cap in CAPABILITIES for c in cap.sections.values())]:
        assert all(f.kw_only for f in dataclasses.fields(cls)), f"{cls.__name__} is not kw_only"


@dataclasses.dataclass(kw_only=True)
class _ToyInner:
    rate: float = 0.5
    """A rate in [0, 1]."""

    def __post_init__(self):
        c = Checks(self)
        c.within("rate", 0.0, 1.0)
        c.done()


@dataclasses.dataclass(kw_only=True)
class _ToySection:
    enabled: bool = False
    width: int = 4
    inner: _ToyInner = dataclasses.field(default_factory=_ToyInner)

    def __post_init__(self):
        c = Checks(self)
        c.positive("width")
        c.done()


class _Toy(Capability):
    name = "toy"
    sections = {"toy": _ToySection}

    def enabled(self, cfg):
        return cfg.toy.enabled


def test_a_new_capability_is_one_section_and_its_problems_carry_their_yaml_path():
    cls = compose_run_config(
        _Toy.sections,
        module=__name__,
        methods={"capabilities": property(lambda cfg: [c for c in [_Toy()] if c.enabled(cfg)])},
    )
    cfg = from_dict(cls, {"toy": {"enabled": True, "width": 8}, "model": {"num_layers": 3}})
    assert cfg.toy.width == 8 and cfg.model.num_layers == 3 and [c.name for c in cfg.capabilities] == ["toy"]
    with pytest.raises(ConfigError) as info:
        from_dict(cls, {"toy": {"width": 0, "inner": {"rate": 2.0}}, "train": {"lr": -1.0}})
    assert info.value.problems == ["toy.inner.rate=2.0 must be in [0.0, 1.0]", "train.lr=-1.0 must be positive"]
    with pytest.raises(ConfigError) as info:
        from_dict(cls, {"toy": {"width": 0}})
    assert info.value.problems == ["toy.width=0 must be positive"]
    with pytest.raises(ValueError, match="core sections"):
        compose_run_config({"model": _ToySection}, module=__name__)


def test_training_functions_are_short_named_steps():
    """The training loop reads as named steps (build, resume, step, log, evaluate, checkpoint)."""
    import ast

    long = []
    for path in sorted((PACKAGE / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == [], f"functions over 60 lines in training/: {long}"


def test_each_capability_has_one_name_for_its_section_callback_and_state():
    from megatron_ext.config import from_dict
    from tests.golden.cases import case_configs

    cfg = from_dict(RunConfig, case_configs()["tp2"])  # every capability on
    from megatron_ext.training.capabilities import capability_callbacks

    callbacks = capability_callbacks(cfg, log=lambda line: None)
    assert set(callbacks) <= {c.name for c in CAPABILITIES}
    for name, callback in callbacks.items():
        assert callback.name == name, f"capability {name!r} has a callback named {callback.name!r}"
        assert callback.metric_prefixes, f"{name}: the callback declares no metric prefix"
        capability = next(c for c in CAPABILITIES if c.name == name)
        assert name in capability.sections or not capability.sections, f"{name} is not one of its config sections"
