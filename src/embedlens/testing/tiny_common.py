"""Shared pieces of the tiny random VLMs (`embedlens.testing.tiny` and its families): sizes,
the in-memory BPE tokenizer, chat templates modelled on the real checkpoints', config
fragments (Llama text, CLIP/SigLIP vision, Qwen-VL), and saving helpers.

Everything here is private to `embedlens.testing`; builders live in `tiny`,
`tiny_llava_family` and `tiny_recent`.
"""

from __future__ import annotations

from pathlib import Path

import torch

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


# --------------------------------------------------------------------------- Qwen-VL pieces


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
    from embedlens.models.loading import optional_video_processor

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


# --------------------------------------------------------------------------- saving


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
