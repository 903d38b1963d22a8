"""The compression benchmark as the workflow runs it: from files to files.

Holds the one policy that joins two steps: the ``inject`` condition at the layer the
alignment found best for alive tokens (``best_layer["h0/alive"]`` of the align step),
when ``use_best_aligned_layer`` is on. ``embedlens compress`` only parses arguments and
calls :func:`compress_step`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from embedlens.analysis import read_align, read_step
from embedlens.analysis.outputs import step_reader

from .benchmark import run_compress

#: The align result whose best layer the inject condition uses (docs/methods.md §4).
BEST_LAYER_KEY = "h0/alive"


def best_aligned_layer(align_dir: str | Path | None, key: str = BEST_LAYER_KEY) -> int | None:
    """The best-aligned layer of ``key`` in the align step's summary; None without an
    align directory or when the alignment found none for ``key``.

    Raises
    ------
    embedlens.analysis.outputs.SummaryError
        ``align_dir`` given but holding no align summary.
    """
    if align_dir is None:
        return None
    best = (read_align(align_dir).summary["results"].get("best_layer") or {}).get(key) or {}
    return best.get("layer")


def compress_step(model_dir, dataset_dir, categories_dir, out_dir, settings: Mapping[str, Any] | None = None, *,
                  align_dir: str | Path | None = None, trust_remote_code: bool = False,
                  progress: bool = True) -> pd.DataFrame:
    """``embedlens compress``: :func:`run_compress` with the config section ``settings``
    (its keys are ``run_compress``'s keywords, plus ``conditions``: a preset name,
    ``default`` or ``paper``, or a list of condition dicts, and ``use_best_aligned_layer``).
    The images are preprocessed as for the states the categories came from (the categorize summary's ``preprocess``), so that the tokens
    pruned by category are the tokens that were categorized."""
    s = dict(settings or {})
    conditions = s.pop("conditions", "default")
    use_best = s.pop("use_best_aligned_layer", True)
    best = best_aligned_layer(align_dir) if use_best else None
    categories = Path(categories_dir)
    if categories.is_dir():
        cat = read_step(categories, "categorize")
        categories = cat.path("categories")
        s.setdefault("preprocess", cat.summary["results"].get("preprocess", "native"))
    return run_compress(model_dir, dataset_dir, categories, conditions, out_dir, best_aligned_layer=best,
                        trust_remote_code=trust_remote_code, progress=progress, **s)


read_compress = step_reader("compress")
