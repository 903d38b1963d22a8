"""Reading one model × data set's analysis outputs for its report (and the few the
summary page shows).

Every input is optional: an absent or unreadable one is recorded in
:attr:`ReportInputs.missing` with the reason, and the section that needs it says so
instead of failing. This is the only module of :mod:`embedlens.report` that opens
files of other stages; the file names inside their output directories are gathered in
:data:`STAGE_FILES`.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: The files this module opens inside the output directories the workflow passes
#: (``dataset_dir``, ``categorize_dir``, ``probe_dir``, ``align_dir``), by stage. They are
#: the stages' output contracts: a renamed output is changed here, and only here.
STAGE_FILES: dict[str, str] = {
    "dataset_meta": "dataset.json",  # materialize
    "categories": "categories.parquet",  # categorize
    "cat_summary": "summary.json",
    "anchors": "anchors.json",
    "nearest_words": "nearest_words.parquet",
    "probe": "probe.parquet",  # probe
    "probe_summary": "probe_summary.json",
    "hitk": "hitk.parquet",
    "align": "align.parquet",  # align
    "align_summary": "align_summary.json",
}
F = STAGE_FILES  # short alias for the reads below

_REFERENCE_MODEL_RE = re.compile(r"llava[-_ ]?(?:v)?1[._]5[-_ ]?7b", re.IGNORECASE)


@dataclass
class ReportInputs:
    """Everything one model × data-set report reads; ``missing`` maps an input name to
    the reason it is absent (shown in the section that needs it)."""

    model: str
    dataset: str
    params: dict[str, Any] = field(default_factory=dict)
    is_reference: bool = False
    hidden_attrs: dict[str, Any] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    shard_created: list[str] = field(default_factory=list)
    hidden_index: dict[str, Any] | None = None
    dataset_meta: dict[str, Any] | None = None
    dataset_dir: Path | None = None
    vocab_strings: np.ndarray | None = None
    vocab_attrs: dict[str, Any] = field(default_factory=dict)
    categories: pd.DataFrame | None = None
    cat_summary: dict[str, Any] | None = None
    anchors: dict[str, Any] | None = None
    nearest_words: pd.DataFrame | None = None
    lens: Any = None
    lens_info: dict[str, Any] | None = None
    probe: pd.DataFrame | None = None
    hitk: pd.DataFrame | None = None
    probe_summary: dict[str, Any] | None = None
    align: pd.DataFrame | None = None
    align_summary: dict[str, Any] | None = None
    compress: pd.DataFrame | None = None
    #: seconds per workflow step from the ``timings`` parameter (see :func:`read_timings`)
    timings: dict[str, float] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def why(self, name: str) -> str:
        return self.missing.get(name, "not available")


def _not_given(what: str) -> str:
    return f"no {what} was given to the report (the workflow did not produce it for this model × data set)"


def _resolve(path: Any, *bases: Path) -> Path | None:
    """A path as given, else relative to one of ``bases``; None when nothing exists."""
    if path in (None, ""):
        return None
    p = Path(str(path))
    if p.exists() or p.is_absolute():
        return p if p.exists() else None
    for b in bases:
        q = b / p
        if q.exists():
            return q
    return None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def looks_like_reference_model(*names: Any) -> bool:
    """True when any of the names looks like LLaVA-1.5-7B (the paper's reference model)."""
    return any(bool(_REFERENCE_MODEL_RE.search(str(n))) for n in names if n)


def load_inputs(
    model: str,
    dataset: str,
    *,
    dataset_dir: str | None = None,
    hidden_index: str | None = None,
    vocab: str | None = None,
    categorize_dir: str | None = None,
    lens_path: str | None = None,
    probe_dir: str | None = None,
    align_dir: str | None = None,
    compress_parquet: str | None = None,
    model_id: str | None = None,
    is_reference_model: bool | None = None,  # noqa: A002 - the parameter's name
    config_hash: str | None = None,
    timings: Any = None,
    **extra: Any,
) -> ReportInputs:
    """Read the outputs of one model × data set. Every input is optional; an absent or
    unreadable one is recorded in ``ReportInputs.missing`` with the reason.

    Paths are the notebook parameters (``notebooks/report.ipynb``); relative ones are
    relative to the working directory. ``config_hash`` (shown in the provenance) and any
    ``extra`` parameter are kept in ``ReportInputs.params`` as given; ``timings`` is read
    with :func:`read_timings` into ``ReportInputs.timings``. Never raises for a missing or
    unreadable output.
    """
    inp = ReportInputs(model=str(model), dataset=str(dataset),
                       params={"dataset_dir": dataset_dir, "hidden_index": hidden_index, "vocab": vocab,
                               "categorize_dir": categorize_dir, "lens_path": lens_path,
                               "probe_dir": probe_dir, "align_dir": align_dir,
                               "compress_parquet": compress_parquet, "model_id": model_id,
                               "config_hash": config_hash, "timings": timings, **extra})
    miss = inp.missing

    # --- data set
    d = _resolve(dataset_dir)
    if d is None:
        miss["dataset"] = (_not_given("data-set directory") if not dataset_dir
                           else f"data-set directory {dataset_dir} does not exist")
    elif not (d / F["dataset_meta"]).exists():
        miss["dataset"] = f"{d}/{F['dataset_meta']} does not exist"
    else:
        inp.dataset_dir = d
        inp.dataset_meta = _read_json(d / F["dataset_meta"])

    # --- hidden-state store (attributes only; values are never loaded here)
    hi = _resolve(hidden_index)
    if hi is None:
        miss["hidden"] = (_not_given("hidden-state index (hidden.json)") if not hidden_index
                          else f"{hidden_index} does not exist")
    else:
        try:
            index = _read_json(hi)
            inp.hidden_index = index
            shards = []
            for s in index.get("shards", []):
                p = _resolve(s, hi.parent, hi.parent / Path(s).name)
                if p is None and (hi.parent / Path(s).name).exists():
                    p = hi.parent / Path(s).name
                if p is None:
                    raise FileNotFoundError(f"shard {s} listed in {hi} does not exist")
                shards.append(str(p))
            from ..store import open_shard

            n_images, n_tok, layers = 0, 0, None
            for i, sp in enumerate(shards):
                ds = open_shard(sp)  # lazy: metadata only
                if i == 0:
                    inp.hidden_attrs = dict(ds.attrs)
                    layers = [int(x) for x in ds["layer"].values]
                inp.shard_created.append(str(ds.attrs.get("created")))
                n_images += int(ds.sizes.get("image", 0))
                n_tok = max(n_tok, int(ds.sizes.get("token", 0)))
            inp.shards = shards
            for key in ("image_range", "created", "final_batch_size"):  # per shard, not per store
                inp.hidden_attrs.pop(key, None)
            inp.hidden_attrs.update(n_images=n_images, n_token_positions=n_tok, layers_stored=layers)
        except Exception as exc:  # noqa: BLE001
            miss["hidden"] = f"the hidden-state store could not be opened: {exc}"

    # --- vocabulary (token strings only: the embedding matrix is never read)
    vp = _resolve(vocab)
    if vp is None:
        miss["vocab"] = _not_given("vocabulary store") if not vocab else f"{vocab} does not exist"
    else:
        try:
            import xarray as xr

            v = xr.open_zarr(str(vp), consolidated=None)
            inp.vocab_strings = np.asarray([str(s) for s in v["token_string"].values], dtype=object)
            inp.vocab_attrs = dict(v.attrs)
        except Exception as exc:  # noqa: BLE001
            miss["vocab"] = f"the vocabulary store {vp} could not be read: {exc}"

    # --- categorize
    cd = _resolve(categorize_dir)
    if cd is None:
        miss["categorize"] = (_not_given("categorize output directory") if not categorize_dir
                              else f"categorize output {categorize_dir} does not exist")
    else:
        try:
            inp.categories = pd.read_parquet(cd / F["categories"])
        except Exception as exc:  # noqa: BLE001
            miss["categorize"] = f"{cd}/{F['categories']} could not be read: {exc}"
        for name, attr in ((F["cat_summary"], "cat_summary"), (F["anchors"], "anchors")):
            if (cd / name).exists():
                setattr(inp, attr, _read_json(cd / name))
            else:
                miss[f"categorize/{name}"] = f"{cd}/{name} does not exist"
        if (cd / F["nearest_words"]).exists():
            inp.nearest_words = pd.read_parquet(cd / F["nearest_words"])
        else:
            miss["nearest_words"] = f"{cd}/{F['nearest_words']} does not exist"

    # --- lens
    lp = _resolve(lens_path)
    if lp is None:
        miss["lens"] = _not_given("layer-lens store (lens.zarr)") if not lens_path else f"{lens_path} does not exist"
    else:
        try:
            import xarray as xr

            inp.lens = xr.open_zarr(str(lp), consolidated=False)
            info = inp.lens.attrs.get("info")
            inp.lens_info = json.loads(info) if isinstance(info, str) else (info or {})
        except Exception as exc:  # noqa: BLE001
            miss["lens"] = f"the layer-lens store {lp} could not be opened: {exc}"

    # --- probe
    pp = _resolve(probe_dir)
    if pp is None:
        miss["probe"] = _not_given("probe output") if not probe_dir else f"{probe_dir} does not exist"
    else:
        pdir = pp if pp.is_dir() else pp.parent
        ppar = pp if pp.is_file() else pdir / F["probe"]
        if (pdir / F["probe_summary"]).exists():
            inp.probe_summary = _read_json(pdir / F["probe_summary"])
        if inp.probe_summary and inp.probe_summary.get("status") == "skipped":
            miss["probe"] = f"the probe step was skipped: {inp.probe_summary.get('reason', 'no reason recorded')}"
        elif ppar.exists():
            inp.probe = pd.read_parquet(ppar)
            if (pdir / F["hitk"]).exists():
                inp.hitk = pd.read_parquet(pdir / F["hitk"])
            if inp.probe.empty:
                miss["probe"] = f"{F['probe']} has no rows" + (
                    f" ({inp.probe_summary['reason']})" if (inp.probe_summary or {}).get("reason") else "")
        else:
            miss["probe"] = f"{ppar} does not exist"

    # --- align
    ap = _resolve(align_dir)
    if ap is None:
        miss["align"] = _not_given("alignment output") if not align_dir else f"{align_dir} does not exist"
    else:
        adir = ap if ap.is_dir() else ap.parent
        apar = ap if ap.is_file() else adir / F["align"]
        if (adir / F["align_summary"]).exists():
            inp.align_summary = _read_json(adir / F["align_summary"])
        if inp.align_summary and inp.align_summary.get("status") not in (None, "ok"):
            why = inp.align_summary.get("reason", inp.align_summary.get("status"))
            miss["align"] = f"the alignment step did not run: {why}"
        elif apar.exists():
            inp.align = pd.read_parquet(apar)
        else:
            miss["align"] = f"{apar} does not exist"

    # --- compress
    cp = _resolve(compress_parquet)
    if cp is None:
        if compress_parquet:
            miss["compress"] = f"{compress_parquet} does not exist"
        elif inp.dataset_meta is not None and not inp.dataset_meta.get("vqa"):
            miss["compress"] = (f"data set {dataset!r} has no multiple-choice VQA items, so the compression "
                                "benchmark cannot score it (the synthetic source generates items; a manifest can "
                                "list its own)")
        else:
            miss["compress"] = _not_given("compression-benchmark table")
    else:
        try:
            inp.compress = pd.read_parquet(cp)
            if inp.compress.empty:
                miss["compress"] = f"{cp} has no rows"
        except Exception as exc:  # noqa: BLE001
            miss["compress"] = f"{cp} could not be read: {exc}"

    inp.timings = read_timings(timings)

    if is_reference_model is None:
        inp.is_reference = looks_like_reference_model(
            model, model_id, inp.hidden_attrs.get("model"), inp.hidden_attrs.get("model_path"),
            inp.hidden_attrs.get("hf_id"), inp.hidden_attrs.get("model_name_or_path"))
    else:
        inp.is_reference = bool(is_reference_model)
    return inp


def read_timings(spec: Any) -> dict[str, float]:
    """Running times of workflow steps, in seconds per step, from the ``timings`` parameter.

    ``spec`` is None, a mapping ``{step: value}`` or a list of benchmark files (step = the
    file's stem). A value is a number of seconds, or a Snakemake ``benchmark:`` file (a
    path or glob pattern, relative to the working directory) or a list of them. A
    benchmark file is a tab-separated table whose ``s`` column is the job's wall-clock
    seconds (one row per repeat: averaged). The files of one step (one per extraction
    shard) are summed, i.e. the step's compute time, not the elapsed time when its jobs
    ran in parallel, and the step is named ``"<step> (<n> jobs)"`` so a reader can match
    n against the shard count. A step whose files do not exist (a job run before
    benchmarks were recorded) or cannot be read is left out: timings are informative
    only, never an error.
    """
    if not spec:
        return {}
    if not isinstance(spec, Mapping):
        spec = {Path(str(p)).stem: p for p in (spec if isinstance(spec, (list, tuple)) else [spec])}
    out: dict[str, float] = {}
    for step, value in spec.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(step)] = float(value)
            continue
        total, n = 0.0, 0
        for pattern in value if isinstance(value, (list, tuple)) else [value]:
            for path in sorted(glob.glob(str(pattern))):
                try:
                    total += float(pd.read_csv(path, sep="\t")["s"].mean())
                    n += 1
                except Exception:  # noqa: BLE001, S112 - timings are informative only
                    continue
        if n:
            out[str(step) if n == 1 else f"{step} ({n} jobs)"] = total
    return out


def read_summary_outputs(entry: Mapping[str, Any]) -> dict[str, Any]:
    """What the summary page shows of one model × data-set entry (``categorize_dir``,
    ``align_dir`` and ``compress_parquet``; each optional).

    Returns ``{"cat": categorize summary (dict), "align": align summary (dict), "compress":
    the compression table (DataFrame), "missing": {name: reason}}``, the first three only
    when present and readable.
    """
    r: dict[str, Any] = {"missing": {}}
    cd = _resolve(entry.get("categorize_dir"))
    if cd is not None and (cd / F["cat_summary"]).exists():
        r["cat"] = _read_json(cd / F["cat_summary"])
    else:
        r["missing"]["categorize"] = "no categorize output"
    ad = _resolve(entry.get("align_dir"))
    if ad is not None:
        ad = ad if ad.is_dir() else ad.parent
        if (ad / F["align_summary"]).exists():
            r["align"] = _read_json(ad / F["align_summary"])
    if "align" not in r:
        r["missing"]["align"] = "no alignment output"
    cp = _resolve(entry.get("compress_parquet"))
    if cp is not None:
        try:
            r["compress"] = pd.read_parquet(cp)
        except Exception as exc:  # noqa: BLE001
            r["missing"]["compress"] = f"unreadable: {exc}"
    else:
        r["missing"]["compress"] = "not run"
    return r
