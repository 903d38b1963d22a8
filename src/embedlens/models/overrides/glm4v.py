"""GLM-4.1V / GLM-4V (dynamic resolution, packed vision patches, conv merge)."""

from __future__ import annotations

import numpy as np

from .base import register_overrides
from .qwen import Qwen2VLOverrides


class Glm4vOverrides(Qwen2VLOverrides):
    """GLM-4V: Qwen2-VL-style dynamic resolution. The image processor resizes to multiples of
    patch x merge, orders the patches merge-window by merge-window (row-major windows, then
    row-major inside each window), and the vision tower sees the patches of all images packed
    in one sequence (``image_grid_thw`` gives each image's t, h, w in patches). After its
    blocks and a post-norm, a ``downsample`` convolution with kernel = stride = merge turns
    each window of m x m consecutive patches into one LLM token; hence grid = (h / m, w / m),
    row-major, and m*m consecutive vision tokens feed one LLM token (the inherited layout,
    split and vision_to_llm). Vision layer k is block k's output, before the post-norm.

    The prompt wraps the image tokens in ``<|begin_of_image|>`` ... ``<|end_of_image|>``; the
    layout checks that the image's tokens are exactly that one contiguous run (GLM reuses the
    image token for video frames, so a stray run would be a frame, not this image)."""

    truncate_after_image = True  # causal decoder; mrope positions depend only on earlier tokens

    def layout(self, ctx):
        pos = np.asarray(ctx.positions)
        start = getattr(ctx.config, "image_start_token_id", None)
        end = getattr(ctx.config, "image_end_token_id", None)
        contiguous = len(pos) > 0 and int(pos[-1]) - int(pos[0]) + 1 == len(pos)
        ids = ctx.input_ids
        if start is not None and end is not None:
            framed = (
                contiguous
                and pos[0] > 0
                and int(ids[pos[0] - 1]) == int(start)
                and pos[-1] + 1 < len(ids)
                and int(ids[pos[-1] + 1]) == int(end)
            )
            if not framed:
                raise ValueError(
                    "GLM-4V layout: the image tokens are not one run between <|begin_of_image|> and "
                    "<|end_of_image|> (several images or video frames in one row are not supported)"
                )
        return super().layout(ctx)


register_overrides("glm4v", Glm4vOverrides)
