"""Compression benchmark (docs/methods.md §4): interventions on visual tokens at inference,
multiple-choice VQA accuracy under them, and their cost.

* :mod:`.interventions` — hook-based ``prune``/``keep``/``random_matched``/``skip``/
  ``inject``/``exit``/``knockout``/``prune_inject`` on any supported transformers VLM, and
  answer scoring (built from
  :mod:`.spec`, :mod:`.sequences`, :mod:`.plan` and :mod:`.hooks`; model access through
  :mod:`embedlens.models`);
* :mod:`.generate` — greedy generation under an intervention, KV-cached (or re-prefilled,
  the reference);
* :mod:`.cost` — theoretical prefill FLOPs, measured latency and peak memory;
* :mod:`.benchmark` — :func:`run_compress` over condition dicts from ``config.yaml``.
"""

from .benchmark import default_conditions, parse_conditions, run_compress, wilson_interval
from .plan import TokenGroups
from .spec import (
    Intervention,
    baseline,
    exit,  # noqa: A004 - the name docs/methods.md §4 uses
    exit_at,
    inject,
    keep,
    knockout,
    prune,
    prune_inject,
    random_matched,
    skip,
)

__all__ = [
    "Intervention",
    "TokenGroups",
    "baseline",
    "default_conditions",
    "exit",
    "exit_at",
    "inject",
    "keep",
    "knockout",
    "parse_conditions",
    "prune",
    "prune_inject",
    "random_matched",
    "run_compress",
    "skip",
    "wilson_interval",
]
