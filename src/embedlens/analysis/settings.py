"""config.yaml sections → the analysis entry points' keyword arguments.

A section's keys *are* the entry point's keyword names (``probe.n_bootstrap`` is
``probe(n_bootstrap=...)``), so there is no renaming table to drift. The exceptions are
named here: categorize's anchor-discovery thresholds go to ``discovery`` (they are
``discover_anchors``' keywords), and align's prompt keys belong to ``build_prompts``.
Defaults live in one place, the schema's ``default:`` (workflow/schemas/config.schema.yaml);
tests/test_config.py checks them against these signatures.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .align import align, build_prompts
from .anchors import DEFAULTS as DISCOVERY
from .categorize import categorize
from .lens import layer_lens
from .probe import probe

#: analysis step (config section) → its entry point.
ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "categorize": categorize, "lens": layer_lens, "probe": probe, "align": align,
}

#: keys of a section that belong to another function than the entry point.
ELSEWHERE: dict[str, tuple[str, ...]] = {
    "categorize": tuple(DISCOVERY),                                   # discover_anchors(**)
    "align": tuple(p for p in inspect.signature(build_prompts).parameters if p != "label_tasks"),
}

# Arguments the workflow supplies itself (data, outputs, names), never from config.yaml.
_SUPPLIED = {"hidden", "vocab", "out_dir", "out_path", "categories", "text_states", "labels",
             "anchors", "model_anchors", "model", "dataset", "progress", "lm_head", "final_norm",
             "discovery"}


def config_keys(step: str) -> set[str]:
    """The keys a ``config.yaml`` section ``step`` may hold: the entry point's keyword
    names (less what the workflow supplies) plus :data:`ELSEWHERE`.

    Raises
    ------
    KeyError
        ``step`` is not an analysis section (one of :data:`ENTRY_POINTS`).
    """
    params = inspect.signature(ENTRY_POINTS[step]).parameters
    return (set(params) - _SUPPLIED) | set(ELSEWHERE.get(step, ()))


def config_kwargs(step: str, section: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments of an analysis entry point from its ``config.yaml`` section.

    ``categorize``: the anchor-discovery thresholds (``vit_norm_z``, ``llm_norm_z``,
    ``llm_sink_layers``, ``hub_*``, ... = ``anchors.DEFAULTS``) go into ``discovery``.
    ``align``: ``extra_words``/``templates``/``compositions`` belong to ``build_prompts``
    and are left out.

    Raises
    ------
    KeyError
        a key that is no keyword of the entry point (``"probe.nonsense: not a setting of
        embedlens.analysis.probe"``), so config and library cannot drift apart.
    """
    fn = ENTRY_POINTS[step]
    params = set(inspect.signature(fn).parameters) - _SUPPLIED
    elsewhere = set(ELSEWHERE.get(step, ()))
    out: dict[str, Any] = {}
    discovery: dict[str, Any] = {}
    for k, v in (section or {}).items():
        if step == "categorize" and k in DISCOVERY:
            discovery[k] = v
        elif k in params:
            out[k] = v
        elif k not in elsewhere:
            raise KeyError(f"{step}.{k}: not a setting of embedlens.analysis.{fn.__name__} "
                           f"(settings: {', '.join(sorted(params | elsewhere))})")
    if discovery:
        out["discovery"] = discovery
    return out
