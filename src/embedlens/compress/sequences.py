"""Decoder input sequences for the compression benchmark: captured from the model's own
input preparation, extended with answer tokens, or packed (several answers after one copy
of the prompt).

:func:`capture_sequence` takes the merged input embeddings from the model itself: a forward
pre-hook on the language model (`embedlens.models.parts.decoder_of`) records
``inputs_embeds`` and ``position_ids`` exactly as the model's own image merge built them,
then stops the pass. Visual token ``j`` of an image is the ``j``-th position (in sequence
order) whose input id is the model's image token id (`embedlens.models.parts.image_token_id`),
the same order as the store's ``token`` coordinate.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from embedlens.models.overrides import get_overrides
from embedlens.models.parts import decoder_of, image_token_id, sliding_window


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
    pass, so the decoder never runs here. `inputs`: processor tensors, ``input_ids`` (1, S).
    Returns embeds (S, d), position ids (R, S) and the visual positions (n_vis,).

    Raises:
        ValueError: `inputs` is not a batch of one.
        UnsupportedModelError: no decoder layer list or no image token id.
        NotImplementedError: the model feeds its decoder in a way that cannot be replayed
            (DeepStack, no ``inputs_embeds``, a length change, odd position ids).
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
    """Per-token field values for text appended after the prompt: the architecture's
    ``token_type_ids`` value for appended text (``ArchOverrides.answer_token_type``, 1 for
    PaliGemma's causal suffix) when it is not 0, else none (every field gets 0)."""
    value = get_overrides(getattr(model.config, "model_type", "")).answer_token_type
    return {"token_type_ids": int(value)} if value else {}


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
    window = sliding_window(model)
    return window is None or window >= length


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
