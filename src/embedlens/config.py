"""Load and validate ``config.yaml``.

The same function serves the Snakefile (before any job is planned) and every
``embedlens`` command, so a bad config fails the same way everywhere: within seconds,
with the key path named (``models.mini.datasets[1]: ...``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# Keys renamed so that a section's keys equal its entry point's keyword names; an old
# config gets told the new name instead of a bare "unknown key".
RENAMED: dict[tuple[str, str], str] = {
    ("categorize", "block_rows"): "vocab_block",
    ("lens", "block_rows"): "vocab_block",
    ("probe", "bootstrap"): "n_bootstrap",
}


def _resolve(node: dict, root: dict) -> dict:
    """A schema node with a local ``$ref`` merged in (the node's own keys win)."""
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = root
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return {**_resolve(target, root), **{k: v for k, v in node.items() if k != "$ref"}}


def _defaults_of(node: dict, root: dict) -> dict[str, Any]:
    """Nested ``default:`` values of an object node's properties (sections recursed)."""
    out: dict[str, Any] = {}
    for key, sub in _resolve(node, root).get("properties", {}).items():
        sub = _resolve(sub, root) if isinstance(sub, dict) else {}
        if "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        elif "properties" in sub:
            nested = _defaults_of(sub, root)
            if nested:
                out[key] = nested
    return out


def schema_defaults(schema: dict | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The defaults the schema declares (its ``default:`` keywords, the only place they are
    spelled): ``(global sections, per data-set source)``."""
    schema = schema if schema is not None else yaml.safe_load(schema_path().read_text())
    defaults = _defaults_of(schema, schema)
    per_source: dict[str, dict[str, Any]] = {}
    for branch in schema["properties"]["datasets"]["additionalProperties"].get("allOf", []):
        source = branch["if"]["properties"]["source"]["const"]
        per_source[source] = _defaults_of(branch["then"], schema)
    return defaults, per_source


class ConfigError(ValueError):
    """A config problem; the message names the file and the key path."""


def schema_path() -> Path:
    """The JSON schema (YAML-encoded) that config.yaml is validated against."""
    here = Path(__file__).resolve()
    # Source checkout: <root>/src/embedlens/config.py -> <root>/workflow/schemas/
    candidate = here.parents[2] / "workflow" / "schemas" / "config.schema.yaml"
    if candidate.exists():
        return candidate
    return Path(str(resources.files("embedlens") / "config.schema.yaml"))


#: Defaults of every optional key, read from the schema (README "Config reference").
DEFAULTS, DATASET_DEFAULTS = schema_defaults()


def model_defaults(schema: dict | None = None) -> dict[str, Any]:
    """The ``default:`` values of a model entry's own keys (``mode``); its ``extraction``
    defaults are the global section's."""
    schema = schema if schema is not None else yaml.safe_load(schema_path().read_text())
    out = _defaults_of(schema["properties"]["models"]["additionalProperties"], schema)
    return {k: v for k, v in out.items() if k != "extraction"}


#: Defaults of a model entry's own keys (``mode``), read from the schema.
MODEL_DEFAULTS = model_defaults()

#: What a model's ``mode`` sets for that model, section by section, over the global sections
#: (README "Reproducing the paper"): ``reference`` is the paper's released LLaVA-1.5 code —
#: every vocabulary row searched, each image padded to a square with the mean colour;
#: ``reference-float16`` also computes the EmbedLens similarity in float16, as that code ran.
#: Applied by `normalize` (extraction) and `step_settings` (analysis sections); the schema's
#: ``mode`` enum lists the same names (tests/test_config.py).
MODE_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "ours": {},
    "reference": {"extraction": {"preprocess": "pad_square"},
                  "categorize": {"exclude_special": False},
                  "lens": {"exclude_special": False}},
}
MODE_SETTINGS["reference-float16"] = {
    **MODE_SETTINGS["reference"],
    "categorize": {**MODE_SETTINGS["reference"]["categorize"], "similarity_dtype": "float16"},
}


def _key_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    """Turn a jsonschema error into 'key.path: what is wrong'."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        keys = [_key_path(path + [k]) for k in extra]
        return f"{', '.join(keys)}: unknown key (allowed here: {allowed})"
    if error.validator == "oneOf" and isinstance(error.instance, dict) and len(path) == 2:
        return (f"{_key_path(path)}: give exactly one of 'builtin', 'path' or 'hf_id' "
                "to say where the model comes from")
    if error.validator == "type":
        return f"{_key_path(path)}: {error.instance!r} is not of type {error.validator_value}"
    if error.validator == "enum":
        return f"{_key_path(path)}: {error.instance!r} is not one of {error.validator_value}"
    if error.validator == "required":
        return f"{_key_path(path)}: {error.message}"
    return f"{_key_path(path)}: {error.message}"


def _best_errors(errors):
    # Errors inside if/then branches surface as their own leaf errors; report leaves.
    leaves = []
    for err in errors:
        if err.context:
            leaves.extend(_best_errors(err.context))
        else:
            leaves.append(err)
    return leaves


def validate(raw: Any, source: str = "config.yaml") -> None:
    """Validate a parsed config against the schema and cross-references; raise ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'models' and 'datasets'")
    renamed = [f"{sec}.{old}: renamed to {sec}.{new} (the keyword of the entry point)"
               for (sec, old), new in RENAMED.items() if old in (raw.get(sec) or {})]
    if renamed:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(renamed))
    schema = yaml.safe_load(schema_path().read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        messages = []
        for err in errors:
            if err.validator == "oneOf" and len(err.absolute_path) == 2:
                messages.append(_describe(err))
            else:
                messages.extend(_describe(e) for e in _best_errors([err]))
        unique = list(dict.fromkeys(messages))
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(unique))
    if "anchors" in raw["datasets"]:
        raise ConfigError(f"{source}: datasets.anchors: the name 'anchors' is reserved "
                          "(results/analysis/<model>/anchors/ holds each model's anchors); rename the data set")
    # A model's own extraction key that its mode sets otherwise.
    for model, entry in raw["models"].items():
        mode = entry.get("mode", MODEL_DEFAULTS["mode"])
        for key, value in MODE_SETTINGS[mode].get("extraction", {}).items():
            own = (entry.get("extraction") or {}).get(key, value)
            if own != value:
                raise ConfigError(
                    f"{source}: models.{model}.extraction.{key}: {own!r} contradicts models.{model}.mode: "
                    f"{mode} (which sets {key}: {value}); remove the key or set mode: ours")
    # Names used but not defined.
    defined = list(raw["datasets"])
    for model, entry in raw["models"].items():
        for i, name in enumerate(entry.get("datasets", [])):
            if name not in raw["datasets"]:
                raise ConfigError(
                    f"{source}: models.{model}.datasets[{i}]: '{name}' is not defined under "
                    f"'datasets' (defined: {', '.join(defined)}); add it there or fix the name")


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def normalize(raw: dict) -> dict:
    """Fill defaults: global sections, per-data-set defaults, per-model ``mode`` and
    extraction (the global section, the model's own keys, then what its mode sets)."""
    cfg = _merge(DEFAULTS, raw)
    for name, spec in cfg["datasets"].items():
        cfg["datasets"][name] = _merge(DATASET_DEFAULTS[spec["source"]], spec)
    for name, entry in cfg["models"].items():
        entry.setdefault("datasets", list(cfg["datasets"]))
        entry.setdefault("trust_remote_code", False)
        entry.setdefault("mode", MODEL_DEFAULTS["mode"])
        entry["extraction"] = _merge(_merge(cfg["extraction"], entry.get("extraction", {})),
                                     MODE_SETTINGS[entry["mode"]].get("extraction", {}))
    return cfg


def step_settings(cfg: dict, model: str, step: str) -> dict[str, Any]:
    """The config section ``step`` as model ``model`` runs it: the global section of the
    normalized ``cfg``, what the model's mode sets in it (`MODE_SETTINGS`), and ``mode``
    itself, which every step records in its summary's ``settings``.

    Raises
    ------
    KeyError
        ``model`` not in ``cfg["models"]``.
    """
    mode = cfg["models"][model].get("mode", MODEL_DEFAULTS["mode"])
    return {**cfg.get(step, {}), **MODE_SETTINGS[mode].get(step, {}), "mode": mode}


def load_config(path: str | Path = "config.yaml") -> dict:
    """Read, validate and normalize a config file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    validate(raw, str(path))
    return normalize(raw)


def settings_hash(settings: dict) -> str:
    """A short stable hash of a settings mapping (recorded in store attributes)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def pair_config(cfg: dict, model: str, dataset: str) -> dict:
    """The part of a normalized config that one model × data set's outputs depend on.

    Every top-level section of ``cfg`` (as :func:`normalize` returns it), except that
    ``models`` and ``datasets`` are narrowed to this model's entry and this data set's
    entry; the model entry's ``datasets`` list (which pairs exist) is dropped; the
    global ``extraction`` section is dropped (:func:`normalize` merged it into the model's
    entry, which is what the extraction used); ``embedlens_mini`` is kept only for a
    builtin model. So adding a model or a data set, or editing another model's entry,
    leaves the other pairs' :func:`config_hash` (and the Snakemake params holding it)
    unchanged. Raises ``KeyError`` for a model or data set not in ``cfg``.
    """
    entry = {k: v for k, v in cfg["models"][model].items() if k != "datasets"}
    skip = {"models", "datasets", "extraction"} | ({"embedlens_mini"} if "builtin" not in entry else set())
    out = {k: v for k, v in cfg.items() if k not in skip}
    out["model"] = {"name": model, **entry}
    out["dataset"] = {"name": dataset, **cfg["datasets"][dataset]}
    return out


def config_hash(cfg: dict, model: str, dataset: str) -> str:
    """The config hash a model × data set's report shows: 16 hex digits of the SHA-256 of
    the canonical JSON (sorted keys, no spaces) of :func:`pair_config`. Equal hashes mean
    the same config entries produced the outputs (stable across runs and machines; paths
    are hashed as written in the config, not resolved)."""
    blob = json.dumps(pair_config(cfg, model, dataset), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
