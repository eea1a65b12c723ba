"""Image preprocessing the experiments need: scaling and padding."""

from __future__ import annotations

import numpy as np

RANGES = {"unit": (0.0, 1.0), "symmetric": (-1.0, 1.0)}


def to_float(images: np.ndarray, pixel_range: str = "unit") -> np.ndarray:
    """uint8 ``[N, H, W, C]`` to float32 in [0, 1] (``unit``) or [−1, 1] (``symmetric``)."""
    if pixel_range not in RANGES:
        raise ValueError(f"unknown pixel_range {pixel_range!r}; accepted: {', '.join(RANGES)}")
    x = images.astype(np.float32) / 255.0
    return x if pixel_range == "unit" else 2.0 * x - 1.0


def to_unit(x: np.ndarray, pixel_range: str = "unit") -> np.ndarray:
    """Inverse of the scaling: model-space images back to [0, 1], clipped."""
    x = np.asarray(x, dtype=np.float32)
    if pixel_range == "symmetric":
        x = (x + 1.0) / 2.0
    return np.clip(x, 0.0, 1.0)


def pad_to(images: np.ndarray, size: int, value: float = 0) -> np.ndarray:
    """Pads ``[N, H, W, C]`` symmetrically to ``size``×``size`` (28→32 adds 2 per side)."""
    n, h, w, c = images.shape
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}×{w} images to {size}×{size}")
    top, left = (size - h) // 2, (size - w) // 2
    pad = ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0))
    return np.pad(images, pad, constant_values=value)
