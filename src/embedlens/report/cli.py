"""Command line of the renderer (what the Snakemake rules call, via ``embedlens report``
/ ``embedlens summary`` or ``python -m embedlens.report``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .render import DEFAULT_TEMPLATE_DIR, ReportError, render_report, render_summary


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (``report ...`` or ``summary ...``), render, return the exit status
    (0 written; 1 a cell or the export failed, the error printed to stderr)."""
    p = argparse.ArgumentParser(prog="embedlens", description="render EmbedLens reports (also: python -m embedlens.report)")
    sub = p.add_subparsers(dest="what", required=True)
    helps = {"report": "render one model x data set report (papermill, then HTML)",
             "summary": "render the summary of all models and data sets (papermill, then HTML)"}
    for name in ("report", "summary"):
        s = sub.add_parser(name, help=helps[name], description=helps[name])
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
