"""Pictures of a downstream head's output: the saliency map from the original tokens beside the
map from the compressed ones, so a person sees what the task lost."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .overlay import DEFAULT_DISPLAY, Array, _base, _lut, font, to_numpy

CAPTION_PX = 26


def saliency_overlay(image: Image.Image, saliency: Array, alpha: float = 0.6,
                     display: int | None = DEFAULT_DISPLAY, cmap: str = "inferno") -> Image.Image:
    """A saliency map [H, W] in [0, 1] (any resolution) coloured and blended over the image.

    The map is resized to the picture bilinearly and coloured on its own
    absolute scale (0 -> the colormap's low end, 1 -> its high end), so two
    maps drawn this way can be compared by eye. Returns an RGB image whose
    longest side is ``display``.
    """
    base = _base(image, display)
    m = np.clip(to_numpy(saliency).astype(np.float32), 0.0, 1.0)
    idx = Image.fromarray(np.round(m * 255).astype(np.uint8), mode="L").resize(base.size, Image.BILINEAR)
    colour = Image.frombytes("P", base.size, idx.tobytes())
    colour.putpalette(_lut(cmap).tobytes())
    return Image.blend(base, colour.convert("RGB"), alpha)


def saliency_pair(image: Image.Image, original: Array, compressed: Array, caption: str = "",
                  display: int = DEFAULT_DISPLAY // 2, gap: int = 6,
                  background=(24, 24, 24)) -> Image.Image:
    """Two saliency overlays side by side -- "original tokens" | "compressed tokens" -- with captions.

    Each panel's longest side is ``display``; ``caption`` (e.g. the
    agreement numbers) follows the compressed one's title. The titles run
    under the panels: an image box in the app lays its label over the
    picture's top-left corner and its buttons over the top-right, which hid
    titles drawn above the panels (the page read "CC 0" for "CC 0.999").
    """
    left = saliency_overlay(image, original, display=display)
    right = saliency_overlay(image, compressed, display=display)
    w, h = left.size
    out = Image.new("RGB", (2 * w + 3 * gap, h + CAPTION_PX + 2 * gap), background)
    draw = ImageDraw.Draw(out)
    f = font(14)
    for i, (title, img) in enumerate((("original tokens", left), ("compressed tokens", right))):
        x = gap + i * (w + gap)
        out.paste(img, (x, gap))
        text = title if i == 0 or not caption else f"{title}: {caption}"
        draw.text((x + 4, gap + h + 4), text, fill=(240, 240, 240), font=f)
    return out
