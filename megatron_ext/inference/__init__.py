"""Cached decoding of a trained model (its hybrid allocation, loops and MoE routing as trained)."""
