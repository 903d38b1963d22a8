"""Interventions on the visual tokens of a VLM's prefill (methods.md §4), through hooks.

Nothing here copies model code. An intervened forward pass is the model's own forward,
called in the standard transformers way, plus

* **sequence rebuilding** before layer 0 (``prune``, ``keep``, ``random_matched``): the
  merged input embeddings are taken from the model itself (a forward pre-hook on the
  language model captures ``inputs_embeds`` and ``position_ids`` exactly as the model's
  own image merge built them, then stops the pass), rows are removed, and the model is
  called with ``inputs_embeds``, the surviving tokens' *original* ``position_ids`` (gaps
  stay, as in the reference) and an explicit 2-D attention mask. The explicit mask is
  required: without it transformers reads position-id jumps as packed sequences and would
  split the sequence at every gap;
* **forward hooks on the ``self_attn`` / ``mlp`` submodules** of the decoder layers
  (``skip``): the sublayer output of the chosen tokens is zeroed, so their residual
  update is zero, while their keys and values are still computed and attended to;
* **forward pre-hooks + forward hooks on whole decoder layers** (``inject``, ``exit``):
  for the affected layers the pre-hook hands the layer only the tokens that take part
  (hidden states, the layer's 4-D attention mask, rotary ``position_embeddings`` and
  ``position_ids`` gathered to that subset), and the forward hook scatters the layer's
  output back into the full sequence, leaving the absent tokens' hidden states
  untouched. So ``inject(L)``: text runs alone through layers ``0..L-1`` while the visual
  rows keep ``h[0]``, which is what enters layer ``L``; ``exit(L)``: visual tokens are
  absent from layer ``L`` on (their last state is never read again);
* **forward pre-hooks restricting every layer's attention mask** for sequences built by
  :func:`pack_choices` (several answers after one copy of the prompt, each answer seeing
  only the prompt and itself: prefix sharing for scoring without a KV cache).

The decoder is found generically (``model.get_decoder()``, whose ``layers`` ModuleList
holds the decoder layers; ``self_attn``/``mlp`` or the children whose class names say
Attention/MLP).

Supported architectures
-----------------------
Every ``*ForConditionalGeneration`` whose decoder layers take ``(hidden_states, *,
attention_mask, position_embeddings, position_ids)`` and whose image tokens are marked by
``config.image_token_id``: tested on tiny LLaVA, LLaVA-NeXT (Mistral), Gemma 3, Idefics3
(SmolVLM), PaliGemma (1-D RoPE) and Qwen2-VL / Qwen2.5-VL (3-D M-RoPE: the captured
``(3, S)`` position ids are carried through every operation). Requirements checked at run
time, each with a clear error: the attention implementation must be ``sdpa`` or ``eager``
(flash-attention reads position-id gaps as packed sequences; :func:`load_model` asks for
``sdpa``), and no layer may use a KV cache (prefill only). Recurrent/linear-attention
decoders (no 4-D mask to restrict) raise ``NotImplementedError`` naming the class.

Limits
------
* Prefill only: one complete forward per sequence, no KV cache.
* One intervention per pass (the plan/forward machinery composes a rebuild with skip or
  absent tokens, but conditions name a single op).
* Sliding-window layers (Gemma 3, Mistral with a window): a rebuilt sequence (``prune``)
  gets the model's own mask, whose window counts positions in the *shortened* sequence,
  while ``inject``/``exit`` restrict the full sequence's mask, whose window counts the
  original positions. The two agree whenever the window covers the prompt (real Gemma 3:
  512-1024 tokens); the tiny test model's window of 8 shows the difference.
* Per-head (``(B, H, S, S)``) masks and flash/flex attention are refused with an error.

Token groups
------------
A visual token's group is its categorize label (``vit_sink``, ``llm_sink``, ``dead``,
``alive``; methods.md §1, the label is the first matching group, so groups partition the
visual tokens). Aliases: ``sink``/``sinks`` = ``vit_sink`` + ``llm_sink``; ``visual``/``all``
= every visual token. Visual token ``j`` of an image is the ``j``-th position (in sequence
order) whose input id is the model's image token id, the same order as the store's
``token`` coordinate.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

LABELS = ("vit_sink", "llm_sink", "dead", "alive")
GROUP_ALIASES = {
    "sink": ("vit_sink", "llm_sink"),
    "sinks": ("vit_sink", "llm_sink"),
    "visual": LABELS,
    "all": LABELS,
}
OPS = ("baseline", "prune", "keep", "random_matched", "skip", "inject", "exit")

# model_type -> value of `token_type_ids` for appended answer tokens. PaliGemma's prefix
# (image + prompt) attends bidirectionally and only tokens with token_type_ids == 1 (the
# "suffix") are causal; an answer appended with the prefix's 0 would let every answer token
# see the answer tokens after it, so its log-likelihood would be meaningless. Everywhere
# else appended text gets 0 (Gemma 3: 1 marks image tokens; Qwen: 0 = text).
_ANSWER_TOKEN_TYPE = {"paligemma": 1}


# =========================================================================== specification
def resolve_groups(groups: Iterable[str]) -> frozenset[str]:
    """Group names (labels or aliases) -> the set of labels they cover."""
    out: set[str] = set()
    for g in groups:
        if g in LABELS:
            out.add(g)
        elif g in GROUP_ALIASES:
            out.update(GROUP_ALIASES[g])
        else:
            raise ValueError(
                f"unknown token group {g!r}; choose from {', '.join(LABELS)} "
                f"or the aliases {', '.join(GROUP_ALIASES)}"
            )
    return frozenset(out)


@dataclass(frozen=True)
class Intervention:
    """One intervention (methods.md §4). Build with the functions below."""

    op: str
    groups: tuple[str, ...] = ()
    seed: int | None = None
    sublayers: tuple[float, ...] = ()  # skip: n = attention of layer n, n + 0.5 = MLP
    layer: int | None = None  # inject / exit

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown intervention {self.op!r}; choose from {', '.join(OPS)}")
        resolve_groups(self.groups)
        for s in self.sublayers:
            if not (float(s) * 2).is_integer() or s < 0:
                raise ValueError(f"sublayer {s!r}: use n (attention of layer n) or n + 0.5 (MLP)")
        if self.op in ("inject", "exit") and (self.layer is None or self.layer < 0):
            raise ValueError(f"{self.op} needs a layer >= 0, got {self.layer!r}")
        if self.op == "random_matched" and self.seed is None:
            raise ValueError("random_matched needs a seed")

    @property
    def labels(self) -> frozenset[str]:
        return resolve_groups(self.groups)

    def describe(self) -> str:
        g = "+".join(self.groups)
        if self.op == "baseline":
            return "baseline"
        if self.op in ("prune", "keep"):
            return f"{self.op}({g})"
        if self.op == "random_matched":
            return f"random_matched({g}, seed={self.seed})"
        if self.op == "skip":
            return f"skip({g}, {list(self.sublayers)})"
        return f"{self.op}({self.layer})"


def baseline() -> Intervention:
    return Intervention("baseline")


def prune(groups: Sequence[str]) -> Intervention:
    """Delete the visual tokens of `groups` before layer 0 (original position ids kept)."""
    return Intervention("prune", tuple(groups))


def keep(groups: Sequence[str]) -> Intervention:
    """Keep only the visual tokens of `groups` (the complement of :func:`prune`)."""
    return Intervention("keep", tuple(groups))


def random_matched(groups: Sequence[str], seed: int) -> Intervention:
    """Per image, delete as many randomly chosen visual tokens from the *complement* of
    `groups` as `groups` hold (the reference's matched-size control).

    An image whose groups are empty loses nothing. The reference deletes every visual
    token in that case (its index selection degenerates on an empty set); that is a bug
    of the control, not a property of it, and this project fixes it (reported as a
    deviation). When the complement is smaller than the groups, all of it is deleted.
    The choice is a function of (seed, image_id) only, so it is the same for every
    question about an image, in any batch and any order.
    """
    return Intervention("random_matched", tuple(groups), seed=int(seed))


def skip(groups: Sequence[str], sublayers: Iterable[float]) -> Intervention:
    """Zero the residual update of `sublayers` for the tokens of `groups` (prefill).

    Sublayer ``n`` is the attention of decoder layer ``n`` (0-based), ``n + 0.5`` its MLP.
    The tokens still provide keys and values to the others.
    """
    subs = tuple(sorted({float(s) for s in sublayers}))
    return Intervention("skip", tuple(groups), sublayers=subs)


def inject(layer: int) -> Intervention:
    """Visual tokens bypass layers ``< layer``: the text runs alone through them, and the raw
    ``h[0]`` visual tokens join at their positions at the input of `layer`.
    ``inject(0)`` is the baseline; ``inject(num_layers)`` never lets the text see them."""
    return Intervention("inject", ("visual",), layer=int(layer))


def exit(layer: int) -> Intervention:  # noqa: A001 - the name methods.md §4 uses
    """All visual tokens are dropped at the input of `layer` (absent from it on).
    ``exit(num_layers)`` is the baseline; ``exit(0)`` equals pruning every visual token."""
    return Intervention("exit", ("visual",), layer=int(layer))


exit_at = exit  # for callers that prefer not to shadow the builtin


def sublayers_for(kind: str, layers: Iterable[int]) -> tuple[float, ...]:
    """``"attn" | "mlp" | "both"`` over `layers` -> the sublayer numbers of :func:`skip`."""
    offs = {"attn": (0.0,), "mlp": (0.5,), "both": (0.0, 0.5)}
    if kind not in offs:
        raise ValueError(f"sublayers must be 'attn', 'mlp', 'both' or a list of numbers, got {kind!r}")
    return tuple(sorted(float(n) + o for n in layers for o in offs[kind]))


# =========================================================================== model access
def decoder_of(model) -> torch.nn.Module:
    """The language model (decoder stack) of a VLM: the module with the ``layers`` list."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or not isinstance(getattr(dec, "layers", None), torch.nn.ModuleList):
        raise NotImplementedError(
            f"{type(model).__name__}: cannot find the decoder layers (get_decoder().layers); "
            "this architecture is not supported by the compression benchmark"
        )
    return dec


def decoder_layers(model) -> torch.nn.ModuleList:
    return decoder_of(model).layers


def _find_child(layer: torch.nn.Module, attr: str, words: tuple[str, ...]) -> torch.nn.Module:
    mod = getattr(layer, attr, None)
    if isinstance(mod, torch.nn.Module):
        return mod
    for _, child in layer.named_children():
        if any(w in type(child).__name__ for w in words):
            return child
    raise NotImplementedError(
        f"{type(layer).__name__}: no {attr!r} submodule (nor a child named like {words}); "
        "skip() cannot hook this architecture"
    )


def attention_of(layer: torch.nn.Module) -> torch.nn.Module:
    return _find_child(layer, "self_attn", ("Attention",))


def mlp_of(layer: torch.nn.Module) -> torch.nn.Module:
    return _find_child(layer, "mlp", ("MLP", "FeedForward", "Mlp"))


def image_token_id(model) -> int:
    cfg = model.config
    for key in ("image_token_id", "image_token_index"):
        v = getattr(cfg, key, None)
        if v is not None:
            return int(v)
    raise NotImplementedError(f"{type(model).__name__}: the config names no image token id")


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def attn_implementation(model) -> str:
    impl = getattr(text_config(model), "_attn_implementation", None) or getattr(
        model.config, "_attn_implementation", "eager"
    )
    return str(impl)


def check_supported(model) -> None:
    """Raise a clear error for a model these hooks cannot drive faithfully."""
    decoder_of(model)
    image_token_id(model)
    impl = attn_implementation(model)
    if impl not in ("sdpa", "eager"):
        raise NotImplementedError(
            f"{type(model).__name__} uses attn_implementation={impl!r}; the interventions need "
            "'sdpa' or 'eager' (flash-attention kernels read position-id gaps as packed "
            "sequences and take no 4-D mask). Load with attn_implementation='sdpa'."
        )
    types = getattr(text_config(model), "layer_types", None) or ()
    odd = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise NotImplementedError(
            f"{type(model).__name__}: decoder layer types {odd} have no attention mask to "
            "restrict; interventions are not supported for this architecture"
        )


def load_model(model_dir, *, device="cpu", dtype="float32", trust_remote_code=False):
    """(model, processor, adapter) from a local directory, through the project's
    :class:`~embedlens.models.adapter.VLMAdapter` (same loading, processor and prompt rules
    as extraction), with the ``sdpa`` attention the hooks need (``eager`` as a fallback)."""
    from embedlens.models.adapter import VLMAdapter

    try:
        adapter = VLMAdapter.load(model_dir, dtype=dtype, device=device,
                                  trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    except (ValueError, ImportError) as exc:
        msg = str(exc).lower()
        if "sdpa" not in msg and "scaled_dot_product" not in msg:
            raise
        adapter = VLMAdapter.load(model_dir, dtype=dtype, device=device,
                                  trust_remote_code=trust_remote_code, attn_implementation="eager")
    adapter.model.eval()
    check_supported(adapter.model)
    return adapter.model, adapter.processor, adapter


# =========================================================================== sequences
@dataclass
class TokenSequence:
    """One LLM input sequence as the model's own image merge built it.

    ``embeds`` (S, d): the decoder input (``inputs_embeds`` handed to the language model);
    ``position_ids`` (R, S): R = 1 for 1-D RoPE, 3 (or 4) for Qwen's M-RoPE;
    ``fields``: per-token model inputs besides ids and mask (``token_type_ids`` ...), (S,);
    ``visual_pos`` (n_vis,): sequence indices of the visual tokens, in order;
    ``branch`` (S,) or None: for sequences built by :func:`pack_choices`, -1 on the shared
    prompt and i on the tokens of answer i (answers see the prompt and themselves only).
    """

    image_id: str
    input_ids: torch.Tensor
    embeds: torch.Tensor
    position_ids: torch.Tensor
    fields: dict[str, torch.Tensor]
    visual_pos: torch.Tensor
    branch: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_visual(self) -> int:
        return int(self.visual_pos.shape[0])

    def extend(self, ids: torch.Tensor, embeds: torch.Tensor, field_values: dict[str, int]) -> TokenSequence:
        """This sequence with text tokens `ids` (already embedded) appended; their position
        ids continue from the last token (+1 per token, on every M-RoPE row, which is what
        the models assign to text after the last image)."""
        if self.branch is not None:
            raise ValueError("cannot extend a packed sequence")
        n = int(ids.shape[0])
        step = torch.arange(1, n + 1, dtype=self.position_ids.dtype, device=self.position_ids.device)
        pos = torch.cat([self.position_ids, self.position_ids[:, -1:] + step[None]], dim=1)
        fields = {
            k: torch.cat([v, torch.full((n,), field_values.get(k, 0), dtype=v.dtype, device=v.device)])
            for k, v in self.fields.items()
        }
        return TokenSequence(
            image_id=self.image_id,
            input_ids=torch.cat([self.input_ids, ids.to(self.input_ids)]),
            embeds=torch.cat([self.embeds, embeds.to(self.embeds)]),
            position_ids=pos,
            fields=fields,
            visual_pos=self.visual_pos,
        )


class _Captured(Exception):
    def __init__(self, kwargs):
        super().__init__("captured")
        self.kwargs = kwargs


def _forward_params(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


@torch.inference_mode()
def capture_sequence(model, inputs: dict, image_id: str) -> TokenSequence:
    """Run the model's own input preparation (embedding, vision tower, projector, image
    merge, position ids) for one prompt (batch of 1) and return the decoder input.

    A forward pre-hook on the language model records its keyword arguments and aborts the
    pass, so the decoder never runs here.
    """
    ids = inputs["input_ids"]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"capture_sequence takes a batch of one prompt, got input_ids {tuple(ids.shape)}")
    dec = decoder_of(model)

    def hook(module, args, kwargs):
        raise _Captured(kwargs)

    h = dec.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except _Captured as c:
        kw = c.kwargs
    else:  # pragma: no cover - the hook always fires
        raise RuntimeError("the language model was never called")
    finally:
        h.remove()
    if any(v is not None for k, v in kw.items() if "deepstack" in k):
        # Qwen3-VL's DeepStack adds vision features inside early decoder layers; a re-run on
        # the captured inputs_embeds would silently drop them, so every score would be wrong.
        raise NotImplementedError(
            f"{type(model).__name__} injects vision features inside its decoder (DeepStack: "
            f"{', '.join(k for k in kw if 'deepstack' in k)}); the compression benchmark cannot "
            "replay that yet: leave this model out of compress (extraction works)")
    embeds = kw.get("inputs_embeds")
    if embeds is None:
        raise NotImplementedError(
            f"{type(model).__name__} calls its language model without inputs_embeds; "
            "the image merge cannot be captured"
        )
    S = ids.shape[1]
    if embeds.shape[:2] != (1, S):
        raise NotImplementedError(
            f"{type(model).__name__}: decoder input has shape {tuple(embeds.shape)}, expected "
            f"(1, {S}, d); sequences that change length inside the model are not supported"
        )
    pos = kw.get("position_ids")
    if pos is None:  # the decoder's default: 0..S-1
        pos = torch.arange(S, device=embeds.device)[None]
    elif pos.ndim == 2:  # (1, S)
        pos = pos.expand(1, S)
    elif pos.ndim == 3:  # (R, 1, S): M-RoPE
        pos = pos[:, 0, :]
    else:
        raise NotImplementedError(f"position_ids of shape {tuple(pos.shape)} are not supported")
    params = _forward_params(model)
    fields = {
        k: v[0]
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor)
        and k not in ("input_ids", "attention_mask", "position_ids")
        and k in params
        and v.shape == ids.shape
    }
    vis = (ids[0] == image_token_id(model)).nonzero().flatten()
    return TokenSequence(
        image_id=image_id,
        input_ids=ids[0].clone(),
        embeds=embeds[0].detach().clone(),
        position_ids=pos.detach().clone().long(),
        fields={k: v.clone() for k, v in fields.items()},
        visual_pos=vis,
    )


def answer_field_values(model) -> dict[str, int]:
    """Per-token field values for text appended after the prompt (see _ANSWER_TOKEN_TYPE)."""
    mt = getattr(model.config, "model_type", "")
    return {"token_type_ids": _ANSWER_TOKEN_TYPE[mt]} if mt in _ANSWER_TOKEN_TYPE else {}


@torch.inference_mode()
def append_text(model, seq: TokenSequence, ids: Sequence[int] | torch.Tensor) -> TokenSequence:
    """`seq` with text token ids appended, embedded by the model's own input embeddings."""
    t = torch.as_tensor(ids, dtype=torch.long, device=seq.input_ids.device)
    emb = model.get_input_embeddings()(t.to(model.device)).to(seq.embeds)
    return seq.extend(t, emb, answer_field_values(model))


def packing_is_exact(model, length: int) -> bool:
    """Whether :func:`pack_choices` gives the same numbers as one sequence per answer for a
    packed sequence of `length` tokens: not when a sliding-window layer's window (counted in
    sequence positions by transformers) is shorter than the packed sequence, because packed
    answers sit further from the prompt than they would alone."""
    tc = text_config(model)
    window = getattr(tc, "sliding_window", None)
    types = getattr(tc, "layer_types", None)
    sliding = window is not None and (types is None or "sliding_attention" in types)
    if getattr(tc, "use_sliding_window", True) is False:
        sliding = False
    return not sliding or int(window) >= length


@torch.inference_mode()
def pack_choices(model, prompt: TokenSequence, answers: Sequence[Sequence[int]]):
    """The prompt followed by every answer in one sequence (prefix sharing for scoring).

    Each answer's position ids continue from the prompt's last token, exactly as if it were
    the only answer, and :func:`forward` restricts every decoder layer's attention mask so
    that answer tokens see the prompt and their own answer only (``branch``). Returns
    ``(packed, want, targets)``: per answer, the positions whose logits predict its tokens
    (the prompt's last position, then its own tokens but the last) and its token ids.
    Numerically equal to one sequence per answer up to float summation order, except for
    sliding-window layers shorter than the packed sequence (see :func:`packing_is_exact`).
    """
    if prompt.branch is not None:
        raise ValueError("prompt is already packed")
    dev = prompt.input_ids.device
    P = len(prompt)
    ids = [torch.as_tensor(list(a), dtype=torch.long, device=dev) for a in answers]
    if not ids or any(t.numel() == 0 for t in ids):
        raise ValueError("pack_choices needs at least one non-empty answer")
    all_ids = torch.cat(ids)
    emb = model.get_input_embeddings()(all_ids.to(model.device)).to(prompt.embeds)
    last = prompt.position_ids[:, -1:]
    pos = [prompt.position_ids] + [last + torch.arange(1, len(t) + 1, device=dev)[None] for t in ids]
    values = answer_field_values(model)
    n = int(all_ids.shape[0])
    fields = {k: torch.cat([v, torch.full((n,), values.get(k, 0), dtype=v.dtype, device=dev)])
              for k, v in prompt.fields.items()}
    branch = torch.cat([torch.full((P,), -1, dtype=torch.long, device=dev)]
                       + [torch.full((len(t),), i, dtype=torch.long, device=dev) for i, t in enumerate(ids)])
    want, start = [], P
    for t in ids:
        want.append(torch.cat([torch.tensor([P - 1], device=dev),
                               torch.arange(start, start + len(t) - 1, device=dev)]))
        start += len(t)
    packed = TokenSequence(prompt.image_id, torch.cat([prompt.input_ids, all_ids]),
                           torch.cat([prompt.embeds, emb]), torch.cat(pos, dim=1).long(), fields,
                           prompt.visual_pos, branch)
    return packed, want, ids


# =========================================================================== planning
@dataclass
class Plan:
    """What an intervention does to one sequence (all masks over its S positions).

    ``keep``: tokens present in the rebuilt input sequence; ``skip``: tokens whose
    residual updates are zeroed at ``sublayers``; ``absent``: tokens left out of the
    decoder layers in ``absent_layers``.
    """

    keep: torch.Tensor
    skip: torch.Tensor
    sublayers: tuple[float, ...] = ()
    absent: torch.Tensor | None = None
    absent_layers: frozenset[int] = frozenset()
    n_visual: int = 0
    n_removed: int = 0

    def visual_per_layer(self, num_layers: int, visual: torch.Tensor) -> list[int]:
        v = int((visual & self.keep).sum())
        va = int((visual & self.keep & self.absent).sum()) if self.absent is not None else 0
        return [v - va if layer in self.absent_layers else v for layer in range(num_layers)]


def _rng_for(seed: int, image_id: str) -> np.random.Generator:
    # A stable hash (Python's hash() is salted per process) of (seed, image): the same image
    # gets the same deletion in every batch, order and process.
    digest = hashlib.sha256(f"{int(seed)}\x00{image_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_matched_removal(labels: Sequence[str], groups: Iterable[str], seed: int, image_id: str) -> np.ndarray:
    """Indices (into the visual tokens) that random_matched deletes for one image."""
    lab = np.asarray(labels, dtype=object)
    in_g = np.isin(lab, list(resolve_groups(groups)))
    n = int(in_g.sum())
    comp = np.flatnonzero(~in_g)
    if n == 0 or comp.size == 0:
        return np.zeros(0, dtype=np.int64)  # fixes the reference's "delete everything"
    pick = _rng_for(seed, image_id).choice(comp.size, size=min(n, comp.size), replace=False)
    return np.sort(comp[pick])


def plan_for(seq: TokenSequence, labels: Sequence[str], iv: Intervention, num_layers: int) -> Plan:
    """The plan of intervention `iv` on `seq`, whose visual tokens carry `labels`."""
    S = len(seq)
    dev = seq.input_ids.device
    if len(labels) != seq.n_visual:
        raise ValueError(
            f"image {seq.image_id!r}: {len(labels)} categorized tokens but the prompt holds "
            f"{seq.n_visual} visual tokens; categories must come from the same model and images"
        )
    lab = np.asarray(labels, dtype=object)
    vis_sel = np.zeros(seq.n_visual, dtype=bool)
    if iv.groups:
        vis_sel = np.isin(lab, list(iv.labels))
    keep = torch.ones(S, dtype=torch.bool, device=dev)
    sel = torch.zeros(S, dtype=torch.bool, device=dev)
    sel[seq.visual_pos[torch.as_tensor(vis_sel, device=dev)]] = True
    plan = Plan(keep=keep, skip=torch.zeros(S, dtype=torch.bool, device=dev), n_visual=seq.n_visual)
    if iv.op == "prune":
        keep &= ~sel
    elif iv.op == "keep":
        visual = torch.zeros(S, dtype=torch.bool, device=dev)
        visual[seq.visual_pos] = True
        keep &= ~(visual & ~sel)
    elif iv.op == "random_matched":
        rm = random_matched_removal(lab, iv.groups, iv.seed, seq.image_id)
        keep[seq.visual_pos[torch.as_tensor(rm, dtype=torch.long, device=dev)]] = False
    elif iv.op == "skip":
        bad = [s for s in iv.sublayers if s >= num_layers]
        if bad:
            raise ValueError(f"skip: sublayers {bad} beyond the model's {num_layers} layers")
        plan.skip = sel
        plan.sublayers = iv.sublayers
    elif iv.op in ("inject", "exit"):
        if iv.layer > num_layers:
            raise ValueError(f"{iv.op}({iv.layer}): the model has {num_layers} decoder layers")
        layers = range(0, iv.layer) if iv.op == "inject" else range(iv.layer, num_layers)
        plan.absent = sel
        plan.absent_layers = frozenset(layers)
    plan.n_removed = int((~keep).sum())
    return plan


# =========================================================================== batched forward
def _pad_stack(rows: list[torch.Tensor], length: int, value=0) -> torch.Tensor:
    """Right-pad 1-D/2-D tensors along their last dim and stack on dim 0 (or 1 for 2-D)."""
    out = []
    for r in rows:
        pad = length - r.shape[-1]
        if pad:
            fill = torch.full((*r.shape[:-1], pad), value, dtype=r.dtype, device=r.device)
            r = torch.cat([r, fill], dim=-1)
        out.append(r)
    return torch.stack(out, dim=0)


@dataclass
class _Batch:
    embeds: torch.Tensor  # (B, T, d)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T) or (R, B, T)
    fields: dict[str, torch.Tensor]
    index: list[torch.Tensor]  # per row: original positions of the T' kept tokens
    skip: torch.Tensor  # (B, T)
    absent: torch.Tensor  # (B, T)
    sublayers: tuple[float, ...]
    absent_layers: frozenset[int]
    branch: torch.Tensor | None = None  # (B, T); -2 on padding


def _assemble(seqs: Sequence[TokenSequence], plans: Sequence[Plan], device, dtype) -> _Batch:
    subl = {p.sublayers for p in plans}
    absl = {p.absent_layers for p in plans}
    if len(subl) > 1 or len(absl) > 1:
        raise ValueError("all sequences of a batch must share the intervention's layer choice")
    index = [p.keep.nonzero().flatten() for p in plans]
    T = max(int(i.shape[0]) for i in index)
    B = len(seqs)
    d = seqs[0].embeds.shape[-1]
    embeds = torch.zeros(B, T, d, dtype=dtype, device=device)
    am = torch.zeros(B, T, dtype=torch.long, device=device)
    skip = torch.zeros(B, T, dtype=torch.bool, device=device)
    absent = torch.zeros(B, T, dtype=torch.bool, device=device)
    pos_rows, field_rows = [], {k: [] for k in seqs[0].fields}
    R = {s.position_ids.shape[0] for s in seqs}
    if len(R) > 1:
        raise ValueError("sequences of one batch must have the same position-id rows")
    for b, (s, p, idx) in enumerate(zip(seqs, plans, index)):
        n = int(idx.shape[0])
        embeds[b, :n] = s.embeds[idx].to(device=device, dtype=dtype)
        am[b, :n] = 1
        skip[b, :n] = p.skip[idx].to(device)
        if p.absent is not None:
            absent[b, :n] = p.absent[idx].to(device)
        pos = s.position_ids[:, idx].to(device)
        # padding positions continue after the last real one (their values never matter:
        # the 2-D mask hides them; finite and increasing keeps every kernel happy)
        if n < T:
            tail = pos[:, -1:] + torch.arange(1, T - n + 1, device=device)[None]
            pos = torch.cat([pos, tail], dim=1)
        pos_rows.append(pos)
        for k in field_rows:
            field_rows[k].append(s.fields[k][idx].to(device))
    position_ids = torch.stack(pos_rows, dim=1)  # (R, B, T)
    if position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    fields = {k: _pad_stack(v, T, 0) for k, v in field_rows.items()}
    branch = None
    if any(s.branch is not None for s in seqs):
        branch = torch.full((B, T), -2, dtype=torch.long, device=device)
        for b, (s, idx) in enumerate(zip(seqs, index)):
            # an unpacked row is one branch-free prompt: everything -1 (plain causal)
            branch[b, : idx.shape[0]] = s.branch[idx].to(device) if s.branch is not None else -1
    return _Batch(embeds, am, position_ids, fields, index, skip, absent,
                  plans[0].sublayers, plans[0].absent_layers, branch)


# --------------------------------------------------------------------------- layer subsets
class _Subset:
    """The present tokens of a batch at the layers that leave some tokens out."""

    def __init__(self, present: torch.Tensor, impl: str):
        self.present = present  # (B, T) bool
        B, T = present.shape
        counts = present.sum(1)
        self.U = int(counts.max()) if B else 0
        # left-aligned positions of present tokens, in sequence order; padded slots -> 0
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)
        self.idx = order[:, : self.U]
        self.valid = torch.arange(self.U, device=present.device)[None] < counts[:, None]
        self.impl = impl
        self._masks: dict[int, object] = {}
        self.full: torch.Tensor | None = None

    def gather_seq(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Gather the present tokens along `dim` (the sequence axis) of a tensor whose
        batch axis is ``dim - 1`` (size B or 1)."""
        dim = dim % t.ndim
        B = self.idx.shape[0]
        shape = list(t.shape)
        shape[dim - 1] = B
        t = t.expand(*shape)
        view = [1] * t.ndim
        view[dim - 1], view[dim] = B, self.U
        index = self.idx.view(view).expand(*shape[:dim], self.U, *shape[dim + 1:])
        return torch.gather(t, dim, index)

    def mask(self, m):
        key = id(m)
        if key not in self._masks:
            self._masks[key] = self._sub_mask(m)
        return self._masks[key]

    def _sub_mask(self, m):
        B, U = self.idx.shape
        dev = self.idx.device
        if m is None:
            # sdpa was allowed to drop the mask: the full sequence was plainly causal
            q = self.idx[:, :, None]
            k = self.idx[:, None, :]
            allowed = k <= q
            float_mask, dtype = self.impl == "eager", torch.float32
        elif isinstance(m, torch.Tensor) and m.ndim == 4:
            mm = m[:, 0] if m.shape[1] == 1 else None
            if mm is None:
                raise NotImplementedError("per-head attention masks are not supported")
            mm = mm.expand(B, -1, -1)
            rows = torch.gather(mm, 1, self.idx[:, :, None].expand(B, U, mm.shape[-1]))
            sub = torch.gather(rows, 2, self.idx[:, None, :].expand(B, U, U))
            float_mask, dtype = m.dtype != torch.bool, m.dtype
            allowed = sub if not float_mask else sub == 0
        else:
            raise NotImplementedError(
                f"attention mask of type {type(m).__name__} cannot be restricted to a token "
                "subset (use attn_implementation 'sdpa' or 'eager')"
            )
        v = self.valid
        allowed = allowed & v[:, None, :] & v[:, :, None]
        # every row needs one visible key (padding slots see themselves), or sdpa returns
        # NaN rows whose 0 * NaN products would leak into real rows of the next layer
        eye = torch.eye(U, dtype=torch.bool, device=dev)[None]
        empty = ~allowed.any(-1, keepdim=True)
        allowed = allowed | (eye & empty)
        allowed = allowed[:, None]
        if not float_mask:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    # hooks ------------------------------------------------------------------
    def pre_hook(self, module, args, kwargs):
        if kwargs.get("past_key_values") is not None and kwargs.get("use_cache"):
            raise NotImplementedError("interventions act on the prefill only (no KV cache)")
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        self.full = hidden
        sub = self.gather_seq(hidden, 1) * self.valid[..., None].to(hidden.dtype)
        kwargs = dict(kwargs)
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = self.mask(kwargs["attention_mask"])
        else:
            kwargs["attention_mask"] = self.mask(None)
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            kwargs["position_embeddings"] = tuple(self.gather_seq(t, -2) for t in pe)
        pid = kwargs.get("position_ids")
        if isinstance(pid, torch.Tensor):
            kwargs["position_ids"] = self.gather_seq(pid if pid.ndim >= 2 else pid[None], -1)
        return (sub, *args), kwargs

    def post_hook(self, module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        full = self.full.clone()
        full[self.present] = out[self.valid].to(full.dtype)
        self.full = None
        return (full, *output[1:]) if isinstance(output, tuple) else full


def _zero_rows_hook(mask: torch.Tensor):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0].masked_fill(mask[..., None], 0), *output[1:])
        return output.masked_fill(mask[..., None], 0)

    return hook


class _Tree:
    """Restricts each layer's attention mask so that packed answers see the shared prompt
    and their own tokens only (keys of other answers are hidden)."""

    def __init__(self, branch: torch.Tensor, impl: str):
        kq = branch[:, None, :]
        self.allowed = (kq < 0) | (kq == branch[:, :, None])  # (B, T_q, T_k)
        self.impl = impl
        self._masks: dict[int, object] = {}

    def mask(self, m):
        key = id(m)
        if key not in self._masks:
            self._masks[key] = self._restrict(m)
        return self._masks[key]

    def _restrict(self, m):
        tree = self.allowed[:, None]
        if m is None:  # sdpa dropped a plainly causal mask
            T = tree.shape[-1]
            causal = torch.ones(T, T, dtype=torch.bool, device=tree.device).tril()
            allowed = tree & causal
            if self.impl != "eager":
                return allowed
            return torch.zeros(allowed.shape, device=tree.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
        if not (isinstance(m, torch.Tensor) and m.ndim == 4):
            raise NotImplementedError(f"attention mask of type {type(m).__name__} cannot be restricted")
        if m.dtype == torch.bool:
            return m & tree
        # torch.where broadcasts a batch-1 mask against the per-row restriction
        return torch.where(tree, m, torch.finfo(m.dtype).min)

    def pre_hook(self, module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = self.mask(kwargs.get("attention_mask"))
        return args, kwargs


@contextmanager
def _hooks(model, batch: _Batch):
    layers = decoder_layers(model)
    impl = attn_implementation(model)
    handles = []
    try:
        if batch.branch is not None and (batch.branch >= 0).any():
            tree = _Tree(batch.branch, impl)
            # registered before the subset hooks: those slice the already restricted mask
            for layer in layers:
                handles.append(layer.register_forward_pre_hook(tree.pre_hook, with_kwargs=True))
        if batch.sublayers and batch.skip.any():
            for s in batch.sublayers:
                n = int(math.floor(s))
                mod = mlp_of(layers[n]) if s - n else attention_of(layers[n])
                # prepend: run before transformers' own output-recording hooks
                handles.append(mod.register_forward_hook(_zero_rows_hook(batch.skip), prepend=True))
        if batch.absent_layers and batch.absent.any():
            sub = _Subset(~batch.absent, impl)
            for n in sorted(batch.absent_layers):
                handles.append(layers[n].register_forward_pre_hook(sub.pre_hook, with_kwargs=True))
                handles.append(layers[n].register_forward_hook(sub.post_hook, with_kwargs=True, prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class ForwardResult:
    logits: list[torch.Tensor]  # per sequence: (n_requested, V) float32, in request order
    hidden: list[torch.Tensor] | None = None  # per sequence: (L + 1, T_kept, d)
    index: list[torch.Tensor] = field(default_factory=list)  # kept original positions


@torch.inference_mode()
def forward(
    model,
    seqs: Sequence[TokenSequence],
    plans: Sequence[Plan],
    want: Sequence[torch.Tensor] | None = None,
    *,
    output_hidden_states: bool = False,
) -> ForwardResult:
    """One batched, intervened forward pass.

    `want[i]`: original positions of sequence i whose logits are returned (all kept
    positions when None). Positions removed by the plan cannot be requested.
    """
    check_supported(model)
    device = model.device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    batch = _assemble(seqs, plans, device, dtype)
    B, T = batch.attention_mask.shape
    keep_logits = torch.zeros(B, T, dtype=torch.bool, device=device)
    req_rows = []
    for b, idx in enumerate(batch.index):
        lut = torch.full((len(seqs[b]),), -1, dtype=torch.long, device=idx.device)
        lut[idx] = torch.arange(idx.shape[0], device=idx.device)
        w = idx if want is None else torch.as_tensor(want[b], dtype=torch.long).to(idx.device)
        j = lut[w]
        if (j < 0).any():
            raise ValueError("logits requested at a position the intervention removed")
        req_rows.append(j.to(device))
        keep_logits[b, j.to(device)] = True
    kwargs = dict(
        inputs_embeds=batch.embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=keep_logits,
        output_hidden_states=output_hidden_states,
        **batch.fields,
    )
    with _hooks(model, batch):
        out = model(**kwargs)
    flat = out.logits.float()
    if flat.ndim == 3:  # a model that ignored the boolean logits_to_keep
        flat = flat[keep_logits]
    counts = keep_logits.sum(1).tolist()
    chunks = list(torch.split(flat, counts))
    logits = []
    for b, j in enumerate(req_rows):
        # the model returns the kept rows in position order; map each request onto them
        kept = keep_logits[b].nonzero().flatten()
        logits.append(chunks[b][torch.searchsorted(kept, j)])
    hidden = None
    if output_hidden_states:
        hs = torch.stack([h for h in out.hidden_states], dim=1)  # (B, L+1, T, d)
        hidden = [hs[b, :, : batch.index[b].shape[0]] for b in range(B)]
    return ForwardResult(logits=logits, hidden=hidden, index=batch.index)


# =========================================================================== scoring
def answer_logprob(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Length-normalized log-likelihood of an answer: mean over its tokens of
    ``log p(target_t | prefix)``, from the logits at the positions *before* each target
    (``logits[i]`` predicts ``targets[i]``). float32 log-softmax.

    Kept here as a small generic function because the compression benchmark scores
    answers under intervened forward passes (rebuilt sequences, hooks), which the shared
    scorer cannot run; the definition is the one of methods.md §4.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    t = torch.as_tensor(targets, device=lp.device, dtype=torch.long)
    return float(lp.gather(-1, t[:, None]).mean())
