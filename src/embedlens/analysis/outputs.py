"""Writing an analysis' outputs: atomic Parquet and JSON, and methods-note entries.

Every file appears complete or not at all (temporary name, then rename), so an
interrupted job never leaves a table that looks finished.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _atomic(path: Path, write) -> None:
    from embedlens.atomic import atomic_file

    with atomic_file(path) as tmp:
        write(str(tmp))


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a DataFrame to Parquet atomically (temporary name, then rename)."""
    p = Path(path)
    _atomic(p, lambda tmp: df.to_parquet(tmp, index=False, engine="pyarrow"))
    return p


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _finite(o):
    """Replace non-finite floats by None (JSON has no NaN)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically; NaN/inf become null."""
    p = Path(path)
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=2)

    def w(tmp):
        Path(tmp).write_text(text + "\n")

    _atomic(p, w)
    return p


def note(tag: str, procedure: str, text: str) -> dict[str, str]:
    """One ``methods_notes`` entry: tag ∈ {"reference", "ours", "deviation"}."""
    return {"tag": tag, "procedure": procedure, "text": text}
