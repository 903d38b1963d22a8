"""Interventions on the visual tokens of a VLM's prefill (docs/methods.md §4), through hooks.

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
  only the prompt and itself: prefix sharing for scoring without a KV cache), and on the
  layers of a ``knockout`` (visual->visual and/or text->visual attention edges cut; also the
  layer-0 cut of ``skip(..., reference_layer0=True)``);
* ``prune_inject`` composes the rebuild (prune its groups) with the token subsets of
  ``inject`` (the remaining visual tokens bypass layers ``< layer``).

Greedy generation with a KV cache under the same interventions is in :mod:`.generate`.

The decoder, its layers and their ``self_attn``/``mlp`` sublayers, the image token id and
the attention implementation come from `embedlens.models.parts` (the same lookup as
extraction); loading from `embedlens.models.loading` through the adapter.

Modules: :mod:`.spec` (what an intervention is), :mod:`.sequences` (captured, extended and
packed decoder inputs), :mod:`.plan` (per-sequence masks), :mod:`.hooks` (the decoder-layer
hooks), and this one: loading and checking a model, the batched forward pass and answer
scoring. Everything public is re-exported here (``from embedlens.compress import
interventions as iv``).

Supported architectures
-----------------------
Every ``*ForConditionalGeneration`` whose decoder layers take ``(hidden_states, *,
attention_mask, position_embeddings, position_ids)`` and whose image tokens are marked by
``config.image_token_id``: tested on tiny LLaVA, LLaVA-NeXT (Mistral), Gemma 3, Idefics3
(SmolVLM), PaliGemma (1-D RoPE) and Qwen2-VL / Qwen2.5-VL (3-D M-RoPE: the captured
``(3, S)`` position ids are carried through every operation). Requirements checked at run
time, each with a clear error: the attention implementation must be ``sdpa`` or ``eager``
(flash-attention reads position-id gaps as packed sequences; :func:`load_model` asks for
``sdpa``, else ``eager``), and no layer may use a KV cache (prefill only).
Recurrent/linear-attention decoders (no 4-D mask to restrict) raise ``NotImplementedError``
naming the class.

Limits
------
* Here, prefill only: one complete forward per sequence, no KV cache (cached decoding:
  :mod:`.generate`).
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
A visual token belongs to a group (``vit_sink``, ``llm_sink``, ``dead``; docs/methods.md §1)
when an anchor id of the group is among its top-k vocabulary neighbours (membership, the
reference semantics and the default; groups may overlap, ``alive`` = in none), or, with an
intervention's ``select="label"``, when its exclusive categorize label is the group (the first
matching group, a partition); see :class:`TokenGroups`. Aliases: ``sink``/``sinks`` =
``vit_sink`` + ``llm_sink``; ``visual``/``all`` = every visual token. Visual token ``j`` of an image is the ``j``-th position (in sequence
order) whose input id is the model's image token id, the same order as the store's
``token`` coordinate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from embedlens.models.parts import attn_implementation, decoder_of, image_token_id, text_config
from embedlens.models.parts import decoder_layers  # noqa: F401 - re-exported (callers count layers with it)

from .hooks import intervention_hooks
from .plan import (  # noqa: F401 - re-exported
    AssembledBatch,
    Plan,
    TokenGroups,
    plan_for,
    random_matched_removal,
    token_groups,
)
from .sequences import (  # noqa: F401 - re-exported
    TokenSequence,
    answer_field_values,
    append_text,
    capture_sequence,
    pack_choices,
    packing_is_exact,
)
from .spec import (  # noqa: F401 - re-exported
    EDGES,
    GROUP_ALIASES,
    GROUPS,
    LABELS,
    OPS,
    SELECTIONS,
    Intervention,
    baseline,
    exit,  # noqa: A004 - the name docs/methods.md §4 uses
    exit_at,
    inject,
    keep,
    knockout,
    prune,
    prune_inject,
    random_matched,
    resolve_groups,
    skip,
    sublayers_for,
)

#: the attention implementations whose masks the hooks can build and restrict, in order of preference
SUPPORTED_ATTENTION = ("sdpa", "eager")


# =========================================================================== model
def check_supported(model) -> None:
    """Raise a clear error for a model these hooks cannot drive faithfully.

    Raises:
        UnsupportedModelError: no decoder layer list or no image token id (class named).
        NotImplementedError: an attention implementation other than sdpa/eager, or decoder
            layer types without an attention mask to restrict (recurrent/linear attention).
    """
    decoder_of(model)
    image_token_id(model)
    impl = attn_implementation(model)
    if impl not in SUPPORTED_ATTENTION:
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
    as extraction), with the ``sdpa`` attention the hooks need (``eager`` where the model
    has no sdpa).

    Raises:
        ValueError: the model cannot be loaded (see `embedlens.models.loading.load_model`).
        UnsupportedModelError, NotImplementedError: see :func:`check_supported`.
    """
    from embedlens.models.adapter import VLMAdapter

    adapter = VLMAdapter.load(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                              attn_implementation=SUPPORTED_ATTENTION)
    check_supported(adapter.model)
    return adapter.model, adapter.processor, adapter


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


def _assemble(seqs: Sequence[TokenSequence], plans: Sequence[Plan], device, dtype) -> AssembledBatch:
    subl = {p.sublayers for p in plans}
    absl = {p.absent_layers for p in plans}
    knl = {(p.knock_edges, p.knock_layers) for p in plans}
    if len(subl) > 1 or len(absl) > 1 or len(knl) > 1:
        raise ValueError("all sequences of a batch must share the intervention's layer choice")
    index = [p.keep.nonzero().flatten() for p in plans]
    T = max(int(i.shape[0]) for i in index)
    B = len(seqs)
    d = seqs[0].embeds.shape[-1]
    embeds = torch.zeros(B, T, d, dtype=dtype, device=device)
    am = torch.zeros(B, T, dtype=torch.long, device=device)
    skip_rows = torch.zeros(B, T, dtype=torch.bool, device=device)
    absent = torch.zeros(B, T, dtype=torch.bool, device=device)
    pos_rows, field_rows = [], {k: [] for k in seqs[0].fields}
    R = {s.position_ids.shape[0] for s in seqs}
    if len(R) > 1:
        raise ValueError("sequences of one batch must have the same position-id rows")
    for b, (s, p, idx) in enumerate(zip(seqs, plans, index)):
        n = int(idx.shape[0])
        embeds[b, :n] = s.embeds[idx].to(device=device, dtype=dtype)
        am[b, :n] = 1
        skip_rows[b, :n] = p.skip[idx].to(device)
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
    knock_keys = knock_text = None
    if plans[0].knock_edges:
        knock_keys = torch.zeros(B, T, dtype=torch.bool, device=device)
        knock_text = torch.zeros(B, T, dtype=torch.bool, device=device)
        for b, (p, idx) in enumerate(zip(plans, index)):
            knock_keys[b, : idx.shape[0]] = p.knock_keys[idx].to(device)
            knock_text[b, : idx.shape[0]] = p.knock_text[idx].to(device)
    return AssembledBatch(embeds, am, position_ids, fields, index, skip_rows, absent,
                          plans[0].sublayers, plans[0].absent_layers, branch,
                          knock_keys, knock_text, plans[0].knock_edges, plans[0].knock_layers)


@dataclass
class ForwardResult:
    """What :func:`forward` returns, one entry per sequence of the batch."""

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
    positions when None). Positions removed by the plan cannot be requested. Returns per
    sequence the logits (n_requested, V) float32 in request order and, with
    `output_hidden_states`, the hidden states (L + 1, T_kept, d).

    Raises:
        ValueError: logits requested at a removed position, or sequences/plans that cannot
            share a batch (different layer choices or position-id rows).
        UnsupportedModelError, NotImplementedError: see :func:`check_supported`; per-head
            masks or a KV cache inside the pass.
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
    with intervention_hooks(model, batch):
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
    scorer cannot run; the definition is the one of docs/methods.md §4.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    t = torch.as_tensor(targets, device=lp.device, dtype=torch.long)
    return float(lp.gather(-1, t[:, None]).mean())
