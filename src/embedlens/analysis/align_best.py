"""The best-aligned layer of the align step (docs/methods.md §3) **[ours]**: a criterion that a
trivial or imbalanced label task cannot dominate, with an image-level bootstrap interval.

Why not the plain mean ``nn_accuracy``: a task whose tokens almost all carry one label
(e.g. ``background`` with 83 % "sky") scores a high accuracy at any layer where the
majority word happens to be nearest, and such a task can decide the argmax on its own.
So, per (visual, group):

* each ``nn_accuracy`` row carries the **majority share** of the labels among its
  evaluated tokens and the **normalized accuracy** ``(acc - majority) / (1 - majority)``
  (0 = no better than always answering the most frequent label, 1 = perfect);
* tasks with fewer than 2 label values present, or a majority share
  ≥ ``max_majority_share``, are **excluded** from the criterion and listed with the reason;
* **criterion** per layer = mean over the included tasks of the normalized accuracy
  floored at 0 (a task answering worse than its majority word counts as no skill; unfloored,
  an imbalanced task would dominate from below, its minimum being -majority/(1-majority)) (fallback:
  ``mean_max_cos`` when no task qualifies, stated); the **best layer** is its argmax over
  the layers except the final-norm point (below);
* an image-level **bootstrap** (images resampled with replacement, seeded) recomputes the
  criterion per layer (majority shares included) and its argmax per draw; the summary gives
  the percentile interval (2.5 / 97.5) of the best layer (nearest-rank, so both ends are
  layers) and of the criterion value at the chosen layer.

The **final-norm point**: HF's last hidden state (layer L = num_layers) has the final norm
applied, so the step from L-1 to L is partly the norm's rescaling rather than the decoder's
processing; those rows are marked (``final_norm_point``) and layer L is left out of the argmax.

Everything here works on per-image aggregates (correct answers and label counts per image),
so a bootstrap draw is a matrix product: cheap for hundreds of draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from embedlens.store import final_norm_flag, num_layers_of

from .probe import bootstrap_weights

#: Percentiles of the reported intervals.
CI_PERCENTILES = (2.5, 97.5)


# --------------------------------------------------------------------------- per-image aggregates
def per_image_sum(img: np.ndarray, values: np.ndarray, n_images: int) -> np.ndarray:
    """(n_images,) float64 sum of ``values`` per image (``img``: image index per token)."""
    return np.bincount(img, weights=np.asarray(values, np.float64), minlength=n_images)


def per_image_label_counts(img: np.ndarray, y: np.ndarray, n_images: int, n_labels: int) -> np.ndarray:
    """(n_images, n_labels) float64 count of each label per image."""
    flat = np.bincount(img * n_labels + y, minlength=n_images * n_labels)
    return flat.reshape(n_images, n_labels).astype(np.float64)


def majority_share(y: np.ndarray) -> float:
    """Share of the most frequent value in ``y`` (NaN when empty)."""
    if len(y) == 0:
        return float("nan")
    return float(np.bincount(y).max() / len(y))


def normalized_accuracy(acc, majority):
    """``(acc - majority) / (1 - majority)``; NaN where the majority share is 1 (or NaN).
    Works elementwise on arrays."""
    acc = np.asarray(acc, np.float64)
    majority = np.asarray(majority, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(majority < 1, (acc - majority) / (1 - majority), np.nan)
    return out if out.ndim else float(out)


# --------------------------------------------------------------------------- final-norm point
def final_norm_layer(hidden, notes: list[str]) -> int | None:
    """The layer L whose hidden state carries the final norm, or None (the reason appended
    to ``notes``). Reads the store's ``num_layers`` and ``final_norm_applied_to_last_layer``."""
    try:
        L = num_layers_of(hidden)
    except (TypeError, ValueError):
        L = None
    if L is None:
        notes.append("final-norm point unknown: the store records no num_layers, so no layer is marked "
                     "final_norm_point or left out of the best-layer argmax")
        return None
    flag = final_norm_flag(hidden)
    if flag is False:
        notes.append(f"the store records that the last hidden state (layer {L}) does not carry the final "
                     "norm: no final-norm point")
        return None
    if flag is None:
        notes.append(f"final_norm_applied_to_last_layer not recorded: assumed True (HF behaviour), layer {L} "
                     "marked final_norm_point")
    notes.append(f"layer {L} (= num_layers) is the final-norm point (HF applies the final norm to the last "
                 "hidden state): marked final_norm_point and left out of the best-layer argmax")
    return int(L)


# --------------------------------------------------------------------------- criterion
def _nanmean0(x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices → NaN, by design
        return np.nanmean(x, axis=0)


def _norm_acc_draws(W: np.ndarray, correct: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(B, n_layers) normalized accuracy under image weights ``W`` (B, n_img) from per-image
    ``correct`` (n_layers, n_img) and ``labels`` (n_layers, n_img, K)."""
    tot = W @ labels.sum(-1).T
    cor = W @ correct.T
    maj = np.einsum("bi,lik->blk", W, labels).max(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = cor / tot
        share = maj / tot
    # Floored at 0: answering worse than the majority word is no skill, not negative skill.
    # Unfloored, an imbalanced task (lowest value -majority / (1 - majority), e.g. -2.7 at
    # 73 % majority) would decide the argmax from below as a near-constant one does from above.
    return np.where(tot > 0, np.fmax(normalized_accuracy(acc, share), 0.0), np.nan)


def task_exclusions(rows: pd.DataFrame, counts: Mapping[tuple[str, int], tuple[np.ndarray, np.ndarray]],
                    tasks: Sequence[str], max_majority_share: float) -> tuple[list[str], list[dict[str, Any]]]:
    """Split ``tasks`` into included and excluded for one (visual, group).

    ``rows``: that pair's ``nn_accuracy`` rows (``task``, ``layer``, ``majority_share``,
    ``n_tokens``); ``counts``: (task, layer) → (correct per image, label counts per image).
    Returns (included task names, excluded entries ``{task, majority_share,
    n_label_values, reason}``)."""
    included, excluded = [], []
    for t in tasks:
        r = rows[rows["task"] == t]
        n_tok = int(r["n_tokens"].max()) if len(r) else 0
        share = r["majority_share"].astype(float)
        maj = float(share.max()) if share.notna().any() else float("nan")
        n_values = max([int((lab.sum(0) > 0).sum()) for (tt, _), (_, lab) in counts.items() if tt == t] or [0])
        if n_tok == 0 or not np.isfinite(maj):
            reason = "no evaluated tokens"
        elif n_values < 2:
            reason = f"fewer than 2 label values present ({n_values})"
        elif maj >= max_majority_share:
            reason = f"near-constant: majority share {maj:.3f} >= max_majority_share {max_majority_share}"
        else:
            included.append(t)
            continue
        excluded.append({"task": t, "majority_share": None if not np.isfinite(maj) else round(maj, 6),
                         "n_label_values": n_values, "reason": reason})
    return included, excluded


def _interval(draws: np.ndarray, *, discrete: bool) -> list[float] | None:
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return None
    if discrete:  # nearest-rank ends, so the interval is made of layers that were chosen
        return [int(np.percentile(draws, CI_PERCENTILES[0], method="lower")),
                int(np.percentile(draws, CI_PERCENTILES[1], method="higher"))]
    return [float(v) for v in np.percentile(draws, CI_PERCENTILES)]


def choose_best_layers(
    df: pd.DataFrame,
    nn_counts: Mapping[tuple[str, str, str, int], tuple[np.ndarray, np.ndarray]],
    cos_counts: Mapping[tuple[str, str, int], tuple[np.ndarray, np.ndarray]],
    *,
    n_images: int,
    final_norm: int | None,
    max_majority_share: float,
    n_bootstrap: int,
    seed: int,
    notes: list[str],
) -> dict[str, dict[str, Any]]:
    """Best-aligned layer per (visual, group) with its bootstrap intervals.

    ``df``: the align table (columns of :func:`.align.align`, with ``majority_share``);
    ``nn_counts``: (visual, group, task, layer) → (correct per image (n_images,), label
    counts per image (n_images, K)); ``cos_counts``: (visual, group, layer) → (sum of max
    cosines per image, tokens per image); ``final_norm``: the layer left out of the argmax.
    Returns ``{"<visual>/<group>": {layer, criterion, value, value_ci, layer_ci,
    layer_share, n_images, n_bootstrap, value_at_layer0, included_tasks, excluded_tasks,
    fallback}}`` (pairs with no finite criterion are left out); fallbacks are appended to
    ``notes``. Sets ``df["is_best"]`` in place.
    """
    W = bootstrap_weights(n_images, int(n_bootstrap), np.random.default_rng([seed, 7]))
    ones = np.ones((1, n_images))
    df["is_best"] = False
    best: dict[str, dict[str, Any]] = {}
    for (vmode, gname), sub in df.groupby(["visual", "group"], sort=False):
        if not (sub["n_tokens"] > 0).any():
            continue  # an empty group: its rows (n_tokens 0) say so; no best layer
        layers = np.array(sorted(int(l) for l in sub["layer"].unique()))
        nn = sub[sub["measure"] == "nn_accuracy"]
        tasks = list(dict.fromkeys(nn["task"]))
        counts = {(t, l): c for (v, g, t, l), c in nn_counts.items() if v == vmode and g == gname}
        included, excluded = task_exclusions(nn, counts, tasks, max_majority_share)
        fallback = None
        if included:
            crit_name = "normalized_nn_accuracy"

            def stat(w: np.ndarray) -> np.ndarray:  # (B, n_layers)
                per_task = []
                for t in included:
                    cs = [counts.get((t, int(l))) for l in layers]
                    K = max(c[1].shape[1] for c in cs if c is not None)
                    cor = np.stack([c[0] if c else np.zeros(n_images) for c in cs])
                    lab = np.stack([c[1] if c else np.zeros((n_images, K)) for c in cs])
                    per_task.append(_norm_acc_draws(w, cor, lab))
                return _nanmean0(np.stack(per_task))
        else:
            crit_name = "mean_max_cos"
            fallback = ("no task qualifies for the normalized nn_accuracy criterion" if tasks else
                        "no label tasks") + ": best layer by mean_max_cos"

            def stat(w: np.ndarray) -> np.ndarray:
                cs = [cos_counts.get((vmode, gname, int(l))) for l in layers]
                s = np.stack([c[0] if c else np.zeros(n_images) for c in cs])
                n = np.stack([c[1] if c else np.zeros(n_images) for c in cs])
                with np.errstate(divide="ignore", invalid="ignore"):
                    return (w @ s.T) / (w @ n.T)

        point = stat(ones)[0]
        eligible = layers != final_norm if final_norm is not None else np.ones(len(layers), bool)
        cand = np.where(eligible & np.isfinite(point), point, -np.inf)
        if not np.isfinite(cand).any():
            notes.append(f"{vmode}/{gname}: no finite {crit_name} at any eligible layer: no best layer")
            continue
        bi = int(cand.argmax())
        value_ci = layer_ci = share = None
        if W.shape[0]:
            draws = stat(W)
            dc = np.where(eligible[None] & np.isfinite(draws), draws, -np.inf)
            ok = np.isfinite(dc).any(1)
            picked = layers[dc.argmax(1)][ok].astype(float)
            layer_ci = _interval(picked, discrete=True)
            value_ci = _interval(draws[:, bi], discrete=False)
            share = float((picked == layers[bi]).mean()) if picked.size else None
        at0 = point[layers == 0]
        best[f"{vmode}/{gname}"] = {
            "layer": int(layers[bi]), "criterion": crit_name, "value": float(point[bi]),
            "value_ci": value_ci, "layer_ci": layer_ci, "layer_share": share,
            "n_images": int(n_images), "n_bootstrap": int(W.shape[0]),
            "value_at_layer0": float(at0[0]) if at0.size and np.isfinite(at0[0]) else None,
            "included_tasks": included, "excluded_tasks": excluded, "fallback": fallback,
        }
        if fallback and tasks:
            notes.append(f"{vmode}/{gname}: {fallback}")
        df.loc[(df["visual"] == vmode) & (df["group"] == gname) & (df["layer"] == layers[bi]), "is_best"] = True
    return best
