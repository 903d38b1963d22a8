"""The standard-benchmark step as the workflow runs it: from files to files.

``embedlens benchmark`` only parses arguments and calls :func:`benchmarks_step`; the step's
directory is ``results/analysis/{model}/benchmarks/`` (one per model: the benchmarks' own
images, not a configured data set), read back with :func:`read_benchmarks`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from embedlens.analysis.outputs import step_reader

from .run import run_benchmarks

read_benchmarks = step_reader("benchmarks")


def benchmarks_step(model_dir, vocab, tasks: Sequence[Mapping[str, Any]], out_dir,
                    settings: Mapping[str, Any] | None = None, *, anchors_dir: str | Path | None = None,
                    align_dir: str | Path | None = None,
                    model: str | None = None, trust_remote_code: bool = False,
                    progress: bool = True) -> pd.DataFrame:
    """``embedlens benchmark``: :func:`~embedlens.bench.run.run_benchmarks` on the tasks of
    config.yaml's ``benchmarks.tasks`` (each a mapping with the keys of
    :class:`embedlens.bench.tasks.TaskSpec`) with the settings ``settings`` (the keywords of
    ``run_benchmarks``: conditions, seeds, n_bootstrap, batch_size, device, dtype, anchors,
    top_k, exclude_special, exclude_ids, include_ids, preprocess, best_aligned_layer);
    `align_dir`: an align step whose best layer for alive tokens adds an inject condition.

    Raises
    ------
    ValueError : a task entry that is not a valid TaskSpec (named), plus what
        ``run_benchmarks`` raises.
    """
    from embedlens.compress.steps import best_aligned_layer

    from .tasks import TaskSpec

    specs = []
    for i, t in enumerate(tasks):
        try:
            specs.append(TaskSpec.from_config(t))
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"benchmarks.tasks[{i}] ({dict(t).get('name', '?')!r}): {e}") from None
    s = dict(settings or {})
    if align_dir is not None:
        s.setdefault("best_aligned_layer", best_aligned_layer(align_dir))
    return run_benchmarks(model_dir, vocab, specs, out_dir, anchors_dir=anchors_dir, model=model,
                          trust_remote_code=trust_remote_code, progress=progress, **s)
