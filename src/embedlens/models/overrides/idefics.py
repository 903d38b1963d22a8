"""Idefics3 / SmolVLM (tiles + global view, pixel shuffle)."""

from __future__ import annotations

import re

import numpy as np
import torch

from .base import ArchOverrides, TokenLayout, _coarse_to_fine, _layout, _row_major, _square_side, register_overrides


_ROW_COL = re.compile(r"<row_(\d+)_col_(\d+)>")


class Idefics3Overrides(ArchOverrides):
    """Idefics3 / SmolVLM: image split into rows x cols tiles plus a global view (the last
    block), each tile s x s tokens after the pixel shuffle. Grid = all tiles side by side."""

    truncate_after_image = True

    def _tiles(self, ctx) -> tuple[int, int, int]:
        seq = int(getattr(ctx.processor, "image_seq_len", 0)) or None
        if seq is None or ctx.n_tokens % seq:
            raise ValueError(f"Idefics3 layout: {ctx.n_tokens} visual tokens, image_seq_len {seq}")
        n_blocks = ctx.n_tokens // seq
        rows = cols = 0
        if n_blocks > 1:
            # the prompt names every tile "<row_i_col_j>" (the image processor's rows/cols are
            # dropped by the processor); read the largest i, j of this image's span
            lo, hi = int(ctx.positions.min()), int(ctx.positions.max())
            toks = ctx.processor.tokenizer.convert_ids_to_tokens(ctx.input_ids[max(lo - 3, 0) : hi + 1].tolist())
            for tok in toks:
                m = _ROW_COL.fullmatch(str(tok))
                if m:
                    rows, cols = max(rows, int(m.group(1))), max(cols, int(m.group(2)))
            if rows * cols != n_blocks - 1:
                raise ValueError(f"Idefics3 layout: tile tags give {rows}x{cols}, expected {n_blocks - 1} tiles")
        return seq, rows, cols

    def layout(self, ctx):
        seq, rows, cols = self._tiles(ctx)
        s = _square_side(seq)
        if s is None:
            return super().layout(ctx)
        if rows == 0:
            return _layout(s, s)
        R, C = rows * s, cols * s
        pr, pc, views = [], [], []
        tr, tc = _row_major(s, s)
        for k in range(rows * cols):
            kr, kc = divmod(k, cols)
            pr.append(kr * s + tr)
            pc.append(kc * s + tc)
            views.append(np.ones(seq, np.int8))
        gr, gc = _coarse_to_fine(tr, tc, (s, s), (R, C))
        pr.append(gr)
        pc.append(gc)
        views.append(np.zeros(seq, np.int8))
        return TokenLayout(
            (R, C),
            np.concatenate(pr).astype(np.int32),
            np.concatenate(pc).astype(np.int32),
            np.concatenate(views),
            note="idefics3: grid = tiles side by side; global view mapped to the cell under its centre",
        )

    def split_vision(self, hidden, inputs, config, n_images):
        # Padding tiles (all-zero pixels) are removed by the model before the vision encoder.
        pv = inputs["pixel_values"]
        real = (pv != 0).flatten(2).any(-1)  # (batch, max_tiles)
        counts = [int(v) for v in real.sum(1).tolist()]
        if hidden.dim() != 3 or hidden.shape[0] != sum(counts):
            raise ValueError(f"Idefics3: vision output {tuple(hidden.shape)} does not match tiles {counts}")
        return [h.reshape(-1, h.shape[-1]) for h in torch.split(hidden, counts, dim=0)]

    def vision_to_llm(self, ctx, n_vtok):
        seq = int(getattr(ctx.processor, "image_seq_len", 0))
        n_blocks = ctx.n_tokens // seq if seq else 0
        if not n_blocks or n_vtok % n_blocks:
            return None
        per_tile = n_vtok // n_blocks
        p, s = _square_side(per_tile), _square_side(seq)
        if p is None or s is None or p % s:
            return None
        k = p // s
        r, c = _row_major(p, p)
        local = (r // k) * s + c // k
        return np.concatenate([b * seq + local for b in range(n_blocks)]).astype(np.int32)


register_overrides("idefics3", Idefics3Overrides)
register_overrides("smolvlm", Idefics3Overrides)
