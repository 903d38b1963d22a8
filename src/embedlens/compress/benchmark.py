"""The compression benchmark (docs/methods.md §4): multiple-choice VQA accuracy and cost of a
model under a list of visual-token interventions.

Conditions are dicts as they appear in ``config.yaml``::

    {"op": "baseline"}
    {"name": "prune_sinks", "op": "prune", "groups": ["vit_sink", "llm_sink"]}
    {"op": "keep", "groups": ["alive"]}
    {"op": "random_matched", "groups": ["dead"], "seeds": [0, 1, 2]}   # seeds optional
    {"op": "skip", "groups": ["visual"], "sublayers": "attn" | "mlp" | "both", "layers": [a, b]}
    {"op": "skip", "groups": ["alive"], "sublayers": [3, 3.5, 4]}      # explicit sublayers
    {"op": "inject", "layer": 4}
    {"op": "exit", "layer": 6}
    {"op": "knockout", "edges": ["visual->visual", "text->visual"], "layers": [0, 8]}
    {"op": "prune_inject", "groups": ["sinks", "dead"], "layer": 4}
    {"op": "skip", "groups": ["visual"], "sublayers": "attn", "layers": [0, 1], "reference_layer0": true}

``groups``: token groups (``vit_sink``, ``llm_sink``, ``dead``, ``alive``) or the aliases
``sink``/``sinks`` and ``visual``/``all``. A group holds the tokens with an anchor id of the
group among their top-k neighbours (membership, the reference semantics; groups may overlap,
``alive`` = in none); ``select: label`` on a condition uses the exclusive categorize label
instead (``{"op": "prune", "groups": ["dead"], "select": "label"}``). Instead of a list,
``conditions`` may name a preset, ``"default"`` or ``"paper"`` (:mod:`.conditions`). ``layers: [a, b]`` is the half-open range
``a <= layer < b`` (like Python's ``range``; default every layer); ``layer`` may be negative
(counted from the end, ``-1`` = the last layer). ``name`` defaults to one derived from the
op and its arguments; names must be unique.

Scoring (deterministic): per item, the prompt (the chat template's user turn with the image
and the question, via :mod:`embedlens.vqa` and the adapter's prompt rule, then the item's
``answer_prefix``) is run once through the model's own input preparation and captured; each
choice is appended as the token ids of its text (:func:`embedlens.vqa.item_framing`: the
item's ``choice_texts``, e.g. " a red letter" for "red", as ``eval-model`` scores them)
and the whole sequence is run under the intervention
(:func:`embedlens.compress.interventions.forward`); the score of a choice is its
length-normalized log-likelihood (mean token log-probability,
:func:`~embedlens.compress.interventions.answer_logprob`), the prediction the best choice
(ties: the first). The vision tower runs once per item for all conditions.

Prefix sharing without a KV cache: ``inject``/``exit`` give decoder layers different token
sets, which one cache cannot hold, so instead an item's choices are packed after a single
copy of the prompt in one sequence, with a per-layer mask restriction so that each answer
sees only the prompt and itself, and position ids as if it were alone
(:func:`~embedlens.compress.interventions.pack_choices`; same scores as one sequence per
choice up to float round-off, tested; ``pack_choices=False`` runs one sequence per choice).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from embedlens.runtime import free_cached_memory, is_out_of_memory

from . import cost as _cost
from . import interventions as iv
from .plan import visual_mask
from .aggregate import aggregate, wilson_interval  # noqa: F401 - re-exported
from .conditions import (  # noqa: F401 - re-exported: the benchmark's condition language
    PRESETS,
    SINKS,
    Variant,
    default_conditions,
    parse_conditions,
)

#: Files of the step's directory.
OUTPUT_FILES = {"compress": "compress.parquet", "summary": "summary.json"}

log = logging.getLogger("embedlens.compress")


# =========================================================================== run
@dataclass(eq=False)  # identity semantics: items hold tensors
class _Item:
    index: int
    item: dict
    prompt: iv.TokenSequence | None = None
    answers: list[list[int]] = field(default_factory=list)
    groups: iv.TokenGroups | None = None


def _load_categories(path, image_ids: set[str]) -> dict[str, iv.TokenGroups]:
    """image id -> :class:`~.plan.TokenGroups` (exclusive ``label`` and the ``in_vit_sink``/
    ``in_llm_sink``/``in_dead`` membership columns of categorize's ``categories.parquet``).

    Raises:
        ValueError: a missing column, unknown labels, tokens not 0..n-1 or labels that are not
            the first matching membership group, naming `path` and the image.
    """
    import pyarrow.parquet as pq

    want = ["image_id", "token", "label", *(f"in_{g}" for g in iv.GROUPS)]
    have = set(pq.read_schema(path).names)
    missing = [c for c in want if c not in have]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; the compression benchmark selects tokens by anchor "
                         "membership (in_<group>) and label: rerun categorize with this version")
    cats = pd.read_parquet(path, columns=want)
    cats = cats[cats["image_id"].isin(image_ids)].sort_values(["image_id", "token"])
    out = {}
    for image_id, g in cats.groupby("image_id", sort=False):
        try:
            out[str(image_id)] = iv.TokenGroups.from_categories(g)
        except ValueError as e:
            raise ValueError(f"{path}: image {image_id!r}: {e}") from None
    return out


class _Scorer:
    """Scores the choices of items under one variant, in batches (halved on CUDA OOM).

    With `pack`, an item's choices share one sequence (:func:`~.interventions.pack_choices`:
    prompt once, answers side by side, each seeing the prompt and itself only), which is
    several times cheaper than one sequence per choice and gives the same scores up to float
    round-off; items for which packing would not be exact (short sliding windows) fall back
    to one sequence per choice.
    """

    def __init__(self, model, num_layers: int, batch_size: int, pack: bool = True):
        self.model = model
        self.N = num_layers
        self.batch_size = max(1, int(batch_size))
        self.pack = pack

    def _units(self, items: Sequence[_Item]) -> list[tuple[_Item, list[int]]]:
        units = []
        for it in items:
            total = len(it.prompt) + sum(len(a) for a in it.answers)
            if self.pack and len(it.answers) > 1 and iv.packing_is_exact(self.model, total):
                units.append((it, list(range(len(it.answers)))))
            else:
                units.extend((it, [c]) for c in range(len(it.answers)))
        return units

    def _build(self, it: _Item, choices: list[int]):
        if len(choices) > 1:
            return iv.pack_choices(self.model, it.prompt, [it.answers[c] for c in choices])
        ans = it.answers[choices[0]]
        P = len(it.prompt)
        seq = iv.append_text(self.model, it.prompt, ans)
        return seq, [torch.arange(P - 1, P - 1 + len(ans))], [torch.tensor(ans)]

    def score(self, items: Sequence[_Item], variant: Variant) -> dict[int, list[float]]:
        work = self._units(items)
        scores: dict[int, list[float]] = {it.index: [math.nan] * len(it.answers) for it in items}
        pos = 0
        while pos < len(work):
            chunk = work[pos:pos + self.batch_size]
            try:
                seqs, plans, want, targets = [], [], [], []
                for it, choices in chunk:
                    seq, w, t = self._build(it, choices)
                    seqs.append(seq)
                    plans.append(iv.plan_for(seq, it.groups, variant.intervention, self.N))
                    want.append(torch.cat(w))
                    targets.append(t)
                res = iv.forward(self.model, seqs, plans, want)
            except RuntimeError as exc:
                if is_out_of_memory(exc) and self.batch_size > 1:
                    free_cached_memory(next(self.model.parameters()).device)
                    self.batch_size //= 2
                    log.warning("out of memory: batch size -> %d", self.batch_size)
                    continue
                raise
            for (it, choices), lg, ts in zip(chunk, res.logits, targets):
                for c, part, t in zip(choices, torch.split(lg, [len(t) for t in ts]), ts):
                    scores[it.index][c] = iv.answer_logprob(part, t)
            pos += len(chunk)
        return scores


def _visual_stats(prompt: iv.TokenSequence, plan: iv.Plan, N: int) -> tuple[int, int, float, int]:
    """(visual tokens, visual tokens taking part in some layer, mean visual tokens per layer,
    visual tokens the plan removes or changes: deleted, skipped in a sublayer or absent from
    a layer)."""
    visual = visual_mask(prompt, plan.keep.device)
    per_layer = plan.visual_per_layer(N, visual)
    n_kept, n_affected = plan.visual_counts(N, visual)
    return int(visual.sum()), n_kept, float(np.mean(per_layer)) if N else 0.0, n_affected


def run_compress(
    model_dir,
    dataset_dir,
    categories_parquet,
    conditions: Sequence[dict] | str | None,
    out_dir,
    *,
    n_items: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    repeats: int = 3,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 8,
    latency_items: int = 4,
    chunk_items: int = 32,
    pack_choices: bool = True,
    best_aligned_layer: int | None = None,
    n_bootstrap: int = 1000,
    bootstrap_seed: int = 0,
    items_out=None,
    preprocess: str = "native",
    mode: str = "ours",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the compression benchmark and write the step's directory `out_dir`: the tidy
    table ``compress.parquet`` and ``summary.json`` (the one summary shape of every step,
    :data:`embedlens.analysis.outputs.SUMMARY_KEYS`). Returns the table.

    `conditions`: condition dicts (module doc), or the name of a preset (``"default"``,
    ``"paper"``: :func:`default_conditions` with `best_aligned_layer`); None = ``"default"``.
    Groups select tokens by anchor membership unless a condition says ``select: label``. `n_items`: the first n VQA items of the data set (None = all).
    `seeds`: for random_matched conditions without their own ``seeds``. `repeats`: timed
    prefill runs per prompt (after one warm-up) on the first `latency_items` prompts.
    `batch_size`: sequences per forward pass (an item's packed choices, or one choice when
    not packed; halved on CUDA OOM; results do not depend on it beyond float round-off).
    `pack_choices`: score an item's choices in one shared-prompt sequence (see `_Scorer`).
    `chunk_items`: items captured at a time (bounds memory). Each item is framed by its own
    ``answer_prefix``/``choice_texts`` (:func:`embedlens.vqa.item_framing`).
    `items_out`: optional Parquet path for the per-item predictions.
    `preprocess`: what happens to an image before the processor (`embedlens.models.preprocess`);
    it must be the extraction's, so that the categorized tokens are the tokens scored
    (:func:`embedlens.compress.steps.compress_step` takes it from the categorize summary).
    `mode`: the model's ``mode`` in config.yaml, recorded in ``settings``.
    `n_bootstrap`, `bootstrap_seed`: the paired bootstrap of Δ accuracy vs the baseline.

    One row per (condition, seed, item type) plus ``item_type == "all"``
    (:func:`~.aggregate.aggregate`); ``seed`` is <NA> on the condition-level rows (for
    random_matched: each item's correctness averaged over the seeds first, Wilson interval
    over the items, ``accuracy_sd`` across seeds) and set on the per-seed rows. ``delta``
    (with ``delta_ci_low``/``delta_ci_high``, paired bootstrap over items) and ``p_mcnemar``
    (exact, 0/1 outcomes only) compare with the baseline on the same items;
    ``n_removed_images`` counts images where the condition removed or changed a visual token
    and ``nothing_removed`` flags a targeted condition that did so in no image (its Δ is nan:
    not a result).

    Raises
    ------
    ValueError
        a data set without VQA items, an item whose answer is not among its choices or that
        cannot be framed, images of the items missing from the categories, a malformed
        condition, an unknown `preprocess` or `mode`.
    embedlens.models.parts.UnsupportedModelError
        a model the interventions cannot run on (named, with what is missing).
    """
    from embedlens import vqa
    from embedlens.analysis.outputs import step_summary, write_json, write_parquet
    from embedlens.analysis.reference import check_mode
    from embedlens.datasets.materialize import load_dataset
    from embedlens.models.preprocess import PREPROCESS, preprocess_images
    from embedlens.runtime import resolve_device

    t0 = time.perf_counter()
    check_mode(mode)
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {list(PREPROCESS)}, got {preprocess!r}")
    dev = resolve_device(device)
    ds = load_dataset(dataset_dir)
    items = list(ds.vqa)[: n_items if n_items is not None else None]
    if not items:
        raise ValueError(
            f"data set {ds.name!r} has no VQA items; the compression benchmark needs multiple-choice "
            "items (the synthetic source generates them; a manifest can list its own)"
        )
    for it in items:
        if it.get("answer") not in it.get("choices", []):
            raise ValueError(f"VQA item {it.get('item_id')!r}: answer {it.get('answer')!r} is not among "
                             f"its choices {it.get('choices')!r}")
    framings = [vqa.item_framing(it) for it in items]  # raises on a malformed item, before loading
    cats = _load_categories(categories_parquet, {it["image_id"] for it in items})
    missing = sorted({it["image_id"] for it in items} - set(cats))
    if missing:
        raise ValueError(f"{categories_parquet}: no categorized tokens for {len(missing)} image(s) of the "
                         f"VQA items (e.g. {missing[:3]}); run categorize on the same model and data set")

    model, processor, adapter = iv.load_model(model_dir, device=dev, dtype=dtype,
                                              trust_remote_code=trust_remote_code)
    N = adapter.num_layers
    shape = _cost.DecoderShape.from_model(model)
    if conditions is None or isinstance(conditions, str):
        preset = conditions or "default"
        conditions = default_conditions(N, best_aligned_layer, preset)
    else:
        preset = None
    variants = parse_conditions(conditions, N, seeds)
    scorer = _Scorer(model, N, batch_size, pack=pack_choices)

    records: list[dict] = []
    latency_prompts: list[_Item] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items) * len(variants), desc="compress", unit="item", disable=not progress)
    try:
        for start in range(0, len(items), max(1, chunk_items)):
            chunk = []
            for k, item in enumerate(items[start:start + chunk_items], start=start):
                frame = framings[k]
                (image,) = preprocess_images([ds.image(item["image_id"])], processor, preprocess)
                inputs = vqa.prepare_prompt(processor, image, item["question"],
                                            frame.answer_prefix, prompt_fn=adapter.format_prompt)
                inputs = {k2: v.to(dev) for k2, v in inputs.items()}
                prompt = iv.capture_sequence(model, inputs, item["image_id"])
                answers = vqa.choice_token_ids(processor, frame.choice_texts, frame.answer_sep)
                chunk.append(_Item(k, item, prompt, answers, cats[item["image_id"]]))
            if not latency_prompts:
                latency_prompts = chunk[: max(0, latency_items)]
            for v in variants:
                scores = scorer.score(chunk, v)
                for it in chunk:
                    plan = iv.plan_for(it.prompt, it.groups, v.intervention, N)
                    base_plan = iv.plan_for(it.prompt, it.groups, iv.baseline(), N)
                    n_vis, n_kept, per_layer, n_affected = _visual_stats(it.prompt, plan, N)
                    sc = scores[it.index]
                    pred = int(np.argmax(sc))  # first of the maxima
                    records.append({
                        "condition": v.name, "op": v.op, "seed": v.seed, "n_seeds": v.n_seeds,
                        "item_index": it.index, "item_id": it.item.get("item_id"),
                        "image_id": it.item["image_id"],
                        "item_type": str(it.item.get("type")), "answer": it.item["answer"],
                        "pred": it.item["choices"][pred], "correct": it.item["choices"][pred] == it.item["answer"],
                        "n_choices": len(sc), "scores": [float(x) for x in sc],
                        "visual_tokens": n_vis, "tokens_kept": n_kept, "visual_tokens_per_layer": per_layer,
                        "n_affected": n_affected,
                        "flops": _cost.prefill_flops(shape, plan),
                        "flops_baseline": _cost.prefill_flops(shape, base_plan),
                    })
                bar.update(len(chunk))
            # free the captured prompts of this chunk (except the ones kept for timing)
            for it in chunk:
                if not any(it is lp for lp in latency_prompts):
                    it.prompt = None
    finally:
        bar.close()

    timing = {}
    for v in tqdm(variants, desc="latency", unit="cond", disable=not progress):
        seqs = [it.prompt for it in latency_prompts]
        plans = [iv.plan_for(it.prompt, it.groups, v.intervention, N) for it in latency_prompts]
        timing[v.key] = _cost.measure_prefill(model, seqs, plans, repeats=repeats)

    per_item = pd.DataFrame.from_records(records)
    per_item["seed"] = per_item["seed"].astype("Int64")
    meta = {"model": str(model_dir), "dataset": ds.name, "device": str(dev), "dtype": str(dtype)}
    table = aggregate(per_item, variants, timing, meta, n_bootstrap=n_bootstrap, bootstrap_seed=bootstrap_seed)
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(table, out / OUTPUT_FILES["compress"])
    if items_out is not None:
        write_parquet(per_item.assign(**meta), items_out)
    summary = step_summary("compress", {
        "model": meta["model"], "dataset": ds.name,
        "settings": {"n_items": len(items), "seeds": list(seeds), "repeats": repeats,
                     "latency_items": len(latency_prompts), "batch_size": batch_size,
                     "pack_choices": pack_choices, "device": str(dev), "dtype": str(dtype),
                     "preprocess": preprocess, "mode": mode, "conditions_preset": preset,
                     "select_default": "membership", "n_bootstrap": n_bootstrap,
                     "bootstrap_seed": bootstrap_seed},
        "seconds": time.perf_counter() - t0,
        "methods_notes": methods_notes(pack_choices),
        "files": dict(OUTPUT_FILES),
        "conditions": [v.key for v in variants], "best_aligned_layer": best_aligned_layer,
        "nothing_removed": sorted(table.loc[table["nothing_removed"], "condition"].unique().tolist()),
        "answer_prefixes": sorted({f.answer_prefix for f in framings}), "num_layers": N,
        "attn_implementation": adapter.attn_implementation,
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
    })
    write_json(summary, out / OUTPUT_FILES["summary"])
    return table


def methods_notes(pack_choices: bool = True) -> list[dict]:
    """The procedures of this benchmark that are the project's own ([ours], docs/methods.md §5)."""
    from embedlens.analysis.outputs import note

    out = [
        note("reference", "prune_position_ids",
             "prune/keep/random_matched delete visual tokens before layer 0; survivors keep their original "
             "position ids (gaps), as in the reference."),
        note("ours", "mc_scoring",
             "Multiple-choice accuracy: each choice's text (the item's choice_texts, after its answer_prefix, "
             "as eval-model scores them) is appended as token ids to the captured prompt (chat "
             "template + question + answer prefix) and scored by its mean token log-probability under the intervened model; "
             "the best choice is the prediction (ties: the first)."),
        note("ours", "inject_exit_by_layer_subsets",
             "inject(L)/exit(L) run the affected decoder layers on the token subset (hooks gather hidden "
             "states, the layer's mask and rotary tables; absent tokens keep their state), so inject(L) "
             "feeds raw h[0] visual tokens into layer L. Sliding-window layers keep the full sequence's "
             "window positions."),
        note("ours", "random_matched_seeding",
             "random_matched draws per image from sha256(seed, image_id): identical for every question about "
             "an image and independent of batching; when the groups outnumber their complement the whole "
             "complement is deleted."),
        note("ours", "flops_formula",
             "Theoretical prefill FLOPs of the decoder only (2 per multiply-add): QKV/O projections, dense "
             "attention scores and values, gated MLP, by tokens per layer; skip counts the skipped tokens as "
             "keys/values only. skip is implemented by zeroing outputs, so its measured latency does not drop."),
        note("ours", "latency_memory",
             "Latency: batch-1 decoder prefill from the captured merged embeddings (vision tower excluded), "
             "median of repeats after a warm-up, mean over the first prompts. Peak memory: CUDA "
             "max_memory_allocated, on CPU sampled RSS and malloc bytes in use (mallinfo2)."),
        note("reference", "membership_selection",
             "A token group selects every visual token with an anchor id of the group among its top-k "
             "neighbours (membership; groups may overlap, alive = in none), as the reference; a condition with "
             "select: label uses the exclusive first-matching label instead."),
        note("ours", "accuracy_ci",
             "Accuracy CI: Wilson 95 % over items; random_matched condition rows average each item's "
             "correctness over the seeds first (n = items, not items x seeds), sd over seeds beside it."),
        note("ours", "paired_delta",
             "Δ accuracy vs the baseline on the same items: percentile paired bootstrap over items (seeded) and "
             "an exact McNemar p-value for 0/1 outcomes (not for seed means); a targeted condition that removed "
             "or changed no visual token in any image is flagged nothing_removed and gets no Δ."),
    ]
    if pack_choices:
        out.append(note("ours", "choice_packing",
                         "An item's choices share one sequence after a single copy of the prompt, each answer "
                         "masked to see only the prompt and itself, with its own position ids (equal to one "
                         "sequence per choice up to float round-off; not used where a sliding window is "
                         "shorter than the packed sequence)."))
    return out
