"""Qwen2-VL and Qwen2.5-VL (dynamic resolution, packed vision patches)."""

from __future__ import annotations

import numpy as np
import torch

from .base import ArchOverrides, ImageContext, TokenLayout, _coarse_to_fine, _layout, _row_major, _square_side, register_overrides


class Qwen2VLOverrides(ArchOverrides):
    """Qwen2-VL / Qwen2.5-VL: dynamic resolution; LLM grid = image_grid_thw[1:] // merge, row
    major; the vision tower sees packed patches of all images, m x m patches per LLM token."""

    truncate_after_image = True

    def _thw(self, inputs, i):
        return [int(v) for v in inputs["image_grid_thw"][i].tolist()]

    def layout(self, ctx):
        t, h, w = self._thw(ctx.inputs, ctx.image_index)
        m = ctx.config.vision_config.spatial_merge_size
        rows, cols = h // m, w // m
        if ctx.n_tokens != t * rows * cols or t != 1:
            raise ValueError(f"Qwen-VL layout: grid_thw {(t, h, w)} does not give {ctx.n_tokens} tokens")
        return _layout(rows, cols)

    def _unpermute(self, hidden, inputs, config):
        return hidden

    def split_vision(self, hidden, inputs, config, n_images):
        thw = inputs["image_grid_thw"]
        counts = [int(v) for v in thw.prod(-1).tolist()]
        if hidden.dim() == 3 and hidden.shape[0] == 1:
            hidden = hidden[0]
        if hidden.dim() != 2 or hidden.shape[0] != sum(counts):
            raise ValueError(f"Qwen-VL: vision output {tuple(hidden.shape)} does not match patches {counts}")
        hidden = self._unpermute(hidden, inputs, config)
        return list(torch.split(hidden, counts, dim=0))

    def vision_to_llm(self, ctx, n_vtok):
        m = ctx.config.vision_config.spatial_merge_size
        # The image processor orders patches merge-window by merge-window, so m*m consecutive
        # patches form one LLM token.
        if n_vtok != ctx.n_tokens * m * m:
            return None
        return (np.arange(n_vtok) // (m * m)).astype(np.int32)


class Qwen25VLOverrides(Qwen2VLOverrides):
    """Qwen2.5-VL's vision tower reorders patches into attention windows before its blocks and
    restores the order only after the merger; the captured block outputs are put back into the
    image order here, with the model's own window index."""

    def _unpermute(self, hidden, inputs, config):
        from transformers.vision_utils import get_vision_window_index

        vc = config.vision_config
        window_index, _ = get_vision_window_index(
            inputs["image_grid_thw"].cpu(),
            spatial_merge_size=vc.spatial_merge_size,
            window_size=vc.window_size,
            patch_size=vc.patch_size,
        )
        unit = vc.spatial_merge_size**2
        reverse = torch.argsort(window_index.to(hidden.device))
        return hidden.reshape(-1, unit, hidden.shape[-1])[reverse].reshape(-1, hidden.shape[-1])


register_overrides("qwen2_vl", Qwen2VLOverrides)
register_overrides("qwen2_5_vl", Qwen25VLOverrides)
