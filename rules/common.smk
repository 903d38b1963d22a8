# Config validation and target derivation. Everything here runs at planning time and
# must stay cheap (no torch import): `snakemake -n` on a finished workflow is seconds.

import json
import shutil
from pathlib import Path

from embedlens.config import ConfigError, config_hash, normalize, step_settings, validate
from embedlens.devices import visible_devices

try:
    validate(config, "config.yaml")
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

CFG = normalize(config)


def _export_overrides_modules():
    """Every job imports the user's architecture overrides (EMBEDLENS_OVERRIDES, read by
    embedlens.models.overrides); checked here, without importing torch, before any job."""
    import importlib.util
    import os

    entries = []
    for i, name in enumerate(CFG["overrides_modules"]):
        if name.endswith(".py"):
            path = Path(name).resolve()
            if not path.is_file():
                raise WorkflowError(f"config.yaml: overrides_modules[{i}]: no such file {name!r}")
            entries.append(str(path))
        elif importlib.util.find_spec(name) is None:
            raise WorkflowError(f"config.yaml: overrides_modules[{i}]: no module named {name!r} "
                                "(give an importable module or a .py file)")
        else:
            entries.append(name)
    if entries:
        # Exported for the jobs snakemake starts (local, and Slurm, which passes the
        # environment on by default). Optional, so not an `envvars:` requirement.
        os.environ.update({"EMBEDLENS_OVERRIDES": os.pathsep.join(entries)})


_export_overrides_modules()
MODELS = CFG["models"]
DATASETS = CFG["datasets"]
BUILTIN_MODEL_DIR = "resources/models/{name}"
# Report templates live in the repository, wherever the workflow's working directory is.
REPO = Path(workflow.basedir).parent
TEMPLATES = {name: str(REPO / "notebooks" / f"{name}.ipynb") for name in ("report", "summary")}


def _check_models():
    """Resolve every non-builtin model offline before any job runs."""
    from embedlens.models.resolve import resolve_model

    resolved = {}
    for name, entry in MODELS.items():
        if "builtin" in entry:
            continue
        try:
            resolved[name] = str(resolve_model({**entry, "name": name}, key=f"models.{name}").path)
        except (FileNotFoundError, PermissionError, ValueError) as exc:
            raise WorkflowError(f"config.yaml: models.{name}: {exc}") from None
    return resolved


RESOLVED_MODEL_DIRS = _check_models()


def mini_weights():
    """The weights embedlens-mini is built with (committed, or retrained under resources/),
    by version: 1 = projector; 2 = projector + LoRA adapter (merged by the build)."""
    mini = CFG["embedlens_mini"]
    if mini["version"] == 2:
        base = "resources/mini-v2" if mini["retrain"] else str(REPO / "src" / "embedlens" / "mini" / "v2")
        if not mini["retrain"] and not Path(base, "adapter", "adapter_model.safetensors").is_file():
            raise WorkflowError(f"config.yaml: embedlens_mini.version: 2, but {base}/ holds no trained v2 "
                                "weights; set embedlens_mini.retrain: true to train them, or use version: 1")
        return {"projector": f"{base}/projector.safetensors",
                "adapter": f"{base}/adapter/adapter_model.safetensors"}
    if mini["retrain"]:
        return {"projector": "resources/projector/embedlens-mini.safetensors"}
    return {"projector": str(REPO / "src" / "embedlens" / "mini" / "projector.safetensors")}


def model_dir(model):
    entry = MODELS[model]
    if "builtin" in entry:
        return BUILTIN_MODEL_DIR.format(name=entry["builtin"])
    return RESOLVED_MODEL_DIRS[model]


def model_input(wildcards):
    """Builtin models are built by a rule, so they are a file dependency."""
    entry = MODELS[wildcards.model]
    if "builtin" in entry:
        return model_dir(wildcards.model)
    return []


def model_datasets(model):
    """The data sets a model runs on (config only: known before any checkpoint)."""
    return list(MODELS[model]["datasets"])


def pairs():
    """(model, data set) pairs the config asks for."""
    return [(m, d) for m in MODELS for d in model_datasets(m)]


def extraction(model):
    return MODELS[model]["extraction"]


def extraction_identity(model):
    """The extraction knobs that change stored values, as one JSON param (as
    ExtractSettings.identity: preprocess only when not native, so that the param of a
    native extraction, and with it every finished shard, is what it was before the option)."""
    ex = extraction(model)
    keys = ("layers", "vision_layers", "compute_dtype", "store_dtype", "prompt")
    extra = {"preprocess": ex["preprocess"]} if ex["preprocess"] != "native" else {}
    if ex["quantization"] is not None:  # quantized weights change the values
        extra["quantization"] = ex["quantization"]
    return json.dumps({**{k: ex[k] for k in keys}, **extra}, sort_keys=True)


def uses_gpu(model):
    device = extraction(model)["device"]
    if device == "cuda":
        return 1
    # 'auto': a cheap check that does not import torch at planning time.
    return int(device == "auto" and shutil.which("nvidia-smi") is not None)


def extract_gpus(model):
    """GPUs an extraction job holds: 1, or every visible one for a model spread by device_map."""
    if not uses_gpu(model):
        return 0
    return max(1, len(VISIBLE_GPUS)) if extraction(model)["device_map"] else 1


def _gpu_resource():
    """Locally, as many GPU jobs at once as there are visible GPUs (each job takes its own
    through embedlens.devices), unless `--resources gpu=N` (or a profile) says otherwise.
    A cluster executor (a job limit, `_nodes`) is left alone: the scheduler places GPUs."""
    if "gpu" in workflow.global_resources or workflow.global_resources["_nodes"].value is not None:
        return
    workflow.register_resource("gpu", max(1, len(VISIBLE_GPUS)))


VISIBLE_GPUS = visible_devices()
_gpu_resource()


def dataset_meta(dataset):
    """dataset.json of a materialized data set (a checkpoint: known once materialized)."""
    out = checkpoints.materialize_dataset.get(dataset=dataset).output[0]
    return json.loads(Path(out, "dataset.json").read_text())


def n_images(dataset):
    return dataset_meta(dataset)["n_images"]


def has_vqa(dataset):
    """Whether a data set has multiple-choice items (decides the compress job).

    Known from the config alone, without the checkpoint: re-planning a finished workflow
    must plan nothing, and Snakemake re-plans jobs whose params read checkpoint outputs.
    """
    spec = DATASETS[dataset]
    if spec["source"] == "synthetic":
        return True
    if spec["source"] == "manifest":
        from embedlens.datasets.sources import manifest_has_vqa

        return manifest_has_vqa(spec["path"])
    return False


def shard_paths(wildcards):
    size = extraction(wildcards.model)["shard_size"]
    count = -(-n_images(wildcards.dataset) // size)
    return expand("results/hidden/{model}/{dataset}/shard-{shard:04d}.zarr",
                  model=wildcards.model, dataset=wildcards.dataset, shard=range(count))


def shard_range(wildcards):
    size = extraction(wildcards.model)["shard_size"]
    start = int(wildcards.shard) * size
    return start, start + size


def all_targets():
    """The default target: every report (which pulls in every analysis) and the index."""
    return ["results/reports/index.html"] + [
        f"results/reports/{model}/{dataset}.html" for model, dataset in pairs()]


def model_section(name, extra=None):
    """A rule's `settings` param: config section `name` as the wildcard's model runs it
    (embedlens.config.step_settings: what the model's mode sets, and the mode itself, which
    each step records), plus `extra(wc)`; as one JSON param, so any change reruns the rule."""
    return lambda wc: json.dumps({**step_settings(CFG, wc.model, name), **(extra(wc) if extra else {})},
                                 sort_keys=True)


def trust_flag(wc):
    return "--trust-remote-code" if MODELS[wc.model]["trust_remote_code"] else ""


def analysis_paths(model, dataset):
    """Every input of a model x data set's report, by name."""
    base = f"results/analysis/{model}/{dataset}"
    return {
        "dataset": f"results/datasets/{dataset}",
        "hidden": f"results/hidden/{model}/{dataset}/hidden.json",
        "vocab": f"results/hidden/{model}/vocab.zarr",
        "anchors": f"results/analysis/{model}/anchors",
        "categorize": f"{base}/categorize",
        "lens": f"{base}/lens",
        "probe": f"{base}/probe",
        "text_states": f"{base}/text_states",
        "align": f"{base}/align",
        "compress": f"{base}/compress",
        "benchmarks": f"results/analysis/{model}/benchmarks",
    }


def report_inputs(wc):
    files = {"template": TEMPLATES["report"], **analysis_paths(wc.model, wc.dataset)}
    if not has_vqa(wc.dataset):
        del files["compress"]
    if not runs_benchmarks(wc.model):
        del files["benchmarks"]
    return files


def runs_benchmarks(model):
    """Whether the standard benchmarks run for a model (benchmarks.models; default: all)."""
    chosen = CFG["benchmarks"].get("models")
    return chosen is None or model in chosen


def benchmark_specs():
    """benchmarks.tasks as config.yaml gives them (a `standin:` entry reads results/benchmarks/data/<name>)."""
    return [dict(t) for t in CFG["benchmarks"]["tasks"]]


def benchmark_data(wc):
    """The stand-in folders the tasks read (built by build_standins); real data is the user's."""
    return sorted({f"results/benchmarks/data/{t['standin']}" for t in benchmark_specs() if t.get("standin")})


def benchmark_align(wc):
    """The first data set of the model that has an alignment (for inject at the best-aligned
    layer), when benchmarks.use_best_aligned_layer is on; known from the config alone."""
    if not CFG["benchmarks"]["use_best_aligned_layer"]:
        return []
    ds = model_datasets(wc.model)
    return [f"results/analysis/{wc.model}/{ds[0]}/align"] if ds else []


def benchmark_settings(wc):
    """The benchmark step's settings: the benchmarks section's run keys, the categorize
    neighbour settings (the groups of benchmark images use the same rule), the model's
    configured anchors, device/dtype/preprocess of its extraction."""
    b = CFG["benchmarks"]
    cat = step_settings(CFG, wc.model, "categorize")
    ex = extraction(wc.model)
    return json.dumps({
        **{k: b[k] for k in ("conditions", "seeds", "n_bootstrap", "bootstrap_seed", "batch_size")},
        **{k: cat[k] for k in ("top_k", "exclude_special", "exclude_ids", "include_ids") if k in cat},
        "anchors": MODELS[wc.model].get("anchors", {}),
        "device": ex["device"], "dtype": ex["compute_dtype"], "preprocess": ex["preprocess"],
    }, sort_keys=True)


def model_id(model):
    entry = MODELS[model]
    return entry.get("hf_id") or entry.get("builtin") or entry.get("path")


def benchmark_file(step, model="{model}", dataset="{dataset}", shard="{shard}"):
    """Where the Snakemake benchmark (wall-clock seconds, memory) of an extraction shard
    goes: the only step whose outputs record no running time of their own (every other
    step's summary.json carries `seconds`). With the defaults this is the pattern of the
    `benchmark` directive; with shard="*" it is the glob the report reads (report_timings)."""
    return f"logs/benchmarks/{step}/{model}/{dataset}/shard-{shard}.tsv"


def report_timings(model, dataset):
    """The report's `timings` parameter: step -> benchmark file(s) (a glob for the shards).

    Globs, not the shard list: that is known only after the materialize checkpoint, and
    params that read a checkpoint make Snakemake re-plan finished jobs (see has_vqa)."""
    return {"extract_hidden": benchmark_file("extract_hidden", model, dataset, shard="*")}


def report_parameters(wc):
    paths = analysis_paths(wc.model, wc.dataset)
    return json.dumps({
        "model": wc.model,
        "dataset": wc.dataset,
        "model_id": model_id(wc.model),
        # Only this pair's config entries (embedlens.config.pair_config): adding a model
        # or a data set must not re-render the other pairs' reports.
        "config_hash": config_hash(CFG, wc.model, wc.dataset),
        "timings": report_timings(wc.model, wc.dataset),
        "dataset_dir": paths["dataset"],
        "hidden_index": paths["hidden"],
        "vocab": paths["vocab"],
        "anchors_dir": paths["anchors"],
        "categorize_dir": paths["categorize"],
        "lens_dir": paths["lens"],
        "probe_dir": paths["probe"],
        "text_states_dir": paths["text_states"],
        "align_dir": paths["align"],
        "compress_dir": paths["compress"] if has_vqa(wc.dataset) else None,
        "benchmarks_dir": paths["benchmarks"] if runs_benchmarks(wc.model) else None,
        "n_sample_images": CFG["report"]["n_sample_images"],
        "n_sample_patches": CFG["report"]["n_sample_patches"],
    }, sort_keys=True)


def summary_entries(wc):
    entries = []
    for model, dataset in pairs():
        paths = analysis_paths(model, dataset)
        entries.append({
            "model": model,
            "dataset": dataset,
            "model_id": model_id(model),
            "report_html": f"results/reports/{model}/{dataset}.html",
            "categorize_dir": paths["categorize"],
            "align_dir": paths["align"],
            "probe_dir": paths["probe"],
            "compress_dir": paths["compress"] if has_vqa(dataset) else None,
            "benchmarks_dir": paths["benchmarks"] if runs_benchmarks(model) else None,
        })
    return json.dumps(entries, sort_keys=True)
