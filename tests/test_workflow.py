"""End to end: the real snakemake, on a tiny random model and a small synthetic set.

One complete run is shared by the tests of this module (module-scoped fixture), then
each test re-plans or breaks the config in a copy of that directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
import yaml

from embedlens.testing.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(BIN / "snakemake"), "--snakefile", str(SNAKEFILE),
                           "--directory", str(workdir), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_config(workdir: Path, models: dict, n_images: int = 6) -> dict:
    cfg = {
        "models": models,
        "datasets": {"shapes": {"source": "synthetic", "n_images": n_images, "seed": 3,
                                "image_size": 64, "grid": 4}},
        "extraction": {"batch_size": 2, "shard_size": 4, "device": "auto",
                       "store_dtype": "float32", "vision_layers": [-1]},
        "lens": {"max_images": 2},
        "probe": {"n_bootstrap": 20, "min_tokens": 5},
        "compress": {"n_items": 6, "seeds": [0, 1], "repeats": 1},
        # one stand-in, two conditions: the rule's wiring, not the benchmark (test_bench_run)
        "benchmarks": {"standins": {"n_images": {"pope": 2}},
                       "tasks": [{"name": "pope", "task": "pope", "standin": "pope", "max_new_tokens": 2}],
                       "conditions": [{"op": "baseline"}, {"op": "prune", "groups": ["dead"]}],
                       "n_bootstrap": 20, "use_best_aligned_layer": False},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> count."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    jobs = {}
    block = text.split("Job stats:", 1)[1] if "Job stats:" in text else ""
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def planned_wildcards(proc: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"wildcards: (.+)", proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return {"llava": build_tiny_model("llava", base / "tiny-llava", seed=0),
            "qwen": build_tiny_model("qwen2_5_vl", base / "tiny-qwen", seed=1)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, models_dir):
    """A workflow run to completion once; tests copy it before changing anything."""
    work = tmp_path_factory.mktemp("wf")
    write_config(work, {"tiny": {"path": str(models_dir["llava"])}})
    snakemake(work, "--cores", "2")
    return work


def test_run_produces_every_output(finished):
    analysis = finished / "results/analysis/tiny/shapes"
    for name in ("categorize/categories.parquet", "categorize/anchors.json", "lens/lens.zarr",
                 "probe/probe.parquet", "text_states/text_states.npz", "align/align.parquet",
                 "compress/compress.parquet"):
        assert (analysis / name).exists(), name
    # one output contract: every step's directory has a summary.json of the same shape,
    # read through the step's own reader
    from embedlens.analysis import SUMMARY_KEYS, read_step

    steps = sorted(p.name for p in analysis.iterdir() if p.is_dir())
    assert steps == ["align", "categorize", "compress", "lens", "probe", "text_states"]
    for step in steps:
        summary = json.loads((analysis / step / "summary.json").read_text())
        assert list(summary) == list(SUMMARY_KEYS), step
        out = read_step(analysis / step, step)
        assert out.summary["status"] == "ok" and out.summary["seconds"] > 0, step
        assert all(out.path(name).exists() for name in out.files), step
    bench = read_step(finished / "results/analysis/tiny/benchmarks", "benchmarks")
    assert bench.summary["status"] == "ok"
    table = pd.read_parquet(bench.path("table"))
    assert set(table["task"]) == {"pope"} and {"baseline", "prune_dead"} <= set(table["condition"])
    for name in ("tiny/shapes.html", "tiny/shapes.ipynb", "index.html", "index.ipynb"):
        assert (finished / "results/reports" / name).exists(), name


def test_categorizations_of_a_model_share_its_anchors(finished):
    """Anchors are found once per model over all its data sets (the anchors step); every
    categorize summary of the model carries exactly those anchors."""
    from embedlens.analysis import read_anchors, read_categorize

    cfg = yaml.safe_load((finished / "config.yaml").read_text())
    for model, entry in cfg["models"].items():
        datasets = entry.get("datasets") or list(cfg["datasets"])
        anchors = read_anchors(finished / "results/analysis" / model / "anchors").summary
        assert anchors["step"] == "anchors" and anchors["results"]["datasets"] == datasets
        for dataset in datasets:
            cat = read_categorize(finished / "results/analysis" / model / dataset / "categorize").summary["results"]
            assert cat["anchors"] == anchors["results"]["anchors"], (model, dataset)
            assert cat["anchor_scope"] == "model" and cat["anchor_datasets"] == datasets, (model, dataset)


def test_run_produces_store_with_named_dims(finished):
    index = json.loads((finished / "results/hidden/tiny/shapes/hidden.json").read_text())
    assert index["n_images"] == 6 and len(index["shards"]) == 2  # shard_size 4
    ds = xr.open_zarr(finished / index["shards"][0])
    assert ds.llm_hidden.dims == ("image", "layer", "token", "dim")
    assert {"image_id", "patch_row", "patch_col", "token_valid"} <= set(ds.coords)
    for key in ("model", "settings_hash", "transformers_version", "torch_version", "prompt"):
        assert key in ds.attrs, key
    assert (finished / "results/hidden/tiny/vocab.zarr").is_dir()
    # one log per job
    logs = list((finished / "logs").rglob("*.log"))
    assert len(logs) >= 5


def test_replan_of_finished_workflow_plans_nothing(finished):
    start = time.perf_counter()
    proc = snakemake(finished, "-n")
    elapsed = time.perf_counter() - start
    assert planned_jobs(proc) == {}, proc.stdout
    print(f"snakemake -n on a finished workflow: {elapsed:.2f} s")


def test_adding_a_model_plans_only_its_jobs(finished, models_dir, tmp_path):
    work = tmp_path / "wf"
    shutil.copytree(finished, work, symlinks=True)
    write_config(work, {"tiny": {"path": str(models_dir["llava"])},
                        "tiny-qwen": {"path": str(models_dir["qwen"])}})
    proc = snakemake(work, "-n")
    jobs = planned_jobs(proc)
    assert jobs.get("extract_hidden") == 2 and jobs.get("export_vocab") == 1, jobs
    assert jobs.get("render_report") == 1 and jobs.get("render_summary") == 1, jobs
    assert "materialize_dataset" not in jobs
    wildcards = planned_wildcards(proc)
    assert wildcards and all("model=tiny-qwen" in w for w in wildcards), wildcards


def test_changing_extraction_prompt_reruns_extraction_only(finished, models_dir, tmp_path):
    work = tmp_path / "wf"
    shutil.copytree(finished, work, symlinks=True)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["extraction"]["prompt"] = "What is shown?"
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(work, "-n"))
    assert jobs.get("extract_hidden") == 2 and "materialize_dataset" not in jobs, jobs


def test_changing_a_probe_setting_plans_only_probe_and_reports(finished, tmp_path):
    work = tmp_path / "wf"
    shutil.copytree(finished, work, symlinks=True)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["probe"]["C"] = 0.5
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(work, "-n"))
    assert set(jobs) == {"probe_tokens", "render_report", "render_summary", "all"}, jobs


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["extraction"].update(batchsize=2), "extraction.batchsize: unknown key"),
    (lambda c: c["extraction"].update(shard_size="big"), "extraction.shard_size: 'big' is not of type"),
    (lambda c: c["models"]["tiny"].update(datasets=["nope"]), "models.tiny.datasets[0]: 'nope' is not defined"),
    (lambda c: c["models"]["tiny"].update(path="/nonexistent/model"), "models.tiny"),
])
def test_broken_config_fails_before_any_job(finished, tmp_path, mutate, message):
    work = tmp_path / "wf"
    shutil.copytree(finished, work, symlinks=True)
    before = sorted(p.relative_to(work) for p in (work / "results").rglob("*"))
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    mutate(cfg)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "--cores", "1", check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert sorted(p.relative_to(work) for p in (work / "results").rglob("*")) == before


def test_lint_is_clean(finished):
    proc = snakemake(finished, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
