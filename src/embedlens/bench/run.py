"""The standard-benchmark step (docs/methods.md §4): lmms-eval tasks with their official
metrics, on a local model, under every condition of the compression benchmark, in the
paper's table shape (rows = conditions, columns = benchmarks, Δ vs baseline with a paired
interval, FLOPs).

One model load; per condition one lmms-eval evaluation of every task through the project's
model class (:class:`embedlens.bench.lmms_model.EmbedLensLMM`) and the intervention backend
(:class:`embedlens.bench.intervention_backend.InterventionBackend`), which captures each
prompt and categorizes its visual tokens once and reuses them for every condition.

A condition whose target tokens are empty on every image (``prune_dead`` on a model without
dead tokens) changes nothing: it is not run, and its rows say ``nothing removed`` instead of
a score, so no Δ 0 reads as a finding.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embedlens.compress.conditions import Variant, default_conditions, parse_conditions

from .stats import DEFAULT_DRAWS, Aggregate, paired_cluster_bootstrap

#: Files of the step's directory.
OUTPUT_FILES = {"table": "benchmarks.parquet", "scores": "scores.parquet", "items": "items.parquet",
                "summary": "summary.json"}
#: status of a condition row
OK, NOTHING_REMOVED = "ok", "nothing removed"

log = logging.getLogger("embedlens.bench")


def _order(variants: Sequence[Variant]) -> list[Variant]:
    """Baseline first (it warms the caches and every Δ needs it), then config order."""
    return sorted(variants, key=lambda v: v.op != "baseline")


def _cost_columns(info: pd.DataFrame) -> dict[str, float]:
    if info.empty:
        return {k: float("nan") for k in ("target_tokens", "visual_tokens", "tokens_kept", "tokens_kept_frac",
                                          "flops_rel", "latency_ms", "latency_ms_iqr", "new_tokens")}
    per_item_ms = 1000 * info["batch_seconds"] / info["batch_size"]
    q1, q3 = np.quantile(per_item_ms, [0.25, 0.75])
    return {
        "target_tokens": float(info["target_tokens"].mean()),
        "visual_tokens": float(info["visual_tokens"].mean()),
        "tokens_kept": float(info["tokens_kept"].mean()),
        "tokens_kept_frac": float(info["tokens_kept"].sum() / max(info["visual_tokens"].sum(), 1)),
        "flops_rel": float(info["flops"].sum() / info["flops_baseline"].sum()),
        "latency_ms": float(np.median(per_item_ms)),
        "latency_ms_iqr": float(q3 - q1),
        "new_tokens": float(info["new_tokens"].mean()),
    }


def run_benchmarks(
    model_dir,
    vocab,
    tasks: Sequence[Any],
    out_dir,
    *,
    anchors_dir=None,
    anchors: Mapping[str, Sequence[int]] | None = None,
    conditions: str | Sequence[dict] = "default",
    seeds: Sequence[int] = (0, 1, 2),
    best_aligned_layer: int | None = None,
    n_bootstrap: int = DEFAULT_DRAWS,
    bootstrap_seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    preprocess: str = "native",
    top_k: int = 3,
    exclude_special: bool = True,
    exclude_ids: Sequence[int] = (),
    include_ids: Sequence[int] = (),
    model: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every task of `tasks` (:class:`embedlens.bench.tasks.TaskSpec`) under every
    condition and write the step directory `out_dir`:

    * ``benchmarks.parquet``: one row per (condition, task): the headline metric's official
      score (random_matched: mean over seeds, ``score_sd`` across them), ``delta`` vs the
      baseline with a 95 % paired cluster-bootstrap interval and p-value
      (:func:`.stats.paired_cluster_bootstrap`), ``status`` (``ok`` / ``nothing removed``)
      and the cost columns (target tokens, visual tokens kept, prefill FLOPs relative to the
      baseline, per-item latency median and IQR, peak CUDA memory);
    * ``scores.parquet``: every official metric of every task, per condition and seed;
    * ``items.parquet``: per document and condition/seed: prediction, target, per-doc
      metric values (JSON), the image cluster, and the backend's facts;
    * ``summary.json`` (:data:`embedlens.analysis.outputs.SUMMARY_KEYS`).

    `conditions`: ``"default"``/``"paper"`` (:func:`embedlens.compress.conditions.default_conditions`
    presets) or a list of condition dicts; a baseline is added when missing. `anchors_dir`:
    the model's anchors step (its ids; `anchors` from config win per group). `top_k`,
    `exclude_*`: the categorize settings. Returns the table.

    Raises
    ------
    ValueError : no task, a malformed condition, bad anchors, a model/vocab mismatch.
    """
    from embedlens.analysis.outputs import step_summary, write_json, write_parquet

    from . import harness
    from .intervention_backend import InterventionBackend, load_anchors
    from .lmms_model import EmbedLensLMM

    t0 = time.perf_counter()
    tasks = list(tasks)
    if not tasks:
        raise ValueError("benchmarks: no task configured (config.yaml benchmarks.tasks)")
    used_anchors = load_anchors(anchors_dir, anchors)
    backend = InterventionBackend(model_dir, vocab, used_anchors, top_k=top_k, exclude_special=exclude_special,
                                  exclude_ids=exclude_ids, include_ids=include_ids, device=device, dtype=dtype,
                                  batch_size=batch_size, preprocess=preprocess,
                                  trust_remote_code=trust_remote_code)
    N = backend.num_layers
    if isinstance(conditions, str):
        conds = default_conditions(N, best_aligned_layer, preset=conditions)
    else:
        conds = list(conditions)
    if not any(c.get("op") == "baseline" for c in conds):
        conds = [{"name": "baseline", "op": "baseline"}, *conds]
    variants = _order(parse_conditions(conds, N, seeds))
    lmm = EmbedLensLMM(backend=backend, batch_size=batch_size)

    runs: dict[tuple[str, int | None], dict] = {}
    skipped: set[str] = set()
    item_frames, score_rows = [], []
    import torch

    cuda = str(backend.device).startswith("cuda")
    from tqdm.auto import tqdm

    for v in tqdm(variants, desc="benchmarks", unit="condition", disable=not progress):
        if v.op != "baseline" and backend.cached_targets_empty(v):
            skipped.add(v.name)
            log.info("%s: no target token on any image: not run (nothing removed)", v.name)
            continue
        backend.set_variant(v)
        if cuda:
            torch.cuda.reset_peak_memory_stats(backend.device)
        results = harness.evaluate(lmm, tasks)
        peak = torch.cuda.max_memory_allocated(backend.device) / 2**20 if cuda else float("nan")
        runs[v.key] = {"results": results, "peak_mem_mb": peak}
        for spec in tasks:
            res = results[spec.name]
            for metric, value in res.scores.items():
                score_rows.append({"condition": v.name, "seed": v.seed, "task": spec.name, "metric": metric,
                                   "value": _float(value)})
            items = res.items.copy()
            info = pd.DataFrame(list(items["info"]), index=items.index)
            metric_cols = [c for c in items.columns if c not in ("doc_id", "cluster", "prediction", "target", "info")]
            items["metrics"] = [json.dumps({c: row[c] for c in metric_cols}, default=str)
                                for _, row in items.iterrows()]
            items = items.drop(columns=[*metric_cols, "info"])
            items["target"] = items["target"].map(lambda t: json.dumps(t, default=str))
            item_frames.append(pd.concat([items.assign(condition=v.name, op=v.op, seed=v.seed, task=spec.name),
                                          info.drop(columns=[c for c in ("condition", "seed") if c in info])],
                                         axis=1))

    table = _table(variants, tasks, runs, skipped, item_frames, n_bootstrap, bootstrap_seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items_all = pd.concat(item_frames, ignore_index=True) if item_frames else pd.DataFrame()
    if "seed" in items_all:
        items_all["seed"] = items_all["seed"].astype("Int64")
    scores = pd.DataFrame(score_rows)
    if "seed" in scores:
        scores["seed"] = scores["seed"].astype("Int64")
    write_parquet(table, out / OUTPUT_FILES["table"])
    write_parquet(scores, out / OUTPUT_FILES["scores"])
    write_parquet(items_all, out / OUTPUT_FILES["items"])
    import transformers

    summary = step_summary("benchmarks", {
        "model": model or str(model_dir), "dataset": None,
        "settings": {"conditions": conditions if isinstance(conditions, str) else "list", "seeds": list(seeds),
                     "n_bootstrap": n_bootstrap, "bootstrap_seed": bootstrap_seed, "batch_size": batch_size,
                     "device": str(backend.device), "dtype": dtype, "preprocess": preprocess, "top_k": top_k,
                     "tasks": [_spec_dict(spec) for spec in tasks]},
        "seconds": time.perf_counter() - t0,
        "notes": ([f"{len(skipped)} condition(s) not run: no target token on any image ({', '.join(sorted(skipped))})"]
                  if skipped else []),
        "methods_notes": methods_notes(),
        "files": dict(OUTPUT_FILES),
        "anchors": used_anchors, "num_layers": N, "best_aligned_layer": best_aligned_layer,
        "conditions": [v.name for v in variants], "nothing_removed": sorted(skipped),
        "headline": {spec.name: spec.headline for spec in tasks},
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
    })
    write_json(summary, out / OUTPUT_FILES["summary"])
    return table


def _spec_dict(spec) -> dict:
    import dataclasses

    return dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(vars(spec))


def _float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _table(variants, tasks, runs, skipped, item_frames, n_bootstrap, bootstrap_seed) -> pd.DataFrame:
    by_name: dict[str, list[Variant]] = {}
    for v in variants:
        by_name.setdefault(v.name, []).append(v)
    base_key = next(v.key for v in variants if v.op == "baseline")
    items = pd.concat(item_frames, ignore_index=True) if item_frames else pd.DataFrame()
    rows = []
    for name, vs in by_name.items():
        v0 = vs[0]
        common = {"condition": name, "op": v0.op, "groups": ",".join(v0.intervention.groups),
                  "select": getattr(v0.intervention, "select", "membership"), "n_seeds": len(vs),
                  "params": json.dumps(v0.condition, sort_keys=True, default=str)}
        for spec in tasks:
            metric = spec.headline
            row = {**common, "task": spec.name, "metric": metric}
            if name in skipped:
                rows.append({**row, "status": NOTHING_REMOVED, "score": float("nan"), "score_sd": float("nan"),
                             "delta": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                             "p_value": float("nan"), "target_tokens": 0.0})
                continue
            res = [runs[v.key]["results"][spec.name] for v in vs]
            per_seed = [_float(r.scores.get(metric)) for r in res]
            base = runs[base_key]["results"][spec.name]
            agg = [Aggregate(lambda rows, r=r, m=metric: r.aggregate(m, rows), r.items["cluster"].tolist())
                   for r in res]
            if v0.op == "baseline":
                st = {"delta": 0.0, "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"),
                      "n_clusters": len(agg[0].rows)}
            else:
                base_agg = Aggregate(lambda rows, b=base, m=metric: b.aggregate(m, rows), base.items["cluster"].tolist())
                st = paired_cluster_bootstrap(base_agg, agg, n_draws=n_bootstrap, seed=bootstrap_seed)
            sub = items[(items["condition"] == name) & (items["task"] == spec.name)] if len(items) else items
            rows.append({**row, "status": OK, "score": float(np.mean(per_seed)),
                         "score_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan"),
                         **st, "n_docs": len(res[0].items), **_cost_columns(sub),
                         "peak_mem_mb": float(np.mean([runs[v.key]["peak_mem_mb"] for v in vs]))})
    table = pd.DataFrame(rows)
    table["ci_method"] = "paired cluster bootstrap 95% (percentile), clusters = images"
    return table


def methods_notes() -> list[dict]:
    """The procedures of this step that are the project's own ([ours])."""
    from embedlens.analysis.outputs import note

    return [
        note("reference", "greedy_generation",
             "Answers are generated greedily by each task's lmms-eval prompt and official metric; the intervention "
             "acts on the prefill (pruned positions keep their original position ids), decoding continues from "
             "the unpruned length with a KV cache (equal to re-running the intervened prefill per token, tested)."),
        note("ours", "groups_on_the_fly",
             "Visual-token groups of benchmark images are computed at run time with the categorize rule "
             "(top-k cosine neighbours of h[0] among the same vocabulary rows, the model's anchor ids); "
             "selection by anchor membership unless a condition says select: label."),
        note("ours", "paired_cluster_bootstrap",
             "Δ vs baseline: paired bootstrap over images (clusters), recomputing each task's official "
             "aggregation on the drawn rows; random_matched seeds averaged inside each draw; two-sided "
             "bootstrap p-value."),
        note("ours", "nothing_removed",
             "A condition with no target token on any image is not run and reported as 'nothing removed'."),
        note("ours", "latency",
             "Latency per item: batch wall time (prefill + greedy decode, vision tower excluded) / batch size; "
             "median and IQR over the items of a condition; peak memory: CUDA max_memory_allocated per condition "
             "(NaN on CPU)."),
    ]
