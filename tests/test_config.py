"""Config validation: every broken config fails with the key path named."""

import copy
from pathlib import Path

import pytest
import yaml

from embedlens.config import (
    DEFAULTS,
    ConfigError,
    load_config,
    normalize,
    schema_path,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "config.yaml").read_text())


def _broken(mutate):
    cfg = copy.deepcopy(BASE)
    mutate(cfg)
    return cfg


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["extraction"].update(batchsize=4), "extraction.batchsize: unknown key"),
    (lambda c: c["extraction"].update(batch_size="four"), "extraction.batch_size: 'four' is not of type integer"),
    (lambda c: c["models"]["embedlens-mini"].update(datasets=["synthetic", "imagenet"]),
     "models.embedlens-mini.datasets[1]: 'imagenet' is not defined under 'datasets'"),
    (lambda c: c["datasets"].update(x={"source": "flickr"}), "datasets.x.source: 'flickr' is not one of"),
    (lambda c: c["datasets"]["synthetic"].update(n_image=3), "datasets.synthetic.n_image: unknown key"),
    (lambda c: c["models"].update(m2={"path": "a", "hf_id": "b"}), "models.m2: give exactly one of"),
    (lambda c: c["models"].update(m2={"path": "a", "anchors": {"dead": ["x"]}}), "models.m2.anchors.dead[0]"),
    (lambda c: c.update(extra_section={}), "extra_section: unknown key"),
    (lambda c: c["extraction"].update(layers="some"), "extraction.layers"),
    (lambda c: c["datasets"].update(anchors={"source": "skimage"}), "datasets.anchors: the name 'anchors' is reserved"),
    (lambda c: c["models"]["embedlens-mini"].update(mode="paper"), "models.embedlens-mini.mode: 'paper' is not one of"),
    (lambda c: c["models"]["embedlens-mini"].update(mode="reference", extraction={"preprocess": "native"}),
     "models.embedlens-mini.extraction.preprocess: 'native' contradicts models.embedlens-mini.mode: reference"),
])
def test_broken_config_names_key_path(mutate, expected):
    with pytest.raises(ConfigError) as err:
        validate(_broken(mutate))
    assert expected in str(err.value)


def test_default_config_is_valid_and_normalized():
    cfg = load_config(ROOT / "config.yaml")
    mini = cfg["models"]["embedlens-mini"]
    assert mini["datasets"] == list(cfg["datasets"])
    assert mini["trust_remote_code"] is False
    assert mini["extraction"]["batch_size"] == BASE["extraction"]["batch_size"]
    assert cfg["datasets"]["synthetic"]["grid"] == 8  # data-set defaults filled in


def test_model_extraction_overrides_global():
    cfg = _broken(lambda c: c["models"]["embedlens-mini"].update(extraction={"batch_size": 2}))
    norm = normalize(cfg)
    assert norm["models"]["embedlens-mini"]["extraction"]["batch_size"] == 2
    assert norm["models"]["embedlens-mini"]["extraction"]["prompt"] == BASE["extraction"]["prompt"]


def test_mode_sets_the_reference_settings_for_its_model_only():
    """mode: reference pads images and searches every vocabulary row for that model (its
    extraction and the settings its steps get, with the mode recorded); other models keep
    the global sections. The schema's mode names are MODE_SETTINGS'."""
    from embedlens.config import MODE_SETTINGS, step_settings

    cfg = normalize(_broken(lambda c: c["models"].update(
        ref={"builtin": "embedlens-mini", "mode": "reference-float16"})))
    assert cfg["models"]["ref"]["extraction"]["preprocess"] == "pad_square"
    assert cfg["models"]["embedlens-mini"]["extraction"]["preprocess"] == "native"
    assert cfg["models"]["embedlens-mini"]["mode"] == "ours"
    cat = step_settings(cfg, "ref", "categorize")
    assert (cat["exclude_special"], cat["similarity_dtype"], cat["mode"]) == (False, "float16", "reference-float16")
    assert step_settings(cfg, "ref", "lens")["exclude_special"] is False
    assert step_settings(cfg, "ref", "probe")["mode"] == "reference-float16"
    mini = step_settings(cfg, "embedlens-mini", "categorize")
    assert (mini["exclude_special"], mini["similarity_dtype"], mini["mode"]) == (True, "float32", "ours")
    schema = yaml.safe_load(schema_path().read_text())
    assert schema["properties"]["models"]["additionalProperties"]["properties"]["mode"]["enum"] == list(MODE_SETTINGS)


# Workflow defaults that deliberately differ from the library's, with the reason.
WORKFLOW_CHOICES = {
    ("lens", "max_images"): "the lens is per token x layer x k; 16 images keep `make run` cheap",
    ("compress", "n_items"): "24 VQA items keep `make run` cheap; the library scores every item",
}


def test_defaults_are_the_schema_defaults_and_match_the_signatures():
    """One place for defaults: DEFAULTS is read from the schema's `default:`; each
    analysis section's keys are its entry point's keyword names, with equal defaults."""
    import dataclasses
    import inspect

    from embedlens.analysis.anchors import DEFAULTS as DISCOVERY
    from embedlens.analysis.settings import ENTRY_POINTS, config_keys
    from embedlens.extract import ExtractSettings

    schema = yaml.safe_load(schema_path().read_text())
    assert DEFAULTS["probe"]["n_bootstrap"] == schema["properties"]["probe"]["properties"]["n_bootstrap"]["default"]
    for step, fn in ENTRY_POINTS.items():
        keys = set(schema["properties"][step]["properties"])
        assert keys <= config_keys(step), (step, keys - config_keys(step))
        params = inspect.signature(fn).parameters
        for key, value in DEFAULTS[step].items():
            if (step, key) in WORKFLOW_CHOICES:
                assert key in params and params[key].default != value
            elif key in params:
                default = params[key].default
                assert (list(default) if isinstance(default, tuple) else default) == value, (step, key)
            elif step == "categorize":
                assert DISCOVERY[key] == value, key
    from embedlens.compress.benchmark import run_compress
    from embedlens.mini import train

    params = inspect.signature(run_compress).parameters
    for key, value in DEFAULTS["compress"].items():
        if (("compress", key) in WORKFLOW_CHOICES):
            assert params[key].default != value
        elif key in params and params[key].default is not inspect.Parameter.empty:
            default = params[key].default
            assert (list(default) if isinstance(default, tuple) else default) == value, ("compress", key)
        else:  # compress_step's own keys
            assert key in ("conditions", "use_best_aligned_layer"), key
    mini = DEFAULTS["embedlens_mini"]
    assert (mini["steps"], mini["batch_size"]) == (train.DEFAULT_STEPS, train.DEFAULT_BATCH)
    fields = {f.name: f.default for f in dataclasses.fields(ExtractSettings)}
    for key, value in DEFAULTS["extraction"].items():
        if key != "shard_size":  # planning, not extraction: one store per shard_size images
            got = fields[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, key


@pytest.mark.parametrize("section, old, new", [("probe", "bootstrap", "n_bootstrap"),
                                               ("categorize", "block_rows", "vocab_block")])
def test_renamed_key_names_the_new_one(section, old, new):
    cfg = _broken(lambda c: c.setdefault(section, {}).update({old: 1}))
    with pytest.raises(ConfigError, match=f"{section}.{old}: renamed to {section}.{new}"):
        validate(cfg)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
