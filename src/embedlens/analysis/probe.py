"""Probing classifiers (docs/methods.md §2): do visual tokens encode colours, shapes, text?

For each probed feature layer (vision-encoder output, ``h[0]`` … ``h[L]`` or a configured
subset), each label task and each token group (all, alive, dead, sink):

* multinomial logistic regression (sklearn, lbfgs) on standardized features (optional PCA),
  trained on a split **by image** (no image on both sides; one split shared by every layer,
  task and group, from ``seed``);
* accuracy on the test images with a Wilson score interval on the effective number of
  test tokens (image-level design effect), macro-F1 with an image-level percentile
  bootstrap widened to at least the accuracy's half-widths (``intervals``: valid at 0 and
  1; tokens of one image are not independent). **Deviation, stated:** docs/methods.md asks for
  a bootstrap CI; a percentile bootstrap over images collapses to [1, 1] when every test
  image is perfect;
* majority baseline (most frequent training label);
* control task (Hewitt & Liang 2019) and selectivity = accuracy − control accuracy, with
  Newcombe's paired score interval (same test tokens, same effective sizes).
  **Deviation, stated** (docs/methods.md §2): the reference description says "labels shuffled
  consistently per label value";
  taken literally (a fixed relabelling of each label value) the control task is a
  relabelling of the real one and selectivity would be ≈ 0 by construction. We follow H&L:
  each token *type* gets a random label drawn from the task's empirical label
  distribution, consistently for every occurrence of the type; the type is the token's
  patch position (``control_type="position"``, default) or its EmbedLens top-1 id
  (``"top1_id"``). A probe that only memorizes types scores the control accuracy.
* groups with too few tokens / images / training classes get a row with ``status`` saying
  so (``too_few_tokens``, ``too_few_images``, ``single_class``); a test split with one class
  is ``not_evaluable`` (not fitted: its accuracy would score one class only, and its
  selectivity is meaningless); ``reason`` says why for every row not ``ok``.

Patch-compression check **[ours]**: hit@k = share of labelled tokens whose label word
(colour name, shape name, character) is among the top-k EmbedLens neighbours of the token
at ``h[0]`` (from ``categories.parquet``; word pieces compared after stripping ▁/Ġ markers,
case-insensitively except single characters: the letter "A" is not the article "a"), with
two chance levels: ``chance_uniform`` (k ids drawn uniformly from
the candidate vocabulary) and ``chance_label_prior`` (the same neighbours, label drawn
from the group's label distribution: the hit rate a token would get without encoding its
own label).

A data set without labels writes the same files with no rows and
``status: "skipped"``, ``reason: "no labels"`` in ``summary.json``.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embedlens.runtime import progress_bar
from embedlens.store import layer_values, valid_mask

from .features import GROUP_DEFS, gather_features, resolve_groups  # noqa: F401 - re-exported
from .intervals import (
    bootstrap_f1_ci,
    bootstrap_weights,
    confusion,
    effective_n,
    metrics_from_confusion,
    newcombe_paired_difference,
    widen,
    wilson_interval,
)
from .labels import PatchLabels, grid_unknown_tokens
from .outputs import note, step_reader, step_summary, write_json, write_parquet
from .reference import check_mode
from .vocab import load_vocab, normalize_word

OUTPUT_FILES = {"probe": "probe.parquet", "hitk": "hitk.parquet", "summary": "summary.json"}

PROBE_COLUMNS = [
    "feature", "layer", "task", "group", "status", "reason", "n_tokens", "n_train", "n_test",
    "n_train_images", "n_test_images", "n_classes", "accuracy", "accuracy_ci_low",
    "accuracy_ci_high", "accuracy_n_eff", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high",
    "majority_accuracy", "majority_macro_f1", "control_accuracy", "control_macro_f1",
    "selectivity", "selectivity_ci_low", "selectivity_ci_high", "converged", "seed",
]
HITK_COLUMNS = [
    "task", "group", "k", "n_tokens", "hits", "hit_rate", "chance_uniform",
    "chance_label_prior", "n_label_words_in_vocab", "n_label_words",
]


# --------------------------------------------------------------------------- control task
def control_labels(types: np.ndarray, labels: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Hewitt & Liang control task: each distinct type gets a label drawn from the
    empirical distribution of ``labels``; every token of a type gets its type's label."""
    p = np.bincount(labels, minlength=n_classes).astype(np.float64)
    p /= p.sum()
    uniq, inv = np.unique(types, return_inverse=True)
    drawn = rng.choice(n_classes, size=uniq.size, p=p)
    return drawn[inv]


def _fit_eval(xtr, ytr, xte, *, C, max_iter, pca_components, seed):
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(xtr)
    xtr = scaler.transform(xtr)
    xte = scaler.transform(xte)
    if pca_components:
        nc = int(min(pca_components, xtr.shape[0] - 1, xtr.shape[1]))
        if nc >= 1:
            pca = PCA(n_components=nc, random_state=seed).fit(xtr)
            xtr, xte = pca.transform(xtr), pca.transform(xte)
    clf = LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xtr, ytr)
    converged = bool(np.all(np.asarray(clf.n_iter_) < max_iter))
    return clf.predict(xte), converged


# --------------------------------------------------------------------------- hit@k
def hit_at_k(categories: pd.DataFrame, token_labels: Mapping[str, np.ndarray],
             label_words: Mapping[str, Sequence[str]], *, groups: Mapping[str, tuple[str, ...] | None] = GROUP_DEFS,
             vocab=None, exclude_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Patch-compression check **[ours]** (module doc): hit@k per task, group and k ≤ the
    k stored in ``categories`` (``top{r}_token`` columns)."""
    K = 0
    while f"top{K + 1}_token" in categories.columns:
        K += 1
    if K == 0:
        raise ValueError("categories table has no top{r}_token columns")
    norm_cache: dict[str, str] = {}

    def nw(s):
        s = str(s)
        if s not in norm_cache:
            norm_cache[s] = normalize_word(s)
        return norm_cache[s]

    words_nk = np.array([[nw(s) for s in categories[f"top{r}_token"].to_numpy()] for r in range(1, K + 1)],
                        dtype=object).T if len(categories) else np.empty((0, K), dtype=object)
    vocab_counts: dict[str, int] | None = None
    n_cand = None
    if vocab is not None:
        voc = load_vocab(vocab)
        excl = set(int(i) for i in (exclude_ids or []))
        vocab_counts = {}
        for i, s in enumerate(voc.strings):
            if i not in excl:
                w = nw(s)
                vocab_counts[w] = vocab_counts.get(w, 0) + 1
        n_cand = voc.size - len(excl)
    labels_col = categories["label"].to_numpy() if "label" in categories else None
    rows = []
    for task, lab in token_labels.items():
        words = [normalize_word(w) for w in label_words[task]]
        nv = len(words)
        for gname, members in groups.items():
            gm = np.ones(len(categories), bool) if members is None else np.isin(labels_col, members)
            m = gm & (lab >= 0)
            n = int(m.sum())
            y = lab[m]
            wk = words_nk[m]
            p = np.bincount(y, minlength=nv).astype(float) / max(n, 1)
            in_vocab = sum(1 for w in words if vocab_counts and vocab_counts.get(w, 0) > 0)
            for k in range(1, K + 1):
                if n == 0:
                    rows.append({"task": task, "group": gname, "k": k, "n_tokens": 0, "hits": 0,
                                 "hit_rate": np.nan, "chance_uniform": np.nan, "chance_label_prior": np.nan,
                                 "n_label_words_in_vocab": in_vocab if vocab_counts else None,
                                 "n_label_words": nv})
                    continue
                # contains[i, v]: word of label value v among the top-k of token i
                contains = np.zeros((n, nv), dtype=bool)
                for v, w in enumerate(words):
                    contains[:, v] = (wk[:, :k] == w).any(axis=1)
                hits = contains[np.arange(n), y]
                prior = float((contains.astype(float) @ p).mean())
                if vocab_counts is not None and n_cand:
                    mv = np.array([vocab_counts.get(w, 0) for w in words], dtype=float)
                    miss = np.ones(nv)
                    for i in range(k):
                        miss *= np.clip((n_cand - mv - i) / (n_cand - i), 0, 1)
                    chance_u = float(((1 - miss)[y]).mean())
                else:
                    chance_u = np.nan
                rows.append({"task": task, "group": gname, "k": k, "n_tokens": n, "hits": int(hits.sum()),
                             "hit_rate": float(hits.mean()), "chance_uniform": chance_u,
                             "chance_label_prior": prior,
                             "n_label_words_in_vocab": in_vocab if vocab_counts else None,
                             "n_label_words": nv})
    return pd.DataFrame(rows, columns=HITK_COLUMNS)


def _with_neighbours(cat: pd.DataFrame, hidden, voc, k: int, exclude_ids, img_pos, tok, *,
                     max_block_bytes: int) -> pd.DataFrame:
    """``cat`` with ``top{r}_token`` recomputed for r = 1..k (h[0], EmbedLens search over
    the loaded vocabulary ``voc``)."""
    from .vocab import VocabIndex, excluded_ids

    excl = (excluded_ids(voc) if exclude_ids is None else np.asarray(sorted(set(map(int, exclude_ids)))))
    x = gather_features(hidden, "llm", 0, img_pos, tok, max_block_bytes=max_block_bytes)
    ids, _ = VocabIndex(voc.embedding, exclude=excl).search(x, k)
    out = cat.drop(columns=[c for c in cat.columns if re.fullmatch(r"top\d+_(token|text|id|sim)", c)])
    arr = np.asarray(voc.strings + [""], dtype=object)
    for r in range(k):
        out[f"top{r + 1}_id"] = ids[:, r]
        out[f"top{r + 1}_token"] = arr[ids[:, r]]
    return out


# --------------------------------------------------------------------------- scoring
def _status(row: Mapping[str, Any], split_ok: bool, min_tokens: int, min_test_tokens: int,
            test_classes: np.ndarray, names: Sequence[str]) -> tuple[str, str | None]:
    """(status, reason) of a probe row before fitting; ("ok", None) when it is scored."""
    if not split_ok:
        return "too_few_images", "fewer than 2 labelled images: no split by image"
    if row["n_train"] < min_tokens or row["n_test"] < min_test_tokens:
        return "too_few_tokens", (f"{row['n_train']} training tokens (min_tokens {min_tokens}), "
                                  f"{row['n_test']} test tokens (min_test_tokens {min_test_tokens})")
    if row["n_classes"] < 2:
        return "single_class", "one class among the training tokens: nothing to learn"
    if test_classes.size < 2:
        # accuracy would score one class only: a constant predictor is perfect, and the
        # selectivity compares two single-class scores
        return "not_evaluable", (f"one class ({names[int(test_classes[0])]!r}) among the {row['n_test']} "
                                 f"test tokens of {row['n_test_images']} image(s)")
    return "ok", None


def _scored(y: np.ndarray, pred: np.ndarray, inv: np.ndarray, n_img: int, ncls: int, ci: float):
    """(accuracy, macro-F1, accuracy Wilson CI on n_eff, n_eff, per-image confusion
    (n_img, C, C)) of test predictions; ``inv``: each token's test-image index."""
    per_img = np.zeros((n_img, ncls, ncls), dtype=np.int64)
    np.add.at(per_img, (inv, y, pred), 1)
    acc, mf1 = metrics_from_confusion(per_img.sum(0))
    n_eff, _ = effective_n(np.bincount(inv, weights=(pred == y), minlength=n_img),
                           np.bincount(inv, minlength=n_img))
    return float(acc), float(mf1), wilson_interval(float(acc), n_eff, ci), float(n_eff), per_img


# --------------------------------------------------------------------------- main
def _skipped(out: Path, reason: str, extra: dict[str, Any]) -> dict[str, Any]:
    write_parquet(pd.DataFrame({c: pd.Series(dtype="float64") for c in PROBE_COLUMNS}), out / OUTPUT_FILES["probe"])
    write_parquet(pd.DataFrame({c: pd.Series(dtype="float64") for c in HITK_COLUMNS}), out / OUTPUT_FILES["hitk"])
    summary = step_summary("probe", {"status": "skipped", "reason": reason, **extra,
                                     "methods_notes": [], "files": dict(OUTPUT_FILES)})
    write_json(summary, out / OUTPUT_FILES["summary"])
    return summary


def probe(
    hidden,
    categories: pd.DataFrame | str | Path,
    labels: PatchLabels | None,
    out_dir: str | Path,
    *,
    layers: Sequence[int] | str | None = "all",
    include_vision: bool = True,
    vision_layer: Any = None,
    vision_token_offset: int | str = "auto",
    tasks: Sequence[str] | None = None,
    groups: Mapping[str, Sequence[str] | None] | Sequence[str] | None = ("all", "alive", "dead", "sink"),
    test_fraction: float = 0.3,
    seed: int = 0,
    max_tokens: int | None = 8000,
    pca_components: int | None = None,
    C: float = 1.0,
    max_iter: int = 300,
    n_bootstrap: int = 200,
    ci: float = 0.95,
    min_tokens: int = 20,
    min_test_tokens: int = 10,
    control_type: str = "position",
    hit_k: int | None = None,
    vocab=None,
    exclude_ids: Sequence[int] | None = None,
    max_block_bytes: int = 256 * 2**20,
    mode: str = "ours",
    model: str | None = None,
    dataset: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the probes and the hit@k check; write ``probe.parquet``, ``hitk.parquet`` and
    ``summary.json`` into ``out_dir``.

    Parameters (config knobs)
    -------------------------
    hidden : hidden-state store (``open_hidden``).
    categories : ``categories.parquet`` (path, its directory, or DataFrame) from categorize:
        gives the groups (``label``) and the h[0] neighbours for hit@k.
    labels : patch labels (``read_patch_labels``); ``None``/empty → skipped result files.
    layers : LLM layers probed (``None``/``"all"``: every extracted layer); ``include_vision``
        adds the vision output (``feature="vision"``, ``layer=-1``) when its tokens map 1:1.
    tasks : label tasks (default / empty: all); groups : names from all, alive, dead, sink
        (= vit_sink ∪ llm_sink), or a mapping name → category labels.
    test_fraction, seed : image split (≥ 1 image each side) and every random draw.
    max_tokens : cap on labelled tokens used (uniform sample, seeded) – the speed knob.
    pca_components : optional PCA after standardization (fit on train).
    C, max_iter : logistic regression (L2, lbfgs).
    n_bootstrap, ci : image-level percentile bootstrap draws (macro-F1) and the level of every
        interval (accuracy: Wilson on the effective test size; selectivity: Newcombe paired;
        see ``embedlens.analysis.intervals``).
    min_tokens, min_test_tokens : fewer training / test tokens → ``status="too_few_tokens"``;
        one class among the test tokens → ``status="not_evaluable"`` (not fitted).
    control_type : ``"position"`` or ``"top1_id"`` (see module doc).
    hit_k : largest k of the hit@k check (default: the k stored in ``categories``); any other
        k recomputes the h[0] neighbours with ``vocab`` before any probe is fitted.
    vocab, exclude_ids : vocabulary store and excluded ids, for hit@k's uniform chance and a
        recomputation (default exclusions: those recorded by categorize when ``categories``
        is a path, else the vocabulary's special rows). mode : the model's ``mode`` in
        config.yaml, recorded in ``settings``.

    Raises
    ------
    ValueError
        ``tasks`` not among the data set's label tasks; an unknown ``control_type`` or token
        group; ``layers`` not in the store; categories that do not match the store (images or
        tokens missing); ``hit_k`` other than the stored k without ``vocab`` (raised before
        any probe is fitted); an unknown ``mode``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = {"model": model, "dataset": dataset, "settings": {"mode": check_mode(mode)}}
    if labels is None or labels.empty:
        return _skipped(out, "no labels", base)
    if isinstance(categories, (str, Path)):
        p = Path(categories)
        cat_path = p / "categories.parquet" if p.is_dir() else p
        if exclude_ids is None and (cat_path.parent / "summary.json").exists():
            from .outputs import read_summary

            exclude_ids = read_summary(cat_path.parent, "categorize")["results"].get("excluded_ids")
        categories = pd.read_parquet(cat_path)
    # hit@k with another k than categorize stored needs the vocabulary: say so before fitting
    k_stored = sum(1 for c in categories.columns if re.fullmatch(r"top\d+_token", c))
    recompute_k = hit_k is not None and int(hit_k) != k_stored
    if recompute_k and vocab is None:
        raise ValueError(f"probe: hit_k={hit_k} differs from the k={k_stored} stored in the categories "
                         "table; pass the vocabulary store (probe(vocab=...), `embedlens probe --vocab "
                         "results/hidden/<model>/vocab.zarr`) to recompute the h[0] neighbours, or leave "
                         "probe.hit_k unset in config.yaml")
    voc = load_vocab(vocab) if vocab is not None else None
    groups = resolve_groups(groups)
    task_names = list(labels.tasks) if not tasks else [t for t in tasks]
    unknown = [t for t in task_names if t not in labels.tasks]
    if unknown:
        raise ValueError(f"probe tasks {unknown} not in the data set's label tasks {list(labels.tasks)}")
    if control_type not in ("position", "top1_id"):
        raise ValueError("control_type must be 'position' or 'top1_id'")
    cat = categories.reset_index(drop=True)
    tl_all = labels.for_table(cat)
    token_labels = {t: tl_all[t] for t in task_names}
    if not any((v >= 0).any() for v in token_labels.values()):
        return _skipped(out, "no labelled tokens (labels do not cover the extracted images)", base)

    # store positions of the categorized tokens
    pos_of = {str(x): i for i, x in enumerate(hidden["image_id"].values)}
    img_pos = np.array([pos_of.get(str(x), -1) for x in cat["image_id"].to_numpy()], dtype=np.int64)
    tok = cat["token"].to_numpy(np.int64)
    if (img_pos < 0).any():
        raise ValueError("categories and hidden store disagree: images missing from the store")
    vm = valid_mask(hidden)
    if not vm[img_pos, tok].all():
        raise ValueError("categories contain tokens that are not valid in the store")

    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero(np.any(np.stack([v >= 0 for v in token_labels.values()]), axis=0))
    if max_tokens is not None and labelled.size > max_tokens:
        labelled = np.sort(rng.choice(labelled, size=int(max_tokens), replace=False))
    s_img_id = cat["image_id"].astype(str).to_numpy()[labelled]
    images = np.unique(s_img_id)
    perm = np.random.default_rng([seed, 1]).permutation(images.size)
    n_test_img = int(round(test_fraction * images.size))
    n_test_img = min(max(n_test_img, 1), images.size - 1) if images.size >= 2 else 0
    test_images = set(images[perm[:n_test_img]].tolist())
    is_test = np.array([x in test_images for x in s_img_id])
    split_ok = images.size >= 2

    # control labels, fixed per task (independent of layer and group)
    if control_type == "position":
        types = cat["patch_row"].to_numpy(np.int64)[labelled] * 100003 + cat["patch_col"].to_numpy(np.int64)[labelled]
    else:
        types = cat["top1_id"].to_numpy(np.int64)[labelled]
    ctrl = {}
    for ti, t in enumerate(task_names):
        y = token_labels[t][labelled]
        m = y >= 0
        c = np.full(y.shape, -1, dtype=np.int64)
        if m.any():
            c[m] = control_labels(types[m], y[m], len(labels.tasks[t]), np.random.default_rng([seed, 2, ti]))
        ctrl[t] = c
    grp_label = cat["label"].to_numpy()[labelled] if "label" in cat else np.full(labelled.size, "alive")

    # feature list
    feats: list[tuple[str, int | None]] = []
    grid_unknown, notes = grid_unknown_tokens(cat, "the probes and hit@k")
    vl, vmap = None, None
    if include_vision:
        from .neighbours import _vision_mapping

        vmap, vl, vnote = _vision_mapping(hidden, vision_layer, vision_token_offset, vm.sum(axis=1))
        if vl is not None and (vmap[img_pos[labelled], tok[labelled]] >= 0).any():
            feats.append(("vision", -1))
        else:
            notes.append("vision output not probed: " + vnote)
    all_layers = layer_values(hidden)
    use_layers = all_layers if layers in (None, "all") else [int(l) for l in layers]
    missing = sorted(set(use_layers) - set(all_layers))
    if missing:
        raise ValueError(f"probe layers {missing} not in the store (layers {all_layers})")
    feats += [(f"h{l}", l) for l in use_layers]

    # hit@k neighbours first: a recomputation that cannot work must not wait for the probes
    if exclude_ids is None and voc is not None:
        from .vocab import excluded_ids

        exclude_ids = excluded_ids(voc).tolist()
    hit_cat = cat
    if recompute_k:
        hit_cat = _with_neighbours(cat, hidden, voc, int(hit_k), exclude_ids, img_pos, tok,
                                   max_block_bytes=max_block_bytes)
        notes.append(f"hit@k: h[0] neighbours recomputed with k={hit_k} (categories hold k={k_stored})")

    rows: list[dict[str, Any]] = []
    n_fits = len(feats) * len(task_names) * len(groups)
    bar = progress_bar(total=n_fits, enabled=progress, desc="probe", unit="probe")
    for fname, layer in feats:
        X = gather_features(hidden, "vision" if fname == "vision" else "llm", layer, img_pos[labelled],
                             tok[labelled], vision_layer=vl, vision_map=vmap,
                             max_block_bytes=max_block_bytes)
        has_x = np.isfinite(X).all(axis=1)
        for ti, t in enumerate(task_names):
            y_all = token_labels[t][labelled]
            ncls = len(labels.tasks[t])
            for gname, members in groups.items():
                bar.update(1)
                gm = np.ones(labelled.size, bool) if members is None else np.isin(grp_label, members)
                m = gm & (y_all >= 0) & has_x
                tr = m & ~is_test
                te = m & is_test
                row: dict[str, Any] = {
                    "feature": fname, "layer": layer, "task": t, "group": gname,
                    "n_tokens": int(m.sum()), "n_train": int(tr.sum()), "n_test": int(te.sum()),
                    "n_train_images": int(len(np.unique(s_img_id[tr]))),
                    "n_test_images": int(len(np.unique(s_img_id[te]))),
                    "n_classes": int(len(np.unique(y_all[tr]))), "seed": seed,
                }
                row["status"], row["reason"] = _status(row, split_ok, min_tokens, min_test_tokens,
                                                       np.unique(y_all[te]), labels.tasks[t])
                if row["status"] != "ok":
                    rows.append(row)
                    continue
                ytr, yte = y_all[tr], y_all[te]
                pred, conv = _fit_eval(X[tr], ytr, X[te], C=C, max_iter=max_iter,
                                       pca_components=pca_components, seed=seed)
                uimg, inv = np.unique(s_img_id[te], return_inverse=True)
                acc, mf1, acc_ci, n_eff, per_img = _scored(yte, pred, inv, uimg.size, ncls, ci)
                w = bootstrap_weights(uimg.size, n_bootstrap, np.random.default_rng([seed, 3]))
                f1_ci = widen(mf1, bootstrap_f1_ci(per_img, w, ci), acc - acc_ci[0], acc_ci[1] - acc)
                maj = np.bincount(ytr, minlength=ncls).argmax()
                macc, mmf1 = metrics_from_confusion(confusion(yte, np.full_like(yte, maj), ncls))
                # control task, same probe, same split, same test tokens (paired)
                ctr, cte = ctrl[t][tr], ctrl[t][te]
                cacc = cmf1 = np.nan
                sel_ci, cconv = (np.nan, np.nan), True
                if len(np.unique(ctr)) >= 2:
                    cpred, cconv = _fit_eval(X[tr], ctr, X[te], C=C, max_iter=max_iter,
                                             pca_components=pca_components, seed=seed)
                    cacc, cmf1, cacc_ci, _, _ = _scored(cte, cpred, inv, uimg.size, ncls, ci)
                    sel_ci = newcombe_paired_difference(acc, acc_ci, cacc, cacc_ci,
                                                        np.stack([pred == yte, cpred == cte], axis=1))
                row.update({
                    "accuracy": float(acc), "accuracy_ci_low": acc_ci[0], "accuracy_ci_high": acc_ci[1],
                    "accuracy_n_eff": n_eff,
                    "macro_f1": float(mf1), "macro_f1_ci_low": f1_ci[0], "macro_f1_ci_high": f1_ci[1],
                    "majority_accuracy": float(macc), "majority_macro_f1": float(mmf1),
                    "control_accuracy": float(cacc), "control_macro_f1": float(cmf1),
                    "selectivity": float(acc - cacc) if np.isfinite(cacc) else np.nan,
                    "selectivity_ci_low": sel_ci[0], "selectivity_ci_high": sel_ci[1],
                    "converged": bool(conv and cconv),
                })
                rows.append(row)
        del X
    bar.close()
    table = pd.DataFrame(rows)
    for c in PROBE_COLUMNS:
        if c not in table:
            table[c] = np.nan
    table = table[PROBE_COLUMNS]
    hit = hit_at_k(hit_cat, token_labels, {t: labels.tasks[t] for t in task_names}, groups=groups,
                   vocab=voc, exclude_ids=exclude_ids)

    ok = table[table["status"] == "ok"]
    best = {}
    for (t, g), sub in ok.groupby(["task", "group"]):
        r = sub.loc[sub["accuracy"].idxmax()]
        best[f"{t}/{g}"] = {"feature": r["feature"], "layer": int(r["layer"]), "accuracy": float(r["accuracy"]),
                            "selectivity": None if pd.isna(r["selectivity"]) else float(r["selectivity"])}
    summary = {
        "status": "ok", **base,
        "tasks": task_names, "groups": {k: (None if v is None else list(v)) for k, v in groups.items()},
        "features": [f for f, _ in feats],
        "split": {"n_images": int(images.size), "n_test_images": int(n_test_img),
                  "test_images": sorted(test_images), "n_tokens_used": int(labelled.size)},
        "status_counts": table["status"].value_counts().to_dict(),
        "grid_unknown": grid_unknown,
        "best_by_task_group": best,
        "hitk_vocabulary": None if voc is None else {"size": voc.size, "n_excluded": len(exclude_ids or [])},
        "settings": {"test_fraction": test_fraction, "seed": seed, "max_tokens": max_tokens,
                     "pca_components": pca_components, "C": C, "max_iter": max_iter,
                     "n_bootstrap": n_bootstrap, "ci": ci, "min_tokens": min_tokens,
                     "min_test_tokens": min_test_tokens, "control_type": control_type,
                     "hit_k": hit_k, "mode": mode},
        "notes": notes,
        "methods_notes": [
            note("reference", "probe", "Multinomial logistic regression (lbfgs, L2, C="
                 f"{C}) on standardized features, split by image, seed {seed}; accuracy, macro-F1, "
                 "majority baseline; a test split with one class is not evaluable (not scored)."),
            note("deviation", "probe_intervals",
                 f"{ci:.0%} intervals valid at 0 and 1, where an image-level percentile bootstrap "
                 "collapses: accuracy gets a Wilson score interval on n_eff = n / deff test tokens "
                 "(Korn & Graubard: deff = between-image over binomial variance, in [1, n]; 1 at "
                 "accuracy 0 or 1); selectivity Newcombe's paired interval; macro-F1 an "
                 f"image-level bootstrap ({n_bootstrap} draws) widened to the accuracy's half-widths."),
            note("deviation", "control_task",
                 "Control task per Hewitt & Liang: each token type (" + control_type + ") gets a random "
                 "label from the task's empirical label distribution; the reference's 'shuffled per label "
                 "value' read literally is a relabelling of the real task (selectivity ≡ 0); docs/methods.md §2."),
            note("ours", "patch_compression_hitk",
                 "hit@k: label word among the top-k EmbedLens neighbours at h[0] (marker-stripped, "
                 "case-insensitive match except single characters); chance = uniform draw from the candidate vocabulary and "
                 "label-prior (the token's neighbours vs a label drawn from the group's distribution)."),
        ],
        "seconds": time.perf_counter() - t0,
        "files": dict(OUTPUT_FILES),
    }
    write_parquet(table, out / OUTPUT_FILES["probe"])
    write_parquet(hit, out / OUTPUT_FILES["hitk"])
    summary = step_summary("probe", summary)
    write_json(summary, out / OUTPUT_FILES["summary"])
    return summary


read_probe = step_reader("probe")
