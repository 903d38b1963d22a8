"""Token-group selection of the compression benchmark (docs/methods.md §4): anchor membership
(the reference semantics, default) vs exclusive label, the condition presets, and the table's
statistics (seeds averaged per item, paired Δ vs baseline, the "nothing removed" flag).

Real components: a tiny random LLaVA (captured sequences, the benchmark end to end) and
categorize's own rule (:func:`embedlens.analysis.categorize.apply_rule`) as the reference.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from embedlens.analysis.categorize import apply_rule
from embedlens.compress import interventions as iv
from embedlens.compress.conditions import PRESETS, default_conditions, paper_conditions, parse_conditions
from embedlens.compress.plan import TokenGroups
from embedlens.testing.tiny import build_tiny_model

ANCHORS = {"vit_sink": [101], "llm_sink": [202], "dead": [303]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = build_tiny_model("llava", tmp_path_factory.mktemp("tiny") / "llava", seed=0)
    model, processor, adapter = iv.load_model(path)
    return path, model, processor, adapter


def _prompt(llava):
    from PIL import Image

    from embedlens import vqa

    _, model, processor, adapter = llava
    img = Image.fromarray((np.random.RandomState(0).rand(24, 40, 3) * 255).astype("uint8"))
    inputs = vqa.prepare_prompt(processor, img, "What colour is the shape?", prompt_fn=adapter.format_prompt)
    return model, iv.capture_sequence(model, inputs, "planted")


# --------------------------------------------------------------------------- the planted image
#: token kind -> (anchors in its top-3, how many tokens). Kinds overlap on purpose.
PLANTED = {
    "vit+dead": (("vit_sink", "dead"), 3),
    "dead": (("dead",), 4),
    "llm+dead": (("llm_sink", "dead"), 2),
    "vit": (("vit_sink",), 1),
    "llm": (("llm_sink",), 2),
    "vit+llm": (("vit_sink", "llm_sink"), 1),
}


def _planted_topk(n_visual: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(n_visual, 3) top-3 ids holding the PLANTED anchors at shuffled positions and rank
    slots; the other ids are ordinary vocabulary rows. Also: kind -> token indices."""
    rng = np.random.default_rng(7)
    ids = rng.integers(1000, 5000, size=(n_visual, 3))
    order = rng.permutation(n_visual)
    kinds, pos = {}, 0
    for kind, (groups, count) in PLANTED.items():
        toks = np.sort(order[pos:pos + count])
        pos += count
        kinds[kind] = toks
        for t in toks:
            slots = rng.permutation(3)[: len(groups)]  # anchors anywhere in the top-k, not only top-1
            for g, s in zip(groups, slots):
                ids[t, s] = ANCHORS[g][0]
    kinds["alive"] = np.sort(order[pos:])
    return ids, kinds


def test_planted_overlap_counts_membership_vs_label(llava):
    """The issue's must-show: on a captured sequence whose tokens hold both a sink and a dead
    anchor (and every other mix), each condition removes exactly the hand-computed number of
    tokens — membership (reference rule: an anchor anywhere in the top-k) vs exclusive label.

    By hand: 13 tokens hold an anchor (3 vit+dead, 4 dead, 2 llm+dead, 1 vit, 2 llm, 1 vit+llm);
    labels (first match vit_sink, llm_sink, dead): vit_sink = 3 + 1 + 1 = 5, llm_sink = 2 + 2 = 4,
    dead = 4. Membership: dead = 3 + 4 + 2 = 9, llm_sink = 2 + 2 + 1 = 5, vit_sink = 5,
    sinks = 9, sinks + dead = 13 = everything not alive."""
    model, seq = _prompt(llava)
    n = seq.n_visual
    assert n >= 24  # room for the planted tokens and a matched random draw from the complement
    ids, kinds = _planted_topk(n)
    N = len(iv.decoder_layers(model))
    groups = TokenGroups.from_topk(ids, ANCHORS)
    # the reference rule as categorize applies it gives the same groups
    ref = apply_rule(pd.DataFrame({f"top{r + 1}_id": ids[:, r] for r in range(3)}), ANCHORS)
    assert list(groups.label) == ref["label"].tolist()
    assert TokenGroups.from_categories(ref.assign(token=np.arange(n))).label.tolist() == ref["label"].tolist()
    assert int(ref["in_dead"].sum()) == 9 and int((ref["label"] == "dead").sum()) == 4

    expected = {  # condition -> (membership, label) tokens removed
        "prune(sinks)": (iv.prune(["vit_sink", "llm_sink"]), 9, 9),
        "prune(vit_sink)": (iv.prune(["vit_sink"]), 5, 5),
        "prune(llm_sink)": (iv.prune(["llm_sink"]), 5, 4),
        "prune(dead)": (iv.prune(["dead"]), 9, 4),
        "prune(sinks+dead)": (iv.prune(["vit_sink", "llm_sink", "dead"]), 13, 13),
        "keep(alive)": (iv.keep(["alive"]), 13, 13),
        "random_matched(dead)": (iv.random_matched(["dead"], 0), 9, 4),
        "random_matched(llm_sink)": (iv.random_matched(["llm_sink"], 0), 5, 4),
    }
    visual = seq.visual_pos.tolist()
    for name, (x, n_member, n_label) in expected.items():
        for select, want in (("membership", n_member), ("label", n_label)):
            xs = iv.Intervention(x.op, x.groups, seed=x.seed, select=select)
            plan = iv.plan_for(seq, groups, xs, N)
            assert plan.n_removed == want, (name, select)
            removed = {visual.index(p) for p in (~plan.keep).nonzero().flatten().tolist()}
            if x.op == "random_matched":  # drawn from outside the selected group
                assert not removed & set(np.flatnonzero(groups.select(x.groups, select)).tolist()), (name, select)
    # membership is the default; a label list keeps the old (label) behaviour
    assert iv.plan_for(seq, groups, iv.prune(["dead"]), N).n_removed == 9
    assert iv.plan_for(seq, list(groups.label), iv.prune(["dead"]), N).n_removed == 4
    # which tokens: prune(dead) by membership takes the vit+dead and llm+dead tokens too
    plan = iv.plan_for(seq, groups, iv.prune(["dead"]), N)
    removed = sorted(visual.index(p) for p in (~plan.keep).nonzero().flatten().tolist())
    assert removed == sorted(np.concatenate([kinds["vit+dead"], kinds["dead"], kinds["llm+dead"]]).tolist())
    # skip selects the same tokens
    sk = iv.plan_for(seq, groups, iv.skip(["dead"], [0.5], select="label"), N)
    assert int(sk.skip.sum()) == 4


def test_affected_counts_flag_what_changes_nothing(llava):
    """The "nothing removed" count (Plan.visual_counts, shared by compress and benchmarks) is
    what the plan changes, not the size of the named group: keep(alive) on an image whose
    tokens are all alive, prune/skip of an empty group and exit(N) affect nothing; every
    other op affects its tokens (knockout: every visual token's attention)."""
    model, seq = _prompt(llava)
    n, N = seq.n_visual, len(iv.decoder_layers(model))
    visual = torch.zeros(len(seq), dtype=torch.bool)
    visual[seq.visual_pos] = True
    all_alive = TokenGroups.from_labels(["alive"] * n)
    _, kinds = _planted_topk(n)
    planted = TokenGroups.from_topk(_planted_topk(n)[0], ANCHORS)
    cases = [  # (intervention, groups, kept, affected)
        (iv.baseline(), all_alive, n, 0),
        (iv.keep(["alive"]), all_alive, n, 0),
        (iv.prune(["dead"]), all_alive, n, 0),
        (iv.random_matched(["dead"], 0), all_alive, n, 0),
        (iv.skip(["dead"], [0.5]), all_alive, n, 0),
        (iv.exit(N), all_alive, n, 0),
        (iv.keep(["alive"]), planted, len(kinds["alive"]), n - len(kinds["alive"])),
        (iv.prune(["dead"]), planted, n - 9, 9),
        (iv.skip(["visual"], [0.5]), all_alive, n, n),
        (iv.exit(0), all_alive, 0, n),
        (iv.inject(1), all_alive, n, n),
        (iv.knockout("text->visual"), all_alive, n, n),
    ]
    for x, groups, kept, affected in cases:
        plan = iv.plan_for(seq, groups, x, N)
        assert plan.visual_counts(N, visual) == (kept, affected), x


def test_from_topk_equals_apply_rule_on_random_tables():
    """TokenGroups.from_topk == categorize's apply_rule (label and every in_<group>) on random
    top-k tables over a small vocabulary (many overlaps), several anchors per group, a group
    without anchors."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(1, 5))
        ids = np.stack([rng.choice(30, size=k, replace=False) for _ in range(200)])
        anchors = {"vit_sink": [1, 2], "llm_sink": [3], "dead": [4, 5, 6]}
        if seed % 3 == 2:
            anchors.pop("llm_sink")
        ref = apply_rule(pd.DataFrame({f"top{r + 1}_id": ids[:, r] for r in range(k)}), anchors)
        tg = TokenGroups.from_topk(ids, anchors)
        assert tg.label.tolist() == ref["label"].tolist()
        for g in ("vit_sink", "llm_sink", "dead"):
            assert np.array_equal(tg.member[g], ref[f"in_{g}"].to_numpy()), (seed, g)
        assert (ref[["in_vit_sink", "in_llm_sink", "in_dead"]].sum(axis=1) > 1).any()  # overlaps exist
        back = TokenGroups.from_categories(ref.assign(token=np.arange(len(ref)))[::-1])  # any row order
        assert back.label.tolist() == ref["label"].tolist()


def test_token_groups_validation_and_label_lists():
    tg = TokenGroups.from_labels(["dead", "alive", "vit_sink"])
    assert tg.select(["dead"]).tolist() == [True, False, False]
    assert tg.select(["visual"]).all() and tg.select(["alive"]).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="unknown token labels"):
        TokenGroups.from_labels(["zombie"])
    with pytest.raises(ValueError, match="first matching membership group"):
        TokenGroups(np.array(["dead"], dtype=object),
                    {"vit_sink": [True], "llm_sink": [False], "dead": [True]})
    with pytest.raises(ValueError, match="in_dead"):
        TokenGroups.from_categories(pd.DataFrame({"label": ["dead"], "in_vit_sink": [False],
                                                  "in_llm_sink": [False]}))
    with pytest.raises(ValueError, match="select must be"):
        iv.prune(["dead"], select="exclusive")
    # the old label-list call of random_matched_removal is unchanged
    labels = ["dead"] * 5 + ["alive"] * 20
    assert np.array_equal(iv.random_matched_removal(labels, ["dead"], 0, "img"),
                          iv.random_matched_removal(TokenGroups.from_labels(labels), ["dead"], 0, "img", "label"))


# --------------------------------------------------------------------------- conditions
def test_select_key_in_conditions():
    v = parse_conditions([{"op": "prune", "groups": ["dead"], "select": "label"},
                          {"op": "prune", "groups": ["dead"]},
                          {"op": "random_matched", "groups": ["dead"], "seeds": [1], "select": "label"}], 4)
    assert [x.name for x in v] == ["prune_dead_label", "prune_dead", "random_dead_label"]
    assert [x.intervention.select for x in v] == ["label", "membership", "label"]
    with pytest.raises(ValueError, match=r"compress condition #0.*'select'"):
        parse_conditions([{"op": "prune", "groups": ["dead"], "select": "first"}], 4)
    with pytest.raises(ValueError, match="compress condition #0.*unknown key"):
        parse_conditions([{"op": "baseline", "select": "label"}], 4)


def test_presets_structure():
    from embedlens.config import schema_path

    for N, best in ((2, None), (32, 13)):
        assert default_conditions(N, best) == default_conditions(N, best, "default")
        paper = default_conditions(N, best, preset="paper")
        assert paper == paper_conditions(N, best)
        names = [c["name"] for c in paper]
        assert len(set(names)) == len(names) and all("op" in c for c in paper)
        for g in ("vit_sink", "llm_sink", "sinks", "dead"):
            assert f"prune_{g}" in names and f"random_{g}" in names
        assert {"baseline", "keep_alive", "random_keep_alive", "skip_mlp_visual", "skip_attn_visual",
                "skip_attn_visual_L0", "skip_attn_visual_L0_reference", "knockout_visual_visual",
                "knockout_text_visual"} <= set(names)
        assert {c["op"] for c in paper} >= {"knockout", "prune_inject", "inject", "exit"}
        assert all(c["edges"] in ("visual->visual", "text->visual") for c in paper if c["op"] == "knockout")
        ref0 = next(c for c in paper if c["name"] == "skip_attn_visual_L0_reference")
        assert ref0["reference_layer0"] is True and ref0["layers"] == [0, 1]
        comp = next(c for c in paper if c["op"] == "prune_inject")
        assert comp["groups"] == ["vit_sink", "llm_sink", "dead"] and 1 <= comp["layer"] <= N - 1
        if best is not None:
            assert comp["layer"] == best and f"inject_L{best}" in names
        if N >= 4:
            assert {f"skip_mlp_visual_L0-{N // 2}", f"skip_mlp_visual_L{N // 2}-{N}"} <= set(names)
    with pytest.raises(ValueError, match="unknown compress conditions preset 'papr'"):
        default_conditions(4, preset="papr")
    schema = yaml.safe_load(schema_path().read_text())
    # one definition shared by compress.conditions and benchmarks.conditions
    for section in ("compress", "benchmarks"):
        assert schema["properties"][section]["properties"]["conditions"]["$ref"] == "#/$defs/conditions"
    cond = schema["$defs"]["conditions"]
    assert cond["oneOf"][0]["enum"] == list(PRESETS)
    assert set(cond["oneOf"][1]["items"]["properties"]["op"]["enum"]) == set(iv.OPS)
    assert cond["oneOf"][1]["items"]["properties"]["select"]["enum"] == list(iv.SELECTIONS)


def test_paper_preset_parses():
    for N, best in ((2, None), (32, 13)):
        variants = parse_conditions(default_conditions(N, best, "paper"), N, seeds=(0, 1))
        assert sum(v.op == "random_matched" for v in variants) == 5 * 2


# --------------------------------------------------------------------------- the table
def _categories(ds_dir, adapter, out):
    """Every visual token labelled alive except the first 4 of each image, which hold a
    vit_sink and a dead anchor: label vit_sink, and dead only by membership."""
    from embedlens.datasets.materialize import load_dataset

    ds = load_dataset(ds_dir)
    rows = []
    for rec in ds.images:
        n = adapter.prepare([ds.image(rec["image_id"])], "Describe the image.").n_tokens[0]
        for j in range(n):
            both = j < 4
            rows.append({"image_id": rec["image_id"], "token": j, "label": "vit_sink" if both else "alive",
                         "in_vit_sink": both, "in_llm_sink": False, "in_dead": both})
    pd.DataFrame(rows).to_parquet(out)
    return out


def test_run_compress_selection_flags_and_paired_statistics(llava, tmp_path):
    """End to end on the tiny LLaVA: membership is the default (prune_dead removes the 4
    vit_sink+dead tokens), select: label removes nothing there and is flagged nothing_removed
    with no Δ; the matched random control's condition row averages seeds per item, so when it
    removes nothing its interval equals the baseline's (n = items, not items × seeds)."""
    from embedlens.compress.benchmark import run_compress
    from embedlens.compress.steps import read_compress
    from embedlens.datasets.materialize import materialize

    path, _, _, adapter = llava
    ds_dir = materialize("syn", {"source": "synthetic", "n_images": 3, "seed": 0, "image_size": 32},
                         tmp_path / "syn")
    cats = _categories(ds_dir, adapter, tmp_path / "categories.parquet")
    conditions = [
        {"op": "baseline"},
        {"op": "prune", "groups": ["dead"]},
        {"op": "prune", "groups": ["dead"], "select": "label"},
        {"op": "random_matched", "groups": ["dead"], "seeds": [0, 1, 2], "select": "label"},
        {"op": "random_matched", "groups": ["dead"], "seeds": [0, 1]},
    ]
    t = run_compress(path, ds_dir, cats, conditions, tmp_path / "c", n_items=6, repeats=1, latency_items=1,
                     n_bootstrap=200, progress=False, items_out=tmp_path / "items.parquet")
    rows = t[(t.item_type == "all") & t.seed.isna()].set_index("condition")
    assert list(rows.index) == ["baseline", "prune_dead", "prune_dead_label", "random_dead_label", "random_dead"]
    assert rows.loc["prune_dead", "select"] == "membership" and rows.loc["prune_dead_label", "select"] == "label"
    base_kept = rows.loc["baseline", "tokens_kept"]
    assert rows.loc["prune_dead", "tokens_kept"] == base_kept - 4
    assert rows.loc["random_dead", "tokens_kept"] == base_kept - 4
    assert rows.loc["prune_dead_label", "tokens_kept"] == base_kept
    assert rows.nothing_removed.to_dict() == {"baseline": False, "prune_dead": False, "prune_dead_label": True,
                                              "random_dead_label": True, "random_dead": False}
    n_images = pd.read_parquet(tmp_path / "items.parquet").image_id.nunique()  # items of the first images
    assert rows.loc["prune_dead", "n_removed_images"] == n_images >= 2
    assert rows.loc["prune_dead_label", "n_removed_images"] == 0
    assert pd.isna(rows.loc["baseline", "n_removed_images"])
    # seeds averaged per item: n = items, and a control that removes nothing has the baseline's interval
    assert (rows.n_items == 6).all()
    for c in ("accuracy", "ci_low", "ci_high"):
        assert rows.loc["random_dead_label", c] == rows.loc["baseline", c]
    # no Δ for the baseline and the nothing-removed conditions; a paired Δ for the others
    assert rows.loc[["baseline", "prune_dead_label", "random_dead_label"], "delta"].isna().all()
    for c in ("prune_dead", "random_dead"):
        r = rows.loc[c]
        assert r.delta == pytest.approx(r.accuracy - rows.loc["baseline", "accuracy"])
        assert r.delta_ci_low <= r.delta <= r.delta_ci_high and r.n_pairs == 6
    assert 0 <= rows.loc["prune_dead", "p_mcnemar"] <= 1
    items = pd.read_parquet(tmp_path / "items.parquet")
    seed_means = items[items.condition == "random_dead"].groupby("item_index")["correct"].mean()
    # McNemar only where the per-item seed means are 0/1 (every seed agrees on every item)
    assert pd.isna(rows.loc["random_dead", "p_mcnemar"]) != seed_means.isin([0, 1]).all()
    per_seed = t[(t.condition == "random_dead") & t.seed.notna() & (t.item_type == "all")]
    assert len(per_seed) == 2 and per_seed.p_mcnemar.between(0, 1).all()
    s = read_compress(tmp_path / "c").summary
    assert s["settings"]["n_bootstrap"] == 200 and s["settings"]["select_default"] == "membership"
    assert s["results"]["nothing_removed"] == ["prune_dead_label", "random_dead_label"]
    assert "membership_selection" in {n["procedure"] for n in s["methods_notes"]}
