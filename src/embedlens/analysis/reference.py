"""Where a computation is the reference's, and where it is not.

The paper's released code (a LLaVA-1.5 fork) searches every vocabulary row and pads each
image to a square with the mean colour before its processor (``expand2square``). A model's
``mode`` in config.yaml (``ours``, ``reference``, ``reference-float16``; README
"Reproducing the paper") sets those knobs; every step records the mode in its summary's
``settings``. The methods notes written here carry the tag ``reference`` only when the
computation is the reference's, else ``deviation`` with the reason, so a report never
calls a procedure the paper's when it is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .outputs import note


def check_mode(mode: str) -> str:
    """``mode`` when it is a mode config.yaml knows (``embedlens.config.MODE_SETTINGS``).

    Raises
    ------
    ValueError
        an unknown mode (names the known ones).
    """
    from embedlens.config import MODE_SETTINGS

    if mode not in MODE_SETTINGS:
        raise ValueError(f"mode must be one of {list(MODE_SETTINGS)}, got {mode!r}")
    return mode


def store_preprocess(hidden: Any) -> str:
    """The image preprocessing the states of ``hidden`` were extracted with (its
    ``settings`` attribute; a store without it, written before the option, is "native")."""
    settings = getattr(hidden, "attrs", {}).get("settings")
    return str((settings or {}).get("preprocess", "native")) if isinstance(settings, dict) else "native"


def vocabulary_search_note(procedure: str, what: str, excluded: Sequence[int],
                           strings: Sequence[str], similarity_dtype: str = "float32") -> dict[str, str]:
    """The methods note of a vocabulary search (the EmbedLens rule, the embedding lens):
    tagged ``reference`` when every row is a candidate, as in the released code, else
    ``deviation`` naming the excluded rows."""
    dtype = ("float16 (as a float16 model's code computes it; float32 computed beside it, the "
             "share of labels that differ is in the summary)" if similarity_dtype == "float16" else "float32")
    if not len(excluded):
        return note("reference", procedure, f"{what} Cosine in {dtype}; every vocabulary row is a candidate, "
                                            "as in the released reference code.")
    shown = ", ".join(repr(strings[i]) for i in list(excluded)[:6]) + (" …" if len(excluded) > 6 else "")
    return note("deviation", procedure,
                f"{what} Cosine in {dtype}; {len(excluded)} vocabulary rows excluded from the candidates "
                f"({shown}: special/added tokens or configured ids), where the released reference code "
                "searches every row (set the model's mode: reference to search all).")


def rule_note(top_k: int, excluded: Sequence[int], strings: Sequence[str],
              similarity_dtype: str = "float32") -> dict[str, str]:
    """The methods note of the EmbedLens rule (see :func:`vocabulary_search_note`)."""
    return vocabulary_search_note(
        "embedlens_rule",
        f"Top-{top_k} cosine neighbours of h[0] among the rows of E; label = first group among "
        "vit_sink, llm_sink, dead with an anchor id in the top-k, else alive.",
        excluded, strings, similarity_dtype)


def preprocess_note(preprocess: str) -> dict[str, str]:
    """The methods note of the image preprocessing the states were extracted with."""
    if preprocess == "pad_square":
        return note("reference", "preprocess",
                    "Each image padded to a square with the image processor's mean colour before the "
                    "processor, as LLaVA-1.5's released code does (expand2square).")
    return note("deviation", "preprocess",
                "Each image given to the model's processor as it is (llava-hf's LLaVA-1.5 processor "
                "center-crops a non-square image), where the released reference code pads it to a square "
                "with the mean colour: shares are comparable with the paper's only with mode: reference.")
