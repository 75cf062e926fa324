"""Datasets and the built-in demo task."""
