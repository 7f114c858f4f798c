"""A finished run's closing summary and loss curve, from its metrics.jsonl."""

import json

from megatron_ext.training.run_report import plot_loss_curve, run_summary


def test_the_summary_names_the_losses_and_where_things_are(tmp_path):
    records = [{"step": 2, "loss": 5.0}, {"step": 4, "loss": 4.5, "val/loss": 4.6}, {"step": 6, "loss": 4.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "checkpoints" / "step_00000006").mkdir(parents=True)
    assert plot_loss_curve(tmp_path) == tmp_path / "plots" / "loss.png"
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
    text = run_summary(tmp_path, 6, stopped=False)
    assert "run finished at step 6" in text
    assert "loss 5.0000 (step 2) -> 4.0000 (step 6)" in text
    assert "validation loss 4.6000 (step 4)" in text
    assert "plots/ (loss.png)" in text and "step_00000006" in text
    assert "stopped at step 3 by a signal" in run_summary(tmp_path, 3, stopped=True)


def test_a_run_that_logged_nothing_gets_no_curve(tmp_path):
    assert plot_loss_curve(tmp_path) is None
    assert "run finished at step 0" in run_summary(tmp_path, 0, stopped=False)
