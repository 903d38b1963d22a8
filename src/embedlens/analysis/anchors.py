"""Anchor discovery for models without known anchor ids **[ours]**.

methods.md §1 gives no released procedure for this; everything in this module is the
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

Anchor ids of a sink group: the group's most frequent top-1 neighbour ids, in order of
frequency, keeping an id when it is top-1 for ≥ ``anchor_min_group_share`` of the group's
tokens, is ``anchor_min_lift`` × more frequent as top-1 in the group than over all tokens
(so a global hub is not taken as a sink anchor), is not already an anchor of an earlier
group, up to ``anchor_max_ids`` ids.

Hub ids (dead): top-1 ids that (a) are top-1 for ≥ ``hub_min_share`` of all tokens,
(b) are top-1 of at least one token in ≥ ``hub_min_image_share`` of the images, with at
least ``hub_min_images`` images in the data set, (c) carry no information about patch
content: for every label task (except ``hub_ignore_tasks``: ``background`` by default,
because dead tokens are expected on empty background, which is absence of content) the
uncertainty coefficient U(hub indicator | label) = I / H(indicator) over labelled tokens is
≤ ``hub_max_label_info``; and the id's string is not itself a label word. Without labels
(c) reduces to the label-word test and evidence says so. Of the ids passing (a)–(c), those
with ≥ ``hub_min_relative_share`` × the leading one's share are hubs (a hub dominates;
frequent content words in label-free data sets usually do not), up to ``hub_max_ids``.
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


def group_anchor_ids(
    top1: np.ndarray,
    members: np.ndarray,
    *,
    taken: set[int],
    max_ids: int,
    min_group_share: float,
    min_lift: float,
    strings: Sequence[str] | None = None,
) -> tuple[list[int], list[dict[str, Any]]]:
    """Most frequent top-1 ids of the member tokens that pass share and lift (module doc).
    Returns (ids, candidate evidence rows)."""
    n_all = top1.size
    n_grp = int(members.sum())
    if n_grp == 0:
        return [], []
    ids, counts = np.unique(top1[members], return_counts=True)
    order = np.lexsort((ids, -counts))
    all_counts = dict(zip(*np.unique(top1, return_counts=True)))
    chosen: list[int] = []
    evidence: list[dict[str, Any]] = []
    for j in order[: max(10, max_ids)]:
        tid = int(ids[j])
        g_share = counts[j] / n_grp
        o_share = all_counts[tid] / n_all
        lift = g_share / o_share if o_share > 0 else float("inf")
        reasons = []
        if g_share < min_group_share:
            reasons.append(f"group share {g_share:.3f} < {min_group_share}")
        if lift < min_lift:
            reasons.append(f"lift {lift:.2f} < {min_lift}")
        if tid in taken:
            reasons.append("already an anchor of an earlier group")
        ok = not reasons and len(chosen) < max_ids
        if ok:
            chosen.append(tid)
        evidence.append({
            "token_id": tid,
            "token_string": strings[tid] if strings is not None else None,
            "n_in_group": int(counts[j]),
            "group_share": float(g_share),
            "overall_share": float(o_share),
            "lift": float(lift),
            "chosen": ok,
            "rejected_because": "; ".join(reasons) or (None if ok else "max ids reached"),
        })
    return chosen, evidence


def _label_word_lift(word, indicator, tasks, label_words):
    """max over tasks of P(label == word | hub) / P(label == word); None if not computable."""
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
    Returns (hub ids, evidence)."""
    top1 = _top1(table)
    n = top1.size
    images = table["image_id"].astype(str).to_numpy()
    n_images = len(np.unique(images))
    ids, counts = np.unique(top1, return_counts=True)
    order = np.lexsort((ids, -counts))
    words = {normalize_word(w) for ws in (label_words or {}).values() for w in ws}
    tasks = {t: np.asarray(v) for t, v in (token_labels or {}).items() if t not in set(hub_ignore_tasks)}
    evidence: dict[str, Any] = {
        "n_tokens": int(n), "n_images": int(n_images),
        "label_tasks_used": sorted(tasks),
        "label_tasks_ignored": sorted(set(token_labels or {}) & set(hub_ignore_tasks)),
        "information_criterion": "uncertainty coefficient U(indicator | label) = I/H(indicator)"
        if tasks else "not applied: no patch labels (image-independence and label-word test only)",
        "candidates": [],
    }
    passing: list[dict[str, Any]] = []
    for j in order:
        share = counts[j] / n
        if share < hub_min_share:
            break
        tid = int(ids[j])
        ind = top1 == tid
        img_share = len(np.unique(images[ind])) / n_images if n_images else 0.0
        info = {}
        for t, lab in tasks.items():
            m = lab >= 0
            if m.sum() >= 2:
                info[t] = uncertainty_coefficient(ind[m], lab[m])
        s = strings[tid] if strings is not None else None
        reasons = []
        if n_images < hub_min_images:
            reasons.append(f"only {n_images} image(s); image independence needs {hub_min_images}")
        if img_share < hub_min_image_share:
            reasons.append(f"top-1 in {img_share:.2f} of images < {hub_min_image_share}")
        if info and max(info.values()) > hub_max_label_info:
            t_max = max(info, key=info.get)
            reasons.append(f"informative about {t_max} (U={info[t_max]:.2f} > {hub_max_label_info})")
        if s is not None and words and normalize_word(s) in words:
            # A label-word hub is content only if it actually marks patches of that label
            # (lift >= 2 over the label's prior); a background hub that happens to spell a
            # colour name ("yellow" on 80 % of embedlens-mini's tokens) is still a hub.
            lift = _label_word_lift(normalize_word(s), ind, tasks, label_words)
            if lift is None or lift >= 2.0:
                reasons.append(f"its string {s!r} is a label word"
                               + ("" if lift is None else f" enriched on its label (lift {lift:.1f})"))
        if tid in taken:
            reasons.append("already an anchor of a sink group")
        cand = {
            "token_id": tid, "token_string": s, "top1_share": float(share),
            "image_share": float(img_share), "label_information": info,
            "chosen": False, "rejected_because": "; ".join(reasons) or None,
        }
        evidence["candidates"].append(cand)
        if not reasons:
            passing.append(cand)
    hubs: list[int] = []
    top_share = max((c["top1_share"] for c in passing), default=0.0)
    for cand in passing:  # in order of share
        if cand["top1_share"] < hub_min_relative_share * top_share:
            cand["rejected_because"] = (f"share {cand['top1_share']:.3f} < {hub_min_relative_share} × "
                                        f"the leading hub's {top_share:.3f}")
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
    table : per-token table with ``image_id``, ``top1_id`` and the norm columns
        ``norm_vision`` / ``norm_h{l}`` (as written by ``compute_h0_neighbours``).
    token_labels : task → per-token label value (-1 = none), row-aligned with ``table``;
        used only by the hub information criterion.
    label_words : task → label words (a hub whose string is a label word is content).
    strings : vocabulary token strings, for evidence and the label-word test.
    num_layers : L, to place the default early-layer window.
    fixed : configured anchors ``{group: ids}``: those groups are not discovered, keep these
        ids, and their ids are never reused by a discovered group.
    Others : thresholds, see ``DEFAULTS`` and the module docstring.

    Returns
    -------
    anchors : {"vit_sink": [...], "llm_sink": [...], "dead": [...]} (possibly empty lists)
    evidence : JSON-ready dict: per group the token counts, thresholds, norms, candidate
        ids with shares/lifts and the reason each was kept or rejected; plus ``params``
        and ``methods_notes``.
    """
    params = {k: v for k, v in locals().items() if k in DEFAULTS}
    params["hub_ignore_tasks"] = list(hub_ignore_tasks)
    params["llm_sink_layers"] = None if llm_sink_layers is None else list(llm_sink_layers)
    n = len(table)
    top1 = _top1(table)
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
        ev["outlier_tokens"] = [
            {"image_id": str(a), "token": int(b)}
            for a, b in zip(table["image_id"].to_numpy()[mask][:50], table["token"].to_numpy()[mask][:50])
        ]
        if n_out < min_group_tokens:
            ev["status"] = f"no group: {n_out} outlier token(s) < min_group_tokens={min_group_tokens}"
            return
        if n_out / n > max_outlier_share:
            ev["status"] = (f"no group: outliers are {n_out / n:.1%} of tokens > "
                            f"max_outlier_share={max_outlier_share:.0%} (not a minority artifact)")
            return
        ids, cand = group_anchor_ids(top1, mask, taken=taken, max_ids=anchor_max_ids,
                                     min_group_share=anchor_min_group_share,
                                     min_lift=anchor_min_lift, strings=strings)
        ev["anchor_candidates"] = cand
        anchors[name] = ids
        taken.update(ids)
        ev["status"] = "ok" if ids else "no anchor: no top-1 id is frequent and specific enough"

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
        f"{p['hub_min_image_share']:.0%} of images, with label information U ≤ "
        f"{p['hub_max_label_info']}."))]
