"""Data command-line tools: tokenizer training, preprocessing, the built-in corpus. Importing the
package hides the known-irrelevant warnings of Megatron-Core and torch, as ``pretrain`` does for
the training tools (:mod:`megatron_ext.quiet`; ``--verbose`` shows them)."""

from megatron_ext.quiet import install as _quiet

_quiet()
