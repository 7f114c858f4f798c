"""Evaluations of a trained run: downstream tasks through lm-eval, long-context retrieval, length
extrapolation; all on :class:`~megatron_ext.evaluation.model.EvalModel`."""
