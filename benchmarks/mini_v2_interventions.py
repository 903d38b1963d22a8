"""Compute-removing interventions on embedlens-mini v1/v2, on the held-out composed scenes of
`embedlens.mini.evaluate_v2` (issue 16's check: on v2, skipping the attention of the visual
tokens in the upper half of the layers costs less than 50 % of the baseline accuracy).

Every closed-set item (yes/no, letters, colour, count, ...) of the first ``--n-scenes``
held-out scenes (compose seed ``V2_EVAL_SEED``, never a training seed) is scored under each
condition with the compression benchmark's own machinery (`embedlens.compress`: the
model's own input merge captured, the item's choices packed after one copy of the prompt,
answers by length-normalized log-likelihood, interventions through hooks), with the prompt
and choice framing of `embedlens.vqa.score_choices` (the chat template, no answer prefix),
i.e. the framing `evaluate_v2` and the v2 training use. Conditions are compress condition
dicts (`embedlens.compress.conditions.parse_conditions`); the baseline runs through the
same path, so a condition's accuracy is compared with a baseline computed the same way.

    python benchmarks/mini_v2_interventions.py --model v1=DIR v2=DIR [--n-scenes 60] \
        [--out results/mini/interventions_v2.json]

Writes JSON (per model and condition: accuracy by format/type and overall, chance, n) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from embedlens import vqa
from embedlens.compress import interventions as iv
from embedlens.compress.benchmark import _Item, _Scorer
from embedlens.compress.conditions import parse_conditions
from embedlens.mini.evaluate_v2 import heldout_scenes
from embedlens.mini.train_v2 import V2_EVAL_SEED


def conditions_for(N: int) -> list[dict]:
    """Baseline; skip attention / MLP of every visual token over the upper half and over all
    layers (the compression benchmark's definitions)."""
    h = N // 2
    return [
        {"name": "baseline", "op": "baseline"},
        {"name": f"skip_attn_visual_L{h}-{N}", "op": "skip", "groups": ["visual"], "sublayers": "attn",
         "layers": [h, N]},
        {"name": "skip_attn_visual", "op": "skip", "groups": ["visual"], "sublayers": "attn", "layers": [0, N]},
        {"name": f"skip_mlp_visual_L{h}-{N}", "op": "skip", "groups": ["visual"], "sublayers": "mlp",
         "layers": [h, N]},
    ]


def _acc(rows: list[dict]) -> dict:
    n = len(rows)
    acc = sum(r["correct"] for r in rows) / n
    return {"n": n, "accuracy": acc, "se": math.sqrt(max(acc * (1 - acc), 1e-12) / n),
            "chance": sum(1 / r["n_choices"] for r in rows) / n}


@torch.no_grad()
def run(models: dict[str, str], objects: str, n_scenes: int, batch_size: int = 8, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    scenes = heldout_scenes(n_scenes, objects)
    report = {"n_scenes": len(scenes), "seed": V2_EVAL_SEED, "models": {}}
    for label, d in models.items():
        t0 = time.perf_counter()
        model, processor, adapter = iv.load_model(d)
        N = adapter.num_layers
        variants = parse_conditions(conditions_for(N), N)
        scorer = _Scorer(model, N, batch_size, pack=True)
        items, meta = [], []
        for sc in scenes:
            for it in sc.items:
                if not it.choices:
                    continue
                inputs = vqa.prepare_prompt(processor, sc.image, it.prompt)
                seq = iv.capture_sequence(model, inputs, sc.image_id)
                answers = vqa.choice_token_ids(processor, it.choices)
                groups = iv.TokenGroups.from_labels(["alive"] * seq.n_visual)  # "visual" = every token
                items.append(_Item(len(items), {"image_id": sc.image_id}, seq, answers, groups))
                meta.append({"key": f"{it.format}/{it.type}", "answer": it.answer, "choices": list(it.choices)})
        res = {}
        for v in tqdm(variants, desc=f"{label} conditions", disable=not progress):
            scores = scorer.score(items, v)
            rows = []
            for it, m in zip(items, meta, strict=True):
                pred = m["choices"][int(np.argmax(scores[it.index]))]
                rows.append({"key": m["key"], "correct": pred.strip().lower() == m["answer"].strip().lower(),
                             "n_choices": len(m["choices"])})
            by = {k: _acc([r for r in rows if r["key"] == k]) for k in sorted({r["key"] for r in rows})}
            res[v.name] = {"all": _acc(rows), "by_type": by, "condition": v.condition}
        base = res["baseline"]["all"]
        for name, r in res.items():
            a, ch, b = r["all"]["accuracy"], r["all"]["chance"], base["accuracy"]
            r["retained_of_baseline"] = a / b if b > 0 else float("nan")
            r["retained_above_chance"] = (a - ch) / (b - ch) if b - ch > 0 else float("nan")
        report["models"][label] = {"model_dir": str(d), "num_layers": N, "n_items": len(items),
                                   "conditions": res, "seconds": time.perf_counter() - t0}
        del model
    return report


def markdown(rep: dict) -> str:
    labels = list(rep["models"])
    conds = list(next(iter(rep["models"].values()))["conditions"])
    lines = [f"Held-out composed scenes: {rep['n_scenes']} (compose seed {rep['seed']}); closed-set items, "
             "all formats pooled; accuracy ± s.e. (retained share of the baseline; of its part above chance)", "",
             "| condition | chance | " + " | ".join(labels) + " |", "|" + "---|" * (2 + len(labels))]
    for c in conds:
        first = rep["models"][labels[0]]["conditions"][c]["all"]
        cells = []
        for m in labels:
            r = rep["models"][m]["conditions"][c]
            cells.append(f"{r['all']['accuracy']:.3f} ± {r['all']['se']:.3f} "
                         f"({r['retained_of_baseline']:.0%}; {r['retained_above_chance']:.0%})")
        lines.append(f"| {c} | {first['chance']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", required=True, help="LABEL=DIR")
    ap.add_argument("--objects", default="resources/mini-data/objects")
    ap.add_argument("--n-scenes", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="results/mini/interventions_v2.json")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    rep = run(dict(m.split("=", 1) for m in a.model), a.objects, a.n_scenes, a.batch_size)
    rep["markdown"] = markdown(rep)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1, default=str))
    out.with_suffix(".md").write_text(rep["markdown"])
    print(rep["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
