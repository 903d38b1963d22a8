"""Anchor discovery for models without known anchor ids **[ours]**.

docs/methods.md §1 gives no released procedure for this; everything in this module is the
project's own and is reported as such (``methods_notes``). It runs on the extracted data
alone (the per-token table built by :func:`embedlens.analysis.categorize.compute_h0_neighbours`)
and is deterministic: no sampling, ties broken by id.

Groups and their token sets
---------------------------
* ``vit_sink``: tokens whose vision-encoder output norm is a high outlier (the ViT
  "register"/high-norm artifacts). Needs the ``norm_vision`` column (NaN where the vision
  token does not map 1:1 onto the LLM token → group not discoverable, said in evidence).
* ``llm_sink``: tokens whose hidden-state norm is a high outlier in at least one *early*
  LLM layer (massive activations), excluding the tokens already found as ViT sinks (those
  carry their own group).
* ``dead``: tokens whose top-1 neighbour is an image-independent *hub* id (below).

Outlier rule (both sinks): robust z-score of log-norm (median / 1.4826·MAD, pooled over all
tokens of the data set, one-sided) ``> vit_norm_z`` / ``llm_norm_z`` **and**
norm ≥ ``min_norm_ratio`` × median norm. The early layers are ``llm_sink_layers`` (default
1 … max(2, L // 4); layers not extracted are skipped and listed in evidence). If the outliers exceed ``max_outlier_share`` of the tokens, they are not a
minority artifact and the group is left empty (said in evidence).

Anchor ids of a sink group: the group's most frequent top-1 ids, in order of
frequency, keeping an id when it is top-1 for ≥ ``anchor_min_group_share`` of the group's
tokens, is ``anchor_min_lift`` × more frequent as top-1 in the group than over all tokens
(so a global hub is not taken as a sink anchor), passes the content test below (so a
content word such as a colour name that wins the patches of its colour is not taken as a
sink), is not already an anchor of an earlier group, up to ``anchor_max_ids`` ids.

Hub ids (dead): top-1 ids that (a) are top-1 for ≥ ``hub_min_share`` of all tokens,
(b) are top-1 of at least one token in ≥ ``hub_min_image_share`` of the images, with at
least ``hub_min_images`` images in the data, (c) pass the content test. Of the ids passing
(a)–(c), those with ≥ ``hub_min_relative_share`` × the leading one's share are hubs (a hub
dominates; frequent content words in label-free data sets usually do not), up to
``hub_max_ids``.

Content test (sink anchors and hubs alike, :func:`content_criteria`): for every label task
(except ``hub_ignore_tasks``: ``background`` by default, because dead tokens are expected on
empty background, which is absence of content) the uncertainty coefficient
U(indicator | label) = I / H(indicator) of the indicator "this id is the token's top-1" over
labelled tokens is ≤ ``hub_max_label_info``; and the id's string is not a label word of any
task (``vocab.normalize_word``) unless the indicator is not enriched on that label (lift
< 2 over the label's prior). Without labels it reduces to the label-word test and evidence
says so.

Evidence: every candidate (kept or rejected) lists its ``criteria``, each with its value,
threshold and margin, signed so that positive = passes (``value − threshold`` for a lower
bound, ``threshold − value`` for an upper bound), so a near miss reads as, e.g., a margin
of -0.01 on the label information; ``rejected_because`` words the failed ones.

Pooled data sets: a table with a ``dataset`` column (several data sets of one model,
:mod:`.model_anchors`) is one population; images are told apart per data set, and each
candidate also lists its top-1 share per data set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .outputs import note
from .stats import robust_z, uncertainty_coefficient
from .vocab import normalize_word

GROUPS = ("vit_sink", "llm_sink", "dead")

DEFAULTS: dict[str, Any] = {
    "vit_norm_z": 6.0,
    "llm_norm_z": 6.0,
    "min_norm_ratio": 2.0,
    "max_outlier_share": 0.2,
    "min_group_tokens": 3,
    "llm_sink_layers": None,  # None → 1 .. max(2, L // 4)
    "anchor_max_ids": 3,
    "anchor_min_group_share": 0.1,
    "anchor_min_lift": 2.0,
    "hub_min_share": 0.05,
    "hub_min_relative_share": 0.5,
    "hub_min_image_share": 0.5,
    "hub_min_images": 2,
    "hub_max_label_info": 0.2,
    "hub_ignore_tasks": ("background",),
    "hub_max_ids": 3,
}

_NORM_COL = re.compile(r"^norm_h(\d+)$")


def _top1(table: pd.DataFrame) -> np.ndarray:
    return table["top1_id"].to_numpy(np.int64)


def outlier_mask(
    norms: np.ndarray, *, z_threshold: float, min_norm_ratio: float
) -> tuple[np.ndarray, dict[str, float]]:
    """High outliers of a norm vector by the module's rule. NaN → never an outlier."""
    norms = np.asarray(norms, dtype=np.float64)
    fin = np.isfinite(norms) & (norms > 0)
    logn = np.where(fin, np.log(np.where(fin, norms, 1.0)), np.nan)
    z, med, scale = robust_z(logn)
    median_norm = float(np.exp(med)) if np.isfinite(med) else float("nan")
    mask = fin & (np.nan_to_num(z, nan=-np.inf) > z_threshold) & (norms >= min_norm_ratio * median_norm)
    thr = float(np.exp(med + z_threshold * scale)) if np.isfinite(med) else float("nan")
    return mask, {
        "median_norm": median_norm,
        "log_norm_scale": float(scale),
        "norm_threshold": max(thr, min_norm_ratio * median_norm) if np.isfinite(thr) else float("nan"),
        "max_norm": float(np.nanmax(norms)) if fin.any() else float("nan"),
        "n_finite": int(fin.sum()),
    }


def _image_keys(table: pd.DataFrame) -> np.ndarray:
    """One key per token's image; pooled tables (a ``dataset`` column) prefix the data set,
    so two data sets' ``img000`` are two images."""
    ids = table["image_id"].astype(str).to_numpy()
    if "dataset" in table:
        return (table["dataset"].astype(str) + "/" + table["image_id"].astype(str)).to_numpy()
    return ids


def criterion(name: str, value: float | None, threshold: float | None, *, upper: bool = False,
              passes: bool | None = None, note: str | None = None) -> dict[str, Any]:
    """One test of a candidate as evidence: its value, the threshold and the margin, signed
    so that positive = passes (``value − threshold`` for a lower bound ``value ≥ threshold``;
    ``threshold − value`` for an upper bound, ``upper=True``: ``value ≤ threshold``).
    ``passes`` overrides the margin's verdict (strict bounds, tests without a number)."""
    margin = None if value is None or threshold is None else float(threshold - value if upper else value - threshold)
    ok = passes if passes is not None else (margin is not None and margin >= 0)
    out = {"criterion": name, "value": None if value is None else float(value),
           "threshold": None if threshold is None else float(threshold), "rule": "≤" if upper else "≥",
           "margin": margin, "passes": bool(ok)}
    if note:
        out["note"] = note
    return out


def _reason(c: Mapping[str, Any]) -> str:
    """A failed criterion as a sentence with its margin ("label information U (colour) 0.21
    > 0.2, margin -0.01")."""
    if c["value"] is None or c["threshold"] is None:
        return c.get("note") or c["criterion"]
    op = ">" if c["rule"] == "≤" else "<"
    if c["margin"] == 0:  # a strict bound met exactly
        op = "="
    text = f"{c['criterion']} {c['value']:.3g} {op} {c['threshold']:.3g}, margin {c['margin']:+.3g}"
    return text + (f" ({c['note']})" if c.get("note") else "")


def _verdict(criteria: Sequence[Mapping[str, Any]]) -> str | None:
    return "; ".join(_reason(c) for c in criteria if not c["passes"]) or None


def _per_dataset_share(table: pd.DataFrame, indicator: np.ndarray) -> dict[str, float] | None:
    """Share of each data set's tokens the indicator marks (pooled tables only)."""
    if "dataset" not in table:
        return None
    ds = table["dataset"].astype(str).to_numpy()
    return {str(d): float(indicator[ds == d].mean()) for d in pd.unique(ds)}


def _label_word_lift(word, indicator, tasks, label_words):
    """max over tasks of P(label == word | indicator) / P(label == word); None if not computable."""
    best = None
    for t, names in (label_words or {}).items():
        lab = tasks.get(t)
        if lab is None:
            continue
        for k, name in enumerate(names):
            if normalize_word(name) != word:
                continue
            m = lab >= 0
            prior = float(np.mean(lab[m] == k)) if m.any() else 0.0
            hit = m & indicator
            if prior <= 0 or not hit.any():
                continue
            lift = float(np.mean(lab[hit] == k)) / prior
            best = lift if best is None else max(best, lift)
    return best


#: A label-word candidate is content when its indicator is this many times more frequent
#: on its label's patches than the label's prior.
LABEL_WORD_MAX_LIFT = 2.0


def content_criteria(
    token_id: int,
    indicator: np.ndarray,
    *,
    tasks: Mapping[str, np.ndarray],
    label_words: Mapping[str, Sequence[str]] | None,
    strings: Sequence[str] | None,
    max_label_info: float,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The content test every candidate anchor (sink or dead) must pass: the indicator
    "this id is the token's top-1" carries at most ``max_label_info`` label information
    (uncertainty coefficient, per task, the largest one is the criterion), and the id's
    string is not a label word of any task (``normalize_word``) unless the indicator is not
    enriched on that label (lift < :data:`LABEL_WORD_MAX_LIFT`: a background hub that
    happens to spell a colour name is still a hub).

    ``tasks``: task → per-token label value (-1 = none), row-aligned with ``indicator``
    (ignored tasks already removed). Returns (criteria, {task: U}).
    """
    info: dict[str, float] = {}
    for t, lab in tasks.items():
        m = lab >= 0
        if m.sum() >= 2:
            info[t] = uncertainty_coefficient(indicator[m], lab[m])
    crits: list[dict[str, Any]] = []
    if info:
        t_max = max(info, key=info.get)
        crits.append(criterion(f"label information U ({t_max})", info[t_max], max_label_info, upper=True))
    words = {normalize_word(w) for ws in (label_words or {}).values() for w in ws}
    s = strings[token_id] if strings is not None else None
    if s is not None and words and normalize_word(s) in words:
        lift = _label_word_lift(normalize_word(s), indicator, tasks, label_words)
        if lift is None:
            crits.append(criterion("label word", None, None, passes=False,
                                   note=f"its string {s!r} is a label word (no labelled patch to test enrichment)"))
        else:
            crits.append(criterion(f"label-word lift on {normalize_word(s)!r}", lift, LABEL_WORD_MAX_LIFT,
                                   upper=True, passes=lift < LABEL_WORD_MAX_LIFT,
                                   note=f"its string {s!r} is a label word"))
    return crits, info


def _taken(tid: int, taken: set[int], what: str) -> list[dict[str, Any]]:
    return [criterion("not already an anchor", None, None, passes=False, note=f"already an anchor of {what}")] \
        if tid in taken else []


def _content_tasks(token_labels, ignore) -> dict[str, np.ndarray]:
    return {t: np.asarray(v) for t, v in (token_labels or {}).items() if t not in set(ignore)}


def group_anchor_ids(
    table: pd.DataFrame,
    members: np.ndarray,
    *,
    taken: set[int],
    max_ids: int,
    min_group_share: float,
    min_lift: float,
    strings: Sequence[str] | None = None,
    token_labels: Mapping[str, np.ndarray] | None = None,
    label_words: Mapping[str, Sequence[str]] | None = None,
    max_label_info: float = DEFAULTS["hub_max_label_info"],
    ignore_tasks: Sequence[str] = DEFAULTS["hub_ignore_tasks"],
) -> tuple[list[int], list[dict[str, Any]]]:
    """Most frequent top-1 ids of the member tokens that pass share, lift and the content
    test of the dead hubs (:func:`content_criteria`; module doc). Returns (ids, candidate
    evidence rows, each with its ``criteria``: value, threshold, margin)."""
    top1 = _top1(table)
    n_all = top1.size
    n_grp = int(members.sum())
    if n_grp == 0:
        return [], []
    ids, counts = np.unique(top1[members], return_counts=True)
    order = np.lexsort((ids, -counts))
    all_counts = dict(zip(*np.unique(top1, return_counts=True)))
    tasks = _content_tasks(token_labels, ignore_tasks)
    chosen: list[int] = []
    evidence: list[dict[str, Any]] = []
    for j in order[: max(10, max_ids)]:
        tid = int(ids[j])
        g_share = counts[j] / n_grp
        o_share = all_counts[tid] / n_all
        lift = g_share / o_share if o_share > 0 else float("inf")
        ind = top1 == tid
        content, info = content_criteria(tid, ind, tasks=tasks, label_words=label_words, strings=strings,
                                         max_label_info=max_label_info)
        crits = [criterion("group share", g_share, min_group_share),
                 criterion("lift", lift, min_lift), *content, *_taken(tid, taken, "an earlier group")]
        reasons = _verdict(crits)
        ok = reasons is None and len(chosen) < max_ids
        if ok:
            chosen.append(tid)
        evidence.append({
            "token_id": tid,
            "token_string": strings[tid] if strings is not None else None,
            "n_in_group": int(counts[j]),
            "group_share": float(g_share),
            "overall_share": float(o_share),
            "lift": float(lift),
            "label_information": info,
            "per_dataset_top1_share": _per_dataset_share(table, ind),
            "criteria": crits,
            "chosen": ok,
            "rejected_because": reasons or (None if ok else "max ids reached"),
        })
    return chosen, evidence


#: Hub candidates listed even below ``hub_min_share``, so near misses show their margins.
MIN_HUB_CANDIDATES = 5


def find_hubs(
    table: pd.DataFrame,
    *,
    token_labels: Mapping[str, np.ndarray] | None = None,
    label_words: Mapping[str, Sequence[str]] | None = None,
    strings: Sequence[str] | None = None,
    taken: set[int] = frozenset(),
    hub_min_share: float = DEFAULTS["hub_min_share"],
    hub_min_relative_share: float = DEFAULTS["hub_min_relative_share"],
    hub_min_image_share: float = DEFAULTS["hub_min_image_share"],
    hub_min_images: int = DEFAULTS["hub_min_images"],
    hub_max_label_info: float = DEFAULTS["hub_max_label_info"],
    hub_ignore_tasks: Sequence[str] = DEFAULTS["hub_ignore_tasks"],
    hub_max_ids: int = DEFAULTS["hub_max_ids"],
) -> tuple[list[int], dict[str, Any]]:
    """Image-independent hub ids among the top-1 neighbours (module doc, criteria a–c).
    Returns (hub ids, evidence; each candidate with its ``criteria``: value, threshold,
    margin)."""
    top1 = _top1(table)
    n = top1.size
    images = _image_keys(table)
    n_images = len(np.unique(images))
    ids, counts = np.unique(top1, return_counts=True)
    order = np.lexsort((ids, -counts))
    tasks = _content_tasks(token_labels, hub_ignore_tasks)
    evidence: dict[str, Any] = {
        "n_tokens": int(n), "n_images": int(n_images),
        "label_tasks_used": sorted(tasks),
        "label_tasks_ignored": sorted(set(token_labels or {}) & set(hub_ignore_tasks)),
        "information_criterion": "uncertainty coefficient U(indicator | label) = I/H(indicator)"
        if tasks else "not applied: no patch labels (image-independence and label-word test only)",
        "candidates": [],
    }
    passing: list[dict[str, Any]] = []
    for rank, j in enumerate(order):
        share = counts[j] / n
        if share < hub_min_share and rank >= MIN_HUB_CANDIDATES:
            break
        tid = int(ids[j])
        ind = top1 == tid
        img_share = len(np.unique(images[ind])) / n_images if n_images else 0.0
        content, info = content_criteria(tid, ind, tasks=tasks, label_words=label_words, strings=strings,
                                         max_label_info=hub_max_label_info)
        crits = [criterion("images in the data", n_images, hub_min_images,
                           note=None if n_images >= hub_min_images else "image independence needs more images"),
                 criterion("top-1 share", share, hub_min_share),
                 criterion("image share", img_share, hub_min_image_share),
                 *content, *_taken(tid, taken, "a sink group")]
        cand = {
            "token_id": tid, "token_string": strings[tid] if strings is not None else None,
            "top1_share": float(share), "image_share": float(img_share), "label_information": info,
            "per_dataset_top1_share": _per_dataset_share(table, ind),
            "criteria": crits, "chosen": False, "rejected_because": _verdict(crits),
        }
        evidence["candidates"].append(cand)
        if cand["rejected_because"] is None:
            passing.append(cand)
    hubs: list[int] = []
    top_share = max((c["top1_share"] for c in passing), default=0.0)
    for cand in passing:  # in order of share
        rel = criterion("share relative to the leading hub", cand["top1_share"] / top_share,
                        hub_min_relative_share)
        cand["criteria"].append(rel)
        if not rel["passes"]:
            cand["rejected_because"] = _verdict([rel]) + f" (leading hub's share {top_share:.3f})"
        elif len(hubs) >= hub_max_ids:
            cand["rejected_because"] = "max ids reached"
        else:
            cand["chosen"] = True
            hubs.append(cand["token_id"])
    return hubs, evidence


def early_norm_columns(table: pd.DataFrame, num_layers: int | None,
                       llm_sink_layers: Sequence[int] | None) -> tuple[list[str], list[int], list[int]]:
    """The ``norm_h{l}`` columns of the early LLM layers: ``llm_sink_layers`` if given, else
    1 ≤ l ≤ max(2, L // 4) (L = ``num_layers`` or, unknown, the largest layer present).
    Returns (columns, layers used, requested layers that are missing)."""
    present = sorted(int(m.group(1)) for c in table.columns if (m := _NORM_COL.match(c)))
    if llm_sink_layers is None:
        L = num_layers if num_layers is not None else (max(present) if present else None)
        if L is None:
            return [], [], []
        wanted = list(range(1, max(2, L // 4) + 1))
    else:
        wanted = sorted({int(l) for l in llm_sink_layers})
    used = [l for l in wanted if l in present]
    missing = [l for l in wanted if l not in present] if llm_sink_layers is not None else []
    return [f"norm_h{l}" for l in used], used, missing


def discover_anchors(
    table: pd.DataFrame,
    *,
    token_labels: Mapping[str, np.ndarray] | None = None,
    label_words: Mapping[str, Sequence[str]] | None = None,
    strings: Sequence[str] | None = None,
    num_layers: int | None = None,
    fixed: Mapping[str, Sequence[int]] | None = None,
    vit_norm_z: float = DEFAULTS["vit_norm_z"],
    llm_norm_z: float = DEFAULTS["llm_norm_z"],
    min_norm_ratio: float = DEFAULTS["min_norm_ratio"],
    max_outlier_share: float = DEFAULTS["max_outlier_share"],
    min_group_tokens: int = DEFAULTS["min_group_tokens"],
    llm_sink_layers: Sequence[int] | None = DEFAULTS["llm_sink_layers"],
    anchor_max_ids: int = DEFAULTS["anchor_max_ids"],
    anchor_min_group_share: float = DEFAULTS["anchor_min_group_share"],
    anchor_min_lift: float = DEFAULTS["anchor_min_lift"],
    hub_min_share: float = DEFAULTS["hub_min_share"],
    hub_min_relative_share: float = DEFAULTS["hub_min_relative_share"],
    hub_min_image_share: float = DEFAULTS["hub_min_image_share"],
    hub_min_images: int = DEFAULTS["hub_min_images"],
    hub_max_label_info: float = DEFAULTS["hub_max_label_info"],
    hub_ignore_tasks: Sequence[str] = DEFAULTS["hub_ignore_tasks"],
    hub_max_ids: int = DEFAULTS["hub_max_ids"],
) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Discover anchor ids per group **[ours]** (procedure in the module docstring).

    Parameters
    ----------
    table : per-token table with ``image_id``, ``token``, ``top1_id`` and the norm columns
        ``norm_vision`` / ``norm_h{l}`` (as written by ``compute_h0_neighbours``); an
        optional ``dataset`` column marks a pool of several data sets (module doc).
    token_labels : task → per-token label value (-1 = none), row-aligned with ``table``;
        used only by the content test (label information) of every candidate.
    label_words : task → label words (a candidate whose string is a label word is content
        unless it is not enriched on its label).
    strings : vocabulary token strings, for evidence and the label-word test.
    num_layers : L, to place the default early-layer window.
    fixed : configured anchors ``{group: ids}``: those groups are not discovered, keep these
        ids, and their ids are never reused by a discovered group.
    Others : thresholds, see ``DEFAULTS`` and the module docstring.

    Returns
    -------
    anchors : {"vit_sink": [...], "llm_sink": [...], "dead": [...]} (possibly empty lists)
    evidence : JSON-ready dict: per group the token counts, thresholds, norms, candidate
        ids with shares/lifts, their ``criteria`` (value, threshold, signed margin) and the
        reason each was kept or rejected; plus ``params`` and ``methods_notes``.

    Raises
    ------
    ValueError
        ``fixed`` names a group other than vit_sink, llm_sink, dead.
    """
    params = {k: v for k, v in locals().items() if k in DEFAULTS}
    params["hub_ignore_tasks"] = list(hub_ignore_tasks)
    params["llm_sink_layers"] = None if llm_sink_layers is None else list(llm_sink_layers)
    n = len(table)
    fixed = {g: [int(i) for i in ids] for g, ids in (fixed or {}).items()}
    unknown = set(fixed) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown anchor groups {sorted(unknown)}; expected {GROUPS}")
    anchors: dict[str, list[int]] = {g: list(fixed.get(g, [])) for g in GROUPS}
    evidence: dict[str, Any] = {"params": params, "n_tokens": int(n)}
    taken: set[int] = {i for ids in fixed.values() for i in ids}

    def sink_group(name: str, mask: np.ndarray, ev: dict[str, Any]) -> None:
        if name in fixed:
            ev["status"] = "configured anchors: not discovered"
            ev["n_outlier_tokens"] = int(mask.sum())
            return
        n_out = int(mask.sum())
        ev["n_outlier_tokens"] = n_out
        ev["outlier_share"] = n_out / n if n else 0.0
        pos = np.flatnonzero(mask)[:50]
        ev["outlier_tokens"] = [
            {**({"dataset": str(table["dataset"].iat[p])} if "dataset" in table else {}),
             "image_id": str(table["image_id"].iat[p]), "token": int(table["token"].iat[p])}
            for p in pos
        ]
        ev["criteria"] = [criterion("outlier tokens", n_out, min_group_tokens),
                          criterion("outlier share", n_out / n if n else 0.0, max_outlier_share, upper=True)]
        if n_out < min_group_tokens:
            ev["status"] = f"no group: {n_out} outlier token(s) < min_group_tokens={min_group_tokens}"
            return
        if n_out / n > max_outlier_share:
            ev["status"] = (f"no group: outliers are {n_out / n:.1%} of tokens > "
                            f"max_outlier_share={max_outlier_share:.0%} (not a minority artifact)")
            return
        ids, cand = group_anchor_ids(table, mask, taken=taken, max_ids=anchor_max_ids,
                                     min_group_share=anchor_min_group_share,
                                     min_lift=anchor_min_lift, strings=strings,
                                     token_labels=token_labels, label_words=label_words,
                                     max_label_info=hub_max_label_info, ignore_tasks=hub_ignore_tasks)
        ev["anchor_candidates"] = cand
        anchors[name] = ids
        taken.update(ids)
        ev["status"] = ("ok" if ids else
                        "no anchor: no top-1 id is frequent, specific and free of label content enough")

    # --- ViT sinks
    ev_vit: dict[str, Any] = {"criterion": "vision-encoder output norm outlier"}
    vit_mask = np.zeros(n, dtype=bool)
    if "norm_vision" in table and np.isfinite(table["norm_vision"].to_numpy(np.float64)).any():
        vit_mask, stats = outlier_mask(table["norm_vision"].to_numpy(np.float64),
                                       z_threshold=vit_norm_z, min_norm_ratio=min_norm_ratio)
        ev_vit.update(stats)
        sink_group("vit_sink", vit_mask, ev_vit)
    else:
        ev_vit["status"] = ("configured anchors: not discovered" if "vit_sink" in fixed else
                            "not discoverable: no vision norms mapped 1:1 onto the visual tokens")
    evidence["vit_sink"] = ev_vit

    # --- LLM sinks
    ev_llm: dict[str, Any] = {"criterion": "hidden-state norm outlier in an early LLM layer"}
    cols, used_layers, missing_layers = early_norm_columns(table, num_layers, llm_sink_layers)
    ev_llm["early_layers"] = used_layers
    if missing_layers:
        ev_llm["early_layers_not_extracted"] = missing_layers
    if cols:
        llm_mask = np.zeros(n, dtype=bool)
        per_layer = {}
        for c in cols:
            m, stats = outlier_mask(table[c].to_numpy(np.float64), z_threshold=llm_norm_z,
                                    min_norm_ratio=min_norm_ratio)
            stats["n_outliers"] = int(m.sum())
            per_layer[c[6:]] = stats
            llm_mask |= m
        ev_llm["per_layer"] = per_layer
        ev_llm["n_also_vit_outliers"] = int((llm_mask & vit_mask).sum())
        llm_mask &= ~vit_mask
        sink_group("llm_sink", llm_mask, ev_llm)
    else:
        ev_llm["status"] = ("configured anchors: not discovered" if "llm_sink" in fixed else
                            "not discoverable: none of the early LLM layers was extracted")
    evidence["llm_sink"] = ev_llm

    # --- dead hubs
    if "dead" in fixed:
        evidence["dead"] = {"status": "configured anchors: not discovered"}
        evidence["methods_notes"] = _notes(params, used_layers)
        return anchors, evidence
    hubs, ev_dead = find_hubs(
        table, token_labels=token_labels, label_words=label_words, strings=strings, taken=taken,
        hub_min_share=hub_min_share, hub_min_relative_share=hub_min_relative_share,
        hub_min_image_share=hub_min_image_share,
        hub_min_images=hub_min_images, hub_max_label_info=hub_max_label_info,
        hub_ignore_tasks=hub_ignore_tasks, hub_max_ids=hub_max_ids,
    )
    anchors["dead"] = hubs
    ev_dead["criterion"] = "image-independent, content-free top-1 hub id"
    ev_dead["status"] = "ok" if hubs else "no hub id passed the criteria"
    evidence["dead"] = ev_dead
    evidence["methods_notes"] = _notes(params, used_layers)
    return anchors, evidence


def _notes(p: Mapping[str, Any], early_layers: Sequence[int]) -> list[dict[str, str]]:
    return [note("ours", "anchor_discovery", (
        "Anchor ids discovered from the extracted data (no released procedure): ViT sinks = "
        "vision-output norm outliers, LLM sinks = hidden-state norm outliers in early layers "
        f"{list(early_layers)} that are not ViT sinks (robust z of log-norm > "
        f"{p['vit_norm_z']} / {p['llm_norm_z']} and ≥ {p['min_norm_ratio']}× the median "
        f"norm); a sink group's anchors = its most frequent top-1 ids (≥ "
        f"{p['anchor_min_group_share']:.0%} of the group, lift ≥ {p['anchor_min_lift']}); dead = "
        f"top-1 hub ids winning ≥ {p['hub_min_share']:.0%} of tokens (and ≥ "
        f"{p['hub_min_relative_share']}× the leading hub's share) in ≥ "
        f"{p['hub_min_image_share']:.0%} of images; every anchor (sink or dead) carries label "
        f"information U ≤ {p['hub_max_label_info']} and is no label word enriched on its label."))]


def from_model_document(doc: Mapping[str, Any], configured: Mapping[str, Sequence[int]], *,
                        vocab_size: int, model: str | None = None) -> tuple[dict[str, list[int]], dict[str, str],
                                                                               dict[str, Any]]:
    """The anchors a categorization uses when its model's anchors were found once over all
    its data sets (``anchors.json`` of :func:`.model_anchors.discover_model_anchors`):
    ``configured`` groups keep their ids (config wins per group), the others take the
    document's. Returns (anchors, sources per group, evidence: the document's, plus
    ``scope`` "model" and the pooled ``datasets``).

    Raises
    ------
    ValueError
        the document belongs to another model or another vocabulary size (its ids would
        name other tokens): rerun the anchors step of this model.
    """
    if model is not None and doc.get("model") not in (None, model):
        raise ValueError(f"anchors of model {doc.get('model')!r} given to a categorization of {model!r}; "
                         f"use results/analysis/{model}/anchors")
    if doc.get("vocab_size") not in (None, vocab_size):
        raise ValueError(f"the anchors document was made with a vocabulary of {doc.get('vocab_size')} rows, "
                         f"this vocabulary has {vocab_size}: rerun the anchors step of this model")
    used = {g: [int(i) for i in configured[g]] if g in configured else [int(i) for i in doc["anchors"].get(g, [])]
            for g in GROUPS}
    doc_sources = doc.get("sources") or {}
    sources = {g: "configured" if g in configured else doc_sources.get(g, "discovered") for g in GROUPS}
    evidence = {**dict(doc.get("evidence") or {}), "scope": "model", "datasets": list(doc.get("datasets") or []),
                "status": f"anchors found once for the model over data sets {list(doc.get('datasets') or [])}"}
    return used, sources, evidence
