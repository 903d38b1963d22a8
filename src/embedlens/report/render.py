"""Rendering: papermill executes a notebook template, nbconvert writes self-contained HTML.

:func:`render_report` / :func:`render_summary` execute a template (``notebooks/report.ipynb``
/ ``notebooks/summary.ipynb``) with papermill on an ipykernel that runs *this* interpreter
(no kernelspec file, no user Jupyter config is read or written), keep the executed
notebook, and export HTML with every figure embedded as a ``data:`` URI and no script or
stylesheet fetched from the network (nbconvert's ``lab`` template minus its require.js /
MathJax / mermaid / widget CDN tags). Both files are written atomically (temporary name,
then rename). A failing cell raises :class:`ReportError` naming the cell, its source and
the error.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The repository's notebook templates (this file is src/embedlens/report/render.py).
DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[3] / "notebooks"
INTERPRETER_KERNEL = "embedlens-python"


class ReportError(RuntimeError):
    """Executing or exporting a report failed; the message names the failing cell."""


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
    ``lens_dir``, ``probe_dir``, ``text_states_dir``, ``align_dir``, ``compress_dir``, ...). Returns the
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
    ``compress_dir``, ``model_id``, ``is_reference_model``. Links are written
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
