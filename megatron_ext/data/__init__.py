"""Datasets and the batch contract between data and model."""
