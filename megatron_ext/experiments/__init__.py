"""Experiments: a comparison table's grid of runs as one spec (:mod:`.spec`), run locally or on SLURM
(:mod:`.runner`), tabulated and plotted (:mod:`.report`); and the attention-behaviour analysis of a
run (:mod:`.analysis`)."""
