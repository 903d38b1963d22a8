"""Small robust statistics shared by the analyses (anchor discovery, categorization)."""

from __future__ import annotations

import numpy as np


def robust_z(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Robust z-score (x − median) / (1.4826·MAD); falls back to 1.2533·mean absolute
    deviation when MAD = 0; all-equal data → z = 0. Returns (z, median, scale)."""
    x = np.asarray(x, dtype=np.float64)
    fin = np.isfinite(x)
    if not fin.any():
        return np.full(x.shape, np.nan), float("nan"), float("nan")
    med = float(np.median(x[fin]))
    dev = np.abs(x[fin] - med)
    scale = 1.4826 * float(np.median(dev))
    if scale <= 0:
        scale = 1.2533 * float(dev.mean())
    if scale <= 0:
        z = np.where(fin, 0.0, np.nan)
        return z, med, 0.0
    return (x - med) / scale, med, scale


def uncertainty_coefficient(indicator: np.ndarray, labels: np.ndarray) -> float:
    """U(X|Y) = I(X; Y) / H(X): the fraction of the entropy of ``indicator`` explained
    by ``labels`` (0 = the labels say nothing about it, 1 = they determine it)."""
    x = np.asarray(indicator).astype(np.int64)
    y = np.asarray(labels).astype(np.int64)
    if x.size == 0:
        return float("nan")
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(joint, (xi, yi), 1)
    p = joint / joint.sum()
    px = p.sum(1)
    py = p.sum(0)
    hx = -float(np.sum(px[px > 0] * np.log(px[px > 0])))
    # A constant indicator has H(X) = 0 up to round-off; the ratio would be noise (>1).
    if xi.max() == 0 or hx < 1e-12:
        return 0.0
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / (px[:, None] * py[None, :])[nz])))
    return min(1.0, max(0.0, mi / hx))
