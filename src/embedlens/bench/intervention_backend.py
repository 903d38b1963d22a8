"""The real backend of the benchmark model class: any supported VLM, greedy generation under
one intervention on its visual tokens (docs/methods.md §4).

Per request (one image, one question) the backend

1. builds the prompt with the model's own chat template and processor (the adapter's prompt
   rule, as extraction and the log-likelihood benchmark do) and captures the decoder input
   (:func:`embedlens.compress.sequences.capture_sequence`: the vision tower and projector run
   here, once per request for *all* conditions: the capture is cached);
2. categorizes its visual tokens on the fly with the EmbedLens rule (docs/methods.md §1): the
   top-k vocabulary neighbours of ``h[0]`` (cosine, float32, the categorize step's candidate
   rows) and the model's anchor ids → :class:`embedlens.compress.plan.TokenGroups`
   (membership and exclusive label), also cached;
3. plans the current condition's intervention (:func:`embedlens.compress.plan.plan_for`) and
   decodes greedily with a KV cache (:func:`embedlens.compress.generate.generate`).

Conditions are switched with :meth:`InterventionBackend.set_variant` without reloading
anything. Each answer's ``info`` holds what the benchmark's statistics and cost columns need
(visual tokens, targets, tokens kept, FLOPs, seconds).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from embedlens.compress import cost as _cost
from embedlens.compress import interventions as iv
from embedlens.compress.conditions import Variant, parse_conditions
from embedlens.compress.plan import TokenGroups, visual_mask

from .backend import Answer, GenerationRequest

#: the anchor groups of the EmbedLens rule (docs/methods.md §1)
GROUPS = ("vit_sink", "llm_sink", "dead")


def target_count(seq: iv.TokenSequence, plan, num_layers: int) -> int:
    """Visual tokens the condition's plan affects in one image (deleted, skipped in a
    sublayer, absent from a layer, attention cut: :meth:`Plan.visual_counts`, the count the
    compress step uses too). ``keep(alive)`` when every token is alive, ``prune(dead)`` with
    no dead token: 0.

    A condition whose target count is 0 on every image changes nothing: the benchmark flags
    it "nothing removed" instead of scoring it (docs/methods.md §4)."""
    return plan.visual_counts(num_layers, visual_mask(seq, plan.keep.device))[1]


class InterventionBackend:
    """Greedy generation of a local model under one intervention at a time.

    Parameters
    ----------
    model_dir : local model directory (``embedlens.models`` loads it; offline).
    vocab : the model's ``vocab.zarr`` (path, dataset or ``Vocab``): the candidate rows of
        the EmbedLens rule (docs/methods.md §1).
    anchors : group → anchor ids (``vit_sink``, ``llm_sink``, ``dead``; missing = none).
    top_k, exclude_special, exclude_ids, include_ids : the categorize step's settings (the
        same rows and k must be used, or the groups differ from the categorized ones).
    device, dtype : where and in which dtype the model runs (``"auto"`` → CUDA if present).
    batch_size : requests decoded together (right-padded rows; results do not depend on it
        beyond float round-off).
    preprocess : what happens to an image before the processor (`embedlens.models.preprocess`).
    max_cached : captured prompts kept for reuse across conditions (FIFO; memory per entry
        ≈ prompt length × hidden size × 4 bytes).

    Raises
    ------
    ValueError : the model cannot be loaded; anchors name an unknown group or an id outside
        the vocabulary; vocabulary and model hidden sizes differ.
    embedlens.models.parts.UnsupportedModelError, NotImplementedError : a model the
        interventions cannot drive (named, with what is missing).
    """

    name = "embedlens"

    def __init__(self, model_dir, vocab, anchors: Mapping[str, Sequence[int]] | None = None, *,
                 top_k: int = 3, exclude_special: bool = True, exclude_ids: Sequence[int] = (),
                 include_ids: Sequence[int] = (), device: str = "auto", dtype: str = "float32",
                 batch_size: int = 8, preprocess: str = "native", trust_remote_code: bool = False,
                 max_cached: int = 1024):
        from embedlens.analysis.vocab import VocabIndex, excluded_ids, load_vocab
        from embedlens.runtime import resolve_device

        self.device = resolve_device(device)
        self.model, self.processor, self.adapter = iv.load_model(
            model_dir, device=self.device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model_dir = str(model_dir)
        self.num_layers = self.adapter.num_layers
        self.shape = _cost.DecoderShape.from_model(self.model)
        voc = load_vocab(vocab)
        d_model = int(self.model.get_input_embeddings().weight.shape[1])
        if voc.embedding.shape[1] != d_model:
            raise ValueError(f"vocab {vocab}: rows of width {voc.embedding.shape[1]}, but the model "
                             f"{model_dir} has hidden size {d_model}: use the vocab.zarr of the same model")
        self.anchors = {g: [int(i) for i in (anchors or {}).get(g, [])] for g in GROUPS}
        unknown = sorted(set(anchors or {}) - set(GROUPS))
        if unknown:
            raise ValueError(f"anchors: unknown group(s) {unknown}; the groups are {', '.join(GROUPS)}")
        bad = [i for ids in self.anchors.values() for i in ids if not 0 <= i < voc.size]
        if bad:
            raise ValueError(f"anchors: ids {bad[:5]} outside the vocabulary of {voc.size} rows")
        self.top_k = int(top_k)
        self.index = VocabIndex(voc.embedding, exclude=excluded_ids(
            voc, exclude_special=exclude_special, exclude_ids=exclude_ids, include_ids=include_ids),
            device=self.device)
        self.batch_size = max(1, int(batch_size))
        self.preprocess = preprocess
        self.max_cached = int(max_cached)
        self._cache: OrderedDict[tuple, tuple[iv.TokenSequence, TokenGroups]] = OrderedDict()
        self._evicted = False
        tok = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer = tok
        eos = set()
        for src in (getattr(self.model, "generation_config", None), tok):
            e = getattr(src, "eos_token_id", None)
            eos |= set(e if isinstance(e, (list, tuple, set)) else [] if e is None else [e])
        self.eos_token_ids = sorted(int(e) for e in eos)
        self.variant: Variant = parse_conditions([{"name": "baseline", "op": "baseline"}], self.num_layers)[0]

    # ---------------------------------------------------------------- conditions
    def set_variant(self, variant: Variant) -> None:
        """Decode the following requests under `variant` (a parsed condition)."""
        self.variant = variant

    # ---------------------------------------------------------------- per request
    def _key(self, r: GenerationRequest) -> tuple:
        return (r.task, str(r.doc_id), r.text)

    @torch.inference_mode()
    def prepare(self, r: GenerationRequest) -> tuple[iv.TokenSequence, TokenGroups]:
        """The captured prompt and its visual token groups for one request (cached).

        Raises
        ------
        NotImplementedError : a request with no image or several images (the interventions
            address the visual tokens of one image).
        """
        from embedlens import vqa
        from embedlens.models.preprocess import preprocess_images

        key = self._key(r)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if len(r.images) != 1:
            raise NotImplementedError(
                f"task {r.task!r} doc {r.doc_id}: {len(r.images)} images; the benchmark's interventions "
                "address the visual tokens of exactly one image per question")
        (image,) = preprocess_images([r.images[0]], self.processor, self.preprocess)
        inputs = vqa.prepare_prompt(self.processor, image, r.text, prompt_fn=self.adapter.format_prompt)
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        seq = iv.capture_sequence(self.model, inputs, f"{r.task}/{r.doc_id}")
        h0 = seq.embeds[seq.visual_pos].float()
        ids, _ = self.index.search(h0, self.top_k)
        groups = TokenGroups.from_topk(ids, self.anchors)
        if len(self._cache) >= self.max_cached:
            self._cache.popitem(last=False)
            self._evicted = True
        self._cache[key] = (seq, groups)
        return seq, groups

    def targets(self, requests: Sequence[GenerationRequest], variant: Variant) -> list[int]:
        """Per request, the visual tokens `variant` acts on (:func:`target_count`)."""
        out = []
        for r in requests:
            seq, groups = self.prepare(r)
            plan = iv.plan_for(seq, groups, variant.intervention, self.num_layers)
            out.append(target_count(seq, plan, self.num_layers))
        return out

    def cached_targets_empty(self, variant: Variant) -> bool:
        """Whether `variant` acts on no visual token of any request seen so far (after the
        baseline ran every request: on none of the benchmark's images). False when nothing
        is cached or the cache no longer holds every request (then the condition runs)."""
        if not self._cache or self._evicted:
            return False
        for seq, groups in self._cache.values():
            plan = iv.plan_for(seq, groups, variant.intervention, self.num_layers)
            if target_count(seq, plan, self.num_layers):
                return False
        return True

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Answer]:
        """Greedy answers to `requests` under the current variant, in request order."""
        from embedlens.compress.generate import generate

        answers: list[Answer] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = list(requests[start:start + self.batch_size])
            prepared = [self.prepare(r) for r in chunk]
            seqs = [p[0] for p in prepared]
            plans = [iv.plan_for(s, g, self.variant.intervention, self.num_layers) for s, g in prepared]
            t0 = time.perf_counter()
            gen = generate(self.model, seqs, plans, max_new_tokens=[max(1, int(r.max_new_tokens)) for r in chunk],
                           eos_token_ids=self.eos_token_ids)
            seconds = time.perf_counter() - t0
            base = iv.baseline()
            for r, (seq, groups), plan, toks, done in zip(chunk, prepared, plans, gen.tokens, gen.finished):
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                kept, affected = plan.visual_counts(self.num_layers, visual_mask(seq, plan.keep.device))
                answers.append(Answer(text=text, info={
                    "condition": self.variant.name, "seed": self.variant.seed,
                    "visual_tokens": seq.n_visual,
                    "target_tokens": affected, "tokens_kept": kept,
                    "flops": _cost.prefill_flops(self.shape, plan),
                    "flops_baseline": _cost.prefill_flops(
                        self.shape, iv.plan_for(seq, groups, base, self.num_layers)),
                    "new_tokens": len(toks), "stopped_by_eos": bool(done),
                    "batch_seconds": seconds, "batch_size": len(chunk),
                    "prefill_seconds": gen.prefill_seconds, "decode_seconds": gen.decode_seconds,
                }))
        return answers


def load_anchors(anchors_dir=None, configured: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    """The model's anchor ids: the anchors step's document (``anchors.json``), with the
    configured ids winning per group (as categorize uses them).

    Raises
    ------
    embedlens.analysis.outputs.SummaryError : `anchors_dir` holds no anchors step.
    """
    out = {g: [] for g in GROUPS}
    if anchors_dir is not None:
        from embedlens.analysis.model_anchors import anchors_document

        doc = anchors_document(anchors_dir)
        for g in GROUPS:
            out[g] = [int(i) for i in (doc.get("anchors") or {}).get(g, [])]
    for g, ids in (configured or {}).items():
        out[g] = [int(i) for i in ids]
    return out


def from_model_args(model_dir: str, vocab: str, anchors: str | None = None, anchors_dir: str | None = None,
                    condition: str | None = None, **kwargs: Any) -> InterventionBackend:
    """An :class:`InterventionBackend` from lmms-eval ``--model_args`` strings, for
    ``lmms-eval eval --model embedlens --model_args model_dir=...,vocab=...,condition=...``.

    `anchors`: JSON ``{"dead": [30296], ...}``; `anchors_dir`: an anchors step directory;
    `condition`: one condition as JSON (``{"op": "prune", "groups": ["dead"]}``; default the
    baseline). Numeric keywords (``top_k``, ``batch_size``) may come as strings.

    Raises
    ------
    ValueError : a malformed JSON argument or condition (named).
    """
    def _json(name, value):
        try:
            return json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as e:
            raise ValueError(f"--model_args {name}={value!r} is not JSON: {e}") from None

    for k in ("top_k", "batch_size", "max_cached"):
        if k in kwargs:
            kwargs[k] = int(kwargs[k])
    backend = InterventionBackend(model_dir, vocab, load_anchors(anchors_dir, _json("anchors", anchors)), **kwargs)
    if condition is not None:
        cond = _json("condition", condition)
        variants = parse_conditions([cond], backend.num_layers)
        if len(variants) != 1:
            raise ValueError(f"--model_args condition={condition!r}: give one seed for random_matched")
        backend.set_variant(variants[0])
    return backend


__all__ = ["GROUPS", "InterventionBackend", "from_model_args", "load_anchors", "target_count"]
