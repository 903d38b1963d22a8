"""Evaluate ``embedlens-mini`` on held-out synthetic images (``eval-model``).

Three measures, per item type (shape, shape colour, letter, letter colour), each with its
chance level:

1. **Multiple-choice VQA, question form** (``embedlens.vqa``): the synthetic set's
   questions ("What colour is the shape?" …), every choice scored by its length-normalized
   log-likelihood after the item's answer phrasing (``answer_prefix``/``choice_texts``, from
   ``embedlens.datasets.synthetic.ANSWER_FORMAT``: "The shape is" + " red"), exactly as the
   compression benchmark scores the same items (both use ``embedlens.vqa.item_framing``).
2. **Multiple choice in caption form** (``caption_form``), the form the projector was
   trained on: after "Describe the image.", each caption field is chosen in turn with the
   true caption before it as context ("A red" + " circle").
3. **Greedy captions** parsed field by field ("A red circle and an orange letter K.").

Each projector variant is evaluated on the same items: ``"model"`` (the weights in the model
directory), ``"untrained"`` (the seeded random projector a build without weights gets), or a
path to a ``projector.safetensors``. Held-out images come from the synthetic set with
``EVAL_DATA_SEED``, disjoint from every training seed.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from embedlens.mini.train import CAPTION_QUESTION, EVAL_DATA_SEED, TRAIN_DATA_SEED_BASE, load_model
from embedlens.datasets.synthetic import ANSWER_FORMAT, article
from embedlens.models.parts import projector_of
from embedlens.vqa import PrefixCache, accuracy_table, score_choices, score_item

ITEM_TYPES = ("shape", "colour", "character", "letter_colour")
TYPE_LABELS = {"shape": "shape", "colour": "shape colour", "character": "letter",
               "letter_colour": "letter colour"}
VALIDATION_DATA_SEED = 999_998


_CAPTION_RE = re.compile(
    r"^\s*an?\s+(?P<colour>[a-z]+)\s+(?P<shape>[a-z]+)"
    r"(?:\s+and\s+an?\s+(?P<lcolour>[a-z]+)\s+letter\s+(?P<letter>[A-Za-z]))?\s*\.?",
    re.IGNORECASE,
)


def parse_caption(text: str) -> dict[str, str | None] | None:
    """Fields of a caption in the synthetic grammar, or ``None`` when it does not parse."""
    m = _CAPTION_RE.match(text or "")
    if not m:
        return None
    return {"colour": m["colour"].lower(), "shape": m["shape"].lower(),
            "letter_colour": m["lcolour"].lower() if m["lcolour"] else None,
            "character": m["letter"].upper() if m["letter"] else None}


@torch.no_grad()
def greedy_caption(model, processor, image, question: str = CAPTION_QUESTION, max_new_tokens: int = 24) -> str:
    from embedlens.vqa import prepare_prompt

    inputs = prepare_prompt(processor, image, question)
    tok = processor.tokenizer
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _caption_form_rows(model, processor, ex, cache: PrefixCache | None = None) -> list[dict[str, Any]]:
    """Caption-form multiple choice for one example, field by field in caption order, each
    field given the true caption up to it (teacher forcing):
    "{A|An} {colour}" (8) · "A red" + " {shape}" (6) · "A red circle and" + " {a|an} {colour}"
    (8) · "A red circle and a brown letter" + " {L}" (26)."""
    from embedlens.datasets.synthetic import COLOUR_NAMES, LETTERS, SHAPE_NAMES

    def pick(prefix: str, choices: list[str], sep: str) -> int:
        return score_choices(model, processor, ex.image, CAPTION_QUESTION, choices,
                             answer_prefix=prefix, answer_sep=sep, prefix_cache=cache).pred_index

    rows = []

    def add(t: str, pred: str, answer: str, n: int) -> None:
        rows.append({"item_id": f"{ex.image_id}-{t}", "image_id": ex.image_id, "type": t,
                     "answer": answer, "pred": pred, "correct": pred == answer, "n_choices": n})

    c = COLOUR_NAMES[pick("", [f"{article(x).capitalize()} {x}" for x in COLOUR_NAMES], "")]
    add("colour", c, ex.colour, len(COLOUR_NAMES))
    first = f"{article(ex.colour).capitalize()} {ex.colour}"
    add("shape", SHAPE_NAMES[pick(first, SHAPE_NAMES, " ")], ex.shape, len(SHAPE_NAMES))
    if ex.letter is not None:
        ctx = f"{first} {ex.shape} and"
        lc = COLOUR_NAMES[pick(ctx, [f"{article(x)} {x}" for x in COLOUR_NAMES], " ")]
        add("letter_colour", lc, ex.letter_colour, len(COLOUR_NAMES))
        ctx = f"{ctx} {article(ex.letter_colour)} {ex.letter_colour} letter"
        add("character", LETTERS[pick(ctx, LETTERS, " ")], ex.letter, len(LETTERS))
    return rows


def _caption_rows(ex, caption: str) -> list[dict[str, Any]]:
    from embedlens.datasets.synthetic import COLOUR_NAMES, LETTERS, SHAPE_NAMES

    parsed = parse_caption(caption) or {}
    truth = {"shape": ex.shape, "colour": ex.colour, "character": ex.letter, "letter_colour": ex.letter_colour}
    n = {"shape": len(SHAPE_NAMES), "colour": len(COLOUR_NAMES), "character": len(LETTERS),
         "letter_colour": len(COLOUR_NAMES)}
    rows = [{"image_id": ex.image_id, "type": "parsed", "answer": True, "pred": bool(parsed),
             "correct": bool(parsed), "n_choices": 1}]
    rows.append({"image_id": ex.image_id, "type": "letter_present", "answer": ex.letter is not None,
                 "pred": parsed.get("character") is not None,
                 "correct": (parsed.get("character") is not None) == (ex.letter is not None), "n_choices": 2})
    for t in ITEM_TYPES:
        if truth[t] is None:
            continue
        pred = parsed.get(t)
        rows.append({"image_id": ex.image_id, "type": t, "answer": truth[t], "pred": pred,
                     "correct": pred == truth[t], "n_choices": n[t]})
    return rows


def _apply_projector(model, variant: str | Path, original: dict[str, torch.Tensor]) -> str:
    """Put the projector of ``variant`` into ``model``; return a label for the report."""
    from embedlens.mini.build import PROJECTOR_INIT_SEED, init_projector_, load_projector_weights

    proj = projector_of(model)
    if str(variant) == "model":
        proj.load_state_dict(original)
        return "model"
    if str(variant) == "untrained":
        init_projector_(proj, PROJECTOR_INIT_SEED)
        return "untrained"
    path = Path(variant)
    if not path.is_file():
        raise FileNotFoundError(f"eval-model: projector weights {path} do not exist")
    proj.load_state_dict(load_projector_weights(path))
    return str(path)


def evaluate_model(model_dir: Path | str, n_items: int = 200, seed: int = EVAL_DATA_SEED,
                   out_json: Path | str | None = None, projector: str | Path | Sequence[str | Path] = ("model", "untrained"),
                   out_md: Path | str | None = None, captions: bool = True, caption_form: bool = True,
                   progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``n_items`` held-out synthetic images (each gives 2–4 VQA
    items: shape and shape colour always, letter and letter colour when it has a letter).

    ``projector``: one variant or a list (``"model"``, ``"untrained"``, or a weights path).
    Writes ``out_json`` and a markdown table (``out_md``, default: ``out_json`` with ``.md``).
    """
    from tqdm.auto import tqdm

    from embedlens.datasets.synthetic import make_examples

    if threads:
        torch.set_num_threads(int(threads))
    if TRAIN_DATA_SEED_BASE <= int(seed) < TRAIN_DATA_SEED_BASE + 100_000 and int(seed) != EVAL_DATA_SEED:
        raise ValueError(f"eval-model: seed {seed} may overlap the training images "
                         f"(training uses synthetic seeds {TRAIN_DATA_SEED_BASE} + training seed)")
    variants = [projector] if isinstance(projector, (str, Path)) else list(projector)
    t0 = time.perf_counter()
    model, processor = load_model(model_dir)
    original = {k: v.clone() for k, v in projector_of(model).state_dict().items()}
    meta_file = Path(model_dir) / "embedlens_mini.json"
    model_meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    examples = make_examples(int(n_items), int(seed))
    report: dict[str, Any] = {
        "model_dir": str(model_dir), "n_images": len(examples), "data_seed": int(seed),
        "scoring": {"vqa": "length-normalized answer log-likelihood; prompt = chat template with the "
                           "image and the question, then the item's answer_prefix; each choice scored "
                           "as ' ' + its choice_text (answer_format: prefix, choice template)",
                    "answer_format": ANSWER_FORMAT,
                    "caption_form": "after 'Describe the image.', each caption field in turn given the "
                                    "true caption before it: '{A|An} {colour}' (8), ' {shape}' (6), "
                                    "' {a|an} {colour}' (8), ' {L}' after '... letter' (26)",
                    "captions": "greedy decoding, max 24 new tokens, parsed with the caption grammar"},
        "model_projector": {k: model_meta.get(k) for k in ("projector_trained", "projector_source",
                                                            "projector_sha256")},
        "variants": {},
    }
    for variant in variants:
        label = _apply_projector(model, variant, original)
        if label == "model":
            label = "trained" if model_meta.get("projector_trained") else "model"
        tv = time.perf_counter()
        vqa_rows, form_rows, cap_rows, samples = [], [], [], []
        for ex in tqdm(examples, desc=f"eval {label}", unit="image", disable=not progress):
            cache = PrefixCache()  # the image's prefill, shared by all its questions
            for item in ex.vqa:  # framed by the item itself, as the compression benchmark does
                row = score_item(model, processor, ex.image, item, prefix_cache=cache)
                vqa_rows.append({k: row[k] for k in ("item_id", "image_id", "type", "answer", "pred",
                                                     "correct", "n_choices", "scores")})
            if caption_form:
                form_rows.extend(_caption_form_rows(model, processor, ex, cache))
            if captions:
                cap = greedy_caption(model, processor, ex.image)
                cap_rows.extend(_caption_rows(ex, cap))
                if len(samples) < 12:
                    samples.append({"image_id": ex.image_id, "truth": ex.caption, "caption": cap})
        res: dict[str, Any] = {"vqa": accuracy_table(vqa_rows), "vqa_rows": vqa_rows}
        if caption_form:
            res["caption_form"] = accuracy_table(form_rows)
        if captions:
            res["captions"] = accuracy_table(cap_rows)
            res["caption_samples"] = samples
        res["seconds"] = time.perf_counter() - tv
        report["variants"][label] = res
    _apply_projector(model, "model", original)
    report["seconds"] = time.perf_counter() - t0
    report["markdown"] = markdown_table(report)
    if out_json:
        from embedlens.atomic import atomic_file

        out_json = Path(out_json)
        md = Path(out_md) if out_md else out_json.with_suffix(".md")
        with atomic_file(out_json) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
        with atomic_file(md) as tmp:
            tmp.write_text(report["markdown"])
    return report


def _fmt(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def markdown_table(report: dict[str, Any]) -> str:
    """One table per measure: rows = item types, columns = chance + each variant (acc ± se)."""
    variants = list(report["variants"])
    lines = [f"Held-out synthetic images: {report['n_images']} (data seed {report['data_seed']}).", ""]
    sections = [("vqa", "Multiple-choice VQA (question form, length-normalized log-likelihood)"),
                ("caption_form", "Multiple choice in caption form (after \"Describe the image.\")"),
                ("captions", "Greedy captions, parsed field by field")]
    for key, title in sections:
        if not any(key in report["variants"][v] for v in variants):
            continue
        types = [t for t in (*ITEM_TYPES, "letter_present", "parsed")
                 if any(t in report["variants"][v].get(key, {}) for v in variants)]
        lines += [f"**{title}**", ""]
        head = "| item type | n | chance | " + " | ".join(variants) + " |"
        if len(variants) > 1:
            head += f" {variants[0]} / chance |"
        lines.append(head)
        lines.append("|" + "---|" * (3 + len(variants) + (1 if len(variants) > 1 else 0)))
        for t in types:
            first = next(report["variants"][v][key][t] for v in variants if t in report["variants"][v].get(key, {}))
            chance = first["chance"] if t != "parsed" else None
            cells = []
            for v in variants:
                r = report["variants"][v].get(key, {}).get(t)
                cells.append("–" if r is None else f"{r['accuracy']:.2f} ± {r['se']:.2f}")
            row = f"| {TYPE_LABELS.get(t, t.replace('_', ' '))} | {first['n']} | {_fmt(chance)} | " + " | ".join(cells) + " |"
            if len(variants) > 1:
                r0 = report["variants"][variants[0]].get(key, {}).get(t)
                row += f" {r0['accuracy'] / chance:.1f}× |" if (r0 and chance) else " – |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="evaluate embedlens-mini on held-out synthetic VQA")
    ap.add_argument("--model", default="resources/models/embedlens-mini")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=EVAL_DATA_SEED)
    ap.add_argument("--out", default="results/mini/eval.json")
    ap.add_argument("--projector", nargs="+", default=["model", "untrained"])
    ap.add_argument("--no-captions", action="store_true")
    ap.add_argument("--no-caption-form", action="store_true")
    a = ap.parse_args(argv)
    rep = evaluate_model(a.model, a.n, a.seed, a.out, projector=a.projector,
                         captions=not a.no_captions, caption_form=not a.no_caption_form)
    print(rep["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
