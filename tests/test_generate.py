"""Greedy generation under interventions (docs/methods.md §4) on real tiny random VLMs:
KV-cached decoding equals re-running the intervened prefill token by token, for every
intervention, in batches of rows of different lengths, on 1-D RoPE (LLaVA) and M-RoPE
(Qwen2-VL); knockouts and the new ops change what they should.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from embedlens.compress import interventions as iv
from embedlens.compress.benchmark import parse_conditions
from embedlens.compress.generate import generate
from embedlens.testing.tiny import build_tiny_model

NEW = 6  # new tokens per sequence: enough steps to exercise the cache, cheap


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared 2-core machine (see test_compress)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch):
        if arch not in cache:
            path = build_tiny_model(arch, root / arch, seed=0)
            cache[arch] = (path, *iv.load_model(path))
        return cache[arch]

    return get


def _image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


def _prompts(arch, models, questions=("What colour is the shape?", "Which letter?"), images=None):
    """Captured prompts (rows of different lengths) and seeded random labels."""
    from embedlens import vqa

    _, model, processor, adapter = models(arch)
    images = images or [_image(0, 40, 24), _image(1, 32, 32)]
    seqs = [iv.capture_sequence(model, vqa.prepare_prompt(processor, img, q, prompt_fn=adapter.format_prompt), f"img{k}")
            for k, (q, img) in enumerate(zip(questions, images))]
    rng = np.random.RandomState(1)
    labels = [list(rng.choice(iv.LABELS, s.n_visual, p=[0.1, 0.1, 0.3, 0.5])) for s in seqs]
    return model, seqs, labels


def _gen(model, seqs, labels, x, **kw):
    N = len(iv.decoder_layers(model))
    plans = [iv.plan_for(s, lab, x, N) for s, lab in zip(seqs, labels)]
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("eos_token_ids", [])
    return generate(model, seqs, plans, return_logits=True, **kw)


def _maxdiff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _interventions(N):
    return {
        "prune": iv.prune(["dead", "vit_sink"]),
        "keep": iv.keep(["alive"]),
        "random_matched": iv.random_matched(["dead"], 0),
        "skip": iv.skip(["visual"], iv.sublayers_for("both", range(N))),
        "inject": iv.inject(1),
        "exit": iv.exit(1),
        "knockout_vv": iv.knockout("visual->visual"),
        "knockout_tv": iv.knockout("text->visual", (0, 1)),
        "prune_inject": iv.prune_inject(["dead"], 1),
        "skip_reference_layer0": iv.skip(["visual"], [0.0], reference_layer0=True),
    }


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "paligemma"])
def test_cached_decoding_equals_reprefill(arch, models):
    """For every intervention: the same token ids and last-step logits within 1e-4 from the
    KV-cached decoding and from re-running the intervened prefill on prompt + tokens so far,
    in one batch of two rows of different lengths; and the intervention changed the logits.
    (PaliGemma: a prefix-LM mask and token_type_ids = 1 on generated text.)"""
    model, seqs, labels = _prompts(arch, models)
    assert len(seqs[0]) != len(seqs[1])
    if arch == "qwen2_vl":
        assert seqs[0].position_ids.shape[0] == 3  # M-RoPE
    N = len(iv.decoder_layers(model))
    base = _gen(model, seqs, labels, iv.baseline())
    base_ref = _gen(model, seqs, labels, iv.baseline(), use_cache=False)
    assert base.tokens == base_ref.tokens and all(len(t) == NEW for t in base.tokens)
    assert base.finished == [False, False]
    assert _maxdiff(base.logits, base_ref.logits) < 1e-4
    for name, x in _interventions(N).items():
        cached = _gen(model, seqs, labels, x)
        ref = _gen(model, seqs, labels, x, use_cache=False)
        assert cached.tokens == ref.tokens, name
        assert [lg.shape[0] for lg in cached.logits] == [NEW, NEW]
        for a, b in zip(cached.logits, ref.logits):
            assert float((a[-1] - b[-1]).abs().max()) < 1e-4, name
            assert float((a - b).abs().max()) < 1e-4, name
        assert _maxdiff(cached.logits, base.logits) > 1e-3, f"{name} changed nothing"
        assert cached.prefill_seconds > 0 and cached.decode_seconds > 0


def test_rows_stop_on_eos_and_their_own_limits(models):
    """Per-row max_new_tokens and an eos id met by one row: both modes stop each row where
    it should (eos excluded from the tokens, finished=True), batched."""
    model, seqs, labels = _prompts("llava", models)
    x = iv.prune(["dead"])
    free = _gen(model, seqs, labels, x)
    eos = free.tokens[0][2]
    assert eos not in free.tokens[0][:2]
    for use_cache in (True, False):
        g = _gen(model, seqs, labels, x, eos_token_ids=[eos], max_new_tokens=[NEW, 3], use_cache=use_cache)
        assert g.tokens[0] == free.tokens[0][:2] and g.finished[0]
        stop1 = free.tokens[1].index(eos) if eos in free.tokens[1][:3] else 3
        assert g.tokens[1] == free.tokens[1][:stop1]
    assert _gen(model, seqs, labels, x, max_new_tokens=0).tokens == [[], []]


def test_text_to_visual_knockout_everywhere_makes_the_output_image_independent(models):
    """Same question, two different images: with text->visual attention cut in every layer
    the generated tokens and their logits are the same for both images; without it, not."""
    from embedlens.compress.spec import knockout

    images = [_image(3, 32, 32), _image(4, 32, 32)]
    model, seqs, labels = _prompts("qwen2_vl", models, ("What is it?", "What is it?"), images)
    assert len(seqs[0]) == len(seqs[1]) and not torch.equal(seqs[0].embeds, seqs[1].embeds)
    cut = _gen(model, seqs, labels, knockout("text->visual"))
    assert cut.tokens[0] == cut.tokens[1]
    assert float((cut.logits[0] - cut.logits[1]).abs().max()) < 1e-5
    base = _gen(model, seqs, labels, iv.baseline())
    assert float((base.logits[0] - base.logits[1]).abs().max()) > 1e-3
    # visual->visual alone leaves the text free to read the (changed) visual tokens
    vv = _gen(model, seqs, labels, knockout("visual->visual"))
    assert float((vv.logits[0] - vv.logits[1]).abs().max()) > 1e-3


def test_eager_attention_decodes_the_same(models):
    """Float additive decode masks (eager) == bool ones (sdpa), cached, on the ops whose
    layers hold caches of different lengths or cut edges."""
    from embedlens.models.adapter import VLMAdapter

    path, sdpa_model, _, _ = models("llava")
    eager = VLMAdapter.load(path, attn_implementation="eager").model
    assert iv.attn_implementation(eager) == "eager"
    _, seqs, labels = _prompts("llava", models)
    for x in (iv.inject(1), iv.knockout(["visual->visual", "text->visual"]), iv.prune_inject(["dead"], 1)):
        a, b = _gen(sdpa_model, seqs, labels, x), _gen(eager, seqs, labels, x)
        assert a.tokens == b.tokens and _maxdiff(a.logits, b.logits) < 1e-4, x.describe()


def test_short_sliding_window_is_refused_with_the_cache(models):
    model, seqs, labels = _prompts("gemma3", models)  # tiny Gemma 3: window of 8 tokens
    with pytest.raises(NotImplementedError, match="sliding-window.*use_cache=False"):
        _gen(model, seqs, labels, iv.prune(["dead"]))


def test_new_ops_plan_and_parse():
    """Plans of the new ops on a hand-made sequence, and their condition keys."""
    S, vis = 10, torch.tensor([2, 3, 4, 5])
    seq = iv.TokenSequence("a", torch.arange(S), torch.zeros(S, 4), torch.arange(S)[None], {}, vis)
    labels = ["dead", "alive", "vit_sink", "alive"]
    p = iv.plan_for(seq, labels, iv.knockout("text->visual", (1, 3)), 4)
    assert p.knock_layers == {1, 2} and p.knock_keys.nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert p.knock_text.nonzero().flatten().tolist() == [6, 7, 8, 9]  # text after the image only
    p = iv.plan_for(seq, labels, iv.prune_inject(["dead", "sink"], 2), 4)
    assert (~p.keep).nonzero().flatten().tolist() == [2, 4]
    assert p.absent.nonzero().flatten().tolist() == [3, 5] and p.absent_layers == {0, 1}
    p = iv.plan_for(seq, labels, iv.skip(["alive"], [0, 0.5], reference_layer0=True), 4)
    assert p.knock_layers == {0} and p.knock_edges == ("text->visual",)
    assert p.knock_keys.nonzero().flatten().tolist() == [3, 5]
    assert not iv.plan_for(seq, labels, iv.skip(["alive"], [1], reference_layer0=True), 4).knock_edges

    vs = parse_conditions([
        {"op": "knockout", "edges": "visual->visual"},
        {"op": "knockout", "edges": ["visual->visual", "text->visual"], "layers": [1, -1]},
        {"op": "prune_inject", "groups": ["sinks", "dead"], "layer": 2},
        {"op": "skip", "sublayers": "attn", "layers": [0, 1], "reference_layer0": True},
    ], 4)
    assert [v.name for v in vs] == ["knockout_v2v", "knockout_v2v_t2v_L1--1", "prune_sinks_dead_inject_L2",
                                    "skip_attn_visual_L0-1_ref0"]
    assert vs[0].intervention.layer_range == (0, 4) and vs[1].intervention.layer_range == (1, 3)
    assert vs[2].intervention.layer == 2 and vs[3].intervention.reference_layer0
    for bad in ({"op": "knockout", "edges": "text->text"}, {"op": "knockout"},
                {"op": "knockout", "edges": "visual->visual", "layers": [2, 9]},
                {"op": "prune_inject", "layer": 1}, {"op": "prune_inject", "groups": ["dead"]},
                {"op": "skip", "reference_layer0": "yes"}, {"op": "inject", "layer": 1, "reference_layer0": True}):
        with pytest.raises(ValueError, match="compress condition #0"):
            parse_conditions([bad], 4)


def test_new_ops_in_the_log_likelihood_benchmark_path(models):
    """The compress benchmark scores choices packed after one prompt (pack_choices): under
    the new ops the packed scores equal one sequence per choice, so run_compress can run
    them; and each op changes the scores."""
    from embedlens import vqa

    model, (prompt, _), (labels, _) = _prompts("llava", models)
    _, _, processor, _ = models("llava")
    answers = vqa.choice_token_ids(processor, ["red", "big square", "cyan yellow"], " ")
    N = len(iv.decoder_layers(model))
    packed, want, targets = iv.pack_choices(model, prompt, answers)

    def scores(x):
        res = iv.forward(model, [packed], [iv.plan_for(packed, labels, x, N)], [torch.cat(want)])
        got = [iv.answer_logprob(p, t) for p, t in zip(torch.split(res.logits[0], [len(t) for t in targets]), targets)]
        ref = []
        for a in answers:
            s = iv.append_text(model, prompt, a)
            out = iv.forward(model, [s], [iv.plan_for(s, labels, x, N)], [torch.arange(len(prompt) - 1, len(s) - 1)])
            ref.append(iv.answer_logprob(out.logits[0], torch.tensor(a)))
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=x.describe())
        return np.array(got)

    base = scores(iv.baseline())
    for x in (iv.knockout(["visual->visual", "text->visual"], (0, 1)), iv.prune_inject(["dead"], 1),
              iv.skip(["visual"], [0.0], reference_layer0=True)):
        assert np.abs(scores(x) - base).max() > 1e-4, x.describe()
    # the layer-0 flag itself matters: not the same as the plain layer-0 attention skip
    plain = scores(iv.skip(["visual"], [0.0]))
    assert np.abs(scores(iv.skip(["visual"], [0.0], reference_layer0=True)) - plain).max() > 1e-4
