"""Each analysis step as the workflow runs it: from files to files.

The entry points (:func:`discover_model_anchors`, :func:`categorize`, :func:`layer_lens`,
:func:`probe`, :func:`align`) take opened data; these functions take what a Snakemake rule has, paths and the config
section, open what the step needs (the ``hidden.json`` index, the data set's patch
labels, the model for the lens heads and the text states) and call the entry point.
``embedlens <step>`` only parses arguments and calls them.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from embedlens.runtime import resolve_device
from embedlens.store import open_index

from .align import (
    TEXT_STATES_FILE,
    TextStates,
    align,
    build_prompts,
    collect_text_states,
)
from .categorize import OUTPUT_FILES as CATEGORIZE_FILES
from .categorize import categorize
from .labels import PatchLabels, read_patch_labels
from .lens import layer_lens
from .model_anchors import anchors_document, discover_model_anchors
from .outputs import note, step_summary, write_json
from .probe import probe
from .reference import check_mode
from .settings import config_kwargs


def dataset_labels(dataset_dir: str | Path | None) -> PatchLabels | None:
    """The patch labels of a materialized data set, or None when it has none (a folder of
    the user's images): the label-based measures are then skipped and say so."""
    if dataset_dir is None:
        return None
    meta = json.loads((Path(dataset_dir) / "dataset.json").read_text())
    return read_patch_labels(dataset_dir) if meta.get("label_tasks") else None


def open_store_of(hidden_index, dataset_dir: str | Path | None):
    """The hidden-state store of ``hidden_index``, checked against the data set it is
    analysed with: a store extracted from another data set would be joined to that data
    set's labels by image id alone (synthetic sets share their ids), silently wrong.

    Raises
    ------
    ValueError
        the store's ``dataset`` attribute names another data set than ``dataset.json``, or
        the store holds images the data set does not have (names both and what to do).
    """
    hidden = open_index(hidden_index)
    if dataset_dir is None:
        return hidden
    meta = json.loads((Path(dataset_dir) / "dataset.json").read_text())
    stored = hidden.attrs.get("dataset")
    if stored is not None and str(stored) != str(meta.get("name")):
        raise ValueError(f"{hidden_index} was extracted from data set {stored!r}, but {dataset_dir} is data set "
                         f"{meta.get('name')!r}: pass the data set the store was extracted from")
    known = {str(im["image_id"]) for im in meta.get("images", [])}
    extra = [str(x) for x in hidden["image_id"].values if str(x) not in known]
    if extra:
        raise ValueError(f"{hidden_index}: {len(extra)} image(s) not in data set {dataset_dir} "
                         f"(e.g. {extra[:3]}): pass the data set the store was extracted from")
    return hidden


def _categories(path: str | Path) -> Path:
    p = Path(path)
    return p / CATEGORIZE_FILES["categories"] if p.is_dir() else p


def anchors_step(hidden_indexes: Sequence, vocab, dataset_dirs: Sequence, out_dir,
                 settings: Mapping[str, Any] | None = None, *, datasets: Sequence[str] | None = None,
                 anchors: Mapping[str, Any] | None = None, model: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """``embedlens anchors``: :func:`discover_model_anchors` over every data set of a model.

    ``hidden_indexes`` / ``dataset_dirs``: one per data set, in the same order; ``datasets``:
    their names (default: the data-set directories' names). ``settings``: the ``categorize``
    section of config.yaml (the anchors are found with categorize's neighbour settings and
    discovery thresholds; its keys that concern the categorization alone are not used).

    Raises
    ------
    ValueError
        the lists differ in length, or a data-set name repeats.
    """
    names = list(datasets) if datasets else [Path(d).name for d in dataset_dirs]
    if not len(hidden_indexes) == len(dataset_dirs) == len(names):
        raise ValueError(f"anchors: {len(hidden_indexes)} hidden indexes, {len(dataset_dirs)} data-set "
                         f"directories and {len(names)} names; give one of each per data set")
    if len(set(names)) != len(names):
        raise ValueError(f"anchors: data-set names repeat: {names}")
    keep = set(inspect.signature(discover_model_anchors).parameters)
    kwargs = {k: v for k, v in config_kwargs("categorize", dict(settings or {})).items() if k in keep}
    return discover_model_anchors(
        {n: open_store_of(h, d) for n, h, d in zip(names, hidden_indexes, dataset_dirs)}, vocab, out_dir,
        labels={n: dataset_labels(d) for n, d in zip(names, dataset_dirs)}, anchors=anchors or None,
        model=model, progress=progress, **kwargs)


def categorize_step(hidden_index, vocab, dataset_dir, out_dir, settings: Mapping[str, Any] | None = None, *,
                    anchors: Mapping[str, Any] | None = None, anchors_dir=None, model: str | None = None,
                    dataset: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``embedlens categorize``: :func:`categorize` on the store of ``hidden_index``.
    ``anchors_dir``: the model's anchors step directory (the workflow's; its anchors are
    used, the configured ``anchors`` still win per group); None: discovery on this data set."""
    model_anchors = anchors_document(anchors_dir) if anchors_dir else None
    return categorize(open_store_of(hidden_index, dataset_dir), vocab, out_dir, anchors=anchors or None,
                      model_anchors=model_anchors, labels=dataset_labels(dataset_dir), model=model,
                      dataset=dataset, progress=progress, **config_kwargs("categorize", dict(settings or {})))


def lens_step(hidden_index, vocab, model_dir, out_dir, settings: Mapping[str, Any] | None = None, *,
              model: str | None = None, dataset: str | None = None,
              trust_remote_code: bool = False, progress: bool = True) -> dict[str, Any]:
    """``embedlens lens``: :func:`layer_lens` with the model's own ``lm_head`` and final norm
    (loaded in float32 on the CPU: only those two modules are used)."""
    from embedlens.models.adapter import VLMAdapter

    adapter = VLMAdapter.load(str(model_dir), dtype="float32", device="cpu",
                              trust_remote_code=trust_remote_code)
    return layer_lens(open_index(hidden_index), vocab, out_dir, lm_head=adapter.lm_head,
                      final_norm=adapter.final_norm, model=model, dataset=dataset,
                      progress=progress, **config_kwargs("lens", dict(settings or {})))


def text_states_step(model_dir, dataset_dir, out_dir, settings: Mapping[str, Any] | None = None, *,
                     device: str = "auto", model: str | None = None, dataset: str | None = None,
                     trust_remote_code: bool = False, progress: bool = True) -> dict[str, Any]:
    """``embedlens text-states``: the reference text states for :func:`align` — label-word
    captions of the data set (plus ``extra_words``) run through the model's LLM; writes
    ``text_states.npz`` and ``summary.json`` into ``out_dir``. ``settings["mode"]`` (the
    model's mode) is recorded in the summary's ``settings``; it changes nothing here."""
    from embedlens.models.adapter import VLMAdapter

    t0 = time.perf_counter()
    settings = dict(settings or {})
    mode = check_mode(settings.get("mode", "ours"))
    prompt_keys = ("templates", "compositions", "extra_words")
    meta = json.loads((Path(dataset_dir) / "dataset.json").read_text())
    dev = resolve_device(device)
    adapter = VLMAdapter.load(str(model_dir), dtype="float32", device=dev,
                              trust_remote_code=trust_remote_code)
    prompts = build_prompts(meta.get("label_tasks") or None,
                            **{k: settings[k] for k in prompt_keys if settings.get(k) is not None})
    states = collect_text_states(adapter.model, adapter.tokenizer, prompts, device=dev, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    states.save(out / TEXT_STATES_FILE)
    summary = step_summary("text_states", {
        "model": model, "dataset": dataset,
        "settings": {**{k: settings.get(k) for k in prompt_keys}, "mode": mode},
        "seconds": time.perf_counter() - t0,
        "methods_notes": [note("ours", "text_states",
                               "Label-word captions and a generic word list run through the LLM "
                               "text-only; a word's state per layer is the mean over its occurrences.")],
        "files": {"text_states": TEXT_STATES_FILE, "summary": "summary.json"},
        "n_prompts": len(prompts), "layers": states.layers, "n_words": len(states.word_keys),
    })
    write_json(summary, out / "summary.json")
    return summary


def probe_step(hidden_index, categories, dataset_dir, out_dir, settings: Mapping[str, Any] | None = None, *,
               vocab=None, model: str | None = None, dataset: str | None = None,
               progress: bool = True) -> dict[str, Any]:
    """``embedlens probe``: :func:`probe` (``categories``: the categorize directory;
    ``vocab``: the vocabulary store, for hit@k's uniform chance and a ``hit_k`` other than
    categorize's k; without it ``chance_uniform`` is NaN and such a ``hit_k`` raises).

    Raises
    ------
    ValueError
        as :func:`probe` (e.g. ``hit_k`` other than the stored k without ``vocab``).
    """
    return probe(open_store_of(hidden_index, dataset_dir), _categories(categories), dataset_labels(dataset_dir), out_dir,
                 vocab=vocab, model=model, dataset=dataset, progress=progress,
                 **config_kwargs("probe", dict(settings or {})))


def align_step(hidden_index, categories, text_states, dataset_dir, out_dir,
               settings: Mapping[str, Any] | None = None, *, model: str | None = None,
               dataset: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``embedlens align``: :func:`align` (``text_states``: the text-states directory)."""
    return align(open_store_of(hidden_index, dataset_dir), _categories(categories), TextStates.load(text_states),
                 dataset_labels(dataset_dir), out_dir, model=model, dataset=dataset, progress=progress,
                 **config_kwargs("align", dict(settings or {})))
