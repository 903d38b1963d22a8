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

from embedlens.store import display_token

#: The data set's metadata file (materialize). Every analysis step's files are read
#: through that step's reader (``embedlens.analysis.read_*``, ``embedlens.compress.steps
#: .read_compress``): the file names live with the step that writes them.
DATASET_META = "dataset.json"


def _flat(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A step summary (the one shape, ``embedlens.analysis.SUMMARY_KEYS``) as the sections
    use it: the step's ``results`` beside the common keys."""
    return {**(summary.get("results") or {}), **{k: v for k, v in summary.items() if k != "results"}}


def _read_step(reader, directory: Any, name: str, miss: dict[str, str], what: str):
    """``reader(directory)`` or None with the reason in ``miss[name]``."""
    d = _resolve(directory)
    if d is None:
        miss[name] = _not_given(what) if not directory else f"{directory} does not exist"
        return None
    try:
        return reader(d)
    except Exception as exc:  # noqa: BLE001 - an unreadable output is reported, not raised
        miss[name] = f"{what} {d} could not be read: {exc}"
        return None


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
    #: the pieces decoded for reading (the store's ``token_text``; ``display_token`` of each
    #: piece for a store written before it existed)
    vocab_texts: np.ndarray | None = None
    vocab_attrs: dict[str, Any] = field(default_factory=dict)
    categories: pd.DataFrame | None = None
    cat_summary: dict[str, Any] | None = None
    #: the anchors document: the model's anchors step (``anchors_dir``, found once over all
    #: its data sets) when given, else the categorize step's own ``anchors.json``
    anchors: dict[str, Any] | None = None
    anchors_summary: dict[str, Any] | None = None
    nearest_words: pd.DataFrame | None = None
    lens: Any = None
    lens_info: dict[str, Any] | None = None
    text_states_summary: dict[str, Any] | None = None
    probe: pd.DataFrame | None = None
    hitk: pd.DataFrame | None = None
    probe_summary: dict[str, Any] | None = None
    align: pd.DataFrame | None = None
    align_summary: dict[str, Any] | None = None
    compress: pd.DataFrame | None = None
    compress_summary: dict[str, Any] | None = None
    #: the model's standard-benchmark table (``embedlens.bench``; per model, not per data set)
    benchmarks: pd.DataFrame | None = None
    benchmarks_summary: dict[str, Any] | None = None
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
    anchors_dir: str | None = None,
    categorize_dir: str | None = None,
    lens_dir: str | None = None,
    probe_dir: str | None = None,
    text_states_dir: str | None = None,
    align_dir: str | None = None,
    compress_dir: str | None = None,
    benchmarks_dir: str | None = None,
    model_id: str | None = None,
    is_reference_model: bool | None = None,  # noqa: A002 - the parameter's name
    config_hash: str | None = None,
    timings: Any = None,
    **extra: Any,
) -> ReportInputs:
    """Read the outputs of one model × data set. Every input is optional; an absent or
    unreadable one is recorded in ``ReportInputs.missing`` with the reason.

    ``anchors_dir`` is the model's anchors step (one discovery over all its data sets):
    its ``anchors.json``, read through ``read_anchors``, is :attr:`ReportInputs.anchors`;
    without it (a stand-alone categorization) the categorize step's own ``anchors.json`` is.
    Paths are the notebook parameters (``notebooks/report.ipynb``); relative ones are
    relative to the working directory. ``config_hash`` (shown in the provenance) and any
    ``extra`` parameter are kept in ``ReportInputs.params`` as given; ``timings`` is read
    with :func:`read_timings` into ``ReportInputs.timings``. Never raises for a missing or
    unreadable output.
    """
    inp = ReportInputs(model=str(model), dataset=str(dataset),
                       params={"dataset_dir": dataset_dir, "hidden_index": hidden_index, "vocab": vocab,
                               "anchors_dir": anchors_dir, "categorize_dir": categorize_dir, "lens_dir": lens_dir,
                               "probe_dir": probe_dir, "text_states_dir": text_states_dir,
                               "align_dir": align_dir, "compress_dir": compress_dir, "benchmarks_dir": benchmarks_dir,
                               "model_id": model_id,
                               "config_hash": config_hash, "timings": timings, **extra})
    miss = inp.missing

    # --- data set
    d = _resolve(dataset_dir)
    if d is None:
        miss["dataset"] = (_not_given("data-set directory") if not dataset_dir
                           else f"data-set directory {dataset_dir} does not exist")
    elif not (d / DATASET_META).exists():
        miss["dataset"] = f"{d}/{DATASET_META} does not exist"
    else:
        inp.dataset_dir = d
        inp.dataset_meta = _read_json(d / DATASET_META)

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
            inp.vocab_texts = np.asarray([str(s) for s in v["token_text"].values] if "token_text" in v.variables
                                         else [display_token(s) for s in inp.vocab_strings], dtype=object)
            inp.vocab_attrs = dict(v.attrs)
        except Exception as exc:  # noqa: BLE001
            miss["vocab"] = f"the vocabulary store {vp} could not be read: {exc}"

    from embedlens.analysis import (
        open_lens,
        read_align,
        read_anchors,
        read_categorize,
        read_lens,
        read_probe,
        read_step,
    )
    from embedlens.compress.steps import read_compress

    # --- categorize
    cat = _read_step(read_categorize, categorize_dir, "categorize", miss, "categorize output")
    if cat is not None:
        inp.cat_summary = _flat(cat.summary)
        try:
            inp.categories = cat.table("categories")
        except Exception as exc:  # noqa: BLE001
            miss["categorize"] = f"{cat.directory}: the categories table could not be read: {exc}"
        try:  # the anchors it used (replaced below by the model's anchors step when given)
            inp.anchors = _read_json(cat.path("anchors"))
        except Exception as exc:  # noqa: BLE001
            miss["categorize/anchors"] = f"{cat.directory}: no anchors record ({exc})"
        try:
            inp.nearest_words = cat.table("nearest_words")
        except Exception as exc:  # noqa: BLE001
            miss["nearest_words"] = f"{cat.directory}: no nearest-words table ({exc})"

    # --- the model's anchors (one discovery over all its data sets)
    if anchors_dir:
        an = _read_step(read_anchors, anchors_dir, "anchors", miss, "anchors output")
        if an is not None:
            inp.anchors_summary = _flat(an.summary)
            try:
                inp.anchors = _read_json(an.path("anchors"))
            except Exception as exc:  # noqa: BLE001
                miss["anchors"] = f"{an.directory}: no anchors record ({exc})"

    # --- lens
    lens = _read_step(read_lens, lens_dir, "lens", miss, "layer-lens output")
    if lens is not None:
        inp.lens_info = _flat(lens.summary)
        try:
            inp.lens = open_lens(lens.path("lens"))
        except Exception as exc:  # noqa: BLE001
            miss["lens"] = f"the layer-lens store in {lens.directory} could not be opened: {exc}"

    # --- probe
    pr = _read_step(read_probe, probe_dir, "probe", miss, "probe output")
    if pr is not None:
        inp.probe_summary = _flat(pr.summary)
        if pr.summary["status"] == "skipped":
            miss["probe"] = f"the probe step was skipped: {pr.summary.get('reason') or 'no reason recorded'}"
        else:
            inp.probe = pr.table("probe")
            inp.hitk = pr.table("hitk")
            if inp.probe.empty:
                miss["probe"] = "the probe table has no rows" + (
                    f" ({pr.summary['reason']})" if pr.summary.get("reason") else "")

    # --- text states (only their summary: timing, notes)
    ts = _read_step(lambda d: read_step(d, "text_states"), text_states_dir, "text_states", miss,
                    "text-states output")
    if ts is not None:
        inp.text_states_summary = _flat(ts.summary)

    # --- align
    al = _read_step(read_align, align_dir, "align", miss, "alignment output")
    if al is not None:
        inp.align_summary = _flat(al.summary)
        if al.summary["status"] not in (None, "ok"):
            miss["align"] = f"the alignment step did not run: {al.summary.get('reason') or al.summary['status']}"
        else:
            inp.align = al.table("align")

    # --- compress
    if not compress_dir and inp.dataset_meta is not None and not inp.dataset_meta.get("vqa"):
        miss["compress"] = (f"data set {dataset!r} has no multiple-choice VQA items, so the compression "
                            "benchmark cannot score it (the synthetic source generates items; a manifest can "
                            "list its own)")
    else:
        co = _read_step(read_compress, compress_dir, "compress", miss, "compression-benchmark output")
        if co is not None:
            inp.compress_summary = _flat(co.summary)
            inp.compress = co.table("compress")
            if inp.compress.empty:
                miss["compress"] = f"{co.path('compress')} has no rows"

    # --- standard benchmarks (per model)
    bench = _read_benchmarks(benchmarks_dir, miss)
    if bench is not None:
        inp.benchmarks_summary, inp.benchmarks = bench

    inp.timings = read_timings(timings)

    if is_reference_model is None:
        inp.is_reference = looks_like_reference_model(
            model, model_id, inp.hidden_attrs.get("model"), inp.hidden_attrs.get("model_path"),
            inp.hidden_attrs.get("hf_id"), inp.hidden_attrs.get("model_name_or_path"))
    else:
        inp.is_reference = bool(is_reference_model)
    return inp


def _read_benchmarks(directory: Any, miss: dict[str, str]):
    """(flattened summary, table) of the model's benchmarks step, or None (reason in `miss`)."""
    from embedlens.bench.steps import read_benchmarks

    if not directory:
        miss["benchmarks"] = ("the standard benchmarks were not run for this model (config.yaml "
                              "benchmarks.tasks is empty, or the model is left out of them)")
        return None
    b = _read_step(read_benchmarks, directory, "benchmarks", miss, "standard-benchmark output")
    if b is None:
        return None
    t = b.table("table")
    if t.empty:
        miss["benchmarks"] = f"{b.path('table')} has no rows"
        return None
    return _flat(b.summary), t


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
    ``align_dir``, ``compress_dir`` and ``benchmarks_dir``; each optional), read through the steps' readers.

    Returns ``{"cat": categorize summary (dict), "align": align summary (dict), "compress":
    the compression table (DataFrame), "benchmarks": the model's benchmark table, "missing":
    {name: reason}}``, all but "missing" only
    when present and readable.
    """
    from embedlens.analysis import read_align, read_categorize
    from embedlens.compress.steps import read_compress

    r: dict[str, Any] = {"missing": {}}
    miss: dict[str, str] = {}
    cat = _read_step(read_categorize, entry.get("categorize_dir"), "categorize", miss, "categorize output")
    if cat is not None:
        r["cat"] = _flat(cat.summary)
    else:
        r["missing"]["categorize"] = "no categorize output"
    al = _read_step(read_align, entry.get("align_dir"), "align", miss, "alignment output")
    if al is not None:
        r["align"] = _flat(al.summary)
    else:
        r["missing"]["align"] = "no alignment output"
    co = _read_step(read_compress, entry.get("compress_dir"), "compress", miss, "compression output")
    if co is not None:
        try:
            r["compress"] = co.table("compress")
        except Exception as exc:  # noqa: BLE001
            r["missing"]["compress"] = f"unreadable: {exc}"
    else:
        r["missing"]["compress"] = ("not run: the data set has no VQA items" if not entry.get("compress_dir")
                                    else miss.get("compress", "not run"))
    bench = _read_benchmarks(entry.get("benchmarks_dir"), r["missing"])
    if bench is not None:
        r["benchmarks"] = bench[1]
    return r
