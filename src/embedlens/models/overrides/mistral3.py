"""Mistral 3 (Pixtral vision encoder, per-image patch grids, 2 x 2 patch merger)."""

from __future__ import annotations

import numpy as np
import torch

from .base import ArchOverrides, _layout, register_overrides


class Mistral3Overrides(ArchOverrides):
    """Mistral 3: Pixtral sees every image at its own (resized) size, h x w patches, all
    images' patches packed into one sequence (block-diagonal attention); the projector's patch
    merger turns each m x m block into one LLM token, row-major over (h/m) x (w/m).

    The processor writes each row of ``[IMG]`` tokens followed by ``[IMG_BREAK]``, the last
    row's break replaced by ``[IMG_END]``. Only ``[IMG]`` is the image token, so the visual
    tokens are the (h/m) x (w/m) merged patches, exactly one grid cell each; the break and end
    tokens are ordinary text tokens."""

    truncate_after_image = True

    def _patch_grid(self, config, image_size) -> tuple[int, int]:
        P = int(config.vision_config.patch_size)
        h, w = (int(v) for v in image_size)
        return h // P, w // P

    def layout(self, ctx):
        m = int(ctx.config.spatial_merge_size)
        h, w = self._patch_grid(ctx.config, ctx.inputs["image_sizes"][ctx.image_index].tolist())
        rows, cols = h // m, w // m
        if ctx.n_tokens != rows * cols:
            raise ValueError(f"Mistral 3 layout: image of {h}x{w} patches, merge {m}, does not give "
                             f"{ctx.n_tokens} tokens")
        return _layout(rows, cols, note=f"pixtral: {h}x{w} patches merged {m}x{m}")

    def split_vision(self, hidden, inputs, config, n_images):
        counts = [int(np.prod(self._patch_grid(config, s.tolist()))) for s in inputs["image_sizes"]]
        if hidden.dim() == 3 and hidden.shape[0] == 1:
            hidden = hidden[0]
        if hidden.dim() != 2 or hidden.shape[0] != sum(counts):
            raise ValueError(f"Mistral 3: vision output {tuple(hidden.shape)} does not match patches {counts}")
        return list(torch.split(hidden, counts, dim=0))

    def vision_to_llm(self, ctx, n_vtok):
        m = int(ctx.config.spatial_merge_size)
        h, w = self._patch_grid(ctx.config, ctx.inputs["image_sizes"][ctx.image_index].tolist())
        if n_vtok != h * w or ctx.n_tokens != (h // m) * (w // m):
            return None
        r, c = np.divmod(np.arange(n_vtok), w)
        # the merger unfolds m x m blocks with stride m; a border row/column that does not fill
        # a block is dropped by the unfold (the processor avoids it: sizes are multiples of m)
        inside = (r < (h // m) * m) & (c < (w // m) * m)
        return np.where(inside, (r // m) * (w // m) + c // m, -1).astype(np.int32)


register_overrides("mistral3", Mistral3Overrides)
