"""config.yaml sections → the analysis entry points' keyword arguments."""

from __future__ import annotations

from typing import Any

from .anchors import DEFAULTS as DISCOVERY

#: config.yaml key → keyword argument, per analysis step (``None`` = consumed elsewhere).
CONFIG_KEYS: dict[str, dict[str, str | None]] = {
    "categorize": {"top_k": "k", "exclude_special": "exclude_special",
                   "discover_anchors": "discover", "block_rows": "vocab_block",
                   "exclude_ids": "exclude_ids", "include_ids": "include_ids",
                   "query_block": "query_block", "device": "device"},
    "lens": {"top_k": "k", "layers": "layers", "max_images": "max_images",
             "block_rows": "vocab_block", "device": "device"},
    "probe": {"layers": "layers", "tasks": "tasks", "groups": "groups",
              "test_fraction": "test_fraction", "min_tokens": "min_tokens",
              "min_test_tokens": "min_test_tokens", "bootstrap": "n_bootstrap",
              "max_iter": "max_iter", "C": "C", "seed": "seed", "hit_k": "hit_k",
              "max_tokens": "max_tokens", "pca_components": "pca_components",
              "control_type": "control_type", "include_vision": "include_vision"},
    "align": {"layers": "layers", "groups": "groups", "centring": "centring", "seed": "seed",
              "tasks": "tasks", "max_tokens": "max_tokens", "cka_max_tokens": "cka_max_tokens",
              "extra_words": None, "templates": None, "compositions": None},
}


def config_kwargs(step: str, section: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments of an analysis entry point from its ``config.yaml`` section.

    ``categorize``: the anchor-discovery thresholds (``vit_norm_z``, ``llm_norm_z``,
    ``llm_sink_layers``, ``hub_*``, ... = ``anchors.DEFAULTS``) go into ``discovery``.
    ``align``: ``extra_words``/``templates``/``compositions`` belong to ``build_prompts``
    and are left out. Unknown keys are an error, so config and library cannot drift apart.
    """
    keys = CONFIG_KEYS[step]
    out: dict[str, Any] = {}
    discovery: dict[str, Any] = {}
    for k, v in (section or {}).items():
        if step == "categorize" and k in DISCOVERY:
            discovery[k] = v
        elif k in keys:
            if keys[k] is not None:
                out[keys[k]] = v
        else:
            raise KeyError(f"{step}.{k}: not a setting of embedlens.analysis.{step}")
    if discovery:
        out["discovery"] = discovery
    return out
