"""Turning whatever the user hands us into an RGB ``PIL.Image``, and sizing the patch grid."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageOps

from ._checks import check_int


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(
            f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {tuple(arr.shape)}"
        )
    if arr.size == 0:
        raise ValueError("image array is empty")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("image array contains NaN or infinite values")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        arr = (arr * scale).clip(0, 255).round().astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.clip(0, 255).astype(np.uint8)
    else:
        raise ValueError(f"unsupported image array dtype {arr.dtype}")
    mode = "L" if arr.ndim == 2 else {3: "RGB", 4: "RGBA"}[arr.shape[2]]
    return Image.fromarray(arr, mode=mode)


def to_rgb(image) -> Image.Image:
    """An RGB ``PIL.Image`` from a PIL image or numpy array in any common mode.

    EXIF orientation is applied; transparency is composited onto white;
    16-bit and 32-bit grey levels are scaled to 8 bits; CMYK, palette and
    grey images are converted; an animated image gives its first frame.
    """
    if isinstance(image, np.ndarray):
        image = _from_array(image)
        return _flatten_alpha(image) if image.mode == "RGBA" else image.convert("RGB")
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if getattr(image, "is_animated", False):
        image.seek(0)
    image = ImageOps.exif_transpose(image) or image
    if image.width < 1 or image.height < 1:
        raise ValueError("image has no pixels")
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max(initial=0.0)
        if top > 255:
            arr = arr / (257.0 if top <= 65535 else top / 255.0)
        return Image.fromarray(arr.clip(0, 255).round().astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in image.info
    ):
        return _flatten_alpha(image.convert("RGBA"))
    return image.convert("RGB")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def grid_for(width: int, height: int, size: int, patch: int, keep_aspect: bool) -> tuple[int, int]:
    """The (gh, gw) patch grid for an image of ``width`` x ``height`` at ``size`` px.

    Square by default: a (size // patch)^2 grid (``size`` rounded to a
    multiple of the patch, at least one patch). With ``keep_aspect`` the grid
    keeps the image's aspect ratio for about the same token count, as
    LLaVA-UHD does; each side has at least one patch, so a 1 x 4000 image at
    336 px gives a 1 x 576 grid.
    """
    size = check_int("size", size, 1)
    side = max(1, round(size / patch))
    if not keep_aspect:
        return side, side
    n = side * side
    aspect = width / height
    gh = max(1, min(n, round(math.sqrt(n / aspect))))
    gw = max(1, round(n / gh))
    return gh, gw
