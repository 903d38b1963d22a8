"""Report section "Methods and deviations": every procedure the analyses report about
themselves, and a checklist of the procedures docs/methods.md marks [ours] or deviating."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from ..display import callout, md, table
from ..inputs import ReportInputs

#: Procedures docs/methods.md marks [ours] (or where the project deviates), with the output
#: that documents each. The methods section lists every one, present or not.
EXPECTED_OURS: tuple[tuple[str, str, str], ...] = (
    ("anchor_discovery", "categorize", "Anchor discovery for models without configured anchors (§1)"),
    ("patch_compression_hitk", "probe", "Patch-compression check: label word among the h[0] neighbours, hit@k (§2)"),
    ("control_task", "probe", "Probe control task (Hewitt & Liang) instead of a per-value relabelling (§2)"),
    ("layer_alignment", "align", "Layer alignment with text hidden states (§3)"),
    ("random_matched_empty_groups", "compress", "random_matched deletes nothing when the groups are empty (§4)"),
)


def collect_methods_notes(inp: ReportInputs) -> pd.DataFrame:
    """Every ``methods_notes`` entry of the outputs (+ report-side notes), one row each."""
    rows = []

    def add(src: str, notes: Any) -> None:
        for n in notes or []:
            if isinstance(n, Mapping):
                rows.append({"tag": n.get("tag", ""), "procedure": n.get("procedure", ""), "source": src,
                             "text": n.get("text", "")})
            elif n:
                rows.append({"tag": "", "procedure": "", "source": src, "text": str(n)})

    add("categorize (summary.json)", (inp.cat_summary or {}).get("methods_notes"))
    add("anchors (anchors.json)", ((inp.anchors or {}).get("evidence") or {}).get("methods_notes"))
    add("anchors (anchors.json)", (inp.anchors or {}).get("methods_notes"))  # the model's anchors step
    add("layer lens (summary.json)", (inp.lens_info or {}).get("methods_notes"))
    add("probe (summary.json)", (inp.probe_summary or {}).get("methods_notes"))
    add("text states (summary.json)", (inp.text_states_summary or {}).get("methods_notes"))
    add("align (summary.json)", (inp.align_summary or {}).get("methods_notes"))
    add("compress (summary.json)", (inp.compress_summary or {}).get("methods_notes"))
    c = inp.compress
    if c is not None and not c.empty and "op" in c and (c["op"] == "random_matched").any():
        rows.append({"tag": "deviation", "procedure": "random_matched_empty_groups", "source": "report (docs/methods.md §4)",
                     "text": "random_matched: when the deleted groups are empty for an image, nothing is deleted "
                             "(the reference deletes every visual token in that case)."})
    if inp.categories is not None:
        rows.append({"tag": "ours", "procedure": "category_map_overlay", "source": "report",
                     "text": "Category maps stretch the model's patch grid over the whole image (padded to a "
                             "square first under preprocess: pad_square); processors that crop shift the true "
                             "positions."})
    df = pd.DataFrame(rows, columns=["tag", "procedure", "source", "text"])
    return df.drop_duplicates(["tag", "procedure", "text"])


def section_methods(inp: ReportInputs) -> list:
    """Section "Methods and deviations": the methods notes of every output and the checklist
    of :data:`EXPECTED_OURS` with each procedure's status in this run."""
    notes = collect_methods_notes(inp)
    out: list = [md("Every procedure the analyses report about themselves (`methods_notes` of each output). "
                    "**reference** = the paper's procedure reproduced; **ours** = this project's own procedure "
                    "(no released reference); **deviation** = where the project departs from the reference or "
                    "from docs/methods.md, and why.")]
    if notes.empty:
        out.append(callout("methods notes: no output carried any (all analyses missing?)"))
    else:
        n = notes.copy()
        n["tag"] = n["tag"].map(lambda t: f"[{t}]" if t else "")
        out.append(table(n))
    have = set(notes["procedure"]) if not notes.empty else set()
    anchor_src = (inp.anchors or {}).get("source") or (inp.cat_summary or {}).get("anchor_source")
    rows = []
    for proc, step, desc in EXPECTED_OURS:
        if proc in have:
            status = "used — documented above"
        elif proc == "anchor_discovery" and anchor_src == "configured":
            status = "not used: anchors configured"
        else:
            key = {"categorize": "categorize", "probe": "probe", "align": "align", "compress": "compress"}[step]
            status = f"not in this report: {inp.why(key)}" if key in inp.missing else "not used by this run"
        rows.append({"[ours] / deviation (docs/methods.md)": desc, "status": status})
    out.append(md("**Checklist of the procedures docs/methods.md marks [ours] or where the project deviates:**"))
    out.append(table(pd.DataFrame(rows)))
    other = []
    for src, s in (("anchors", inp.anchors_summary), ("categorize", inp.cat_summary),
                   ("probe", inp.probe_summary), ("align", inp.align_summary), ("lens", inp.lens_info),
                   ("text states", inp.text_states_summary), ("compress", inp.compress_summary)):
        for n in (s or {}).get("notes", []) or []:
            other.append({"step": src, "note": str(n)})
    if other:
        out.append(md("Notes the analyses recorded:"))
        out.append(table(pd.DataFrame(other)))
    return out
