"""Assembling embedlens-mini from the converted parts: the ``LlavaConfig``, the model with
the two towers and the projector (seeded init or trained weights), and the processor
(112 px image processor, tokenizer with ``<image>``, LLaVA-style chat template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .wheels import MiniBuildError, sha256_file

IMAGE_SIZE = 112  # px fed to the vision tower: 112 / 14 = 8 → 8 × 8 = 64 visual tokens
PATCH_SIZE = 14
NUM_VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
IMAGE_TOKEN = "<image>"
#: which vision hidden state feeds the projector (HF ``hidden_states`` index of the vision
#: tower; -4 = output of block 9 of 12, which a patch-level linear probe found best for
#: letters and colours, see MODEL_CARD.md)
VISION_FEATURE_LAYER = -4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECTOR_INIT_SEED = 0
PROJECTOR_PREFIX = "multi_modal_projector."


# The tokenizer's own template (string contents) extended to LLaVA-style list contents:
# {"type": "image"} → "<image>", {"type": "text"} → its text. For string contents the
# output is identical to SmolLM2's template.
PROCESSOR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_image_processor():
    """112 px square resize (no crop), ImageNet normalisation, as DINOv2 expects."""
    from transformers.image_utils import PILImageResampling

    try:
        from transformers import BitImageProcessorPil as _IP
    except ImportError:  # pragma: no cover - older transformers
        from transformers import BitImageProcessor as _IP
    return _IP(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC, do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
    )


def load_projector_weights(path: Path) -> dict[str, Any]:
    """Projector tensors from ``path``, keys without the ``multi_modal_projector.`` prefix."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    out = {}
    for k, v in sd.items():
        out[k[len(PROJECTOR_PREFIX):] if k.startswith(PROJECTOR_PREFIX) else k] = v
    return out


def init_projector_(projector, seed: int = PROJECTOR_INIT_SEED) -> None:
    """Deterministic default (``nn.Linear``) initialisation of a projector, by seed."""
    import torch

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for mod in projector.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.reset_parameters()
    finally:
        torch.random.set_rng_state(gen_state)


def assemble(parts_dir: Path, projector_path: Path | None = None):
    """(model, processor, info) assembled from the cached parts and optional projector weights."""
    import torch
    from transformers import (
        AutoTokenizer,
        Dinov2Model,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    parts_dir = Path(parts_dir)
    tok = AutoTokenizer.from_pretrained(parts_dir / "tokenizer")
    chat_template = tok.chat_template
    n_added = tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if n_added != 1:
        raise MiniBuildError(f"could not add {IMAGE_TOKEN} to the tokenizer")
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)

    llm = LlamaForCausalLM.from_pretrained(parts_dir / "llm", dtype=torch.float32)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(PROJECTOR_INIT_SEED)  # mean_resizing samples the new row: keep it reproducible
    llm.resize_token_embeddings(len(tok), mean_resizing=True)
    torch.random.set_rng_state(rng_state)
    vision = Dinov2Model.from_pretrained(parts_dir / "vision", dtype=torch.float32)

    text_config = llm.config
    for cfg in (text_config, vision.config):
        cfg._name_or_path = ""
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,  # LlavaConfig's attribute map saves it under its usual key
        image_seq_length=NUM_VISUAL_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=VISION_FEATURE_LAYER,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector.to_empty(device="cpu")
    init_projector_(model.model.multi_modal_projector, PROJECTOR_INIT_SEED)
    trained = False
    if projector_path is not None and Path(projector_path).is_file():
        sd = load_projector_weights(Path(projector_path))
        missing, unexpected = model.model.multi_modal_projector.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise MiniBuildError(
                f"projector weights in {projector_path} do not fit the projector "
                f"(missing {missing}, unexpected {unexpected})")
        trained = True
    model.tie_weights()
    model.eval()
    if any(p.device.type == "meta" for p in model.parameters()):
        raise MiniBuildError("assembly left parameters on the meta device")

    processor = LlavaProcessor(
        image_processor=make_image_processor(), tokenizer=tok, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=PROCESSOR_CHAT_TEMPLATE,
    )
    tok.chat_template = chat_template
    info = {
        "image_token_id": int(image_token_id),
        "projector_trained": trained,
        "projector_source": str(projector_path) if trained else f"random init (seed {PROJECTOR_INIT_SEED})",
        "projector_sha256": sha256_file(Path(projector_path)) if trained else None,
        "n_params": int(sum(p.numel() for p in model.parameters())),
    }
    return model, processor, info
