"""HTML reports: papermill executes a notebook template, nbconvert writes self-contained HTML.

The package, by concern:

* :mod:`.render` — execute a template on this interpreter's kernel and export HTML
  with every figure embedded, both files written atomically (:func:`render_report`,
  :func:`render_summary`; :class:`ReportError` names a failing cell).
* :mod:`.inputs` — :func:`load_inputs` reads every analysis output of one model × data
  set (each optional: a missing one is recorded with the reason); the only module that
  knows other stages' file names.
* :mod:`.display` — callouts, tables, figures and :func:`show`, which displays section
  items in a notebook.
* :mod:`.sections` — one module per report section; each ``section_*`` function returns
  displayable items (markdown, tables, matplotlib figures). The notebook templates only
  call these, so the report logic is ordinary, testable library code.
* :mod:`.summary` — the summary page over all model × data-set pairs.
* :mod:`.cli` — the command line (:func:`main`).

Every name the notebooks, the CLI and the tests use is importable from here
(``from embedlens.report import show``; ``report.section_header(inp)``).

Run from the command line (what a Snakemake rule calls)::

    python -m embedlens.report report --template notebooks/report.ipynb \\
        --html results/reports/M/D.html --ipynb results/reports/M/D.ipynb --params '{...}'
    python -m embedlens.report summary --template notebooks/summary.ipynb \\
        --html results/reports/index.html --ipynb results/reports/index.ipynb --entries '[...]'
"""

from __future__ import annotations

from .cli import main
from .display import (
    GROUPS,
    LABEL_COLOURS,
    LABELS,
    REFERENCE_ALIVE_SHARE,
    callout,
    figure_alt,
    figure_png,
    md,
    show,
    table,
)
from .inputs import ReportInputs, load_inputs, looks_like_reference_model, read_timings
from .render import (
    DEFAULT_TEMPLATE_DIR,
    INTERPRETER_KERNEL,
    ReportError,
    execute_notebook,
    export_html,
    html_exporter,
    render_report,
    render_summary,
)
from .sections import (
    EXPECTED_OURS,
    REPORT_SECTIONS,
    SECTIONS,
    collect_methods_notes,
    section_alignment,
    section_anchors,
    section_benchmarks,
    section_category_maps,
    section_category_shares,
    section_compression,
    section_header,
    section_methods,
    section_nearest_words,
    section_norms,
    section_probe,
    section_provenance,
)
from .summary import (
    SUMMARY_SECTIONS,
    load_summary_rows,
    summary_alignment,
    summary_alive,
    summary_anchors,
    summary_benchmarks,
    summary_compression,
    summary_reports,
)

__all__ = [
    "DEFAULT_TEMPLATE_DIR", "EXPECTED_OURS", "GROUPS", "INTERPRETER_KERNEL", "LABELS", "LABEL_COLOURS",
    "REFERENCE_ALIVE_SHARE", "REPORT_SECTIONS", "SECTIONS", "SUMMARY_SECTIONS", "ReportError",
    "ReportInputs", "callout", "collect_methods_notes", "execute_notebook", "export_html", "figure_alt",
    "figure_png", "html_exporter", "load_inputs", "load_summary_rows", "looks_like_reference_model", "main", "md",
    "read_timings", "render_report", "render_summary", "section_alignment", "section_anchors",
    "section_benchmarks", "section_category_maps", "section_category_shares", "section_compression",
    "section_header", "section_methods",
    "section_nearest_words", "section_norms", "section_probe", "section_provenance", "show", "summary_alignment",
    "summary_alive", "summary_anchors", "summary_benchmarks", "summary_compression", "summary_reports", "table",
]
