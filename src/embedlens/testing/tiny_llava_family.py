"""Tiny random models of LLaVA-style families: LLaVA-OneVision, Aya Vision, Mistral 3 (Pixtral vision), InternVL, SmolVLM.

Builders return (config, processor) like the ones in `embedlens.testing.tiny`. Each uses the
architecture's PIL image processor (no torchvision here) at its smallest realistic settings:
16 px crops/tiles of 4 x 4 patches, so 16-48 px test images already select different any-res
grids, tile arrangements or patch grids. Chat templates keep the real checkpoints' placeholder
strings and turn markers.

Architectures whose processor cannot be built on this machine are listed in `SKIPPED` with the
reason instead of `BUILDERS` (tests skip them, saying so); their builders are kept so a machine
that has the missing dependency builds and tests them.
"""

from __future__ import annotations

import importlib
import importlib.util

from embedlens.testing import tiny_common as _t  # the helpers shared with `tiny`


def _video_less_processor(cls, video_type: str, video_cfg: dict, **kwargs):
    """A processor whose (declared) video processor needs torchvision: built with the real video
    processor where it can be, else with none (images only) and saved with the video config a
    real one would write, so machines with torchvision load one (like `tiny_common._qwen_processor`)."""
    import transformers

    from embedlens.models.loading import optional_video_processor

    try:
        video = getattr(transformers, video_type)(**video_cfg)
    except Exception:  # noqa: BLE001 - without torchvision the class is a dummy that raises
        video = None
    with optional_video_processor():
        proc = cls(video_processor=video, **kwargs)
    if video is None:
        proc._saved_video_config = _t._SavedVideoConfig(video_processor_type=video_type, **video_cfg)
    return proc


def _qwen2_text(tok, **kw) -> dict:
    # Qwen2 decoders (LLaVA-OneVision, InternVL 3): no BOS, <|im_end|> ends a turn
    return _t._llama_text(tok, model_type="qwen2", bos_token_id=None, **kw)


# --------------------------------------------------------------------------- LLaVA-OneVision

# Crops of 16 px; canvases of 1-4 crops a side (the real checkpoint: 384 px crops, 1-6 a side).
# With "anyres_max_9" a canvas of more than ~11 crops' area is bilinearly shrunk before the
# newline column is added: 4 x 4 canvases (images of 64 px) take that path, <= 3 x 3 do not.
_OV_PINPOINTS = [[16 * h, 16 * w] for h in range(1, 5) for w in range(1, 5)]


def _build_llava_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    tok = _t._tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"image_token": "<image>", "video_token": "<video>"},
        extra=["<|im_start|>"],
    )
    # llava-onevision-qwen2: "<|im_start|>user <image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    template = _t._template(
        "",
        "{{ '<|im_start|>' + message['role'] + ' ' }}",
        "{{ '<|im_end|>\\n' }}",
        "<image>\\n",
        "<|im_start|>assistant\\n",
    )
    ip = LlavaOnevisionImageProcessorPil(
        size={"height": 16, "width": 16}, image_grid_pinpoints=_OV_PINPOINTS, **_t._mean_std()
    )
    proc = _video_less_processor(
        LlavaOnevisionProcessor,
        "LlavaOnevisionVideoProcessor",
        dict(size={"height": 16, "width": 16}, **_t._mean_std()),
        image_processor=ip,
        tokenizer=tok,
        num_image_tokens=16,  # 4 x 4 SigLIP patches per crop (no CLS)
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=template,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=_t._siglip_vision(16, 4, vision_use_head=False),
        text_config=_qwen2_text(tok),
        image_token_index=tok.image_token_id,
        video_token_index=tok.video_token_id,
        image_grid_pinpoints=_OV_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return cfg, proc


# --------------------------------------------------------------------------- Aya Vision


def _build_aya_vision():
    from transformers import AyaVisionConfig, AyaVisionProcessor, GotOcr2ImageProcessorPil

    tok = _t._tokenizer(
        bos="<BOS_TOKEN>",
        eos="<|END_OF_TURN_TOKEN|>",
        pad="<PAD>",
        unk="<UNK>",
        extra=[
            "<|START_OF_TURN_TOKEN|>",
            "<|USER_TOKEN|>",
            "<|CHATBOT_TOKEN|>",
            "<|START_OF_IMG|>",
            "<|END_OF_IMG|>",
            "<|IMG_PATCH|>",
            "<|IMG_LINE_BREAK|>",
            "TILE",
            "TILE_GLOBAL",
        ],
    )
    # aya-vision: "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|><image>{prompt}<|END_OF_TURN_TOKEN|>"
    # + "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"; the processor expands <image> into tiles
    template = _t._template(
        "{{ bos_token }}",
        "{{ '<|START_OF_TURN_TOKEN|>' + ('<|USER_TOKEN|>' if message['role'] == 'user' else '<|CHATBOT_TOKEN|>') }}",
        "{{ '<|END_OF_TURN_TOKEN|>' }}",
        "<image>",
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    )
    # 16 px tiles (real: 364 px), up to 4 of them plus the thumbnail (real: up to 12)
    ip = GotOcr2ImageProcessorPil(
        size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1, max_patches=4, **_t._mean_std()
    )
    # SigLIP 4 x 4 patches per tile, pixel shuffle 2 -> 2 x 2 = 4 <|IMG_PATCH|> tokens per tile
    proc = AyaVisionProcessor(
        image_processor=ip, tokenizer=tok, patch_size=4, img_size=16, downsample_factor=2, chat_template=template
    )
    patch_id = tok.convert_tokens_to_ids("<|IMG_PATCH|>")
    text = _t._llama_text(
        tok,
        model_type="cohere2",
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        logit_scale=1.0,
    )
    cfg = AyaVisionConfig(
        vision_config=_t._siglip_vision(16, 4, vision_use_head=False),
        text_config=text,
        image_token_index=patch_id,
        downsample_factor=2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        # SwiGLU: half of it gates the other half
        alignment_intermediate_size=2 * _t._D,
    )
    return cfg, proc


# --------------------------------------------------------------------------- InternVL (HF-native)


def _build_internvl():
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLProcessor

    tok = _t._tokenizer(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        extra=["<|im_start|>"],
    )
    # InternVL3-hf: "<|im_start|>user\n<IMG_CONTEXT>\n{prompt}<|im_end|>\n<|im_start|>assistant\n";
    # the processor expands <IMG_CONTEXT> into "<img>" + 4 per tile + "</img>"
    template = _t._template(
        "",
        "{{ '<|im_start|>' + message['role'] + '\\n' }}",
        "{{ '<|im_end|>\\n' }}",
        "<IMG_CONTEXT>\\n",
        "<|im_start|>assistant\\n",
    )
    # 16 px tiles (real: 448 px), up to 4 plus the thumbnail (real: up to 12)
    ip = GotOcr2ImageProcessorPil(
        size={"height": 16, "width": 16}, crop_to_patches=False, min_patches=1, max_patches=4, **_t._mean_std()
    )
    proc = _video_less_processor(
        InternVLProcessor,
        "InternVLVideoProcessor",
        dict(size={"height": 16, "width": 16}, **_t._mean_std()),
        image_processor=ip,
        tokenizer=tok,
        image_seq_length=4,
        chat_template=template,
    )
    cfg = InternVLConfig(
        vision_config=dict(
            hidden_size=_t._VD,
            intermediate_size=2 * _t._VD,
            num_hidden_layers=_t._VLAYERS,
            num_attention_heads=2,
            image_size=[16, 16],
            patch_size=[4, 4],
            initializer_range=_t._INIT,
        ),
        text_config=_qwen2_text(tok),
        image_token_id=tok.context_image_token_id,
        image_seq_length=4,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return cfg, proc


# --------------------------------------------------------------------------- Mistral 3 (Pixtral)


def _mistral3_tokenizer():
    return _t._tokenizer(
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        named={"image_token": "[IMG]"},
        extra=["[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"],
    )


def _mistral3_config(tok):
    from transformers import Mistral3Config

    return Mistral3Config(
        vision_config=dict(
            model_type="pixtral",
            hidden_size=_t._VD,
            intermediate_size=2 * _t._VD,
            num_hidden_layers=_t._VLAYERS,
            num_attention_heads=2,
            image_size=48,
            patch_size=4,
            initializer_range=_t._INIT,
        ),
        text_config=_t._llama_text(tok, model_type="mistral", sliding_window=None),
        image_token_index=tok.image_token_id,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )


def _mistral3_image_processor():
    from transformers import PixtralImageProcessorPil

    # patch 4 x merge 2: images are resized to multiples of 8 px, at most 48 px a side (real:
    # patch 14 x merge 2, 1540 px); a 48 x 24 image -> 12 x 6 patches -> 6 x 3 merged tokens
    return PixtralImageProcessorPil(
        size={"longest_edge": 48}, patch_size={"height": 8, "width": 8}, **_t._mean_std()
    )


def _build_mistral3():
    PixtralProcessor = importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    tok = _mistral3_tokenizer()
    # Mistral-Small-3.1: "<s>[INST][IMG]{prompt}[/INST]"; the processor expands [IMG] into rows
    # of [IMG] ending in [IMG_BREAK], the last one in [IMG_END]
    template = _t._template(
        "{{ bos_token }}",
        "{%- if message['role'] == 'user' -%}{{ '[INST]' }}{%- endif -%}",
        "{%- if message['role'] == 'user' -%}{{ '[/INST]' }}{%- endif -%}",
        "[IMG]",
        "",
    )
    proc = PixtralProcessor(
        image_processor=_mistral3_image_processor(),
        tokenizer=tok,
        patch_size=4,
        spatial_merge_size=2,
        chat_template=template,
    )
    return _mistral3_config(tok), proc


# --------------------------------------------------------------------------- SmolVLM (SmolVLM2)

_SMOLVLM_TAGS = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]


def _smolvlm_tokenizer():
    return _t._tokenizer(
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        named={"image_token": "<image>"},
        extra=["<fake_token_around_image>", "<global-img>", "<video>", *_SMOLVLM_TAGS],
    )


def _smolvlm_template() -> str:
    # SmolVLM2: "<|im_start|>User:<image>{prompt}<end_of_utterance>\nAssistant:"
    return _t._template(
        "{{ bos_token }}",
        "{{ message['role'] | capitalize }}{{ ':' }}",
        "{{ '<end_of_utterance>\\n' }}",
        "<image>",
        "Assistant:",
    )


def _smolvlm_image_processor():
    from transformers import SmolVLMImageProcessorPil

    # 16 px tiles (real: 512 px), images resized to a longest edge of 32 px -> up to 2 x 2 tiles
    # plus the global view
    return SmolVLMImageProcessorPil(
        size={"longest_edge": 32},
        max_image_size={"longest_edge": 16},
        do_image_splitting=True,
        **_t._mean_std(),
    )


def _smolvlm_config(tok):
    from transformers import SmolVLMConfig

    return SmolVLMConfig(
        vision_config=dict(
            hidden_size=_t._VD,
            intermediate_size=2 * _t._VD,
            num_hidden_layers=_t._VLAYERS,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            initializer_range=_t._INIT,
        ),
        text_config=_t._llama_text(tok),
        image_token_id=tok.image_token_id,
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )


def _build_smolvlm():
    from transformers import SmolVLMProcessor

    tok = _smolvlm_tokenizer()
    proc = SmolVLMProcessor(
        image_processor=_smolvlm_image_processor(),
        tokenizer=tok,
        video_processor=_t_video("SmolVLMVideoProcessor"),
        image_seq_len=4,
        chat_template=_smolvlm_template(),
    )
    return _smolvlm_config(tok), proc


def _t_video(name: str):
    import transformers

    return getattr(transformers, name)(size={"longest_edge": 32}, **_t._mean_std())


# --------------------------------------------------------------------------- availability


def _why_not_mistral3() -> str | None:
    try:
        importlib.import_module("transformers.models.pixtral.processing_pixtral")
    except ImportError as exc:
        return (
            "transformers' PixtralProcessor (Mistral 3's processor) cannot be imported without torchvision: "
            "transformers/models/pixtral/processing_pixtral.py imports image_processing_pixtral, which imports "
            f"torchvision at module level ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
            "the model itself is checked in tests/test_archs_llava_family.py"
        )
    return None


def _why_not_smolvlm() -> str | None:
    reasons = []
    if importlib.util.find_spec("num2words") is None:
        reasons.append("SmolVLMProcessor.__init__ raises ImportError without the num2words package (not installed)")
    try:
        _t_video("SmolVLMVideoProcessor")
    except Exception:  # noqa: BLE001 - the torchvision dummy raises ImportError
        reasons.append(
            "its apply_chat_template reads video_processor.num_frames, and SmolVLMVideoProcessor needs torchvision"
        )
    if reasons:
        return "; ".join(reasons) + (
            "; the SmolVLM model with the Idefics3 overrides is checked in tests/test_archs_llava_family.py "
            "(with Idefics3Processor, whose image prompt is the same)"
        )
    return None


BUILDERS: dict = {
    "llava_onevision": _build_llava_onevision,
    "aya_vision": _build_aya_vision,
    "internvl": _build_internvl,
}
SKIPPED: dict[str, str] = {}
for _arch, _builder, _why in (
    ("mistral3", _build_mistral3, _why_not_mistral3()),
    ("smolvlm", _build_smolvlm, _why_not_smolvlm()),
):
    if _why is None:
        BUILDERS[_arch] = _builder
    else:
        SKIPPED[_arch] = _why
