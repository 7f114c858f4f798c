"""Entry points: training, evaluation, export (thin: parse, build, run, close)."""
