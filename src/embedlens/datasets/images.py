"""Robust image reading: every odd-but-valid image becomes an upright RGB image,
every unreadable one raises :class:`BadImageError` naming the file and the reason.

Conversions (applied after EXIF rotation, on the first frame of animated files):

- ``RGB`` unchanged; ``1``, ``L``, ``P`` (opaque), ``CMYK``, ``YCbCr`` via Pillow's
  ``convert("RGB")``;
- anything with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index,
  premultiplied ``RGBa``/``La``) is composited on white, the colour a viewer shows it on;
- 16/32-bit integer grey (``I;16*``, ``I``) is scaled from the 16-bit range 0..65535 to
  0..255 (``I`` is what Pillow uses for 16-bit PNG/TIFF data; values are clipped);
- 32-bit float grey (``F``): taken as 0..1 when all values lie within it, else as 0..255,
  clipped.

Size policy: there is no minimum size. A 1 x 1 image is valid; the model's processor
resizes whatever it gets, so rejecting small images here would only lose data. There is
a maximum (``max_pixels``, Pillow's default of ~89.5 M pixels): larger images, which are
usually decompression bombs, are rejected *before* their pixels are decoded.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

#: Pillow's own default limit (``Image.MAX_IMAGE_PIXELS``): 1024 * 1024 * 1024 // 4 // 3.
DEFAULT_MAX_PIXELS = 89_478_485

# Pillow's bomb check reads the global Image.MAX_IMAGE_PIXELS inside Image.open; the
# lock keeps our temporary change of it from racing with another thread's open
# (other threads' opens elsewhere in the process are not covered; we hold it briefly).
_PIL_GLOBALS_LOCK = threading.Lock()


class BadImageError(Exception):
    """An image that cannot be used: ``path`` names the file, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(str(path), reason)  # args kept simple so the error pickles
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _open_header(path: Path) -> Image.Image:
    """``Image.open`` (reads the header only) with Pillow's own bomb check off.

    The size limit is enforced by :func:`load_rgb` right after this, with *our*
    ``max_pixels`` and one clear message; Pillow's check would apply its global limit
    (and only warn between 1x and 2x of it).
    """
    with _PIL_GLOBALS_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _load_strict(im: Image.Image) -> None:
    """``im.load()`` with truncated files refused, whatever Pillow's process-global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` says: lmms-eval sets it to True on import (its
    ``api/task.py``), which would let a truncated file through as half-grey pixels."""
    with _PIL_GLOBALS_LOCK:
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.float64)
        a = np.clip(a, 0, 65535) / 257.0  # 65535 -> 255 exactly
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im).astype(np.float64)
        finite = a[np.isfinite(a)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            a = a * 255.0
        a = np.nan_to_num(np.clip(a, 0, 255), nan=0.0)
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    # 1, L, P, CMYK, YCbCr, LAB, HSV, I;16 variants Pillow can convert itself.
    return im.convert("RGB")


def load_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read ``path`` as an upright RGB image (fully decoded, file closed).

    Raises :class:`BadImageError` for a missing, empty, truncated or non-image file, an
    image Pillow cannot convert, or one with more than ``max_pixels`` pixels
    (``None`` = no limit; only for trusted files).
    """
    p = Path(path)
    if not p.exists():
        raise BadImageError(p, "file does not exist")
    if p.is_dir():
        raise BadImageError(p, "is a directory, not an image file")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise BadImageError(p, f"cannot read file ({e.strerror or e})") from e
    if size == 0:
        raise BadImageError(p, "empty file (0 bytes)")

    try:
        im = _open_header(p)
    except UnidentifiedImageError as e:
        raise BadImageError(p, "not an image format Pillow can read (wrong extension or not an image)") from e
    except OSError as e:
        raise BadImageError(p, f"cannot open image ({e})") from e
    except Exception as e:  # corrupt headers surface as SyntaxError, ValueError, struct.error...
        raise BadImageError(p, f"corrupt image header ({type(e).__name__}: {e})") from e

    try:
        with im:
            w, h = im.size
            # Before any pixel is decoded: a bomb is a tiny file claiming a huge size.
            if max_pixels is not None and w * h > max_pixels:
                raise BadImageError(
                    p,
                    f"possible decompression bomb: {w}x{h} = {w * h} pixels exceeds "
                    f"max_pixels={max_pixels}. Raise max_pixels only if the file is trusted.",
                )
            if w < 1 or h < 1:
                raise BadImageError(p, f"image has no pixels ({w}x{h})")
            # Animated GIF/WebP/APNG and multi-page TIFF: the first frame (the one a
            # thumbnail shows). Image.open already sits on it; seek(0) is explicit.
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            _load_strict(im)  # decode now, inside the try: truncation shows up here
            # EXIF orientation (phone photos): rotate the pixels upright. A broken
            # EXIF block must not cost the image, so fall back to the raw orientation.
            try:
                upright = ImageOps.exif_transpose(im)
            except Exception:
                upright = im
            rgb = _to_rgb(upright)
    except BadImageError:
        raise
    except MemoryError:
        raise
    except OSError as e:
        msg = str(e)
        if "truncated" in msg.lower():
            raise BadImageError(p, f"truncated image file ({msg})") from e
        raise BadImageError(p, f"corrupt image data ({msg})") from e
    except Exception as e:
        raise BadImageError(p, f"cannot decode image ({type(e).__name__}: {e})") from e
    return rgb
