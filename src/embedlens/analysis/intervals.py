"""Scores and confidence intervals of the probes (docs/methods.md §2), valid at 0 and 1.

The test tokens of a probe are clustered by image (tokens of one image share its colours,
its background, its layout), so no interval here treats them as independent draws:

* **accuracy**: Wilson score interval on an *effective* number of tokens
  ``n_eff = n / deff`` (:func:`wilson_interval`, :func:`effective_n`). The design effect
  ``deff`` is the ratio of the cluster (ratio-estimator) variance of the accuracy over
  the test images to its binomial variance, bounded to [1, n]: the effective sample size
  of Korn & Graubard (1998), as in the NCHS standards for proportions. At accuracy 0 or 1
  (or with one test image) the between-image variance is not estimable and ``n_eff = n``
  (their rule; it is also the limit the estimate reaches with one error, where a single
  wrong token cannot show clustering, so the interval changes continuously at the
  boundary). Wilson rather than Clopper–Pearson: not over-conservative in the interior,
  near-identical at 0 and 1; rather than the percentile bootstrap, which collapses to
  [1, 1] when every test image is perfect.
* **selectivity** (accuracy − control accuracy on the same tokens): Newcombe's paired
  hybrid score interval (Newcombe 1998, method 10) from the two Wilson intervals above and
  the token-level correlation φ of "probe right" and "control right"
  (:func:`newcombe_paired_difference`). Never zero-width when either accuracy has an
  interval of positive width (always, since Wilson's has).
* **macro-F1**: image-level percentile bootstrap (:func:`bootstrap_weights`,
  :func:`bootstrap_f1_ci`), widened to at least the accuracy's Wilson half-widths
  (:func:`widen`): macro-F1 averages per-class scores over fewer tokens each, so its
  sampling spread is not smaller than the accuracy's, and a bootstrap over perfect images
  would otherwise report [1, 1].
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) confusion matrix, rows = truth, columns = prediction."""
    c = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(c, (y_true, y_pred), 1)
    return c


def metrics_from_confusion(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, macro-F1) from confusion matrices (..., C, C) (rows = truth). Macro-F1
    averages over the classes present in truth or prediction (sklearn's default)."""
    c = np.asarray(c, dtype=np.float64)
    total = c.sum(axis=(-2, -1))
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    rows = c.sum(axis=-1)
    cols = c.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = tp.sum(axis=-1) / total
        denom = rows + cols
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        present = (denom > 0).sum(axis=-1)
        mf1 = f1.sum(axis=-1) / present
    return acc, mf1


def z_value(ci: float) -> float:
    """Two-sided standard-normal quantile of a ``ci`` interval (0.95 → 1.96)."""
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    return NormalDist().inv_cdf((1 + ci) / 2)


def wilson_interval(p: float, n: float, ci: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` (possibly effective,
    non-integer) trials. Valid at p = 0 and 1 (width > 0 for finite n); (nan, nan) when
    ``n`` ≤ 0 or ``p`` is not finite."""
    if not (n > 0 and np.isfinite(p)):
        return float("nan"), float("nan")
    z2 = z_value(ci) ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = np.sqrt(z2) / (1 + z2 / n) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def effective_n(correct: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Effective number of independent tokens of an accuracy clustered by image
    (Korn & Graubard 1998).

    ``correct``, ``counts``: (n_images,) right predictions and tokens per test image.
    Returns ``(n_eff, deff)``, ``n_eff = n / deff``, with ``deff`` = cluster variance of the
    pooled accuracy p (ratio estimator, images drawn with replacement:
    m/(m−1) Σ (k_i − p n_i)² / n²) over its binomial variance p(1−p)/n, bounded to [1, n]
    (a design effect below 1 is not credited). Not estimable (p = 0 or 1, or a single
    image): ``deff = 1``, ``n_eff = n``. ``(0, nan)`` without tokens.
    """
    k = np.asarray(correct, dtype=np.float64)
    ni = np.asarray(counts, dtype=np.float64)
    n = float(ni.sum())
    m = int((ni > 0).sum())
    if n <= 0:
        return 0.0, float("nan")
    p = float(k.sum()) / n
    if m < 2 or p <= 0 or p >= 1:
        return n, 1.0
    v_cluster = m / (m - 1) * float(((k - p * ni) ** 2).sum()) / n**2
    deff = float(np.clip(v_cluster / (p * (1 - p) / n), 1.0, n))
    return n / deff, deff


def newcombe_paired_difference(p1: float, ci1: tuple[float, float], p2: float, ci2: tuple[float, float],
                               both: np.ndarray) -> tuple[float, float]:
    """Newcombe's (1998, method 10) interval of ``p1 − p2`` for paired proportions, from
    the two proportions' score intervals ``ci1``, ``ci2`` and the paired outcomes.

    ``both``: (n, 2) booleans (outcome 1, outcome 2) of the same n tokens, for the
    correlation φ of the 2×2 table (0 when a margin is empty). Returns (lo, hi) within
    [−1, 1]; (nan, nan) when an input is not finite."""
    (l1, u1), (l2, u2) = ci1, ci2
    if not all(np.isfinite([p1, p2, l1, u1, l2, u2])):
        return float("nan"), float("nan")
    b = np.asarray(both, dtype=bool)
    a = float((b[:, 0] & b[:, 1]).sum())
    bb = float((b[:, 0] & ~b[:, 1]).sum())
    c = float((~b[:, 0] & b[:, 1]).sum())
    d = float((~b[:, 0] & ~b[:, 1]).sum())
    den = (a + bb) * (c + d) * (a + c) * (bb + d)
    phi = (a * d - bb * c) / np.sqrt(den) if den > 0 else 0.0
    diff = p1 - p2
    lo = diff - np.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = diff + np.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return float(max(-1.0, lo)), float(min(1.0, hi))


def bootstrap_weights(n_images: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_images) multiplicities of an image-level bootstrap (resampling images
    with replacement)."""
    if n_boot <= 0 or n_images == 0:
        return np.zeros((0, n_images), dtype=np.int64)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_boot)


def bootstrap_f1_ci(per_image: np.ndarray, weights: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile CI of macro-F1 from per-image confusion matrices (n_img, C, C) and
    bootstrap ``weights`` (B, n_img); (nan, nan) without draws."""
    if weights.shape[0] == 0:
        return float("nan"), float("nan")
    cb = np.tensordot(weights, per_image, axes=(1, 0))  # (B, C, C)
    _, f1 = metrics_from_confusion(cb)
    lo, hi = np.nanpercentile(f1, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return float(lo), float(hi)


def widen(value: float, interval: tuple[float, float], below: float, above: float) -> tuple[float, float]:
    """``interval`` around ``value`` widened to at least ``below`` under and ``above`` over
    it (a NaN ``interval`` is replaced by those half-widths), clipped to [0, 1]."""
    lo, hi = interval
    lo = np.nanmin([lo, value - below])
    hi = np.nanmax([hi, value + above])
    return float(max(0.0, lo)), float(min(1.0, hi))
