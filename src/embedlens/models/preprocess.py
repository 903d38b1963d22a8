"""Image preprocessing before a model's processor (``extraction.preprocess``).

``native`` gives the processor the image as it is: llava-hf's LLaVA-1.5 processor then
resizes the short side and center-crops a non-square image, so the sides of a 4:3 image
are never seen. ``pad_square`` first pastes the image centred on a square canvas of side
max(w, h) filled with the image processor's mean colour, as LLaVA-1.5's released code
(``expand2square``) does, so every pixel reaches the model and the padding costs tokens
(on a 4:3 image a quarter of the grid). Generic: any architecture whose image processor has
an ``image_mean``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: The values of ``extraction.preprocess`` (``ExtractSettings.preprocess``).
PREPROCESS = ("native", "pad_square")


def mean_colour(processor: Any) -> tuple[int, ...]:
    """The image processor's mean as an 8-bit fill colour, as LLaVA-1.5 computes it:
    ``tuple(int(x * 255) for x in image_processor.image_mean)`` (truncated, not rounded).

    Raises
    ------
    ValueError
        the processor (or its ``image_processor``) has no ``image_mean`` (names its class).
    """
    ip = getattr(processor, "image_processor", processor)
    mean = getattr(ip, "image_mean", None)
    if mean is None:
        raise ValueError(f"preprocess 'pad_square' fills with the image processor's mean colour, but "
                         f"{type(ip).__name__} has no image_mean: use extraction.preprocess: native")
    mean = [float(mean)] * 3 if np.isscalar(mean) else [float(x) for x in mean]
    return tuple(int(x * 255) for x in mean)


def pad_to_square(image: Any, fill: Sequence[int]) -> Any:
    """``image`` (PIL) centred on a square canvas of side max(w, h) filled with ``fill``;
    a square image is returned as it is. The same arithmetic as LLaVA-1.5's
    ``expand2square``: the offset along the short side is ``(long - short) // 2``."""
    from PIL import Image

    if not hasattr(image, "size") or not hasattr(image, "mode"):
        image = Image.fromarray(np.asarray(image))
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), tuple(fill) if image.mode != "L" else int(fill[0]))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess_images(images: Sequence[Any], processor: Any, preprocess: str) -> list[Any]:
    """``images`` as the model's processor should receive them under ``preprocess``.

    Raises
    ------
    ValueError
        an unknown ``preprocess``; ``pad_square`` with a processor without ``image_mean``.
    """
    if preprocess not in PREPROCESS:
        raise ValueError(f"extraction.preprocess must be one of {list(PREPROCESS)}, got {preprocess!r}")
    if preprocess == "native":
        return list(images)
    fill = mean_colour(processor)
    return [pad_to_square(im, fill) for im in images]
