"""The sections of a model × data-set report, one module each, listed here in report
order. Each ``section_*(inp: ReportInputs, ...)`` returns a list of displayable items
(see :mod:`embedlens.report.display`) and never raises for a missing input: it returns
a callout saying why instead."""

from __future__ import annotations

from .align import section_alignment
from .anchors import section_anchors
from .benchmarks import section_benchmarks, summary_benchmarks
from .categories import section_category_maps, section_category_shares
from .compress import section_compression
from .lens import section_nearest_words
from .methods import EXPECTED_OURS, collect_methods_notes, section_methods
from .norms import section_norms
from .probe import section_probe
from .provenance import REPORT_SECTIONS, section_header, section_provenance

#: The section functions in report order: the header, then one per heading of
#: ``REPORT_SECTIONS``, in the order ``notebooks/report.ipynb`` calls them.
SECTIONS = (
    section_header,
    section_provenance,
    section_category_shares,
    section_category_maps,
    section_nearest_words,
    section_norms,
    section_anchors,
    section_probe,
    section_alignment,
    section_compression,
    section_benchmarks,
    section_methods,
)

__all__ = [
    "EXPECTED_OURS", "REPORT_SECTIONS", "SECTIONS", "collect_methods_notes", "section_alignment", "section_anchors",
    "section_category_maps", "section_category_shares", "section_compression", "section_header", "section_methods",
    "section_nearest_words", "section_norms", "section_probe", "section_provenance", "section_benchmarks",
    "summary_benchmarks",
]
