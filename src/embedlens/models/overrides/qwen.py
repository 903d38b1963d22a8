"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dynamic resolution, packed vision patches)."""

from __future__ import annotations

import numpy as np
import torch

from .base import ArchOverrides, _layout, register_overrides


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


class Qwen3VLOverrides(Qwen2VLOverrides):
    """Qwen3-VL: Qwen2-VL's packing, grid and m x m merge (no attention windows, so the vision
    blocks see the patches in image order). The vision tower's layer list is ``blocks``; its
    other module list (``deepstack_merger_list``, one merger per DeepStack layer) is far shorter
    (3 vs ``depth`` = 27 in transformers' default config), so the generic search, which wants
    ``depth`` layers, finds ``blocks``.

    DeepStack adds, after decoder layer i (i < number of DeepStack layers), the merged output of
    vision block ``deepstack_visual_indexes[i]`` to the visual positions, in place, outside the
    decoder layer. HF's ``hidden_states[i + 1]`` is the layer's own output, *before* that
    addition (transformers records the decoder layer outputs), so for those layers the stored
    state at a visual position is not what the next layer reads: that is the stored state plus
    the DeepStack feature. The positions are unchanged: the features go to exactly the
    image-token positions (``input_ids == image_token_id``), in the same order as the main
    merger's tokens."""


register_overrides("qwen2_vl", Qwen2VLOverrides)
register_overrides("qwen2_5_vl", Qwen25VLOverrides)
register_overrides("qwen3_vl", Qwen3VLOverrides)
