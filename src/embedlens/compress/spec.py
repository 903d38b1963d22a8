"""What an intervention on the visual tokens is (docs/methods.md §4): token groups, the
operations and their parameters. Pure data; nothing here touches a model.

Token groups (docs/methods.md §1, §4): ``vit_sink``, ``llm_sink``, ``dead``, ``alive``.
Which tokens a group holds depends on the intervention's ``select``: ``"membership"`` (the
reference semantics, default) = every token with an anchor id of the group anywhere in its
top-k vocabulary neighbours (groups may overlap; ``alive`` = in no group); ``"label"`` =
the tokens whose exclusive categorize label is the group (first matching group in the
order vit_sink, llm_sink, dead; a partition). Aliases: ``sink``/``sinks`` = ``vit_sink`` +
``llm_sink``; ``visual``/``all`` = every visual token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

LABELS = ("vit_sink", "llm_sink", "dead", "alive")
GROUP_ALIASES = {
    "sink": ("vit_sink", "llm_sink"),
    "sinks": ("vit_sink", "llm_sink"),
    "visual": LABELS,
    "all": LABELS,
}
#: The anchor groups (membership may overlap); ``alive`` is "in none of them".
GROUPS = ("vit_sink", "llm_sink", "dead")
#: How a group selects tokens: by anchor membership (reference, default) or exclusive label.
SELECTIONS = ("membership", "label")
OPS = ("baseline", "prune", "keep", "random_matched", "skip", "inject", "exit", "knockout", "prune_inject")
#: attention edges a knockout can cut (query side -> key side)
EDGES = ("visual->visual", "text->visual")


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
    """One intervention (docs/methods.md §4). Build with the functions below."""

    op: str
    groups: tuple[str, ...] = ()
    seed: int | None = None
    sublayers: tuple[float, ...] = ()  # skip: n = attention of layer n, n + 0.5 = MLP
    layer: int | None = None  # inject / exit / prune_inject
    edges: tuple[str, ...] = ()  # knockout: a subset of EDGES
    layer_range: tuple[int, int] | None = None  # knockout: [start, stop); None = every layer
    reference_layer0: bool = False  # skip: also cut text->visual attention at layer 0
    select: str = "membership"  # how `groups` pick tokens: see SELECTIONS and the module doc

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown intervention {self.op!r}; choose from {', '.join(OPS)}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        resolve_groups(self.groups)
        for s in self.sublayers:
            if not (float(s) * 2).is_integer() or s < 0:
                raise ValueError(f"sublayer {s!r}: use n (attention of layer n) or n + 0.5 (MLP)")
        if self.op in ("inject", "exit", "prune_inject") and (self.layer is None or self.layer < 0):
            raise ValueError(f"{self.op} needs a layer >= 0, got {self.layer!r}")
        if self.op == "random_matched" and self.seed is None:
            raise ValueError("random_matched needs a seed")
        if self.op == "prune_inject" and not self.groups:
            raise ValueError("prune_inject needs the groups to prune")
        if self.op == "knockout":
            bad = [e for e in self.edges if e not in EDGES]
            if bad or not self.edges:
                raise ValueError(f"knockout edges {list(self.edges)!r}: choose one or more of {', '.join(EDGES)}")
            if self.layer_range is not None:
                a, b = self.layer_range
                if not 0 <= a < b:
                    raise ValueError(f"knockout layers [{a}, {b}) must satisfy 0 <= start < stop")
        elif self.edges or self.layer_range is not None:
            raise ValueError(f"edges / layer_range belong to knockout, not {self.op!r}")
        if self.reference_layer0 and self.op != "skip":
            raise ValueError(f"reference_layer0 is a skip flag, not one of {self.op!r}")

    @property
    def labels(self) -> frozenset[str]:
        return resolve_groups(self.groups)

    def describe(self) -> str:
        g = "+".join(self.groups) + (" by label" if self.select == "label" else "")
        if self.op == "baseline":
            return "baseline"
        if self.op in ("prune", "keep"):
            return f"{self.op}({g})"
        if self.op == "random_matched":
            return f"random_matched({g}, seed={self.seed})"
        if self.op == "skip":
            return f"skip({g}, {list(self.sublayers)}" + (", reference_layer0)" if self.reference_layer0 else ")")
        if self.op == "knockout":
            span = "all layers" if self.layer_range is None else f"[{self.layer_range[0]}, {self.layer_range[1]})"
            return f"knockout({'+'.join(self.edges)}, {span})"
        if self.op == "prune_inject":
            return f"prune_inject({g}, {self.layer})"
        return f"{self.op}({self.layer})"


def baseline() -> Intervention:
    """No intervention: the model's own forward on the captured sequence."""
    return Intervention("baseline")


def prune(groups: Sequence[str], select: str = "membership") -> Intervention:
    """Delete the visual tokens of `groups` (selected by `select`) before layer 0
    (original position ids kept)."""
    return Intervention("prune", tuple(groups), select=select)


def keep(groups: Sequence[str], select: str = "membership") -> Intervention:
    """Keep only the visual tokens of `groups` (the complement of :func:`prune`)."""
    return Intervention("keep", tuple(groups), select=select)


def random_matched(groups: Sequence[str], seed: int, select: str = "membership") -> Intervention:
    """Per image, delete as many randomly chosen visual tokens from the *complement* of
    `groups` as `groups` hold (the reference's matched-size control); group size and
    complement are those of the selection `select`.

    An image whose groups are empty loses nothing. The reference deletes every visual
    token in that case (its index selection degenerates on an empty set); that is a bug
    of the control, not a property of it, and this project fixes it (reported as a
    deviation). When the complement is smaller than the groups, all of it is deleted.
    The choice is a function of (seed, image_id) only, so it is the same for every
    question about an image, in any batch and any order.
    """
    return Intervention("random_matched", tuple(groups), seed=int(seed), select=select)


def skip(groups: Sequence[str], sublayers: Iterable[float], select: str = "membership",
         reference_layer0: bool = False) -> Intervention:
    """Zero the residual update of `sublayers` for the tokens of `groups` (prefill).

    Sublayer ``n`` is the attention of decoder layer ``n`` (0-based), ``n + 0.5`` its MLP.
    The tokens still provide keys and values to the others.

    `reference_layer0`: the reference's layer-0 variant (our reading of its code, see
    docs/methods.md §4): when the attention of layer 0 is skipped (sublayer 0 listed), the
    text after the image (generated tokens included) also cannot attend the groups' tokens
    at layer 0. Without sublayer 0 the flag changes nothing.
    """
    subs = tuple(sorted({float(s) for s in sublayers}))
    return Intervention("skip", tuple(groups), sublayers=subs, select=select,
                        reference_layer0=bool(reference_layer0))


def inject(layer: int) -> Intervention:
    """Visual tokens bypass layers ``< layer``: the text runs alone through them, and the raw
    ``h[0]`` visual tokens join at their positions at the input of `layer`.
    ``inject(0)`` is the baseline; ``inject(num_layers)`` never lets the text see them."""
    return Intervention("inject", ("visual",), layer=int(layer))


def exit(layer: int) -> Intervention:  # noqa: A001 - the name docs/methods.md §4 uses
    """All visual tokens are dropped at the input of `layer` (absent from it on).
    ``exit(num_layers)`` is the baseline; ``exit(0)`` equals pruning every visual token."""
    return Intervention("exit", ("visual",), layer=int(layer))


def knockout(edges: str | Iterable[str], layers: tuple[int, int] | None = None) -> Intervention:
    """Attention knockouts in decoder layers ``layers = (start, stop)`` (half-open; None =
    every layer), on the prefill and on every generated token:

    * ``"visual->visual"``: a visual token cannot attend other visual tokens (it still
      attends itself and the text before it);
    * ``"text->visual"``: a text token after the first visual token (the question, an
      appended answer, every generated token) cannot attend any visual token.

    The tokens stay in the sequence and keep their positions; only mask entries change.
    """
    e = (edges,) if isinstance(edges, str) else tuple(edges)
    rng = None if layers is None else (int(layers[0]), int(layers[1]))
    return Intervention("knockout", ("visual",), edges=e, layer_range=rng)


def prune_inject(groups: Sequence[str], layer: int, select: str = "membership") -> Intervention:
    """The composite: delete the visual tokens of `groups` before layer 0 (as :func:`prune`),
    then the remaining visual tokens bypass layers ``< layer`` and join, as their raw
    ``h[0]``, at the input of `layer` (as :func:`inject`)."""
    return Intervention("prune_inject", tuple(groups), layer=int(layer), select=select)


exit_at = exit  # for callers that prefer not to shadow the builtin


def sublayers_for(kind: str, layers: Iterable[int]) -> tuple[float, ...]:
    """``"attn" | "mlp" | "both"`` over `layers` -> the sublayer numbers of :func:`skip`."""
    offs = {"attn": (0.0,), "mlp": (0.5,), "both": (0.0, 0.5)}
    if kind not in offs:
        raise ValueError(f"sublayers must be 'attn', 'mlp', 'both' or a list of numbers, got {kind!r}")
    return tuple(sorted(float(n) + o for n in layers for o in offs[kind]))
