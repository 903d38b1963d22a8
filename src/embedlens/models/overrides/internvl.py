"""InternVL (HF-native) and the tiling + pixel-shuffle scheme it shares with Aya Vision."""

from __future__ import annotations

import numpy as np
import torch

from .base import ArchOverrides, ImageContext, TokenLayout, _coarse_to_fine, _layout, _row_major, register_overrides, unknown_layout


class TiledPixelShuffleOverrides(ArchOverrides):
    """Images cut into tiles by `GotOcr2ImageProcessor.crop_image_to_patches`, each tile a
    square vision-tower input whose p x p patch tokens are pixel-shuffled k x k into s x s LLM
    tokens (s = p / k).

    The processor chooses a cols x rows canvas whose aspect ratio is closest to the image's
    (`get_optimal_tiled_canvas`), cuts the resized image into its tiles (row-major) and, when
    there is more than one tile, appends a thumbnail (the whole image at tile size). The LLM
    tokens follow the same order: every tile's s x s block, then the thumbnail's. The grid is
    all tiles side by side (rows*s x cols*s); the thumbnail is the global view (view 0), mapped
    to the fine cell under its centre.

    The token count only gives the number of tiles, not their arrangement (2 tiles: 1 x 2 or
    2 x 1), and the processor does not return the arrangement: it is chosen again here from the
    image's original size (``ctx.extra["image_size"]``, set by the adapter) with the processor's
    own function and settings, and checked against the token count. Without the size the grid
    is recorded as unknown.
    """

    truncate_after_image = True

    # ---------------------------------------------------------------- per architecture
    def _patch_side(self, config) -> int:
        """Vision patches per tile side (p)."""
        vc = config.vision_config
        size, patch = vc.image_size, vc.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return int(size) // int(patch)

    def _shuffle(self, config) -> int:
        """Pixel-shuffle factor k (k x k vision patches per LLM token)."""
        raise NotImplementedError

    def _image_token_id(self, config) -> int:
        return int(config.image_token_id)

    # ---------------------------------------------------------------- geometry
    def _per_tile(self, config) -> tuple[int, int, int]:
        p, k = self._patch_side(config), self._shuffle(config)
        if p % k:
            raise ValueError(f"{type(self).__name__}: {p} patches per tile side do not shuffle by {k}")
        s = p // k
        return p, k, s

    def _canvas(self, ctx: ImageContext, n_tiles: int) -> tuple[int, int] | str:
        """(rows, cols) of the tile canvas, or why it is not known."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        hw = ctx.extra.get("image_size")
        if hw is None:
            return f"{n_tiles} tiles, but the image size (which fixes their arrangement) is not known"
        ip = getattr(ctx.processor, "image_processor", None)
        size = getattr(ip, "size", None)
        tile = (getattr(size, "height", None), getattr(size, "width", None)) if size is not None else (None, None)
        if isinstance(size, dict):
            tile = (size.get("height"), size.get("width"))
        lo, hi = getattr(ip, "min_patches", None), getattr(ip, "max_patches", None)
        if None in (*tile, lo, hi):
            return f"{n_tiles} tiles, but the image processor has no tile size / min_patches / max_patches"
        cols, rows = get_optimal_tiled_canvas(tuple(int(v) for v in hw), tuple(int(v) for v in tile), int(lo), int(hi))
        if rows * cols != n_tiles:
            return (f"{n_tiles} tiles, but the processor's canvas for a {hw[0]}x{hw[1]} image is "
                    f"{rows}x{cols} (min_patches {lo}, max_patches {hi}): settings changed at call time?")
        return rows, cols

    def layout(self, ctx):
        _, _, s = self._per_tile(ctx.config)
        per = s * s
        n = ctx.n_tokens
        if n % per:
            return unknown_layout(n, note=f"{type(self).__name__}: {n} visual tokens are not whole tiles of {per}")
        n_blocks = n // per
        if n_blocks == 1:  # one view of the whole image, no thumbnail
            return _layout(s, s, note="single tile (whole image)")
        canvas = self._canvas(ctx, n_blocks - 1)
        if isinstance(canvas, str):
            return unknown_layout(n, note=f"{type(self).__name__}: grid unknown: {canvas}")
        rows, cols = canvas
        R, C = rows * s, cols * s
        tr, tc = _row_major(s, s)
        pr, pc = [], []
        for t in range(rows * cols):
            kr, kc = divmod(t, cols)
            pr.append(kr * s + tr)
            pc.append(kc * s + tc)
        gr, gc = _coarse_to_fine(tr, tc, (s, s), (R, C))
        pr.append(gr)
        pc.append(gc)
        view = np.concatenate([np.ones(rows * cols * per, np.int8), np.zeros(per, np.int8)])
        return TokenLayout(
            (R, C),
            np.concatenate(pr).astype(np.int32),
            np.concatenate(pc).astype(np.int32),
            view,
            note=f"{rows}x{cols} tiles side by side + thumbnail (global view, mapped to the cell under its centre)",
        )

    def split_vision(self, hidden, inputs, config, n_images):
        # pixel_values holds every image's tiles back to back (no batch axis, no padding); the
        # number of tiles per image is its image-token count over the tokens per tile
        _, _, s = self._per_tile(config)
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        visual = ids == self._image_token_id(config)
        if mask is not None:
            visual &= mask.bool()
        n_tok = visual.sum(1).tolist()
        counts = [int(n) // (s * s) for n in n_tok]
        if hidden.dim() != 3 or hidden.shape[0] != sum(counts) or any(n % (s * s) for n in n_tok):
            raise ValueError(f"{type(self).__name__}: vision output {tuple(hidden.shape)} does not match "
                             f"tiles {counts} ({n_tok} visual tokens)")
        return [h.reshape(-1, h.shape[-1]) for h in torch.split(hidden, counts, dim=0)]

    def vision_to_llm(self, ctx, n_vtok):
        p, k, s = self._per_tile(ctx.config)
        per = s * s
        if ctx.n_tokens % per:
            return None
        n_blocks = ctx.n_tokens // per
        if n_vtok % n_blocks:
            return None
        cls = n_vtok // n_blocks - p * p  # leading CLS per tile (InternViT), dropped before the shuffle
        if cls < 0:
            return None
        r, c = _row_major(p, p)
        # pixel shuffle: LLM token (i, j) of a tile takes patches k*i..k*i+k-1 x k*j..k*j+k-1
        local = np.concatenate([np.full(cls, -1), (r // k) * s + c // k])
        return np.concatenate([np.where(local >= 0, b * per + local, -1) for b in range(n_blocks)]).astype(np.int32)


class InternVLOverrides(TiledPixelShuffleOverrides):
    """InternVL (``InternVLForConditionalGeneration``): InternViT tiles with a CLS token, which
    the "default" feature strategy drops; pixel shuffle by 1 / downsample_ratio (0.5 -> 2 x 2).
    The placeholder ``<img>`` + ``<IMG_CONTEXT>`` x n + ``</img>`` holds all tiles, then the
    thumbnail, with nothing between them."""

    def _shuffle(self, config) -> int:
        return int(round(1 / float(config.downsample_ratio)))


register_overrides("internvl", InternVLOverrides)
