"""Data command-line tools: tokenizer training, preprocessing, the built-in corpus."""
