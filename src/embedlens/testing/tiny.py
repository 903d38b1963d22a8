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

from embedlens.testing.tiny_common import (
    _D,
    _INIT,
    _TEMPLATES,
    _clip_vision,
    _llama_text,
    _mean_std,
    _qwen_common,
    _qwen_processor,
    _qwen_text,
    _qwen_tokenizer,
    _reinit_zeros,
    _save_processor,
    _siglip_vision,
    _tokenizer,
    _VD,
    _VLAYERS,
)

# the full list (with the families of tiny_llava_family / tiny_recent) is set at the end of the module
TINY_ARCHS: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "paligemma")

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
        text_config=_llama_text(tok, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16,
                                sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
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
    text = _llama_text(tok, model_type="gemma", head_dim=16)
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


# Families added later live in their own modules (they use the helpers of tiny_common): each exports
# BUILDERS (arch -> builder) and SKIPPED (arch -> why it cannot be built on this machine).
from embedlens.testing import tiny_llava_family as _llava_family, tiny_recent as _recent  # noqa: E402

for _family in (_llava_family, _recent):
    _BUILDERS.update(_family.BUILDERS)
TINY_ARCHS = tuple(_BUILDERS)
#: architectures whose tiny model cannot be built here, with the reason (tests skip them, saying so)
TINY_SKIPPED: dict[str, str] = {**_llava_family.SKIPPED, **_recent.SKIPPED}
