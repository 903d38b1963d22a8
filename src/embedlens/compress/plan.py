"""Planning: what one intervention does to one captured sequence, as boolean masks over its
positions (docs/methods.md §4). Which visual tokens a group holds comes from
:class:`TokenGroups` (membership or exclusive label, the intervention's ``select``). Pruning/keeping/random_matched remove tokens before layer 0
(``keep``), ``skip`` zeroes sublayer updates (``skip`` + ``sublayers``), ``inject``/``exit``
leave tokens out of some layers (``absent`` + ``absent_layers``), ``prune_inject`` does both,
``knockout`` (and ``skip(..., reference_layer0=True)``) hides keys from some queries in some
layers (``knock_*``); :mod:`.hooks`, :func:`.interventions.forward` and
:func:`.generate.generate` carry the masks out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .sequences import TokenSequence
from .spec import GROUPS, LABELS, SELECTIONS, Intervention, resolve_groups


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays
class TokenGroups:
    """The groups of one image's visual tokens (docs/methods.md §1.4, §4).

    ``label``: (n_visual,) str, the exclusive label (first matching group in the order
    vit_sink, llm_sink, dead, else alive). ``member``: group -> (n_visual,) bool for each of
    ``vit_sink``, ``llm_sink``, ``dead``: any anchor id of the group among the token's top-k
    neighbours (the groups may overlap). The label is a function of the membership, checked
    on construction.

    Raises:
        ValueError: unknown labels, missing/extra membership groups, lengths that differ, or
            a label that is not the first matching membership group.
    """

    label: np.ndarray
    member: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        label = np.asarray(self.label, dtype=object).reshape(-1)
        bad = sorted({str(x) for x in label} - set(LABELS))
        if bad:
            raise ValueError(f"unknown token labels {bad}; expected {', '.join(LABELS)}")
        if set(self.member) != set(GROUPS):
            raise ValueError(f"membership must hold exactly the groups {GROUPS}, got {sorted(self.member)}")
        member = {g: np.asarray(self.member[g], dtype=bool).reshape(-1) for g in GROUPS}
        for g, m in member.items():
            if m.shape != label.shape:
                raise ValueError(f"membership of {g!r} has {m.size} tokens, the labels {label.size}")
        if label.size and not np.array_equal(label, _first_match(member)):
            n = int((label != _first_match(member)).sum())
            raise ValueError(f"{n} token label(s) are not the first matching membership group "
                             "(vit_sink, llm_sink, dead, else alive); labels and in_* columns disagree")
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "member", member)

    @property
    def n_visual(self) -> int:
        return int(self.label.size)

    def __len__(self) -> int:
        return self.n_visual

    @classmethod
    def from_labels(cls, labels: Sequence[str]) -> TokenGroups:
        """Groups from exclusive labels only (membership = label): what callers that pass a
        label list get, so both selections coincide for them."""
        lab = np.asarray(labels, dtype=object).reshape(-1)
        return cls(lab, {g: lab == g for g in GROUPS})

    @classmethod
    def from_topk(cls, topk_ids: np.ndarray, anchors: Mapping[str, Sequence[int]]) -> TokenGroups:
        """The reference rule on (n_visual, k) top-k vocabulary ids and the anchor ids per
        group (groups absent from `anchors` hold no token); equals
        :func:`embedlens.analysis.categorize.apply_rule`'s ``label``/``in_<group>``.

        Raises:
            ValueError: an anchor group outside vit_sink/llm_sink/dead, or ids not 2-D.
        """
        unknown = set(anchors) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown anchor groups {sorted(unknown)}; expected {GROUPS}")
        ids = np.asarray(topk_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"topk_ids must be (n_visual, k), got shape {ids.shape}")
        member = {}
        for g in GROUPS:
            a = np.asarray(list(anchors.get(g, [])), dtype=np.int64)
            member[g] = np.isin(ids, a).any(axis=1) if a.size else np.zeros(len(ids), dtype=bool)
        return cls(_first_match(member), member)

    @classmethod
    def from_categories(cls, df) -> TokenGroups:
        """One image's rows of categorize's ``categories.parquet`` (a pandas DataFrame with
        ``label``, ``in_vit_sink``, ``in_llm_sink``, ``in_dead``; ordered by ``token`` when
        it has that column, which must then be 0..n-1).

        Raises:
            ValueError: a missing column (names it) or tokens that are not 0..n-1.
        """
        cols = ["label", *(f"in_{g}" for g in GROUPS)]
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"categories lack the column(s) {missing}; they come from the categorize "
                             "step (rerun it with this version to get the membership columns)")
        if "token" in df.columns:
            df = df.sort_values("token")
            if not np.array_equal(df["token"].to_numpy(), np.arange(len(df))):
                raise ValueError("categorized tokens of an image are not 0..n-1")
        return cls(df["label"].astype(str).to_numpy(dtype=object),
                   {g: df[f"in_{g}"].to_numpy(dtype=bool) for g in GROUPS})

    def select(self, groups: Iterable[str], select: str = "membership") -> np.ndarray:
        """(n_visual,) bool: the tokens of `groups` (labels or aliases) under `select`.

        ``"membership"``: in any of the groups' memberships (``alive`` = in none);
        ``"label"``: the exclusive label is one of the groups.

        Raises:
            ValueError: an unknown group or selection.
        """
        want = resolve_groups(groups)
        if select == "label":
            return np.isin(self.label, list(want))
        if select != "membership":
            raise ValueError(f"select must be one of {', '.join(SELECTIONS)}, got {select!r}")
        out = np.zeros(self.n_visual, dtype=bool)
        for g in want & set(GROUPS):
            out |= self.member[g]
        if "alive" in want:
            out |= self.label == "alive"  # == in no group (checked on construction)
        return out


def _first_match(member: Mapping[str, np.ndarray]) -> np.ndarray:
    flags = [member[g] for g in GROUPS]
    if not flags[0].size:
        return np.array([], dtype=object)
    return np.select(flags, list(GROUPS), default="alive").astype(object)


def token_groups(groups: TokenGroups | Sequence[str]) -> TokenGroups:
    """`groups` as :class:`TokenGroups` (a label list: :meth:`TokenGroups.from_labels`)."""
    return groups if isinstance(groups, TokenGroups) else TokenGroups.from_labels(groups)


def visual_mask(seq: TokenSequence, device=None) -> torch.Tensor:
    """(S,) bool on `device`: True at the visual positions of `seq`."""
    visual = torch.zeros(len(seq), dtype=torch.bool, device=device)
    visual[seq.visual_pos] = True
    return visual


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

    def visual_counts(self, num_layers: int, visual: torch.Tensor) -> tuple[int, int]:
        """(visual tokens kept, visual tokens affected) for the (S,) bool mask `visual` of
        the visual positions. Kept: present in the input and in at least one decoder layer
        (a token absent from every layer, e.g. ``exit(0)``, is not kept). Affected: deleted,
        skipped in a sublayer, absent from a layer, or with attention edges cut. A condition
        that affects no visual token of any image changed nothing ("nothing removed")."""
        kept = visual & self.keep
        if self.absent is not None and len(self.absent_layers) == num_layers:
            kept = kept & ~self.absent
        affected = ~self.keep
        if self.sublayers:
            affected = affected | self.skip
        if self.absent is not None and self.absent_layers:
            affected = affected | self.absent
        if self.knock_keys is not None and self.knock_edges and self.knock_layers:
            affected = affected | self.knock_keys
        return int(kept.sum()), int((affected & visual).sum())

    def visual_per_layer(self, num_layers: int, visual: torch.Tensor) -> list[int]:
        v = int((visual & self.keep).sum())
        va = int((visual & self.keep & self.absent).sum()) if self.absent is not None else 0
        return [v - va if layer in self.absent_layers else v for layer in range(num_layers)]


def _rng_for(seed: int, image_id: str) -> np.random.Generator:
    # A stable hash (Python's hash() is salted per process) of (seed, image): the same image
    # gets the same deletion in every batch, order and process.
    digest = hashlib.sha256(f"{int(seed)}\x00{image_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_matched_removal(labels: TokenGroups | Sequence[str], groups: Iterable[str], seed: int,
                           image_id: str, select: str = "membership") -> np.ndarray:
    """Indices (into the visual tokens; sorted, (n_removed,) int64) that random_matched
    deletes for one image whose visual tokens have the groups `labels` (a
    :class:`TokenGroups` or a label list): as many tokens as `groups` select under
    `select`, drawn from the tokens they do not select."""
    in_g = token_groups(labels).select(groups, select)
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


def plan_for(seq: TokenSequence, groups: TokenGroups | Sequence[str], iv: Intervention,
             num_layers: int) -> Plan:
    """The plan of intervention `iv` on `seq`, whose visual tokens have the groups `groups`
    (:class:`TokenGroups`, or a (n_visual,) label list = membership by label), for a decoder
    of `num_layers` layers: masks (S,) over the sequence's positions. The intervention's
    ``select`` decides whether its groups pick tokens by membership or by label.

    Raises:
        ValueError: `groups` do not match the sequence's visual tokens in number, or a
            skip/inject/exit layer lies beyond `num_layers`.
    """
    S = len(seq)
    dev = seq.input_ids.device
    if len(groups) != seq.n_visual:
        raise ValueError(
            f"image {seq.image_id!r}: {len(groups)} categorized tokens but the prompt holds "
            f"{seq.n_visual} visual tokens; categories must come from the same model and images"
        )
    tg = token_groups(groups)
    vis_sel = np.zeros(seq.n_visual, dtype=bool)
    if iv.groups:
        vis_sel = tg.select(iv.groups, iv.select)
    keep = torch.ones(S, dtype=torch.bool, device=dev)
    sel = torch.zeros(S, dtype=torch.bool, device=dev)
    sel[seq.visual_pos[torch.as_tensor(vis_sel, device=dev)]] = True
    plan = Plan(keep=keep, skip=torch.zeros(S, dtype=torch.bool, device=dev), n_visual=seq.n_visual)
    if iv.op == "prune":
        keep &= ~sel
    elif iv.op == "keep":
        keep &= ~(visual_mask(seq, dev) & ~sel)
    elif iv.op == "random_matched":
        rm = random_matched_removal(tg, iv.groups, iv.seed, seq.image_id, iv.select)
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
        plan.absent = visual_mask(seq, dev) & keep
        plan.absent_layers = frozenset(range(0, iv.layer))
    elif iv.op in ("inject", "exit"):
        if iv.layer > num_layers:
            raise ValueError(f"{iv.op}({iv.layer}): the model has {num_layers} decoder layers")
        layers = range(0, iv.layer) if iv.op == "inject" else range(iv.layer, num_layers)
        plan.absent = sel
        plan.absent_layers = frozenset(layers)
    plan.n_removed = int((~keep).sum())
    plan.intervention, plan.token_groups = iv, tg
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
