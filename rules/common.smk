# Config validation and target derivation. Everything here runs at planning time and
# must stay cheap (no torch import): `snakemake -n` on a finished workflow is seconds.

import json
import shutil
from pathlib import Path

from embedlens.config import ConfigError, normalize, validate

try:
    validate(config, "config.yaml")
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

CFG = normalize(config)
MODELS = CFG["models"]
DATASETS = CFG["datasets"]
BUILTIN_MODEL_DIR = "resources/models/{name}"


def _check_models():
    """Resolve every non-builtin model offline before any job runs."""
    from embedlens.models.resolve import resolve_model

    resolved = {}
    for name, entry in MODELS.items():
        if "builtin" in entry:
            continue
        try:
            resolved[name] = str(resolve_model(entry).path)
        except (FileNotFoundError, PermissionError, ValueError) as exc:
            raise WorkflowError(f"config.yaml: models.{name}: {exc}") from None
    return resolved


RESOLVED_MODEL_DIRS = _check_models()


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


def pairs():
    """(model, data set) pairs the config asks for."""
    return [(m, d) for m, entry in MODELS.items() for d in entry["datasets"]]


def extraction(model):
    return MODELS[model]["extraction"]


def extraction_identity(model):
    """The extraction knobs that change stored values, as one JSON param."""
    ex = extraction(model)
    keys = ("layers", "vision_layers", "compute_dtype", "store_dtype", "prompt")
    return json.dumps({k: ex[k] for k in keys}, sort_keys=True)


def uses_gpu(model):
    device = extraction(model)["device"]
    if device == "cuda":
        return 1
    # 'auto': a cheap check that does not import torch at planning time.
    return int(device == "auto" and shutil.which("nvidia-smi") is not None)


def n_images(dataset):
    """Images of a materialized data set (checkpoint: known once it is materialized)."""
    out = checkpoints.materialize_dataset.get(dataset=dataset).output[0]
    return json.loads(Path(out, "dataset.json").read_text())["n_images"]


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
    targets = []
    for model, dataset in pairs():
        targets.append(f"results/hidden/{model}/{dataset}/hidden.json")
        targets.append(f"results/hidden/{model}/vocab.zarr")
    return targets
