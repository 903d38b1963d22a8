"""HTML reports: papermill executes a notebook template, nbconvert writes self-contained HTML.

Two layers live here:

* **rendering** — :func:`render_report` / :func:`render_summary` execute a template
  (``notebooks/report.ipynb`` / ``notebooks/summary.ipynb``) with papermill on an ipykernel
  that runs *this* interpreter (no kernelspec file, no user Jupyter config is read or
  written), keep the executed notebook, and export HTML with every figure embedded as a
  ``data:`` URI and no script or stylesheet fetched from the network (nbconvert's ``lab``
  template minus its require.js / MathJax / mermaid / widget CDN tags). Both files are
  written atomically (temporary name, then rename). A failing cell raises
  :class:`ReportError` naming the cell, its source and the error.
* **sections** — :func:`load_inputs` reads every analysis output of one model × data set
  (each optional: a missing one is recorded with the reason), and one ``section_*``
  function per report section returns displayable items (markdown, tables, matplotlib
  figures). The notebook templates only call these, so the report logic is ordinary,
  testable library code; :func:`show` displays the items in a notebook.

Run from the command line (what a Snakemake rule calls)::

    python -m embedlens.report report --template notebooks/report.ipynb \\
        --html results/reports/M/D.html --ipynb results/reports/M/D.ipynb --params '{...}'
    python -m embedlens.report summary --template notebooks/summary.ipynb \\
        --html results/reports/index.html --ipynb results/reports/index.ipynb --entries '[...]'
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import html as _html
import json
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("embedlens.report")

# --------------------------------------------------------------------------- constants
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
    "Methods and deviations",
)
#: Section headings of the summary page (``results/reports/index.html``).
SUMMARY_SECTIONS: tuple[str, ...] = (
    "Reports",
    "Alive share",
    "Anchors",
    "Best-aligned layer",
    "Compression deltas vs baseline",
)

LABELS = ("vit_sink", "llm_sink", "dead", "alive")
GROUPS = LABELS[:3]
#: Okabe–Ito colours (colour-blind safe), one per category.
LABEL_COLOURS = {"vit_sink": "#D55E00", "llm_sink": "#CC79A7", "dead": "#7F7F7F", "alive": "#009E73"}
REFERENCE_ALIVE_SHARE = 0.60  # paper, LLaVA-1.5-7B (methods.md §1.5)
_REFERENCE_MODEL_RE = re.compile(r"llava[-_ ]?(?:v)?1[._]5[-_ ]?7b", re.IGNORECASE)

#: Procedures methods.md marks [ours] (or where the project deviates), with the output
#: that documents each. The methods section lists every one, present or not.
EXPECTED_OURS: tuple[tuple[str, str, str], ...] = (
    ("anchor_discovery", "categorize", "Anchor discovery for models without configured anchors (§1)"),
    ("patch_compression_hitk", "probe", "Patch-compression check: label word among the h[0] neighbours, hit@k (§2)"),
    ("control_task", "probe", "Probe control task (Hewitt & Liang) instead of a per-value relabelling (§2)"),
    ("layer_alignment", "align", "Layer alignment with text hidden states (§3)"),
    ("random_matched_empty_groups", "compress", "random_matched deletes nothing when the groups are empty (§4)"),
)

DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "notebooks"
INTERPRETER_KERNEL = "embedlens-python"


class ReportError(RuntimeError):
    """Executing or exporting a report failed; the message names the failing cell."""


# =========================================================================== rendering
def _kernel_spec():
    from jupyter_client.kernelspec import KernelSpec

    return KernelSpec(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name=f"Python {sys.version_info.major}.{sys.version_info.minor} ({sys.prefix})",
        language="python",
        env={"PYDEVD_DISABLE_FILE_VALIDATION": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
        metadata={"debugger": False, "supported_encryption": ["curve"]},
    )


def _kernel_manager_class():
    """An ``AsyncKernelManager`` whose kernel ``embedlens-python`` is an ipykernel on the
    running interpreter (``sys.executable``), independent of installed kernelspecs; other
    names resolve through the normal Jupyter kernelspec search."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class InterpreterKernelSpecManager(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):  # noqa: D401 - jupyter API
            if kernel_name == INTERPRETER_KERNEL:
                return _kernel_spec()
            return super().get_kernel_spec(kernel_name)

    class InterpreterKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _default_ksm(self):
            return InterpreterKernelSpecManager(data_dir=self.data_dir)

    if "transport_encryption" in AsyncKernelManager.class_trait_names():
        import zmq

        # jupyter_client >= 8.9: encrypt the local kernel channels (CurveZMQ) when
        # pyzmq can; the kernel otherwise logs a plain-TCP warning.
        policy = "auto" if zmq.has("curve") else "disabled"

        class EncryptedInterpreterKernelManager(InterpreterKernelManager):
            @default("transport_encryption")
            def _default_transport_encryption(self):
                return policy

        return EncryptedInterpreterKernelManager
    return InterpreterKernelManager


_HTML_TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{#- nbconvert's lab template without the tags that load require.js, MathJax, mermaid and
    the widget manager from a CDN: the report must open offline. -#}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{#- figures: embedded PNG with the alt text `show` stores in the output metadata -#}
{% block data_png scoped %}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
     alt="{{ ((output | get_metadata('alt', 'image/png')) or 'figure') | escape_html }}">
</div>
{% endblock data_png %}
{%- block extra_css -%}
<style type="text/css">
main { max-width: 1180px; margin: 0 auto; padding: 0 1em 4em 1em; }
.jp-RenderedHTMLCommon table { font-size: 12px; }
.jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th { text-align: left !important; vertical-align: top; }
.jp-RenderedHTMLCommon table { margin-left: 0 !important; }
.el-callout { border-left: 4px solid #999; background: #f6f6f6; padding: 6px 12px; margin: 6px 0; }
.el-missing { border-left-color: #D55E00; background: #fff4ec; }
.el-ours { border-left-color: #0072B2; background: #eef6fc; }
.el-tag { font-weight: bold; }
</style>
{%- endblock extra_css -%}
"""


def html_exporter():
    """The nbconvert exporter used for reports: code hidden, prompts hidden, no CDN tags."""
    import jinja2
    from nbconvert import HTMLExporter

    return HTMLExporter(
        template_name="lab",
        extra_loaders=[jinja2.DictLoader({"embedlens_report.html.j2": _HTML_TEMPLATE})],
        template_file="embedlens_report.html.j2",
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
        embed_images=True,
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text or "")


def _atomic_target(path: Path, suffix: str) -> Path:
    """A temporary sibling of ``path`` with the permissions a new file would get (umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: str(o) if isinstance(o, Path) else
                                 (o.item() if hasattr(o, "item") else str(o))))


def export_html(nb, out_html: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write an executed notebook as self-contained HTML (atomically). Stream output to
    stderr (warnings, progress bars) is left out of the HTML; it stays in the notebook."""
    import copy

    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.get("cell_type") == "code":
            cell["outputs"] = [o for o in cell.get("outputs", [])
                               if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    if title:
        nb.metadata["title"] = title
    body, _ = html_exporter().from_notebook_node(nb)
    out = Path(out_html)
    from embedlens.atomic import atomic_file

    with atomic_file(out) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return out


def execute_notebook(
    template: str | os.PathLike,
    out_ipynb: str | os.PathLike,
    parameters: Mapping[str, Any],
    *,
    kernel_name: str | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = 1800,
    start_timeout: float = 120,
):
    """Execute ``template`` with papermill, injecting ``parameters`` after the cell tagged
    ``parameters``; the executed notebook is written to ``out_ipynb`` atomically and returned.

    ``kernel_name=None`` runs the notebook on this interpreter (``sys.executable``, needs
    ipykernel importable here); a name uses that installed Jupyter kernelspec instead.
    On a failing cell raises :class:`ReportError` with the cell's source, error and
    traceback; the partly executed notebook is kept as ``<out>.failed.ipynb``.
    """
    import nbformat
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    template = Path(template)
    if not template.exists():
        raise FileNotFoundError(f"report template {template} does not exist")
    out = Path(out_ipynb)
    failed = out.with_name(out.stem + ".failed.ipynb")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*"):  # left by an interrupted render
        stale.unlink(missing_ok=True)
    tmp = _atomic_target(out, ".ipynb")
    # The manager resolves INTERPRETER_KERNEL itself and any other name via kernelspecs.
    kwargs: dict[str, Any] = {"kernel_manager_class": _kernel_manager_class()}
    if kernel_name is None:
        kernel_name = INTERPRETER_KERNEL
    ipython_dir = tempfile.TemporaryDirectory(prefix="embedlens-ipython-")
    old_ipdir = os.environ.get("IPYTHONDIR")
    # The kernel inherits this: no user IPython profile/startup file changes a report.
    os.environ["IPYTHONDIR"] = ipython_dir.name
    try:
        pm.execute_notebook(
            str(template), str(tmp), parameters=_jsonable(dict(parameters)),
            kernel_name=kernel_name, language="python", progress_bar=False, log_output=False,
            cwd=str(cwd) if cwd is not None else None, start_timeout=start_timeout,
            execution_timeout=timeout, **kwargs,
        )
    except PapermillExecutionError as exc:
        os.replace(tmp, failed)
        source = "\n".join("    " + line for line in str(exc.source or "").splitlines()[:40])
        trace = _strip_ansi("\n".join(exc.traceback or []))
        raise ReportError(
            f"{template}: cell {exc.cell_index} (In [{exc.exec_count}]) failed: "
            f"{exc.ename}: {_strip_ansi(str(exc.evalue))}\n--- cell source ---\n{source}\n"
            f"--- traceback ---\n{trace}\n(partly executed notebook: {failed})"
        ) from None
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    finally:
        if old_ipdir is None:
            os.environ.pop("IPYTHONDIR", None)
        else:
            os.environ["IPYTHONDIR"] = old_ipdir
        ipython_dir.cleanup()
    nb = nbformat.read(str(tmp), as_version=4)
    if "papermill" in nb.metadata:  # record the final name, not the temporary one
        nb.metadata["papermill"]["output_path"] = str(out)
        nbformat.write(nb, str(tmp))
    os.replace(tmp, out)
    if failed.exists():
        failed.unlink()
    return nb


def render_report(
    template: str | os.PathLike,
    out_html: str | os.PathLike,
    out_ipynb: str | os.PathLike,
    parameters: Mapping[str, Any],
    kernel_name: str | None = None,
    *,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = 1800,
) -> Path:
    """Execute a report template with ``parameters`` and write the executed notebook
    (``out_ipynb``) and a self-contained HTML page (``out_html``), both atomically.

    ``parameters`` are the template's parameters (see ``notebooks/report.ipynb``: ``model``,
    ``dataset``, ``dataset_dir``, ``hidden_index``, ``vocab``, ``categorize_dir``,
    ``lens_path``, ``probe_dir``, ``align_dir``, ``compress_parquet``, ...). Returns the
    HTML path. Raises :class:`ReportError` when a cell fails.
    """
    nb = execute_notebook(template, out_ipynb, parameters, kernel_name=kernel_name, cwd=cwd,
                          timeout=timeout)
    title = None
    if "model" in parameters and "dataset" in parameters:
        title = f"EmbedLens report: {parameters['model']} × {parameters['dataset']}"
    try:
        return export_html(nb, out_html, title=title)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ReportError(f"{template}: HTML export to {out_html} failed: {exc}") from exc


def render_summary(
    template: str | os.PathLike,
    out_html: str | os.PathLike,
    out_ipynb: str | os.PathLike,
    entries: Sequence[Mapping[str, Any]],
    kernel_name: str | None = None,
    *,
    title: str = "EmbedLens: all models × data sets",
    cwd: str | os.PathLike | None = None,
    timeout: float | None = 1800,
) -> Path:
    """Render the summary page (``results/reports/index.html``) over model × data-set pairs.

    Each entry: ``model``, ``dataset``, ``report_html`` (the pair's report) and the
    optional analysis outputs ``categorize_dir``, ``align_dir``, ``probe_dir``,
    ``compress_parquet``, ``model_id``, ``is_reference_model``. Links are written
    relative to ``out_html``'s directory (``embedlens-mini/synthetic.html``).
    """
    out_dir = Path(out_html).resolve().parent
    rows = []
    for e in entries:
        e = dict(e)
        rep = e.get("report_html")
        if rep:
            e["report_href"] = Path(os.path.relpath(Path(rep).resolve(), out_dir)).as_posix()
        rows.append(_jsonable(e))
    nb = execute_notebook(template, out_ipynb, {"entries": rows, "title": title},
                          kernel_name=kernel_name, cwd=cwd, timeout=timeout)
    try:
        return export_html(nb, out_html, title=title)
    except Exception as exc:  # noqa: BLE001
        raise ReportError(f"{template}: HTML export to {out_html} failed: {exc}") from exc


# =========================================================================== inputs
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
    **extra: Any,
) -> ReportInputs:
    """Read the outputs of one model × data set. Every input is optional; an absent or
    unreadable one is recorded in ``ReportInputs.missing`` with the reason."""
    inp = ReportInputs(model=str(model), dataset=str(dataset),
                       params={"dataset_dir": dataset_dir, "hidden_index": hidden_index, "vocab": vocab,
                               "categorize_dir": categorize_dir, "lens_path": lens_path,
                               "probe_dir": probe_dir, "align_dir": align_dir,
                               "compress_parquet": compress_parquet, "model_id": model_id, **extra})
    miss = inp.missing

    # --- data set
    d = _resolve(dataset_dir)
    if d is None:
        miss["dataset"] = (_not_given("data-set directory") if not dataset_dir
                           else f"data-set directory {dataset_dir} does not exist")
    elif not (d / "dataset.json").exists():
        miss["dataset"] = f"{d}/dataset.json does not exist"
    else:
        inp.dataset_dir = d
        inp.dataset_meta = _read_json(d / "dataset.json")

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
            from .store import open_shard

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
            inp.categories = pd.read_parquet(cd / "categories.parquet")
        except Exception as exc:  # noqa: BLE001
            miss["categorize"] = f"{cd}/categories.parquet could not be read: {exc}"
        for name, attr in (("summary.json", "cat_summary"), ("anchors.json", "anchors")):
            if (cd / name).exists():
                setattr(inp, attr, _read_json(cd / name))
            else:
                miss[f"categorize/{name}"] = f"{cd}/{name} does not exist"
        if (cd / "nearest_words.parquet").exists():
            inp.nearest_words = pd.read_parquet(cd / "nearest_words.parquet")
        else:
            miss["nearest_words"] = f"{cd}/nearest_words.parquet does not exist"

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
        ppar = pp if pp.is_file() else pdir / "probe.parquet"
        if (pdir / "probe_summary.json").exists():
            inp.probe_summary = _read_json(pdir / "probe_summary.json")
        if inp.probe_summary and inp.probe_summary.get("status") == "skipped":
            miss["probe"] = f"the probe step was skipped: {inp.probe_summary.get('reason', 'no reason recorded')}"
        elif ppar.exists():
            inp.probe = pd.read_parquet(ppar)
            if (pdir / "hitk.parquet").exists():
                inp.hitk = pd.read_parquet(pdir / "hitk.parquet")
            if inp.probe.empty:
                miss["probe"] = "probe.parquet has no rows" + (
                    f" ({inp.probe_summary['reason']})" if (inp.probe_summary or {}).get("reason") else "")
        else:
            miss["probe"] = f"{ppar} does not exist"

    # --- align
    ap = _resolve(align_dir)
    if ap is None:
        miss["align"] = _not_given("alignment output") if not align_dir else f"{align_dir} does not exist"
    else:
        adir = ap if ap.is_dir() else ap.parent
        apar = ap if ap.is_file() else adir / "align.parquet"
        if (adir / "align_summary.json").exists():
            inp.align_summary = _read_json(adir / "align_summary.json")
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

    if is_reference_model is None:
        inp.is_reference = looks_like_reference_model(
            model, model_id, inp.hidden_attrs.get("model"), inp.hidden_attrs.get("model_path"),
            inp.hidden_attrs.get("hf_id"), inp.hidden_attrs.get("model_name_or_path"))
    else:
        inp.is_reference = bool(is_reference_model)
    return inp


# =========================================================================== display
def callout(text: str, kind: str = "missing"):
    """A highlighted note (HTML). ``kind``: missing | note | ours. ``text`` is escaped;
    ``**bold**`` and `` `code` `` are rendered."""
    from IPython.display import HTML

    t = _html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    prefix = {"missing": "Not shown: ", "note": "", "ours": "[ours] "}.get(kind, "")
    return HTML(f'<div class="el-callout el-{kind}"><span class="el-tag">{prefix}</span>{t}</div>')


def md(text: str):
    from IPython.display import Markdown

    return Markdown(text)


def table(df: pd.DataFrame, *, caption: str | None = None, precision: int = 3, percent: Iterable[str] = (),
          index: bool = False):
    """A compact HTML table (escaped cells; ``percent`` columns shown as %)."""
    df = df.copy()
    fmt: dict[str, Any] = {}
    pct = set(percent)
    for c in df.columns:
        if c in pct:
            fmt[c] = _fmt_pct
        elif pd.api.types.is_float_dtype(df[c]):
            fmt[c] = lambda v, p=precision: _fmt_num(v, p)
    sty = df.style.format(fmt, escape="html", na_rep="")
    if not index:
        sty = sty.hide(axis="index")
    if caption:
        sty = sty.set_caption(_html.escape(caption))
    return sty


def _fmt_pct(v: Any) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "" if v is None else str(v)
    return "" if not math.isfinite(v) else f"{100 * v:.1f} %"


def _fmt_num(v: Any, precision: int = 3) -> str:
    """Numbers without float noise: integers as integers, else ``precision`` decimals
    (trailing zeros dropped), large values in general format."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "" if v is None else str(v)
    if not math.isfinite(v):
        return ""
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if abs(v) >= 1e5:
        return f"{v:.{precision}g}"
    t = f"{v:.{precision}f}".rstrip("0").rstrip(".")
    return t if t not in ("-0", "") else "0"


def figure_png(fig, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib figure (tight bounding box)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def figure_alt(fig) -> str:
    """Alt text of a figure: its titles and axis labels."""
    parts = []
    for ax in fig.axes:
        bits = [ax.get_title(), ax.get_ylabel() and f"y: {ax.get_ylabel()}",
                ax.get_xlabel() and f"x: {ax.get_xlabel()}"]
        t = "; ".join(b.replace("\n", " ") for b in bits if b)
        if t and t not in parts:
            parts.append(t)
    return " | ".join(parts)[:500] or "figure"


def show(items: Iterable[Any]) -> None:
    """Display section items in a notebook: text → markdown, matplotlib figures → PNG
    (encoded here, so no pyplot/inline-backend state is involved), the rest as is."""
    from IPython.display import display
    from matplotlib.figure import Figure

    for it in items:
        if it is None:
            continue
        if isinstance(it, str):
            display(md(it))
        elif isinstance(it, Figure):
            alt = figure_alt(it)
            png = base64.b64encode(figure_png(it)).decode("ascii")
            display({"image/png": png, "text/plain": f"<figure: {alt}>"}, raw=True,
                    metadata={"image/png": {"alt": alt}})
        else:
            display(it)


def _figure(w: float, h: float, nrows: int = 1, ncols: int = 1, **kw):
    """A matplotlib Figure outside pyplot (no implicit display, nothing leaks)."""
    import seaborn as sns
    from matplotlib.figure import Figure

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _plain_log_ticks(axis) -> None:
    """Plain numbers (0.5, 2, 10) instead of 5×10⁻¹ on a log-scaled axis, with enough
    ticks when the data span less than a couple of decades. Call after plotting."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    decades = math.log10(hi / lo) if lo > 0 and hi > 0 else 3
    subs = (1.0, 2.0, 5.0) if decades > 2 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _tok(s: Any) -> str:
    """Token string for display: whitespace made visible, kept short."""
    s = str(s)
    if s == "":
        return "∅"
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    if s.strip() == "":
        s = s.replace(" ", "␣")
    return s if len(s) <= 24 else s[:23] + "…"


def _pct(x: Any) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f} %"


def _layer_name(l: Any) -> str:
    try:
        li = int(l)
    except (TypeError, ValueError):
        return str(l)
    return "vision" if li < 0 else f"h[{li}]"


# =========================================================================== sections
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


def _settings_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def section_provenance(inp: ReportInputs) -> list:
    out: list = []
    a = inp.hidden_attrs
    import embedlens

    rows: list[tuple[str, Any]] = [
        ("model (workflow name)", inp.model),
        ("model id / path", inp.params.get("model_id") or a.get("model_path")),
        ("revision", a.get("revision") or "not recorded (local directory or builtin model)"),
        ("architecture", a.get("model_architecture") or a.get("architecture")),
        ("decoder layers L", a.get("num_layers", a.get("model_num_layers"))),
        ("hidden size / vocabulary size", f"{a.get('model_hidden_size')} / {a.get('model_vocab_size')}"
         if a.get("model_hidden_size") else None),
        ("image token id", a.get("model_image_token_id")),
        ("final norm applied to the last hidden state", a.get("final_norm_applied_to_last_layer",
                                                                a.get("model_final_norm_applied_to_last_layer"))),
        ("data set", inp.dataset),
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
                       ("probe", inp.probe_summary), ("align", inp.align_summary)):
        if summ and summ.get("seconds") is not None:
            trows.append({"step": name, "seconds": float(summ["seconds"]), "source": "output summary"})
    for name, sec in _extra_timings(inp.params.get("timings")).items():
        trows.append({"step": name, "seconds": sec, "source": "workflow benchmark"})
    if trows:
        out.append(md("**Timings** (wall-clock seconds of each step, as the outputs record them; "
                      "extraction is timed by the workflow's benchmark files when given):"))
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


def _extra_timings(spec: Any) -> dict[str, float]:
    """``timings`` parameter: {step: seconds} or a list of Snakemake benchmark TSV files."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): float(v) for k, v in spec.items()}
    out = {}
    for p in spec if isinstance(spec, (list, tuple)) else [spec]:
        p = Path(p)
        try:
            df = pd.read_csv(p, sep="\t")
            out[p.stem] = float(df["s"].mean())
        except Exception:  # noqa: BLE001 - timings are informative only
            continue
    return out


# --------------------------------------------------------------------------- shares
def section_category_shares(inp: ReportInputs) -> list:
    if inp.categories is None and inp.cat_summary is None:
        return [callout(f"category shares: {inp.why('categorize')}")]
    s = inp.cat_summary or {}
    shares = s.get("shares")
    if not shares and inp.categories is not None:
        c = inp.categories
        shares = {"topk": {lab: float((c["label"] == lab).mean()) for lab in LABELS},
                  "top1": {lab: float((c.get("label_top1", c["label"]) == lab).mean()) for lab in LABELS}}
    k = (s.get("settings") or {}).get("k", 3)
    long = pd.DataFrame([{"rule": ("top-1 rule" if r == "top1" else f"top-{k} rule"), "category": lab,
                          "share": 100 * float(shares.get(r, {}).get(lab, 0.0))}
                         for r in ("top1", "topk") for lab in LABELS])
    import seaborn as sns

    fig, ax = _figure(8.5, 3.8)
    ax = ax[0, 0]
    sns.barplot(long, x="category", y="share", hue="rule", order=list(LABELS), ax=ax,
                palette=["#9ecae1", "#08519c"])
    for cont in ax.containers:
        ax.bar_label(cont, fmt="%.1f %%", fontsize=8, padding=2)
    ax.set_ylabel("share of visual tokens (%)")
    ax.set_xlabel("EmbedLens category (label = first matching group)")
    ax.set_ylim(0, max(105, long["share"].max() * 1.12))
    alive = float(shares.get("topk", {}).get("alive", float("nan")))
    if inp.is_reference:
        ax.axhline(100 * REFERENCE_ALIVE_SHARE, ls="--", color="black", lw=1.2,
                   label="paper: alive ≈ 60 % (LLaVA-1.5-7B)")
        ref_txt = (f"The dashed line is the paper's reference: ≈ 60 % of LLaVA-1.5-7B's visual tokens are alive; "
                   f"this run measures **{_pct(alive)}** (top-{k} rule).")
    else:
        ax.axhline(100 * alive, ls=":", color="#009E73", lw=1.2, label=f"alive share {_pct(alive)}")
        ref_txt = (f"Alive share (top-{k} rule): **{_pct(alive)}**. The paper's ≈ 60 % refers to LLaVA-1.5-7B and is "
                   "not drawn for this model (set `is_reference_model` to compare).")
    ax.legend(loc="upper left", fontsize=8)
    n_tok = s.get("n_tokens", len(inp.categories) if inp.categories is not None else "?")
    ax.set_title(f"{inp.model} × {inp.dataset}: {n_tok} "
                 f"visual tokens of {s.get('n_images', '?')} images", fontsize=10)
    out: list = [md(ref_txt), fig]

    counts = s.get("counts") or {}
    tab = pd.DataFrame({
        "category": list(LABELS),
        "tokens (top-1 rule)": [counts.get("top1", {}).get(lab) for lab in LABELS],
        "share (top-1 rule)": [shares.get("top1", {}).get(lab) for lab in LABELS],
        f"tokens (top-{k} rule)": [counts.get("topk", {}).get(lab) for lab in LABELS],
        f"share (top-{k} rule)": [shares.get("topk", {}).get(lab) for lab in LABELS],
    })
    out.append(table(tab, percent=["share (top-1 rule)", f"share (top-{k} rule)"]))
    per = s.get("alive_share_per_image") or {}
    if per.get("mean") is not None:
        out.append(md(f"Alive share per image: mean {_pct(per.get('mean'))}, sd {_pct(per.get('sd'))}, "
                      f"range {_pct(per.get('min'))} – {_pct(per.get('max'))}."))
    ov = s.get("overlap") or {}
    if ov.get("counts"):
        g = ov.get("groups", list(GROUPS))
        m = pd.DataFrame(ov["counts"], index=[f"in {x}" for x in g], columns=[f"in {x}" for x in g])
        out.append(md(f"**Group membership overlap** (tokens with an anchor of both groups in their top-{k}; "
                      "the diagonal is each group's raw membership). Labels resolve overlaps in the order "
                      "vit_sink, llm_sink, dead."))
        out.append(table(m.reset_index(names=""), precision=0))
        comb = ov.get("combinations") or {}
        if comb:
            out.append(md("Membership combinations: " + ", ".join(f"`{kk}` {vv}" for kk, vv in comb.items())))
    ex = s.get("excluded_ids")
    if ex is not None:
        strs = s.get("excluded_strings") or []
        out.append(md(f"{len(ex)} vocabulary rows were excluded from the neighbour candidates (special/added "
                      f"tokens{': ' + ', '.join('`' + _tok(x) + '`' for x in strs[:12]) if strs else ''}"
                      f"{' …' if len(strs) > 12 else ''})."))
    return out


# --------------------------------------------------------------------------- maps
def _sample_image_ids(inp: ReportInputs, n: int) -> list[str]:
    ids = list(dict.fromkeys(inp.categories["image_id"].astype(str))) if inp.categories is not None else []
    if not ids or n <= 0:
        return []
    if len(ids) <= n:
        return ids
    pos = np.linspace(0, len(ids) - 1, n).round().astype(int)
    return [ids[i] for i in dict.fromkeys(pos.tolist())]


def _image_file(inp: ReportInputs, image_id: str) -> Path | None:
    if inp.dataset_meta is None or inp.dataset_dir is None:
        return None
    for im in inp.dataset_meta.get("images", []):
        if str(im.get("image_id")) == str(image_id):
            p = inp.dataset_dir / im["file"]
            return p if p.exists() else None
    return None


def _label_grid(sub: pd.DataFrame) -> tuple[np.ndarray, int, int]:
    """(R, C) array of label indices (-1 = no token) for one image's tokens."""
    R = int(sub["grid_rows"].max())
    C = int(sub["grid_cols"].max())
    grid = np.full((max(R, 1), max(C, 1)), -1, dtype=int)
    ok = (sub["patch_row"] >= 0) & (sub["patch_col"] >= 0) & (sub["patch_row"] < R) & (sub["patch_col"] < C)
    first = sub[ok].drop_duplicates(["patch_row", "patch_col"], keep="first")
    idx = first["label"].map({lab: i for i, lab in enumerate(LABELS)}).fillna(-1).astype(int).to_numpy()
    grid[first["patch_row"].to_numpy(int), first["patch_col"].to_numpy(int)] = idx
    return grid, R, C


def section_category_maps(inp: ReportInputs, n_images: int = 4) -> list:
    if inp.categories is None:
        return [callout(f"category maps: {inp.why('categorize')}")]
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch
    from PIL import Image

    ids = _sample_image_ids(inp, n_images)
    if not ids:
        return [callout("category maps: the categorize table has no tokens")]
    ncols = min(4, len(ids))
    nrows = math.ceil(len(ids) / ncols)
    fig, axes = _figure(3.1 * ncols + 0.4, 3.2 * nrows + 0.6, nrows, ncols)
    cats = inp.categories
    colours = np.array([to_rgba(LABEL_COLOURS[lab], 0.5) for lab in LABELS] + [(0, 0, 0, 0)])
    notes = []
    for ax, iid in zip(axes.ravel(), ids):
        sub = cats[cats["image_id"].astype(str) == iid]
        grid, R, C = _label_grid(sub)
        f = _image_file(inp, iid)
        if f is not None:
            img = Image.open(f).convert("RGB")
            W, H = img.size
            ax.imshow(np.asarray(img), extent=(0, W, H, 0))
        else:
            W, H = C, R
            notes.append(iid)
        ax.imshow(colours[grid], extent=(0, W, H, 0), interpolation="nearest")
        if max(R, C) <= 48:
            for r in range(R + 1):
                ax.axhline(r * H / R, color="white", lw=0.3, alpha=0.7)
            for c in range(C + 1):
                ax.axvline(c * W / C, color="white", lw=0.3, alpha=0.7)
        alive = float((sub["label"] == "alive").mean()) if len(sub) else float("nan")
        ax.set_title(f"{iid}\nalive {_pct(alive)}", fontsize=9)
        ax.set_xlabel(f"x (pixels; {C} patch columns)", fontsize=8)
        ax.set_ylabel(f"y (pixels; {R} patch rows)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(False)
    for ax in axes.ravel()[len(ids):]:
        ax.set_visible(False)
    fig.legend(handles=[Patch(color=LABEL_COLOURS[lab], label=lab) for lab in LABELS], loc="outside right upper",
               ncol=1, fontsize=9, title="category\n(top-k rule)", title_fontsize=9)
    out = [md(f"Each visual token's category drawn over its patch for {len(ids)} sample image(s) (evenly spaced "
              "over the data set). The patch grid is stretched over the whole image: a processor that crops or "
              "pads (e.g. CLIP's centre crop) shifts the true patch positions for non-square images."), fig]
    if notes:
        out.append(callout(f"image files not found for {', '.join(notes)} ({inp.why('dataset')}): "
                           "the grid is drawn without the image"))
    n_nopatch = int(((cats["patch_row"] < 0) | (cats["patch_col"] < 0)).sum())
    if n_nopatch:
        out.append(md(f"{n_nopatch} visual tokens have no patch position (e.g. row separators) and are not drawn."))
    return out


# --------------------------------------------------------------------------- lens
def _pick_patches(inp: ReportInputs, lens_image_ids: list[str], n: int) -> list[dict]:
    """Sample patches: per sample image, one token per category present (alive first)."""
    cats = inp.categories
    picks: list[dict] = []
    for iid in lens_image_ids:
        sub = cats[(cats["image_id"].astype(str) == iid) & (cats["patch_row"] >= 0)]
        if sub.empty:
            continue
        R, C = int(sub["grid_rows"].max()), int(sub["grid_cols"].max())
        for lab in ("alive", "dead", "vit_sink", "llm_sink"):
            g = sub[sub["label"] == lab]
            if g.empty:
                continue
            # the token nearest the image centre: a stable, content-bearing choice
            d = (g["patch_row"] + 0.5 - R / 2) ** 2 + (g["patch_col"] + 0.5 - C / 2) ** 2
            r = g.loc[d.idxmin()]
            picks.append({"image_id": iid, "token": int(r["token"]), "row": int(r["patch_row"]),
                          "col": int(r["patch_col"]), "label": lab, "R": R, "C": C})
            if len(picks) >= n:
                return picks
    return picks


def section_nearest_words(inp: ReportInputs, n_patches: int = 4, k: int = 3, n_images: int = 4) -> list:
    if inp.lens is None:
        return [callout(f"nearest words by layer: {inp.why('lens')}")]
    if inp.categories is None:
        return [callout(f"nearest words by layer: the patches are chosen by category and {inp.why('categorize')}")]
    if inp.vocab_strings is None:
        return [callout(f"nearest words by layer: token strings come from the vocabulary store and {inp.why('vocab')}")]
    lens = inp.lens
    lens_ids = [str(x) for x in lens["image_id"].values]
    first = [i for i in _sample_image_ids(inp, n_images) if i in lens_ids]
    order = first + [i for i in lens_ids if i not in first]
    picks = _pick_patches(inp, order, n_patches)
    if not picks:
        return [callout("nearest words by layer: no categorized patch of the lens' images")]
    strings = inp.vocab_strings
    layers = [int(x) for x in lens["layer"].values]
    kk = min(k, int(lens.sizes.get("k", k)))
    out: list = [md(f"Top-{kk} vocabulary neighbours of {len(picks)} sample patch(es) at every stored layer, by the "
                    "**embedding lens** (cosine with the input embeddings E) and the **logit lens** "
                    "(LM head after the final norm). Column = patch `P#` (image, row, column, category).")]
    cols = [f"P{j + 1} {p['image_id']} ({p['row']},{p['col']}) {p['label']}" for j, p in enumerate(picks)]

    def words(var: str) -> pd.DataFrame:
        data = {}
        for col, p in zip(cols, picks):
            i = lens_ids.index(p["image_id"])
            ids = np.asarray(lens[var].isel(image=i, token=p["token"]).values)  # (layer, k)
            data[col] = [", ".join(_tok(strings[t]) if 0 <= t < len(strings) else "?" for t in row[:kk] if t >= 0)
                         for row in ids]
        return pd.DataFrame(data, index=[_layer_name(l) for l in layers]).reset_index(names="layer")

    out.append(md("**Embedding lens** (cosine with E):"))
    out.append(table(words("emb_id")))
    if "logit_id" in lens.variables:
        out.append(md("**Logit lens** (LM head of the final-normed state; the last HF hidden state is already "
                      "normed):"))
        out.append(table(words("logit_id")))
    else:
        out.append(callout("logit lens: not computed (no LM head was given to the lens step)"))
    # where the patches are
    from matplotlib.patches import Rectangle
    from PIL import Image

    imgs = list(dict.fromkeys(p["image_id"] for p in picks))
    fig, axes = _figure(3.2 * len(imgs) + 0.3, 3.4, 1, len(imgs))
    for ax, iid in zip(axes.ravel(), imgs):
        f = _image_file(inp, iid)
        sel = [(j, p) for j, p in enumerate(picks) if p["image_id"] == iid]
        R, C = sel[0][1]["R"], sel[0][1]["C"]
        if f is not None:
            img = Image.open(f).convert("RGB")
            W, H = img.size
            ax.imshow(np.asarray(img), extent=(0, W, H, 0))
        else:
            W, H = C, R
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
        for j, p in sel:
            x0, y0 = p["col"] * W / C, p["row"] * H / R
            ax.add_patch(Rectangle((x0, y0), W / C, H / R, fill=False, lw=2, ec=LABEL_COLOURS[p["label"]]))
            ax.text(x0 + W / C, y0, f"P{j + 1}", color="white", fontsize=9, va="bottom", ha="left",
                    bbox={"facecolor": LABEL_COLOURS[p["label"]], "pad": 1, "lw": 0})
        ax.set_title(iid, fontsize=9)
        ax.set_xlabel("x (pixels)", fontsize=8)
        ax.set_ylabel("y (pixels)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(False)
    out.append(md("Where the sample patches are (box colour = category):"))
    out.append(fig)
    for n in (inp.lens_info or {}).get("notes", []) or []:
        out.append(md(f"Lens note: {n}"))
    return out


# --------------------------------------------------------------------------- norms
def _norm_columns(cats: pd.DataFrame, max_layers: int = 7) -> list[str]:
    llm = sorted((int(m.group(1)) for c in cats.columns if (m := re.match(r"^norm_h(\d+)$", c))))
    if len(llm) > max_layers:
        keep = {llm[0], llm[-1]} | set(llm[1:3])
        rest = [l for l in llm if l not in keep]
        extra = max_layers - len(keep)
        if extra > 0 and rest:
            keep |= {rest[i] for i in np.linspace(0, len(rest) - 1, extra).round().astype(int)}
        llm = sorted(keep)
    cols = ["norm_vision"] if "norm_vision" in cats and np.isfinite(cats["norm_vision"]).any() else []
    return cols + [f"norm_h{l}" for l in llm]


def _final_norm_flag(inp: ReportInputs) -> bool:
    a = inp.hidden_attrs
    # model_…: the adapter's copy in stores written before the attribute names were unified
    v = a.get("final_norm_applied_to_last_layer", a.get("model_final_norm_applied_to_last_layer"))
    return bool(v) if v is not None else False


def _num_layers(inp: ReportInputs) -> int | None:
    a = inp.hidden_attrs
    v = a.get("num_layers", a.get("model_num_layers"))  # model_…: stores written before unification
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def section_norms(inp: ReportInputs, max_tokens: int = 40000) -> list:
    if inp.categories is None:
        return [callout(f"norm distributions: {inp.why('categorize')}")]
    import seaborn as sns

    cats = inp.categories
    cols = _norm_columns(cats)
    if not cols:
        return [callout("norm distributions: the categorize table has no norm columns")]
    sub = cats.sample(n=max_tokens, random_state=0) if len(cats) > max_tokens else cats
    long = sub[["label"] + cols].melt(id_vars="label", var_name="feature", value_name="norm")
    long = long[np.isfinite(long["norm"]) & (long["norm"] > 0)]
    normed_last = _final_norm_flag(inp)
    last = max((int(c[6:]) for c in cols if c.startswith("norm_h")), default=None)
    names = {c: ("vision out" if c == "norm_vision" else _layer_name(c[6:])
                 + (" (final norm)" if normed_last and int(c[6:]) == last and last == _num_layers(inp) else ""))
             for c in cols}
    long["feature"] = long["feature"].map(names)
    hue_order = [lab for lab in LABELS if (long["label"] == lab).any()]
    fig, ax = _figure(min(3 + 1.3 * len(cols), 12), 4.2)
    ax = ax[0, 0]
    sns.boxplot(long, x="feature", y="norm", hue="label", hue_order=hue_order, order=[names[c] for c in cols],
                palette=LABEL_COLOURS, log_scale=True, fliersize=1.5, linewidth=0.8, ax=ax)
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("representation (vision-encoder output, LLM hidden state h[l])")
    ax.set_ylabel("L2 norm of the token's hidden state (log scale)")
    ax.legend(title="category", fontsize=8, title_fontsize=8)
    out: list = [md("Distribution of the hidden-state norm of the visual tokens per category. ViT sinks are "
                    "outliers of the vision-encoder output norm, LLM sinks develop massive activations in early "
                    "LLM layers."
                    + (f" A random {max_tokens} of {len(cats)} tokens are drawn." if len(cats) > max_tokens else "")),
                 fig]
    med = cats.groupby("label")[cols].median().reindex([lab for lab in LABELS if lab in set(cats["label"])])
    med.columns = [names[c] for c in cols]
    out.append(md("Median norm per category:"))
    out.append(table(med.reset_index(names="category"), precision=3))
    if "norm_vision" not in cols:
        out.append(callout("vision-encoder norms: not available (no vision layer extracted, or vision tokens do not "
                           "map 1:1 onto the LLM's visual tokens)"))
    note = [n for n in (inp.cat_summary or {}).get("notes", []) if n]
    for n in note:
        out.append(md(f"Note: {n}"))
    return out


# --------------------------------------------------------------------------- anchors
def section_anchors(inp: ReportInputs) -> list:
    if inp.anchors is None and inp.cat_summary is None:
        return [callout(f"anchors: {inp.why('categorize')}")]
    doc = inp.anchors or {"source": (inp.cat_summary or {}).get("anchor_source"),
                          "anchors": (inp.cat_summary or {}).get("anchors", {}),
                          "anchor_strings": (inp.cat_summary or {}).get("anchor_strings", {}), "evidence": {}}
    source = doc.get("source") or "unknown"
    anchors = doc.get("anchors") or {}
    strings = doc.get("anchor_strings") or {}
    ev = doc.get("evidence") or {}
    s = inp.cat_summary or {}
    out: list = []
    if source == "configured":
        out.append(md("Anchors were **configured** in `config.yaml` (e.g. the paper's ids for LLaVA-1.5-7B); "
                      "no discovery was run. The evidence below is how often each anchor is a top-k neighbour."))
    else:
        out.append(callout("anchors were **discovered** from the extracted data (no configured anchors for this model; "
                           "no released procedure exists). ViT sinks = vision-output norm outliers, LLM sinks = "
                           "early-layer norm outliers, dead = image-independent top-1 hub ids; each group's anchor "
                           "ids = its most frequent, specific top-1 neighbours.", kind="ours"))
    rows = []
    for g in GROUPS:
        ids = anchors.get(g) or []
        gev = ev.get(g) or {}
        rows.append({
            "group": g, "anchor ids": ", ".join(str(i) for i in ids) or "—",
            "anchor strings": ", ".join(_tok(x) for x in strings.get(g, [])) or "—",
            "tokens (top-k membership)": (s.get("counts") or {}).get("topk", {}).get(g) if s.get("counts") else None,
            "membership share (top-k)": (s.get("membership") or {}).get("topk", {}).get(g),
            "discovery status": gev.get("status", "configured" if source == "configured" else ""),
        })
    out.append(table(pd.DataFrame(rows), percent=["membership share (top-k)"]))
    empty = [g for g in GROUPS if not anchors.get(g)]
    if empty:
        why = "; ".join(f"{g}: {(ev.get(g) or {}).get('status', 'no anchor configured')}" for g in empty)
        out.append(callout(f"No anchor for {', '.join(empty)}, so no token can be labelled "
                           f"{' / '.join(empty)}. Why — {why}", kind="note"))

    if source != "configured" and inp.categories is not None:
        out.extend(_anchor_evidence_figure(inp, ev))
        for g in ("vit_sink", "llm_sink"):
            cand = (ev.get(g) or {}).get("anchor_candidates") or []
            if cand:
                out.append(md(f"**{g} anchor candidates** (top-1 ids of the group's outlier tokens):"))
                out.append(table(pd.DataFrame(cand), percent=["group_share", "overall_share"]))
        dc = (ev.get("dead") or {}).get("candidates") or []
        if dc:
            d = pd.DataFrame(dc)
            if "label_information" in d:
                d["max label information U"] = [max(x.values()) if isinstance(x, dict) and x else None
                                                for x in d.pop("label_information")]
            out.append(md("**Dead-hub candidates** (top-1 ids winning at least the minimum share of tokens; "
                          f"label information: {(ev.get('dead') or {}).get('information_criterion', 'n/a')}):"))
            out.append(table(d, percent=["top1_share", "image_share"]))
        params = ev.get("params")
        if params:
            out.append(md("Discovery thresholds: " + ", ".join(f"`{k}={v}`" for k, v in params.items())))
    nw = inp.nearest_words
    if nw is not None and not nw.empty:
        top = nw.head(15).copy()
        if "token_string" in top:
            top["token_string"] = top["token_string"].map(_tok)
        out.append(md("**Most frequent nearest words of h[0]** (the vocabulary ids that win the most visual tokens):"))
        out.append(table(top, percent=[c for c in ("share_top1", "share_topk") if c in top]))
    elif "nearest_words" in inp.missing:
        out.append(callout(f"nearest-word histogram: {inp.why('nearest_words')}"))
    return out


def _anchor_evidence_figure(inp: ReportInputs, ev: Mapping[str, Any]) -> list:
    import seaborn as sns

    cats = inp.categories
    panels = []
    if "norm_vision" in cats and np.isfinite(cats["norm_vision"]).any():
        panels.append("vit")
    early = [str(l) for l in ((ev.get("llm_sink") or {}).get("early_layers") or []) if f"norm_h{l}" in cats]
    if early:
        panels.append("llm")
    if inp.nearest_words is not None and not inp.nearest_words.empty:
        panels.append("hub")
    if not panels:
        return []
    fig, axes = _figure(4.2 * len(panels), 3.6, 1, len(panels))
    for ax, kind in zip(axes.ravel(), panels):
        if kind == "vit":
            x = cats["norm_vision"].to_numpy(float)
            x = x[np.isfinite(x) & (x > 0)]
            sns.histplot(x=x, bins=50, log_scale=True, ax=ax, color="#888888")
            thr = (ev.get("vit_sink") or {}).get("norm_threshold")
            if thr and math.isfinite(thr):
                ax.axvline(thr, color=LABEL_COLOURS["vit_sink"], ls="--", label=f"outlier threshold {thr:.3g}")
                ax.legend(fontsize=7)
            _plain_log_ticks(ax.xaxis)
            ax.set_xlabel("vision-encoder output norm (L2, log scale)")
            ax.set_ylabel("visual tokens (count)")
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
            ax.set_title("ViT-sink evidence", fontsize=9)
        elif kind == "llm":
            per = (ev.get("llm_sink") or {}).get("per_layer") or {}
            pal = sns.color_palette("flare", len(early))
            for c, l in zip(pal, early):
                x = cats[f"norm_h{l}"].to_numpy(float)
                x = x[np.isfinite(x) & (x > 0)]
                sns.histplot(x=x, bins=50, log_scale=True, ax=ax, color=c, element="step", fill=False,
                             label=f"h[{l}]")
                thr = (per.get(l) or per.get(str(l)) or {}).get("norm_threshold")
                if thr and math.isfinite(thr):
                    ax.axvline(thr, color=c, ls="--", lw=1)
            ax.legend(fontsize=7, title="layer (dashed: threshold)", title_fontsize=7)
            _plain_log_ticks(ax.xaxis)
            ax.set_xlabel("early-layer hidden-state norm (L2, log scale)")
            ax.set_ylabel("visual tokens (count)")
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
            ax.set_title("LLM-sink evidence", fontsize=9)
        else:
            nw = inp.nearest_words.head(12).copy()
            nw["word"] = [f"{_tok(s)} ({i})" for s, i in zip(nw["token_string"], nw["token_id"])]
            nw["anchor"] = nw.get("anchor_group", pd.Series([None] * len(nw))).fillna("none")
            pal = {**LABEL_COLOURS, "none": "#c6dbef"}
            sns.barplot(nw, y="word", x=100 * nw["share_top1"], hue="anchor", dodge=False, ax=ax,
                        palette=pal, orient="h")
            hub = ((ev.get("params") or {}).get("hub_min_share"))
            if hub:
                ax.axvline(100 * hub, color="black", ls=":", lw=1, label=f"hub_min_share {100 * hub:.0f} %")
            ax.legend(fontsize=7, title="anchor group", title_fontsize=7)
            ax.set_xlabel("tokens whose top-1 neighbour it is (%)")
            ax.set_ylabel("vocabulary token (id)")
            ax.set_title("Dead-hub evidence", fontsize=9)
    return [md("Evidence for the discovered anchors:"), fig]


# --------------------------------------------------------------------------- probe
def _feature_order(features: Iterable[str]) -> list[str]:
    fs = list(dict.fromkeys(features))

    def key(f):
        if f == "vision":
            return -1
        m = re.match(r"^h(\d+)$", str(f))
        return int(m.group(1)) if m else 10**6

    return sorted(fs, key=key)


def _feature_label(f: str) -> str:
    m = re.match(r"^h(\d+)$", str(f))
    return f"h[{m.group(1)}]" if m else str(f)


def section_probe(inp: ReportInputs) -> list:
    if inp.probe is None or inp.probe.empty:
        return [callout(f"probing classifiers: {inp.why('probe')}")]
    import seaborn as sns

    p = inp.probe.copy()
    ok = p[p["status"] == "ok"]
    out: list = [md("Linear probes (multinomial logistic regression on standardized features, split by image) per "
                    "representation, label task and token group. Bands: bootstrap CI over test images; dotted: "
                    "majority baseline; selectivity = accuracy − control-task accuracy.")]
    if ok.empty:
        out.append(callout("probe curves: no (layer, task, group) had enough tokens to train and test a probe"))
    else:
        feats = _feature_order(p["feature"])
        xpos = {f: i for i, f in enumerate(feats)}
        groups = [g for g in dict.fromkeys(p["group"]) if (ok["group"] == g).any()]
        tasks = list(dict.fromkeys(ok["task"]))
        pal = dict(zip(tasks, sns.color_palette("colorblind", len(tasks))))
        fig, axes = _figure(3.3 * len(groups) + 1.2, 6.2, 2, len(groups), sharey="row")
        for j, g in enumerate(groups):
            a1, a2 = axes[0, j], axes[1, j]
            for t in tasks:
                d = ok[(ok["group"] == g) & (ok["task"] == t)].copy()
                if d.empty:
                    continue
                d["x"] = d["feature"].map(xpos)
                d = d.sort_values("x")
                a1.plot(d["x"], d["accuracy"], marker="o", ms=3, color=pal[t], label=t)
                a1.fill_between(d["x"], d["accuracy_ci_low"], d["accuracy_ci_high"], color=pal[t], alpha=0.15, lw=0)
                a1.plot(d["x"], d["majority_accuracy"], ls=":", color=pal[t], lw=1)
                a2.plot(d["x"], d["selectivity"], marker="o", ms=3, color=pal[t], label=t)
                if "selectivity_ci_low" in d:
                    a2.fill_between(d["x"], d["selectivity_ci_low"], d["selectivity_ci_high"], color=pal[t],
                                    alpha=0.15, lw=0)
            a2.axhline(0, color="black", lw=0.8)
            n = int(ok[ok["group"] == g]["n_tokens"].max())
            a1.set_title(f"group: {g} (≤ {n} tokens)", fontsize=9)
            for a in (a1, a2):
                a.set_xticks(range(len(feats)), [_feature_label(f) for f in feats],
                             rotation=90 if len(feats) > 12 else 0, fontsize=7)
                a.set_xlim(-0.5, len(feats) - 0.5)
        fig.supxlabel("representation (vision-encoder output, LLM hidden state h[l])", fontsize=10)
        axes[0, 0].set_ylabel("probe accuracy on held-out images")
        axes[1, 0].set_ylabel("selectivity (accuracy − control)")
        axes[0, 0].set_ylim(0, 1.02)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=pal[t], marker="o", ms=3, label=t) for t in tasks]
        handles.append(Line2D([], [], color="grey", ls=":", label="majority baseline"))
        fig.legend(handles=handles, loc="outside right upper", title="task", fontsize=8, title_fontsize=8)
        out.append(fig)
    # status: groups with too few tokens are reported, never dropped
    st = (p.groupby(["task", "group"], sort=False)["status"]
          .agg(lambda x: ", ".join(f"{k.replace('_', ' ')} ×{v}" for k, v in x.value_counts().items()))
          .unstack("group").reset_index())
    st.columns.name = None
    bad = p[p["status"] != "ok"]
    if not bad.empty:
        out.append(md(f"**Probe status** per task and group (number of representations): {len(bad)} of {len(p)} "
                      "probes were not trained because their group had too few tokens, images or classes."))
    else:
        out.append(md("**Probe status** per task and group (number of representations):"))
    out.append(table(st))
    best = (inp.probe_summary or {}).get("best_by_task_group") or {}
    if best:
        b = pd.DataFrame([{"task/group": kk, "best representation": _feature_label(v.get("feature")),
                           "accuracy": v.get("accuracy"), "selectivity": v.get("selectivity")}
                          for kk, v in best.items()])
        out.append(md("Best representation per task and group (by accuracy):"))
        out.append(table(b, precision=3))
    h = inp.hitk
    if h is not None and not h.empty:
        kmax = int(h["k"].max())
        cols = ["task", "group", "n_tokens", "hits", "hit_rate", "chance_uniform", "chance_label_prior"]
        hh = h[h["k"] == kmax][[c for c in cols if c in h]]
        out.append(callout(f"patch-compression check: is the label word among the top-{kmax} EmbedLens neighbours of "
                           "the token at h[0]? hit@k with two chance levels (uniform draw from the vocabulary; the "
                           "token's own neighbours against a label drawn from the group's label distribution).",
                           kind="ours"))
        out.append(table(hh, percent=["hit_rate", "chance_uniform", "chance_label_prior"]))
    for n in (inp.probe_summary or {}).get("notes", []) or []:
        out.append(md(f"Note: {n}"))
    return out


# --------------------------------------------------------------------------- align
_MEASURE_LABELS = {
    "nn_accuracy": "nearest-label-word accuracy (mean over tasks)",
    "mean_max_cos": "mean max cosine to layer-l text states (centred)",
    "cka": "linear CKA with label-word states (mean over tasks)",
}


def section_alignment(inp: ReportInputs) -> list:
    if inp.align is None or inp.align.empty:
        return [callout(f"layer alignment: {inp.why('align')}")]
    import seaborn as sns

    a = inp.align.copy()
    a = a[np.isfinite(a["value"].astype(float))]
    summ = inp.align_summary or {}
    out: list = [callout("layer alignment: visual tokens compared with the LLM's text hidden states of short prompts "
                         "built from the label words plus a generic word list, per text layer l. Solid lines: visual "
                         "h[0] vs text layer l (the claim: alive tokens resemble intermediate layers); dashed: visual "
                         "h[l] vs text layer l. Stars mark the best-aligned layer.", kind="ours")]
    if a.empty:
        out.append(callout("alignment curves: every measured value is missing (no tokens in any group)"))
        return out
    agg = (a.groupby(["visual", "group", "layer", "measure"], dropna=False)
           .agg(value=("value", "mean"), chance=("chance", "mean")).reset_index())
    measures = [m for m in ("nn_accuracy", "mean_max_cos", "cka") if (agg["measure"] == m).any()]
    groups = [g for g in dict.fromkeys(agg["group"])]
    pal = {g: LABEL_COLOURS.get(g, c) for g, c in zip(groups, sns.color_palette("dark", len(groups)))}
    pal.setdefault("all", "#0072B2")
    pal["all"] = "#0072B2"
    pal["sink"] = LABEL_COLOURS["vit_sink"]
    fig, axes = _figure(4.3 * len(measures) + 1.6, 3.9, 1, len(measures))
    best = summ.get("best_layer") or {}
    for ax, m in zip(axes.ravel(), measures):
        d = agg[agg["measure"] == m]
        for (vis, g), dd in d.groupby(["visual", "group"]):
            dd = dd.sort_values("layer")
            ax.plot(dd["layer"], dd["value"], ls="-" if vis == "h0" else "--", marker="o", ms=3,
                    color=pal.get(g, "#333333"), label=f"{g} · {'h[0]' if vis == 'h0' else 'h[l]'}")
            b = best.get(f"{vis}/{g}")
            if b and b.get("criterion") == m:
                yb = dd.loc[dd["layer"] == b["layer"], "value"]
                if len(yb):
                    ax.plot([b["layer"]], [float(yb.iloc[0])], marker="*", ms=14, color=pal.get(g, "#333333"),
                            mec="black", mew=0.6, ls="none")
        if m == "nn_accuracy" and np.isfinite(d["chance"]).any():
            ax.axhline(float(d["chance"].mean()), color="grey", ls=":", lw=1, label="chance")
        ax.set_xlabel("text layer l (LLM hidden-state index)")
        ax.set_ylabel(_MEASURE_LABELS.get(m, m))
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, title="group · visual", title_fontsize=7, loc="outside right upper")
    out.append(fig)
    if best:
        bt = pd.DataFrame([{"visual": kk.split("/")[0].replace("h0", "h[0] vs text l").replace("hl", "h[l] vs text l"),
                            "group": kk.split("/")[1], "best layer": v.get("layer"), "criterion": v.get("criterion"),
                            "value at best": v.get("value"), "value at layer 0": v.get("value_at_layer0")}
                           for kk, v in best.items()])
        out.append(md("**Best-aligned layer** (argmax of the mean nearest-label-word accuracy, else of the mean max "
                      "cosine):"))
        out.append(table(bt, precision=3))
    if summ.get("centring"):
        out.append(md(f"Centring: {summ['centring']}."))
    for n in summ.get("notes", []) or []:
        out.append(md(f"Note: {n}"))
    return out


# --------------------------------------------------------------------------- compress
_COMPRESS_NEEDED = ("condition", "op", "item_type", "accuracy")


def _condition_rows(c: pd.DataFrame) -> pd.DataFrame:
    d = c
    if "seed" in d:
        d = d[d["seed"].isna()]
    if "item_type" in d:
        d = d[d["item_type"].astype(str) == "all"] if (d["item_type"].astype(str) == "all").any() else d
    return d.drop_duplicates("condition")


def section_compression(inp: ReportInputs) -> list:
    if inp.compress is None or inp.compress.empty:
        return [callout(f"compression benchmark: {inp.why('compress')}")]
    import seaborn as sns

    c = inp.compress
    missing_cols = [x for x in _COMPRESS_NEEDED if x not in c]
    if missing_cols:
        return [callout(f"compression benchmark: the table lacks the columns {missing_cols}")]
    d = _condition_rows(c).copy()
    base = d[d["op"] == "baseline"]
    base_acc = float(base["accuracy"].iloc[0]) if len(base) else float("nan")
    d["Δ accuracy vs baseline (pp)"] = 100 * (d["accuracy"] - base_acc)
    if {"ci_low", "ci_high"} <= set(d):
        d["accuracy [CI]"] = [f"{_fmt_pct(a)} [{100 * lo:.1f}, {100 * hi:.1f}]"
                              for a, lo, hi in zip(d["accuracy"], d["ci_low"], d["ci_high"])]
    else:
        d["accuracy [CI]"] = d["accuracy"].map(_fmt_pct)
    cols = {"condition": "condition", "op": "op", "groups": "groups", "n_items": "items",
            "accuracy [CI]": "accuracy [CI]", "Δ accuracy vs baseline (pp)": "Δ accuracy vs baseline (pp)",
            "accuracy_sd": "sd over seeds", "tokens_kept": "visual tokens kept", "tokens_kept_frac": "tokens kept",
            "flops_rel": "prefill FLOPs (rel.)", "latency_ms": "latency (ms)", "peak_mem_mb": "peak memory (MB)"}
    tab = d[[k for k in cols if k in d]].rename(columns=cols)
    out: list = [md("Multiple-choice VQA accuracy under each intervention on the visual tokens (length-normalized "
                    "log-likelihood of each choice), with its cost: visual tokens kept, theoretical prefill FLOPs "
                    "relative to the baseline, measured prefill latency (median) and peak memory. Accuracy CI: "
                    f"{c['ci_method'].iloc[0] if 'ci_method' in c else 'as recorded'}; random_matched rows are the "
                    "mean over seeds.")]
    if not len(base):
        out.append(callout("compression deltas: no baseline condition in the table"))
    out.append(table(tab, percent=[x for x in ("tokens kept", "prefill FLOPs (rel.)") if x in tab], precision=2))
    xs = [x for x in ("flops_rel", "latency_ms") if x in d and np.isfinite(d[x].astype(float)).any()]
    if xs:
        ops = list(dict.fromkeys(d["op"]))
        pal = dict(zip(ops, sns.color_palette("colorblind", len(ops))))
        fig, axes = _figure(5.2 * len(xs), 4.2, 1, len(xs), sharey=True)
        for ax, x in zip(axes.ravel(), xs):
            xv = d[x].astype(float) * (100 if x == "flops_rel" else 1)
            for op in ops:
                m = d["op"] == op
                yerr = None
                if {"ci_low", "ci_high"} <= set(d):
                    lo = (d.loc[m, "accuracy"] - d.loc[m, "ci_low"]).clip(lower=0) * 100
                    hi = (d.loc[m, "ci_high"] - d.loc[m, "accuracy"]).clip(lower=0) * 100
                    yerr = np.vstack([lo, hi])
                ax.errorbar(xv[m], 100 * d.loc[m, "accuracy"], yerr=yerr, fmt="o", ms=5, capsize=2,
                            color=pal[op], label=op, alpha=0.9)
            for xi, yi, name in zip(xv, 100 * d["accuracy"], d["condition"]):
                ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=6.5, alpha=0.8)
            if math.isfinite(base_acc):
                ax.axhline(100 * base_acc, color="black", ls="--", lw=0.8, label="baseline accuracy")
            if "chance" in d and np.isfinite(d["chance"].astype(float)).any():
                ax.axhline(100 * float(d["chance"].mean()), color="grey", ls=":", lw=0.8, label="chance")
            ax.set_xlabel("prefill FLOPs (% of baseline)" if x == "flops_rel" else "median prefill latency (ms)")
        axes[0, 0].set_ylabel("VQA accuracy (%)")
        axes.ravel()[-1].legend(fontsize=7, title="operation", title_fontsize=7, loc="best")
        out.append(md("**Accuracy vs cost** (error bars: accuracy CI):"))
        out.append(fig)
    else:
        out.append(callout("accuracy-vs-cost plot: the table has no FLOPs or latency columns"))
    if "item_type" in c:
        per = c[c["seed"].isna()] if "seed" in c else c
        per = per[per["item_type"].astype(str) != "all"]
        if not per.empty and per["item_type"].nunique() > 1:
            piv = per.pivot_table(index="condition", columns="item_type", values="accuracy", aggfunc="mean")
            piv = piv.reindex([x for x in d["condition"] if x in piv.index])
            fig, ax = _figure(1.3 * piv.shape[1] + 3.5, 0.32 * piv.shape[0] + 1.6)
            ax = ax[0, 0]
            sns.heatmap(100 * piv, annot=True, fmt=".0f", cmap="viridis", vmin=0, vmax=100, ax=ax,
                        cbar_kws={"label": "accuracy (%)"}, annot_kws={"fontsize": 7})
            ax.set_xlabel("VQA item type")
            ax.set_ylabel("condition")
            out.append(md("**Accuracy per item type** (%):"))
            out.append(fig)
    return out


# --------------------------------------------------------------------------- methods
def collect_methods_notes(inp: ReportInputs) -> pd.DataFrame:
    """Every ``methods_notes`` entry of the outputs (+ report-side notes), one row each."""
    rows = []

    def add(src: str, notes: Any) -> None:
        for n in notes or []:
            if isinstance(n, Mapping):
                rows.append({"tag": n.get("tag", ""), "procedure": n.get("procedure", ""), "source": src,
                             "text": n.get("text", "")})
            elif n:
                rows.append({"tag": "", "procedure": "", "source": src, "text": str(n)})

    add("categorize (summary.json)", (inp.cat_summary or {}).get("methods_notes"))
    add("anchors (anchors.json)", ((inp.anchors or {}).get("evidence") or {}).get("methods_notes"))
    add("layer lens (lens.zarr)", (inp.lens_info or {}).get("methods_notes"))
    add("probe (probe_summary.json)", (inp.probe_summary or {}).get("methods_notes"))
    add("align (align_summary.json)", (inp.align_summary or {}).get("methods_notes"))
    c = inp.compress
    if c is not None and "methods_notes" in getattr(c, "attrs", {}):
        add("compress", c.attrs["methods_notes"])
    if c is not None and not c.empty and "op" in c and (c["op"] == "random_matched").any():
        rows.append({"tag": "deviation", "procedure": "random_matched_empty_groups", "source": "report (methods.md §4)",
                     "text": "random_matched: when the deleted groups are empty for an image, nothing is deleted "
                             "(the reference deletes every visual token in that case)."})
    if inp.categories is not None:
        rows.append({"tag": "ours", "procedure": "category_map_overlay", "source": "report",
                     "text": "Category maps stretch the model's patch grid over the whole image; processors that "
                             "crop or pad shift the true positions."})
    df = pd.DataFrame(rows, columns=["tag", "procedure", "source", "text"])
    return df.drop_duplicates(["tag", "procedure", "text"])


def section_methods(inp: ReportInputs) -> list:
    notes = collect_methods_notes(inp)
    out: list = [md("Every procedure the analyses report about themselves (`methods_notes` of each output). "
                    "**reference** = the paper's procedure reproduced; **ours** = this project's own procedure "
                    "(no released reference); **deviation** = where the project departs from the reference or "
                    "from methods.md, and why.")]
    if notes.empty:
        out.append(callout("methods notes: no output carried any (all analyses missing?)"))
    else:
        n = notes.copy()
        n["tag"] = n["tag"].map(lambda t: f"[{t}]" if t else "")
        out.append(table(n))
    have = set(notes["procedure"]) if not notes.empty else set()
    anchor_src = (inp.anchors or {}).get("source") or (inp.cat_summary or {}).get("anchor_source")
    rows = []
    for proc, step, desc in EXPECTED_OURS:
        if proc in have:
            status = "used — documented above"
        elif proc == "anchor_discovery" and anchor_src == "configured":
            status = "not used: anchors configured"
        else:
            key = {"categorize": "categorize", "probe": "probe", "align": "align", "compress": "compress"}[step]
            status = f"not in this report: {inp.why(key)}" if key in inp.missing else "not used by this run"
        rows.append({"[ours] / deviation (methods.md)": desc, "status": status})
    out.append(md("**Checklist of the procedures methods.md marks [ours] or where the project deviates:**"))
    out.append(table(pd.DataFrame(rows)))
    other = []
    for src, s in (("categorize", inp.cat_summary), ("probe", inp.probe_summary), ("align", inp.align_summary),
                   ("lens", inp.lens_info)):
        for n in (s or {}).get("notes", []) or []:
            other.append({"step": src, "note": str(n)})
    if other:
        out.append(md("Notes the analyses recorded:"))
        out.append(table(pd.DataFrame(other)))
    return out


# =========================================================================== summary page
def load_summary_rows(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Read, per model × data set entry, what the summary page shows (each output optional)."""
    rows = []
    for e in entries:
        r: dict[str, Any] = {"model": e.get("model"), "dataset": e.get("dataset"), "href": e.get("report_href"),
                             "missing": {}}
        cd = _resolve(e.get("categorize_dir"))
        if cd is not None and (cd / "summary.json").exists():
            r["cat"] = _read_json(cd / "summary.json")
        else:
            r["missing"]["categorize"] = "no categorize output"
        ad = _resolve(e.get("align_dir"))
        if ad is not None:
            ad = ad if ad.is_dir() else ad.parent
            if (ad / "align_summary.json").exists():
                r["align"] = _read_json(ad / "align_summary.json")
        if "align" not in r:
            r["missing"]["align"] = "no alignment output"
        cp = _resolve(e.get("compress_parquet"))
        if cp is not None:
            try:
                r["compress"] = pd.read_parquet(cp)
            except Exception as exc:  # noqa: BLE001
                r["missing"]["compress"] = f"unreadable: {exc}"
        else:
            r["missing"]["compress"] = "not run"
        ref = e.get("is_reference_model")
        r["is_reference"] = (bool(ref) if ref is not None
                             else looks_like_reference_model(e.get("model"), e.get("model_id")))
        rows.append(r)
    return rows


def _link(r: Mapping[str, Any]) -> str:
    label = f"{r['model']} × {r['dataset']}"
    if r.get("href"):
        return f'<a href="{_html.escape(str(r["href"]), quote=True)}">{_html.escape(label)}</a>'
    return _html.escape(label) + " (no report)"


def _html_table(df: pd.DataFrame, raw: Iterable[str] = ()) -> Any:
    """HTML table where the ``raw`` columns hold trusted HTML (links) and the rest is escaped."""
    from IPython.display import HTML

    raw = set(raw)
    head = "".join(f"<th>{_html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            v = row[c]
            if c in raw:
                cells.append(f"<td>{v}</td>")
            else:
                txt = "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else str(v)
                cells.append(f"<td>{_html.escape(txt)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return HTML(f'<table class="dataframe"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def summary_reports(rows: Sequence[Mapping[str, Any]]) -> list:
    if not rows:
        return [callout("no model × data-set pairs were given to the summary")]
    t = []
    for r in rows:
        cat = r.get("cat") or {}
        t.append({"report": _link(r), "images": cat.get("n_images", ""), "visual tokens": cat.get("n_tokens", ""),
                  "missing outputs": "; ".join(f"{k}: {v}" for k, v in r["missing"].items()) or "—"})
    return [md(f"{len(rows)} model × data-set report(s); each link opens the full report."),
            _html_table(pd.DataFrame(t), raw=["report"])]


def summary_alive(rows: Sequence[Mapping[str, Any]]) -> list:
    import seaborn as sns

    have = [r for r in rows if r.get("cat")]
    if not have:
        return [callout("alive share: no categorize output for any pair")]
    long = []
    for r in have:
        sh = r["cat"].get("shares") or {}
        for rule, name in (("top1", "top-1 rule"), ("topk", "top-k rule")):
            long.append({"pair": f"{r['model']}\n{r['dataset']}", "rule": name,
                         "alive share (%)": 100 * float((sh.get(rule) or {}).get("alive", float("nan")))})
    long = pd.DataFrame(long)
    fig, ax = _figure(max(5.0, 1.6 * len(have) + 2), 3.8)
    ax = ax[0, 0]
    sns.barplot(long, x="pair", y="alive share (%)", hue="rule", ax=ax, palette=["#9ecae1", "#08519c"])
    for cont in ax.containers:
        ax.bar_label(cont, fmt="%.1f", fontsize=7, padding=2)
    if any(r["is_reference"] for r in have):
        ax.axhline(100 * REFERENCE_ALIVE_SHARE, color="black", ls="--", lw=1,
                   label="paper: ≈ 60 % alive (LLaVA-1.5-7B)")
    ax.set_ylim(0, 105)
    ax.set_xlabel("model × data set")
    ax.set_ylabel("alive visual tokens (%)")
    ax.legend(fontsize=8)
    t = pd.DataFrame([{"report": _link(r),
                       "alive (top-1)": _pct(((r["cat"].get("shares") or {}).get("top1") or {}).get("alive")),
                       "alive (top-k)": _pct(((r["cat"].get("shares") or {}).get("topk") or {}).get("alive")),
                       "dead (top-k)": _pct(((r["cat"].get("shares") or {}).get("topk") or {}).get("dead")),
                       "sinks (top-k)": _pct(sum(float(((r["cat"].get("shares") or {}).get("topk") or {}).get(g, 0))
                                                 for g in ("vit_sink", "llm_sink")))}
                      for r in have])
    return [fig, _html_table(t, raw=["report"])]


def summary_anchors(rows: Sequence[Mapping[str, Any]]) -> list:
    have = [r for r in rows if r.get("cat")]
    if not have:
        return [callout("anchors: no categorize output for any pair")]
    t = []
    for r in have:
        a = r["cat"].get("anchors") or {}
        s = r["cat"].get("anchor_strings") or {}
        row = {"report": _link(r), "source": r["cat"].get("anchor_source", "")}
        for g in GROUPS:
            ids = a.get(g) or []
            row[g] = ", ".join(f"{i} ({_tok(x)})" for i, x in zip(ids, s.get(g) or [""] * len(ids))) or "—"
        t.append(row)
    return [md("Anchor ids per group (string in brackets); `discovered` = found by this project's procedure [ours]."),
            _html_table(pd.DataFrame(t), raw=["report"])]


def summary_alignment(rows: Sequence[Mapping[str, Any]]) -> list:
    t = []
    for r in rows:
        best = (r.get("align") or {}).get("best_layer") or {}
        if not best:
            continue
        pick = best.get("h0/alive") or best.get("h0/all")
        which = "h0/alive" if "h0/alive" in best else "h0/all"
        t.append({"report": _link(r), "tokens": which.split("/")[1], "best layer (h[0] vs text l)":
                  pick.get("layer") if pick else "", "criterion": (pick or {}).get("criterion", ""),
                  "value": f"{pick['value']:.3f}" if pick and pick.get("value") is not None else "",
                  "at layer 0": (f"{pick['value_at_layer0']:.3f}"
                                 if pick and pick.get("value_at_layer0") is not None else "")})
    if not t:
        return [callout("best-aligned layer: no alignment output for any pair")]
    return [md("Best-aligned text layer of the alive visual tokens' h[0] [ours] (argmax of the nearest-label-word "
               "accuracy, else of the mean max cosine)."), _html_table(pd.DataFrame(t), raw=["report"])]


def summary_compression(rows: Sequence[Mapping[str, Any]]) -> list:
    import seaborn as sns

    recs = []
    for r in rows:
        c = r.get("compress")
        if c is None or c.empty or not {"condition", "op", "accuracy"} <= set(c):
            continue
        d = _condition_rows(c)
        base = d[d["op"] == "baseline"]
        if base.empty:
            continue
        b = float(base["accuracy"].iloc[0])
        for _, x in d.iterrows():
            if x["op"] == "baseline":
                continue
            recs.append({"pair": f"{r['model']} × {r['dataset']}", "condition": x["condition"],
                         "Δ accuracy (pp)": 100 * (float(x["accuracy"]) - b),
                         "FLOPs (% of baseline)": 100 * float(x["flops_rel"]) if "flops_rel" in x else float("nan")})
    if not recs:
        return [callout("compression deltas: no compression-benchmark table with a baseline for any pair")]
    df = pd.DataFrame(recs)
    piv = df.pivot_table(index="condition", columns="pair", values="Δ accuracy (pp)", aggfunc="mean")
    fig, ax = _figure(1.8 * piv.shape[1] + 4, 0.32 * piv.shape[0] + 1.8)
    ax = ax[0, 0]
    lim = max(1.0, float(np.nanmax(np.abs(piv.to_numpy()))))
    sns.heatmap(piv, annot=True, fmt=".1f", cmap="RdBu", center=0, vmin=-lim, vmax=lim, ax=ax,
                cbar_kws={"label": "accuracy − baseline (percentage points)"}, annot_kws={"fontsize": 7})
    ax.set_xlabel("model × data set")
    ax.set_ylabel("condition")
    flops = df.pivot_table(index="condition", columns="pair", values="FLOPs (% of baseline)", aggfunc="mean")
    return [md("VQA accuracy of each condition minus the baseline's, in percentage points (negative = worse)."), fig,
            md("Prefill FLOPs of each condition (% of the baseline):"),
            table(flops.round(1).reset_index(), precision=1)]


# =========================================================================== CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedlens.report", description="render EmbedLens reports")
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("report", "summary"):
        s = sub.add_parser(name)
        s.add_argument("--template", default=str(DEFAULT_TEMPLATE_DIR / f"{name}.ipynb"))
        s.add_argument("--html", required=True)
        s.add_argument("--ipynb", required=True)
        s.add_argument("--kernel", default=None, help="a Jupyter kernelspec name (default: this interpreter)")
        if name == "report":
            s.add_argument("--params", required=True, help="JSON object of notebook parameters (or @file.json)")
        else:
            s.add_argument("--entries", required=True, help="JSON list of model × data-set entries (or @file.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.what == "report":
            text = Path(args.params[1:]).read_text() if args.params.startswith("@") else args.params
            out = render_report(args.template, args.html, args.ipynb, json.loads(text), args.kernel)
        else:
            text = Path(args.entries[1:]).read_text() if args.entries.startswith("@") else args.entries
            out = render_summary(args.template, args.html, args.ipynb, json.loads(text), args.kernel)
    except ReportError as exc:
        print(f"embedlens report: error: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
