"""A checkpoint's common state: the plain dict on disk and :class:`CommonState` it is read into,
including the dicts that checkpoints written before the class existed hold."""

from megatron_ext.training.checkpoint import CommonState

LAYOUT = {"world": 2, "tp": 2, "pp": 1, "vpp": 1, "ep": 1, "etp": 1, "cp": 1}


def test_the_saved_dict_reads_back_into_the_same_state():
    state = CommonState(
        step=6,
        consumed_samples=24,
        skipped_steps=1,
        scheduler={"num_steps": 6},
        callbacks={"toy": {"seen": [1, 2]}},
        layout=LAYOUT,
    )
    saved = state.to_dict()
    assert list(saved) == ["consumed_samples", "skipped_steps", "scheduler", "callbacks", "layout", "step"]
    assert CommonState.from_dict(saved) == state


def test_a_dict_of_an_earlier_version_loads_with_the_defaults():
    state = CommonState.from_dict({"consumed_samples": 8, "layout": LAYOUT, "step": 2, "restored_rng": True})
    assert state == CommonState(step=2, consumed_samples=8, layout=LAYOUT)
    assert (state.skipped_steps, state.scheduler, state.callbacks, state.restored_rng) == (0, None, {}, False)


def test_provenance_is_saved_only_where_set_and_the_load_result_never():
    saved = CommonState(imported_from={"hf_dir": "hf", "model_type": "llama"}, restored_rng=True).to_dict()
    assert saved["imported_from"] == {"hf_dir": "hf", "model_type": "llama"}
    assert "extracted_from" not in saved and "restored_rng" not in saved
    assert CommonState.from_dict(saved).imported_from == {"hf_dir": "hf", "model_type": "llama"}


def test_a_callback_reads_its_state_under_its_name_or_the_name_it_had_before():
    from megatron_ext.consa.callback import ConSACallback
    from megatron_ext.sgt.callback import SGTCallback

    assert (ConSACallback.name, SGTCallback.name) == ("hybrid_attention", "looping")
    old = CommonState(callbacks={"consa": {"lambda": 1.0}, "sgt": {"selected": [2]}})
    assert old.callback_state(ConSACallback) == {"lambda": 1.0}
    assert old.callback_state(SGTCallback) == {"selected": [2]}
    new = CommonState(callbacks={"hybrid_attention": {"lambda": 2.0}, "consa": {"lambda": 1.0}})
    assert new.callback_state(ConSACallback) == {"lambda": 2.0}
    assert CommonState().callback_state(ConSACallback) == {}


def test_a_callback_metric_outside_its_prefixes_or_over_a_core_one_is_refused():
    import pytest

    from megatron_ext.capability import Callback
    from megatron_ext.training.capabilities import checked_metrics

    class Toy(Callback):
        name = "toy"
        metric_prefixes = ("toy/",)

    record = {"loss": 2.0, "toy/seen": 1}
    assert checked_metrics(Toy(), {"toy/rate": 0.5}, record) == {"toy/rate": 0.5}
    with pytest.raises(RuntimeError, match=r"\['loss'\] outside its prefixes"):
        checked_metrics(Toy(), {"loss": 0.0}, record)
    with pytest.raises(RuntimeError, match="toy/seen"):
        checked_metrics(Toy(), {"toy/seen": 2}, record)
    with pytest.raises(RuntimeError, match="lr"):
        checked_metrics(Callback(), {"lr": 1.0}, record)
