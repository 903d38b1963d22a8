"""The compression benchmark's conditions (docs/methods.md §4): the presets (``default``,
``paper``) and the parsing of ``config.yaml``'s ``compress.conditions`` into variants (one
per seed for ``random_matched``), with a clear error naming the bad condition.

A condition that picks token groups may carry ``select: membership | label`` (default
``membership``, the reference semantics; :class:`embedlens.compress.plan.TokenGroups`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from . import interventions as iv

_CONDITION_KEYS = {
    "baseline": {"name", "op"},
    "prune": {"name", "op", "groups", "select"},
    "keep": {"name", "op", "groups", "select"},
    "random_matched": {"name", "op", "groups", "seeds", "select"},
    "skip": {"name", "op", "groups", "sublayers", "layers", "select", "reference_layer0"},
    "inject": {"name", "op", "layer", "groups", "select"},
    "exit": {"name", "op", "layer", "groups", "select"},
    "knockout": {"name", "op", "edges", "layers"},
    "prune_inject": {"name", "op", "groups", "layer", "select"},
}
SINKS = ["vit_sink", "llm_sink"]
#: The named condition lists of :func:`default_conditions` (``compress.conditions`` may name one).
PRESETS = ("default", "paper")


# =========================================================================== conditions
def default_conditions(num_layers: int, best_aligned_layer: int | None = None,
                       preset: str = "default") -> list[dict]:
    """The condition list of `preset` (docs/methods.md §4) for a decoder of `num_layers`
    layers: ``"default"`` (small, below) or ``"paper"`` (:func:`paper_conditions`).

    Raises:
        ValueError: an unknown preset or `num_layers` < 1.
    """
    if preset == "paper":
        return paper_conditions(num_layers, best_aligned_layer)
    if preset != "default":
        raise ValueError(f"unknown compress conditions preset {preset!r}; choose from {', '.join(PRESETS)} "
                         "or give a list of conditions")
    return _default_preset(num_layers, best_aligned_layer)


def _default_preset(num_layers: int, best_aligned_layer: int | None) -> list[dict]:
    """The ``"default"`` preset.

    baseline; prune sinks; prune dead; keep alive only; matched random controls for the
    same three deletions (seeds from the run); skip attention / MLP / both of all visual
    tokens over every layer, and both over the upper half; inject and exit at the quarter
    points (plus the best-aligned layer of §3 for inject when given), restricted to
    ``1..num_layers-1`` (``inject(0)``/``exit(num_layers)`` are the baseline and
    ``inject(num_layers)``/``exit(0)`` equal pruning every visual token).
    """
    N = int(num_layers)
    if N < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    conds: list[dict] = [
        {"name": "baseline", "op": "baseline"},
        {"name": "prune_sinks", "op": "prune", "groups": list(SINKS)},
        {"name": "prune_dead", "op": "prune", "groups": ["dead"]},
        {"name": "keep_alive", "op": "keep", "groups": ["alive"]},
        {"name": "random_sinks", "op": "random_matched", "groups": list(SINKS)},
        {"name": "random_dead", "op": "random_matched", "groups": ["dead"]},
        {"name": "random_keep_alive", "op": "random_matched", "groups": [*SINKS, "dead"]},
        {"name": "skip_attn_visual", "op": "skip", "groups": ["visual"], "sublayers": "attn", "layers": [0, N]},
        {"name": "skip_mlp_visual", "op": "skip", "groups": ["visual"], "sublayers": "mlp", "layers": [0, N]},
        {"name": "skip_both_visual", "op": "skip", "groups": ["visual"], "sublayers": "both", "layers": [0, N]},
    ]
    if N >= 2:
        conds.append({"name": f"skip_both_visual_L{N // 2}-{N}", "op": "skip", "groups": ["visual"],
                      "sublayers": "both", "layers": [N // 2, N]})
    inject_at, exit_at = _inject_layers(N, best_aligned_layer)
    conds += [{"name": f"inject_L{L}", "op": "inject", "layer": L} for L in inject_at]
    conds += [{"name": f"exit_L{L}", "op": "exit", "layer": L} for L in exit_at]
    return conds


def _inject_layers(N: int, best_aligned_layer: int | None) -> tuple[list[int], list[int]]:
    """(inject layers, exit layers): the quarter points, plus the best-aligned layer for
    inject, restricted to 1..N-1 (the ends are the baseline or prune-everything)."""
    quarter = {N // 4, N // 2, (3 * N) // 4}
    inject_at = quarter | ({int(best_aligned_layer)} if best_aligned_layer is not None else set())
    return (sorted(x for x in inject_at if 1 <= x <= N - 1), sorted(x for x in quarter if 1 <= x <= N - 1))


def paper_conditions(num_layers: int, best_aligned_layer: int | None = None) -> list[dict]:
    """The ``"paper"`` preset: the reference experiments (docs/methods.md §4), selection by
    membership.

    * baseline;
    * prune ``vit_sink`` / ``llm_sink`` / both sinks / ``dead`` / sinks + dead, each with
      its ``random_matched`` control (``random_<...>``); keeping the alive tokens is the
      same token set as pruning sinks + dead under either selection (alive = in no group),
      so it is one row, ``keep_alive`` (with ``random_keep_alive``);
    * the MLP skip family: the MLP of every visual token over all layers, the lower half,
      the upper half; the attention of visual tokens over the same ranges; the
      reference's layer-0 attention skip (``reference_layer0``, which also cuts
      text->visual attention at layer 0) beside the plain layer-0 attention skip;
    * inject and exit at the quarter points (inject also at `best_aligned_layer`);
    * attention knockouts ``visual->visual`` and ``text->visual`` over all layers and each
      half (not in the reference);
    * the composite: prune sinks + dead, then inject the remaining (alive) tokens at the
      best-aligned layer (else the middle layer) (``prune_inject``; not in the reference).

    Raises:
        ValueError: `num_layers` < 1.
    """
    N = int(num_layers)
    if N < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    h = max(1, N // 2)
    halves = [("", [0, N])] + ([(f"_L0-{h}", [0, h]), (f"_L{h}-{N}", [h, N])] if N >= 2 else [])
    conds: list[dict] = [{"name": "baseline", "op": "baseline"}]
    targets = [("vit_sink", ["vit_sink"]), ("llm_sink", ["llm_sink"]), ("sinks", list(SINKS)),
               ("dead", ["dead"])]
    for name, groups in targets:
        conds.append({"name": f"prune_{name}", "op": "prune", "groups": groups})
    conds.append({"name": "keep_alive", "op": "keep", "groups": ["alive"]})
    for name, groups in targets:
        conds.append({"name": f"random_{name}", "op": "random_matched", "groups": groups})
    conds.append({"name": "random_keep_alive", "op": "random_matched", "groups": [*SINKS, "dead"]})
    for kind in ("mlp", "attn"):
        for suffix, lay in halves:
            conds.append({"name": f"skip_{kind}_visual{suffix}", "op": "skip", "groups": ["visual"],
                          "sublayers": kind, "layers": lay})
    conds.append({"name": "skip_attn_visual_L0", "op": "skip", "groups": ["visual"], "sublayers": "attn",
                  "layers": [0, 1]})
    conds.append({"name": "skip_attn_visual_L0_reference", "op": "skip", "groups": ["visual"],
                  "sublayers": "attn", "layers": [0, 1], "reference_layer0": True})
    inject_at, exit_at = _inject_layers(N, best_aligned_layer)
    conds += [{"name": f"inject_L{L}", "op": "inject", "layer": L} for L in inject_at]
    conds += [{"name": f"exit_L{L}", "op": "exit", "layer": L} for L in exit_at]
    for edges, tag in (("visual->visual", "visual_visual"), ("text->visual", "text_visual")):
        for suffix, lay in halves:
            conds.append({"name": f"knockout_{tag}{suffix}", "op": "knockout", "edges": edges, "layers": lay})
    L = int(best_aligned_layer) if best_aligned_layer is not None and 1 <= best_aligned_layer <= N - 1 else N // 2
    if 1 <= L <= N - 1:
        conds.append({"name": f"prune_sinks_dead_inject_L{L}", "op": "prune_inject",
                      "groups": [*SINKS, "dead"], "layer": L})
    return conds


@dataclass
class Variant:
    """One run of one condition (random_matched: one per seed)."""

    name: str
    op: str
    condition: dict
    intervention: iv.Intervention
    seed: int | None = None
    n_seeds: int = 1

    @property
    def key(self) -> tuple[str, int | None]:
        return self.name, self.seed


def _default_name(c: dict, op: str) -> str:
    g = "_".join(c.get("groups") or []) + ("_label" if c.get("select") == "label" else "")
    if op == "baseline":
        return "baseline"
    if op in ("prune", "keep"):
        return f"{op}_{g}"
    if op == "random_matched":
        return f"random_{g}"
    if op == "skip":
        sub = c.get("sublayers", "both")
        sub = sub if isinstance(sub, str) else "custom"
        lay = c.get("layers")
        ref0 = "_ref0" if c.get("reference_layer0") else ""
        return (f"skip_{sub}_{g or 'visual'}" + (f"_L{lay[0]}-{lay[1]}" if isinstance(lay, (list, tuple)) else "")
                + ref0)
    if op == "knockout":
        e = c.get("edges")
        e = [e] if isinstance(e, str) else list(e or [])
        lay = c.get("layers")
        return ("knockout_" + "_".join(x.split("->")[0][0] + "2" + x.split("->")[1][0] for x in e)
                + (f"_L{lay[0]}-{lay[1]}" if isinstance(lay, (list, tuple)) else ""))
    if op == "prune_inject":
        return f"prune_{g}_inject_L{c.get('layer')}"
    return f"{op}_L{c.get('layer')}"


def parse_conditions(conditions: Sequence[dict], num_layers: int, seeds: Iterable[int] = (0, 1, 2)) -> list[Variant]:
    """Validate condition dicts and expand them into variants (one per seed for random)."""
    N = int(num_layers)
    out: list[Variant] = []
    names: set[str] = set()
    for i, c in enumerate(conditions):
        where = f"compress condition #{i}" + (f" ({c.get('name')!r})" if isinstance(c, dict) and "name" in c else "")
        if not isinstance(c, dict) or "op" not in c:
            raise ValueError(f"{where}: a condition is a mapping with an 'op' key, got {c!r}")
        op = c["op"]
        if op not in _CONDITION_KEYS:
            raise ValueError(f"{where}: unknown op {op!r}; choose from {', '.join(_CONDITION_KEYS)}")
        unknown = set(c) - _CONDITION_KEYS[op]
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for op {op!r}; "
                             f"allowed: {sorted(_CONDITION_KEYS[op])}")
        groups = c.get("groups")
        if op in ("prune", "keep", "random_matched", "prune_inject") and not groups:
            raise ValueError(f"{where}: op {op!r} needs a non-empty 'groups' list")
        if groups is not None:
            if isinstance(groups, str) or not all(isinstance(g, str) for g in groups):
                raise ValueError(f"{where}: 'groups' must be a list of group names, got {groups!r}")
            try:
                iv.resolve_groups(groups)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        if c.get("select", "membership") not in iv.SELECTIONS:
            raise ValueError(f"{where}: 'select' must be one of {', '.join(iv.SELECTIONS)}, got {c['select']!r}")
        name = str(c.get("name") or _default_name(c, op))
        if name in names:
            raise ValueError(f"{where}: duplicate condition name {name!r}")
        names.add(name)
        try:
            variants = _variants(c, op, name, N, tuple(groups or ()), seeds)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
        out.extend(variants)
    return out


def _layer_arg(value, N: int, op: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"'layer' must be an integer, got {value!r}")
    L = int(value) + N if value < 0 else int(value)
    if not 0 <= L <= N:
        raise ValueError(f"{op} layer {value} out of range 0..{N} (the model has {N} decoder layers)")
    return L


def _layer_range(lay, N: int) -> tuple[int, int]:
    """``layers: [start, stop)`` (negative = from the end) or ``"all"`` -> (start, stop)."""
    if lay == "all":
        lay = [0, N]
    if not (isinstance(lay, (list, tuple)) and len(lay) == 2):
        raise ValueError(f"'layers' must be [start, stop) or 'all', got {lay!r}")
    a, b = (int(x) + N if int(x) < 0 else int(x) for x in lay)
    if not 0 <= a < b <= N:
        raise ValueError(f"'layers' [{lay[0]}, {lay[1]}) must satisfy 0 <= start < stop <= {N}")
    return a, b


def _variants(c: dict, op: str, name: str, N: int, groups: tuple, seeds) -> list[Variant]:
    cond = dict(c, name=name)
    sel = c.get("select", "membership")
    if op == "baseline":
        return [Variant(name, op, cond, iv.baseline())]
    if op == "prune":
        return [Variant(name, op, cond, iv.prune(groups, sel))]
    if op == "keep":
        return [Variant(name, op, cond, iv.keep(groups, sel))]
    if op == "random_matched":
        ss = c.get("seeds", list(seeds))
        if isinstance(ss, (int, np.integer)):
            ss = [ss]
        ss = [int(s) for s in ss]
        if not ss or len(set(ss)) != len(ss):
            raise ValueError(f"'seeds' must be a non-empty list of distinct integers, got {ss!r}")
        cond["seeds"] = ss  # the seeds actually used, for the params column
        return [Variant(name, op, cond, iv.random_matched(groups, s, sel), seed=s, n_seeds=len(ss)) for s in ss]
    if op == "knockout":
        edges = c.get("edges")
        edges = [edges] if isinstance(edges, str) else edges
        if not edges or not isinstance(edges, (list, tuple)) or not all(isinstance(e, str) for e in edges):
            raise ValueError(f"'edges' must be one or a list of {', '.join(iv.EDGES)}, got {c.get('edges')!r}")
        a, b = _layer_range(c.get("layers", [0, N]), N)
        return [Variant(name, op, cond, iv.knockout(edges, (a, b)))]
    if op == "prune_inject":
        if "layer" not in c:
            raise ValueError("op 'prune_inject' needs 'layer'")
        return [Variant(name, op, cond, iv.prune_inject(groups, _layer_arg(c["layer"], N, op), select=sel))]
    if op == "skip":
        g = groups or ("visual",)
        sub = c.get("sublayers", "both")
        ref0 = c.get("reference_layer0", False)
        if not isinstance(ref0, bool):
            raise ValueError(f"'reference_layer0' must be true or false, got {ref0!r}")
        if isinstance(sub, str):
            a, b = _layer_range(c.get("layers", [0, N]), N)
            subl = iv.sublayers_for(sub, range(a, b))
        else:
            if "layers" in c:
                raise ValueError("give 'layers' only with sublayers 'attn' | 'mlp' | 'both'")
            subl = tuple(float(s) for s in sub)
            bad = [s for s in subl if not 0 <= s < N or not (2 * s).is_integer()]
            if bad or not subl:
                raise ValueError(f"sublayers {bad or sub!r}: use n (attention of layer n) or n + 0.5 "
                                 f"(its MLP) with 0 <= n < {N}")
        return [Variant(name, op, cond, iv.skip(g, subl, sel, reference_layer0=ref0))]
    # inject / exit
    if "layer" not in c:
        raise ValueError(f"op {op!r} needs 'layer'")
    L = _layer_arg(c["layer"], N, op)
    base = iv.inject(L) if op == "inject" else iv.exit(L)
    if groups:  # optional restriction to some visual groups (default: all visual tokens)
        base = iv.Intervention(op, tuple(groups), layer=L, select=sel)
    return [Variant(name, op, cond, base)]


# =========================================================================== statistics
