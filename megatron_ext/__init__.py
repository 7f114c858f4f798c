"""Megatron-Core extensions: gated hybrid attention (ConSA), elastic ultra-sparse MoE and
training-time sparse looping (SGT), with the CPU/gloo support needed to test them anywhere."""

__version__ = "0.1.0"
