"""Evaluation: the cached evaluation classifier and sample-quality metrics."""
