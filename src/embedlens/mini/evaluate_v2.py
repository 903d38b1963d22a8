"""Held-out evaluation of embedlens-mini v2 (and v1 on the same items): by item type and
format, against chance, with greedy answers.

Items come from composed scenes (`embedlens.mini.compose`) of ``V2_EVAL_SEED``, disjoint
from every training seed (the objects are the same catalogue: new compositions of seen
objects, not unseen objects). Two measures:

* **closed-set items** (yes/no, multiple-choice letters, colour, count, letter, shape): every
  choice scored by its length-normalized log-likelihood as the assistant's answer
  (`embedlens.vqa.score_choices`); chance = 1 / number of choices;
* **greedy answers** (max 24 new tokens; 32 for captions) for every item of the first
  ``greedy_scenes`` scenes and for the open items (object names, grounding) of all scenes:
  exact match after lower-casing and stripping a final ".", grounding as lmms-eval scores it
  (first "[x1, y1, x2, y2]" in the answer; accuracy = IoU ≥ 0.5). Grounding's "chance" is the
  share of items a constant centre box [0.25, 0.25, 0.75, 0.75] gets right.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from embedlens.vqa import PrefixCache, score_choices

from .compose import make_scenes, vocabulary
from .evaluate import greedy_caption
from .sources import load_catalogue
from .train import load_model
from .train_v2 import V2_DATA_SEED_BASE, V2_EVAL_SEED

_BOX_RE = re.compile(r"\[\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?)\s*\]")
CENTRE_BOX = (0.25, 0.25, 0.75, 0.75)
OPEN_TYPES = ("object", "grounding")


def parse_box(text: str) -> list[float] | None:
    """The first "[x1, y1, x2, y2]" in ``text`` (lmms-eval's RefCOCO parser), or None."""
    m = _BOX_RE.search(text or "")
    return [float(m.group(i)) for i in range(1, 5)] if m else None


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (0 when either is empty)."""
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _norm(s: str) -> str:
    return (s or "").strip().lower().rstrip(".").strip()


def _key(item) -> str:
    return f"{item.format}/{item.type}"


@torch.no_grad()
def evaluate_variant(model, processor, scenes, greedy_scenes: int, progress: bool = True) -> dict[str, Any]:
    """Rows of closed-set scores and greedy answers for one model over ``scenes``."""
    from tqdm.auto import tqdm

    closed, greedy, samples = [], [], []
    for si, sc in enumerate(tqdm(scenes, desc="eval v2", unit="scene", disable=not progress)):
        cache = PrefixCache()
        for it in sc.items:
            if it.choices:
                cs = score_choices(model, processor, sc.image, it.prompt, it.choices, prefix_cache=cache)
                closed.append({"key": _key(it), "correct": _norm(cs.pred) == _norm(it.answer),
                               "n_choices": len(it.choices)})
            if si < greedy_scenes or it.type in OPEN_TYPES:
                n_new = 32 if it.type == "caption" else 24
                ans = greedy_caption(model, processor, sc.image, it.prompt, max_new_tokens=n_new)
                if it.type == "grounding":
                    truth, pred = parse_box(it.answer), parse_box(ans)
                    ok = pred is not None and iou(pred, truth) >= 0.5
                    base = iou(CENTRE_BOX, truth) >= 0.5
                else:
                    ok, base = _norm(ans) == _norm(it.answer), None
                greedy.append({"key": _key(it), "correct": bool(ok), "baseline": base,
                               "n_choices": len(it.choices) or None})
                if si < greedy_scenes:
                    samples.append({"image_id": sc.image_id, "key": _key(it), "question": it.prompt.split("\n")[0][-80:],
                                    "truth": it.answer, "answer": ans})
    return {"closed": _table(closed), "greedy": _table(greedy), "samples": samples}


def _table(rows: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key in sorted({r["key"] for r in rows}):
        rs = [r for r in rows if r["key"] == key]
        n = len(rs)
        acc = sum(r["correct"] for r in rs) / n
        if rs[0].get("baseline") is not None:
            chance = sum(bool(r["baseline"]) for r in rs) / n
        elif rs[0].get("n_choices"):
            chance = sum(1 / r["n_choices"] for r in rs) / n
        else:
            chance = None
        out[key] = {"n": n, "accuracy": acc, "se": math.sqrt(max(acc * (1 - acc), 1e-12) / n), "chance": chance}
    return out


def heldout_scenes(n_scenes: int, objects_dir: Path | str, seed: int = V2_EVAL_SEED) -> list:
    """The held-out scenes every v2 evaluation uses: ``n_scenes`` new compositions (compose
    ``seed``) of the training vocabulary (`embedlens.mini.compose.vocabulary`).

    Raises:
        ValueError: ``seed`` may overlap the training scenes.
        FileNotFoundError: ``objects_dir`` holds no catalogue.
    """
    if V2_DATA_SEED_BASE <= int(seed) < V2_DATA_SEED_BASE + 100_000:
        raise ValueError(f"held-out scenes: seed {seed} may overlap the training scenes "
                         f"(training uses compose seeds {V2_DATA_SEED_BASE} + training seed)")
    return make_scenes(int(n_scenes), int(seed), vocabulary(load_catalogue(objects_dir)))


def evaluate_v2(models: dict[str, Path | str], objects_dir: Path | str, n_scenes: int = 60,
                seed: int = V2_EVAL_SEED, greedy_scenes: int = 10, out_json: Path | str | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Evaluate each model directory of ``models`` (label → directory) on the same
    ``n_scenes`` held-out scenes; write ``out_json`` and a markdown table beside it (``.md``).

    Raises:
        ValueError: ``seed`` may overlap the training scenes.
    """
    scenes = heldout_scenes(n_scenes, objects_dir, seed)
    report: dict[str, Any] = {"n_scenes": len(scenes), "seed": int(seed), "greedy_scenes": int(greedy_scenes),
                              "variants": {}}
    for label, d in models.items():
        t = time.perf_counter()
        model, processor = load_model(d)
        res = evaluate_variant(model, processor, scenes, int(greedy_scenes), progress)
        res["seconds"] = time.perf_counter() - t
        report["variants"][label] = res
        del model
    report["markdown"] = markdown(report)
    if out_json:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=1))
        out_json.with_suffix(".md").write_text(report["markdown"])
    return report


def markdown(report: dict[str, Any]) -> str:
    """One table per measure: rows = format/type, columns = n, chance, each variant."""
    labels = list(report["variants"])
    lines = [f"Held-out composed scenes: {report['n_scenes']} (compose seed {report['seed']}).", ""]
    for measure, title in (("closed", "Closed-set items, answer log-likelihood"),
                           ("greedy", "Greedy answers (exact match; grounding: IoU >= 0.5)")):
        keys = sorted({k for v in labels for k in report["variants"][v][measure]})
        lines += [f"**{title}**", "", "| format / item type | n | chance | " + " | ".join(labels) + " |",
                  "|" + "---|" * (3 + len(labels))]
        for k in keys:
            first = next(report["variants"][v][measure][k] for v in labels if k in report["variants"][v][measure])
            ch = "–" if first["chance"] is None else f"{first['chance']:.2f}"
            cells = [(f"{r['accuracy']:.2f} ± {r['se']:.2f}" if (r := report["variants"][v][measure].get(k)) else "–")
                     for v in labels]
            lines.append(f"| {k} | {first['n']} | {ch} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="evaluate embedlens-mini v2 (and others) on held-out composed scenes")
    ap.add_argument("--model", nargs="+", required=True, help="LABEL=DIR")
    ap.add_argument("--objects", default="resources/mini-data/objects")
    ap.add_argument("--n-scenes", type=int, default=60)
    ap.add_argument("--greedy-scenes", type=int, default=10)
    ap.add_argument("--out", default="results/mini/eval_v2.json")
    a = ap.parse_args(argv)
    models = dict(m.split("=", 1) for m in a.model)
    rep = evaluate_v2(models, a.objects, a.n_scenes, greedy_scenes=a.greedy_scenes, out_json=a.out)
    print(rep["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
