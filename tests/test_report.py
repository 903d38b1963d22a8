"""Reports: built from real analysis outputs of tiny models, rendered with papermill +
nbconvert, and checked in a real headless browser (every figure loaded, no console error,
nothing fetched from the network, every section present, missing inputs explained).

The inputs come from the real code path: a tiny random LLaVA / Qwen2-VL
(``embedlens.testing.tiny``), a materialized data set, ``extract_shard``, the vocabulary
store, then categorize / layer lens / probe / align / compress.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from embedlens import report
from embedlens.report import REPORT_SECTIONS, SUMMARY_SECTIONS, ReportError, render_report, render_summary

REPO = Path(__file__).resolve().parents[1]
REPORT_TEMPLATE = REPO / "notebooks" / "report.ipynb"
SUMMARY_TEMPLATE = REPO / "notebooks" / "summary.ipynb"


# --------------------------------------------------------------------------- inputs
def _extract_and_vocab(model_dir: Path, dataset_dir: Path, root: Path, name: str):
    from embedlens.extract import ExtractSettings, extract_shard
    from embedlens.models.adapter import VLMAdapter
    from embedlens.store import open_hidden, write_vocab

    shard = extract_shard(model_dir, dataset_dir, root / "hidden" / "shard-0000.zarr", start=0, stop=10**6,
                          settings=ExtractSettings(device="cpu", batch_size=4), model_name=name, progress=False)
    (root / "hidden" / "hidden.json").write_text(json.dumps({"shards": [str(shard)]}))
    adapter = VLMAdapter.load(str(model_dir), dtype="float32", device="cpu")
    write_vocab(root / "vocab.zarr", adapter.embedding_matrix().float().numpy(), adapter.token_strings(),
                adapter.special_token_ids(), {"model": name})
    return open_hidden([shard]), adapter


@pytest.fixture(scope="module")
def labelled_outputs(tmp_path_factory):
    """Tiny LLaVA × 8 synthetic images: every analysis, compression included."""
    from embedlens.analysis import (
        align, build_prompts, categorize, collect_text_states, layer_lens, probe, read_patch_labels)
    from embedlens.compress import run_compress
    from embedlens.datasets import materialize
    from embedlens.testing.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("llava-synthetic")
    model = build_tiny_model("llava", root / "model")
    ds = materialize("synthetic", {"source": "synthetic", "n_images": 8, "seed": 0, "image_size": 64, "grid": 4},
                     root / "datasets" / "synthetic")
    hidden, adapter = _extract_and_vocab(model, ds, root, "tiny-llava")
    labels = read_patch_labels(ds)
    cat = root / "analysis" / "categorize"
    categorize(hidden, root / "vocab.zarr", cat, labels=labels, device="cpu", progress=False,
               model="tiny-llava", dataset="synthetic")
    layer_lens(hidden, root / "vocab.zarr", root / "analysis" / "lens", lm_head=adapter.lm_head,
               final_norm=adapter.final_norm, max_images=4, device="cpu", progress=False)
    probe(hidden, cat, labels, root / "analysis" / "probe", n_bootstrap=30, vocab=root / "vocab.zarr",
          progress=False)
    text = collect_text_states(adapter.model, adapter.tokenizer, build_prompts(labels.tasks), device="cpu",
                               progress=False)
    align(hidden, cat, text, labels, root / "analysis" / "align", device="cpu", progress=False)
    conditions = [{"op": "baseline"}, {"name": "prune_dead", "op": "prune", "groups": ["dead"]},
                  {"name": "random_dead", "op": "random_matched", "groups": ["dead"], "seeds": [0, 1]},
                  {"op": "skip", "groups": ["visual"], "sublayers": "mlp"}, {"op": "inject", "layer": 1}]
    run_compress(model, ds, cat / "categories.parquet", conditions, root / "analysis" / "compress",
                 n_items=8, repeats=1, latency_items=2, device="cpu", progress=False)
    # the standard benchmarks: one small stand-in, real lmms-eval scoring (test_bench_run
    # checks the numbers; here the report's table)
    from embedlens.bench.run import run_benchmarks
    from embedlens.bench.standins import write_standin
    from embedlens.bench.tasks import TaskSpec

    write_standin("pope", root / "standins" / "pope", n_images=2, seed=5)
    run_benchmarks(model, root / "vocab.zarr", [TaskSpec(name="pope", task="pope", path=str(root / "standins" / "pope"),
                                                        max_new_tokens=2)],
                   root / "analysis" / "benchmarks", anchors=json.loads((cat / "anchors.json").read_text())["anchors"],
                   conditions=[{"op": "baseline"}, {"name": "skip_mlp", "op": "skip", "groups": ["visual"],
                                                    "sublayers": "mlp"}],
                   n_bootstrap=20, batch_size=4, device="cpu", model="tiny-llava", progress=False)
    return {
        "model": "tiny-llava", "dataset": "synthetic", "dataset_dir": str(ds),
        "hidden_index": str(root / "hidden" / "hidden.json"), "vocab": str(root / "vocab.zarr"),
        "categorize_dir": str(cat), "lens_dir": str(root / "analysis" / "lens"),
        "probe_dir": str(root / "analysis" / "probe"), "align_dir": str(root / "analysis" / "align"),
        "compress_dir": str(root / "analysis" / "compress"), "benchmarks_dir": str(root / "analysis" / "benchmarks"),
        "config_hash": "test-config", "timings": {"extract_hidden": 1.25},
    }


@pytest.fixture(scope="module")
def unlabelled_outputs(tmp_path_factory):
    """Tiny Qwen2-VL × 2 scikit-image photos: no labels, no VQA items, no configured
    anchors; the lens and compression steps are not given at all."""
    from embedlens.analysis import align, build_prompts, categorize, collect_text_states, probe, read_patch_labels
    from embedlens.datasets import materialize
    from embedlens.testing.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("qwen-skimage")
    model = build_tiny_model("qwen2_vl", root / "model")
    ds = materialize("photos", {"source": "skimage", "limit": 2}, root / "datasets" / "photos")
    hidden, adapter = _extract_and_vocab(model, ds, root, "tiny-qwen2-vl")
    labels = read_patch_labels(ds)
    assert labels.empty
    cat = root / "analysis" / "categorize"
    categorize(hidden, root / "vocab.zarr", cat, anchors=None, labels=labels, device="cpu", progress=False)
    probe(hidden, cat, labels, root / "analysis" / "probe", progress=False)
    text = collect_text_states(adapter.model, adapter.tokenizer, build_prompts(labels.tasks), device="cpu",
                               progress=False)
    align(hidden, cat, text, labels, root / "analysis" / "align", device="cpu", progress=False)
    return {
        "model": "tiny-qwen2-vl", "dataset": "photos", "dataset_dir": str(ds),
        "hidden_index": str(root / "hidden" / "hidden.json"), "vocab": str(root / "vocab.zarr"),
        "categorize_dir": str(cat), "lens_dir": None, "probe_dir": str(root / "analysis" / "probe"),
        "align_dir": str(root / "analysis" / "align"), "compress_dir": None,
    }


@pytest.fixture(scope="module")
def reports_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("results") / "reports"


@pytest.fixture(scope="module")
def labelled_report(labelled_outputs, reports_dir):
    out = reports_dir / "tiny-llava" / "synthetic"
    html = render_report(REPORT_TEMPLATE, out.with_suffix(".html"), out.with_suffix(".ipynb"), labelled_outputs)
    return html


@pytest.fixture(scope="module")
def unlabelled_report(unlabelled_outputs, reports_dir):
    out = reports_dir / "tiny-qwen2-vl" / "photos"
    return render_report(REPORT_TEMPLATE, out.with_suffix(".html"), out.with_suffix(".ipynb"), unlabelled_outputs)


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright", reason="the browser checks need the playwright package (test extra)")
    from embedlens.testing.browser import BrowserNotFoundError, check_page, find_chromium

    try:
        find_chromium()
    except BrowserNotFoundError as exc:
        pytest.skip(str(exc))
    return check_page


def _section(page: dict, heading: str) -> str:
    for s in page["sections"]:
        if s["heading"] == heading:
            return s["text"]
    raise AssertionError(f"section {heading!r} not on the page; headings: {[s['heading'] for s in page['sections']]}")


def _assert_clean_page(page: dict, min_images: int) -> None:
    assert page["console_errors"] == [], page["console_errors"]
    assert page["external_requests"] == [], page["external_requests"]
    assert page["failed_requests"] == [], page["failed_requests"]
    assert page["scripts"] == [] and page["stylesheets"] == []
    assert len(page["images"]) >= min_images, page["images"]
    broken = [im for im in page["images"] if not (im["naturalWidth"] > 0 and im["naturalHeight"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert all(im["src"].startswith("data:image/png") for im in page["images"])


# --------------------------------------------------------------------------- tests
def test_report_renders_every_section_in_a_browser(labelled_report, browser, tmp_path):
    html = Path(labelled_report)
    assert html.exists() and html.with_suffix(".ipynb").exists()
    assert not list(html.parent.glob(".*tmp*")), "temporary files left behind"
    text = html.read_text()
    # self-contained: no tag loads anything from elsewhere (figures are data: URIs)
    assert not re.search(r"<script[^>]+src=", text) and not re.search(r"<link[^>]+href=[\"']?https?:", text)
    page = browser(html, tmp_path / "report.png")
    assert Path(page["screenshot"]).stat().st_size > 10_000
    _assert_clean_page(page, min_images=9)  # shares, maps, patches, norms, anchors, probe, align, 2 compress
    assert page["title"] == "EmbedLens report: tiny-llava × synthetic"
    headings = [h["text"] for h in page["headings"]]
    for s in REPORT_SECTIONS:
        assert s in headings, f"missing section {s!r}"
    ids = {h["id"] for h in page["headings"]}
    assert {"Category-shares", "Methods-and-deviations"} <= ids  # stable anchors for links
    # every analysis was given: no section says something is missing
    for s in REPORT_SECTIONS:
        assert "Not shown:" not in _section(page, s), (s, _section(page, s)[:500])
    assert "alive share" in _section(page, "Category shares").lower()
    words = _section(page, "Nearest words by layer")
    assert "h[0]" in words and "Logit lens" in words
    assert "selectivity" in _section(page, "Probe accuracy and selectivity")
    assert "Best-aligned layer" in _section(page, "Layer alignment")
    comp = _section(page, "Compression benchmark")
    assert "prune_dead" in comp and "random_dead" in comp and "Accuracy vs cost" in comp
    bench = _section(page, "Standard benchmarks")
    assert "skip_mlp" in bench and "pope_f1_score" in bench
    prov = _section(page, "Provenance")
    assert "788cf358" in prov or "settings hash" in prov
    assert "test-config" in prov and "extract_hidden" in prov and "transformers" in prov
    methods = _section(page, "Methods and deviations")
    for proc in ("anchor_discovery", "patch_compression_hitk", "layer_alignment", "control_task",
                 "random_matched_empty_groups"):
        assert proc in methods, proc
    assert "[ours]" in methods and "[deviation]" in methods


def test_report_without_labels_anchors_lens_or_vqa_says_why(unlabelled_report, browser, tmp_path):
    page = browser(unlabelled_report, tmp_path / "unlabelled.png")
    _assert_clean_page(page, min_images=4)  # shares, maps, norms, anchor evidence, align
    headings = [h["text"] for h in page["headings"]]
    assert all(s in headings for s in REPORT_SECTIONS)
    assert "no labels" in _section(page, "Probe accuracy and selectivity")
    assert "Not shown:" in _section(page, "Probe accuracy and selectivity")
    assert "layer-lens output" in _section(page, "Nearest words by layer")
    assert "no multiple-choice VQA items" in _section(page, "Compression benchmark")
    anchors = _section(page, "Anchors and evidence")
    assert "discovered" in anchors and "No anchor for" in anchors
    assert "only mean_max_cos" in _section(page, "Layer alignment")
    assert "none (unlabelled data set)" in _section(page, "Provenance")
    methods = _section(page, "Methods and deviations")
    assert "the probe step was skipped: no labels" in methods


def test_summary_links_every_report(labelled_report, unlabelled_report, labelled_outputs, unlabelled_outputs,
                                    reports_dir, browser, tmp_path):
    entries = []
    for outputs, html in ((labelled_outputs, labelled_report), (unlabelled_outputs, unlabelled_report)):
        entries.append({"model": outputs["model"], "dataset": outputs["dataset"], "report_html": str(html),
                        "categorize_dir": outputs["categorize_dir"], "align_dir": outputs["align_dir"],
                        "compress_dir": outputs["compress_dir"]})
    index = render_summary(SUMMARY_TEMPLATE, reports_dir / "index.html", reports_dir / "index.ipynb", entries)
    text = Path(index).read_text()
    hrefs = re.findall(r'href="([^"#]+\.html)"', text)
    assert hrefs == ["tiny-llava/synthetic.html", "tiny-qwen2-vl/photos.html"] * (len(hrefs) // 2) and hrefs
    assert all((Path(index).parent / h).exists() for h in hrefs)
    page = browser(index, tmp_path / "index.png")
    _assert_clean_page(page, min_images=2)  # alive shares, compression deltas
    headings = [h["text"] for h in page["headings"]]
    assert all(s in headings for s in SUMMARY_SECTIONS)
    assert "tiny-qwen2-vl × photos" in _section(page, "Reports")
    assert "prune_dead" in _section(page, "Compression deltas vs baseline")


def test_failing_cell_raises_with_its_error(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                "language_info": {"name": "python"}})
    nb.cells = [new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                new_code_cell("import sys\nprint(sys.executable)"),
                new_code_cell("raise ValueError(f'broken input {x}')")]
    template = tmp_path / "bad.ipynb"
    nbformat.write(nb, template)
    out = tmp_path / "out"
    with pytest.raises(ReportError, match=r"cell 3 .*ValueError: broken input 7") as err:
        render_report(template, out / "bad.html", out / "bad.ipynb", {"x": 7})
    assert "raise ValueError" in str(err.value)  # the failing cell's source is in the message
    assert not (out / "bad.html").exists() and not (out / "bad.ipynb").exists()
    kept = out / "bad.failed.ipynb"
    assert kept.exists()
    executed = nbformat.read(kept, as_version=4)
    printed = [c for c in executed.cells if c.get("source", "").startswith("import sys")][0]
    # the kernel ran this interpreter, whatever kernelspecs are installed
    assert printed["outputs"][0]["text"].strip() == sys.executable


def test_sections_with_no_inputs_explain_instead_of_failing():
    inp = report.load_inputs("some-model", "some-data")
    assert {"dataset", "hidden", "vocab", "categorize", "lens", "probe", "align", "compress"} <= set(inp.missing)
    for fn in (report.section_header, report.section_provenance, report.section_category_shares,
               report.section_category_maps, report.section_nearest_words, report.section_norms,
               report.section_anchors, report.section_probe, report.section_alignment,
               report.section_compression, report.section_methods):
        items = fn(inp)
        assert items, fn.__name__
    shares = report.section_category_shares(inp)[0]._repr_html_()
    assert "Not shown" in shares and "categorize" in shares
    rows = report.load_summary_rows([{"model": "m", "dataset": "d"}])
    for fn in (report.summary_reports, report.summary_alive, report.summary_anchors, report.summary_alignment,
               report.summary_compression):
        assert fn(rows)


def test_probe_section_lists_not_evaluable_probes_apart():
    """Probes whose test split has one class are counted apart from the untrained ones,
    listed with their reason, and left out of the curves."""
    import pandas as pd
    from matplotlib.figure import Figure

    inp = report.load_inputs("some-model", "some-data")
    row = {"accuracy": 0.9, "accuracy_ci_low": 0.8, "accuracy_ci_high": 0.95, "majority_accuracy": 0.4,
           "selectivity": 0.5, "selectivity_ci_low": 0.3, "selectivity_ci_high": 0.6, "n_tokens": 100}
    reason = "one class ('dark') among the 40 test tokens of 3 image(s)"
    inp.probe = pd.DataFrame(
        [{"feature": f, "layer": i, "task": "colour", "group": "all", "status": "ok", "reason": None, **row}
         for i, f in ((0, "h0"), (4, "h4"))]
        + [{"feature": f, "layer": i, "task": "background", "group": "all", "status": "not_evaluable",
            "reason": reason, "n_tokens": 100} for i, f in ((0, "h0"), (4, "h4"))]
        + [{"feature": "h0", "layer": 0, "task": "colour", "group": "dead", "status": "too_few_tokens",
            "reason": "3 training tokens (min_tokens 20), 2 test tokens (min_test_tokens 10)", "n_tokens": 5}])
    items = report.section_probe(inp)
    figs = [x for x in items if isinstance(x, Figure)]
    assert len(figs) == 1 and len(figs[0].axes[0].lines) == 2  # colour only: accuracy + majority
    text = "".join(x._repr_html_() if hasattr(x, "_repr_html_") else str(getattr(x, "data", ""))
                   for x in items if not isinstance(x, Figure))
    assert "1 of 5 probes were not trained" in text and "2 were not evaluable" in text
    assert "Not evaluable" in text and "h[0], h[4]" in text and "one class (&#39;dark&#39;)" in text
    assert "Wilson" in text and "Newcombe" in text


def test_reference_line_and_configured_anchors(labelled_outputs):
    params = {k: v for k, v in labelled_outputs.items() if k not in ("model", "dataset")}
    inp = report.load_inputs("llava-1.5-7b", "synthetic", **params)
    assert inp.is_reference  # detected from the name
    items = report.section_category_shares(inp)
    text = " ".join(str(getattr(x, "data", "")) for x in items)
    assert "paper's reference" in text and "60 %" in text
    # the mode that produced the numbers, and why they do not compare with the paper's
    assert "Produced in **ours** mode" in text and "special/added vocabulary rows excluded" in text
    shares_html = "".join(x._repr_html_() or "" for x in items if hasattr(x, "_repr_html_"))
    assert "not directly comparable" in shares_html and "mode: reference" in shares_html
    inp.anchors = {"source": "configured", "anchors": {"vit_sink": [1], "llm_sink": [], "dead": [2]},
                   "anchor_strings": {"vit_sink": ["Ġyellow"], "llm_sink": [], "dead": ["▁b"]},
                   "evidence": {"status": "configured anchors: no discovery run"}}
    html = "".join(x._repr_html_() if hasattr(x, "_repr_html_") else str(getattr(x, "data", ""))
                   for x in report.section_anchors(inp))
    assert "configured" in html and "No anchor for llm_sink" in html
    assert re.search(r">yellow</td>", html) and re.search(r">Ġyellow</td>", html)  # decoded, raw piece beside
    assert not report.looks_like_reference_model("embedlens-mini", "llava-1.5-13b")
    assert report.looks_like_reference_model(None, "llava-hf/llava-1.5-7b-hf")


def test_anchors_section_shows_the_per_model_job_and_margins(labelled_outputs, tmp_path):
    """With the model's anchors step (one discovery over all its data sets) the section
    names the pooled data sets and lists every candidate's criteria with their margins."""
    from embedlens.analysis import discover_model_anchors, read_patch_labels
    from embedlens.store import open_index

    p = labelled_outputs
    hidden = open_index(p["hidden_index"])
    discover_model_anchors({"synthetic": hidden, "again": hidden}, p["vocab"], tmp_path / "anchors",
                           labels={"synthetic": read_patch_labels(p["dataset_dir"]), "again": None},
                           model="tiny-llava", device="cpu", progress=False)
    params = {k: v for k, v in p.items() if k not in ("model", "dataset")}
    inp = report.load_inputs("tiny-llava", "synthetic", anchors_dir=str(tmp_path / "anchors"), **params)
    assert inp.anchors["scope"] == "model" and inp.anchors_summary["step"] == "anchors"
    html = "".join((x._repr_html_() if hasattr(x, "_repr_html_") else None) or str(getattr(x, "data", ""))
                   for x in report.section_anchors(inp))  # a figure's _repr_html_ is None
    assert "once over all its data sets" in html and "synthetic (" in html and "again (" in html
    assert "threshold (margin)" in html and "positive = passes" in html
    # an anchors directory that is not there is said; categorize's own record stands in
    inp = report.load_inputs("tiny-llava", "synthetic", anchors_dir=str(tmp_path / "nope"), **params)
    assert "anchors" in inp.missing and inp.anchors is not None


def test_token_display_decodes_word_pieces():
    """The report's token display reads "Ġyellow" / "▁yellow" as "yellow" (raw on request),
    and makes whitespace visible."""
    from embedlens.report.display import _tok

    assert _tok("Ġyellow") == _tok("▁yellow") == _tok("yellow") == "yellow"
    assert _tok("▁Yellow") == "Yellow" and _tok("##ing") == "ing"  # case kept, WordPiece marker dropped
    assert _tok("Ġyellow", raw=True) == "Ġyellow"
    assert _tok("Ċ") == _tok("<0x0A>") == "\\n" and _tok("Ġ") == "␣" and _tok("") == "∅"


# --------------------------------------------------------------------------- config hash, timings
def test_config_hash_covers_only_its_model_and_dataset():
    import copy

    from embedlens.config import config_hash, normalize

    base = {"models": {"a": {"builtin": "embedlens-mini"}},
            "datasets": {"s": {"source": "synthetic", "n_images": 4}, "t": {"source": "skimage"}}}
    h = config_hash(normalize(copy.deepcopy(base)), "a", "s")
    assert re.fullmatch(r"[0-9a-f]{16}", h) and h == config_hash(normalize(copy.deepcopy(base)), "a", "s")
    assert config_hash(normalize(copy.deepcopy(base)), "a", "t") != h
    # other models and data sets, and which pairs exist, are not this pair's config
    more = copy.deepcopy(base)
    more["models"]["b"] = {"hf_id": "org/other", "extraction": {"prompt": "Other."}}
    more["datasets"]["u"] = {"source": "skimage", "limit": 1}
    more["models"]["a"]["datasets"] = ["s"]
    assert config_hash(normalize(more), "a", "s") == h
    for mutate in (lambda c: c.update(probe={"C": 0.5}),
                   lambda c: c.update(extraction={"prompt": "What is shown?"}),  # merged into the model's entry
                   lambda c: c["models"]["a"].update(anchors={"dead": [1]}),
                   lambda c: c["datasets"]["s"].update(seed=7),
                   lambda c: c.update(report={"n_sample_images": 2})):
        changed = copy.deepcopy(base)
        mutate(changed)
        assert config_hash(normalize(changed), "a", "s") != h


def _workflow_report_params(workdir: Path, config: dict, target: str) -> dict:
    """The --params the real Snakefile passes render_report for ``target`` (a dry run:
    nothing is executed)."""
    import os
    import subprocess

    import yaml

    exe = Path(sys.executable).parent / "snakemake"
    if not exe.exists():
        pytest.skip("snakemake is not installed beside this interpreter")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([str(exe), "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
                           "-n", "-p", target], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"embedlens report .*--params '(\{.*\})' >", proc.stdout + proc.stderr)
    assert m, proc.stdout
    return json.loads(m.group(1))


def test_workflow_gives_the_report_its_config_hash_and_timings(unlabelled_outputs, tmp_path):
    """The workflow's render_report parameters carry the pair's config hash and its
    benchmark files; the rendered report shows both (it used to say "not given")."""
    from embedlens.config import config_hash, load_config

    model, dataset = unlabelled_outputs["model"], unlabelled_outputs["dataset"]
    root = Path(unlabelled_outputs["dataset_dir"]).parents[1]
    work = tmp_path / "wf"
    params = _workflow_report_params(
        work, {"models": {model: {"path": str(root / "model")}},
               "datasets": {dataset: {"source": "skimage", "limit": 2}}},
        f"results/reports/{model}/{dataset}.html")
    assert params["config_hash"] == config_hash(load_config(work / "config.yaml"), model, dataset)
    assert set(params["timings"]) == {"extract_hidden"}  # every other step records its seconds in summary.json
    # what Snakemake's `benchmark:` writes for the two extraction shards (tab-separated, `s` = seconds)
    for shard, seconds in (("0000", 2.5), ("0001", 1.25)):
        bench = work / params["timings"]["extract_hidden"].replace("*", shard)
        bench.parent.mkdir(parents=True, exist_ok=True)
        bench.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:02\t512.0\n")

    out = tmp_path / "report"
    html = render_report(REPORT_TEMPLATE, out / "r.html", out / "r.ipynb",
                         {**unlabelled_outputs, "config_hash": params["config_hash"], "timings": params["timings"]},
                         cwd=work)  # the workflow renders in its working directory: the globs are relative
    text = Path(html).read_text()
    assert params["config_hash"] in text
    assert "not given to the report" not in text
    assert "extract_hidden (2 jobs)" in text and ">3.75<" in text


def test_report_notebook_takes_and_forwards_every_input():
    """Every input ``load_inputs`` reads is a notebook parameter and is passed on to it (a
    parameter the workflow gives but the notebook drops left the benchmark section empty)."""
    import ast
    import inspect

    cells = json.loads(REPORT_TEMPLATE.read_text())["cells"]
    param_cell = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    declared = {t.id for node in ast.parse("".join(param_cell["source"])).body if isinstance(node, ast.Assign)
                for t in node.targets}
    calls = [node for c in cells if c["cell_type"] == "code"
             for node in ast.walk(ast.parse("".join(c["source"])))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load_inputs"]
    assert len(calls) == 1
    forwarded = {k.arg for k in calls[0].keywords}
    wanted = [p.name for p in inspect.signature(report.load_inputs).parameters.values()
              if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("model", "dataset"))]
    assert wanted and not [p for p in wanted if p not in declared], "not notebook parameters"
    assert not [p for p in wanted if p not in forwarded], "not passed to load_inputs"


def test_compression_section_names_random_controls_that_are_not_size_matched():
    """A random_matched control that removed fewer tokens than the prune/keep condition it
    controls (its group outnumbers the tokens outside it) is named, with both counts."""
    import pandas as pd

    from embedlens.compress.aggregate import unmatched_random_controls

    def row(name, op, groups, kept, nothing=False):
        return {"condition": name, "op": op, "groups": groups, "item_type": "all", "accuracy": 0.5,
                "visual_tokens": 64.0, "tokens_kept": kept, "nothing_removed": nothing}

    rows = pd.DataFrame([row("baseline", "baseline", "", 64.0), row("prune_dead", "prune", "dead", 18.0),
                         row("random_dead", "random_matched", "dead", 46.0),
                         row("keep_alive", "keep", "alive", 18.0),
                         row("random_keep_alive", "random_matched", "vit_sink,llm_sink,dead", 46.0),
                         row("prune_sinks", "prune", "vit_sink,llm_sink", 60.0),
                         row("random_sinks", "random_matched", "vit_sink,llm_sink", 60.0),
                         row("prune_x", "prune", "llm_sink", 64.0, nothing=True),
                         row("random_x", "random_matched", "llm_sink", 60.0)])
    found = {(u["control"], u["condition"]): (u["removed_control"], u["removed_condition"])
             for u in unmatched_random_controls(rows)}
    assert found == {("random_dead", "prune_dead"): (18.0, 46.0), ("random_keep_alive", "keep_alive"): (18.0, 46.0)}
    inp = report.load_inputs("some-model", "some-data")
    inp.compress = rows
    html = "".join(getattr(x, "_repr_html_", lambda: "")() for x in report.section_compression(inp))
    assert "<code>random_dead</code> is <b>not size-matched</b> to <code>prune_dead</code>: it removed 18.0" in html
    assert "random_sinks</code> is" not in html
    # and the index's compression section, which lists the same conditions for every pair
    from embedlens.report.summary import summary_compression

    rows["flops_rel"] = rows["tokens_kept"] / 64.0
    index = "".join(getattr(x, "_repr_html_", lambda: "")() or ""  # figures give None
                    for x in summary_compression([{"model": "m", "dataset": "d", "compress": rows}]))
    assert "m × d: <code>random_dead</code> is <b>not size-matched</b> to <code>prune_dead</code>" in index
    assert "<code>random_keep_alive</code> is <b>not size-matched</b>" in index and "random_sinks</code> is" not in index


def test_p_value_columns_are_never_rounded_to_zero():
    """Every report table shows p-values as p-values: 0.000488 was printed "0" by the
    compression table's two-decimal format (any column named "p" or "p (test)")."""
    import pandas as pd

    from embedlens.report.display import table

    df = pd.DataFrame({"condition": ["a", "b", "c", "d", "e"],
                       "p (McNemar)": [0.000488, 0.0018, 0.5, 1.0, float("nan")],
                       "p (paired bootstrap)": [0.0, 0.04, 0.2, 0.9, 0.01],
                       "accuracy": [0.000488, 0.5, 0.25, 1.0, 0.0]})
    html = table(df, precision=2).to_html()
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", html)
    rows = [cells[i:i + 4] for i in range(0, len(cells), 4)]
    assert [r[1] for r in rows] == ["&lt; 0.001", "0.0018", "0.5", "1", ""]
    assert [r[2] for r in rows] == ["&lt; 0.001", "0.04", "0.2", "0.9", "0.01"]
    assert rows[0][3] == "0"  # other float columns keep their precision
