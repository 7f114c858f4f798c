"""Entry points: training, evaluation, parameter counts, launch planning, extraction, HF interop,
generation. Importing the package hides the known-irrelevant warnings of Megatron-Core and torch
(:mod:`megatron_ext.quiet`; ``--verbose`` shows them)."""

from megatron_ext.quiet import install as _quiet

_quiet()
