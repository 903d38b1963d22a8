"""The analyses on a real (tiny, random) LLaVA: data set → extraction shards →
``open_hidden`` (lazy, two shards) → categorize / lens / probe / align, checked against
direct model calls where an exact answer exists."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from embedlens.analysis import (
    align,
    build_prompts,
    categorize,
    collect_text_states,
    layer_lens,
    load_vocab,
    open_lens,
    probe,
    read_patch_labels,
)
from embedlens.datasets import load_dataset, materialize
from embedlens.datasets.materialize import token_labels
from embedlens.extract import ExtractSettings, extract_shard
from embedlens.store import open_hidden, open_vocab, write_vocab
from embedlens.testing.tiny import build_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from embedlens.models.adapter import VLMAdapter

    root = tmp_path_factory.mktemp("analysis_pipeline")
    data = materialize("shapes", {"source": "synthetic", "n_images": 8, "seed": 2, "image_size": 64,
                                  "grid": 4}, root / "data")
    model = build_tiny_model("llava", root / "llava", seed=0)
    settings = ExtractSettings(batch_size=4, store_dtype="float32", device="cpu", vision_layers=(-1,))
    shards = [extract_shard(model, data, root / f"shard-{i}.zarr", start=a, stop=b, settings=settings,
                            model_name="tiny", progress=False) for i, (a, b) in enumerate([(0, 4), (4, 8)])]
    adapter = VLMAdapter.load(str(model), dtype="float32", device="cpu")
    write_vocab(root / "vocab.zarr", adapter.embedding_matrix().numpy(), adapter.token_strings(),
                adapter.special_token_ids(), {})
    (root / "hidden.json").write_text(json.dumps({"shards": [str(s) for s in shards]}))
    return {"root": root, "data": data, "model": model, "hidden": open_hidden(shards),
            "vocab": open_vocab(root / "vocab.zarr"), "adapter": adapter}


def test_labels_agree_with_the_datasets_module(setup):
    hidden = setup["hidden"]
    labels = read_patch_labels(setup["data"])
    ds = load_dataset(setup["data"])
    from embedlens.store import token_index

    t = token_index(hidden)
    mine = labels.for_table(t)
    idx = np.array([ds.index_of(i) for i in t["image_id"]])
    theirs = token_labels(ds, idx, t["patch_row"].to_numpy(), t["patch_col"].to_numpy(),
                          int(t["grid_rows"].iloc[0]), int(t["grid_cols"].iloc[0]))
    assert set(mine) == set(theirs)
    for task in mine:
        np.testing.assert_array_equal(mine[task], theirs[task])


def test_categorize_on_the_lazy_store_matches_brute_force(setup, tmp_path):
    hidden, adapter = setup["hidden"], setup["adapter"]
    s = categorize(hidden, setup["vocab"], tmp_path, labels=read_patch_labels(setup["data"]),
                   vocab_block=100, max_block_bytes=20_000, model="tiny", progress=False)
    t = pd.read_parquet(tmp_path / "categories.parquet")
    assert len(t) == int(hidden["token_valid"].sum()) == s["results"]["n_tokens"]
    E = adapter.embedding_matrix()
    special = sorted(adapter.special_token_ids())
    assert s["results"]["excluded_ids"] == special and adapter.image_token_id in special
    h0 = torch.from_numpy(hidden["llm_hidden"].sel(layer=0).values)[hidden["token_valid"].values]
    cos = torch.nn.functional.normalize(h0, dim=-1) @ torch.nn.functional.normalize(E, dim=-1).T
    cos[:, special] = -torch.inf
    np.testing.assert_array_equal(t[["top1_id", "top2_id", "top3_id"]].to_numpy(), cos.topk(3).indices.numpy())
    # vision norms through the store's vision_to_llm map (CLIP: a leading CLS)
    vis = hidden["vision_hidden"].isel(vision_layer=0).values[:, 1:]
    np.testing.assert_allclose(t["norm_vision"].to_numpy(), np.linalg.norm(vis, axis=-1).ravel(), rtol=1e-5)
    assert s["results"]["final_norm_applied_to_last_layer"] is True and s["settings"]["num_layers"] == 2
    assert set(t["label"]) <= {"vit_sink", "llm_sink", "dead", "alive"}
    anchors = json.loads((tmp_path / "anchors.json").read_text())
    assert anchors["source"] == "discovered" and "evidence" in anchors


def test_logit_lens_last_layer_equals_the_model_logits(setup, tmp_path):
    hidden, adapter = setup["hidden"], setup["adapter"]
    info = layer_lens(hidden, setup["vocab"], tmp_path / "lens", top_k=3, lm_head=adapter.lm_head,
                      final_norm=adapter.final_norm, exclude_special=False, progress=False)
    assert info["results"]["num_layers"] == 2 and info["results"]["final_norm_applied_by_lens"] == {"0": True, "1": True, "2": False}
    lens = open_lens(tmp_path / "lens")
    ds = load_dataset(setup["data"])
    batch = adapter.prepare([ds.image(5)], hidden.attrs["prompt"])
    with torch.inference_mode():
        out = adapter.model(**batch.inputs, output_hidden_states=True)
    mask = batch["input_ids"][0] == adapter.image_token_id
    logits = out.logits[0][mask]  # the model's own prediction at the visual positions
    got = lens["logit_id"].sel(layer=2).isel(image=5).values[: int(mask.sum())]
    np.testing.assert_array_equal(got, logits.topk(3).indices.numpy())
    np.testing.assert_allclose(lens["logprob"].sel(layer=2).isel(image=5).values[: int(mask.sum())],
                               torch.log_softmax(logits, -1).topk(3).values.numpy(), atol=1e-4)
    # at a middle layer the lens applies the final norm itself
    h1 = out.hidden_states[1][0][mask]
    with torch.inference_mode():
        mid = adapter.lm_head(adapter.final_norm(h1))
    np.testing.assert_array_equal(lens["logit_id"].sel(layer=1).isel(image=5).values[: int(mask.sum())],
                                  mid.topk(3).indices.numpy())


def test_probe_and_align_run_end_to_end(setup, tmp_path):
    hidden, adapter = setup["hidden"], setup["adapter"]
    labels = read_patch_labels(setup["data"])
    categorize(hidden, setup["vocab"], tmp_path / "cat", labels=labels, progress=False)
    s = probe(hidden, tmp_path / "cat", labels, tmp_path / "probe", tasks=["colour", "background"],
              n_bootstrap=20, max_iter=100, hit_k=5, vocab=setup["vocab"], progress=False)
    df = pd.read_parquet(tmp_path / "probe" / "probe.parquet")
    assert set(df["feature"]) == {"vision", "h0", "h1", "h2"}
    assert len(df) == 4 * 2 * 4 and s["status"] == "ok"
    assert (df["status"] == "ok").any()
    hit = pd.read_parquet(tmp_path / "probe" / "hitk.parquet")
    assert sorted(hit["k"].unique()) == [1, 2, 3, 4, 5]
    prompts = build_prompts(labels.tasks, generic_words=["dog", "house"])
    ts = collect_text_states(adapter.model, adapter.tokenizer, prompts, device="cpu", progress=False)
    assert ts.layers == [0, 1, 2] and ts.words.shape[0] == sum(len(w) for w in labels.tasks.values()) + 2
    a = align(hidden, tmp_path / "cat", ts, labels, tmp_path / "align", progress=False)
    out = pd.read_parquet(tmp_path / "align" / "align.parquet")
    assert set(out["measure"]) == {"mean_max_cos", "nn_accuracy", "cka"}
    assert "h0/all" in a["results"]["best_layer"]
    # the word state of a vocabulary word at layer 0 is its input embedding
    E = load_vocab(setup["vocab"]).embedding
    key = ts.word_keys.index(("_generic", "dog"))
    ids = adapter.tokenizer("a dog", add_special_tokens=True)["input_ids"]
    np.testing.assert_allclose(ts.words[key, 0], E[ids[-1]], atol=1e-5)


def test_probe_step_gives_hit_k_chance_with_the_vocabulary(setup, tmp_path):
    """The workflow path (``embedlens probe --vocab`` → ``probe_step``) passes the
    vocabulary store: hit@k's uniform chance is computed in every row, with the
    exclusions categorize recorded, and a hit_k other than categorize's works."""
    from embedlens.analysis.steps import probe_step
    from embedlens.cli import main

    root = setup["root"]
    categorize(setup["hidden"], setup["vocab"], tmp_path / "cat", labels=read_patch_labels(setup["data"]),
               progress=False)
    settings = {"layers": [1], "include_vision": False, "groups": ["all"], "tasks": ["colour"],
                "n_bootstrap": 0, "max_iter": 50}
    s = probe_step(root / "hidden.json", tmp_path / "cat", setup["data"], tmp_path / "k4",
                   {**settings, "hit_k": 4}, vocab=root / "vocab.zarr", progress=False)
    hit = pd.read_parquet(tmp_path / "k4" / "hitk.parquet")
    assert sorted(hit["k"]) == [1, 2, 3, 4] and np.isfinite(hit["chance_uniform"]).all()
    excluded = json.loads((tmp_path / "cat" / "summary.json").read_text())["results"]["excluded_ids"]
    assert s["results"]["hitk_vocabulary"]["n_excluded"] == len(excluded) > 0
    assert main(["probe", "--hidden", str(root / "hidden.json"), "--vocab", str(root / "vocab.zarr"),
                 "--categories", str(tmp_path / "cat"), "--dataset-dir", str(setup["data"]),
                 "--settings", json.dumps(settings), "--out", str(tmp_path / "cli")]) == 0
    hit = pd.read_parquet(tmp_path / "cli" / "hitk.parquet")
    assert sorted(hit["k"]) == [1, 2, 3] and np.isfinite(hit["chance_uniform"]).all()


def test_a_store_and_another_data_set_are_refused_by_name(setup, tmp_path, capsys):
    """Synthetic data sets share their image ids, so a store analysed with another data
    set's labels would run and be wrong: every step refuses it, naming both, and the CLI
    prints the message without a traceback."""
    from embedlens.analysis.steps import open_store_of
    from embedlens.cli import main

    index = setup["root"] / "hidden.json"
    assert open_store_of(index, setup["data"]).sizes["image"] == 8
    other = materialize("other", {"source": "synthetic", "n_images": 8, "seed": 3, "image_size": 64, "grid": 4},
                        tmp_path / "other")
    with pytest.raises(ValueError, match="extracted from data set 'shapes', but .* is data set 'other'"):
        open_store_of(index, other)
    rc = main(["categorize", "--hidden", str(index), "--vocab", str(tmp_path / "nope.zarr"),
               "--dataset-dir", str(other), "--out", str(tmp_path / "cat")])
    err = capsys.readouterr().err
    assert rc == 2 and "pass the data set the store was extracted from" in err and "Traceback" not in err
