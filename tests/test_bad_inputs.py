"""Bad input gets a clear message: knob values every strategy refuses, and image files.

Every file here is made in the test itself (PIL or raw bytes). Each bad one
must raise ``ImageError`` (a ``ValueError``) whose message names the problem;
each unusual-but-valid one must load and encode with the bundled encoder.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import make_encoding
from PIL import Image

import compress as C
from compress import Encoder, ImageError, load_image
from compress.encoder import MAX_SIZE

NAN = float("nan")


@pytest.fixture(scope="module")
def enc():
    """A 4 x 4 grid, 8-dim tokens, one CLS token, one head: every strategy runs on it."""
    torch.manual_seed(0)
    return make_encoding(torch.randn(16, 8), (4, 4), cls_attn=torch.rand(16).softmax(0), num_prefix=1)


# --- knobs: every public strategy refuses bad values with a ValueError naming them ----------

BAD_KNOBS = {
    "threshold NaN": (lambda e: C.merge_threshold(e, NAN), "threshold must be finite"),
    "threshold inf": (lambda e: C.merge_threshold(e, math.inf), "threshold must be finite"),
    "threshold text": (lambda e: C.merge_threshold(e, "0.9"), "threshold must be a number"),
    "connectivity 6": (lambda e: C.merge_threshold(e, 0.9, connectivity=6), "connectivity must be one of"),
    "ToMe target 0": (lambda e: C.merge_bipartite(e, target=0), "target must be between 1 and 16"),
    "ToMe target > N": (lambda e: C.merge_bipartite(e, target=17), "target must be between 1 and 16"),
    "ToMe target 2.5": (lambda e: C.merge_bipartite(e, target=2.5), "target must be a whole number"),
    "ToMe r < 0": (lambda e: C.merge_bipartite(e, r=-1), "r must be between 0"),
    "ToMe no budget": (lambda e: C.merge_bipartite(e), "needs a token budget"),
    "ToMe unknown metric": (lambda e: C.merge_bipartite(e, target=4, metric="cosine"),
                            "metric must be one of 'keys', 'tokens'"),
    "keep ratio < 0": (lambda e: C.prune_attention(e, -0.1), "keep_ratio must be between 0.0 and 1.0"),
    "keep ratio > 1": (lambda e: C.prune_attention(e, 1.5), "keep_ratio must be between 0.0 and 1.0"),
    "keep ratio NaN": (lambda e: C.prune_attention(e, NAN), "keep_ratio must be finite"),
    "unknown score": (lambda e: C.prune_attention(e, 0.5, score="entropy"),
                      "score must be one of 'cls', 'received', 'query'"),
    "head out of range": (lambda e: C.prune_attention(e, 0.5, head=5), "head must be between 0 and 0"),
    "query missing": (lambda e: C.prune_attention(e, 0.5, score="query"), "needs a query patch"),
    "query index outside": (lambda e: C.prune_attention(e, 0.5, score="query", query=16),
                            "query must be between 0 and 15"),
    "query row outside": (lambda e: C.prune_attention(e, 0.5, score="query", query=(4, 0)),
                          "query row must be between 0 and 3"),
    "query col negative": (lambda e: C.prune_attention(e, 0.5, score="query", query=(0, -1)),
                           "query col must be between 0 and 3"),
    "query not a pair": (lambda e: C.prune_attention(e, 0.5, score="query", query=(1, 2, 3)),
                         "query must be a patch index or \\(row, col\\)"),
    "scores unknown": (lambda e: C.attention_scores(e, "foo"), "score must be one of"),
    "latents 0": (lambda e: C.resample(e, 0, heads=1), "num_latents must be at least 1"),
    "latents < 0": (lambda e: C.resample(e, -3, heads=1), "num_latents must be at least 1"),
    "latents NaN": (lambda e: C.resample(e, NAN, heads=1), "num_latents must be a whole number"),
    "depth 0": (lambda e: C.resample(e, 4, depth=0, heads=1), "depth must be between 1 and 12"),
    "unknown init": (lambda e: C.resample(e, 4, init="zeros", heads=1),
                     "init must be one of 'random', 'kmeans', 'fit'"),
    "heads not dividing": (lambda e: C.resample(e, 4, heads=3), "heads must divide the token width 8"),
    "steps < 0": (lambda e: C.resample(e, 4, heads=1, init="fit", steps=-1), "steps must be between"),
    "lr NaN": (lambda e: C.resample(e, 4, heads=1, lr=NAN), "lr must be finite"),
    "PruMerge attention": (lambda e: C.prumerge(e, attention="max"), "attention must be one of"),
    "PruMerge neighbours": (lambda e: C.prumerge(e, neighbours=-1), "neighbours must be at least 0"),
    "PruMerge plus not bool": (lambda e: C.prumerge(e, plus="yes"), "plus must be True or False"),
    "PruMerge+ ratio < 0": (lambda e: C.prumerge_plus(e, plus_ratio=-1), "plus_ratio must be between"),
    "VisionZip budget 0": (lambda e: C.visionzip(e, 0), "target must be between 1 and 16"),
    "VisionZip ratio > 1": (lambda e: C.visionzip(e, 4, dominant_ratio=1.5),
                            "dominant_ratio must be between 0.0 and 1.0"),
    "VisionZip score": (lambda e: C.visionzip(e, 4, score="query"), "score must be one of 'cls', 'received'"),
    "DivPrune budget 0": (lambda e: C.divprune(e, 0), "target must be between 1 and 16"),
    "DivPrune budget > N": (lambda e: C.divprune(e, 17), "target must be between 1 and 16"),
    "pool kernel 0": (lambda e: C.pool(e, 0), "kernel must be between 1 and 4"),
    "pool kernel triple": (lambda e: C.pool(e, (1, 2, 3)), "kernel must be an int k or a \\(kh, kw\\) pair"),
    "pool kernel > grid": (lambda e: C.pool(e, (5, 1)), "kernel height must be between 1 and 4"),
    "random budget 0": (lambda e: C.random_keep(e, 0), "target must be between 1 and 16"),
    "random seed < 0": (lambda e: C.random_keep(e, 2, seed=-1), "seed must be between 0"),
    "unknown strategy": (lambda e: C.run_at_budget("tome", e, 4),
                         "unknown strategy 'tome'; choose one of merge_threshold, "),
    "budget 0": (lambda e: C.run_at_budget("pool", e, 0), "budget must be between 1 and 16"),
    "budget > N": (lambda e: C.run_at_budget("divprune", e, 17), "budget must be between 1 and 16"),
}


@pytest.mark.parametrize("case", list(BAD_KNOBS))
def test_bad_knob_is_a_clear_value_error(enc, case):
    call, message = BAD_KNOBS[case]
    with pytest.raises(ValueError, match=message):
        call(enc)


@pytest.mark.parametrize("name", list(C.STRATEGIES))
def test_every_registered_strategy_refuses_a_bad_budget(enc, name):
    for budget in (0, -1, 17, NAN):
        with pytest.raises(ValueError, match="budget must be"):
            C.run_at_budget(name, enc, budget)


# Values at and beyond the ends that are defined (documented), not errors.
EDGE_KNOBS = {
    "threshold below -1 merges everything": (lambda e: C.merge_threshold(e, -5.0), 1),
    "threshold above 1 merges nothing": (lambda e: C.merge_threshold(e, 5.0), 16),
    "keep ratio 0 keeps one patch": (lambda e: C.prune_attention(e, 0.0), 1),
    "keep ratio 1 keeps all": (lambda e: C.prune_attention(e, 1.0), 16),
    "more latents than patches": (lambda e: C.resample(e, 40, heads=1), 40),
    "ToMe target N merges nothing": (lambda e: C.merge_bipartite(e, target=16), 16),
}


@pytest.mark.parametrize("case", list(EDGE_KNOBS))
def test_edge_knob_values_are_defined(enc, case):
    call, m = EDGE_KNOBS[case]
    out = call(enc)
    assert out.num_out == m
    assert torch.allclose(out.assign.sum(dim=1), torch.ones(m), atol=1e-5)


# Low-level helpers validate their arguments too.
LOW_LEVEL = {
    "kmeans k=0": lambda e: C.kmeans(e.tokens, 0),
    "kmeans k<0": lambda e: C.kmeans(e.tokens, -1),
    "PerceiverResampler latents=0": lambda e: C.PerceiverResampler(8, 0, heads=1),
    "PerceiverResampler depth<0": lambda e: C.PerceiverResampler(8, 2, depth=-1, heads=1),
    "PerceiverResampler heads=0": lambda e: C.PerceiverResampler(8, 2, heads=0),
}


@pytest.mark.parametrize("case", list(LOW_LEVEL))
def test_low_level_helpers_validate_too(enc, case):
    with pytest.raises(ValueError):
        LOW_LEVEL[case](enc)


ENCODER_KNOBS = {
    "size 0": (lambda en: en.encode(Image.new("RGB", (8, 8)), size=0), "size must be between 1 and"),
    "size too big": (lambda en: en.encode(Image.new("RGB", (8, 8)), size=MAX_SIZE + 1),
                     f"size must be between 1 and {MAX_SIZE}"),
    "size NaN": (lambda en: en.encode(Image.new("RGB", (8, 8)), size=NAN), "size must be a whole number"),
    "layer past the end": (lambda en: en.encode(Image.new("RGB", (8, 8)), size=56, layer=12),
                           "layer must be between -12 and 11"),
    "not an image object": (lambda en: en.encode("cat.jpg", size=56), "expected a PIL image"),
    "unknown model": (lambda en: Encoder("no_such_model_xyz", device="cpu"),
                      "unknown model 'no_such_model_xyz'.*dinov2-s14"),
    "empty model name": (lambda en: Encoder("  ", device="cpu"), "model must be a model name"),
    "unknown device": (lambda en: Encoder(device="tpu:9"), "device"),
    "unknown weights": (lambda en: Encoder("dinov2-s14", device="cpu", weights="best"),
                        "weights must be one of 'pretrained', 'random'"),
}


@pytest.mark.parametrize("case", list(ENCODER_KNOBS))
def test_bad_encoder_argument_is_a_clear_value_error(encoder, case):
    call, message = ENCODER_KNOBS[case]
    with pytest.raises(ValueError, match=message):
        call(encoder)


# --- image files: made here, byte by byte -------------------------------------------------


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w: int = 96, h: int = 64) -> Image.Image:
    """A small colourful test image (a gradient with a square), so decoders have work to do."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    arr[h // 4: h // 2, w // 4: w // 2] = (250, 20, 20)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + _png_chunk(b"IEND", b""))


def _gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose screen and single frame claim ``width`` x ``height`` pixels."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame + b";"


PNG = _save(_photo(), "PNG")
JPEG = _save(_photo(), "JPEG", quality=90)

BAD_FILES = {
    "text file": (b"Hello!\nThis is a plain text file, not a picture.\n",
                  r"not an image: the file is text \(it begins 'Hello! This is"),
    "PDF": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
            r"not an image: this is a PDF document; export the page as PNG or JPEG"),
    "random bytes": (np.random.default_rng(0).bytes(3000),
                     r"not an image: the data is not in any supported image format; upload a PNG"),
    "SVG": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
            r"SVG is a vector format; export it as PNG"),
    "empty file": (b"", r"the file is empty \(0 bytes\)"),
    "PNG truncated in the pixel data": (PNG[: len(PNG) // 2],
                                        r"the PNG file is truncated or corrupt and cannot be decoded"),
    "PNG truncated in the header": (PNG[:30], r"the PNG file is truncated or corrupt and cannot be read"),
    "JPEG truncated in the scan": (JPEG[: len(JPEG) // 2],
                                   r"the JPEG file is truncated or corrupt and cannot be decoded"),
    "JPEG truncated in the header": (JPEG[:200], r"the JPEG file is truncated or corrupt"),
    "PNG bomb, 100000 x 100000": (_png_claiming(100_000, 100_000),
                                  r"too large: 10,000.0 megapixels, the limit is 40.0 megapixels.*bomb"),
    "PNG bomb, 10000 x 10000": (_png_claiming(10_000, 10_000),
                                r"too large: 10000 x 10000 = 100.0 megapixels, the limit is 40.0 megapixels"),
    "PNG over the pixel limit, 7000 x 7000": (_png_claiming(7000, 7000),
                                              r"too large: 7000 x 7000 = 49.0 megapixels"),
    "GIF bomb, 65535 x 65535": (_gif_claiming(65535, 65535), r"too large: .*megapixels.*bomb"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_an_image_error_naming_the_problem(case):
    data, message = BAD_FILES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning (or any other) slips out
        with pytest.raises(ImageError, match=message) as info:
            load_image(data)
    assert isinstance(info.value, ValueError)


def test_over_size_files_are_refused_before_reading(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(PNG)
    limit = len(PNG) - 1
    for source in (PNG, io.BytesIO(PNG), path, str(path)):
        with pytest.raises(ImageError, match=rf"the file is too large: .*the limit is {limit} bytes"):
            load_image(source, max_bytes=limit)
    assert load_image(path, max_bytes=len(PNG)).size == (96, 64)


def test_pixel_limit_is_configurable():
    with pytest.raises(ImageError, match=r"96 x 64 = 0.0061 megapixels, the limit is 0.005 megapixels"):
        load_image(PNG, max_pixels=5000)
    with pytest.raises(ImageError, match="96 x 64"):
        load_image(_photo(), max_pixels=5000)  # a PIL image in memory is held to it too
    with pytest.raises(ImageError, match="96 x 64"):
        load_image(np.zeros((64, 96, 3), np.uint8), max_pixels=5000)
    assert load_image(PNG, max_pixels=96 * 64).size == (96, 64)
    with pytest.raises(ValueError, match="max_pixels must be at least 1"):
        load_image(PNG, max_pixels=0)


@pytest.mark.parametrize(
    "source, message",
    [
        (12345, "expected an image file path, bytes, a binary file"),
        ("/no/such/dir/cat.jpg", "no image file at '/no/such/dir/cat.jpg'"),
        (io.StringIO("text"), "opened in text mode"),
        (np.zeros((4, 4, 2), np.uint8), "image array must be HxW"),
    ],
)
def test_odd_sources_are_named(source, message):
    with pytest.raises(ImageError, match=message):
        load_image(source)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return _save(_photo(96, 64), "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _transparent_png() -> bytes:
    rgba = _photo().convert("RGBA")
    alpha = np.zeros((64, 96), np.uint8)
    alpha[:, 48:] = 255  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    return _save(rgba, "PNG")


def _palette_transparent_png() -> bytes:
    pal = _photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(pal, "PNG", transparency=0)


GOOD_FILES = {
    "grayscale PNG": (lambda: _save(_photo().convert("L"), "PNG"), (96, 64)),
    "palette PNG": (lambda: _save(_photo().convert("P"), "PNG"), (96, 64)),
    "palette PNG with transparency": (_palette_transparent_png, (96, 64)),
    "RGBA PNG with transparency": (_transparent_png, (96, 64)),
    "CMYK JPEG": (lambda: _save(_photo().convert("CMYK"), "JPEG"), (96, 64)),
    "16-bit PNG": (lambda: _save(Image.fromarray(
        np.asarray(_photo().convert("L"), np.uint16) * 257), "PNG"), (96, 64)),
    "animated GIF": (_animated_gif, (40, 30)),
    "EXIF-rotated JPEG": (_exif_rotated_jpeg, (64, 96)),
    "1 x 1 PNG": (lambda: _save(Image.new("RGB", (1, 1), (0, 128, 255)), "PNG"), (1, 1)),
    "1 x 4000 PNG": (lambda: _save(Image.new("RGB", (1, 4000), (9, 9, 9)), "PNG"), (1, 4000)),
    "4000 x 1 PNG": (lambda: _save(Image.new("RGB", (4000, 1), (9, 9, 9)), "PNG"), (4000, 1)),
    "1-bit PNG": (lambda: _save(_photo().convert("1"), "PNG"), (96, 64)),
    "WebP": (lambda: _save(_photo(), "WEBP"), (96, 64)),
    "BMP": (lambda: _save(_photo(), "BMP"), (96, 64)),
    "TIFF": (lambda: _save(_photo(), "TIFF"), (96, 64)),
}


@pytest.mark.parametrize("case", list(GOOD_FILES))
def test_unusual_but_valid_image_loads_and_encodes(encoder, case):
    make, size = GOOD_FILES[case]
    image = load_image(make())
    assert image.mode == "RGB" and image.size == size
    enc = encoder.encode(image, size=56, keep_aspect=True)
    assert torch.isfinite(enc.tokens).all() and enc.num_patches >= 1


def test_valid_images_keep_what_matters():
    gif = np.asarray(load_image(_animated_gif()))
    assert gif[..., 0].mean() > 200 and gif[..., 2].mean() < 50  # the first (red) frame
    clear = np.asarray(load_image(_transparent_png()))
    assert clear[:, :40].min() == 255  # transparency is composited on white
    deep = np.asarray(load_image(_save(Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG")))
    assert deep.min() == 255  # 16-bit white stays white
    assert load_image(io.BytesIO(PNG)).tobytes() == load_image(PNG).tobytes()


def test_a_lazily_opened_truncated_pil_image_is_caught_too():
    lazy = Image.open(io.BytesIO(PNG[: len(PNG) // 2]))  # Pillow has read only the header
    with pytest.raises(ImageError, match="the PNG file is truncated or corrupt"):
        load_image(lazy)
