"""The benchmark harness: a scripted backend with planted answers, run through the
project's lmms-eval model class and lmms-eval's own evaluation on the local stand-ins,
gets exactly the scores computed here by hand from the planted answers and the stand-in
files (read with pandas, not through lmms-eval).

One module-scoped evaluation of all five stand-ins is shared by the assertions (importing
lmms-eval's evaluator alone takes ~10 s).
"""

from __future__ import annotations

import io
import re
from collections import defaultdict

import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("lmms_eval")

from embedlens.bench.standins import STANDINS, build_standins  # noqa: E402
from embedlens.bench.tasks import TaskSpec, whole_groups_limit  # noqa: E402

SIZES = {"pope": 5, "mme": 5, "textvqa": 6, "mmstar": 6, "refcoco": 4}
SEED = 4242


def _docs(root, name) -> pd.DataFrame:
    task, split = STANDINS[name]
    return pd.read_parquet(root / name / "data" / f"{split}-00000-of-00001.parquet")


# ----------------------------------------------------------------------- planted answers
def _plant_pope(docs):
    yes_answers = iter(["yes", "Yes", "Yes.", "no", "yes"])  # "Yes." is wrong: exact match
    no_answers = iter(["no", "yes", "No", "no", "nope"])
    return {k: next(yes_answers) if a == "yes" else next(no_answers) for k, a in enumerate(docs["answer"])}


def _plant_mme(docs):
    # Per image (two consecutive rows): both right, one wrong, both right ("yes." parses), both wrong, ...
    out = {}
    for k, truth in enumerate(docs["answer"]):
        image, first = divmod(k, 2)
        wrong = "No" if truth == "Yes" else "Yes"
        right = truth.lower() + "." if image == 2 else truth
        out[k] = {0: right, 1: right if first == 0 else wrong, 2: right, 3: wrong, 4: right}[image]
    return out


def _plant_textvqa(docs):
    out = {}
    for k, answers in enumerate(docs["answers"]):
        answers = list(answers)
        majority = max(set(answers), key=answers.count)
        wrong = [a for a in answers if _norm(a) != _norm(majority)]
        out[k] = [f"The {majority.upper()}.",           # matches only after normalization
                  f"{wrong[0]}" if wrong else "zzz",    # a minority answer: partial credit
                  "nothing",                            # no credit
                  f"{majority} ASSISTANT: ignored"][k % 4]  # cut at the task's stop string
    return out


def _plant_mmstar(docs):
    out = {}
    for k, truth in enumerate(docs["answer"]):
        wrong = "ABCD"[("ABCD".index(truth) + 1) % 4]
        out[k] = [truth, f"{truth}.", wrong][k % 3]
    return out


def _box(doc) -> list[float]:
    img = Image.open(io.BytesIO(doc["image"]["bytes"]))
    x, y, w, h = doc["bbox"]
    return [x / img.width, y / img.height, (x + w) / img.width, (y + h) / img.height]


def _shifted(box, iou):
    """The box moved sideways so that its IoU with ``box`` is ``iou``: (w - d) / (w + d)."""
    x0, y0, x1, y1 = box
    d = (x1 - x0) * (1 - iou) / (1 + iou)
    return [x0 - d, y0, x1 - d, y1] if x0 - d >= 0 else [x0 + d, y0, x1 + d, y1]


def _plant_refcoco(docs):
    out = {}
    for k in range(len(docs)):
        box = _box(docs.iloc[k])
        target = [0.52, 0.48, 1.0, None][k % 4]
        out[k] = "no box" if target is None else "[" + ", ".join(f"{v:.6f}" for v in _shifted(box, target)) + "]"
    return out


# ----------------------------------------------------------------------- hand computations
def _norm(text: str) -> str:
    words = text.lower().replace(".", " ").replace(",", " ").split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def _pope_expected(docs, plants):
    preds = [plants[k].lower().strip() for k in range(len(docs))]
    truth = list(docs["answer"])
    tp = sum(p == "yes" and t == "yes" for p, t in zip(preds, truth))
    fp = sum(p == "yes" and t == "no" for p, t in zip(preds, truth))
    fn = sum(p == "no" and t == "yes" for p, t in zip(preds, truth))  # official: only an explicit "no"
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"pope_accuracy": sum(p == t for p, t in zip(preds, truth)) / len(truth),
            "pope_f1_score": 2 * precision * recall / (precision + recall)}


def _mme_expected(rows):
    """rows: (category, image key, planted, truth); sum over categories of the mean per image
    of accuracy (%) + accuracy+ (% of images with both right)."""
    per_image = defaultdict(list)
    for category, image, planted, truth in rows:
        per_image[(category, image)].append(planted.lower().strip().replace(".", "") == truth.lower())
    per_category = defaultdict(list)
    for (category, _), right in per_image.items():
        assert len(right) == 2
        per_category[category].append(100 * sum(right) / 2 + 100 * all(right))
    return sum(sum(v) / len(v) for v in per_category.values())


def _vqa_expected(docs, plants):
    scores = []
    for k, answers in enumerate(docs["answers"]):
        pred = _norm(plants[k].split("ASSISTANT:")[0])
        gts = [_norm(a) for a in answers]
        scores.append(sum(min(1, sum(g == pred for j, g in enumerate(gts) if j != i) / 3)
                          for i in range(len(gts))) / len(gts))
    return sum(scores) / len(scores)


def _mmstar_expected(docs, plants):
    per = defaultdict(list)
    for k, (truth, l2) in enumerate(zip(docs["answer"], docs["l2_category"])):
        per[l2].append(plants[k].strip().rstrip(".").upper() == truth)
    return sum(sum(v) / len(v) for v in per.values()) / len(per)


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _refcoco_expected(docs, plants):
    hits = []
    for k in range(len(docs)):
        m = re.search(r"\[(.*)\]", plants[k])
        pred = [float(v) for v in m.group(1).split(",")] if m else [0, 0, 0, 0]
        hits.append(_iou(_box(docs.iloc[k]), pred) >= 0.5 if m else False)
    return sum(hits) / len(hits)


# ----------------------------------------------------------------------- the evaluation
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from embedlens.bench import harness
    from embedlens.bench.lmms_model import EmbedLensLMM
    from embedlens.testing.scripted import ScriptedBackend

    root = tmp_path_factory.mktemp("standins")
    build_standins(root, seed=SEED, n_images=SIZES)
    docs = {name: _docs(root, name) for name in STANDINS}
    planters = {"pope": _plant_pope, "mme": _plant_mme, "textvqa": _plant_textvqa,
                "mmstar": _plant_mmstar, "refcoco": _plant_refcoco}
    plants = {name: planters[name](docs[name]) for name in STANDINS}
    backend = ScriptedBackend({(STANDINS[n][0], k): a for n, p in plants.items() for k, a in p.items()})
    specs = [TaskSpec.from_config({"name": n, "task": STANDINS[n][0], "standin": n,
                                   **({"max_new_tokens": 1} if n == "mme" else {})}, standin_dir=root)
             for n in STANDINS]
    model = EmbedLensLMM(backend, batch_size=4)
    results = harness.evaluate(model, specs, output_dir=root / "lmms-out")
    return {"docs": docs, "plants": plants, "results": results, "backend": backend, "model": model,
            "root": root}


def test_pope_accuracy_and_f1_exact(run):
    docs, plants, r = run["docs"]["pope"], run["plants"]["pope"], run["results"]["pope"]
    expected = _pope_expected(docs, plants)
    assert expected["pope_accuracy"] == pytest.approx(0.6) and expected["pope_f1_score"] == pytest.approx(0.75)
    for metric, value in expected.items():
        assert r.scores[metric] == pytest.approx(value, abs=1e-12), metric
    assert list(r.items["cluster"]) == list(docs["image_source"])
    # "Yes." is kept as the answer and scored wrong: the official exact match
    row = r.items[r.items["prediction"] == "Yes."].iloc[0]
    assert row["pope_accuracy"]["score"] == 0.0


def test_mme_perception_score_exact_and_answer_length_override(run):
    docs, plants, r = run["docs"]["mme"], run["plants"]["mme"], run["results"]["mme"]
    rows = [(c, q, plants[k], t) for k, (c, q, t) in enumerate(zip(docs["category"], docs["question_id"],
                                                                    docs["answer"]))]
    assert r.scores["mme_perception_score"] == pytest.approx(_mme_expected(rows), abs=1e-9)
    assert "mme_cognition_score" not in r.scores  # stand-in categories are all perception
    lengths = {(q.task, q.max_new_tokens) for q in run["backend"].requests}
    assert ("mme", 1) in lengths and ("pope", 128) in lengths  # override vs the task's own
    assert all(info["max_new_tokens"] == 1 for info in r.items["info"])


def test_textvqa_accuracy_with_official_normalization(run):
    docs, plants, r = run["docs"]["textvqa"], run["plants"]["textvqa"], run["results"]["textvqa"]
    expected = _vqa_expected(docs, plants)
    assert 0 < expected < 1
    assert r.scores["exact_match"] == pytest.approx(expected, abs=1e-12)
    # the normalization-only match scores, and the stop string cut the answer
    assert r.items["exact_match"].iloc[0] > 0
    assert r.items["prediction"].iloc[3] == plants[3].split("ASSISTANT:")[0]


def test_mmstar_and_refcoco(run):
    docs, plants = run["docs"], run["plants"]
    assert run["results"]["mmstar"].scores["average"] == pytest.approx(
        _mmstar_expected(docs["mmstar"], plants["mmstar"]), abs=1e-12)
    expected = _refcoco_expected(docs["refcoco"], plants["refcoco"])
    assert 0 < expected < 1
    assert run["results"]["refcoco"].scores["refcoco_ACC@0.5"] == pytest.approx(expected, abs=1e-12)


def test_aggregate_is_the_official_aggregation(run):
    for name, r in run["results"].items():
        rows = list(range(len(r.items)))
        for metric, value in r.scores.items():
            assert r.aggregate(metric, rows) == pytest.approx(value, abs=1e-12), (name, metric)
    # A cluster bootstrap draw with one MME image twice: the official formula on the
    # duplicated pairs (kept distinct), as computed by hand.
    r, docs, plants = run["results"]["mme"], run["docs"]["mme"], run["plants"]["mme"]
    draw = [0, 1, 0, 1, 4, 5, 6, 7]
    rows = [(docs["category"][k], f"{docs['question_id'][k]}#{i // 2}", plants[k], docs["answer"][k])
            for i, k in enumerate(draw)]
    assert r.aggregate("mme_perception_score", draw) == pytest.approx(_mme_expected(rows), abs=1e-9)


def test_mme_limit_rounds_to_whole_pairs(run):
    from embedlens.bench import harness

    spec = TaskSpec(name="mme", task="mme", path=str(run["root"] / "mme"))
    r = harness.evaluate(run["model"], [spec], limit=3)["mme"]
    assert r.spec.limit == 2 and len(r.items) == 2
    assert whole_groups_limit(["a", "a", "b", "b", "c", "c"], 5) == 4
    with pytest.raises(ValueError, match="no complete group"):
        whole_groups_limit(["a", "a"], 1)


def test_entry_point_resolves(tmp_path):
    """lmms-eval finds the class through the `lmms_eval.models` entry point declared in
    pyproject.toml (a throwaway distribution declares it where the installed embedlens
    predates it)."""
    import sys
    import tomllib
    from importlib.metadata import entry_points
    from pathlib import Path

    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from embedlens.bench.lmms_model import EmbedLensLMM

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    target = pyproject["project"]["entry-points"]["lmms_eval.models"]["embedlens"]
    if not entry_points(group="lmms_eval.models", name="embedlens"):
        dist = tmp_path / "embedlens_ep_probe-0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: embedlens-ep-probe\nVersion: 0\n")
        (dist / "entry_points.txt").write_text(f"[lmms_eval.models]\nembedlens = {target}\n")
        sys.path.insert(0, str(tmp_path))
    try:
        registry = ModelRegistryV2()
        registry.load_entrypoint_manifests()
        assert registry.get_model_class("embedlens") is EmbedLensLMM
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
    with pytest.raises(NotImplementedError, match="generation only"):
        EmbedLensLMM(backend=object()).loglikelihood([])


def test_standins_are_deterministic_and_in_the_hub_layout(run, tmp_path):
    build_standins(tmp_path, ["pope", "refcoco"], seed=SEED, n_images=SIZES)
    for name in ("pope", "refcoco"):
        again = _docs(tmp_path, name)
        pd.testing.assert_frame_equal(again, run["docs"][name])
    pope = run["docs"]["pope"]
    assert (pope["answer"] == "yes").sum() == (pope["answer"] == "no").sum() == SIZES["pope"]
    mme = run["docs"]["mme"]
    assert set(mme["question_id"].value_counts()) == {2} and set(mme["answer"]) == {"Yes", "No"}
    assert all(len(a) == 10 for a in run["docs"]["textvqa"]["answers"])


def test_standins_cli_and_task_spec_errors(tmp_path):
    import json

    from embedlens.cli import main

    assert main(["standins", "--name", "mme", "--n-images", "2", "--seed", "7", "--out", str(tmp_path / "mme")]) == 0
    rec = json.loads((tmp_path / "mme" / "standin.json").read_text())
    assert (rec["task"], rec["split"], rec["n_docs"]) == ("mme", "test", 4)
    spec = TaskSpec.from_config({"name": "m", "task": "mme", "standin": "mme"}, standin_dir=tmp_path)
    assert spec.path == str(tmp_path / "mme") and spec.headline == "mme_perception_score"
    with pytest.raises(ValueError, match="path or standin"):
        TaskSpec.from_config({"name": "m", "task": "mme", "standin": "mme", "path": "x"})
    with pytest.raises(KeyError, match="lacks 'task'"):
        TaskSpec.from_config({"name": "m"})
