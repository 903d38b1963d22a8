"""Tiny random models of Recent families: Qwen3-VL, GLM-4V, Gemma 3n, Llama 4.

Builders return (config, processor) like the ones in `embedlens.testing.tiny`; sizes follow
its conventions (hidden 32, 2 decoder layers, 2 vision layers, patch 4, 16-48 px images).
The shared helpers are reached as ``_t.<name>`` (`embedlens.testing.tiny_common`).
"""

from __future__ import annotations

from embedlens.testing import tiny_common as _t

# Chat templates modelled on the real checkpoints (same turn markers and image placeholders).
_TEMPLATES = {
    # Qwen/Qwen3-VL-*-Instruct: like Qwen2-VL but without a default system turn
    "qwen3_vl": _t._template(
        "",
        "{{ '<|im_start|>' + message['role'] + '\\n' }}",
        "{{ '<|im_end|>\\n' }}",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|im_start|>assistant\\n",
    ),
    # zai-org/GLM-4.1V-9B-Thinking: "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>
    # {prompt}<|assistant|>\n"; the processor expands <|image|> to one token per merged patch
    "glm4v": _t._template(
        "{{ '[gMASK]<sop>' }}",
        "{{ '<|' + message['role'] + '|>\\n' }}",
        "",
        "<|begin_of_image|><|image|><|end_of_image|>",
        "<|assistant|>\\n",
    ),
}


def _video_stub_processor(cls, tok, image_processor, template: str, video_type: str, **video_cfg):
    """A Qwen-VL-style processor whose (mandatory) video processor needs torchvision: built
    with none when torchvision is missing (images only) and saved with the config a real
    `video_type` would write, so a machine with torchvision loads one (as `tiny._qwen_processor`)."""
    import transformers

    from embedlens.models.loading import optional_video_processor

    try:
        video = getattr(transformers, video_type)(**video_cfg)
    except Exception:  # noqa: BLE001 - without torchvision the class is a dummy that raises
        video = None
    with optional_video_processor():
        proc = cls(image_processor=image_processor, tokenizer=tok, video_processor=video, chat_template=template)
    if video is None:
        proc._saved_video_config = _t._SavedVideoConfig(video_processor_type=video_type, **video_cfg)
    return proc


# --------------------------------------------------------------------------- Qwen3-VL


def _build_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLProcessor

    tok = _t._qwen_tokenizer()
    # Qwen2VLImageProcessorPil, patch 4, merge 2 (the real checkpoint: patch 16, merge 2, mean =
    # std = 0.5): a 32 x 32 image -> 8 x 8 patches -> 4 x 4 = 16 LLM tokens
    proc = _video_stub_processor(
        Qwen3VLProcessor,
        tok,
        _t._qwen_image_processor(),
        _TEMPLATES["qwen3_vl"],
        "Qwen3VLVideoProcessor",
        **_t._QWEN_VIDEO,
    )
    text = _t._qwen_text(tok, "qwen3_vl_text")
    # interleaved mrope: the h and w sections take every third frequency (real: [24, 20, 20]
    # of 64); head_dim 16 has 8 frequencies
    text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(
            depth=_t._VLAYERS,
            hidden_size=_t._VD,
            intermediate_size=2 * _t._VD,
            out_hidden_size=_t._D,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            # learned position grid resampled to every image: 12 x 12 = a 48 px image
            num_position_embeddings=144,
            # DeepStack: the output of vision block 0, merged by its own merger, is added to the
            # visual positions after decoder layer 0 (real: blocks 8, 16, 24 -> layers 0, 1, 2)
            deepstack_visual_indexes=[0],
            initializer_range=_t._INIT,
        ),
        **_t._qwen_common(tok),
    )
    return cfg, proc


# --------------------------------------------------------------------------- GLM-4V


def _build_glm4v():
    from transformers import Glm4vConfig, Glm4vImageProcessorPil, Glm4vProcessor

    named = {"image_token": "<|image|>", "video_token": "<|video|>"}
    tok = _t._tokenizer(
        bos=None,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        named=named,
        extra=[
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|begin_of_image|>",
            "<|end_of_image|>",
            "<|begin_of_video|>",
            "<|end_of_video|>",
        ],
    )
    ids = tok.convert_tokens_to_ids
    # patch 4, merge 2 -> sides are multiples of 8 px; the pixel bounds count both temporal
    # frames (GLM's smart_resize multiplies by t = 2): 16 x 16 .. 48 x 48 px
    ip = Glm4vImageProcessorPil(
        size={"shortest_edge": 2 * 16 * 16, "longest_edge": 2 * 48 * 48},
        patch_size=4,
        temporal_patch_size=2,
        merge_size=2,
        **_t._mean_std(),
    )
    video_cfg = dict(patch_size=4, temporal_patch_size=2, merge_size=2, **_t._mean_std())
    proc = _video_stub_processor(Glm4vProcessor, tok, ip, _TEMPLATES["glm4v"], "Glm4vVideoProcessor", **video_cfg)
    text = dict(
        model_type="glm4v_text",
        vocab_size=_t._vocab(tok),
        hidden_size=_t._D,
        intermediate_size=2 * _t._D,
        num_hidden_layers=_t._LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        initializer_range=_t._INIT,
        # GLM rotates half of each head (real: 64 of 128 dims, mrope [8, 12, 12]); head_dim 16
        # -> 8 rotary dims = 4 frequencies over (t, h, w)
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 1, 1]},
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    cfg = Glm4vConfig(
        text_config=text,
        vision_config=dict(
            depth=_t._VLAYERS,
            hidden_size=_t._VD,
            intermediate_size=2 * _t._VD,
            out_hidden_size=_t._D,  # downsample conv output = merger width = decoder width
            num_heads=2,
            # learned 12 x 12 position grid, bicubically resampled to every image
            image_size=48,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=_t._INIT,
        ),
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"),
    )
    return cfg, proc


# --------------------------------------------------------------------------- Llama 4 (no processor)


def llama4_model_and_tokenizer(seed: int = 0):
    """A tiny random `Llama4ForConditionalGeneration` built from its config, with a tokenizer
    holding Llama 4's image tokens, but no processor: there is none to build here (see
    SKIPPED). For checks of what the adapter finds in Llama 4's module tree only.

    Sizes as the real layout, scaled down: 16 px tiles of 4 x 4 patches (+ a CLS token the
    vision tower appends last), pixel shuffle 0.5 -> 2 x 2 = 4 `<|patch|>` tokens per tile
    (real: 336 px tiles, 24 x 24 patches -> 144 tokens); MoE on every second decoder layer,
    NoPE on every second layer, like the real interleaving."""
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    tok = _t._tokenizer(
        bos="<|begin_of_text|>",
        eos="<|eot|>",
        pad="<|finetune_right_pad|>",
        extra=[
            "<|header_start|>",
            "<|header_end|>",
            "<|image_start|>",
            "<|image_end|>",
            "<|image|>",
            "<|patch|>",
            "<|tile_x_separator|>",
            "<|tile_y_separator|>",
        ],
    )
    ids = tok.convert_tokens_to_ids
    cfg = Llama4Config(
        vision_config=dict(
            hidden_size=_t._VD,
            intermediate_size=4 * _t._VD,  # = channels after the 0.5 pixel shuffle (real: 4 x 1408)
            num_hidden_layers=_t._VLAYERS,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            pixel_shuffle_ratio=0.5,
            projector_input_dim=_t._D,
            projector_output_dim=_t._D,
            vision_output_dim=_t._D,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            initializer_range=_t._INIT,
        ),
        text_config=dict(
            vocab_size=_t._vocab(tok),
            hidden_size=_t._D,
            intermediate_size=2 * _t._D,
            intermediate_size_mlp=2 * _t._D,
            num_hidden_layers=_t._LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            num_local_experts=2,
            interleave_moe_layer_step=2,
            no_rope_layer_interval=2,
            attention_chunk_size=16,
            max_position_embeddings=512,
            initializer_range=_t._INIT,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        # the model scatters image features at <|patch|>; the processor's "image_token"
        # (<|image|>) only opens the global view
        image_token_index=ids("<|patch|>"),
        boi_token_index=ids("<|image_start|>"),
        eoi_token_index=ids("<|image_end|>"),
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Llama4ForConditionalGeneration(cfg).eval()
    finally:
        torch.random.set_rng_state(state)
    return model, tok


BUILDERS: dict = {
    "qwen3_vl": _build_qwen3_vl,
    "glm4v": _build_glm4v,
}
#: why these cannot be built here (tests/test_archs_recent.py re-checks that each reason holds)
SKIPPED: dict[str, str] = {
    "gemma3n": (
        "Gemma 3n's vision tower (MobileNetV5, Gemma3nVisionConfig -> TimmWrapperModel) is built by "
        "the timm library, which is not installed: transformers cannot construct "
        "Gemma3nForConditionalGeneration without it (ImportError: TimmWrapperModel requires the timm "
        "library)"
    ),
    "llama4": (
        "Llama 4's only image processor (Llama4ImageProcessor) is implemented with torchvision, which "
        "is not installed (transformers 5.24 registers no PIL backend for llama4), so no "
        "Llama4Processor can be built; besides, Llama4ForConditionalGeneration.forward fails on every "
        "call in transformers 5.24.0 (AttributeError: 'MoeCausalLMOutputWithPast' object has no "
        "attribute 'image_outputs'). What the adapter finds in its module tree is tested on a model "
        "built from config (tests/test_archs_recent.py)"
    ),
}
