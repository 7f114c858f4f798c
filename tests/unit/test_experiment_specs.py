"""Experiment specs: the shipped ones load (every run's config checked), the paper-scale ones pass the
launch planner for their SLURM allocation, and a bad spec is refused with the field named."""

from pathlib import Path

import pytest
import yaml

from megatron_ext.config import ConfigError
from megatron_ext.experiments.runner import sbatch_command
from megatron_ext.experiments.spec import load_spec, plan_runs

REPO = Path(__file__).resolve().parents[2]
SPECS = sorted((REPO / "configs" / "experiments").glob("*_tiny.yaml")) + sorted(
    (REPO / "configs" / "experiments").glob("*_paper.yaml")
)


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the specs' paths are the caller's, from the repository root


def test_every_paper_has_a_tiny_and_a_paper_spec():
    assert sorted(p.name for p in SPECS) == sorted(
        f"{paper}_{scale}.yaml" for paper in ("consa", "sgt", "elastic") for scale in ("tiny", "paper")
    )


@pytest.mark.parametrize("path", [p for p in SPECS if p.name.endswith("_paper.yaml")], ids=lambda p: p.stem)
def test_paper_specs_pass_the_planner(path, capsys):
    from pretrain.plan import main as plan

    spec = load_spec(path.relative_to(REPO))  # every run's config checked
    # The layout and memory of a grid's runs are the same: the start and each variant's first run.
    firsts = {v.expand()[0][0] for v in spec.variants}
    for run in [r for r in plan_runs(spec) if r.is_start or (r.label in firsts and r.seed == spec.seeds[0])]:
        overrides = [o for o in run.overrides if not o.startswith("train.init_from=")]
        args = [
            "--config",
            spec.base,
            "--nodes",
            str(spec.slurm.nodes),
            "--gpus-per-node",
            str(spec.slurm.gpus_per_node),
        ]
        status = plan([*args, "--summary", *[x for o in overrides for x in ("--set", o)]])
        assert status == 0, f"{run.key}: {capsys.readouterr().err}"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "experiments").glob("*_tiny*.yaml")), ids=lambda p: p.stem)
def test_tiny_specs_load_with_every_run_checked(path):
    spec = load_spec(path.relative_to(REPO))
    runs = plan_runs(spec)
    assert len([r for r in runs if not r.is_start]) == sum(len(v.expand()) for v in spec.variants) * len(spec.seeds)


def test_consa_tiny_grid_and_shared_start():
    spec = load_spec("configs/experiments/consa_tiny.yaml")
    runs = plan_runs(spec)
    assert runs[0].is_start and runs[0].label == "dense_start"
    variants = {r.label for r in runs[1:]}
    assert len(variants) == 11 and "dense_fa" in variants and "rule_layer-target=0.75" in variants
    for run in runs[1:]:  # equal tokens after the shared start, started from it
        assert "train.steps=600" in run.overrides
        assert f"train.init_from={spec.output_dir / 'dense_start'}" in run.overrides
    assert spec.evaluations.window_cost == 16


def test_slurm_jobs_wait_for_the_shared_start():
    spec = load_spec("configs/experiments/consa_paper.yaml")
    start, variant = plan_runs(spec)[:2]
    assert "--dependency" not in " ".join(sbatch_command(spec, start, None))
    cmd = sbatch_command(spec, variant, "42")
    assert "--dependency=afterok:42" in cmd and cmd[cmd.index("slurm/train_gpu.sbatch") + 1 :][:2] == [
        "--config",
        "configs/consa_qwen3_0p6b.yaml",
    ]
    assert f"--export=ALL,RUN_DIR={variant.run_dir},NODES=4" in cmd


def test_bad_specs_are_refused_naming_the_field(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"name": "b", "train": {"steps": 5}}))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "base": str(base),
                "variants": [{"name": "a", "overrides": {"train.seed": 3, "train.stepz": 4}}],
                "columns": ["val_loss", "sgt/looped_layers"],
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        load_spec(spec)
    assert "variants[0].overrides sets train.seed: the runner sets it" in str(err.value)
    spec.write_text(yaml.safe_dump({"name": "x", "base": str(base), "variants": [{"name": "a"}], "columns": ["sgt/x"]}))
    with pytest.raises(ConfigError, match="columns: 'sgt/x' is not a figure of this experiment"):
        load_spec(spec)
    spec.write_text(
        yaml.safe_dump({"name": "x", "base": str(base), "variants": [{"name": "a", "overrides": {"train.stepz": 4}}]})
    )
    with pytest.raises(ConfigError, match="a/seed1234: unknown key 'train.stepz'"):
        load_spec(spec)


def test_the_report_pairs_each_variant_with_the_baseline_at_the_same_seed():
    from megatron_ext.experiments.report import paired_differences

    rows = [
        {"variant": "dense", "seed": 1, "val_loss": 3.0},
        {"variant": "dense", "seed": 2, "val_loss": 4.0},
        {"variant": "consa", "seed": 1, "val_loss": 2.9},
        {"variant": "consa", "seed": 2, "val_loss": 4.2},
        {"variant": "rule", "seed": 2, "val_loss": 3.5},
        {"variant": "rule", "seed": 3, "val_loss": 1.0},  # no baseline at seed 3: not paired
    ]
    consa, rule = paired_differences(rows)
    assert consa["per_seed"] == pytest.approx({1: -0.1, 2: 0.2}) and consa["better_in"] == 1
    assert consa["mean"] == pytest.approx(0.05) and consa["spread"] == pytest.approx(0.3 / 2**0.5)
    assert rule["per_seed"] == pytest.approx({2: -0.5}) and rule["spread"] is None and rule["better_in"] == 1
