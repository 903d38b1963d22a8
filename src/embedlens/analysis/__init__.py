"""Analyses over the cached hidden states (docs/methods.md §1–§3).

* :func:`categorize` – EmbedLens sink/dead/alive categorization (+ anchor discovery [ours]);
* :func:`discover_model_anchors` – the anchors of a model, found once over all its data sets [ours];
* :func:`layer_lens` – embedding lens and logit lens per layer, stored as Zarr;
* :func:`probe` – probing classifiers with control tasks, and the hit@k check [ours];
* :func:`align` – layer alignment with text hidden states [ours].

Every entry point takes the hidden-state store (``embedlens.store.open_hidden``) and writes
files into an output directory; output names and columns: docs/architecture.md,
"Analysis outputs".
"""

from .align import (
    TextStates,
    align,
    build_prompts,
    collect_text_states,
    linear_cka,
    read_align,
)
from .anchors import discover_anchors
from .categorize import (
    GROUPS,
    LABELS,
    REFERENCE_ALIVE_SHARE,
    REFERENCE_ANCHORS,
    apply_rule,
    categorize,
    compute_h0_neighbours,
    read_categories,
    read_categorize,
)
from .labels import PatchLabels, read_patch_labels
from .lens import layer_lens, open_lens, read_lens
from .model_anchors import anchors_document, discover_model_anchors, pool_tables, read_anchors
from .outputs import SUMMARY_KEYS, StepOutputs, SummaryError, read_step, read_summary
from .probe import hit_at_k, probe, read_probe
from .settings import config_kwargs
from .vocab import Vocab, VocabIndex, load_vocab

__all__ = [
    "GROUPS", "LABELS", "REFERENCE_ALIVE_SHARE", "REFERENCE_ANCHORS",
    "PatchLabels", "TextStates", "Vocab", "VocabIndex",
    "align", "anchors_document", "apply_rule", "build_prompts", "categorize", "collect_text_states",
    "config_kwargs", "compute_h0_neighbours", "discover_anchors", "discover_model_anchors", "hit_at_k",
    "layer_lens", "linear_cka", "load_vocab", "open_lens", "pool_tables", "probe", "read_categories",
    "read_patch_labels",
    # each step's outputs (the one summary shape: SUMMARY_KEYS)
    "SUMMARY_KEYS", "StepOutputs", "SummaryError", "read_align", "read_anchors", "read_categorize",
    "read_lens", "read_probe", "read_step", "read_summary",
]
