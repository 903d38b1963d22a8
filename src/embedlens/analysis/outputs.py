"""Writing an analysis' outputs: atomic Parquet and JSON, and methods-note entries.

Every file appears complete or not at all (temporary name, then rename), so an
interrupted job never leaves a table that looks finished.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
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


# --------------------------------------------------------------------------- summaries
#: The top-level keys of every step's ``summary.json``, in this order. Step-specific
#: figures live under ``results``; a reader never needs to know which step wrote a file
#: to find its status, settings, timing, notes or files.
SUMMARY_KEYS = ("step", "status", "reason", "model", "dataset", "settings", "seconds",
                "notes", "methods_notes", "files", "results")


def step_summary(step: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The one summary shape: the common keys of :data:`SUMMARY_KEYS` taken from ``fields``
    (``status`` "ok", ``reason`` None, empty ``settings``/``notes``/``methods_notes``/
    ``files`` when absent) and everything else under ``results``."""
    rest = dict(fields)
    out: dict[str, Any] = {"step": step}
    fallback: dict[str, Any] = {"status": "ok", "reason": None, "model": None, "dataset": None,
                                "settings": {}, "seconds": None, "notes": [],
                                "methods_notes": [], "files": {}}
    for key in SUMMARY_KEYS[1:-1]:
        out[key] = rest.pop(key, fallback[key])
    out["results"] = rest
    return out


class SummaryError(ValueError):
    """A ``summary.json`` that is missing or not in the one summary shape."""


def read_summary(path: str | os.PathLike, step: str | None = None) -> dict[str, Any]:
    """Read a step's ``summary.json`` (``path``: the file or the step's directory).

    Raises
    ------
    SummaryError
        the file is missing, is not JSON, lacks a key of :data:`SUMMARY_KEYS`, or was
        written by another step than ``step``; the message names the file and what to do.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise SummaryError(f"{p}: no summary: this is not a finished {step or 'step'} output "
                           "directory (pass the step's directory; snakemake <that directory> "
                           "writes it)") from None
    except json.JSONDecodeError as exc:
        raise SummaryError(f"{p}: not valid JSON ({exc}); delete it and rerun its step") from None
    missing = [k for k in SUMMARY_KEYS if k not in data]
    if missing:
        raise SummaryError(f"{p}: not a step summary (missing {missing}); it predates the one "
                           "summary shape: delete it and rerun its step")
    if step is not None and data["step"] != step:
        raise SummaryError(f"{p}: written by step {data['step']!r}, expected {step!r}")
    return data


@dataclass
class StepOutputs:
    """What one step wrote into its directory: the summary and its files by name.

    ``summary`` has :data:`SUMMARY_KEYS`; ``files`` maps a table's name to its file name
    (the summary's ``files``), so a reader never spells another step's file names.
    """

    directory: Path
    summary: dict[str, Any]

    @property
    def files(self) -> dict[str, str]:
        return dict(self.summary.get("files") or {})

    def path(self, name: str) -> Path:
        """The path of output ``name`` (raises KeyError naming the step and its files)."""
        if name not in self.files:
            raise KeyError(f"{self.directory}: step {self.summary['step']!r} wrote no {name!r} "
                           f"(its files: {sorted(self.files)})")
        return self.directory / self.files[name]

    def table(self, name: str) -> pd.DataFrame:
        """The Parquet table ``name``."""
        return pd.read_parquet(self.path(name))


def read_step(directory: str | os.PathLike, step: str) -> StepOutputs:
    """The outputs of ``step`` in ``directory`` (its ``summary.json`` checked).

    Raises
    ------
    SummaryError
        see :func:`read_summary`.
    """
    d = Path(directory)
    return StepOutputs(d, read_summary(d, step))


def step_reader(step: str):
    """The reader of ``step``'s outputs, ``read_<step>(out_dir) -> StepOutputs`` (what each
    step module exports; one definition, so every step is read the same way)."""

    def read(out_dir: str | os.PathLike) -> StepOutputs:
        return read_step(out_dir, step)

    read.__name__ = read.__qualname__ = f"read_{step}"
    read.__doc__ = (f"The {step} step's outputs in ``out_dir``: its summary and files by name.\n\n"
                    "Raises\n------\nSummaryError\n    no ``summary.json`` there, or not the "
                    f"{step} step's (names the file and what to do).")
    return read
