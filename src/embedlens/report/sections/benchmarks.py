"""Report section "Standard benchmarks": the paper's table shape — rows = conditions,
columns = benchmarks (each task's official headline metric), every cell the score and its
change vs the baseline with a paired 95 % interval — plus visual tokens kept and FLOPs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..display import callout, md, table
from ..inputs import ReportInputs

_NEEDED = ("condition", "task", "metric", "status", "score", "delta", "ci_low", "ci_high")


def _cell(r: Mapping[str, Any]) -> str:
    if r["status"] != "ok":
        return str(r["status"])
    score = float(r["score"])
    if r.get("op") == "baseline" or not np.isfinite(r["delta"]):
        return f"{score:.3g}"
    ci = (f" [{r['ci_low']:+.3g}, {r['ci_high']:+.3g}]" if np.isfinite(r["ci_low"]) and np.isfinite(r["ci_high"])
          else "")
    return f"{score:.3g} (Δ {r['delta']:+.3g}{ci})"


def paper_table(t: pd.DataFrame) -> pd.DataFrame:
    """The benchmarks table in the paper's shape: one row per condition (config order), one
    column per task headed ``task (metric)``, cells ``score (Δ delta [lo, hi])`` or
    ``nothing removed``; then visual tokens kept (share) and prefill FLOPs (% of baseline),
    averaged over the tasks.

    Raises
    ------
    KeyError : the table lacks one of the columns the benchmark step writes.
    """
    missing = [c for c in _NEEDED if c not in t]
    if missing:
        raise KeyError(f"benchmarks table lacks columns {missing}")
    t = t.copy()
    t["cell"] = [_cell(r) for r in t.to_dict("records")]
    t["column"] = t["task"].astype(str) + " (" + t["metric"].astype(str) + ")"
    order = list(dict.fromkeys(t["condition"]))
    cols = list(dict.fromkeys(t["column"]))
    wide = t.pivot(index="condition", columns="column", values="cell").reindex(index=order, columns=cols)
    ok = t[t["status"] == "ok"]
    cost = ok.groupby("condition")[[c for c in ("tokens_kept_frac", "flops_rel") if c in ok]].mean()
    wide = wide.join(cost.rename(columns={"tokens_kept_frac": "visual tokens kept", "flops_rel": "prefill FLOPs"}))
    return wide.reset_index()


def _headline(t: pd.DataFrame) -> str:
    n_skip = sorted(set(t.loc[t["status"] != "ok", "condition"]))
    s = ("Each cell: the task's official headline score under the condition, and its change vs the baseline "
         "(Δ) with a 95 % paired bootstrap interval over images (the same images for both; random_matched "
         "averaged over seeds inside each draw). Greedy generation through lmms-eval's task prompts and metrics.")
    if n_skip:
        s += (f" {len(n_skip)} condition(s) had no target token on any image and were not run "
              f"(\"nothing removed\"): {', '.join(n_skip)}.")
    return s


def section_benchmarks(inp: ReportInputs) -> list:
    """Section "Standard benchmarks" of a model's report (the table is per model: the same
    in each of its data sets' reports)."""
    t = getattr(inp, "benchmarks", None)
    if t is None or t.empty:
        return [callout(f"standard benchmarks: {inp.why('benchmarks')}")]
    try:
        wide = paper_table(t)
    except KeyError as e:
        return [callout(f"standard benchmarks: {e}")]
    out: list = [md(_headline(t)),
                 table(wide, percent=[c for c in ("visual tokens kept", "prefill FLOPs") if c in wide], precision=2)]
    cost_cols = {"condition": "condition", "task": "task", "target_tokens": "target tokens / image",
                 "latency_ms": "latency / item (ms, median)", "latency_ms_iqr": "latency IQR (ms)",
                 "new_tokens": "tokens generated", "peak_mem_mb": "peak memory (MB)", "p_value": "p (paired bootstrap)"}
    ok = t[t["status"] == "ok"]
    if len(ok):
        out += [md("Cost and test detail per condition and task:"),
                table(ok[[c for c in cost_cols if c in ok]].rename(columns=cost_cols), precision=3)]
    return out


def summary_benchmarks(rows: Sequence[Mapping[str, Any]]) -> list:
    """Index section "Standard benchmarks": the paper-shaped table of every model (once per
    model, however many data sets it has)."""
    out, seen = [], set()
    for r in rows:
        t = r.get("benchmarks")
        if t is None or t.empty or r["model"] in seen:
            continue
        seen.add(r["model"])
        try:
            out += [md(f"**{r['model']}**"), table(paper_table(t), precision=2)]
        except KeyError as e:
            out.append(callout(f"standard benchmarks of {r['model']}: {e}"))
    return out or [callout("standard benchmarks: no benchmark table for any model")]
