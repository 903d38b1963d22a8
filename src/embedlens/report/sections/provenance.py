"""Report sections "header" and "Provenance": what the report covers, which inputs are
missing, and which model, revision, data set, settings, software and running times
produced the numbers."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pandas as pd

from embedlens.store import final_norm_flag, num_layers_of

from ..display import callout, md, table
from ..inputs import ReportInputs

#: Section headings of the model × data-set report, in order (stable: tests and links
#: use them; nbconvert turns "Category shares" into the anchor ``#Category-shares``).
REPORT_SECTIONS: tuple[str, ...] = (
    "Provenance",
    "Category shares",
    "Category maps",
    "Nearest words by layer",
    "Norm distributions",
    "Anchors and evidence",
    "Probe accuracy and selectivity",
    "Layer alignment",
    "Compression benchmark",
    "Standard benchmarks",
    "Methods and deviations",
)


def section_header(inp: ReportInputs) -> list:
    """Top of the report: what this is and what is missing overall."""
    out: list = [md(f"**Model** `{inp.model}` · **data set** `{inp.dataset}` · generated "
                    f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")]
    toc = " · ".join(f"[{s}](#{s.replace(' ', '-')})" for s in REPORT_SECTIONS)
    out.append(md("Sections: " + toc))
    if inp.missing:
        rows = pd.DataFrame({"input": list(inp.missing), "why it is missing": list(inp.missing.values())})
        out.append(md("Inputs the report could not use (the sections that need them say so):"))
        out.append(table(rows))
    return out


#: What each mode means, as the report states it (embedlens.config.MODE_SETTINGS).
MODE_TEXT = {
    "ours": "this project's settings",
    "reference": "the paper's released LLaVA-1.5 code: every vocabulary row searched, images padded to a square",
    "reference-float16": "the paper's released LLaVA-1.5 code, with the similarity in float16",
}


def run_mode(inp: ReportInputs) -> dict[str, Any]:
    """Which mode produced the numbers and what it did: ``mode`` (the categorize summary's
    ``settings``; None when not recorded), ``preprocess`` (the store's extraction settings,
    else the categorize summary's; a store without it is "native"), ``n_excluded``
    (vocabulary rows left out of the search; None when unknown), ``similarity_dtype``,
    ``check`` (float16 vs float32 shares, or None) and ``reference_exact`` (every row
    searched and images padded to a square, as the released code)."""
    s = inp.cat_summary or {}
    settings = s.get("settings") or {}
    store = inp.hidden_attrs.get("settings")
    if isinstance(store, dict):
        preprocess = store.get("preprocess", "native")
    else:
        preprocess = s.get("preprocess") or ("native" if inp.hidden_attrs else None)
    excluded = s.get("excluded_ids")
    n_excluded = None if excluded is None else len(excluded)
    return {"mode": settings.get("mode"), "preprocess": preprocess, "n_excluded": n_excluded,
            "similarity_dtype": settings.get("similarity_dtype", "float32" if s else None),
            "check": s.get("similarity_check"),
            "reference_exact": n_excluded == 0 and preprocess == "pad_square"}


def mode_rows(inp: ReportInputs) -> list[tuple[str, Any]]:
    """Provenance rows: the mode, the image preprocessing, the vocabulary rows searched and
    the similarity dtype the numbers were produced with."""
    m = run_mode(inp)
    pre = {"native": "native: the model's processor as it is (llava-hf's LLaVA-1.5 processor, for one, "
                     "center-crops a non-square image)",
           "pad_square": "pad_square: padded to a square with the image processor's mean colour (LLaVA-1.5's "
                         "expand2square)"}.get(m["preprocess"], m["preprocess"])
    rows: list[tuple[str, Any]] = [
        ("mode", f"{m['mode']}: {MODE_TEXT.get(m['mode'], '')}" if m["mode"] else "not recorded (outputs "
         "written before modes existed: this project's settings)"),
        ("image preprocessing", pre),
        ("vocabulary rows searched", None if m["n_excluded"] is None else (
            "all (as the reference code)" if m["n_excluded"] == 0 else
            f"all but {m['n_excluded']} excluded (special/added tokens or configured ids)")),
        ("EmbedLens similarity dtype", m["similarity_dtype"]),
    ]
    if m["check"]:
        c = m["check"]
        rows.append(("float16 vs float32", f"{100 * c['label_flip_share']:.2f} % of labels and "
                                           f"{100 * c['topk_ids_change_share']:.2f} % of top-k id lists differ"))
    return rows


def _settings_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def section_provenance(inp: ReportInputs) -> list:
    """Section "Provenance": model, revision, data set, the mode that produced the numbers
    (:func:`mode_rows`), extraction settings, software versions, config and
    analysis-settings hashes, step timings and skipped images."""
    out: list = []
    a = inp.hidden_attrs
    import embedlens

    rows: list[tuple[str, Any]] = [
        ("model (workflow name)", inp.model),
        ("model id / path", inp.params.get("model_id") or a.get("model_path")),
        ("revision", a.get("revision") or "not recorded (local directory or builtin model)"),
        ("architecture", a.get("model_architecture") or a.get("architecture")),
        ("decoder layers L", num_layers_of(SimpleNamespace(attrs=a))),
        ("hidden size / vocabulary size", f"{a.get('model_hidden_size')} / {a.get('model_vocab_size')}"
         if a.get("model_hidden_size") else None),
        ("image token id", a.get("model_image_token_id")),
        ("final norm applied to the last hidden state", final_norm_flag(SimpleNamespace(attrs=a))),
        ("data set", inp.dataset),
        *mode_rows(inp),
    ]
    dm = inp.dataset_meta
    if dm:
        rows += [
            ("data-set source / spec", f"{dm.get('source')} {json.dumps(dm.get('spec', {}), sort_keys=True)}"),
            ("images / VQA items", f"{dm.get('n_images')} / {len(dm.get('vqa') or [])}"),
            ("label tasks", ", ".join(dm.get("label_tasks") or {}) or "none (unlabelled data set)"),
        ]
    if a:
        rows += [
            ("extraction settings", json.dumps(a.get("settings"), sort_keys=True)),
            ("extraction settings hash", a.get("settings_hash")),
            ("prompt", a.get("prompt")),
            ("compute / store dtype", f"{a.get('compute_dtype')} / {a.get('store_dtype')}"),
            ("extraction device", a.get("device")),
            ("shards", len(inp.shards)),
            ("store created", _created_range(inp.shard_created)),
            ("images / token positions / layers stored", f"{a.get('n_images')} / {a.get('n_token_positions')} / "
                                                         f"{len(a.get('layers_stored') or [])}"),
            ("transformers / torch / python", f"{a.get('transformers_version')} / {a.get('torch_version')} / "
                                              f"{a.get('python_version')}"),
        ]
    analysis_settings = {
        "categorize": (inp.cat_summary or {}).get("settings"),
        "lens": {k: (inp.lens_info or {}).get(k) for k in ("k", "layers", "n_images")} if inp.lens_info else None,
        "probe": (inp.probe_summary or {}).get("settings"),
        "align": (inp.align_summary or {}).get("settings"),
    }
    rows += [
        ("config hash", inp.params.get("config_hash") or "not given to the report"),
        ("analysis settings hash", _settings_hash(analysis_settings)),
        ("embedlens version", getattr(embedlens, "__version__", "unknown")),
        ("report rendered with", f"python {sys.version.split()[0]} ({sys.executable})"),
    ]
    if "hidden" in inp.missing:
        out.append(callout(f"store attributes (model revision, versions, extraction settings): {inp.why('hidden')}"))
    prov = pd.DataFrame({"field": [r[0] for r in rows], "value": ["" if r[1] is None else str(r[1]) for r in rows]})
    out.append(table(prov))

    # timings
    trows = []
    for name, summ in (("categorize", inp.cat_summary), ("layer lens", inp.lens_info),
                       ("probe", inp.probe_summary), ("text states", inp.text_states_summary),
                       ("align", inp.align_summary), ("compress", inp.compress_summary),
                       ("benchmarks", inp.benchmarks_summary)):
        if summ and summ.get("seconds") is not None:
            trows.append({"step": name, "seconds": float(summ["seconds"]), "source": "output summary"})
    for name, sec in inp.timings.items():
        trows.append({"step": name, "seconds": sec, "source": "workflow benchmark"})
    if trows:
        out.append(md("**Timings** (wall-clock seconds of each step, as its summary.json records them; "
                      "extraction, whose shards record no time of their own, is timed by the workflow's "
                      "benchmark files when given, summed over its jobs):"))
        out.append(table(pd.DataFrame(trows), precision=2))
    else:
        out.append(callout("timings: no output recorded its running time"))

    bad = (dm or {}).get("bad_images") or []
    if bad:
        out.append(md(f"**{len(bad)} image(s) were skipped** while materializing the data set "
                      "(`on_bad_image: skip`):"))
        out.append(table(pd.DataFrame(bad)))
    return out


def _created_range(created: Sequence[str]) -> str:
    c = sorted(x for x in created if x and x != "None")
    if not c:
        return "not recorded"
    return c[0] if c[0] == c[-1] else f"{c[0]} … {c[-1]} ({len(c)} shards)"
