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
  tokens may feed the same LLM token (merging/pooling/pixel-shuffle).
* Vision layer `k` follows HF's vision `hidden_states` order: 0 = the input of the first
  encoder layer (embeddings, after any pre-norm), k = output of encoder layer k (before any
  post-norm or merger).
"""

from __future__ import annotations

import math
import re
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

    def layout(self, ctx: ImageContext) -> TokenLayout:
        n = ctx.n_tokens
        side = _square_side(n)
        if side is not None:
            return _layout(side, side)
        # Unknown non-square layout: one row, in sequence order (documented limitation).
        return _layout(1, n, note="grid unknown for this architecture: tokens laid out as one row")

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


# --------------------------------------------------------------------------- LLaVA family


class LlavaOverrides(ArchOverrides):
    """LLaVA-1.5: CLIP patches h x w (+ CLS dropped by the "default" strategy), 1:1 projector."""

    truncate_after_image = True

    def vision_to_llm(self, ctx, n_vtok):
        n = ctx.n_tokens
        strategy = getattr(ctx.config, "vision_feature_select_strategy", "default")
        offset = n_vtok - n  # 1 with CLS and "default", 0 for "full"
        if strategy == "default" and offset == 1 or offset == 0:
            return (np.arange(n_vtok) - offset).astype(np.int32)
        return None


class LlavaNextOverrides(ArchOverrides):
    """LLaVA-NeXT any-res: base view (h x w) then the unpadded crop grid with a separator
    (``image_newline``) ending each row. Grid = the unpadded crop grid (the finest view)."""

    truncate_after_image = True

    def _geometry(self, ctx: ImageContext) -> dict:
        if "geometry" in ctx.extra:
            return ctx.extra["geometry"]
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        cfg = ctx.config
        image_size = cfg.vision_config.image_size
        side = image_size // cfg.vision_config.patch_size
        orig = [int(v) for v in ctx.inputs["image_sizes"][ctx.image_index].tolist()]
        nph, npw = get_anyres_image_grid_shape(orig, cfg.image_grid_pinpoints, image_size)
        # Run the model's own unpad on an index map to learn which crop-grid rows and
        # columns survive (identical rounding to the model).
        rows_idx = torch.arange(nph * side).view(1, -1, 1).expand(1, nph * side, npw * side)
        cols_idx = torch.arange(npw * side).view(1, 1, -1).expand(1, nph * side, npw * side)
        kept_r = unpad_image(rows_idx, orig)[0, :, 0]
        kept_c = unpad_image(cols_idx, orig)[0, 0, :]
        geo = dict(
            side=side,
            nph=nph,
            npw=npw,
            r0=int(kept_r[0]),
            c0=int(kept_c[0]),
            cur_h=int(kept_r.numel()),
            cur_w=int(kept_c.numel()),
            n_crops=1 + nph * npw,
        )
        ctx.extra["geometry"] = geo
        return geo

    def layout(self, ctx):
        g = self._geometry(ctx)
        side, cur_h, cur_w = g["side"], g["cur_h"], g["cur_w"]
        n_base, n_hr = side * side, cur_h * (cur_w + 1)
        if ctx.n_tokens != n_base + n_hr:
            raise ValueError(
                f"LLaVA-NeXT layout: expected {n_base} + {n_hr} visual tokens, found {ctx.n_tokens}"
            )
        br, bc = _row_major(side, side)
        br, bc = _coarse_to_fine(br, bc, (side, side), (cur_h, cur_w))
        hr_r, hr_c = _row_major(cur_h, cur_w + 1)
        sep = hr_c == cur_w
        hr_r, hr_c = hr_r.copy(), hr_c.copy()
        hr_r[sep], hr_c[sep] = -1, -1
        view = np.concatenate([np.zeros(n_base, np.int8), np.where(sep, -1, 1).astype(np.int8)])
        return TokenLayout(
            (cur_h, cur_w),
            np.concatenate([br, hr_r]).astype(np.int32),
            np.concatenate([bc, hr_c]).astype(np.int32),
            view,
            note="llava-next any-res: grid = unpadded crop grid; base view mapped to the cell "
            "under its centre; row separators have patch -1",
        )

    def split_vision(self, hidden, inputs, config, n_images):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        counts = [
            image_size_to_num_patches(
                image_size=[int(v) for v in s.tolist()],
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
            for s in inputs["image_sizes"]
        ]
        if hidden.dim() != 3 or hidden.shape[0] != sum(counts):
            raise ValueError(f"LLaVA-NeXT: vision output {tuple(hidden.shape)} does not match crops {counts}")
        return [h.reshape(-1, h.shape[-1]) for h in torch.split(hidden, counts, dim=0)]

    def vision_to_llm(self, ctx, n_vtok):
        g = self._geometry(ctx)
        side, n_crops = g["side"], g["n_crops"]
        per_crop = n_vtok // n_crops
        offset = per_crop - side * side  # CLS tokens per crop (1 for CLIP "default")
        if per_crop * n_crops != n_vtok or offset not in (0, 1):
            return None
        out = np.full(n_vtok, -1, np.int32)
        pr, pc = _row_major(side, side)
        n_base = side * side
        out[offset:per_crop] = np.arange(n_base)  # crop 0 = base view
        for k in range(1, n_crops):
            kr, kc = divmod(k - 1, g["npw"])
            fr, fc = kr * side + pr - g["r0"], kc * side + pc - g["c0"]
            ok = (fr >= 0) & (fr < g["cur_h"]) & (fc >= 0) & (fc < g["cur_w"])
            llm = np.where(ok, n_base + fr * (g["cur_w"] + 1) + fc, -1)
            out[k * per_crop + offset : (k + 1) * per_crop] = llm
        return out


# --------------------------------------------------------------------------- Qwen2-VL family


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


# --------------------------------------------------------------------------- Gemma 3


class Gemma3Overrides(ArchOverrides):
    """Gemma 3: SigLIP p x p patches average-pooled to sqrt(mm_tokens_per_image)^2 soft tokens.
    Pan-and-scan crops (off by default) add further image blocks, laid out as one row each."""

    truncate_after_image = True

    def vision_to_llm(self, ctx, n_vtok):
        per_side = _square_side(int(ctx.config.mm_tokens_per_image))
        p = _square_side(n_vtok)
        if per_side is None or p is None or ctx.n_tokens != per_side * per_side or p % per_side:
            return None
        k = p // per_side
        r, c = _row_major(p, p)
        return ((r // k) * per_side + c // k).astype(np.int32)


# --------------------------------------------------------------------------- Idefics3 / SmolVLM


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


# --------------------------------------------------------------------------- PaliGemma


class PaliGemmaOverrides(ArchOverrides):
    """PaliGemma: fixed square SigLIP grid, image tokens first; no chat template — the
    processor itself appends BOS after the image tokens and a newline after the prompt."""

    placeholder = "{image}{prompt}"
    truncate_after_image = False  # prefix-LM: the image tokens attend to the prompt after them


_REGISTRY: dict[str, ArchOverrides] = {
    "llava": LlavaOverrides(),
    "llava_next": LlavaNextOverrides(),
    "qwen2_vl": Qwen2VLOverrides(),
    "qwen2_5_vl": Qwen25VLOverrides(),
    "gemma3": Gemma3Overrides(),
    "idefics3": Idefics3Overrides(),
    "smolvlm": Idefics3Overrides(),
    "paligemma": PaliGemmaOverrides(),
}
_GENERIC = ArchOverrides()


def get_overrides(model_type: str) -> ArchOverrides:
    """The overrides for `model_type` (a config's `model_type`), or the generic defaults."""
    return _REGISTRY.get(model_type, _GENERIC)


def known_architectures() -> list[str]:
    return sorted(_REGISTRY)
