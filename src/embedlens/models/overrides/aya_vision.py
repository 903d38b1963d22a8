"""Aya Vision: GOT-OCR2 tiles + thumbnail, SigLIP, pixel shuffle (shared with InternVL)."""

from __future__ import annotations

from .base import register_overrides
from .internvl import TiledPixelShuffleOverrides


class AyaVisionOverrides(TiledPixelShuffleOverrides):
    """Aya Vision: SigLIP tiles (no CLS, "full" features), pixel shuffle by downsample_factor.
    The prompt reads ``<|START_OF_IMG|>`` then ``TILE_i`` + the tile's ``<|IMG_PATCH|>`` tokens
    per tile, ``TILE_GLOBAL`` + the thumbnail's, ``<|END_OF_IMG|>``; only ``<|IMG_PATCH|>`` (the
    image token) carries image features."""

    def _shuffle(self, config) -> int:
        return int(config.downsample_factor)


register_overrides("aya_vision", AyaVisionOverrides)
