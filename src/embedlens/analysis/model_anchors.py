"""Anchors per model: one discovery over every data set of a model **[ours]**.

The anchor ids of a group (vit_sink, llm_sink, dead) are vocabulary ids of the *model*:
which token is the sink or the dead hub does not depend on the images. Discovering them
per data set made them depend on the data (embedlens-mini: "yellow" the dead hub on
skimage but not on synthetic, where the colour word "green" became an LLM-sink anchor).
:func:`discover_model_anchors` computes the ``h[0]`` neighbours and norms of every data set
of the model (:func:`.categorize.compute_h0_neighbours`), pools the token tables into one
population (a ``dataset`` column; patch labels where a data set has them) and runs
:func:`.anchors.discover_anchors` once. Every categorization of the model then uses these
anchors (``categorize(model_anchors=...)``); configured anchors still win per group.

Output directory ``results/analysis/{model}/anchors/``: ``anchors.json`` (the document
``categorize`` takes: anchors, sources, strings, evidence with each candidate's criteria and
margins, the pooled data sets) and ``summary.json`` (the one summary shape, step
``anchors``). Read it with :func:`read_anchors` / :func:`anchors_document`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embedlens.store import num_layers_of

from . import anchors as _anchors
from .categorize import GROUPS, compute_h0_neighbours
from .labels import PatchLabels, grid_unknown_tokens
from .outputs import note, step_reader, step_summary, write_json
from .vocab import load_vocab

OUTPUT_FILES = {"anchors": "anchors.json", "summary": "summary.json"}


def pool_tables(
    tables: Mapping[str, pd.DataFrame],
    labels: Mapping[str, PatchLabels | None] | None = None,
) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, list[str]]]:
    """Pool the token tables of several data sets of one model.

    Parameters
    ----------
    tables : data set → its token table (``compute_h0_neighbours``), in pooling order.
    labels : data set → its patch labels (None / absent / empty: unlabelled data set).

    Returns
    -------
    table : the rows of every table, in order, with a ``dataset`` column first (norm
        columns missing from a data set are NaN there).
    token_labels : task → pooled label value per row (-1 where the data set has no such
        task or the patch no label). A task's label words are the union over the data
        sets in order of first appearance, so equal words get one value across data sets.
    label_words : task → those pooled label words.
    """
    words: dict[str, list[str]] = {}
    per_table: list[tuple[int, dict[str, np.ndarray]]] = []
    for name, t in tables.items():
        lab = (labels or {}).get(name)
        raw = lab.for_table(t) if lab is not None and not lab.empty else {}
        mapped: dict[str, np.ndarray] = {}
        for task, values in raw.items():
            pooled = words.setdefault(task, [])
            for w in lab.tasks[task]:
                if w not in pooled:
                    pooled.append(w)
            lut = np.array([pooled.index(w) for w in lab.tasks[task]] + [-1], dtype=np.int64)
            mapped[task] = lut[np.where(values >= 0, values, len(lab.tasks[task]))]
        per_table.append((len(t), mapped))
    token_labels = {task: np.concatenate([m.get(task, np.full(n, -1, np.int64)) for n, m in per_table])
                    for task in words}
    frames = [t.assign(dataset=str(name)) for name, t in tables.items()]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if "dataset" in table:
        table = table[["dataset"] + [c for c in table.columns if c != "dataset"]]
    return table, token_labels, words


def candidate_margins(evidence: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every candidate of every group as one row: group, id, string, kept or not, each
    criterion's margin (positive = passes) and the reason it was rejected."""
    rows = []
    for g in GROUPS:
        ev = evidence.get(g) or {}
        for c in ev.get("anchor_candidates") or ev.get("candidates") or []:
            rows.append({"group": g, "token_id": c["token_id"], "token_string": c.get("token_string"),
                         "chosen": c["chosen"],
                         "margins": {k["criterion"]: k["margin"] for k in c.get("criteria") or []},
                         "rejected_because": c.get("rejected_because")})
    return rows


def discover_model_anchors(
    hiddens: Mapping[str, Any],
    vocab,
    out_dir: str | Path,
    *,
    labels: Mapping[str, PatchLabels | None] | None = None,
    anchors: Mapping[str, Sequence[int]] | None = None,
    discover_anchors: bool = True,
    top_k: int = 3,
    exclude_special: bool = True,
    exclude_ids: Sequence[int] = (),
    include_ids: Sequence[int] = (),
    norm_layers: Sequence[int] | None = None,
    vision_layer: Any = None,
    vision_token_offset: int | str = "auto",
    num_layers: int | None = None,
    discovery: Mapping[str, Any] | None = None,
    device: str = "auto",
    vocab_block: int = 8192,
    query_block: int = 4096,
    max_block_bytes: int = 256 * 2**20,
    similarity_dtype: str = "float32",
    model: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Discover a model's anchors once over all its data sets and write ``anchors.json`` and
    ``summary.json`` into ``out_dir``.

    Parameters
    ----------
    hiddens : data set name → its hidden-state store (``open_hidden`` / ``open_index``),
        all of one model (same vocabulary and depth).
    vocab : the model's vocabulary store (path, dataset or :class:`~.vocab.Vocab`).
    labels : data set name → its patch labels (None for an unlabelled data set).
    anchors : configured anchor ids ``{group: [ids]}``: those groups are not discovered and
        their ids are never reused (as in ``categorize``).
    discover_anchors : False → no discovery; groups not configured get no anchor.
    top_k, exclude_special, exclude_ids, include_ids, norm_layers, vision_layer,
    vision_token_offset, device, vocab_block, query_block, max_block_bytes : the
        neighbour search, exactly as ``categorize`` runs it (the ``categorize`` section of
        config.yaml), so the anchors are found among the same candidate rows.
    num_layers : L, for the early-layer window of LLM-sink discovery (default: store attrs).
    discovery : keyword overrides for :func:`.anchors.discover_anchors` thresholds.
    model : the model's name, recorded (and checked by ``categorize``).

    Returns the summary dict (also written to ``summary.json``).

    Raises
    ------
    ValueError
        no data set given; the stores disagree on the number of layers L (not one model);
        an unknown anchor group; a store without layer 0 (see ``compute_h0_neighbours``).
    """
    t0 = time.perf_counter()
    if not hiddens:
        raise ValueError("discover_model_anchors: no data set given; pass every data set of the model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    voc = load_vocab(vocab)
    configured = {g: [int(i) for i in ids] for g, ids in (anchors or {}).items()}
    unknown = set(configured) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown anchor groups {sorted(unknown)}; expected {GROUPS}")
    depths = {name: num_layers_of(h, num_layers) for name, h in hiddens.items()}
    if len({d for d in depths.values() if d is not None}) > 1:
        raise ValueError(f"the data sets' stores disagree on the number of layers L {depths}: "
                         "anchors are pooled over the data sets of one model only")
    L = next((d for d in depths.values() if d is not None), None)
    tables: dict[str, pd.DataFrame] = {}
    infos: dict[str, dict[str, Any]] = {}
    for name, hidden in hiddens.items():
        tables[name], infos[name] = compute_h0_neighbours(
            hidden, voc, k=top_k, exclude_special=exclude_special, exclude_ids=exclude_ids,
            include_ids=include_ids, norm_layers=norm_layers, vision_layer=vision_layer,
            vision_token_offset=vision_token_offset, device=device, vocab_block=vocab_block,
            query_block=query_block, max_block_bytes=max_block_bytes, progress=progress,
            # the same neighbours categorize labels with (float16 in reference-float16 mode)
            similarity_dtype=similarity_dtype)
    table, token_labels, label_words = pool_tables(tables, labels)
    names = list(tables)
    labelled = [n for n in names if (labels or {}).get(n) is not None and not labels[n].empty]
    to_discover = [g for g in GROUPS if g not in configured] if discover_anchors else []
    methods_notes = [note("ours", "anchor_discovery_per_model",
                          f"Anchors discovered once for the model over its data sets {names} pooled "
                          f"({len(table)} visual tokens; patch labels from {labelled or 'none'}), "
                          "not per data set: every categorization of the model uses the same ids.")]
    if to_discover:
        used, evidence = _anchors.discover_anchors(
            table, token_labels=token_labels or None, label_words=label_words or None,
            strings=voc.strings, num_layers=L, fixed=configured, **dict(discovery or {}))
        methods_notes += evidence.pop("methods_notes")
    else:
        used = {g: configured.get(g, []) for g in GROUPS}
        evidence = {"status": "no discovery run (every group configured, or discovery off)"}
    sources = {g: "configured" if g in configured else ("discovered" if g in to_discover else "none")
               for g in GROUPS}
    bad = [i for ids in used.values() for i in ids if not 0 <= i < voc.size]
    if bad:
        raise ValueError(f"anchor ids outside the vocabulary (size {voc.size}): {bad}")
    notes = [f"{n}: {infos[n]['vision_norm_note']}" for n in names]
    notes += grid_unknown_tokens(table, "anchor discovery's label tests")[1]
    doc = {
        "scope": "model", "model": model, "datasets": names,
        "source": sources["vit_sink"] if len(set(sources.values())) == 1 else "mixed",
        "sources": sources, "anchors": used,
        "anchor_strings": {g: [voc.strings[i] for i in ids] for g, ids in used.items()},
        "n_tokens": {n: int(len(tables[n])) for n in names},
        "n_images": {n: int(tables[n]["image_id"].nunique()) for n in names},
        "labelled_datasets": labelled, "label_words": label_words, "vocab_size": voc.size,
        "evidence": evidence, "methods_notes": methods_notes,
    }
    write_json(doc, out / OUTPUT_FILES["anchors"])
    summary = step_summary("anchors", {
        "model": model, "dataset": None,
        "settings": {"top_k": top_k, "exclude_special": exclude_special,
                     "exclude_ids": list(map(int, exclude_ids)), "include_ids": list(map(int, include_ids)),
                     "vision_token_offset": vision_token_offset, "discover_anchors": discover_anchors,
                     "discovery": dict(discovery or {}), "num_layers": L, "similarity_dtype": similarity_dtype},
        "seconds": time.perf_counter() - t0, "notes": notes, "methods_notes": methods_notes,
        "files": dict(OUTPUT_FILES),
        **{k: doc[k] for k in ("datasets", "anchors", "anchor_strings", "sources", "n_tokens", "n_images",
                               "labelled_datasets", "vocab_size")},
        "anchor_source": doc["source"],
        "excluded_ids": sorted({i for n in names for i in infos[n]["excluded_ids"]}),
        "candidates": candidate_margins(evidence),
    })
    write_json(summary, out / OUTPUT_FILES["summary"])
    return summary


read_anchors = step_reader("anchors")


def anchors_document(out_dir: str | Path) -> dict[str, Any]:
    """The ``anchors.json`` document of an anchors step directory (what ``categorize``'s
    ``model_anchors`` takes), read through :func:`read_anchors`.

    Raises
    ------
    SummaryError
        no anchors step's ``summary.json`` in ``out_dir`` (names the file and what to do).
    FileNotFoundError
        the summary lists an ``anchors.json`` that is not there: rerun the step.
    """
    return json.loads(read_anchors(out_dir).path("anchors").read_text())
