"""Turning whatever the user hands us into an RGB ``PIL.Image``, and sizing the patch grid.

``load_image`` is the door for untrusted input (uploads, API calls): it
checks the size in bytes, the format, the pixel count (before decoding) and
that the whole image decodes, and raises ``ImageError`` naming the problem.
``to_rgb`` converts an image already in memory.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ._checks import check_int

# Raster formats we decode. Others Pillow knows (EPS runs Ghostscript, PSD, FITS, ...)
# are refused: less parser surface for files from strangers.
# (JPEG covers MPO, the multi-picture JPEG many phones write.)
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "ICO", "PPM")
_FORMAT_NAMES = "PNG, JPEG, GIF, WebP, BMP or TIFF"
_MAGIC = {  # how a file of a format we read begins: a file that does but will not open is broken
    b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
    b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
}
_OPEN_LOCK = threading.Lock()


class ImageError(ValueError):
    """An input that is not a usable image; the message names the problem and what to do."""


def _formats() -> list[str]:
    """``FORMATS`` that this Pillow build can read (AVIF, for one, is optional)."""
    Image.init()
    return [f for f in FORMATS if f in Image.OPEN]


def _mb(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MB"
    return f"{n / 2**10:.1f} KB" if n >= 2**10 else f"{n} bytes"


def _read_bytes(source, max_bytes: int) -> bytes:
    """The bytes of a path, bytes-like or binary file-like ``source``, at most ``max_bytes``."""
    too_big = (f"the file is too large: {{size}}, the limit is {_mb(max_bytes)}; "
               "upload a smaller or more compressed image")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ImageError(f"no image file at {path!r}: check the path")
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ImageError(too_big.format(size=_mb(size)))
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
        if isinstance(data, str):
            raise ImageError("the file was opened in text mode: open it with 'rb' (binary)")
        if len(data) > max_bytes:
            raise ImageError(too_big.format(size=f"more than {_mb(max_bytes)}"))
    else:
        raise ImageError(
            f"expected an image file path, bytes, a binary file, a PIL image or a numpy array; "
            f"got {type(source).__name__}"
        )
    if len(data) > max_bytes:
        raise ImageError(too_big.format(size=_mb(len(data))))
    if not data:
        raise ImageError(f"the file is empty (0 bytes): upload a {_FORMAT_NAMES} image")
    return data


def _not_an_image(data: bytes) -> ImageError:
    """The most specific "not an image" message we can give for ``data``."""
    upload = f"upload a {_FORMAT_NAMES} image"
    for magic, fmt in _MAGIC.items():
        if data.startswith(magic):
            return ImageError(f"the {fmt} file is truncated or corrupt and cannot be read "
                              f"({len(data)} bytes); re-save or re-export it and upload it again")
    head = data[:1024]
    if head.lstrip().startswith(b"%PDF"):
        return ImageError(f"not an image: this is a PDF document; export the page as PNG or "
                          f"JPEG and upload that ({_FORMAT_NAMES})")
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftyphevc"):
        return ImageError(f"HEIC/HEIF images are not supported: convert it to JPEG or PNG "
                          f"({_FORMAT_NAMES})")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at 1024 bytes is still text
        text = head[: exc.start].decode("utf-8") if exc.start > len(head) - 4 else None
    if text is not None and all(c.isprintable() or c in "\t\r\n\f" for c in text):
        if "<svg" in text[:1024].lower():
            return ImageError(f"not a raster image: SVG is a vector format; export it as PNG "
                              f"and upload that ({_FORMAT_NAMES})")
        start = " ".join(text.split())[:40]
        return ImageError(f"not an image: the file is text (it begins {start!r}); {upload}")
    return ImageError(f"not an image: the data is not in any supported image format; {upload}")


def _mp(pixels: float) -> str:
    """Megapixels, readable at both ends: "4,294.8", "0.0061"."""
    return f"{pixels / 1e6:,.1f}" if pixels >= 100_000 else f"{pixels / 1e6:.2g}"


def _too_many_pixels(what: str, max_pixels: int) -> ImageError:
    return ImageError(
        f"the image is too large: {what} megapixels, the limit is {_mp(max_pixels)} megapixels "
        "(a huge scan, or a decompression bomb: a small file that expands to an enormous image); "
        "downscale it and upload it again"
    )


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise _too_many_pixels(f"{width} x {height} = {_mp(width * height)}", max_pixels)


def load_image(source, max_pixels: int = 40_000_000, max_bytes: int = 25 * 2**20) -> Image.Image:
    """An RGB ``PIL.Image`` from an untrusted ``source``, or ``ImageError`` saying what is wrong.

    ``source``: a file path, bytes, or a binary file-like object (read up to
    ``max_bytes`` + 1 bytes); a PIL image or a numpy array is checked for
    ``max_pixels`` and converted by ``to_rgb``. Refused with ``ImageError``
    (a ``ValueError``): an empty file, more than ``max_bytes``, anything
    that is not a PNG, JPEG, GIF, WebP, AVIF, BMP, TIFF, ICO or PPM image
    (text, PDF, random bytes ...), more than ``max_pixels`` pixels (checked
    from the header, before any pixel is decoded: a decompression bomb never
    gets its memory), and a truncated or corrupt file (the image is fully
    decoded here, so broken data fails now rather than later). Pillow's own
    bomb limit is ours to set: its warning is silenced (our limit applies) and
    its error (past 2x ``Image.MAX_IMAGE_PIXELS``) becomes ``ImageError``.
    Animated images give their first frame; EXIF orientation is applied.
    """
    max_pixels = check_int("max_pixels", max_pixels, 1)
    max_bytes = check_int("max_bytes", max_bytes, 1)
    if isinstance(source, np.ndarray):
        if source.ndim >= 2:
            _check_pixels(source.shape[1], source.shape[0], max_pixels)
        return _rgb(source, "")
    if isinstance(source, Image.Image):
        image = source
    else:
        data = _read_bytes(source, max_bytes)
        try:
            # The lock keeps concurrent catch_warnings blocks from restoring each other's filters.
            with _OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=_formats())
        except Image.DecompressionBombError as exc:  # Pillow's hard limit, past ours
            claimed = re.search(r"\((\d+) pixels\)", str(exc))
            what = _mp(int(claimed[1])) if claimed else "far more than"
            raise _too_many_pixels(what, max_pixels) from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _not_an_image(data) from exc
    _check_pixels(image.width, image.height, max_pixels)
    corrupt = (f"the {getattr(image, 'format', None) or 'image'} file is truncated or corrupt "
               "and cannot be decoded ({}); re-save or re-export it and upload it again")
    try:
        image.load()  # the full decode: truncation and corrupt data show up here, not later
    except Image.DecompressionBombError as exc:
        raise ImageError(f"the image is too large to decode safely ({exc}); downscale it") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(corrupt.format(exc)) from exc
    _check_pixels(image.width, image.height, max_pixels)  # a GIF frame may grow the canvas
    return _rgb(image, corrupt)


def _rgb(image, corrupt: str) -> Image.Image:
    """``to_rgb`` with its errors as ``ImageError``; ``corrupt`` words a decode failure."""
    try:
        return to_rgb(image)
    except ImageError:
        raise
    except ValueError as exc:
        raise ImageError(str(exc)) from exc
    except (OSError, SyntaxError, EOFError) as exc:  # e.g. a broken second GIF frame
        raise ImageError(corrupt.format(exc) if corrupt else str(exc)) from exc


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
