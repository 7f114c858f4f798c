"""The model's vocabulary size: the tokenizer's, padded."""

VOCAB_PAD_MULTIPLE = 128
"""Megatron-LM's make-vocab-size-divisible-by default: the padded vocabulary is a multiple."""


def padded_vocab_size(vocab_size: int) -> int:
    """Vocabulary padded to a multiple of 128 (independent of TP, so checkpoints reshard)."""
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
