"""Gemma 3 (pooled SigLIP soft tokens) and PaliGemma (prefix-LM)."""

from __future__ import annotations

import numpy as np

from .base import ArchOverrides, _layout, _row_major, _square_side, register_overrides, unknown_layout


class Gemma3Overrides(ArchOverrides):
    """Gemma 3: SigLIP p x p patches average-pooled to sqrt(mm_tokens_per_image)^2 soft tokens.
    Pan-and-scan crops (off by default) add further image blocks, laid out as one row each."""

    truncate_after_image = True

    def layout(self, ctx):
        side = _square_side(int(ctx.config.mm_tokens_per_image))
        if side is not None and ctx.n_tokens == side * side:
            return _layout(side, side)
        return unknown_layout(ctx.n_tokens, note=f"gemma3: {ctx.n_tokens} visual tokens, not one "
                              f"{side}x{side} block (pan-and-scan crops): grid unknown")

    def vision_to_llm(self, ctx, n_vtok):
        per_side = _square_side(int(ctx.config.mm_tokens_per_image))
        p = _square_side(n_vtok)
        if per_side is None or p is None or ctx.n_tokens != per_side * per_side or p % per_side:
            return None
        k = p // per_side
        r, c = _row_major(p, p)
        return ((r // k) * per_side + c // k).astype(np.int32)



class PaliGemmaOverrides(ArchOverrides):
    """PaliGemma: fixed square SigLIP grid, image tokens first; no chat template — the
    processor itself appends BOS after the image tokens and a newline after the prompt."""

    placeholder = "{image}{prompt}"
    truncate_after_image = False  # prefix-LM: the image tokens attend to the prompt after them
    # Only tokens with token_type_ids == 1 (the "suffix") are causal; an answer appended with
    # the prefix's 0 would let every answer token see the answer tokens after it, so its
    # log-likelihood would be meaningless.
    answer_token_type = 1


register_overrides("gemma3", Gemma3Overrides)
register_overrides("paligemma", PaliGemmaOverrides)
