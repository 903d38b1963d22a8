"""embedlens-mini v2: composed scenes with exact labels, benchmark item formats, the training
dtype rule, the LoRA merge, the v2 build path (on tiny random parts), and the trainer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens.mini import compose
from embedlens.mini.compose import (
    MC_SUFFIX,
    REFCOCO_PROMPT,
    SHORT_SUFFIX,
    box_text,
    make_scene,
    make_scenes,
)
from embedlens.mini.lora import autocast_dtype, cpu_flags
from embedlens.mini.sources import ObjectImage, emoji_name, stamp_name

PLANTED = {"magenta": (255, 0, 255), "cyan": (0, 255, 255), "yellow": (255, 255, 0)}


def _planted_objects(tmp_path: Path) -> list[ObjectImage]:
    """Three cut-outs: a 40 x 24 opaque rectangle of one pure colour inside a transparent
    60 x 60 canvas, so every painted pixel of a scene can be traced back to its object."""
    out = []
    for name, rgb in PLANTED.items():
        arr = np.zeros((60, 60, 4), dtype=np.uint8)
        arr[18:42, 10:50, :3] = rgb
        arr[18:42, 10:50, 3] = 255
        p = tmp_path / f"{name}.png"
        Image.fromarray(arr, "RGBA").save(p)
        out.append(ObjectImage(f"test:{name}", p, f"{name} block", f"A {name} block.", "test", "emoji"))
    return out


def _pixels(scene, rgb) -> np.ndarray:
    return np.all(np.asarray(scene.image) == np.array(rgb, dtype=np.uint8), axis=-1)


def _components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    boxes = []
    for sl in ndimage.find_objects(lab):
        boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    return sorted(boxes)


# --------------------------------------------------------------------------------------
# Composer: labels are exact
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(6))
def test_count_scene_labels_match_the_pixels(tmp_path, index):
    objs = _planted_objects(tmp_path)
    sc = make_scene(index, 11, objs, kind="count")
    things = [t for t in sc.things if t.kind == "object"]
    if not things:  # the scene counts shapes instead: colours are then the exact label
        rgb = compose.COLOURS[sc.things[0].colour]
        assert _components(_pixels(sc, rgb)) and len(sc.things) == int(
            next(i.answer for i in sc.items if i.type == "count"))
        for t in sc.things:
            assert _pixels(sc, rgb)[t.box[1]:t.box[3], t.box[0]:t.box[2]].any()
        return
    rgb = PLANTED[things[0].name.split()[0]]
    boxes = _components(_pixels(sc, rgb))
    count = next(i for i in sc.items if i.type == "count")
    assert int(count.answer) == len(things) == len(boxes)
    assert sorted(t.box for t in things) == boxes


def test_objects_scene_boxes_grounding_and_presence_are_exact(tmp_path):
    objs = _planted_objects(tmp_path)
    seen = 0
    for index in range(20):
        sc = make_scene(index, 5, objs, kind="objects")
        for t in sc.things:
            if t.kind == "object":
                # the resized rectangle is opaque and pure: its pixels give its box exactly
                assert _components(_pixels(sc, PLANTED[t.name.split()[0]])) == [t.box]
            else:  # a planted v1 shape: its named colour, exactly
                assert _pixels(sc, compose.COLOURS[t.colour])[t.box[1]:t.box[3], t.box[0]:t.box[2]].any()
                colour_item = next(i for i in sc.items if i.type == "colour")
                assert colour_item.answer == t.colour
        for it in sc.items:
            if it.type == "grounding":
                expr = it.prompt[len(REFCOCO_PROMPT):]
                t = next(t for t in sc.things if expr in (f"the {t.name}", f"the {t.colour} {t.name}"))
                assert it.answer == box_text(t.box)
                seen += 1
            if it.format == "pope":
                name = re.match(r"Is there an? (.+) in the image\?", it.prompt).group(1)
                assert (it.answer == "yes") == (name in {t.name for t in sc.things})
    assert seen == 20


def test_synthetic_scene_boxes_are_the_coloured_pixels():
    sc = make_scene(3, 1000, [], kind="synthetic")
    for t in sc.things:
        mask = _pixels(sc, compose.COLOURS[t.colour])
        ys, xs = np.nonzero(mask)
        assert t.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_scenes_are_deterministic_and_prefix_stable(tmp_path):
    objs = _planted_objects(tmp_path)
    a, b = make_scenes(6, 3, objs), make_scenes(9, 3, objs)
    for x, y in zip(a, b[:6], strict=True):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert [(i.prompt, i.answer) for i in x.items] == [(i.prompt, i.answer) for i in y.items]


# --------------------------------------------------------------------------------------
# Item formats = the benchmark tasks' formats
# --------------------------------------------------------------------------------------


def test_items_follow_the_benchmark_formats(tmp_path):
    objs = _planted_objects(tmp_path)
    items = [it for sc in make_scenes(40, 9, objs) for it in sc.items]
    formats = {it.format for it in items}
    assert formats == {"pope", "mme", "short", "mc", "grounding", "caption"}
    for it in items:
        if it.format == "pope":
            assert it.prompt.endswith("in the image?" + SHORT_SUFFIX) and it.answer in ("yes", "no")
        elif it.format == "mme":
            assert it.prompt.endswith("Please answer yes or no." + SHORT_SUFFIX) and it.answer in ("Yes", "No")
        elif it.format == "short":
            assert it.prompt.endswith(SHORT_SUFFIX) and it.answer and "\n" not in it.answer
            if it.type == "count":
                assert it.answer in ("1", "2", "3", "4")
        elif it.format == "mc":
            assert re.fullmatch(r"[^\n]+\nOptions: A: [^,]+, B: [^,]+, C: [^,]+, D: [^,\n]+" + re.escape(MC_SUFFIX),
                                it.prompt), it.prompt
            assert it.answer in "ABCD" and len(it.answer) == 1
        elif it.format == "grounding":
            assert it.prompt.startswith(REFCOCO_PROMPT)
            assert re.fullmatch(r"\[(?:[01]\.\d\d, ){3}[01]\.\d\d\]", it.answer), it.answer
    mme = [it.answer for it in items if it.format == "mme"]
    assert mme.count("Yes") == mme.count("No")  # always in pairs


def test_mc_variants_reorder_options_and_keep_the_answer(tmp_path):
    """Training copies of multiple-choice items: same options in new orders, the letter still
    names the right option; the hinted copy states that option; other items get none."""
    objs = _planted_objects(tmp_path)
    items = [it for sc in make_scenes(40, 9, objs) for it in sc.items]
    # three planted names are too few for object choice: one such item by hand
    mcs = [it for it in items if it.format == "mc"] + [
        compose.mc_item("Which object is in the image?", ["dog", "pear", "car", "hat"], 2, "mc_object")]
    assert {it.type for it in mcs} == {"mc_object", "mc_colour", "mc_count"}
    rng = np.random.default_rng(0)
    assert all(compose.mc_variants(it, rng) == [] for it in items if it.format != "mc")
    opt_re = re.compile(r"Options: A: ([^,]+), B: ([^,]+), C: ([^,]+), D: ([^,\n]+)\n")
    for it in mcs:
        right = it.options["ABCD".index(it.answer)]
        copies = compose.mc_variants(it, rng, reshuffles=2, hint=True)
        assert len(copies) == 3
        orders = [tuple(opt_re.search(c.prompt).groups()) for c in [it, *copies]]
        assert len(set(orders)) == 4  # four different orders of the same options
        assert all(sorted(o) == sorted(it.options) for o in orders)
        for c, order in zip(copies, orders[1:], strict=True):
            assert c.format == "mc" and c.type == it.type and c.choices == ["A", "B", "C", "D"]
            assert order["ABCD".index(c.answer)] == right
            assert c.prompt.endswith(MC_SUFFIX)
        assert [c.prompt.startswith(f"Hint: the answer is {right}.\n") for c in copies] == [False, False, True]
        assert copies[-1].prompt.removeprefix(f"Hint: the answer is {right}.\n").startswith(it.question)
    # answers spread over the letters (a copy tied to one letter would teach a letter bias)
    letters = [c.answer for it in mcs for c in compose.mc_variants(it, np.random.default_rng(1))]
    assert min(letters.count(x) for x in "ABCD") > len(letters) / 8
    again = [c.prompt for it in mcs for c in compose.mc_variants(it, np.random.default_rng(1))]
    assert again == [c.prompt for it in mcs for c in compose.mc_variants(it, np.random.default_rng(1))]


def test_formats_equal_lmms_eval_task_definitions():
    """Where lmms-eval is installed, the prompt strings are its own (task yaml / utils)."""
    pytest.importorskip("lmms_eval")
    import importlib.util

    root = Path(importlib.util.find_spec("lmms_eval").submodule_search_locations[0]) / "tasks"
    for task in ("pope/pope.yaml", "mme/mme.yaml", "textvqa/_default_template_textvqa_yaml"):
        assert 'post_prompt: "\\nAnswer the question using a single word or phrase."' in (root / task).read_text()
    assert "post_prompt: \"\\nAnswer with the option's letter from the given choices directly\"" in (
        root / "mmstar/_default_template_yaml").read_text()
    src = (root / "refcoco/utils_rec.py").read_text()
    assert json.dumps(REFCOCO_PROMPT) in src.replace("\n        + doc", " + doc")
    ns: dict = {}
    fn = re.search(r"def parse_float_sequence_within\(input_str\):.*?return \[0, 0, 0, 0\]\n", src, re.S).group(0)
    exec("import re\n" + fn, ns)
    assert ns["parse_float_sequence_within"](box_text((22, 45, 112, 224))) == [0.1, 0.2, 0.5, 1.0]


def test_box_text_and_names():
    assert box_text((0, 0, 224, 224)) == "[0.00, 0.00, 1.00, 1.00]"
    assert box_text((23, 57, 101, 180)) == "[0.10, 0.25, 0.45, 0.80]"
    assert compose.plural("box") == "boxes" and compose.plural("cherry") == "cherries"
    assert stamp_name("vehicles/ship/chineseJunk.png") == "chinese junk"
    assert stamp_name("animals/amphibians/frog-1.png") == "frog"
    assert stamp_name("hobbies/music/note_a.png") == "note"
    assert emoji_name({"name": "DOG FACE", "category": "Animals & Nature"}) == "dog"


# --------------------------------------------------------------------------------------
# dtype rule
# --------------------------------------------------------------------------------------


def test_dtype_rule_follows_the_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("EMBEDLENS_TRAIN_DTYPE", raising=False)
    assert autocast_dtype("cpu", {"avx2", "fma", "avx512f"}) == torch.float32  # AVX-512 without BF16
    assert autocast_dtype("cpu", {"avx2", "avx512f", "avx512_bf16"}) == torch.bfloat16
    assert autocast_dtype("cpu", {"amx_bf16", "amx_tile"}) == torch.bfloat16
    assert autocast_dtype("cpu", set()) == torch.float32
    assert autocast_dtype("cuda", cuda_bf16=True) == torch.bfloat16
    assert autocast_dtype("cuda", cuda_bf16=False) == torch.float32
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()
    monkeypatch.setenv("EMBEDLENS_TRAIN_DTYPE", "float32")
    assert autocast_dtype("cpu", {"avx512_bf16"}) == torch.float32
    monkeypatch.setenv("EMBEDLENS_TRAIN_DTYPE", "float16")
    with pytest.raises(ValueError, match="EMBEDLENS_TRAIN_DTYPE"):
        autocast_dtype("cpu", set())


# --------------------------------------------------------------------------------------
# LoRA: merge equals the unmerged adapter; the v2 build loads without peft
# --------------------------------------------------------------------------------------


def _randomize_lora_(peft_model, seed: int = 1) -> None:
    """LoRA's B starts at zero (the adapter is a no-op); make it a real adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from embedlens.testing.tiny import build_tiny_model

    return build_tiny_model("llava", tmp_path_factory.mktemp("tiny") / "tiny-llava", seed=0)


def _inputs(model_dir):
    from transformers import AutoProcessor

    from embedlens.models.prompt import chat_prompt

    proc = AutoProcessor.from_pretrained(model_dir)
    img = Image.new("RGB", (40, 40), (200, 30, 30))
    return proc, proc(images=img, text=chat_prompt(proc, "What color is it?"), return_tensors="pt")


def test_lora_merge_gives_the_unmerged_logits(tiny_llava, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForImageTextToText

    from embedlens.mini.lora import add_lora, merge_adapter, n_lora_params, save_adapter

    base = AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32).eval()
    _, inp = _inputs(tiny_llava)
    with torch.no_grad():
        plain = base(**inp).logits
    peft_model = add_lora(base, seed=0)
    names = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    # every linear layer of each decoder layer, none elsewhere (vision tower, projector, head)
    assert len(names) == 2 * 7 and all("language_model" in n for n in names)
    assert n_lora_params(peft_model) > 0
    _randomize_lora_(peft_model)
    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(**inp).logits
    assert not torch.allclose(unmerged, plain, atol=1e-3)  # the adapter does something
    save_adapter(peft_model, tmp_path / "adapter")
    fresh = AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32).eval()
    merged = merge_adapter(fresh, tmp_path / "adapter")
    assert type(merged).__name__ == type(fresh).__name__
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inp).logits, unmerged, atol=1e-5, rtol=1e-5)


def _tiny_parts(parts: Path) -> None:
    """A parts cache of the shape `build_parts` writes, with tiny random towers."""
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    from embedlens.mini.build import _parts_manifest_expected
    from embedlens.testing.tiny_common import _llama_text, _tokenizer

    tok = _tokenizer(bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra=["<|im_start|>"])
    tok.save_pretrained(parts / "tokenizer")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**_llama_text(tok), tie_word_embeddings=True)).save_pretrained(parts / "llm")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=112)).save_pretrained(parts / "vision")
    (parts / "parts.json").write_text(json.dumps(_parts_manifest_expected()))


def test_v2_build_merges_and_loads_with_plain_from_pretrained(tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForImageTextToText

    from embedlens.mini.build import MiniBuildError, assemble, build_mini
    from embedlens.mini.lora import add_lora, save_adapter
    from embedlens.mini.train import save_projector

    parts = tmp_path / "parts"
    _tiny_parts(parts)
    model, _, _ = assemble(parts)
    with torch.no_grad():  # a projector unlike the build's seeded default
        for p in model.model.multi_modal_projector.parameters():
            p.add_(0.05)
    save_projector(model, tmp_path / "w" / "projector.safetensors")
    peft_model = add_lora(model, seed=0)
    _randomize_lora_(peft_model)
    peft_model.eval()
    save_adapter(peft_model, tmp_path / "w" / "adapter")
    with pytest.raises(MiniBuildError, match="version 2: .*does not exist"):
        build_mini(tmp_path / "x", tmp_path / "wheels", parts_dir=parts, version=2,
                   adapter_dir=tmp_path / "missing", projector_path=tmp_path / "w" / "projector.safetensors")

    out = build_mini(tmp_path / "m", tmp_path / "wheels", parts_dir=parts, version=2,
                     projector_path=tmp_path / "w" / "projector.safetensors", adapter_dir=tmp_path / "w" / "adapter",
                     verify=True)  # verify: a fresh process loads it with the plain auto classes
    meta = json.loads((out / "embedlens_mini.json").read_text())
    assert meta["version"] == 2 and meta["adapter_sha256"]
    loaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    proc, inp = _inputs(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inp).logits, peft_model(**inp).logits, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


def test_encode_items_equals_the_processor_ids(tiny_llava):
    from transformers import AutoProcessor

    from embedlens.mini.train_v2 import encode_items
    from embedlens.models.prompt import assistant_suffix, chat_prompt

    proc = AutoProcessor.from_pretrained(tiny_llava)
    prompts = ["Is there a dog in the image?" + SHORT_SUFFIX, "Describe the image."]
    answers = ["yes", "A red circle."]
    prefix, enc = encode_items(proc, prompts, answers, 64)
    img = Image.new("RGB", (40, 40))
    for p, a, (q, ans) in zip(prompts, answers, enc, strict=True):
        full = proc(images=img, text=chat_prompt(proc, p) + assistant_suffix(proc, p, a),
                    return_tensors="pt")["input_ids"][0].tolist()
        n_img = full.count(proc.tokenizer.convert_tokens_to_ids("<image>"))
        assert full == prefix + full[len(prefix):len(prefix) + n_img] + q + ans


def test_v2_training_runs_and_is_deterministic(tiny_llava, tmp_path):
    pytest.importorskip("peft")
    from embedlens.mini.train_v2 import train_mini_v2

    objs_dir = tmp_path / "objects"
    objs_dir.mkdir()
    objs = _planted_objects(objs_dir)
    # several pictures per name (training keeps names with MIN_PICTURES_PER_NAME or more)
    (objs_dir / "catalogue.json").write_text(json.dumps({"objects": [
        {"object_id": f"{o.object_id}:{k}", "path": o.path.name, "name": o.name, "caption": o.caption,
         "category": o.category, "source": o.source} for o in objs for k in range(compose.MIN_PICTURES_PER_NAME)]}))
    kw = dict(stage1_steps=2, stage2_steps=2, batch_size=4, n_scenes=6, progress=False)
    a = train_mini_v2(tiny_llava, tmp_path / "a", objs_dir, **kw)
    b = train_mini_v2(tiny_llava, tmp_path / "b", objs_dir, **kw)
    assert a["stage1"]["loss"] == b["stage1"]["loss"] and a["stage2"]["loss"] == b["stage2"]["loss"]
    assert a["sha256"] == b["sha256"]
    from embedlens.mini.lora import BASE_MODEL_NAME

    cfg = [(tmp_path / d / "adapter" / "adapter_config.json").read_text() for d in ("a", "b")]
    assert cfg[0] == cfg[1]  # byte-identical: no path of the (temporary) base model in it
    assert json.loads(cfg[0])["base_model_name_or_path"] == BASE_MODEL_NAME
    assert a["n_examples"]["all"] > a["n_examples"]["captions"] == 6


def test_vocabulary_keeps_names_with_several_pictures(tmp_path):
    from embedlens.mini.compose import vocabulary

    objs = _planted_objects(tmp_path)
    twice = [*objs, ObjectImage("test:red-2", objs[0].path, objs[0].name, "", "test", "stamps")]
    kept = vocabulary(twice, min_pictures=2)
    assert [o.object_id for o in kept] == [objs[0].object_id, "test:red-2"]  # catalogue order
    assert vocabulary(twice, min_pictures=1) == twice
    with pytest.raises(ValueError, match="no object name has 2 pictures among 3 objects"):
        vocabulary(objs, min_pictures=2)
    with pytest.raises(ValueError, match=f"no object name has {compose.MIN_PICTURES_PER_NAME} pictures"):
        vocabulary(twice)


def test_stage_loss_weights_every_example_equally(tiny_llava):
    """The loss of a batch is the mean of its examples' own losses (each a mean over its
    answer tokens), whatever the answer lengths and the padding: a one-token answer weighs
    as much as a long caption."""
    from transformers import AutoProcessor

    from embedlens.mini.train import load_model, precompute_features
    from embedlens.mini.train_v2 import RecipeV2, StageTrainer, encode_items

    model, _ = load_model(tiny_llava)
    proc = AutoProcessor.from_pretrained(tiny_llava)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]
    feats = precompute_features(model, proc, imgs, bf16=False, progress=False)
    prompts = ["Is there a dog in the image?" + SHORT_SUFFIX, "Describe the image."]
    answers = ["yes", "A red circle beside a small green square on a light background."]
    prefix, enc = encode_items(proc, prompts, answers, int(feats.shape[1]))
    assert len(enc[1][1]) > 4 * len(enc[0][1])
    examples = [(i, q, a) for i, (q, a) in enumerate(enc)]
    params = list(model.model.multi_modal_projector.parameters())
    tok = proc.tokenizer
    tr = StageTrainer(model, prefix, examples, feats, [(params, 1e-3)], 1, RecipeV2(), tok.pad_token_id or 0,
                      torch.float32, prefix_grad=False, seed=0)
    with torch.no_grad():
        one, two, both = tr.loss_on([0]), tr.loss_on([1]), tr.loss_on([0, 1])
    torch.testing.assert_close(both, (one + two) / 2, atol=1e-5, rtol=1e-5)
