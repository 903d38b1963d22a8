"""LLaVA-1.5, LLaVA-NeXT (any-res) and LLaVA-OneVision (any-res with shrinking)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import ArchOverrides, ImageContext, TokenLayout, _coarse_to_fine, _layout, _row_major, _square_side, register_overrides, unknown_layout


class LlavaOverrides(ArchOverrides):
    """LLaVA-1.5: CLIP patches h x w (+ CLS dropped by the "default" strategy), 1:1 projector."""

    truncate_after_image = True

    def layout(self, ctx):
        # LLaVA's processor always gives the tower a square input (resize + centre crop) and
        # the projector maps patches 1:1, so n tokens form a sqrt(n) x sqrt(n) grid, whatever
        # size the vision config was saved with (embedlens-mini: DINOv2 saved at 518 px, run at 112).
        side = _square_side(ctx.n_tokens)
        if side is None:
            return unknown_layout(ctx.n_tokens, note=f"llava: {ctx.n_tokens} visual tokens are not a square grid")
        return _layout(side, side)

    def vision_to_llm(self, ctx, n_vtok):
        n = ctx.n_tokens
        strategy = getattr(ctx.config, "vision_feature_select_strategy", "default")
        offset = n_vtok - n  # 1 with CLS and "default", 0 for "full"
        if strategy == "default" and offset == 1 or offset == 0:
            return (np.arange(n_vtok) - offset).astype(np.int32)
        return None


    def projector_input(self, model, pixel_values):
        """Vision features exactly as ``LlavaModel.get_image_features`` selects them before
        its projector: the tower's ``hidden_states`` at ``vision_feature_layer`` (one index
        or a list, concatenated on the feature axis), CLS dropped by the "default" strategy."""
        from embedlens.models.parts import vision_tower_of

        cfg = model.config
        layer = cfg.vision_feature_layer
        out = vision_tower_of(model)(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [layer] if isinstance(layer, int) else list(layer)
        hs = [out.hidden_states[i] for i in layers]
        if cfg.vision_feature_select_strategy == "default":
            hs = [h[:, 1:] for h in hs]
        return torch.cat(hs, dim=-1)


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
        # the grid of the crop tokens the LLM sees (LLaVA-OneVision may shrink it)
        geo["grid_h"], geo["grid_w"] = geo["cur_h"], geo["cur_w"]
        ctx.extra["geometry"] = geo
        return geo

    def layout(self, ctx):
        g = self._geometry(ctx)
        side, cur_h, cur_w = g["side"], g["grid_h"], g["grid_w"]
        n_base, n_hr = side * side, cur_h * (cur_w + 1)
        if ctx.n_tokens != n_base + n_hr:
            raise ValueError(
                f"{type(self).__name__} layout: expected {n_base} + {n_hr} visual tokens, found {ctx.n_tokens}"
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
            note=self._note(g),
        )

    def _note(self, g: dict) -> str:
        return ("llava-next any-res: grid = unpadded crop grid; base view mapped to the cell "
                "under its centre; row separators have patch -1")

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


class LlavaOnevisionOverrides(LlavaNextOverrides):
    """LLaVA-OneVision, one image per prompt: LLaVA-NeXT's any-res (base view, then the unpadded
    crop grid with ``image_newline`` ending each row; same crop count, unpadding and order), and
    one rule of its own (``pack_image_features``): when the unpadded crop grid holds more than
    ~1.1^2 x N crops' worth of tokens ("anyres_max_N", config.vision_aspect_ratio), the model
    shrinks it bilinearly to ``int(h // ratio) x int(w // ratio)`` before adding the newlines.

    Grid = the crop-token grid the LLM sees (the shrunk one where it was shrunk). Where it was
    shrunk, every LLM crop token is a bilinear mix of up to 2 x 2 vision tokens and a vision
    token feeds up to 2 x 2 LLM tokens, so no one-LLM-token-per-vision-token map exists:
    `vision_to_llm` is None for those images (the layout is still exact).

    Several images in one prompt (or video) take another path (base view + one newline, no
    crops); the adapter always puts one image in a prompt.
    """

    def _geometry(self, ctx: ImageContext) -> dict:
        geo = super()._geometry(ctx)
        if "shrunk" not in geo:
            side = geo["side"]
            aspect = getattr(ctx.config, "vision_aspect_ratio", None) or "anyres_max_9"
            # the model's own expressions (pack_image_features), for identical rounding
            max_num_patches = int(aspect.strip("anyres_max_"))
            ratio = math.sqrt(geo["cur_h"] * geo["cur_w"] / (max_num_patches * side**2))
            geo["shrunk"] = ratio > 1.1
            if geo["shrunk"]:
                geo["grid_h"], geo["grid_w"] = int(geo["cur_h"] // ratio), int(geo["cur_w"] // ratio)
        return geo

    def _note(self, g: dict) -> str:
        note = "llava-onevision any-res: grid = crop-token grid; base view mapped to the cell under its centre; " \
               "row separators have patch -1"
        if g["shrunk"]:
            note += (f"; the unpadded {g['cur_h']}x{g['cur_w']} crop grid was shrunk bilinearly to "
                     f"{g['grid_h']}x{g['grid_w']} (vision_to_llm unknown)")
        return note

    def vision_to_llm(self, ctx, n_vtok):
        if self._geometry(ctx)["shrunk"]:
            return None
        return super().vision_to_llm(ctx, n_vtok)


register_overrides("llava", LlavaOverrides)
register_overrides("llava_next", LlavaNextOverrides)
register_overrides("llava_onevision", LlavaOnevisionOverrides)
