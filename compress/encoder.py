"""The patch encoder: a timm ViT plus preprocessing, producing an ``Encoding``."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from ._checks import check_choice, check_int
from .images import grid_for, to_rgb
from .threads import torch_threads
from .types import Encoding
from .weights import (
    BUNDLED_ARCH,
    BUNDLED_NAME,
    BUNDLED_SOURCE,
    WeightsInfo,
    WeightsUnavailable,
    bundled_state_dict,
    hub_offline,
    split_random,
)

T = TypeVar("T")
MAX_SIZE = 2048  # px: a 146 x 146 grid (21k tokens) at patch 14; beyond that one encode can take minutes
OOM_NOTICE = "GPU out of memory: encoded on the CPU instead"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when present, else MPS where available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available here")
    return dev


def device_label(device: torch.device) -> str:
    """A human name for the device: the GPU's name, or "CPU"."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return "CPU"


def run_with_cpu_fallback(on_device: Callable[[], T], on_cpu: Callable[[], T],
                          on_gpu: bool) -> tuple[T, str]:
    """(``on_device()``, "") -- or, when that runs a CUDA GPU out of memory, (``on_cpu()``, notice).

    Only ``torch.cuda.OutOfMemoryError`` on a GPU (``on_gpu``) is retried;
    any other error, and an out-of-memory error on the CPU, propagates. The
    failed attempt's exception (and the GPU tensors its traceback holds) is
    dropped and the CUDA cache emptied before the CPU run.
    """
    try:
        return on_device(), ""
    except torch.cuda.OutOfMemoryError:
        if not on_gpu:
            raise
    # Outside the except block: the traceback (and its frames' GPU tensors) is gone now.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return on_cpu(), OOM_NOTICE


def _copy_mapped(net: torch.nn.Module, param: Callable, buffer: Callable) -> torch.nn.Module:
    """``copy.deepcopy(net)`` with each parameter replaced by ``param(p)`` and each buffer by
    ``buffer(b)`` (a deep-copy memo maps them, so nothing else is copied first)."""
    memo: dict[int, object] = {id(p): param(p) for p in net.parameters()}
    memo.update({id(b): buffer(b) for b in net.buffers()})
    return copy.deepcopy(net, memo)


def cpu_copy(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` on the CPU, made without allocating anything on the GPU.

    ``copy.deepcopy`` would first copy every parameter on its own device; a
    memo that maps each parameter and buffer to its CPU copy avoids that.
    """
    return _copy_mapped(
        net,
        lambda p: torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad),
        lambda b: b.detach().to("cpu", copy=True),
    ).cpu()


def bf16_copy(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` whose Linear and Conv2d weights (and biases) are stored in bfloat16;
    every other parameter and buffer (norms, position embedding, prefix tokens) is shared with
    ``net``, not copied.

    Under bf16 autocast a layer casts its float32 weight to bfloat16 on every call (autocast
    keeps no cast from one forward to the next): 12 blocks x 1.8 M weights read in float32 and
    written in bf16 on every encode of the ViT-S, ~10 ms of a 336 px encode on an AMX CPU.
    Stored in bf16 once, the weights need no cast and every layer computes the same bits (the
    cast is the same rounding), so the tokens are equal bit for bit.
    """
    low = {id(p) for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
           for p in m.parameters(recurse=False)}
    return _copy_mapped(
        net,
        lambda p: torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
        if id(p) in low else p,
        lambda b: b,
    ).eval()


def _not_a_vit(name: str) -> ValueError:
    return ValueError(
        f"model {name!r} is not a plain ViT (patch embedding + blocks with a qkv attention); "
        f"choose a timm VisionTransformer model, or the bundled default {BUNDLED_NAME!r}"
    )


HUB_PROBE_S = 3.0  # how long to wait for the hub before treating it as unreachable
_HUB_STATE: dict[str, tuple[float, bool]] = {}  # endpoint -> (checked at, reachable)


def hub_endpoint() -> str:
    """The hub's base URL (``HF_ENDPOINT`` when set)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_reachable(timeout_s: float = HUB_PROBE_S, remember_s: float = 60.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout_s`` (remembered a minute).

    Run in a thread and abandoned on time-out, because name resolution has no
    time-out of its own: on a machine without internet a hub download can
    otherwise hang for most of a minute before failing.
    """
    url = urllib.parse.urlsplit(hub_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    now = time.monotonic()
    seen = _HUB_STATE.get(url.geturl())
    if seen is not None and now - seen[0] < remember_s:
        return seen[1]
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout_s + 0.5)
    ok = bool(result and result[0])
    _HUB_STATE[url.geturl()] = (now, ok)
    return ok


@contextlib.contextmanager
def _hub_mode():
    """Yield why the hub is off limits ("" when it is usable), with huggingface_hub offline then.

    Honours ``HF_HUB_OFFLINE`` even when it was set after huggingface_hub was
    imported; an unreachable hub is treated the same way, so timm still finds
    weights already in the local hub cache and fails at once otherwise.
    """
    if hub_offline():
        why = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        why = f"the model hub ({hub_endpoint()}) could not be reached within {HUB_PROBE_S:.0f} s"
    else:
        yield ""
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield why
    finally:
        constants.HF_HUB_OFFLINE = before


def _create_model(model: str, weights: str):
    import timm

    name, random_suffix = split_random(model)
    check_choice("weights", weights, ("pretrained", "random"))
    want_random = random_suffix or weights == "random"
    if name == BUNDLED_NAME:
        net = timm.create_model(BUNDLED_ARCH, pretrained=False, num_classes=0, dynamic_img_size=True)
        if want_random:
            return net, WeightsInfo("random", BUNDLED_ARCH), False
        sd, _ = bundled_state_dict()
        net.load_state_dict(sd, strict=True)
        # DINOv2 resamples its position embedding without antialiasing.
        return net, WeightsInfo("bundled", BUNDLED_SOURCE), False
    if not timm.list_models(name) and name not in timm.list_models(pretrained=True):
        raise ValueError(
            f"unknown model {name!r}: use {BUNDLED_NAME!r} (bundled, works offline) "
            "or a timm ViT name such as 'vit_base_patch16_clip_224.openai'"
        )
    if want_random:
        try:
            net = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
        except TypeError as exc:
            raise _not_a_vit(name) from exc
        return net, WeightsInfo("random", name), True
    why = "the model hub could not be reached"
    try:
        with _hub_mode() as off:
            why = off or why
            net = timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True)
    except TypeError as exc:  # e.g. "unexpected keyword argument 'dynamic_img_size'": not a ViT
        raise _not_a_vit(name) from exc
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear message
        raise WeightsUnavailable(
            f"pretrained weights for {name!r} are not available: {why} ({type(exc).__name__}). "
            f"The bundled default {BUNDLED_NAME!r} works offline; "
            f"'{name}:random' gives untrained weights."
        ) from exc
    return net, WeightsInfo("hub", name), True


PRECISIONS = ("fp32", "bf16")


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use here: "AVX512", "AVX2", ... ."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - old or unusual builds: say so rather than fail
        return "unknown"


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX-512 BF16 or AMX, Arm BF16).

    Read from the kernel's CPU flags where there are any (Linux); elsewhere
    from torch: an AVX-512 capability with oneDNN's bf16 support. Without
    native bf16, torch emulates it and a bf16 encode is ~5x *slower* than
    float32 (measured here: 1809 ms against 355 ms at 336 px on an AVX2 CPU).
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
        if flags:
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    try:
        return cpu_capability().startswith("AVX512") and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001
        return False


def bf16_fallback_notice(device: torch.device) -> str:
    """Why bf16 is not used on ``device`` ("" when it is worth using there)."""
    if device.type != "cpu" or cpu_bf16_native():
        return ""
    return (f"bf16 was asked for, but this CPU ({cpu_capability()}) has no native bf16 and would "
            "run ~5x slower: encoding in fp32")


@torch.no_grad()
def fold_layer_scale(net: torch.nn.Module) -> int:
    """Fold each block's LayerScale into the linear layer before it; returns how many.

    ``gamma * (W x + b)`` is ``(gamma W) x + gamma b``: the same function with
    one elementwise pass fewer per branch (about 3% of a CPU forward here).
    Only ``ls1`` after ``attn.proj`` and ``ls2`` after ``mlp.fc2`` are folded.
    """
    folded = 0
    for blk in getattr(net, "blocks", []):
        for ls_name, linear in (("ls1", getattr(getattr(blk, "attn", None), "proj", None)),
                                ("ls2", getattr(getattr(blk, "mlp", None), "fc2", None))):
            gamma = getattr(getattr(blk, ls_name, None), "gamma", None)
            if gamma is None or not isinstance(linear, torch.nn.Linear):
                continue
            linear.weight.mul_(gamma[:, None])
            if linear.bias is not None:
                linear.bias.mul_(gamma)
            setattr(blk, ls_name, torch.nn.Identity())
            folded += 1
    return folded


class Encoder:
    """A ViT that turns images into ``Encoding``s.

    ``model``: ``"dinov2-s14"`` (bundled DINOv2 ViT-S/14, offline) or any
    timm ViT name (pretrained weights from the hub where reachable); append
    ``":random"`` or pass ``weights="random"`` for untrained weights, which
    ``weights_info`` then reports. ``device="auto"`` picks CUDA, then MPS,
    then CPU. ``precision="bf16"`` runs the blocks under bfloat16 autocast
    on ``blocks_net``, a copy of ``net`` with its weights stored in bf16
    (``bf16_copy``: no per-call weight casts; about 3x faster than float32
    on a CPU with AMX; tokens within cosine 0.997 of float32 on the sample
    photos); queries and keys are still recomputed in float32 from the
    captured block input. On a CPU without
    native bf16 (``cpu_bf16_native()``) bf16 would be ~5x slower, so the
    encoder runs float32 instead and ``notice`` says so. Default: float32.

    ``Encoder.thread_policy`` (class-wide, default None): a function called on
    the CPU before each block that returns the torch thread count for that
    block (None: leave it); the count in force before the encode is restored
    after it. The app gives a lone request all the cores this way.
    """

    thread_policy: Callable[[], int | None] | None = None

    def __init__(self, model: str = BUNDLED_NAME, device: str | torch.device = "auto",
                 weights: str = "pretrained", precision: str = "fp32"):
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be a model name, got {model!r}")
        self.name = model.strip()
        self.device = resolve_device(device)
        self.precision = check_choice("precision", precision, PRECISIONS)
        self.notice = ""  # what the user should know about how this encoder runs
        if self.precision == "bf16" and (why := bf16_fallback_notice(self.device)):
            self.precision, self.notice = "fp32", why
        net, self.weights_info, self._pos_antialias = _create_model(self.name, weights)
        self._check_supported(net)
        fold_layer_scale(net)
        self.net = net.eval().to(self.device)
        # bf16: the blocks run on a copy whose layers hold their weights in bf16 (bf16_copy)
        self.blocks_net = bf16_copy(self.net) if self.precision == "bf16" else self.net
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=self.device)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=self.device)
        self.patch_size = int(net.patch_embed.patch_size[0])
        self.depth = len(net.blocks)
        self.num_prefix = int(net.num_prefix_tokens)
        self.has_cls = getattr(net, "cls_token", None) is not None
        self._pos_cache: dict[tuple[str, int, int], torch.Tensor] = {}
        self._cpu_net: torch.nn.Module | None = None  # made on the first GPU out-of-memory
        self._cpu_lock = threading.Lock()

    def _check_supported(self, net) -> None:
        blocks = getattr(net, "blocks", None)
        attn = getattr(blocks[0], "attn", None) if blocks else None
        if getattr(net, "patch_embed", None) is None or attn is None or not hasattr(attn, "qkv"):
            raise _not_a_vit(self.name)
        if getattr(net, "pos_embed", None) is None:
            raise ValueError(f"model {self.name!r} has no absolute position embedding; not supported")

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, device={self.device}, weights={self.weights_info.kind}, "
                f"precision={self.precision})")

    def resolve_layer(self, layer: int) -> int:
        """``layer`` as a block index in [0, depth); negative counts from the end."""
        layer = check_int("layer", layer, -self.depth, self.depth - 1)
        return layer % self.depth

    def _resize(self, image, size: int, keep_aspect: bool) -> tuple[Image.Image, tuple[int, int]]:
        """(the RGB image resized onto the patch grid, grid (gh, gw))."""
        size = check_int("size", size, 1, MAX_SIZE)
        rgb = to_rgb(image)
        gh, gw = grid_for(rgb.width, rgb.height, size, self.patch_size, keep_aspect)
        return rgb.resize((gw * self.patch_size, gh * self.patch_size), resample=3), (gh, gw)  # bicubic

    def _pixels(self, resized: Image.Image, device: torch.device) -> torch.Tensor:
        """Normalised pixels [1, 3, H, W] on ``device``."""
        arr = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).to(device)
        pixels = (arr / 255.0 - self.mean.to(device)) / self.std.to(device)
        return pixels.permute(2, 0, 1).unsqueeze(0)

    def preprocess(self, image, size: int = 336, keep_aspect: bool = False):
        """(resized RGB image, normalised pixels [1, 3, H, W], grid (gh, gw))."""
        resized, grid = self._resize(image, size, keep_aspect)
        return resized, self._pixels(resized, self.device), grid

    def _pos_embed(self, net, x: torch.Tensor) -> torch.Tensor:
        """Add the position embedding, resampled to this grid, and the prefix tokens."""
        from timm.layers import resample_abs_pos_embed

        b, h, w, c = x.shape
        key = (str(x.device), h, w)
        pos = self._pos_cache.get(key)
        if pos is None:
            pos = resample_abs_pos_embed(
                net.pos_embed, new_size=(h, w), old_size=net.patch_embed.grid_size,
                num_prefix_tokens=0 if net.no_embed_class else self.num_prefix,
                antialias=self._pos_antialias,
            )
            self._pos_cache[key] = pos
        x = x.reshape(b, h * w, c)
        prefix = [t.expand(b, -1, -1) for t in (net.cls_token, getattr(net, "reg_token", None))
                  if t is not None]
        if net.no_embed_class:
            return torch.cat(prefix + [x + pos], dim=1)
        return torch.cat(prefix + [x], dim=1) + pos

    def embed(self, pixels: torch.Tensor, net: torch.nn.Module | None = None) -> torch.Tensor:
        """The token sequence that enters block 0, [1, P + N, C] (prefix first).

        ``pixels`` [1, 3, H, W] as ``preprocess`` returns them (H and W multiples
        of the patch size): patch embedding, position embedding resampled to the
        grid, the prefix tokens (CLS, registers) and ``norm_pre`` -- timm's
        ``forward_features`` up to the blocks, in eval mode. ``net`` defaults to
        ``self.net`` (the CPU copy is passed for out-of-memory retries).
        """
        net = self.net if net is None else net
        x = net.patch_embed(pixels)
        if x.ndim == 3:  # patch embed without NHWC output: restore the grid
            x = x.reshape(1, pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size, -1)
        x = self._pos_embed(net, x)
        return net.norm_pre(x)

    def _on_gpu(self) -> bool:
        """Whether an out-of-memory error is worth a retry on the CPU (tests fake a GPU here)."""
        return self.device.type == "cuda"

    def cpu_net(self) -> torch.nn.Module:
        """A copy of the model on the CPU for out-of-memory retries, made on first use and kept."""
        with self._cpu_lock:
            if self._cpu_net is None:
                self._cpu_net = cpu_copy(self.net).eval()
            return self._cpu_net

    def _forward(self, net, resized: Image.Image, grid: tuple[int, int], index: int,
                 device: torch.device, attn_index: int | None = None) -> dict:
        """Run ``net`` on ``device``: tokens after block ``index``; q, k, CLS attention, scale
        of block ``attn_index`` (default: the same block)."""
        attn_index = index if attn_index is None else attn_index
        pixels = self._pixels(resized, device)
        bf16 = self.precision == "bf16"
        # bf16: the blocks run with bf16 weights (the out-of-memory CPU copy casts them per call)
        run = self.blocks_net if net is self.net else net
        block = run.blocks[attn_index]
        captured: dict[str, torch.Tensor] = {}
        # The model is shared: other requests run it at the same time in other threads (encodes,
        # forwards inside the ViT), and a hook on a shared module fires for all of them. Each
        # hook keeps only what its own thread computes.
        me = threading.get_ident()

        def mine(key: str, value: torch.Tensor) -> None:
            if threading.get_ident() == me:
                captured.setdefault(key, value)

        if bf16:  # keep the block input: q/k are recomputed from it in float32 below
            hook = block.attn.register_forward_pre_hook(lambda _m, args: mine("x", args[0]))
        else:  # float32: the block's own qkv projection output is exactly what we need
            hook = block.attn.qkv.register_forward_hook(lambda _m, _args, out: mine("qkv", out))
        fast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        policy = Encoder.thread_policy if device.type == "cpu" else None
        try:
            with torch_threads(), fast:  # the policy's counts last for this forward only
                x = self.embed(pixels, run)
                tokens = None
                for i, blk in enumerate(run.blocks[: max(index, attn_index) + 1]):
                    if policy is not None and (n := policy()) and n != torch.get_num_threads():
                        torch.set_num_threads(n)
                    x = blk(x)
                    if i == index:
                        tokens = run.norm(x) if index == self.depth - 1 else x
        finally:
            hook.remove()
        x = tokens
        attn = net.blocks[attn_index].attn  # float32 weights
        if "qkv" in captured:
            qkv = captured["qkv"][0]
        else:
            qkv = attn.qkv(captured["x"][0].float())  # q/k in float32 even after a bf16 forward
        t, heads = qkv.shape[0], attn.num_heads
        qkv = qkv.reshape(t, 3, heads, -1).permute(1, 2, 0, 3)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        scale = float(getattr(attn, "scale", q.shape[-1] ** -0.5))
        x = x[0].float()
        cls_attn = None
        if self.has_cls:
            logits = (q[:, :1].float() * scale) @ k.float().transpose(-1, -2)
            cls_attn = logits.softmax(-1)[:, 0, self.num_prefix:]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"x": x, "q": q.float().contiguous(), "k": k.float().contiguous(),
                "cls_attn": cls_attn, "scale": scale, "device": device}

    @torch.no_grad()
    def encode(self, image, size: int = 336, layer: int = -1, keep_aspect: bool = False,
               attention_layer: int | None = None) -> Encoding:
        """Encode ``image`` at ``size`` px and read tokens and attention at ``layer``.

        ``tokens`` are the output of block ``layer``; for the last block the
        model's final norm is applied (timm's ``forward_features``). ``q``/``k``
        come from that block's own qkv projection output (captured with a
        forward hook; with ``precision="bf16"`` recomputed in float32 from the
        block's captured input) and its q/k norms, and attention is computed
        from them exactly, because timm's fused attention never materialises
        the attention map.
        ``attention_layer`` (default: ``layer``) reads q, k and the CLS
        attention from another block than the tokens: ``layer=-2,
        attention_layer=-1`` pairs the penultimate block's tokens (what
        LLaVA-1.5 feeds its language model) with the attention of the block
        that reads them, as the PruMerge code does.
        ``size`` is at most ``MAX_SIZE`` px. If a GPU runs out of memory the
        image is encoded on the CPU instead: the ``Encoding`` is then on the
        CPU and its ``notice`` says so.
        """
        index = self.resolve_layer(layer)
        attn_index = index if attention_layer is None else self.resolve_layer(attention_layer)
        size = check_int("size", size, 1, MAX_SIZE)
        start = time.perf_counter()
        resized, grid = self._resize(image, size, keep_aspect)
        cpu = torch.device("cpu")
        out, notice = run_with_cpu_fallback(
            lambda: self._forward(self.net, resized, grid, index, self.device, attn_index),
            lambda: self._forward(self.cpu_net(), resized, grid, index, cpu, attn_index),
            self._on_gpu(),
        )
        p = self.num_prefix
        x = out["x"]
        return Encoding(
            image=resized, grid=grid, patch_size=self.patch_size,
            tokens=x[p:].contiguous(), prefix=x[:p].contiguous(),
            q=out["q"], k=out["k"], cls_attn=out["cls_attn"],
            device=out["device"], encode_ms=(time.perf_counter() - start) * 1e3,
            model=self.name, layer=index, size=size, weights=self.weights_info.kind,
            scale=out["scale"], notice=notice,
            attention_layer=None if attn_index == index else attn_index,
        )
