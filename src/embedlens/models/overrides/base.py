"""The small per-architecture facts the generic adapter cannot know.

The generic path (`embedlens.models.adapter`) finds visual tokens as `input_ids ==
image_token_id`, reads decoder hidden states from `output_hidden_states`, and captures the
vision encoder's layers with hooks. What it cannot know from the transformers API is *where*
each visual token sits in the image, how the vision tower's (packed) outputs split per image,
and which vision-encoder token feeds which LLM token. Those facts live here, one class per
architecture family, selected by `config.model_type`; unknown architectures get the generic
defaults of `ArchOverrides`.

Conventions (shared by every architecture, documented in docs/architecture.md):

* Grid. Each image gets one `(R, C)` grid; a visual token at `(patch_row, patch_col)` covers
  cell `(r, c)` of an `R x C` partition of the (whole) image. When an architecture shows the
  image at several resolutions (LLaVA-NeXT base view + any-res crops, Idefics3 tiles + global
  view) the grid is the *finest* one that covers the whole image, and tokens of the coarser
  view take the fine cell under their centre (`floor((r + 0.5) * R / r_coarse)`). Each token
  also carries a `view` code: 0 = the (only or) global/base view, 1 = crops/tiles.
* Tokens that stand for no image patch (LLaVA-NeXT row separators ``image_newline``) have
  `patch_row = patch_col = -1` and `view = -1`.
* Vision tokens are the rows of the vision encoder's per-layer output for that image, all
  crops/tiles concatenated in the order the model processes them (CLS included where the
  encoder has one). `vision_to_llm[j]` is the index (among the image's visual LLM tokens) of
  the LLM token that vision token `j` feeds, or -1 (CLS, unpadded-away crop area). Every
  vision token feeds at most one LLM token in all supported architectures; several vision
  tokens may feed the same LLM token (merging/pooling/pixel-shuffle). Where a model mixes
  neighbouring vision tokens into several LLM tokens (LLaVA-OneVision's bilinear shrink of
  large crop grids) there is no such map and `vision_to_llm` is None for that image.
* Vision layer `k` follows HF's vision `hidden_states` order: 0 = the input of the first
  encoder layer (embeddings, after any pre-norm), k = output of encoder layer k (before any
  post-norm or merger).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch


@dataclass
class TokenLayout:
    """Where one image's visual LLM tokens sit in the image."""

    grid: tuple[int, int]
    patch_row: np.ndarray  # (n_tok,) int32, -1 = no patch
    patch_col: np.ndarray  # (n_tok,) int32, -1 = no patch
    view: np.ndarray  # (n_tok,) int8: 0 base/global view, 1 crop/tile, -1 no patch
    note: str = ""
    #: False when the architecture's patch grid is not known for this image: then every
    #: token has patch -1 and `grid` is (0, 0); analyses that need a grid skip the image.
    known: bool = True


@dataclass
class ImageContext:
    """What an override may look at for one image (one batch row holds one image)."""

    config: Any  # the model's (composite) config
    processor: Any
    inputs: Mapping[str, torch.Tensor]  # processor output for the whole batch (CPU)
    image_index: int
    input_ids: np.ndarray  # this row's ids (padded)
    positions: np.ndarray  # sequence positions of this image's visual tokens
    extra: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(len(self.positions))


def _row_major(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(rows * cols)
    return (idx // cols).astype(np.int32), (idx % cols).astype(np.int32)


def _layout(rows: int, cols: int, note: str = "") -> TokenLayout:
    r, c = _row_major(rows, cols)
    return TokenLayout((rows, cols), r, c, np.zeros(rows * cols, np.int8), note)


def _coarse_to_fine(r: np.ndarray, c: np.ndarray, coarse: tuple[int, int], fine: tuple[int, int]):
    """Fine cell under the centre of each coarse cell."""
    fr = np.floor((r + 0.5) * fine[0] / coarse[0]).astype(np.int32)
    fc = np.floor((c + 0.5) * fine[1] / coarse[1]).astype(np.int32)
    return fr, fc


def unknown_layout(n: int, note: str) -> TokenLayout:
    """A layout that records that the grid is not known (instead of guessing one)."""
    minus = np.full(n, -1, np.int32)
    return TokenLayout((0, 0), minus, minus.copy(), np.full(n, -1, np.int8), note, known=False)


def _square_side(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n else None


def _vision_cfg(config, key: str, default=None):
    vc = getattr(config, "vision_config", None)
    return getattr(vc, key, default) if vc is not None else default


# --------------------------------------------------------------------------- generic


class ArchOverrides:
    """Generic defaults, correct for single-view square-grid models (LLaVA-1.5, PaliGemma...)."""

    #: prompt used when the processor has no chat template; `{image}` is the processor's image
    #: placeholder string, `{prompt}` the user prompt
    placeholder: str = "{image}\n{prompt}"

    #: Whether the text after the last visual token can be left out of the forward pass: true
    #: when no earlier token attends to a later one (causal decoders; Gemma 3's bidirectional
    #: attention stays inside each image block). False for prefix-LM models (PaliGemma: image
    #: and prompt attend to each other both ways) and, to be safe, for unknown architectures.
    #: Checked for every registered architecture in tests/test_models.py.
    truncate_after_image: bool = False

    #: ``token_type_ids`` value of text tokens appended after the prompt (answers scored by
    #: the compression benchmark). 0 marks text for most models (Gemma 3: 1 marks image
    #: tokens; Qwen: 0 = text); PaliGemma overrides it (its prefix is bidirectional).
    answer_token_type: int = 0

    def layout(self, ctx: ImageContext) -> TokenLayout:
        """Single-view square grid when the vision config says so (image_size / patch_size
        patches per side, one LLM token each: LLaVA-1.5, PaliGemma); otherwise the grid is
        recorded as unknown rather than guessed from the token count."""
        n = ctx.n_tokens
        size, patch = _vision_cfg(ctx.config, "image_size"), _vision_cfg(ctx.config, "patch_size")
        if isinstance(size, (list, tuple)):
            size = size[0] if len(set(size)) == 1 else None
        if isinstance(patch, (list, tuple)):
            patch = patch[0] if len(set(patch)) == 1 else None
        side = int(size) // int(patch) if isinstance(size, int) and isinstance(patch, int) and patch else None
        if side and side * side == n:
            return _layout(side, side)
        return unknown_layout(n, note=f"grid unknown for model type {getattr(ctx.config, 'model_type', '?')!r}: "
                              f"{n} visual tokens, vision config gives {side}x{side} patches; "
                              "register an override (embedlens.models.register_overrides) to map them")

    def split_vision(self, hidden: torch.Tensor, inputs: Mapping[str, torch.Tensor], config, n_images: int):
        """Per-image (n_vtok, vd) tensors from one captured vision layer output."""
        if hidden.dim() == 3 and hidden.shape[0] == n_images:
            return list(hidden)
        raise NotImplementedError(
            f"cannot split vision hidden states of shape {tuple(hidden.shape)} over {n_images} images "
            "for this architecture; add an override in embedlens.models.overrides"
        )

    def vision_to_llm(self, ctx: ImageContext, n_vtok: int) -> np.ndarray | None:
        """Index of the LLM visual token each vision token feeds (-1 none); None if unknown."""
        n = ctx.n_tokens
        if n_vtok == n:
            return np.arange(n, dtype=np.int32)
        if n_vtok == n + 1:  # a leading CLS token that the projector drops
            return np.arange(-1, n, dtype=np.int32)
        return None

    def processor_kwargs(self) -> dict:
        return {}

    def projector_input(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision features the model feeds its multimodal projector for `pixel_values`
        (B, 3, H, W): (B, n_tok, vd). Used to precompute features for projector training.

        Raises:
            NotImplementedError: the architecture has no such rule here (only LLaVA has one).
        """
        raise NotImplementedError(
            f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}): no rule for the vision "
            "features fed to the projector; projector training supports LLaVA-style models (model_type "
            "'llava', e.g. embedlens-mini), or add projector_input to this architecture's overrides")


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, ArchOverrides] = {}
_GENERIC = ArchOverrides()


def register_overrides(model_type: str, overrides: "type[ArchOverrides] | ArchOverrides", *,
                       exist_ok: bool = True) -> None:
    """Register the architecture facts for configs whose ``model_type`` is `model_type`.

    In the spirit of ``transformers.AutoConfig.register``: a user module (named under
    ``overrides_modules`` in ``config.yaml``) subclasses `ArchOverrides` and registers it,
    without editing this package. `overrides` is a subclass (instantiated here) or an
    instance. Raises TypeError for anything else, ValueError when `model_type` is taken and
    `exist_ok` is False.
    """
    inst = overrides() if isinstance(overrides, type) else overrides
    if not isinstance(inst, ArchOverrides):
        raise TypeError(f"register_overrides({model_type!r}, ...): expected an ArchOverrides subclass "
                        f"or instance, got {type(overrides).__name__}")
    if not exist_ok and model_type in _REGISTRY:
        raise ValueError(f"overrides for model type {model_type!r} are already registered")
    _REGISTRY[model_type] = inst


#: environment variable naming user modules that register overrides (``os.pathsep``-separated
#: module names or .py paths); the workflow sets it from config.yaml's ``overrides_modules``
OVERRIDES_ENV = "EMBEDLENS_OVERRIDES"
_loaded_user_modules: set[str] = set()


def load_user_overrides(entries: "str | list[str] | None" = None) -> None:
    """Import the modules that register user overrides (default: from $EMBEDLENS_OVERRIDES).

    Each entry is an importable module name or a path to a .py file; each is imported once.
    Raises ImportError naming the entry when it cannot be imported.
    """
    import importlib
    import importlib.util
    import os
    from pathlib import Path

    if entries is None:
        entries = [e for e in os.environ.get(OVERRIDES_ENV, "").split(os.pathsep) if e]
    elif isinstance(entries, str):
        entries = [entries]
    for entry in entries:
        if entry in _loaded_user_modules:
            continue
        try:
            if entry.endswith(".py"):
                path = Path(entry)
                spec = importlib.util.spec_from_file_location(f"embedlens_user_overrides_{path.stem}", path)
                if spec is None or not path.is_file():
                    raise FileNotFoundError(f"no such file {entry}")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                importlib.import_module(entry)
        except Exception as exc:
            raise ImportError(f"overrides module {entry!r} (config.yaml overrides_modules / ${OVERRIDES_ENV}) "
                              f"cannot be imported: {type(exc).__name__}: {exc}") from exc
        _loaded_user_modules.add(entry)


def get_overrides(model_type: str) -> ArchOverrides:
    """The overrides for `model_type` (a config's `model_type`), or the generic defaults.
    User modules named in $EMBEDLENS_OVERRIDES are imported first (once)."""
    load_user_overrides()
    return _REGISTRY.get(model_type, _GENERIC)


def known_architectures() -> list[str]:
    return sorted(_REGISTRY)
