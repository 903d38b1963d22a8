"""The paper's findings, claim by claim, on one model's workflow results (a reading aid, not a test).

Reads what `make run` (or ``snakemake results/analysis/<model>/...``) wrote under
``results/analysis/<model>/`` and prints, per data set, one markdown row per claim of
"What Do Visual Tokens Really Encode?" (arXiv 2603.00510) with the numbers it rests on:

1. alive share (paper: about 60 % of the visual tokens alive);
2. sinks and dead tokens removable (paper: pruning them costs little, unlike removing as
   many random tokens): Δ accuracy of prune_sinks / prune_dead / keep_alive against their
   matched random controls (compress step, all items, 95 % paired bootstrap CI);
3. the LLM's visual computation largely redundant (paper: skipping attention/MLP of the
   visual tokens costs little): accuracy kept under skip_*_visual, as a share of the
   baseline's accuracy above chance;
4. injection mid-way suffices (paper: inject at an intermediate layer keeps accuracy);
5. alive tokens align with intermediate layers (align step: best layer of h0/alive, CI);
6. alive tokens encode attributes before the LLM (probe step: best accuracy on h0 of the
   alive tokens vs the majority baseline and the control task's selectivity).

"Kept above chance" = (accuracy - chance) / (baseline - chance); 1 = nothing lost,
0 = chance. A condition the plan removes nothing from is reported as such, never scored.

    python benchmarks/paper_findings.py results/analysis/embedlens-mini
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from embedlens.compress.aggregate import unmatched_note, unmatched_random_controls


def _kept(acc: float, base: float, chance: float) -> str:
    if base - chance <= 1e-9:
        return "baseline at chance"
    return f"{(acc - chance) / (base - chance):.0%} kept above chance"


def _compress_rows(path: Path) -> pd.DataFrame | None:
    f = path / "compress" / "compress.parquet"
    if not f.is_file():
        return None
    d = pd.read_parquet(f)
    d = d[(d.item_type == "all") & d.seed.isna()]  # seeds averaged for the random controls
    return d.set_index("condition")


def _row(c: pd.DataFrame, name: str, base: float, chance: float) -> str:
    if name not in c.index:
        return f"{name}: not run"
    r = c.loc[name]
    if bool(r.nothing_removed):
        return f"{name}: nothing removed"
    delta = "" if pd.isna(r.delta) else f" (Δ {r.delta:+.2f} [{r.delta_ci_low:+.2f}, {r.delta_ci_high:+.2f}])"
    return f"{name}: {r.accuracy:.2f}{delta}, {_kept(r.accuracy, base, chance)}, tokens kept {r.tokens_kept_frac:.0%}"


def _unmatched(unmatched: list[dict], a: str, b: str) -> str:
    """A warning when the random control ``b`` did not remove as many tokens as ``a``
    (``unmatched``: `embedlens.compress.aggregate.unmatched_random_controls` of the table)."""
    return "".join(f" ({unmatched_note(u)})" for u in unmatched if u["control"] == b and u["condition"] == a)


def findings(model_dir: Path) -> list[str]:
    """Markdown lines: one table per data set under ``model_dir``."""
    out = [f"# Paper findings on {model_dir.name}", ""]
    for ds in sorted(p for p in model_dir.iterdir() if (p / "categorize").is_dir()):
        out += [f"## {ds.name}", "", "| claim | measured |", "|---|---|"]
        cat = json.loads((ds / "categorize" / "summary.json").read_text())["results"]
        shares = cat["shares"]["topk"]
        out.append(f"| ≈60 % of visual tokens alive | alive {shares['alive']:.0%} (ViT sink {shares['vit_sink']:.0%}, "
                   f"LLM sink {shares['llm_sink']:.0%}, dead {shares['dead']:.0%}; {cat['n_tokens']} tokens, "
                   f"{cat['n_images']} images) |")
        c = _compress_rows(ds)
        if c is not None and "baseline" in c.index:
            base, chance = float(c.loc["baseline"].accuracy), float(c.loc["baseline"].chance)
            head = f"baseline {base:.2f}, chance {chance:.2f}, {int(c.loc['baseline'].n_items)} items"
            pairs = [("prune_sinks", "random_sinks"), ("prune_dead", "random_dead"), ("keep_alive", "random_keep_alive")]
            unmatched = unmatched_random_controls(c.reset_index())
            out.append("| sinks and dead removable, unlike matched random | " + head + "; " + "; ".join(
                f"{_row(c, a, base, chance)} vs {_row(c, b, base, chance)}{_unmatched(unmatched, a, b)}"
                for a, b in pairs)
                + " |")
            skips = [n for n in c.index if n.startswith("skip_")]
            out.append("| visual computation in the LLM redundant (skip) | " + "; ".join(
                _row(c, n, base, chance) for n in skips) + " |")
            inj = [n for n in c.index if n.startswith(("inject_", "exit_"))]
            out.append("| injecting mid-way suffices | " + "; ".join(_row(c, n, base, chance) for n in inj) + " |")
        al = ds / "align" / "summary.json"
        if al.is_file():
            res = json.loads(al.read_text())
            best = res["results"]["best_layer"].get("h0/alive") or res["results"]["best_layer"].get("h0/all")
            n_layers = res["settings"]["layers"][-1]
            out.append(f"| alive tokens align with intermediate layers | best layer {best['layer']} of {n_layers} "
                       f"(95 % CI {best['layer_ci'][0]}-{best['layer_ci'][1]}; {best['criterion']} "
                       f"{best['value']:.2f} vs {best['value_at_layer0']:.2f} at layer 0) |")
        pr = ds / "probe" / "probe.parquet"
        if pr.is_file():
            p = pd.read_parquet(pr)
            ok = p[(p.status == "ok") & (p.feature == "h0") & (p.group == "alive")]
            cells = [f"{r.task} {r.accuracy:.2f} (majority {r.majority_accuracy:.2f}, selectivity {r.selectivity:+.2f})"
                     for r in ok.itertuples()]
            # an empty table: the data set has no per-token labels to probe (e.g. skimage)
            why = ("no probe: the data set has no token labels" if p.empty
                   else "no probe of alive tokens on h0 succeeded (see probe.parquet's status/reason)")
            out.append("| alive tokens encode attributes before the LLM (probe on h0) | "
                       + ("; ".join(cells) or why) + " |")
        out.append("")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", help="results/analysis/<model>")
    a = ap.parse_args(argv)
    print("\n".join(findings(Path(a.model_dir))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
