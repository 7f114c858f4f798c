"""``pretrain.evaluate`` on a run whose layout does not fit the ranks of the process refuses before
any work, in one line that names the launch command and the override that fits the layout."""

import yaml

from megatron_ext.run import load_config
from megatron_ext.run.checks import launch_hint
from pretrain.evaluate import main
from tests.configs import TINY

RUN = {"name": "tiny", "model": TINY["model"], "data": {"seq_length": 32}, "train": {**TINY["train"], "steps": 2}}


def run_dir_with(tmp_path, **parallel):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**RUN, "parallel": parallel}))
    return run_dir


def test_a_tensor_parallel_run_in_one_process_says_how_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run_dir = run_dir_with(tmp_path, tensor=2)  # no checkpoint: the check comes before any loading
    assert main(["--run-dir", str(run_dir), "--batches", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(
        f"error: {run_dir}: the layout parallel.tensor=2 runs on a multiple of 2 ranks and this job has 1"
    ), err
    assert f"`torchrun --nproc-per-node 2 -m pretrain.evaluate --run-dir {run_dir} --batches 2`" in err, err
    assert "fit the layout to 1 rank(s) with `--set parallel.tensor=1`" in err, err


def test_the_override_it_names_fits_the_layout(tmp_path):
    run_dir = run_dir_with(tmp_path, tensor=2, pipeline=2, virtual_pipeline=1, expert=1)
    hint = launch_hint(load_config(run_dir / "config.yaml"), 3, "-m pretrain.evaluate")
    assert "runs on a multiple of 4 ranks and this job has 3" in hint and "--nproc-per-node 4 " in hint, hint
    overrides = hint.split("with `--set ")[1].split("`")[0].split(" --set ")
    assert overrides == ["parallel.tensor=1", "parallel.pipeline=1", "parallel.virtual_pipeline=null"]
    assert launch_hint(load_config(run_dir / "config.yaml", overrides), 3) is None
    assert launch_hint(load_config(run_dir / "config.yaml"), 4) is None
