"""Where the parts of a loaded VLM are: the one place that looks them up.

The decoder (the module with the ``layers`` ModuleList), its layers' attention and MLP
sublayers, the final norm, the vision encoder and its layer list, the multimodal projector,
the image token id, the text config and the attention implementation. Extraction
(`VLMAdapter`), the compression benchmark and embedlens-mini all ask here, so a model is
either supported the same way everywhere or refused with the same `UnsupportedModelError`.

Sources: the transformers VLM API (``get_decoder``, ``get_text_config``,
``config.image_token_id`` / ``image_token_index``, ``config._attn_implementation``) and the
attribute names of the composite models in transformers 5 (``language_model``,
``vision_tower``, ``multi_modal_projector``...).
"""

from __future__ import annotations

import torch

# Attribute names under which composite VLMs keep their vision encoder.
VISION_ATTRS = ("vision_tower", "vision_model", "visual", "vision_encoder", "vision_backbone", "vision")
# Config keys naming the image placeholder token: transformers 5 maps one onto the other
# for most models, but older or remote-code configs carry only one of them.
_IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")


class UnsupportedModelError(ValueError, NotImplementedError):
    """The generic model access cannot handle this model: the message names the class, what
    is missing (decoder layer list, image token id, vision tower, sublayer...) and what to do.
    Raised at load or before any work. A ValueError (extraction) and a NotImplementedError
    (the compression benchmark refuses architectures with it), so either may be caught."""


def describe(model) -> str:
    """``"ClassName (model_type)"`` for error messages."""
    return f"{type(model).__name__} ({getattr(getattr(model, 'config', None), 'model_type', '?')})"


# --------------------------------------------------------------------------- config facts


def text_config(model_or_config):
    """The language model's config: ``config.get_text_config()`` where the config is
    composite, else the config itself. Accepts a model or a config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def find_image_token_id(config, processor=None) -> int | None:
    """The id of the image placeholder token, or None when nothing names it.

    Looked up in order: the config's ``image_token_id`` / ``image_token_index``, the same in
    its text config, then (with a `processor`) the processor's or tokenizer's
    ``image_token_id`` and the tokenizer id of the processor's ``image_token`` string.
    """
    holders = (config, getattr(config, "text_config", None)) if config is not None else ()
    for holder in holders:
        for key in _IMAGE_TOKEN_KEYS:
            value = getattr(holder, key, None) if holder is not None else None
            if isinstance(value, int):
                return value
    if processor is None:
        return None
    tokenizer = getattr(processor, "tokenizer", processor)
    for holder in (processor, tokenizer):
        value = getattr(holder, "image_token_id", None)
        if isinstance(value, int):
            return value
    token = getattr(processor, "image_token", None)
    if token:
        return int(tokenizer.convert_tokens_to_ids(token))
    return None


def image_token_id(model, processor=None) -> int:
    """The image placeholder token id of `model` (see `find_image_token_id`).

    Raises:
        UnsupportedModelError: neither the config nor the processor names it.
    """
    value = find_image_token_id(getattr(model, "config", None), processor)
    if value is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: cannot find the image token id (config keys image_token_id / "
            "image_token_index, or the processor's image_token); this model is not supported")
    return value


def attn_implementation(model) -> str:
    """The attention implementation the decoder runs (``"sdpa"``, ``"eager"``,
    ``"flash_attention_2"``...): the text config's ``_attn_implementation``, else the
    top-level config's, else ``"eager"``."""
    impl = getattr(text_config(model), "_attn_implementation", None) or getattr(
        model.config, "_attn_implementation", "eager"
    )
    return str(impl)


def sliding_window(model) -> int | None:
    """The sliding-window length (in sequence positions) when some decoder layer attends
    through one, else None: the text config's ``sliding_window`` unless ``layer_types``
    lists no ``sliding_attention`` layer or ``use_sliding_window`` is False."""
    tc = text_config(model)
    window = getattr(tc, "sliding_window", None)
    types = getattr(tc, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    if getattr(tc, "use_sliding_window", True) is False:
        return None
    return int(window)


# --------------------------------------------------------------------------- decoder


def decoder_of(model) -> torch.nn.Module:
    """The decoder stack of a VLM: the module whose ``layers`` ModuleList holds the decoder
    layers (``model.get_decoder()``, one level down when the language model is kept whole
    as a ``*ForCausalLM``, else ``language_model`` / ``text_model`` of the base model).

    Raises:
        UnsupportedModelError: none of these has a ``layers`` ModuleList.
    """

    def has_layers(m) -> bool:
        return isinstance(getattr(m, "layers", None), torch.nn.ModuleList)

    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is not None and not has_layers(dec) and has_layers(getattr(dec, "model", None)):
        # the language model kept whole as a *ForCausalLM (Llama 4): its get_decoder() is
        # itself; the layer list is one level down, in its base model
        dec = dec.model
    if dec is not None and has_layers(dec):
        return dec
    for name in ("language_model", "text_model"):
        sub = getattr(getattr(model, "model", model), name, None)
        if has_layers(sub):
            return sub
    raise UnsupportedModelError(
        f"{describe(model)}: cannot find the decoder's layer list (no get_decoder().layers, "
        "language_model.layers or text_model.layers); this architecture is not supported")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of `model`, (num_layers,) in order (see `decoder_of`)."""
    return decoder_of(model).layers


def _find_child(layer: torch.nn.Module, attr: str, words: tuple[str, ...]) -> torch.nn.Module:
    mod = getattr(layer, attr, None)
    if isinstance(mod, torch.nn.Module):
        return mod
    for _, child in layer.named_children():
        if any(w in type(child).__name__ for w in words):
            return child
    raise UnsupportedModelError(
        f"{type(layer).__name__}: no {attr!r} submodule (nor a child named like {words}); "
        "hooks on this sublayer (compress skip()) cannot be placed for this architecture"
    )


def attention_of(layer: torch.nn.Module) -> torch.nn.Module:
    """The self-attention sublayer of one decoder layer (``self_attn``, else the child whose
    class name says Attention).

    Raises:
        UnsupportedModelError: the layer has neither.
    """
    return _find_child(layer, "self_attn", ("Attention",))


def mlp_of(layer: torch.nn.Module) -> torch.nn.Module:
    """The MLP sublayer of one decoder layer (``mlp``, else the child whose class name says
    MLP / FeedForward / Mlp).

    Raises:
        UnsupportedModelError: the layer has neither.
    """
    return _find_child(layer, "mlp", ("MLP", "FeedForward", "Mlp"))


def final_norm_of(decoder: torch.nn.Module) -> torch.nn.Module:
    """The decoder's final norm (``norm`` or ``final_layernorm``).

    Raises:
        AttributeError: the decoder has neither.
    """
    norm = getattr(decoder, "norm", None)
    if norm is None:
        norm = getattr(decoder, "final_layernorm", None)
    if norm is None:
        raise AttributeError(f"{type(decoder).__name__} has no final norm")
    return norm


# --------------------------------------------------------------------------- vision side


def vision_tower_of(model) -> torch.nn.Module:
    """The vision encoder (first of `VISION_ATTRS` under ``model.model``, then ``model``).

    Raises:
        UnsupportedModelError: none is found (the message says how to extract without it).
    """
    for root in (getattr(model, "model", None), model):
        for name in VISION_ATTRS:
            sub = getattr(root, name, None) if root is not None else None
            if isinstance(sub, torch.nn.Module):
                return sub
    raise UnsupportedModelError(
        f"{describe(model)}: cannot find the vision encoder (looked for "
        f"{', '.join(VISION_ATTRS)}); set extraction.vision_layers: [] to store LLM states only")


def vision_layers_of(model) -> torch.nn.ModuleList:
    """The vision encoder's layer list: the non-empty ModuleList inside the tower with the
    config's ``num_hidden_layers`` (or ``depth``) entries, else the longest one.

    Raises:
        UnsupportedModelError: no vision tower, or no ModuleList in it.
    """
    tower = vision_tower_of(model)
    vc = getattr(model.config, "vision_config", None)
    want = getattr(vc, "num_hidden_layers", None) or getattr(vc, "depth", None)
    candidates = [m for _, m in tower.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    exact = [m for m in candidates if want is not None and len(m) == want]
    pool = exact or candidates
    if not pool:
        raise UnsupportedModelError(
            f"{type(tower).__name__}: cannot find the vision encoder's layer list; set "
            "extraction.vision_layers: [] to store LLM states only")
    return max(pool, key=len)


def projector_of(model) -> torch.nn.Module:
    """The multimodal projector (``multi_modal_projector`` of the base model or the model).

    Raises:
        UnsupportedModelError: the model keeps no ``multi_modal_projector``.
    """
    for root in (getattr(model, "model", None), model):
        proj = getattr(root, "multi_modal_projector", None) if root is not None else None
        if isinstance(proj, torch.nn.Module):
            return proj
    raise UnsupportedModelError(
        f"{describe(model)}: no multi_modal_projector (LLaVA-style projector) under model.model or the "
        "model; projector training and evaluation need a LLaVA-style model such as embedlens-mini")

