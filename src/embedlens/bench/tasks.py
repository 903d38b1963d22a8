"""Which lmms-eval tasks the project runs, on which local data, and their fidelity traps.

A :class:`TaskSpec` is one entry of ``benchmarks.tasks`` in ``config.yaml``: an lmms-eval
task name (its official prompt, ``process_results`` and aggregation code) and a local
data folder. :func:`build_task` builds a *fresh* lmms-eval task object for every
evaluation (lmms-eval mutates the task objects it evaluates, and some task modules keep
state in module globals) from the builtin task's YAML with ``dataset_path`` pointed at
the local folder. Offline only: ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` are set before
``datasets`` loads anything.

Known traps of lmms-eval 0.7.3's official task code, handled here or in the harness:

- POPE is scored by *exact match* after ``lower().strip()``: "Yes." is wrong, "Yes" is
  right. That is the official metric and it is kept; a backend that wants credit must
  answer a bare word (the post-prompt asks for "a single word or phrase"). POPE's
  reported yes-ratio is the ground truth's, not the model's.
- MME scores an image by its *pair* of questions (accuracy + "accuracy+" over both);
  its aggregation asserts two answers per image. A ``limit`` is therefore rounded down
  to whole pairs (:func:`whole_groups_limit`), and data with an incomplete pair is refused.
- OCRBench adds every aggregation into a module-level dict (``OCRBench_score``): a second
  aggregation in one process would double the score. :func:`reset_accumulators` zeroes it
  before every evaluation and before every re-aggregation (:meth:`TaskResult.aggregate`).
- Answer lengths differ from the paper's runs (lmms-eval asks MME for 16 tokens, POPE and
  OCRBench for 128; the paper used 1 token for MME/MMStar): ``TaskSpec.max_new_tokens``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

#: Module globals of official task code that accumulate across aggregations (value:
#: what to reset each key to).
_ACCUMULATORS = {"OCRBench_score": 0}


def set_offline() -> None:
    """Make ``datasets``/``huggingface_hub`` read local files only (also when already imported)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    cfg = sys.modules.get("datasets.config")
    if cfg is not None:  # datasets reads the variables at import time
        cfg.HF_HUB_OFFLINE = True
        cfg.HF_DATASETS_OFFLINE = True


@dataclass(frozen=True)
class TaskKind:
    """What the project knows about a family of lmms-eval tasks.

    Attributes:
        folder: the task's folder under ``lmms_eval/tasks/`` (indexed alone: indexing all
            ~2,000 builtin tasks takes 6-9 s).
        cluster_keys: document columns naming the image a document belongs to (first
            present wins), for a cluster bootstrap over images.
        headline: the metric reported when the spec names none.
        group_key: the column whose documents must be evaluated together (MME's pairs).
        target: how the ``target`` column of the items table is read from a document,
            where the task's ``doc_to_target`` names no real column.
    """

    folder: str
    cluster_keys: tuple[str, ...]
    headline: str
    group_key: str | None = None
    target: Callable[[Mapping[str, Any]], str] | None = None


KINDS: dict[str, TaskKind] = {
    "pope": TaskKind("pope", ("image_source",), "pope_f1_score"),
    "mme": TaskKind("mme", ("question_id",), "mme_perception_score", group_key="question_id"),
    "textvqa": TaskKind("textvqa", ("image_id",), "exact_match",
                        target=lambda doc: "|".join(doc.get("answers") or [])),
    "mmstar": TaskKind("mmstar", ("index",), "average"),
    "refcoco": TaskKind("refcoco", ("file_name", "image_id"), "refcoco_ACC@0.5"),
    "ocrbench": TaskKind("ocrbench", ("image_id",), "ocrbench_accuracy"),
    "gqa": TaskKind("gqa", ("imageId",), "exact_match"),
    "docvqa": TaskKind("docvqa", ("docId", "image_id"), "anls"),
}


def task_kind(task: str) -> TaskKind | None:
    """The :class:`TaskKind` of an lmms-eval task name (``pope_adv`` -> POPE's, ...)."""
    if task in KINDS:
        return KINDS[task]
    for prefix in sorted(KINDS, key=len, reverse=True):
        if task.startswith(prefix) and not task.startswith(prefix + "+"):  # refcoco+ differs
            return KINDS[prefix]
    return None


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark of ``benchmarks.tasks``.

    Attributes:
        name: the project's name for it (result keys, report columns).
        task: the lmms-eval task name (``pope``, ``mme``, ``textvqa_val``, ``mmstar``,
            ``refcoco_bbox_rec_val``, ``ocrbench``, ...).
        path: the data: a local folder in the hub layout (``data/<split>-*.parquet``), or a
            hub id present in the local Hugging Face cache; ``None`` = the task's own
            ``dataset_path`` from the cache.
        split: the split to evaluate (``None`` = the task's own test split).
        max_new_tokens: generation length overriding the task's (``None`` = the task's).
        limit: the first ``limit`` documents only (MME: rounded down to whole pairs).
        metric: the headline metric (``None`` = the task family's, :data:`KINDS`).
        standin: the stand-in this spec was built from, if any (``pope``, ``mme``, ...).
    """

    name: str
    task: str
    path: str | None = None
    split: str | None = None
    max_new_tokens: int | None = None
    limit: int | None = None
    metric: str | None = None
    standin: str | None = None

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], standin_dir: str | Path = "results/benchmarks/data",
                    ) -> TaskSpec:
        """A spec from one ``benchmarks.tasks`` entry; ``standin: <kind>`` stands for
        ``path: <standin_dir>/<kind>`` (built by ``embedlens standins``).

        Raises:
            KeyError: ``name`` or ``task`` missing (the message names the key).
            ValueError: both ``path`` and ``standin`` given.
        """
        for key in ("name", "task"):
            if not entry.get(key):
                raise KeyError(f"benchmarks.tasks: entry {dict(entry)!r} lacks {key!r}")
        path, standin = entry.get("path"), entry.get("standin")
        if path and standin:
            raise ValueError(f"benchmarks.tasks[{entry['name']}]: give path or standin, not both")
        if standin:
            path = str(Path(standin_dir) / standin)
        return cls(name=str(entry["name"]), task=str(entry["task"]), path=path,
                   split=entry.get("split"), max_new_tokens=entry.get("max_new_tokens"),
                   limit=entry.get("limit"), metric=entry.get("metric"), standin=standin)

    @property
    def kind(self) -> TaskKind | None:
        return task_kind(self.task)

    @property
    def headline(self) -> str | None:
        return self.metric or (self.kind.headline if self.kind else None)


def task_config(spec: TaskSpec) -> dict[str, Any]:
    """The lmms-eval task config that overrides the builtin task's YAML: data path, split.

    ``dataset_kwargs`` is emptied for a local data path: the official YAMLs ask for a hub
    token (``token: True``), which has no meaning offline.
    """
    cfg: dict[str, Any] = {"task": spec.task}
    if spec.path:
        cfg["dataset_path"] = str(spec.path)
        cfg["dataset_kwargs"] = {}
    if spec.split:
        cfg["test_split"] = spec.split
    return cfg


def task_manager(specs: Sequence[TaskSpec]):
    """An lmms-eval ``TaskManager`` indexing only the folders of the given tasks (all
    builtin tasks when one is of an unknown family)."""
    from lmms_eval.tasks import TaskManager

    import lmms_eval.tasks as tasks_pkg

    kinds = [s.kind for s in specs]
    if any(k is None for k in kinds):
        return TaskManager(verbosity="WARNING")
    root = Path(tasks_pkg.__file__).parent
    folders = sorted({str(root / k.folder) for k in kinds})
    return TaskManager(verbosity="WARNING", include_path=folders, include_defaults=False)


def _is_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def build_task(spec: TaskSpec, manager=None):
    """A fresh lmms-eval task object for ``spec`` (its data loaded, offline).

    Raises:
        FileNotFoundError: ``path`` is neither an existing folder nor a hub id (``owner/name``).
        ValueError: the task is unknown to lmms-eval.
    """
    set_offline()
    from lmms_eval.tasks import get_task_dict

    if spec.path and not Path(spec.path).exists() and not _is_hub_id(spec.path):
        raise FileNotFoundError(f"benchmarks.tasks[{spec.name}]: data path {spec.path} does not exist "
                                "(a folder in the hub layout, or a hub id in the local Hugging Face cache; "
                                "stand-ins are built by `embedlens standins`)")
    manager = manager or task_manager([spec])
    if spec.task not in manager.all_tasks:
        raise ValueError(f"benchmarks.tasks[{spec.name}]: lmms-eval 0.7.3 has no task {spec.task!r}")
    tasks = get_task_dict([task_config(spec)], manager)
    task = tasks[spec.task]
    reset_accumulators(task)
    return task


def reset_accumulators(task) -> None:
    """Zero the module-level accumulators of the task's aggregation functions (OCRBench)."""
    for fn in task.aggregation().values():
        glb = getattr(fn, "__globals__", {})
        for name, value in _ACCUMULATORS.items():
            if isinstance(glb.get(name), dict):
                for key in glb[name]:
                    glb[name][key] = value


def whole_groups_limit(keys: Sequence[Any], limit: int | None) -> int:
    """The largest ``n <= limit`` such that the first ``n`` documents hold every document
    of each group they touch (MME: both questions of an image).

    Args:
        keys: the group key of every document, in evaluation order.
        limit: the requested limit (``None`` = all documents).

    Raises:
        ValueError: no complete group fits in ``limit`` (the message says how many
            documents the first group needs).
    """
    total = Counter(keys)
    n_max = len(keys) if limit is None else min(int(limit), len(keys))
    seen: Counter = Counter()
    open_groups = 0
    best = 0
    for i, key in enumerate(keys[:n_max], start=1):
        if seen[key] == 0:
            open_groups += 1
        seen[key] += 1
        if seen[key] == total[key]:
            open_groups -= 1
        if open_groups == 0:
            best = i
    if best == 0 and n_max > 0:
        raise ValueError(f"limit {limit} holds no complete group: the first needs "
                         f"{total[keys[0]]} documents (MME scores both questions of an image)")
    return best


def check_groups(keys: Sequence[Any], size: int, task: str) -> None:
    """Refuse data whose groups are not all of ``size`` documents (MME: pairs).

    Raises:
        ValueError: naming the first incomplete group and its size.
    """
    bad = [(k, n) for k, n in Counter(keys).items() if n != size]
    if bad:
        k, n = bad[0]
        raise ValueError(f"{task}: {len(bad)} image(s) without exactly {size} questions (e.g. {k!r} has {n}); "
                         "MME is scored on complete image pairs only")


@dataclass
class Prepared:
    """A task object ready for ``simple_evaluate`` and the limit to use with it."""

    spec: TaskSpec
    task: Any
    limit: int | None
    extra: dict = field(default_factory=dict)


def prepare(spec: TaskSpec, manager=None) -> Prepared:
    """Build the task and apply the group rule to its limit (see :func:`whole_groups_limit`)."""
    task = build_task(spec, manager)
    limit = spec.limit
    kind = spec.kind
    if kind is not None and kind.group_key:
        keys = list(task.eval_docs[kind.group_key])
        limit = whole_groups_limit(keys, limit)
        check_groups(keys[:limit], 2, spec.task)
    return Prepared(spec=spec, task=task, limit=limit)
