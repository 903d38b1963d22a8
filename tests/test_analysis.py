"""Tests of the analyses (categorize, anchors, lens, probe, align) on constructed data.

Hidden-state stores are built in memory in the documented format (docs/architecture.md),
with planted structure whose answer is known exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from embedlens.analysis import (
    PatchLabels,
    TextStates,
    Vocab,
    VocabIndex,
    align,
    anchors_document,
    apply_rule,
    build_prompts,
    categorize,
    collect_text_states,
    compute_h0_neighbours,
    discover_anchors,
    discover_model_anchors,
    hit_at_k,
    layer_lens,
    linear_cka,
    open_lens,
    pool_tables,
    probe,
    read_anchors,
    read_patch_labels,
)
from embedlens.analysis.outputs import write_json
from embedlens.analysis.stats import robust_z, uncertainty_coefficient
from embedlens.store import token_index


# --------------------------------------------------------------------------- helpers
def make_store(llm: np.ndarray, *, layers, rows: int, cols: int, vision: np.ndarray | None = None,
               valid: np.ndarray | None = None, image_ids=None, attrs=None) -> xr.Dataset:
    """llm: (image, layer, token, dim); tokens in raster order over a rows × cols grid."""
    n_img, _, T, _ = llm.shape
    t = np.arange(T)
    data = {"llm_hidden": (("image", "layer", "token", "dim"), llm)}
    coords = {
        "image_id": ("image", image_ids or [f"img{i:03d}" for i in range(n_img)]),
        "layer": list(layers),
        "token": t,
        "patch_row": (("image", "token"), np.tile(t // cols, (n_img, 1))),
        "patch_col": (("image", "token"), np.tile(t % cols, (n_img, 1))),
        "grid_rows": ("image", np.full(n_img, rows)),
        "grid_cols": ("image", np.full(n_img, cols)),
        "token_valid": (("image", "token"), np.ones((n_img, T), bool) if valid is None else valid),
    }
    if vision is not None:
        data["vision_hidden"] = (("image", "vision_layer", "vision_token", "vision_dim"), vision)
        coords["vision_layer"] = [-1]
    return xr.Dataset(data, coords=coords, attrs=attrs or {})


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q[:n].astype(np.float32)  # orthonormal rows


# --------------------------------------------------------------------------- search
def test_vocab_index_matches_brute_force_with_exclusions_and_blocks():
    rng = np.random.default_rng(1)
    E = rng.standard_normal((503, 24)).astype(np.float32)
    E[17] = 0.0  # a zero row must not produce NaN
    Q = rng.standard_normal((77, 24)).astype(np.float16)
    excl = [2, 5, 300]
    ids, sims = VocabIndex(E, exclude=excl, vocab_block=64).search(Q, 4, query_block=10)
    En = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
    Qf = Q.astype(np.float32)
    S = (Qf / np.linalg.norm(Qf, axis=1, keepdims=True)) @ En.T
    S[:, excl] = -np.inf
    ref = np.argsort(-S, axis=1, kind="stable")[:, :4]
    assert (ids == ref).all()
    np.testing.assert_allclose(sims, np.take_along_axis(S, ref, 1), atol=1e-5)
    assert not np.isin(ids, excl).any()


def test_vocab_index_ties_ordered_by_id_and_logsumexp_exact():
    E = np.zeros((10, 4), np.float32)
    E[[6, 2, 8], 0] = 1.0  # three identical rows
    E[[1, 3], 1] = 1.0
    ids, sims = VocabIndex(E, vocab_block=3).search(np.array([[1.0, 0, 0, 0]]), 3)
    assert ids.tolist() == [[2, 6, 8]]
    rng = np.random.default_rng(0)
    W = rng.standard_normal((50, 6)).astype(np.float32)
    b = rng.standard_normal(50).astype(np.float32)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    ids, val, lse = VocabIndex(W, normalize=False, bias=b, exclude=[0], vocab_block=7).search(x, 2, logsumexp=True)
    logits = torch.from_numpy(x @ W.T + b)
    np.testing.assert_allclose(lse, torch.logsumexp(logits, 1).numpy(), rtol=1e-5)
    logits[:, 0] = -torch.inf
    np.testing.assert_array_equal(ids, logits.topk(2, dim=1).indices.numpy())


# --------------------------------------------------------------------------- the rule
RULE_ANCHORS = {"vit_sink": [1], "llm_sink": [2], "dead": [3]}


def _rule_tokens(V: int = 12) -> np.ndarray:
    """Token h[0] = weights over an orthonormal vocabulary; every id gets a small distinct
    base weight so that no two similarities tie."""
    spec = {
        "a": {0: 9, 1: 5, 4: 3, 5: 2},   # special id 0 excluded → top-3 = 1,4,5 → vit_sink
        "b": {3: 5, 1: 4, 6: 1},         # dead + vit → label vit_sink (priority), top-1 dead
        "c": {2: 5, 3: 4, 7: 3},         # llm + dead → llm_sink
        "d": {4: 5, 5: 4, 6: 3, 3: 2},   # dead only at rank 4 → alive with k = 3
        "e": {8: 5, 9: 4, 2: 3},         # llm at rank 3 → llm_sink, top-1 rule alive
        "f": {0: 9, 3: 1},               # special wins unless excluded; then dead
    }
    w = np.tile(0.01 * np.arange(V) / V, (len(spec), 1))  # anchors 1-3 get the smallest base
    for i, s in enumerate(spec.values()):
        for j, v in s.items():
            w[i, j] = v
    return w.astype(np.float32)


def test_reference_rule_labels_constructed_tokens_exactly(tmp_path):
    V = 12
    E = unit_rows(V, V, seed=3)
    w = _rule_tokens(V)
    h0 = w @ E  # cosine with row i ∝ w_i
    store = make_store(h0[None, None], layers=[0], rows=2, cols=3)
    special = np.zeros(V, bool)
    special[0] = True
    voc = Vocab(E, ["<image>"] + [f"w{i}" for i in range(1, V)], special)
    summary = categorize(store, voc, tmp_path, anchors=RULE_ANCHORS, top_k=3, progress=False)
    t = pd.read_parquet(tmp_path / "categories.parquet")
    assert t["label"].tolist() == ["vit_sink", "vit_sink", "llm_sink", "alive", "llm_sink", "dead"]
    assert t["label_top1"].tolist() == ["vit_sink", "dead", "llm_sink", "alive", "alive", "dead"]
    assert t["in_dead"].tolist() == [False, True, True, False, False, True]
    assert t["in_vit_sink"].tolist() == [True, True, False, False, False, False]
    assert t["in_llm_sink"].tolist() == [False, False, True, False, True, False]
    assert t[["top1_id", "top2_id", "top3_id"]].to_numpy().tolist()[0] == [1, 4, 5]
    assert (t["top1_id"] != 0).all() and summary["results"]["excluded_ids"] == [0]
    assert summary["results"]["anchor_source"] == "configured"
    assert summary["results"]["shares"]["topk"] == pytest.approx({"vit_sink": 2 / 6, "llm_sink": 2 / 6, "dead": 1 / 6, "alive": 1 / 6})
    ov = np.array(summary["results"]["overlap"]["counts"])  # rows/cols: vit, llm, dead
    assert ov.tolist() == [[2, 0, 1], [0, 2, 1], [1, 1, 3]]
    assert summary["results"]["overlap"]["combinations"] == {"vit_sink": 1, "vit_sink+dead": 1, "llm_sink+dead": 1,
                                                   "llm_sink": 1, "dead": 1, "none": 1}
    assert t["top1_token"].iloc[0] == "w1"
    for f in ("categories.parquet", "nearest_words.parquet", "anchors.json", "summary.json"):
        assert (tmp_path / f).exists()
    hist = pd.read_parquet(tmp_path / "nearest_words.parquet")
    assert hist.set_index("token_id").loc[3, "n_topk"] == 3 and hist.set_index("token_id").loc[3, "anchor_group"] == "dead"
    # special rows included on request: token f's top-1 becomes the special id 0
    t2, info = compute_h0_neighbours(store, voc, k=3, exclude_special=False, progress=False)
    assert t2["top1_id"].iloc[5] == 0 and info["excluded_ids"] == []
    assert apply_rule(t2, RULE_ANCHORS)["label"].iloc[5] == "dead"


def _mode_config(mode: str) -> dict:
    from embedlens.config import normalize, validate

    raw = {"models": {"m": {"builtin": "embedlens-mini", "mode": mode}},
           "datasets": {"s": {"source": "synthetic"}}}
    validate(raw)
    return normalize(raw)


def test_reference_mode_searches_special_rows_and_decodes_token_strings(tmp_path):
    """Planted (issue 14): tokens a and f have the special row 0 among their top-3, and row 0
    is the only anchor. A model with mode: reference (config → categorize settings) searches
    every row, as the released code: a and f get the anchor's label and the rule note is
    tagged reference. The default excludes the special row: no token gets the label, and
    the note says deviation. Token tables carry the raw piece and its decoded text."""
    from embedlens.analysis.settings import config_kwargs
    from embedlens.config import step_settings

    V = 12
    E = unit_rows(V, V, seed=3)
    store = make_store((_rule_tokens(V) @ E)[None, None], layers=[0], rows=2, cols=3)
    special = np.zeros(V, bool)
    special[0] = True
    strings = ["<image>", "▁yellow", "Ġred"] + [f"w{i}" for i in range(3, V)]
    voc = Vocab(E, strings, special)
    runs = {}
    for mode in ("reference", "ours"):
        kw = config_kwargs("categorize", {**step_settings(_mode_config(mode), "m", "categorize"),
                                          "discover_anchors": False, "device": "cpu"})
        runs[mode] = categorize(store, voc, tmp_path / mode, anchors={"vit_sink": [0]}, progress=False, **kw)
    ref = pd.read_parquet(tmp_path / "reference" / "categories.parquet")
    ours = pd.read_parquet(tmp_path / "ours" / "categories.parquet")
    assert ref["label"].tolist() == ["vit_sink", "alive", "alive", "alive", "alive", "vit_sink"]
    assert ref["label_top1"].tolist()[5] == "vit_sink" and ref["top1_id"].tolist()[5] == 0
    assert (ours["label"] == "alive").all() and (ours[["top1_id", "top2_id", "top3_id"]] != 0).all().all()
    r, o = runs["reference"], runs["ours"]
    assert r["settings"]["mode"] == "reference" and r["settings"]["exclude_special"] is False
    assert o["settings"]["mode"] == "ours" and o["results"]["excluded_ids"] == [0]
    assert r["results"]["all_rows_searched"] and not o["results"]["all_rows_searched"]
    tag = {s["procedure"]: s["tag"] for s in r["methods_notes"]}
    assert tag["embedlens_rule"] == "reference"
    assert {s["procedure"]: s["tag"] for s in o["methods_notes"]}["embedlens_rule"] == "deviation"
    assert tag["preprocess"] == "deviation"  # the store was not extracted with pad_square
    # decoded strings beside the raw pieces (token a: top-3 = 0, 1, 4 with every row searched)
    assert ref.loc[0, ["top1_token", "top2_token", "top2_text"]].tolist() == ["<image>", "▁yellow", "yellow"]
    hist = pd.read_parquet(tmp_path / "reference" / "nearest_words.parquet").set_index("token_id")
    assert hist.loc[1, "token_string"] == "▁yellow" and hist.loc[1, "token_text"] == "yellow"
    with pytest.raises(ValueError, match="searches every vocabulary row"):
        categorize(store, voc, tmp_path / "bad", anchors={}, discover_anchors=False, mode="reference",
                   exclude_special=True, progress=False)


def test_float16_similarity_reports_flips_and_keeps_the_float32_labels(tmp_path):
    """similarity_dtype float16 (mode reference-float16): the summary reports the share of
    labels and top-k lists that differ from float32 (in [0, 1], equal to the table's), and
    the float32 labels computed beside it are those of a float32 run."""
    from embedlens.analysis.settings import config_kwargs
    from embedlens.config import step_settings

    rng = np.random.default_rng(0)  # noisy tokens near random rows: near-ties that float16 may reorder
    V, d = 400, 16
    E = rng.standard_normal((V, d)).astype(np.float32)
    h0 = E[rng.integers(0, V, 600)] + 2.0 * rng.standard_normal((600, d)).astype(np.float32)
    store = make_store(h0.reshape(20, 1, 30, d), layers=[0], rows=5, cols=6)
    voc = Vocab(E, [f"w{i}" for i in range(V)], np.zeros(V, bool))
    anchors = {"vit_sink": list(range(40)), "llm_sink": list(range(40, 60)), "dead": list(range(60, 100))}
    kw16 = config_kwargs("categorize", step_settings(_mode_config("reference-float16"), "m", "categorize"))
    assert kw16["similarity_dtype"] == "float16"
    s16 = categorize(store, voc, tmp_path / "f16", anchors=anchors, progress=False, **{**kw16, "device": "cpu"})
    s32 = categorize(store, voc, tmp_path / "f32", anchors=anchors, device="cpu", progress=False,
                     exclude_special=False)
    t16 = pd.read_parquet(tmp_path / "f16" / "categories.parquet")
    t32 = pd.read_parquet(tmp_path / "f32" / "categories.parquet")
    check = s16["results"]["similarity_check"]
    for key in ("label_flip_share", "label_top1_flip_share", "topk_ids_change_share", "top1_change_share"):
        assert 0.0 <= check[key] <= 1.0, key
    assert check["label_flip_share"] == pytest.approx(float((t16["label"] != t16["label_float32"]).mean()))
    assert t16["label_float32"].tolist() == t32["label"].tolist()
    assert t16["label_top1_float32"].tolist() == t32["label_top1"].tolist()
    assert s16["settings"]["similarity_dtype"] == "float16" and s32["results"]["similarity_check"] is None
    assert "label_float32" not in t32


def test_padded_tokens_are_skipped():
    V = 12
    E = unit_rows(V, V, seed=3)
    w = _rule_tokens(V)
    h = np.stack([w @ E, w[::-1] @ E])[:, None]  # 2 images × 6 tokens
    valid = np.ones((2, 6), bool)
    valid[1, 4:] = False  # image 1 has only 4 tokens (padding from a wider shard)
    h[1, 0, 4:] = np.nan
    store = make_store(h, layers=[0], rows=2, cols=3, valid=valid)
    voc = Vocab(E, [f"w{i}" for i in range(V)], np.zeros(V, bool))
    t, _ = compute_h0_neighbours(store, voc, progress=False)
    assert len(t) == 10 and t["image_id"].tolist() == ["img000"] * 6 + ["img001"] * 4
    assert t["token"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert t["top1_id"].tolist()[6:] == [0, 8, 4, 2]  # reversed rows: f, e, d, c
    assert np.isfinite(t["norm_h0"]).all()


def test_rule_respects_k_and_rejects_unknown_groups():
    t = pd.DataFrame({"top1_id": [5, 6], "top2_id": [3, 7], "top3_id": [8, 3], "image_id": ["a", "a"]})
    assert apply_rule(t, {"dead": [3]})["label"].tolist() == ["dead", "dead"]
    assert apply_rule(t, {"dead": [3]}, k=2)["label"].tolist() == ["dead", "alive"]
    with pytest.raises(ValueError, match="unknown anchor groups"):
        apply_rule(t, {"sinks": [3]})


# --------------------------------------------------------------------------- discovery
def _planted(seed: int = 0, *, llm_id: int = 11, vocab_seed: int | None = None):
    """12 images × 36 tokens (6×6), d = V = 40, orthonormal vocabulary.
    Planted: 2 ViT-sink tokens per image (h0 ∥ e7, vision norm 50, also massive in the LLM),
    1 LLM-sink token per image (h0 ∥ e``llm_id``, early-layer norm 500), dead tokens (h0 ∥ e3,
    ~40 %, random colour labels), alive tokens (h0 ∥ e(20 + colour): the 'red' id 20 wins in
    every image but is determined by content). ``vocab_seed`` (default seed + 1) fixes the
    vocabulary, so two data sets of one model share it."""
    rng = np.random.default_rng(seed)
    V, d, n_img, T = 40, 40, 12, 36
    E = unit_rows(V, d, seed=seed + 1 if vocab_seed is None else vocab_seed)
    strings = [f"w{i}" for i in range(V)]
    strings[0], strings[3], strings[7], strings[11] = "<image>", "्", "igh", "▁jav"
    colours = ["red", "green", "blue", "yellow"]
    for c, name in enumerate(colours):
        strings[20 + c] = "▁" + name
    special = np.zeros(V, bool)
    special[0] = True
    h = np.empty((n_img, 4, T, d), np.float32)  # layers 0, 1, 2, 4
    vis = np.empty((n_img, 1, T + 1, 8), np.float32)  # with a leading CLS
    colour = rng.integers(0, 4, size=(n_img, 6, 6))
    background = np.zeros((n_img, 6, 6), np.int64)
    kind = np.empty((n_img, T), object)
    for i in range(n_img):
        perm = rng.permutation(T)
        vit_t, llm_t, dead_t = perm[:2], perm[2:3], perm[3:3 + 14]
        for t in range(T):
            r, c = divmod(t, 6)
            if t in vit_t:
                k, aid = "vit", 7
            elif t in llm_t:
                k, aid = "llm", llm_id
            elif t in dead_t:
                k, aid = "dead", 3
                background[i, r, c] = 1
            else:
                k, aid = "alive", 20 + colour[i, r, c]
            kind[i, t] = k
            h0 = 3.0 * E[aid] + 0.15 * rng.standard_normal(d)
            h[i, 0, t] = h0
            base = rng.standard_normal(d)
            base *= rng.normal(10, 0.5) / np.linalg.norm(base)
            h[i, 1, t] = base * (50 if k in ("vit", "llm") else 1)  # massive activations
            h[i, 2, t] = base
            h[i, 3, t] = base
            v = rng.standard_normal(8)
            vis[i, 0, 1 + t] = v / np.linalg.norm(v) * (50 if k == "vit" else rng.normal(10, 0.5))
        vis[i, 0, 0] = 1.0
    store = make_store(h, layers=[0, 1, 2, 4], rows=6, cols=6, vision=vis, attrs={"num_layers": 8})
    labels = PatchLabels({"colour": colours, "background": ["object", "background"]},
                         {"colour": colour, "background": background},
                         [f"img{i:03d}" for i in range(n_img)])
    return store, Vocab(E, strings, special), labels, kind


def test_discovery_recovers_planted_anchors_and_tokens(tmp_path):
    store, voc, labels, kind = _planted()
    summary = categorize(store, voc, tmp_path, labels=labels, progress=False)  # discovery: no anchors configured
    assert summary["results"]["anchor_source"] == "discovered"
    assert summary["results"]["anchors"] == {"vit_sink": [7], "llm_sink": [11], "dead": [3]}
    assert summary["results"]["anchor_strings"]["dead"] == ["्"]
    ev = json.loads((tmp_path / "anchors.json").read_text())["evidence"]
    t = pd.read_parquet(tmp_path / "categories.parquet")
    planted_vit = {(f"img{i:03d}", j) for i, j in zip(*np.nonzero(kind == "vit"))}
    planted_llm = {(f"img{i:03d}", j) for i, j in zip(*np.nonzero(kind == "llm"))}
    got_vit = {(d["image_id"], d["token"]) for d in ev["vit_sink"]["outlier_tokens"]}
    got_llm = {(d["image_id"], d["token"]) for d in ev["llm_sink"]["outlier_tokens"]}
    assert got_vit == planted_vit and got_llm == planted_llm
    assert ev["llm_sink"]["n_also_vit_outliers"] == len(planted_vit)
    assert ev["llm_sink"]["early_layers"] == [1, 2]
    # the content word 'red' is frequent in every image but is rejected as a hub
    cand = {c["token_id"]: c for c in ev["dead"]["candidates"]}
    assert not cand[20]["chosen"] and "colour" in cand[20]["rejected_because"]
    assert cand[3]["label_information"]["colour"] < 0.05
    assert ev["dead"]["label_tasks_ignored"] == ["background"]
    # top-1 labels follow the planting exactly; top-k labels follow the rule
    exp = np.where(kind == "vit", "vit_sink", np.where(kind == "llm", "llm_sink",
                   np.where(kind == "dead", "dead", "alive"))).ravel()
    assert t["label_top1"].tolist() == exp.tolist()
    assert t["label"].tolist() == apply_rule(t, summary["results"]["anchors"])["label"].tolist()
    assert summary["results"]["shares"]["top1"]["alive"] == pytest.approx((kind == "alive").mean())
    assert any(n["tag"] == "ours" and n["procedure"] == "anchor_discovery" for n in summary["methods_notes"])
    # vision norms: CLS offset detected, mapped 1:1
    assert np.isfinite(t["norm_vision"]).all()
    assert t.loc[t["label_top1"] == "vit_sink", "norm_vision"].min() == pytest.approx(50, rel=1e-3)


def test_discovery_is_deterministic_and_degrades_with_evidence():
    store, voc, labels, kind = _planted(seed=4)
    table, _ = compute_h0_neighbours(store.drop_vars(["vision_hidden", "vision_layer"]), voc, progress=False)
    assert table["norm_vision"].isna().all()
    a1, ev1 = discover_anchors(table, strings=voc.strings, num_layers=8)
    a2, ev2 = discover_anchors(table, strings=voc.strings, num_layers=8)
    assert a1 == a2 and json.dumps(ev1, default=str) == json.dumps(ev2, default=str)
    assert a1["vit_sink"] == [] and "not discoverable" in ev1["vit_sink"]["status"]
    # without the ViT group, the LLM outliers include the planted ViT tokens: both anchors
    assert a1["llm_sink"] == [7, 11] or a1["llm_sink"] == [11, 7]
    assert a1["dead"] == [3]
    assert "not applied" in ev1["dead"]["information_criterion"]
    # a single image cannot show image independence
    one = table[table["image_id"] == "img000"]
    a3, ev3 = discover_anchors(one, num_layers=8)
    assert a3["dead"] == [] and "image independence" in ev3["dead"]["candidates"][0]["rejected_because"]
    # too many outliers are not a minority artifact
    a4, ev4 = discover_anchors(table, num_layers=8, max_outlier_share=0.01)
    assert a4["llm_sink"] == [] and "not a minority" in ev4["llm_sink"]["status"]
    # configured groups are kept and their ids are never reused by a discovered group
    a5, ev5 = discover_anchors(table, num_layers=8, fixed={"llm_sink": [7], "dead": [3]})
    assert a5 == {"vit_sink": [], "llm_sink": [7], "dead": [3]}
    assert ev5["dead"]["status"].startswith("configured")


def test_label_word_sink_candidate_is_rejected_with_its_margin():
    """A colour word that is the top-1 of the LLM-sink tokens *and* of the patches of its
    colour ('green' on embedlens-mini × synthetic, which took 84 of the 92 green patches as
    an LLM-sink anchor) is content, not a sink: it fails the dead hubs' label-word /
    label-information test, with the reason and the margin of each criterion."""
    store, voc, labels, kind = _planted(llm_id=21)  # the LLM sinks' top-1 is '▁green' (21)
    table, _ = compute_h0_neighbours(store, voc, progress=False)
    a, ev = discover_anchors(table, token_labels=labels.for_table(table), label_words=labels.tasks,
                             strings=voc.strings, num_layers=8)
    assert 21 not in a["llm_sink"]  # before: llm_sink == [21]
    assert a["vit_sink"] == [7] and a["dead"] == [3]  # the content-free groups are still found
    cand = {c["token_id"]: c for c in ev["llm_sink"]["anchor_candidates"]}[21]
    assert not cand["chosen"] and "label" in cand["rejected_because"] and "margin -" in cand["rejected_because"]
    crit = {c["criterion"]: c for c in cand["criteria"]}
    assert crit["group share"]["passes"] and crit["lift"]["passes"]  # frequent and specific: only content fails
    info = crit["label information U (colour)"]
    assert info["rule"] == "≤" and not info["passes"]
    assert info["margin"] == pytest.approx(info["threshold"] - info["value"]) and info["margin"] < 0
    word = crit["label-word lift on 'green'"]
    assert not word["passes"] and word["margin"] == pytest.approx(2.0 - word["value"]) and word["margin"] < 0
    # margins are signed alike for every candidate, kept or rejected (positive = passes)
    for c in ev["llm_sink"]["anchor_candidates"] + ev["vit_sink"]["anchor_candidates"] + ev["dead"]["candidates"]:
        for k in c["criteria"]:
            if k["margin"]:  # a number ≠ 0 (0 passes a ≥ bound and fails a strict one)
                assert (k["margin"] > 0) == k["passes"], (c["token_id"], k)
        assert c["chosen"] == all(k["passes"] for k in c["criteria"]) or c["rejected_because"] == "max ids reached"
    hub = {c["token_id"]: c for c in ev["dead"]["candidates"]}
    assert hub[3]["chosen"] and all(k["margin"] > 0 for k in hub[3]["criteria"] if k["margin"] is not None)
    share = {k["criterion"]: k for k in hub[3]["criteria"]}["top-1 share"]
    assert share["margin"] == pytest.approx(share["value"] - 0.05)


def test_one_discovery_per_model_gives_every_data_set_the_same_anchors(tmp_path):
    """Two data sets of one model: A (the planted set, labelled) and B (one unlabelled
    image of another draw, too small to show anything alone). Discovered per data set, B
    gets no anchor (all alive); discovered once over both, pooled, both categorizations use
    the planted ids and B's planted tokens get their categories."""
    store_a, voc, labels_a, _ = _planted()
    store_b, voc_b, _, kind_b = _planted(seed=7, vocab_seed=1)
    np.testing.assert_array_equal(voc.embedding, voc_b.embedding)  # one model, one vocabulary
    store_b = store_b.isel(image=[0])  # its image id img000 is also A's: pooled per data set
    alone = categorize(store_b, voc, tmp_path / "b_alone", progress=False)
    assert alone["results"]["anchors"] == {"vit_sink": [], "llm_sink": [], "dead": []}
    s = discover_model_anchors({"a": store_a, "b": store_b}, voc, tmp_path / "anchors",
                               labels={"a": labels_a, "b": None}, model="m", progress=False)
    planted = {"vit_sink": [7], "llm_sink": [11], "dead": [3]}
    assert s["step"] == "anchors" and s["results"]["datasets"] == ["a", "b"]
    assert s["results"]["anchors"] == planted and s["results"]["n_images"] == {"a": 12, "b": 1}
    assert s["results"]["labelled_datasets"] == ["a"] and s["results"]["candidates"]
    doc = anchors_document(tmp_path / "anchors")
    assert read_anchors(tmp_path / "anchors").summary["results"]["anchors"] == doc["anchors"] == planted
    assert doc["evidence"]["dead"]["n_images"] == 13  # img000 of a and of b are two images
    assert any(n["procedure"] == "anchor_discovery_per_model" for n in s["methods_notes"])
    for name, store, labels in (("a", store_a, labels_a), ("b", store_b, None)):
        r = categorize(store, voc, tmp_path / name, model_anchors=doc, labels=labels, model="m", dataset=name,
                       progress=False)["results"]
        assert r["anchors"] == planted and r["anchor_source"] == "discovered"
        assert r["anchor_scope"] == "model" and r["anchor_datasets"] == ["a", "b"]
    t_b = pd.read_parquet(tmp_path / "b" / "categories.parquet")
    exp = {"vit": "vit_sink", "llm": "llm_sink", "dead": "dead", "alive": "alive"}
    assert t_b["label_top1"].tolist() == [exp[k] for k in kind_b[0]]
    # configured anchors still win per group; another model's anchors are refused
    c = categorize(store_b, voc, tmp_path / "cfg", anchors={"dead": [5]}, model_anchors=doc, progress=False)
    assert c["results"]["anchors"] == {**planted, "dead": [5]} and c["results"]["anchor_sources"]["dead"] == "configured"
    with pytest.raises(ValueError, match="anchors of model 'm'"):
        categorize(store_b, voc, tmp_path / "x", model_anchors=doc, model="other", progress=False)


def test_pooled_labels_map_equal_words_to_one_value():
    store, voc, labels, _ = _planted()
    t, _ = compute_h0_neighbours(store.isel(image=[0, 1]), voc, progress=False)
    other = PatchLabels({"colour": ["green", "red"], "size": ["small"]},
                        {"colour": np.ones((1, 6, 6), np.int64), "size": np.zeros((1, 6, 6), np.int64)}, ["img000"])
    pooled, tl, words = pool_tables({"a": t, "b": t.iloc[:36]}, {"a": labels, "b": other})
    assert pooled["dataset"].tolist() == ["a"] * 72 + ["b"] * 36 and list(pooled.columns)[0] == "dataset"
    assert words == {"colour": ["red", "green", "blue", "yellow"], "background": ["object", "background"],
                     "size": ["small"]}
    np.testing.assert_array_equal(tl["colour"][:72], labels.for_table(t)["colour"])
    assert (tl["colour"][72:] == 0).all()  # b's "red" (its value 1) is the pooled "red" (0)
    assert (tl["size"][:72] == -1).all() and (tl["size"][72:] == 0).all()
    assert (tl["background"][72:] == -1).all()


def test_partial_anchor_config_discovers_the_rest(tmp_path):
    store, voc, labels, _ = _planted()
    s = categorize(store, voc, tmp_path, anchors={"dead": [5]}, labels=labels, progress=False)
    assert s["results"]["anchors"] == {"vit_sink": [7], "llm_sink": [11], "dead": [5]}
    assert s["results"]["anchor_sources"] == {"vit_sink": "discovered", "llm_sink": "discovered", "dead": "configured"}
    assert s["results"]["anchor_source"] == "mixed"
    s2 = categorize(store, voc, tmp_path / "off", anchors={"dead": [5]}, discover_anchors=False, progress=False)
    assert s2["results"]["anchors"] == {"vit_sink": [], "llm_sink": [], "dead": [5]} and s2["results"]["anchor_sources"]["vit_sink"] == "none"


def test_vision_norm_unmappable_is_nan_with_note():
    store, voc, _, _ = _planted()
    store = store.isel(vision_token=slice(0, 20))  # 20 vision tokens for 36 LLM tokens
    table, info = compute_h0_neighbours(store, voc, progress=False)
    assert table["norm_vision"].isna().all() and "no 1:1 vision token" in info["vision_norm_note"]


def test_vision_norm_follows_store_vision_to_llm_map():
    store, voc, _, _ = _planted()
    n_img, n_v = store.sizes["image"], store.sizes["vision_token"]
    v2l = np.tile(np.arange(n_v) - 1, (n_img, 1))  # CLS → -1, then token j-1
    v2l[:, 1] = 1  # vision tokens 1 and 2 both feed LLM token 1: merged, no 1:1 partner
    store = store.assign_coords(vision_to_llm=(("image", "vision_token"), v2l))
    table, info = compute_h0_neighbours(store, voc, progress=False)
    vis = store["vision_hidden"].values[:, 0]
    nv = table["norm_vision"].to_numpy().reshape(n_img, -1)
    assert np.isnan(nv[:, 0]).all()  # token 0: no vision token feeds it any more
    assert np.isnan(nv[:, 1]).all()  # token 1: fed by two vision tokens (merged)
    np.testing.assert_allclose(nv[:, 2:], np.linalg.norm(vis[:, 3:], axis=-1), rtol=1e-5)
    assert "vision_to_llm" in info["vision_norm_note"]


def test_robust_z_and_information():
    z, med, scale = robust_z(np.array([1.0, 1.0, 1.0, 1.0, 9.0]))  # MAD = 0 → mean abs dev
    assert med == 1.0 and scale > 0 and z[-1] > 3
    y = np.array([0, 1, 2, 0, 1, 2])
    assert uncertainty_coefficient(y == 0, y) == pytest.approx(1.0)
    assert uncertainty_coefficient(np.array([1, 0, 1, 0]), np.array([0, 0, 1, 1])) == pytest.approx(0.0)


# --------------------------------------------------------------------------- labels
def test_patch_labels_cell_under_token_centre(tmp_path):
    grid = np.arange(16).reshape(1, 4, 4)
    pl = PatchLabels({"t": [str(i) for i in range(16)]}, {"t": grid}, ["a"])
    r = np.array([0, 1, 2, 7, 7])
    c = np.array([0, 1, 2, 7, 0])
    got = pl.for_tokens(["a"] * 5, r, c, [8] * 5, [8] * 5)["t"]  # 8×8 patches over 4×4 cells
    assert got.tolist() == [0, 0, 5, 15, 12]
    # non-dividing grid: 3 × 3 patches over 4 × 4 cells → floor((r + .5) * 4 / 3) = 0, 2, 3
    got = pl.for_tokens(["a"] * 3, np.array([0, 1, 2]), np.array([0, 1, 2]), [3] * 3, [3] * 3)["t"]
    assert got.tolist() == [0, 10, 15]
    assert pl.for_tokens(["zz"], [0], [0], [8], [8])["t"].tolist() == [-1]
    # the materialized format
    write_json({"name": "x", "images": [{"image_id": "a"}], "label_tasks": {"t": pl.tasks["t"]},
                "label_grid": 4}, tmp_path / "dataset.json")
    np.savez(tmp_path / "labels.npz", t=grid.astype(np.int16))
    back = read_patch_labels(tmp_path)
    assert back.image_ids == ["a"] and (back.grids["t"] == grid).all()
    write_json({"name": "y", "images": [{"image_id": "a"}], "label_tasks": {}}, tmp_path / "dataset.json")
    assert read_patch_labels(tmp_path).empty


# --------------------------------------------------------------------------- lens
def test_layer_lens_embedding_and_logit_lens(tmp_path):
    rng = np.random.default_rng(0)
    V, d, n_img, T = 30, 8, 3, 4
    E = rng.standard_normal((V, d)).astype(np.float32)
    special = np.zeros(V, bool)
    special[1] = True
    voc = Vocab(E, [f"w{i}" for i in range(V)], special)
    h = rng.standard_normal((n_img, 3, T, d)).astype(np.float16)
    valid = np.ones((n_img, T), bool)
    valid[2, 3] = False
    store = make_store(h, layers=[0, 1, 2], rows=2, cols=2, valid=valid,
                       attrs={"final_norm_applied_to_last_layer": True})
    torch.manual_seed(0)
    head = torch.nn.Linear(d, V, bias=False)
    norm = torch.nn.RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d) + 0.5)
    info = layer_lens(store, voc, tmp_path / "lens", top_k=3, lm_head=head, final_norm=norm,
                      num_layers=2, progress=False, vocab_block=7, max_block_bytes=1)
    lens = open_lens(tmp_path / "lens")
    assert dict(lens["emb_id"].sizes) == {"image": 3, "layer": 3, "token": 4, "k": 3}
    assert info["results"]["final_norm_applied_by_lens"] == {"0": True, "1": True, "2": False}
    assert lens["emb_id"].values[2, :, 3].tolist() == [[-1] * 3] * 3
    x = torch.from_numpy(h.astype(np.float32))
    for li in range(3):
        xi = x[:, li]
        cos = torch.nn.functional.normalize(xi, dim=-1) @ torch.nn.functional.normalize(torch.from_numpy(E), dim=-1).T
        cos[..., 1] = -torch.inf
        exp_emb = cos.topk(3, dim=-1).indices.numpy()
        with torch.no_grad():
            logits = head(norm(xi) if li < 2 else xi)
        lp = torch.log_softmax(logits, -1)
        logits[..., 1] = -torch.inf
        exp_log = logits.topk(3, dim=-1).indices
        got_emb = lens["emb_id"].values[:, li]
        got_log = lens["logit_id"].values[:, li]
        assert (got_emb[valid] == exp_emb[valid]).all()
        assert (got_log[valid] == exp_log.numpy()[valid]).all()
        np.testing.assert_allclose(lens["logprob"].values[:, li][valid],
                                   lp.gather(-1, exp_log).detach().numpy()[valid], atol=1e-4)
    assert lens["image_id"].values.tolist() == ["img000", "img001", "img002"]
    # subset of images, no head → embedding lens only
    info2 = layer_lens(store, voc, tmp_path / "lens2", top_k=2, images=["img001"], progress=False)
    lens2 = open_lens(tmp_path / "lens2")
    assert "logit_id" not in lens2 and lens2.sizes["image"] == 1 and not info2["results"]["logit_lens"]


# --------------------------------------------------------------------------- probe
def _probe_store(n_img: int = 24, seed: int = 0):
    """4×4 tokens; colour (3 classes) per token; h0 = noise, h1 = colour code + noise;
    5 tokens 'dead' overall (too few), no sink."""
    rng = np.random.default_rng(seed)
    T, d = 16, 12
    colour = rng.integers(0, 3, size=(n_img, 4, 4))
    codes = rng.standard_normal((3, d)) * 3
    h = rng.standard_normal((n_img, 2, T, d)).astype(np.float32)
    h[:, 1] += codes[colour.reshape(n_img, T)]
    vis = np.concatenate([np.ones((n_img, 1, 1, 5)), rng.standard_normal((n_img, 1, T, 5))], axis=2)
    store = make_store(h, layers=[0, 1], rows=4, cols=4, vision=vis.astype(np.float32))
    cat = token_index(store)
    cat["label"] = "alive"
    cat.loc[[i for i in (3, 40, 77, 120, 200) if i < len(cat)], "label"] = "dead"
    for r in (1, 2, 3):
        cat[f"top{r}_id"] = 0
        cat[f"top{r}_token"] = "x"
    names = ["red", "green", "blue"]
    cat.loc[colour.reshape(-1) == 0, "top2_token"] = "▁Red"  # every red token has 'red' at rank 2
    labels = PatchLabels({"colour": names}, {"colour": colour}, [f"img{i:03d}" for i in range(n_img)])
    return store, cat, labels


def test_probe_finds_encoded_label_by_layer_with_controls(tmp_path):
    store, cat, labels = _probe_store()
    s = probe(store, cat, labels, tmp_path, n_bootstrap=50, progress=False, seed=1)
    df = pd.read_parquet(tmp_path / "probe.parquet")
    ok = df[df["status"] == "ok"].set_index(["feature", "group"])
    assert ok.loc[("h1", "all"), "accuracy"] > 0.9
    assert ok.loc[("h0", "all"), "accuracy"] < 0.6
    assert ok.loc[("vision", "all"), "layer"] == -1
    r = ok.loc[("h1", "all")]
    assert r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"]
    assert r["selectivity"] > 0.3 and r["control_accuracy"] < r["accuracy"]
    assert 0 < r["majority_accuracy"] < 0.6
    statuses = df.set_index(["feature", "group"])["status"]
    assert statuses[("h1", "dead")] == "too_few_tokens" and statuses[("h1", "sink")] == "too_few_tokens"
    assert len(df) == 3 * 4  # vision, h0, h1 × 4 groups: nothing dropped
    test_imgs = set(s["results"]["split"]["test_images"])
    assert 0 < len(test_imgs) < 24
    assert ok.loc[("h1", "all"), "n_test_images"] == len(test_imgs)
    # deterministic
    s2 = probe(store, cat, labels, tmp_path / "again", n_bootstrap=50, progress=False, seed=1)
    pd.testing.assert_frame_equal(df, pd.read_parquet(tmp_path / "again" / "probe.parquet"))
    assert s2["results"]["split"] == s["results"]["split"]
    hit = pd.read_parquet(tmp_path / "hitk.parquet").set_index(["group", "k"])
    red_share = (cat["label"] == "alive").pipe(lambda m: (labels.for_table(cat)["colour"][m] == 0).mean())
    assert hit.loc[("alive", 1), "hit_rate"] == 0
    assert hit.loc[("alive", 2), "hit_rate"] == pytest.approx(red_share)
    # the 'red' hits come with the label-prior chance: share(red)² + ... > 0
    assert hit.loc[("alive", 2), "chance_label_prior"] > 0


def test_intervals_valid_at_0_and_1_and_cluster_aware():
    from embedlens.analysis.intervals import effective_n, newcombe_paired_difference, wilson_interval

    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # textbook value
    lo, hi = wilson_interval(1.0, 20)
    assert hi == 1.0 and lo == pytest.approx(20 / (20 + 1.959964**2))
    assert wilson_interval(0.0, 20)[0] == 0.0 and wilson_interval(0.0, 20)[1] > 0
    # every image at the pooled accuracy: no clustering, n_eff = n
    assert effective_n(np.array([5, 5, 5, 5]), np.array([10, 10, 10, 10]))[0] == 40
    # images all right or all wrong: about one independent unit per image
    assert effective_n(np.array([10, 10, 10, 0, 0]), np.array([10] * 5))[0] <= 5
    # accuracy 1 or a single image: not estimable, n_eff = n (Korn & Graubard)
    assert effective_n(np.array([10, 30]), np.array([10, 30])) == (40, 1.0)
    assert effective_n(np.array([3]), np.array([10])) == (10, 1.0)
    # clustered errors: fewer effective tokens than tokens, never fewer than 1
    n_eff, deff = effective_n(np.array([10, 9, 2, 10]), np.array([10, 10, 10, 10]))
    assert 1 <= n_eff < 40 and deff == pytest.approx(40 / n_eff)
    both = np.ones((30, 2), bool)  # both perfect: the difference 0 still gets an interval
    lo, hi = newcombe_paired_difference(1.0, wilson_interval(1.0, 30), 1.0, wilson_interval(1.0, 30), both)
    assert lo < 0 < hi


def test_perfect_probe_has_an_interval_below_one(tmp_path):
    """h1 separates the colours perfectly on every test image: accuracy 1.0 whose interval
    still reaches below 1 (an image-level percentile bootstrap gave [1, 1]); macro-F1 and
    the paired selectivity interval are not zero-width either."""
    store, cat, labels = _probe_store()
    probe(store, cat, labels, tmp_path, layers=[1], include_vision=False, groups=["all"], n_bootstrap=50,
          progress=False, seed=1)
    r = pd.read_parquet(tmp_path / "probe.parquet").iloc[0]
    assert r["status"] == "ok" and r["accuracy"] == 1.0
    assert r["accuracy_ci_low"] < 1.0 and r["accuracy_ci_high"] == 1.0
    # no between-image variance to estimate at 1.0: the tokens count (Korn & Graubard)
    assert r["accuracy_n_eff"] == r["n_test"]
    assert r["accuracy_ci_low"] == pytest.approx(r["n_test"] / (r["n_test"] + 1.959964**2))
    assert r["macro_f1_ci_low"] < r["macro_f1"] == 1.0
    assert r["selectivity_ci_low"] < r["selectivity"] < r["selectivity_ci_high"]


def test_single_class_test_split_is_not_evaluable(tmp_path):
    """A task whose test images all carry one class is not scored: a constant predictor
    would be perfect on it and its selectivity meaningless."""
    store, cat, labels = _probe_store()
    cheap = dict(layers=[1], include_vision=False, groups=["all"], progress=False, seed=1)
    split = probe(store, cat, labels, tmp_path / "split", n_bootstrap=0, **cheap)["results"]["split"]
    test = np.isin(labels.image_ids, split["test_images"])
    assert 0 < test.sum() < len(test)
    bg = np.zeros_like(labels.grids["colour"])
    bg[~test] = np.arange((~test).sum())[:, None, None] % 2  # train images: both classes
    two = PatchLabels({"colour": labels.tasks["colour"], "background": ["dark", "light"]},
                      {"colour": labels.grids["colour"], "background": bg}, labels.image_ids)
    probe(store, cat, two, tmp_path / "probe", n_bootstrap=20, **cheap)
    df = pd.read_parquet(tmp_path / "probe" / "probe.parquet").set_index("task")
    r = df.loc["background"]
    assert r["status"] == "not_evaluable" and r["n_classes"] == 2
    assert "one class ('dark')" in r["reason"]
    assert np.isnan(r["accuracy"]) and np.isnan(r["selectivity"]) and np.isnan(r["selectivity_ci_low"])
    assert df.loc["colour", "status"] == "ok" and pd.isna(df.loc["colour", "reason"])


def test_any_hit_k_recomputes_neighbours_before_fitting(tmp_path, monkeypatch):
    """hit_k other than categorize's k (3 here) recomputes the h[0] neighbours with the
    vocabulary, with the uniform chance; without a vocabulary it fails before any probe
    is fitted."""
    import importlib

    probe_module = importlib.import_module("embedlens.analysis.probe")  # the module, not the function
    store, cat, labels = _probe_store()
    rng = np.random.default_rng(0)
    words = ["<s>", "▁red", "green", "Blue"] + [f"w{i}" for i in range(16)]
    voc = Vocab(rng.standard_normal((len(words), 12)).astype(np.float32), words,
                np.array([True] + [False] * (len(words) - 1)))
    cheap = dict(layers=[1], include_vision=False, groups=["all"], n_bootstrap=0, progress=False, seed=1)
    s = probe(store, cat, labels, tmp_path / "k5", hit_k=5, vocab=voc, **cheap)
    hit = pd.read_parquet(tmp_path / "k5" / "hitk.parquet")
    assert sorted(hit["k"]) == [1, 2, 3, 4, 5]
    assert np.isfinite(hit["chance_uniform"]).all() and (hit["n_label_words_in_vocab"] == 3).all()
    # 3 label words among 19 candidates (<s> excluded): P(one given word in a uniform top-5)
    assert hit.set_index("k").loc[5, "chance_uniform"] == pytest.approx(5 / 19)
    assert any("recomputed with k=5" in n for n in s["notes"])

    def no_fit(*args, **kwargs):
        raise AssertionError("a probe was fitted before hit_k was checked")

    monkeypatch.setattr(probe_module, "_fit_eval", no_fit)
    with pytest.raises(ValueError, match="hit_k=5 differs from the k=3 stored.*vocabulary store"):
        probe(store, cat, labels, tmp_path / "novocab", hit_k=5, **cheap)


def test_tokens_without_a_grid_are_left_out_and_counted(tmp_path):
    """Images whose patch grid is unknown (grid 0 x 0, patches -1 in the store) get no
    patch label: the probe leaves their tokens out and its summary counts them."""
    store, _, labels = _probe_store()
    no_grid = np.arange(store.sizes["image"]) < 4
    store = store.assign_coords(
        grid_rows=("image", np.where(no_grid, 0, 4)), grid_cols=("image", np.where(no_grid, 0, 4)),
        patch_row=store.patch_row.where(~no_grid[:, None], -1),
        patch_col=store.patch_col.where(~no_grid[:, None], -1))
    from embedlens.store import token_index

    cat = token_index(store)
    cat["label"] = "alive"
    for r in (1, 2, 3):
        cat[f"top{r}_id"] = 0
        cat[f"top{r}_token"] = "x"
    assert (labels.for_table(cat)["colour"][cat["grid_rows"].to_numpy() == 0] == -1).all()
    s = probe(store, cat, labels, tmp_path, n_bootstrap=20, progress=False, seed=1)
    assert s["results"]["grid_unknown"] == {"n_images": 4, "n_tokens": 4 * 16}
    assert any("64 tokens of 4 image(s) whose patch grid is unknown" in n for n in s["notes"])
    assert s["results"]["split"]["n_tokens_used"] == (24 - 4) * 16
    s_known = probe(*_probe_store(), tmp_path / "known", n_bootstrap=20, progress=False, seed=1)
    assert s_known["results"]["grid_unknown"] == {"n_images": 0, "n_tokens": 0}
    assert not any("grid is unknown" in n for n in s_known["notes"])


def test_probe_without_labels_writes_skipped_result(tmp_path):
    store, cat, _ = _probe_store(n_img=4)
    s = probe(store, cat, None, tmp_path, progress=False)
    assert s["status"] == "skipped" and s["reason"] == "no labels"
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "skipped"
    assert len(pd.read_parquet(tmp_path / "probe.parquet")) == 0
    assert len(pd.read_parquet(tmp_path / "hitk.parquet")) == 0


def test_hit_at_k_uniform_chance_uses_vocabulary():
    cat = pd.DataFrame({"label": ["alive"] * 2, "top1_token": ["▁red", "w"], "top1_id": [1, 2]})
    voc = Vocab(np.eye(4, dtype=np.float32), ["<s>", "▁red", "Red", "w"], np.array([1, 0, 0, 0], bool))
    hit = hit_at_k(cat, {"colour": np.array([0, 0])}, {"colour": ["red"]}, vocab=voc, exclude_ids=[0])
    row = hit[hit["group"] == "all"].iloc[0]
    assert row["hit_rate"] == 0.5 and row["chance_uniform"] == pytest.approx(2 / 3)
    assert row["n_label_words_in_vocab"] == 1
    # single characters match case-sensitively: the article "a" is not the letter "A"
    cat = pd.DataFrame({"label": ["alive"] * 3, "top1_token": ["▁a", "▁A", "A"]})
    hit = hit_at_k(cat, {"character": np.array([0, 0, 0])}, {"character": ["A"]})
    assert hit[hit["group"] == "all"]["hits"].item() == 2


# --------------------------------------------------------------------------- align
def test_linear_cka_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6))
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3 * x @ q + 1) == pytest.approx(1.0)
    assert linear_cka(x, rng.standard_normal((50, 6))) < 0.5
    big = rng.standard_normal((10, 40))  # n < p branch
    assert linear_cka(big, big @ np.linalg.qr(rng.standard_normal((40, 40)))[0]) == pytest.approx(1.0)


def test_align_finds_planted_layer(tmp_path):
    rng = np.random.default_rng(0)
    n_img, T, d = 10, 16, 16
    colour = rng.integers(0, 4, size=(n_img, 4, 4))
    names = ["red", "green", "blue", "yellow"]
    word_vecs = rng.standard_normal((4, 4, d)).astype(np.float32) * 2  # (layer, word, d)
    h = rng.standard_normal((n_img, 2, T, d)).astype(np.float32) * 0.3
    h[:, 0] += word_vecs[2][colour.reshape(n_img, T)]  # h[0] lives at text layer 2
    store = make_store(h, layers=[0, 1], rows=4, cols=4)
    from embedlens.store import token_index

    cat = token_index(store)
    cat["label"] = "alive"
    positions = np.concatenate([np.repeat(word_vecs.transpose(1, 0, 2), 5, axis=0),
                                rng.standard_normal((20, 4, d)).astype(np.float32) * 0.1])
    ts = TextStates([0, 1, 2, 3], positions, [("colour", n) for n in names], word_vecs.transpose(1, 0, 2).copy())
    ts.save(tmp_path / "text.npz")
    labels = PatchLabels({"colour": names}, {"colour": colour}, [f"img{i:03d}" for i in range(n_img)])
    s = align(store, cat, tmp_path / "text.npz", labels, tmp_path, progress=False)
    assert s["results"]["best_layer"]["h0/alive"]["layer"] == 2
    df = pd.read_parquet(tmp_path / "align.parquet")
    nn = df[(df["measure"] == "nn_accuracy") & (df["visual"] == "h0") & (df["group"] == "all")].set_index("layer")
    assert nn.loc[2, "value"] == 1.0 and nn.loc[0, "value"] < 0.7 and nn.loc[2, "chance"] == 0.25
    cka = df[(df["measure"] == "cka") & (df["visual"] == "h0") & (df["group"] == "all")].set_index("layer")["value"]
    assert cka.idxmax() == 2
    assert set(df[df["visual"] == "hl"]["layer"]) == {0, 1}  # only layers extracted for visual tokens
    assert df.loc[df["is_best"], "layer"].eq(2).any()
    # the empty groups are reported, not dropped
    assert (df[(df["group"] == "dead") & (df["measure"] == "mean_max_cos")]["n_tokens"] == 0).all()
    # without labels: only mean_max_cos, best layer by it
    s2 = align(store, cat, ts, None, tmp_path / "nolab", progress=False)
    assert set(pd.read_parquet(tmp_path / "nolab" / "align.parquet")["measure"]) == {"mean_max_cos"}
    assert s2["results"]["best_layer"]["h0/all"]["criterion"] == "mean_max_cos"


def test_align_excludes_near_constant_task_and_final_norm_point(tmp_path):
    """A 2-word task with a 90 % majority and perfect accuracy at layer 0 wins the plain
    mean-accuracy argmax; the normalized criterion excludes it (listed) and finds the real
    task's layer 2. Layer 3 = num_layers (final norm) aligns best of all but is left out."""
    rng = np.random.default_rng(3)
    n_img, T, d = 20, 16, 48
    names, bg_names = ["red", "green", "blue", "yellow"], ["sky", "ground"]
    colour = rng.integers(0, 4, size=(n_img, 4, 4))
    bg = (rng.random((n_img, 4, 4)) < 0.1).astype(np.int64)  # ~90 % "sky"
    basis = unit_rows(48, d, seed=1) * 3  # orthogonal directions: no accidental overlap
    C = {0: basis[0:4], 1: basis[4:8],
         2: basis[12:16] + 0.9 * np.roll(basis[12:16], 1, 0),
         3: basis[12:16]}  # colour words per layer: 3 exactly, 2 blurred with a neighbour
    B = basis[16:18]  # the background words at layer 0; swapped at every later layer
    h = rng.standard_normal((n_img, 1, T, d)).astype(np.float32) * 0.3
    h[:, 0] += C[3][colour.reshape(n_img, T)] + B[bg.reshape(n_img, T)]
    store = make_store(h, layers=[0], rows=4, cols=4,
                       attrs={"num_layers": 3, "final_norm_applied_to_last_layer": True})
    cat = token_index(store)
    cat["label"] = "alive"
    words = np.stack([np.stack([C[l][i] for l in range(4)]) for i in range(4)]
                     + [np.stack([B[i] if l == 0 else B[1 - i] for l in range(4)]) for i in range(2)])
    positions = np.concatenate([np.repeat(words, 3, axis=0),
                                rng.standard_normal((30, 4, d)).astype(np.float32) * 0.1])
    ts = TextStates([0, 1, 2, 3], positions, [("colour", n) for n in names] + [("background", n) for n in bg_names],
                    words.astype(np.float32))
    labels = PatchLabels({"colour": names, "background": bg_names}, {"colour": colour, "background": bg},
                         [f"img{i:03d}" for i in range(n_img)])
    s = align(store, cat, ts, labels, tmp_path, visual=("h0",), groups=("all",), n_bootstrap=100,
              progress=False)
    df = pd.read_parquet(tmp_path / "align.parquet")
    nn = df[df["measure"] == "nn_accuracy"].set_index(["task", "layer"])
    # the plain mean accuracy over tasks (the old criterion) peaks at layer 0, on the constant task
    assert nn["value"].groupby("layer").mean().idxmax() == 0
    assert nn.loc[("background", 0), "value"] > 0.95 and nn.loc[("background", 0), "majority_share"] > 0.85
    assert nn.loc[("colour", 0), "chance"] == 0.25  # the uniform chance stays
    maj = nn.loc[("colour", 2), "majority_share"]
    assert nn.loc[("colour", 2), "normalized_accuracy"] == pytest.approx(
        (nn.loc[("colour", 2), "value"] - maj) / (1 - maj))
    b = s["results"]["best_layer"]["h0/all"]
    assert b["layer"] == 2 and b["criterion"] == "normalized_nn_accuracy"
    assert [e["task"] for e in b["excluded_tasks"]] == ["background"] and b["included_tasks"] == ["colour"]
    assert b["excluded_tasks"][0]["majority_share"] == pytest.approx(nn.loc[("background", 0), "majority_share"])
    assert "majority share" in b["excluded_tasks"][0]["reason"]
    lo, hi = b["layer_ci"]
    assert lo <= 2 <= hi and hi <= 2  # layer 3 is never chosen, not even in a bootstrap draw
    vlo, vhi = b["value_ci"]
    assert vlo <= b["value"] <= vhi and b["n_images"] == n_img
    assert b["value_at_layer0"] < 0.2
    # the final-norm point: marked, the best of all on the criterion, and left out of the argmax
    assert df.loc[df["final_norm_point"], "layer"].eq(3).all() and df["final_norm_point"].any()
    assert not df.loc[df["layer"] != 3, "final_norm_point"].any()
    assert nn.loc[("colour", 3), "normalized_accuracy"] > nn.loc[("colour", 2), "normalized_accuracy"]
    assert s["results"]["final_norm_layer"] == 3 and any("final-norm point" in n for n in s["notes"])
    # a threshold above the constant task's share lets it back in
    s2 = align(store, cat, ts, labels, tmp_path / "all_in", visual=("h0",), groups=("all",), n_bootstrap=0,
               max_majority_share=0.99, progress=False)
    b2 = s2["results"]["best_layer"]["h0/all"]
    assert b2["excluded_tasks"] == [] and b2["layer_ci"] is None


def _tiny_llm():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<s>", "<pad>", "<unk>", "a", "the", "letter", "red", "blue", "circle", "square", "A", "B", "dog", "cat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval(), hf_tok


def test_build_prompts_and_collect_text_states():
    tasks = {"colour": ["red", "blue"], "shape": ["circle", "square"], "character": ["A", "B"]}
    prompts = build_prompts(tasks, generic_words=["dog", "cat"])
    texts = [p["text"] for p in prompts]
    assert "a red circle" in texts and "the letter A" in texts and "a dog" in texts
    for p in prompts:
        for _, w, a, b in p["words"]:
            assert p["text"][a:b] == w
    model, tok = _tiny_llm()
    ts = collect_text_states(model, tok, prompts, device="cpu", batch_size=3, progress=False)
    assert ts.layers == [0, 1, 2]
    n_pos = sum(len(p["text"].split()) for p in prompts)  # BOS excluded
    assert ts.positions.shape == (n_pos, 3, 16)
    assert ("colour", "red") in ts.word_keys and ("_generic", "dog") in ts.word_keys
    # the word state is the mean of its occurrences' hidden states
    occ = [p for p in prompts if any(w == "circle" for _, w, _, _ in p["words"])]
    states = []
    with torch.no_grad():
        for p in occ:
            ids = tok(p["text"], return_tensors="pt")["input_ids"]
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            pos = p["text"].split().index("circle") + 1
            states.append(torch.stack([x[0, pos] for x in hs]).numpy())
    got = ts.words[ts.word_keys.index(("shape", "circle"))]
    np.testing.assert_allclose(got, np.mean(states, axis=0), atol=1e-4)


def test_config_sections_map_onto_the_analysis_functions():
    import inspect

    from embedlens import analysis
    from embedlens.analysis import config_kwargs
    from embedlens.config import DEFAULTS

    for step, fn in [("categorize", analysis.categorize), ("lens", analysis.layer_lens),
                     ("probe", analysis.probe), ("align", analysis.align)]:
        kw = config_kwargs(step, DEFAULTS.get(step, {}))
        params = inspect.signature(fn).parameters
        assert set(kw) <= set(params), (step, set(kw) - set(params))
    kw = config_kwargs("categorize", DEFAULTS["categorize"])
    assert set(kw["discovery"]) <= set(inspect.signature(discover_anchors).parameters)
    # the model's anchors step reads the categorize section too: every key but categorize's own
    assert set(kw) - {"model_anchors"} <= set(inspect.signature(discover_model_anchors).parameters)
    with pytest.raises(KeyError, match="probe.nonsense"):
        config_kwargs("probe", {"nonsense": 1})


def test_best_layer_criterion_floors_below_majority_tasks_at_zero():
    """An imbalanced task answering worse than its majority word (normalized accuracy
    (0.25 - 0.75) / 0.25 = -2) counts as no skill, so it cannot pull the argmax away from
    the layer where a balanced task is perfect."""
    from embedlens.analysis.align_best import _norm_acc_draws, normalized_accuracy

    w = np.ones((1, 4))  # one draw, four images, one token each
    # imbalanced task: labels 0,0,0,1 (majority 0.75); layer 0 answers the majority (3 right),
    # layer 1 answers the minority (1 right)
    lab = np.zeros((2, 4, 2))
    lab[:, [0, 1, 2], 0] = 1
    lab[:, 3, 1] = 1
    correct = np.array([[1, 1, 1, 0], [0, 0, 0, 1]], float)
    assert normalized_accuracy(0.25, 0.75) == pytest.approx(-2.0)
    np.testing.assert_allclose(_norm_acc_draws(w, correct, lab), [[0.0, 0.0]])
    # a balanced task perfect at layer 1, chance at layer 0: with the floor layer 1 wins
    lab_b = np.zeros((2, 4, 2))
    lab_b[:, [0, 1], 0] = 1
    lab_b[:, [2, 3], 1] = 1
    good = _norm_acc_draws(w, np.array([[1, 0, 1, 0], [1, 1, 1, 1]], float), lab_b)
    mean = (good + _norm_acc_draws(w, correct, lab)) / 2
    assert int(np.argmax(mean[0])) == 1
