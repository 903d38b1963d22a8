"""Evaluate an :class:`~embedlens.bench.lmms_model.EmbedLensLMM` on benchmark tasks through
lmms-eval's own ``simple_evaluate``: official prompts, ``process_results`` and
aggregations, so a score here is the number lmms-eval reports.

Besides the official scores each :class:`TaskResult` keeps the per-document values the
task's ``process_results`` returned (``items``), so statistics can resample documents, or
whole images (``cluster``), and re-aggregate them with the task's *own* aggregation
function (:meth:`TaskResult.aggregate`): a bootstrap of MME's perception score is a
bootstrap of the official formula, not of a re-implementation.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from embedlens.bench.lmms_model import EmbedLensLMM
from embedlens.bench.tasks import (
    TaskSpec,
    prepare,
    reset_accumulators,
    set_offline,
    task_manager,
)


@dataclass
class TaskResult:
    """One task's evaluation.

    Attributes:
        spec: the evaluated spec (``limit`` as applied: MME's rounded to whole pairs).
        scores: official aggregated metrics, metric name -> value (numeric metrics only;
            e.g. ``pope_accuracy``, ``pope_f1_score``, ``mme_perception_score`` (0-2000 scale
            summed over categories, 0-200 each), ``exact_match`` (TextVQA's VQA accuracy),
            ``refcoco_ACC@0.5``, ``average`` (MMStar)).
        items: one row per document: ``doc_id``, ``cluster`` (the image the document
            belongs to), ``prediction`` (the answer text scored), ``target``, ``info`` (the
            backend's facts about that answer) and one column per metric holding the value
            ``process_results`` returned for the document (``None`` where it returned none,
            e.g. ``mme_cognition_score`` on a perception question).
        headline: the spec's headline metric.
    """

    spec: TaskSpec
    scores: dict[str, float]
    items: pd.DataFrame
    headline: str | None
    aggregations: dict[str, Callable] = field(repr=False, default_factory=dict)
    group_key: str | None = None
    output_dir: str | None = None
    _tmp: Any = field(repr=False, default=None)

    def aggregate(self, metric: str, rows: Sequence[int]) -> float:
        """The task's official aggregation of ``metric`` over the given rows of ``items``.

        Rows may repeat (bootstrap resamples). Where the task scores groups of documents
        (MME: the two questions of an image), the j-th repeat of a row gets its group key
        suffixed ``#j``, so a resampled image counts as a separate pair instead of one
        image with four answers (which the official code rejects); a cluster bootstrap
        draws whole images, so both questions of an image repeat together.

        Returns:
            The aggregated value; NaN when none of the rows carries the metric.

        Raises:
            KeyError: ``metric`` is not one of the task's aggregated metrics.
        """
        if metric not in self.aggregations:
            raise KeyError(f"{self.spec.name}: no aggregated metric {metric!r}; "
                           f"known: {sorted(self.aggregations)}")
        fn = self.aggregations[metric]
        column = self.items[metric]
        seen: Counter = Counter()
        values = []
        for r in rows:
            v = column.iloc[int(r)]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            j = seen[int(r)]
            seen[int(r)] += 1
            if j and self.group_key and isinstance(v, dict) and self.group_key in v:
                v = {**v, self.group_key: f"{v[self.group_key]}#{j}"}
            values.append(dict(v) if isinstance(v, dict) else v)
        if not values:
            return float("nan")
        _reset(fn)
        # Official aggregations print or log their result (RefCOCO prints, MME logs each
        # category): silent here, because a bootstrap calls them thousands of times.
        with _quiet():
            if "args" in inspect.signature(fn).parameters:
                return fn(values, args=_cli_args(self.output_dir))
            return fn(values)


@contextlib.contextmanager
def _quiet():
    """stdout and lmms-eval's loguru logger silenced for the block."""
    from loguru import logger

    logger.disable("lmms_eval")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.enable("lmms_eval")


def _reset(fn: Callable) -> None:
    reset_accumulators(SimpleNamespace(aggregation=lambda: {"_": fn}))


def _cli_args(output_dir: str | None) -> SimpleNamespace:
    # What lmms-eval's evaluator and task code read from its CLI namespace: submission and
    # result files (TextVQA, OCRBench) go under output_path, not the working directory.
    return SimpleNamespace(output_path=output_dir, process_with_media=True, reasoning_tags=None,
                           agentic_trace_mode="basic")


def _cluster(doc: dict, spec: TaskSpec, doc_id: int) -> str:
    kind = spec.kind
    for key in (kind.cluster_keys if kind else ()):
        if doc.get(key) is not None:
            return str(doc[key])
    return f"doc-{doc_id}"


def _scores(task_results: dict) -> dict[str, float]:
    out = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr" in key or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key.split(",", 1)[0]] = float(value)
    return out


def evaluate(model: EmbedLensLMM, tasks: Sequence[TaskSpec], *, limit: int | None = None,
             output_dir: str | Path | None = None) -> dict[str, TaskResult]:
    """Evaluate ``model`` on each task with lmms-eval's ``simple_evaluate``.

    One ``simple_evaluate`` call per task, each on a freshly built task object (lmms-eval
    mutates the tasks it evaluates; per-task limits). Greedy generation, no bootstrap
    inside lmms-eval (``bootstrap_iters=0``: statistics resample ``items`` instead), one
    post-processing thread (deterministic). The model's per-task answer lengths are set
    from ``TaskSpec.max_new_tokens`` for the call and restored after.

    Args:
        model: the lmms-eval model (its backend decides the answers).
        tasks: the benchmark specs.
        limit: overrides every spec's ``limit`` when given (MME: rounded to whole pairs).
        output_dir: where task code writes submission/result files (TextVQA, OCRBench);
            ``None`` = a temporary folder kept as long as the results.

    Returns:
        ``spec.name`` -> :class:`TaskResult`.

    Raises:
        ValueError: two specs share a name, an unknown task, or MME data with incomplete pairs.
        FileNotFoundError: a spec's data folder does not exist.
    """
    names = [s.name for s in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmarks.tasks: names must be unique, got {names}")
    set_offline()
    from lmms_eval.evaluator import simple_evaluate

    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="embedlens-lmms-")
        output_dir = tmp.name
    output_dir = str(output_dir)
    manager = task_manager(tasks)
    out: dict[str, TaskResult] = {}
    for spec in tasks:
        if limit is not None:
            spec = replace(spec, limit=int(limit))
        prepared = prepare(spec, manager)
        spec = replace(spec, limit=prepared.limit)
        before = model.max_new_tokens.get(spec.task)
        if spec.max_new_tokens:
            model.max_new_tokens[spec.task] = int(spec.max_new_tokens)
        for key in [k for k in model.answer_info if k[0] == spec.task]:
            del model.answer_info[key]
        try:
            results = simple_evaluate(model=model, tasks=[prepared.task], limit=prepared.limit,
                                      bootstrap_iters=0, log_samples=True, cli_args=_cli_args(output_dir),
                                      process_docs_parallel=1, verbosity="WARNING", task_manager=manager)
        finally:
            if before is None:
                model.max_new_tokens.pop(spec.task, None)
            else:
                model.max_new_tokens[spec.task] = before
        aggregations = dict(prepared.task.aggregation())
        kind = spec.kind
        rows = []
        for sample in results["samples"][spec.task]:
            doc, doc_id = sample["doc"], int(sample["doc_id"])
            target = kind.target(doc) if kind and kind.target else sample.get("target")
            resps = sample.get("filtered_resps") or [""]
            rows.append({"doc_id": doc_id, "cluster": _cluster(doc, spec, doc_id),
                         "prediction": resps[0], "target": target,
                         "info": model.answer_info.get((spec.task, doc_id), {}),
                         **{m: sample.get(m) for m in aggregations}})
        items = pd.DataFrame(rows, columns=["doc_id", "cluster", "prediction", "target", "info",
                                            *aggregations])
        for m in aggregations:  # NaN where a document reported no value: None, as the docstring says
            items[m] = items[m].astype(object).where(items[m].notna(), None)
        out[spec.name] = TaskResult(spec=spec, scores=_scores(results["results"][spec.task]), items=items,
                                    headline=spec.headline, aggregations=aggregations,
                                    group_key=kind.group_key if kind else None, output_dir=output_dir,
                                    _tmp=tmp)
    return out
