"""The standard-benchmark step end to end on a tiny random LLaVA: real lmms-eval tasks on
local stand-ins, the real intervention backend (groups on the fly, cached generation), the
paired statistics and the step's outputs. One run shared by the assertions (lmms-eval's
import alone takes ~10 s)."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest

pytest.importorskip("lmms_eval")

from embedlens.analysis.outputs import SUMMARY_KEYS  # noqa: E402
from embedlens.bench.backend import GenerationRequest  # noqa: E402
from embedlens.bench.intervention_backend import InterventionBackend  # noqa: E402
from embedlens.bench.standins import write_standin  # noqa: E402
from embedlens.bench.steps import read_benchmarks  # noqa: E402
from embedlens.bench.tasks import TaskSpec  # noqa: E402

CONDITIONS = [
    {"name": "baseline", "op": "baseline"},
    {"name": "prune_dead", "op": "prune", "groups": ["dead"]},
    {"name": "random_dead", "op": "random_matched", "groups": ["dead"], "seeds": [0, 1]},
    {"name": "prune_vit_sink", "op": "prune", "groups": ["vit_sink"]},  # no vit_sink anchor: nothing removed
    {"name": "inject_L1", "op": "inject", "layer": 1},
    {"name": "knockout_text_visual", "op": "knockout", "edges": "text->visual"},
]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    from embedlens.bench.run import run_benchmarks
    from embedlens.extract import export_vocab

    root = tmp_path_factory.mktemp("bench")
    model = tiny_model("llava")
    vocab = root / "vocab.zarr"
    export_vocab(model, vocab, model_name="tiny-llava")
    specs = []
    for name, task, n in (("pope", "pope", 2), ("mme", "mme", 2), ("refcoco", "refcoco_bbox_rec_val", 1)):
        write_standin(name, root / name, n_images=n, seed=5)
        specs.append(TaskSpec(name=name, task=task, path=str(root / name), max_new_tokens=3))
    # plant a dead anchor: the most frequent top-1 neighbour of h[0] on one stand-in image
    probe = InterventionBackend(model, vocab, {}, top_k=3, device="cpu")
    import datasets

    doc = datasets.load_dataset("parquet", data_files=str(root / "pope" / "data" / "*.parquet"))["train"][0]
    seq, _ = probe.prepare(GenerationRequest("probe", 0, "Is there a circle?", [doc["image"]], 2, []))
    ids, _ = probe.index.search(seq.embeds[seq.visual_pos].float(), 1)
    dead = Counter(ids[:, 0].tolist()).most_common(1)[0][0]
    out = root / "out"
    table = run_benchmarks(model, vocab, specs, out, anchors={"dead": [int(dead)]}, conditions=CONDITIONS,
                           n_bootstrap=50, batch_size=2, device="cpu", model="tiny-llava", progress=False)
    return table, out, specs


def test_table_has_every_condition_and_task_and_flags_nothing_removed(run):
    table, out, specs = run
    assert set(table["condition"]) == {c["name"] for c in CONDITIONS}
    assert len(table) == len(CONDITIONS) * len(specs)
    flagged = table[table["condition"] == "prune_vit_sink"]
    assert (flagged["status"] == "nothing removed").all() and flagged["score"].isna().all()
    ok = table[table["condition"] != "prune_vit_sink"]
    assert (ok["status"] == "ok").all() and ok["score"].notna().all()
    base = table[table["condition"] == "baseline"]
    assert (base["delta"] == 0).all()
    dead = table[table["condition"] == "prune_dead"]
    assert (dead["target_tokens"] > 0).all() and (dead["tokens_kept_frac"] < 1).all()
    inject = table[table["condition"] == "inject_L1"]
    assert (inject["flops_rel"] < 1).all()
    assert set(table["metric"]) == {s.headline for s in specs}


def test_random_rows_average_the_seeds_of_the_official_scores(run):
    table, out, specs = run
    scores = pd.read_parquet(out / "scores.parquet")
    for spec in specs:
        metric = spec.headline
        per_seed = scores[(scores["condition"] == "random_dead") & (scores["task"] == spec.name)
                          & (scores["metric"] == metric)]
        assert sorted(per_seed["seed"].tolist()) == [0, 1]
        row = table[(table["condition"] == "random_dead") & (table["task"] == spec.name)].iloc[0]
        assert row["n_seeds"] == 2 and row["score"] == pytest.approx(per_seed["value"].mean())
        base = table[(table["condition"] == "baseline") & (table["task"] == spec.name)].iloc[0]
        assert row["delta"] == pytest.approx(row["score"] - base["score"])


def test_items_and_summary(run):
    table, out, specs = run
    items = pd.read_parquet(out / "items.parquet")
    # every run condition (random: per seed) answered every document; the flagged one never ran
    assert "prune_vit_sink" not in set(items["condition"])
    n_docs = items[items["condition"] == "baseline"].groupby("task").size()
    for (cond, seed), g in items.groupby(["condition", items["seed"].fillna(-1)]):
        assert g.groupby("task").size().equals(n_docs), (cond, seed)
    assert (items["max_new_tokens"] == 3).all() and (items["new_tokens"] <= 3).all()
    step = read_benchmarks(out)
    assert tuple(step.summary) == SUMMARY_KEYS and step.summary["step"] == "benchmarks"
    assert step.summary["results"]["nothing_removed"] == ["prune_vit_sink"]
    assert json.loads(json.dumps(step.summary["results"]["anchors"]))["dead"]
    assert step.table("table").shape == table.shape
