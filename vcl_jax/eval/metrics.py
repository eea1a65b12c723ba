"""Sample-quality metrics."""

from __future__ import annotations

import numpy as np


def classifier_uncertainty(log_probs: np.ndarray, intended: np.ndarray) -> np.ndarray:
    """−log p(y = intended | x) per sample (the VCL papers' "classifier uncertainty").

    Args:
      log_probs: ``[N, classes]`` classifier log-probabilities of generated images.
      intended: ``[N]`` the class each image was generated for.

    Returns:
      ``[N]`` nats, ≥ 0.
    """
    return -np.take_along_axis(log_probs, np.asarray(intended)[:, None], axis=1)[:, 0]


def per_class_mean(values: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Mean of ``values`` for each label present, keyed by label."""
    return {int(c): float(values[labels == c].mean()) for c in np.unique(labels)}
