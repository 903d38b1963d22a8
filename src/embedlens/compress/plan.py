"""Planning: what one intervention does to one captured sequence, as boolean masks over its
positions (docs/methods.md §4). Pruning/keeping/random_matched remove tokens before layer 0
(``keep``), ``skip`` zeroes sublayer updates (``skip`` + ``sublayers``), ``inject``/``exit``
leave tokens out of some layers (``absent`` + ``absent_layers``), ``prune_inject`` does both,
``knockout`` (and ``skip(..., reference_layer0=True)``) hides keys from some queries in some
layers (``knock_*``); :mod:`.hooks`, :func:`.interventions.forward` and
:func:`.generate.generate` carry the masks out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .sequences import TokenSequence
from .spec import Intervention, resolve_groups


@dataclass
class Plan:
    """What an intervention does to one sequence (all masks over its S positions).

    ``keep``: tokens present in the rebuilt input sequence; ``skip``: tokens whose
    residual updates are zeroed at ``sublayers``; ``absent``: tokens left out of the
    decoder layers in ``absent_layers``; ``knock_keys`` / ``knock_text``: in the layers
    ``knock_layers``, for each edge of ``knock_edges``, ``"visual->visual"``: a
    ``knock_keys`` query cannot attend another ``knock_keys`` key, ``"text->visual"``: a
    ``knock_text`` query (text after the first visual token) cannot attend a ``knock_keys``
    key. ``intervention`` / ``token_groups``: what :func:`plan_for` was called with (so a
    longer sequence, e.g. prompt + generated tokens, can be planned the same way).
    """

    keep: torch.Tensor
    skip: torch.Tensor
    sublayers: tuple[float, ...] = ()
    absent: torch.Tensor | None = None
    absent_layers: frozenset[int] = frozenset()
    n_visual: int = 0
    n_removed: int = 0
    knock_keys: torch.Tensor | None = None
    knock_text: torch.Tensor | None = None
    knock_edges: tuple[str, ...] = ()
    knock_layers: frozenset[int] = frozenset()
    intervention: Intervention | None = None
    token_groups: object = None

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
    """Indices (into the visual tokens; sorted, (n_removed,) int64) that random_matched
    deletes for one image whose visual tokens carry `labels`."""
    lab = np.asarray(labels, dtype=object)
    in_g = np.isin(lab, list(resolve_groups(groups)))
    n = int(in_g.sum())
    comp = np.flatnonzero(~in_g)
    if n == 0 or comp.size == 0:
        return np.zeros(0, dtype=np.int64)  # fixes the reference's "delete everything"
    pick = _rng_for(seed, image_id).choice(comp.size, size=min(n, comp.size), replace=False)
    return np.sort(comp[pick])


def _knock(plan: Plan, seq: TokenSequence, sel: torch.Tensor, edges, layers: Iterable[int]) -> None:
    """Fill the knockout fields of `plan`: keys `sel` (S,), queries as :class:`Plan` says."""
    S = len(seq)
    text_after = torch.zeros(S, dtype=torch.bool, device=sel.device)
    if seq.n_visual:
        text_after[int(seq.visual_pos.min()) + 1:] = True
        text_after[seq.visual_pos] = False
    plan.knock_keys, plan.knock_text = sel.clone(), text_after
    plan.knock_edges, plan.knock_layers = tuple(edges), frozenset(int(n) for n in layers)


def plan_for(seq: TokenSequence, labels: Sequence[str], iv: Intervention, num_layers: int) -> Plan:
    """The plan of intervention `iv` on `seq`, whose visual tokens carry `labels` (n_visual,),
    for a decoder of `num_layers` layers: masks (S,) over the sequence's positions.

    Raises:
        ValueError: `labels` do not match the sequence's visual tokens in number, or a
            skip/inject/exit layer lies beyond `num_layers`.
    """
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
        if iv.reference_layer0 and 0.0 in iv.sublayers:
            _knock(plan, seq, sel, ("text->visual",), [0])
    elif iv.op == "knockout":
        a, b = iv.layer_range if iv.layer_range is not None else (0, num_layers)
        if b > num_layers:
            raise ValueError(f"knockout layers [{a}, {b}) beyond the model's {num_layers} layers")
        _knock(plan, seq, sel, iv.edges, range(a, b))
    elif iv.op == "prune_inject":
        if iv.layer > num_layers:
            raise ValueError(f"prune_inject({iv.layer}): the model has {num_layers} decoder layers")
        keep &= ~sel
        visual = torch.zeros(S, dtype=torch.bool, device=dev)
        visual[seq.visual_pos] = True
        plan.absent = visual & keep
        plan.absent_layers = frozenset(range(0, iv.layer))
    elif iv.op in ("inject", "exit"):
        if iv.layer > num_layers:
            raise ValueError(f"{iv.op}({iv.layer}): the model has {num_layers} decoder layers")
        layers = range(0, iv.layer) if iv.op == "inject" else range(iv.layer, num_layers)
        plan.absent = sel
        plan.absent_layers = frozenset(layers)
    plan.n_removed = int((~keep).sum())
    plan.intervention, plan.token_groups = iv, labels
    return plan


@dataclass
class AssembledBatch:
    """Sequences and their plans, right-padded into one batch of T kept tokens per row."""

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
    knock_keys: torch.Tensor | None = None  # (B, T)
    knock_text: torch.Tensor | None = None  # (B, T)
    knock_edges: tuple[str, ...] = ()
    knock_layers: frozenset[int] = frozenset()
