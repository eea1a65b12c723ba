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


def per_class_stderr(values: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Standard error of each label's mean (sample std / √n; 0 for a single value)."""
    out = {}
    for c in np.unique(labels):
        v = values[labels == c]
        out[int(c)] = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return out


def mean_se(values) -> tuple[float, float]:
    """Mean of ``values`` (e.g. one score over seeds) and its standard error (NaN for one)."""
    v = np.asarray(values, np.float64)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(se)


def mean_stderr(stderrs: list[float]) -> float:
    """Standard error of the mean of independent estimates with these standard errors."""
    return float(np.sqrt(np.sum(np.square(stderrs))) / max(len(stderrs), 1))


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64) of ``features: [N, D]``, N ≥ 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need [N ≥ 2, D] features for a Fréchet distance, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def frechet_distance(stats_a: tuple[np.ndarray, np.ndarray],
                     stats_b: tuple[np.ndarray, np.ndarray]) -> float:
    """Fréchet distance between two Gaussians ``(mean, cov)``:
    ‖m_a − m_b‖² + tr(S_a) + tr(S_b) − 2 tr((S_a^½ S_b S_a^½)^½).

    In the evaluation classifier's feature space this is "FD-classifier" (not FID: no
    Inception network). Like FID it is biased upwards for small N; compare runs at equal N.
    """
    (ma, sa), (mb, sb) = stats_a, stats_b
    ra = _sqrt_psd(sa)
    w = np.linalg.eigvalsh(ra @ sb @ ra)
    cross = float(np.sum(np.sqrt(np.maximum(w, 0.0))))
    return float(np.sum((ma - mb) ** 2) + np.trace(sa) + np.trace(sb) - 2.0 * cross)
