"""Multiple-choice VQA scoring by length-normalized answer log-likelihood.

Shared by ``eval-model`` (``embedlens.mini.evaluate``) and the compression benchmark
(methods §4): for one image, a question and its choices, the score of a choice is the mean
log-probability of its tokens after the prompt (chat template's user turn with the image and
the question, the generation prompt, then an optional ``answer_prefix``); the prediction is
the highest-scoring choice (ties → the first). Works for any HF VLM + processor; it is
deterministic (no sampling; ``model.eval()``, no dropout).

Two evaluation modes, same numbers up to float round-off:

* ``"cached"`` (default): one prefill of the prompt, then all choices in one batched
  continuation over a copy of the KV cache (fast: the image is encoded once per item).
* ``"full"``: one complete forward (prompt + choice, with the image) per choice. Slower,
  but every forward is an ordinary prefill — use it when hooks act on prefills only.

Answer tokens are the tokenizer's ids of ``answer_sep + choice`` appended to the prompt's
ids (no re-tokenization across the boundary), so every choice is scored in the same context.

A VQA item may carry its own answer phrasing (:func:`item_framing`): ``answer_prefix``
("It is") and ``choice_texts`` ("a red letter" for the choice "red"). Both ``eval-model``
and the compression benchmark take the framing from the item, so they score it alike.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

# The prompt format and the image token id are the model's (embedlens.models): the same rule
# as VLMAdapter.format_prompt, re-exported here for callers that format VQA prompts.
from embedlens.models.parts import find_image_token_id
from embedlens.models.prompt import format_prompt  # noqa: F401 - re-exported


@dataclass
class ChoiceScores:
    choices: list[str]
    logprob_sum: list[float]  # total log-likelihood of each choice's tokens
    n_tokens: list[int]
    scores: list[float]  # length-normalized: logprob_sum / n_tokens
    pred_index: int

    @property
    def pred(self) -> str:
        return self.choices[self.pred_index]

    def to_dict(self) -> dict:
        return asdict(self) | {"pred": self.pred}


class PrefixCache:
    """Reuse the prefill of the prompt part up to the image across queries on ONE image.

    Prompts for different questions about the same image share everything up to and
    including the image tokens (system turn, user turn opening, image); with causal attention
    that part's keys/values do not depend on the question. Pass one ``PrefixCache`` per image
    to :func:`score_choices` (``mode="cached"``): the first call fills it, later calls check
    that their prompt starts with the same ids and has the same pixels, and only run the rest. Used only for models
    whose image enters through image-token positions (LLaVA style: ``config.image_token_id``);
    otherwise it is ignored. The scores equal those without it up to float round-off.
    """

    def __init__(self):
        self.ids: torch.Tensor | None = None  # (L,) prefix ids
        self.pixels: torch.Tensor | None = None  # the image it was computed for
        self.kv = None
        self.hits = 0


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _log_softmax_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def prepare_prompt(processor, image, question: str, answer_prefix: str = "",
                   prompt_fn: Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
    """Processor tensors for the prompt (+ ``answer_prefix``) with one image (batch of 1):
    ``input_ids`` (1, P) and the processor's image tensors.

    ``prompt_fn`` formats the question (pass ``VLMAdapter.format_prompt`` for the
    architecture's placeholder); the default is :func:`embedlens.models.prompt.format_prompt`
    with the generic placeholder.
    """
    text = (prompt_fn or (lambda q: format_prompt(processor, q)))(question) + answer_prefix
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    batch = processor(images=[[image]], text=[text], return_tensors="pt")
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}


def choice_token_ids(processor, choices: Sequence[str], answer_sep: str = "") -> list[list[int]]:
    """Token ids of ``answer_sep + choice`` for each choice (no special tokens).

    Raises:
        ValueError: a choice tokenizes to nothing.
    """
    tok = _tokenizer(processor)
    out = []
    for c in choices:
        ids = tok(answer_sep + c, add_special_tokens=False)["input_ids"]
        if len(ids) == 0:
            raise ValueError(f"choice {c!r} tokenizes to nothing")
        out.append(list(ids))
    return out


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


@torch.no_grad()
def score_choices(model, processor, image, question: str, choices: Sequence[str], *,
                  answer_prefix: str = "", answer_sep: str = "", mode: str = "cached",
                  prompt_fn: Callable[[str], str] | None = None,
                  prefix_cache: PrefixCache | None = None) -> ChoiceScores:
    """Length-normalized log-likelihood of each of ``choices`` as the answer to ``question``.

    ``answer_prefix`` is appended to the prompt text (context, not scored), e.g.
    ``"The shape is"``; ``answer_sep`` is prepended to every choice before tokenizing it,
    e.g. ``" "`` so that ``" red"`` is one word token after the prefix.
    """
    if not choices:
        raise ValueError("score_choices: no choices")
    if mode not in ("cached", "full"):
        raise ValueError(f"score_choices: mode must be 'cached' or 'full', got {mode!r}")
    dev = _device(model)
    inputs = {k: v.to(dev) for k, v in prepare_prompt(processor, image, question, answer_prefix, prompt_fn).items()}
    answers = choice_token_ids(processor, choices, answer_sep)
    if mode == "full":
        sums = [_full_choice_logprob(model, inputs, a) for a in answers]
    else:
        sums = _cached_choice_logprobs(model, inputs, answers, prefix_cache)
    n = [len(a) for a in answers]
    scores = [s / k for s, k in zip(sums, n, strict=True)]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return ChoiceScores(list(choices), sums, n, scores, best)


def _extend_inputs(inputs: Mapping[str, torch.Tensor], extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """Append token ids ``extra`` (1, A) to a batch-1 prompt, extending per-token tensors."""
    out = dict(inputs)
    ids = inputs["input_ids"]
    P = ids.shape[1]
    out["input_ids"] = torch.cat([ids, extra], dim=1)
    for k, v in inputs.items():
        if k == "input_ids" or not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape != (1, P):
            continue
        if k == "attention_mask":
            fill = torch.ones_like(extra)
        elif k.endswith("token_type_ids"):
            fill = torch.zeros_like(extra)  # text tokens
        else:
            continue
        out[k] = torch.cat([v, fill.to(v.dtype)], dim=1)
    return out


def _full_choice_logprob(model, inputs: Mapping[str, torch.Tensor], answer: list[int]) -> float:
    dev = inputs["input_ids"].device
    P = inputs["input_ids"].shape[1]
    a = torch.tensor([answer], dtype=torch.long, device=dev)
    kw = _extend_inputs(inputs, a)
    if _accepts(model, "use_cache"):
        kw["use_cache"] = False
    logits = model(**kw).logits[0]  # (P + A, V)
    lp = _log_softmax_at(logits[P - 1:P - 1 + len(answer)], a[0])
    return float(lp.sum())


def _prefill(model, inputs: Mapping[str, torch.Tensor], prefix_cache: PrefixCache | None):
    """``model(**inputs, use_cache=True)``, reusing ``prefix_cache`` for the part up to the image."""
    ids = inputs["input_ids"]
    image_id = find_image_token_id(getattr(model, "config", None))
    usable = (prefix_cache is not None and image_id is not None and ids.shape[0] == 1
              and set(inputs) <= {"input_ids", "attention_mask", "pixel_values"}
              and bool((inputs.get("attention_mask", torch.ones_like(ids)) == 1).all()))
    if not usable:
        return model(**inputs, use_cache=True)
    pos = (ids[0] == image_id).nonzero().flatten()
    if len(pos) == 0:
        return model(**inputs, use_cache=True)
    L = int(pos[-1]) + 1
    pixels = inputs.get("pixel_values")
    same = (prefix_cache.ids is not None and len(prefix_cache.ids) == L and torch.equal(prefix_cache.ids, ids[0, :L])
            and ((pixels is None and prefix_cache.pixels is None)
                 or (pixels is not None and prefix_cache.pixels is not None
                     and pixels.shape == prefix_cache.pixels.shape and torch.equal(pixels, prefix_cache.pixels))))
    if not same:
        pre = {"input_ids": ids[:, :L], "attention_mask": torch.ones_like(ids[:, :L])}
        if "pixel_values" in inputs:
            pre["pixel_values"] = inputs["pixel_values"]
        prefix_cache.kv = model(**pre, use_cache=True).past_key_values
        prefix_cache.ids = ids[0, :L].clone()
        prefix_cache.pixels = None if pixels is None else pixels.clone()
    else:
        prefix_cache.hits += 1
    if L == ids.shape[1]:  # nothing after the image: recompute the last position's logits
        return model(**inputs, use_cache=True)
    kw: dict[str, Any] = {"input_ids": ids[:, L:], "attention_mask": torch.ones_like(ids),
                          "past_key_values": copy.deepcopy(prefix_cache.kv), "use_cache": True}
    if _accepts(model, "cache_position"):
        kw["cache_position"] = torch.arange(L, ids.shape[1], device=ids.device)
    return model(**kw)


def _cached_choice_logprobs(model, inputs: Mapping[str, torch.Tensor], answers: list[list[int]],
                            prefix_cache: PrefixCache | None = None) -> list[float]:
    dev = inputs["input_ids"].device
    P = inputs["input_ids"].shape[1]
    out = _prefill(model, inputs, prefix_cache)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts answer token 0
    sums = [float(first[a[0]]) for a in answers]
    multi = [i for i, a in enumerate(answers) if len(a) > 1]
    if not multi:
        return sums
    cache = copy.deepcopy(out.past_key_values)
    B = len(multi)
    if B > 1:
        cache.batch_repeat_interleave(B)
    L = max(len(answers[i]) for i in multi)
    pad = 0
    ids = torch.full((B, L), pad, dtype=torch.long, device=dev)
    amask = torch.zeros((B, P + L), dtype=torch.long, device=dev)
    base_mask = inputs.get("attention_mask")
    amask[:, :P] = base_mask.expand(B, -1) if base_mask is not None else 1
    for j, i in enumerate(multi):
        a = answers[i]
        ids[j, :len(a)] = torch.tensor(a, device=dev)
        amask[j, P:P + len(a)] = 1
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": amask, "past_key_values": cache, "use_cache": True}
    if _accepts(model, "cache_position"):
        kw["cache_position"] = torch.arange(P, P + L, device=dev)
    logits = model(**kw).logits  # (B, L, V): position t predicts answer token t + 1
    lps = torch.log_softmax(logits.float(), dim=-1)
    for j, i in enumerate(multi):
        a = answers[i]
        tail = lps[j, :len(a) - 1].gather(-1, torch.tensor(a[1:], device=dev).unsqueeze(-1)).sum()
        sums[i] += float(tail)
    return sums


@dataclass(frozen=True)
class Framing:
    """What is scored for one VQA item: ``prompt + answer_prefix``, then ``answer_sep + text``
    for each of ``choice_texts`` (one per choice, same order)."""

    answer_prefix: str
    choice_texts: list[str]
    answer_sep: str


def item_framing(item: Mapping[str, Any]) -> Framing:
    """The answer phrasing of a VQA item ``{question, choices, answer, answer_prefix?,
    choice_texts?}``: without a prefix the bare choices follow the generation prompt; with
    one, each choice text follows it after a space ("It is" + " a red letter")."""
    choices = list(item["choices"])
    prefix = str(item.get("answer_prefix") or "")
    texts = list(item.get("choice_texts") or choices)
    if len(texts) != len(choices):
        raise ValueError(f"VQA item {item.get('item_id')!r}: {len(texts)} choice_texts for "
                         f"{len(choices)} choices")
    sep = " " if prefix and not prefix[-1].isspace() else ""
    return Framing(prefix, texts, sep)


def score_item(model, processor, image, item: Mapping[str, Any], **kw) -> dict[str, Any]:
    """Score one VQA item (framed by :func:`item_framing`) → a result row; ``pred`` is one of
    the item's ``choices``."""
    f = item_framing(item)
    cs = score_choices(model, processor, image, item["question"], f.choice_texts,
                       answer_prefix=f.answer_prefix, answer_sep=f.answer_sep, **kw)
    answer = item.get("answer")
    pred = item["choices"][cs.pred_index]
    return {
        "item_id": item.get("item_id"), "image_id": item.get("image_id"), "type": item.get("type"),
        "question": item["question"], "answer": answer, "pred": pred,
        "correct": bool(answer is not None and pred == answer),
        "n_choices": len(cs.choices), "scores": [round(s, 4) for s in cs.scores],
    }


def accuracy_table(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per item type: n, accuracy, chance (mean 1 / n_choices) and binomial standard error."""
    by: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by.setdefault(str(r.get("type")), []).append(r)
    table = {}
    for t, rs in sorted(by.items()):
        n = len(rs)
        acc = sum(bool(r["correct"]) for r in rs) / n
        chance = sum(1.0 / r["n_choices"] for r in rs) / n
        table[t] = {"n": n, "accuracy": acc, "chance": chance,
                    "se": math.sqrt(max(acc * (1 - acc), 1e-12) / n),
                    "chance_se": math.sqrt(chance * (1 - chance) / n),
                    "x_chance": acc / chance if chance else float("nan")}
    return table
