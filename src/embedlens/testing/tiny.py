"""Tiny random VLMs with offline processors, saved like real checkpoints.

`build_tiny_model(arch, out_dir)` writes a directory that `VLMAdapter.load(out_dir)` (and
`AutoModelForImageTextToText` / `AutoProcessor`) open exactly like a downloaded model, so the
whole generic path (processor, chat template, image-token expansion, hidden states) is
exercised without the model hub. Everything is tiny (hidden 32, 2 decoder layers, 2 vision
layers, 16-48 px images) so a forward pass takes milliseconds on a CPU.

The tokenizer is a byte-level BPE trained in memory on a small built-in word list (so colour,
shape and letter words exist as whole tokens, like in a real vocabulary) plus the special
tokens each architecture's processor expects. Weights are random, deterministic by `seed`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

# the full list (with the families of tiny_llava_family / tiny_recent) is set at the end of the module
TINY_ARCHS: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "paligemma")

# Shared tiny sizes. head_dim = 16 for every decoder (Qwen's mrope sections must sum to 8).
_D = 32  # decoder hidden size
_VD = 32  # vision hidden size
_LAYERS = 2
_VLAYERS = 2
# Larger than the usual 0.02 so random activations are not all ~0 (makes equality tests
# meaningful and visual tokens distinguishable).
_INIT = 0.1

_WORDS = (
    "red orange yellow green blue purple pink brown black white gray grey cyan magenta "
    "circle square triangle star cross hexagon diamond heart ellipse rectangle pentagon "
    "letter shape colour color background object image picture photo describe what which is "
    "the a an of in on and with this there answer question short word sentence user assistant "
    "system you are helpful yes no left right top bottom middle small large big text "
    "number digit one two three four five six seven eight nine zero cat dog car tree sky "
)
_LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]

# Chat templates modelled on the real checkpoints' templates (same placeholder strings), cut to
# what the adapter uses: a user turn with images and text, and the generation prompt.
_CONTENT_LOOP = (
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ IMG }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)


def _template(head: str, turn_open: str, turn_close: str, image: str, gen: str) -> str:
    body = _CONTENT_LOOP.replace("{{ IMG }}", "{{ '" + image + "' }}")
    return (
        head
        + "{%- for message in messages -%}"
        + turn_open
        + body
        + turn_close
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}{{ '" + gen + "' }}{%- endif -%}"
    )


_TEMPLATES = {
    # llava-hf/llava-1.5: "USER: <image>\n{prompt} ASSISTANT:"
    "llava": _template(
        "{{ bos_token }}",
        "{{ message['role'].upper() + ': ' }}",
        "{{ ' ' }}",
        "<image>\\n",
        "ASSISTANT:",
    ),
    # llava-v1.6-mistral: "[INST] <image>\n{prompt} [/INST]"
    "llava_next": _template(
        "{{ bos_token }}",
        "{%- if message['role'] == 'user' -%}{{ '[INST] ' }}{%- endif -%}",
        "{%- if message['role'] == 'user' -%}{{ ' [/INST]' }}{%- endif -%}",
        "<image>\\n",
        "",
    ),
    "qwen2_vl": _template(
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}",
        "{{ '<|im_start|>' + message['role'] + '\\n' }}",
        "{{ '<|im_end|>\\n' }}",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|im_start|>assistant\\n",
    ),
    "gemma3": _template(
        "{{ bos_token }}",
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}",
        "{{ '<end_of_turn>\\n' }}",
        "<start_of_image>",
        "<start_of_turn>model\\n",
    ),
    # SmolVLM / Idefics3: "<|begin_of_text|>User:<image>{prompt}<end_of_utterance>\nAssistant:"
    "idefics3": _template(
        "{{ bos_token }}",
        "{{ message['role'] | capitalize }}{{ ':' }}",
        "{{ '<end_of_utterance>\\n' }}",
        "<image>",
        "Assistant:",
    ),
}
_TEMPLATES["qwen2_5_vl"] = _TEMPLATES["qwen2_vl"]


def _train_bpe(specials: list[str], vocab_size: int = 1024):
    """Byte-level BPE over the built-in word list; specials get the lowest ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    words = _WORDS.split()
    corpus = [" ".join(words), " ".join(w.capitalize() for w in words)]
    corpus += [f"letter {c} and the letter {c.lower()}" for c in _LETTERS]
    corpus += [" ".join(words[i : i + 3]) for i in range(len(words))]
    colours, shapes = words[:13], words[13:24]
    corpus += [f"A {c} {s} and the {s} is {c}." for c in colours for s in shapes]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok


def _tokenizer(
    *,
    bos: str | None,
    eos: str,
    pad: str,
    unk: str | None = None,
    named: dict[str, str] | None = None,
    extra: list[str] | None = None,
):
    """A `PreTrainedTokenizerFast` with the special tokens an architecture expects.

    `named` become attributes (``tokenizer.image_token``, ``tokenizer.image_token_id``...), the
    transformers 5 way real VLM tokenizers expose them; `extra` are further special tokens.
    """
    from transformers import PreTrainedTokenizerFast

    named = dict(named or {})
    base = [t for t in (pad, bos, eos, unk) if t is not None]
    specials = list(dict.fromkeys(base + list(named.values()) + list(extra or [])))
    backend = _train_bpe(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        extra_special_tokens=named or None,
        additional_special_tokens=[t for t in specials if t not in base and t not in named.values()]
        or None,
    )
    tok.padding_side = "right"
    return tok


def _vocab(tokenizer, multiple: int = 16) -> int:
    """Model vocabulary: the tokenizer rounded up, like real checkpoints pad their embeddings
    (the extra rows are never produced by the tokenizer)."""
    n = len(tokenizer)
    return (n + multiple - 1) // multiple * multiple


def _llama_text(tokenizer, **kw) -> dict:
    cfg = dict(
        model_type="llama",
        vocab_size=_vocab(tokenizer),
        hidden_size=_D,
        intermediate_size=2 * _D,
        num_hidden_layers=_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        initializer_range=_INIT,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    cfg.update(kw)
    return cfg


def _clip_vision(image_size: int, patch: int) -> dict:
    return dict(
        model_type="clip_vision_model",
        hidden_size=_VD,
        intermediate_size=2 * _VD,
        num_hidden_layers=_VLAYERS,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=_VD,
        initializer_range=_INIT,
    )


def _siglip_vision(image_size: int, patch: int, **kw) -> dict:
    cfg = dict(
        model_type="siglip_vision_model",
        hidden_size=_VD,
        intermediate_size=2 * _VD,
        num_hidden_layers=_VLAYERS,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )
    cfg.update(kw)
    return cfg


def _mean_std() -> dict:
    return dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


# --------------------------------------------------------------------------- builders
# Each returns (config, processor). Sizes are chosen so that images of different sizes
# produce different token counts where the architecture allows it.


def _build_llava():
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaProcessor

    tok = _tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", named={"image_token": "<image>"})
    # 32 px, patch 4: 8 x 8 = 64 visual tokens (+ CLS in the vision tower, dropped by "default").
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **_mean_std()
    )
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_TEMPLATES["llava"],
    )
    cfg = LlavaConfig(
        vision_config=_clip_vision(32, 4),
        text_config=_llama_text(tok),
        image_token_index=tok.image_token_id,
        image_seq_length=64,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return cfg, proc


def _build_llava_next():
    from transformers import LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor

    tok = _tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", named={"image_token": "<image>"})
    # 16 px crops of 4 x 4 patches; any-res grid up to 32 x 32 -> base 4x4 + unpadded crops.
    pinpoints = [[16, 32], [32, 16], [32, 32]]
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=pinpoints,
        **_mean_std(),
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_TEMPLATES["llava_next"],
    )
    cfg = LlavaNextConfig(
        vision_config=_clip_vision(16, 4),
        text_config=_llama_text(tok, model_type="mistral", sliding_window=None),
        image_token_index=tok.image_token_id,
        image_grid_pinpoints=pinpoints,
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return cfg, proc


def _qwen_tokenizer():
    return _tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=[
            "<|im_start|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
    )


def _qwen_common(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _qwen_text(tok, model_type: str) -> dict:
    return dict(
        model_type=model_type,
        vocab_size=_vocab(tok),
        hidden_size=_D,
        intermediate_size=2 * _D,
        num_hidden_layers=_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        initializer_range=_INIT,
        # head_dim 16 -> 8 rotary frequencies split over (t, h, w)
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    # patch 4, merge 2: a 32 x 32 image -> 8 x 8 patches -> 4 x 4 = 16 LLM tokens;
    # pixel bounds keep every test image between 16 and 48 px a side.
    return Qwen2VLImageProcessorPil(
        min_pixels=8 * 8,
        max_pixels=48 * 48,
        patch_size=4,
        temporal_patch_size=2,
        merge_size=2,
        **_mean_std(),
    )


_QWEN_VIDEO = dict(patch_size=4, temporal_patch_size=2, merge_size=2, **_mean_std())


class _SavedVideoConfig(dict):
    """Stands in for the video processor when saving without torchvision: serialised as the
    config a real `Qwen2VLVideoProcessor` would write, so machines with torchvision load one."""

    _auto_class = None


def _qwen_processor(cls, tok):
    """A Qwen-VL processor; its (mandatory) video processor needs torchvision, so without it
    the processor is built with none (images only) and saved with the video config."""
    from embedlens.models.adapter import optional_video_processor

    try:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(**_QWEN_VIDEO)
    except Exception:  # noqa: BLE001 - without torchvision the class is a dummy that raises
        video = None
    with optional_video_processor():
        proc = cls(
            image_processor=_qwen_image_processor(),
            tokenizer=tok,
            video_processor=video,
            chat_template=_TEMPLATES["qwen2_vl"],
        )
    if video is None:
        proc._saved_video_config = _SavedVideoConfig(video_processor_type="Qwen2VLVideoProcessor", **_QWEN_VIDEO)
    return proc


def _build_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLProcessor

    tok = _qwen_tokenizer()
    proc = _qwen_processor(Qwen2VLProcessor, tok)
    cfg = Qwen2VLConfig(
        text_config=_qwen_text(tok, "qwen2_vl_text"),
        vision_config=dict(
            depth=_VLAYERS,
            embed_dim=_VD,
            hidden_size=_D,  # merger output = decoder width
            mlp_ratio=2,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=_INIT,
        ),
        **_qwen_common(tok),
    )
    return cfg, proc


def _build_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

    tok = _qwen_tokenizer()
    proc = _qwen_processor(Qwen2_5_VLProcessor, tok)
    cfg = Qwen2_5_VLConfig(
        text_config=_qwen_text(tok, "qwen2_5_vl_text"),
        vision_config=dict(
            depth=_VLAYERS,
            hidden_size=_VD,
            intermediate_size=2 * _VD,
            out_hidden_size=_D,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            # windows of 16 px = 2 x 2 merged tokens, so images above 16 px use several
            # windows (the token order inside the vision tower differs from the image order)
            window_size=16,
            fullatt_block_indexes=[1],
            initializer_range=_INIT,
        ),
        **_qwen_common(tok),
    )
    return cfg, proc


def _build_gemma3():
    from transformers import Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor

    tok = _tokenizer(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        named={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        extra=["<start_of_turn>", "<end_of_turn>"],
    )
    # 32 px, patch 4: 8 x 8 SigLIP patches, average-pooled 2 x 2 -> 4 x 4 = 16 soft tokens.
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, **_mean_std())
    proc = Gemma3Processor(
        image_processor=ip, tokenizer=tok, image_seq_length=16, chat_template=_TEMPLATES["gemma3"]
    )
    cfg = Gemma3Config(
        text_config=dict(
            model_type="gemma3_text",
            vocab_size=_vocab(tok),
            hidden_size=_D,
            intermediate_size=2 * _D,
            num_hidden_layers=_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            max_position_embeddings=512,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            initializer_range=_INIT,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        vision_config=_siglip_vision(32, 4, vision_use_head=False),
        mm_tokens_per_image=16,
        image_token_index=tok.image_token_id,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        initializer_range=_INIT,
    )
    return cfg, proc


def _build_idefics3():
    from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

    rows_cols = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = _tokenizer(
        bos="<|begin_of_text|>",
        eos="<end_of_utterance>",
        pad="<|finetune_right_pad_id|>",
        named={"image_token": "<image>"},
        extra=["<fake_token_around_image>", "<global-img>", *rows_cols],
    )
    # Tiles of 16 px (4 x 4 patches, pixel shuffle 2 -> 2 x 2 = 4 tokens per tile); images are
    # resized to a longest edge of 32 px and split into up to 2 x 2 tiles plus a global view.
    ip = Idefics3ImageProcessorPil(
        size={"longest_edge": 32},
        max_image_size={"longest_edge": 16},
        do_image_splitting=True,
        **_mean_std(),
    )
    proc = Idefics3Processor(
        image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=_TEMPLATES["idefics3"]
    )
    cfg = Idefics3Config(
        vision_config=dict(
            hidden_size=_VD,
            intermediate_size=2 * _VD,
            num_hidden_layers=_VLAYERS,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            initializer_range=_INIT,
        ),
        text_config=_llama_text(tok),
        image_token_id=tok.image_token_id,
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )
    return cfg, proc


def _build_paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessorPil

    tok = _tokenizer(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", named={"image_token": "<image>"})
    # 32 px, patch 4: 8 x 8 = 64 image tokens, always (fixed resolution).
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32}, **_mean_std())
    ip.image_seq_length = 64
    # no chat template (PaliGemma has none): the adapter uses the placeholder from overrides
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds <loc>/<seg> tokens
    text = dict(
        model_type="gemma",
        vocab_size=_vocab(tok),
        hidden_size=_D,
        intermediate_size=2 * _D,
        num_hidden_layers=_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=_INIT,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    cfg = PaliGemmaConfig(
        vision_config=_siglip_vision(32, 4, projection_dim=_D, vision_use_head=False),
        text_config=text,
        image_token_index=tok.image_token_id,
        projection_dim=_D,
        hidden_size=_D,
        vocab_size=text["vocab_size"],
    )
    return cfg, proc


_BUILDERS = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "gemma3": _build_gemma3,
    "idefics3": _build_idefics3,
    "paligemma": _build_paligemma,
}


def _reinit_zeros(model: torch.nn.Module, std: float) -> None:
    """Give zero-initialised matrices (e.g. Gemma 3's projector weight) random values so the
    image features are not all identical."""
    for name, p in model.named_parameters():
        if p.ndim >= 2 and not torch.any(p):
            torch.nn.init.normal_(p, std=std)


def _save_processor(processor, directory: Path) -> None:
    stub = getattr(processor, "_saved_video_config", None)
    if stub is None:
        processor.save_pretrained(directory)
        return
    del processor._saved_video_config
    processor.video_processor = stub
    try:
        processor.save_pretrained(directory)
    finally:
        processor.video_processor = None
        processor._saved_video_config = stub


def build_tiny_model(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random `arch` VLM with its processor and `save_pretrained` it to `out_dir`.

    Deterministic by `seed`. The directory is written under a temporary name and renamed, so
    an existing `out_dir` is always complete; an existing complete directory is replaced.
    Returns `out_dir` as a `Path`.
    """
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    if arch not in _BUILDERS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    out_dir = Path(out_dir)
    config, processor = _BUILDERS[arch]()
    config.use_cache = False
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        _reinit_zeros(model, _INIT)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "writing shards" bar per tiny model is only noise
    try:
        model.save_pretrained(tmp)
        _save_processor(processor, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out_dir


# Families added later live in their own modules (they use the helpers above): each exports
# BUILDERS (arch -> builder) and SKIPPED (arch -> why it cannot be built on this machine).
from embedlens.testing import tiny_llava_family as _llava_family, tiny_recent as _recent  # noqa: E402

for _family in (_llava_family, _recent):
    _BUILDERS.update(_family.BUILDERS)
TINY_ARCHS = tuple(_BUILDERS)
#: architectures whose tiny model cannot be built here, with the reason (tests skip them, saying so)
TINY_SKIPPED: dict[str, str] = {**_llava_family.SKIPPED, **_recent.SKIPPED}
