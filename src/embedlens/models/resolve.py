"""Offline model resolution: a local directory or the local Hugging Face cache, never the network.

`resolve_model(entry)` turns one model entry of the config into a local directory and checks,
without loading any weights, that the model can be loaded: config, weights (all shards of an
index) and processor/tokenizer files are present, and remote code is only used when the entry
allows it. The workflow calls it for every model before any job runs, so a missing model is
reported by name, with how to provide it, before any GPU time is spent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

# Files whose presence shows the processor can be built (one of them suffices).
_PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
)
# Configs that may name remote code with an `auto_map`.
_AUTO_MAP_FILES = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class ModelNotFoundError(FileNotFoundError):
    """The model is neither at its `path` nor in the local Hugging Face cache."""


class ModelIncompleteError(FileNotFoundError):
    """The model directory exists but lacks files needed to load it."""


class RemoteCodeError(PermissionError):
    """The model needs `trust_remote_code`, which its config entry does not enable."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model found locally. `revision` is the cache snapshot's commit hash (None for a plain
    directory); `config` is the parsed config.json."""

    name: str
    path: Path
    source: str  # "path" or "hf_cache"
    hf_id: str | None
    revision: str | None
    trust_remote_code: bool
    architecture: str | None
    model_type: str | None
    config: dict = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "source": self.source,
            "hf_id": self.hf_id,
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "architecture": self.architecture,
            "model_type": self.model_type,
        }


def _hub_cache_dir(entry: Mapping[str, Any]) -> Path:
    """The hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME)."""
    if entry.get("cache_dir"):
        return Path(entry["cache_dir"]).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _how_to_provide(hf_id: str | None, key: str) -> str:
    lines = ["Provide it in one of these ways (nothing is downloaded at run time):"]
    if hf_id:
        lines.append(
            f"  - on a machine with access to the Hugging Face hub run `hf download {hf_id}` "
            "(older huggingface_hub: `huggingface-cli download`), then copy its cache directory "
            "(~/.cache/huggingface/hub) here, or point HF_HOME / HF_HUB_CACHE at it;"
        )
    lines.append(f"  - or set `{key}.path` to a local directory holding the model (config.json, weights, processor).")
    return "\n".join(lines)


def _from_cache(hf_id: str, revision: str | None, cache_dir: Path) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(hf_id, revision=revision, cache_dir=str(cache_dir), local_files_only=True)
        )
    except (LocalEntryNotFoundError, FileNotFoundError, HFValidationError, ValueError):
        return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelIncompleteError(f"cannot read {path}: {exc}") from exc


def _check_files(name: str, path: Path) -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    index = next((path / n for n in _WEIGHT_INDEXES if (path / n).is_file()), None)
    if index is not None:
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing += [f"{s} (listed in {index.name})" for s in shards if not (path / s).is_file()]
    elif not any((path / n).is_file() for n in _WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        missing.append("weights (model.safetensors, pytorch_model.bin or a sharded index)")
    if not any((path / n).is_file() for n in _PROCESSOR_FILES):
        missing.append("processor/tokenizer files (processor_config.json, tokenizer.json, ...)")
    if missing:
        raise ModelIncompleteError(
            f"model {name!r} at {path} is incomplete; missing: {', '.join(missing)}. "
            "A partial download or copy? Download or copy it again."
        )


def _check_remote_code(name: str, path: Path, trust: bool, key: str) -> None:
    if trust:
        return
    for fname in _AUTO_MAP_FILES:
        f = path / fname
        if f.is_file() and _read_json(f).get("auto_map"):
            raise RemoteCodeError(
                f"model {name!r} needs remote code: {fname} has an `auto_map` (its classes are "
                f"Python files shipped with the model, not part of transformers). Remote code is "
                f"off by default; if you trust this model, set `{key}.trust_remote_code: true` "
                "in config.yaml."
            )


def resolve_model(entry: Mapping[str, Any], key: str | None = None) -> ResolvedModel:
    """Find one model locally (offline) and check it can be loaded, without loading weights.

    `entry`: `{"path": dir}` or `{"hf_id": "org/name", "revision": ..., "cache_dir": ...}`,
    optional `trust_remote_code` (default False) and `name`. `key` is the config key path
    named in error messages (default `models.<name>`).
    Raises ModelNotFoundError, ModelIncompleteError or RemoteCodeError.
    """
    hf_id = entry.get("hf_id")
    name = str(entry.get("name") or hf_id or entry.get("path") or "<unnamed>")
    key = key or f"models.{name}"
    trust = bool(entry.get("trust_remote_code", False))
    revision = entry.get("revision")

    if entry.get("path"):
        path = Path(entry["path"]).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(
                f"model {name!r}: `{key}.path` = {str(path)!r} is not a directory.\n" + _how_to_provide(hf_id, key)
            )
        source, resolved_revision = "path", revision
    elif hf_id:
        cache_dir = _hub_cache_dir(entry)
        found = _from_cache(str(hf_id), revision, cache_dir)
        if found is None:
            rev = f" at revision {revision!r}" if revision else ""
            raise ModelNotFoundError(
                f"model {name!r} ({hf_id}{rev}) is not in the local Hugging Face cache ({cache_dir}).\n"
                + _how_to_provide(str(hf_id), key)
            )
        path, source = found, "hf_cache"
        # snapshots/<commit hash>: the exact revision, for provenance
        resolved_revision = path.name if path.parent.name == "snapshots" else revision
    else:
        raise ModelNotFoundError(f"model {name!r}: `{key}` needs `path` (a local directory) or `hf_id`.")

    _check_files(name, path)
    _check_remote_code(name, path, trust, key)
    config = _read_json(path / "config.json")
    architectures = config.get("architectures") or [None]
    return ResolvedModel(
        name=name,
        path=path.resolve(),
        source=source,
        hf_id=str(hf_id) if hf_id else None,
        revision=resolved_revision,
        trust_remote_code=trust,
        architecture=architectures[0],
        model_type=config.get("model_type"),
        config=config,
    )
