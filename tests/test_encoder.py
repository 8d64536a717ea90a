"""The encoder: shapes, exact attention, layers, image modes, models and devices."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ASSETS
from PIL import Image

from compress import Encoder, WeightsUnavailable, merge_bipartite, prune_attention
from compress.images import grid_for, to_rgb


def test_bundled_model_at_336_gives_576_tokens(coffee_enc, encoder):
    assert encoder.weights_info.kind == "bundled"
    assert coffee_enc.grid == (24, 24) and coffee_enc.num_patches == 576
    assert coffee_enc.tokens.shape == (576, 384)
    assert coffee_enc.prefix.shape == (1, 384)  # CLS, no registers
    assert coffee_enc.q.shape == coffee_enc.k.shape == (6, 577, 64)
    assert coffee_enc.cls_attn.shape == (6, 576)
    assert coffee_enc.image.size == (336, 336)
    assert coffee_enc.layer == 11 and coffee_enc.encode_ms > 0


@pytest.mark.parametrize("layer", [3, -1])
def test_attention_is_exactly_the_models_own(encoder, layer):
    """Our recomputed attention equals timm's explicit (non-fused) attention map."""
    image = Image.open(ASSETS / "chelsea.jpg")
    enc = encoder.encode(image, size=224, layer=layer)
    attn_mod = encoder.net.blocks[enc.layer].attn
    captured = {}
    handle = attn_mod.attn_drop.register_forward_hook(lambda m, a, out: captured.setdefault("a", out))
    fused = attn_mod.fused_attn
    attn_mod.fused_attn = False
    try:
        again = encoder.encode(image, size=224, layer=layer)
    finally:
        attn_mod.fused_attn = fused
        handle.remove()
    ours = enc.attention()
    assert torch.allclose(ours, captured["a"][0], atol=1e-5)
    assert torch.allclose(enc.cls_attn, captured["a"][0][:, 0, 1:], atol=1e-5)
    assert torch.allclose(again.tokens, enc.tokens, atol=1e-4)


def test_last_layer_tokens_are_timms_forward_features(encoder):
    # 518 px is the model's native 37 x 37 grid: no position-embedding resampling involved.
    image = Image.open(ASSETS / "coffee.jpg")
    enc = encoder.encode(image, size=518)
    _, pixels, _ = encoder.preprocess(image, 518)
    with torch.no_grad():
        ref = encoder.net.forward_features(pixels)[0]
    assert torch.allclose(enc.tokens, ref[1:], atol=1e-4)
    assert torch.allclose(enc.prefix, ref[:1], atol=1e-4)


def test_intermediate_layer_tokens(encoder):
    image = Image.open(ASSETS / "coffee.jpg")
    enc = encoder.encode(image, size=518, layer=5)
    _, pixels, _ = encoder.preprocess(image, 518)
    with torch.no_grad():
        ref = encoder.net.forward_intermediates(
            pixels, indices=[5], norm=False, output_fmt="NLC", intermediates_only=True
        )[0][0]
    assert torch.allclose(enc.tokens, ref, atol=1e-4)
    with pytest.raises(ValueError, match="layer"):
        encoder.encode(image, layer=12)


def test_tokens_mean_something(coffee_enc):
    """Patches of the espresso crema are more alike than crema vs wooden table."""
    grid = torch.arange(576).view(24, 24)
    crema = grid[7:11, 9:14].flatten()
    table = torch.cat([grid[0:4, 19:24].flatten(), grid[19:24, 0:3].flatten()])
    unit = F.normalize(coffee_enc.tokens, dim=-1)
    within = (unit[crema] @ unit[crema].T).mean()
    across = (unit[crema] @ unit[table].T).mean()
    assert within > across + 0.2
    # and CLS attention prefers the cup to the table corner
    cls = coffee_enc.cls_attn.mean(dim=0)
    assert cls[crema].mean() > cls[table].mean()


def test_keep_aspect_grid(encoder):
    image = Image.open(ASSETS / "coffee.jpg")  # 600 x 400
    enc = encoder.encode(image, size=336, keep_aspect=True)
    gh, gw = enc.grid
    assert gw / gh == pytest.approx(1.5, rel=0.06)
    assert abs(gh * gw - 576) <= 24
    assert enc.image.size == (gw * 14, gh * 14)
    assert grid_for(1, 4000, 336, 14, True) == (576, 1)
    assert grid_for(4000, 1, 336, 14, True) == (1, 576)
    assert grid_for(5, 5, 340, 14, False) == (24, 24)


def _png_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    buf.seek(0)
    return Image.open(buf)


def _modes():
    base = Image.open(ASSETS / "chelsea.jpg").convert("RGB")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    grey16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    return {
        "RGB": base,
        "RGBA": rgba,
        "L": base.convert("L"),
        "LA": base.convert("LA"),
        "P": base.convert("P"),
        "CMYK": _png_bytes(base.convert("CMYK"), "JPEG"),
        "I;16": _png_bytes(grey16),
        "1": base.convert("1"),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_common_image_mode_encodes(encoder, mode):
    image = _modes()[mode]
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (451, 300)
    enc = encoder.encode(image, size=112)
    assert enc.tokens.shape == (64, 384) and torch.isfinite(enc.tokens).all()


def test_sixteen_bit_grey_keeps_its_range():
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    rgb = np.asarray(to_rgb(Image.fromarray(ramp)))
    assert rgb.min() == 0 and rgb.max() == 255


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((20, 30), np.uint8),
        np.zeros((20, 30, 1), np.uint8),
        np.zeros((20, 30, 3), np.float32),
        np.full((20, 30, 4), 255, np.uint8),
        np.zeros((20, 30, 3), np.uint16),
        np.zeros((20, 30), bool),
    ],
)
def test_numpy_arrays(arr):
    assert to_rgb(arr).size == (30, 20)


@pytest.mark.parametrize("arr", [np.zeros((20, 30, 2)), np.zeros((2, 2, 2, 3)), np.zeros((0, 5))])
def test_bad_arrays_are_named(arr):
    with pytest.raises(ValueError, match="image array"):
        to_rgb(arr)


def test_exif_orientation_is_applied():
    base = Image.open(ASSETS / "coffee.jpg")  # 600 x 400
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = _png_bytes(base, "JPEG", exif=exif.tobytes())
    assert rotated.size == (600, 400)
    assert to_rgb(rotated).size == (400, 600)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    buf.seek(0)
    gif = Image.open(buf)
    gif.seek(1)
    rgb = np.asarray(to_rgb(gif))
    assert rgb[..., 0].mean() > 200 and rgb[..., 2].mean() < 50


def test_tiny_and_extreme_images(encoder):
    assert encoder.encode(Image.new("RGB", (1, 1), "red"), size=336).grid == (24, 24)
    thin = Image.new("RGB", (4000, 1), "blue")
    assert encoder.encode(thin, size=112, keep_aspect=True).grid == (1, 64)


def test_not_an_image_is_named():
    with pytest.raises(ValueError, match="PIL image or a numpy array"):
        to_rgb("cat.jpg")


def test_unknown_model_names_the_bundled_default():
    with pytest.raises(ValueError, match="dinov2-s14"):
        Encoder("no_such_model_xyz")


def test_hub_unreachable_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(WeightsUnavailable, match="dinov2-s14.*works offline"):
        Encoder("vit_tiny_patch16_224.augreg_in21k", device="cpu")


def test_random_weights_only_on_request_and_labelled():
    enc = Encoder("vit_tiny_patch16_224:random", device="cpu")
    assert enc.weights_info.kind == "random" and "RANDOM" in enc.weights_info.label
    out = enc.encode(Image.open(ASSETS / "coffee.jpg"), size=224)
    assert out.tokens.shape == (196, 192) and out.weights == "random"
    assert Encoder("dinov2-s14", device="cpu", weights="random").weights_info.kind == "random"


def test_model_with_registers_and_no_cls():
    # timm's own prefix count is used: DINOv2 with 4 registers has 5 prefix tokens.
    reg = Encoder("vit_small_patch14_reg4_dinov2:random", device="cpu")
    enc = reg.encode(Image.open(ASSETS / "coffee.jpg"), size=112)
    assert enc.prefix.shape[0] == 5 and enc.q.shape[1] == 5 + 64
    assert prune_attention(enc, 0.5).num_out == 32
    nocls = Encoder("vit_base_patch16_siglip_224:random", device="cpu")
    enc = nocls.encode(Image.open(ASSETS / "coffee.jpg"), size=64)
    assert enc.cls_attn is None and enc.num_prefix == 0
    assert prune_attention(enc, 0.5, score="received").num_out == 8
    assert merge_bipartite(enc, target=4).num_out == 4


def test_device_auto_is_cpu_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA"):
        Encoder(device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_gpu_parity(coffee_enc):
    gpu = Encoder(device="cuda")
    enc = gpu.encode(Image.open(ASSETS / "coffee.jpg"), size=336)
    assert enc.tokens.is_cuda
    assert torch.allclose(enc.tokens.cpu(), coffee_enc.tokens, atol=2e-3, rtol=1e-3)
    a = prune_attention(enc, 0.25).extra["kept"].cpu()
    b = prune_attention(coffee_enc, 0.25).extra["kept"]
    assert (a == b).float().mean() > 0.95
    out = merge_bipartite(enc, target=64)
    assert out.assign.is_cuda and out.num_out == 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_a_gpu_keeps_bf16_weights_and_stays_close(coffee_enc):
    gpu = Encoder(device="cuda", precision="bf16")
    assert gpu.precision == "bf16" and gpu.notice == ""
    qkv = gpu.blocks_net.blocks[0].attn.qkv.weight
    assert qkv.is_cuda and qkv.dtype == torch.bfloat16
    assert gpu.net.blocks[0].attn.qkv.weight.dtype == torch.float32  # q/k are read in float32
    enc = gpu.encode(Image.open(ASSETS / "coffee.jpg"), size=336)
    assert enc.tokens.is_cuda and enc.q.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(enc.tokens.cpu(), coffee_enc.tokens, dim=-1)
    assert float(cos.mean()) > 0.99


def test_unreachable_hub_fails_fast_and_clearly(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, but the hub endpoint refuses connections (a closed loopback port):
    the encoder says so within seconds instead of hanging in a download."""
    import time

    from conftest import free_port

    from compress import encoder as encoder_mod

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setattr(encoder_mod, "_HUB_STATE", {})
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="could not be reached.*dinov2-s14.*works offline"):
        Encoder("vit_tiny_patch16_224.augreg_in21k", device="cpu")
    assert time.monotonic() - start < 15


def test_layer_scale_folding_keeps_the_function():
    import timm

    from compress.encoder import fold_layer_scale

    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                            img_size=56, init_values=0.3).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        before = net.forward_features(x)
        assert fold_layer_scale(net) == 2 * len(net.blocks)
        after = net.forward_features(x)
    assert torch.allclose(before, after, atol=1e-5)


def test_attention_from_another_block_than_the_tokens(encoder):
    """layer=-2, attention_layer=-1: the penultimate block's tokens with the last block's attention
    (the PruMerge code's pairing): each part equals the single-block encoding it comes from."""
    image = Image.open(ASSETS / "coffee.jpg")
    pair = encoder.encode(image, size=224, layer=-2, attention_layer=-1)
    penultimate = encoder.encode(image, size=224, layer=-2)
    last = encoder.encode(image, size=224, layer=-1)
    assert (pair.layer, pair.attention_layer) == (10, 11) and penultimate.attention_layer is None
    assert torch.equal(pair.tokens, penultimate.tokens)
    assert torch.equal(pair.q, last.q) and torch.equal(pair.k, last.k)
    assert torch.equal(pair.cls_attn, last.cls_attn)
    # and the other way round: tokens of the last block, attention of an earlier one
    back = encoder.encode(image, size=224, layer=-1, attention_layer=3)
    assert torch.equal(back.tokens, last.tokens)
    assert torch.equal(back.k, encoder.encode(image, size=224, layer=3).k)
    with pytest.raises(ValueError, match="layer"):
        encoder.encode(image, size=224, attention_layer=12)


def test_bf16_only_where_the_cpu_has_it(monkeypatch):
    """bf16 on a CPU without native bf16 would be ~5x slower: fp32 instead, with a notice.
    Where the CPU has it (faked here when it does not), bf16 runs and stays close to fp32."""
    from compress import encoder as encoder_module

    monkeypatch.setattr(encoder_module, "cpu_bf16_native", lambda: False)
    slow = Encoder(device="cpu", precision="bf16")
    assert slow.precision == "fp32"
    assert "no native bf16" in slow.notice and encoder_module.cpu_capability() in slow.notice
    assert Encoder(device="cpu").notice == ""

    monkeypatch.setattr(encoder_module, "cpu_bf16_native", lambda: True)
    fast = Encoder(device="cpu", precision="bf16")
    assert fast.precision == "bf16" and fast.notice == ""
    image = Image.open(ASSETS / "coffee.jpg")
    a, b = fast.encode(image, size=112), slow.encode(image, size=112)
    cos = torch.nn.functional.cosine_similarity(a.tokens, b.tokens, dim=-1)
    assert float(cos.mean()) > 0.99 and not torch.equal(a.tokens, b.tokens)


def test_bf16_weights_are_stored_once_and_give_the_same_bits(monkeypatch):
    """Under bf16 autocast every layer used to cast its float32 weight on every call (~20 % of a
    bf16 encode on an AMX CPU). The blocks now run on a copy whose Linear/Conv2d weights are
    stored in bf16, sharing every other parameter: the tokens must be bit for bit those of the
    autocast forward on the float32 weights, and q/k still come from the float32 weights.
    (Where the CPU has no native bf16 it is faked: torch then emulates bf16, slowly but exactly.)"""
    from compress import encoder as encoder_module

    monkeypatch.setattr(encoder_module, "cpu_bf16_native", lambda: True)
    enc = Encoder(device="cpu", precision="bf16")
    fast, net = enc.blocks_net, enc.net
    assert fast is not net
    plain = Encoder(device="cpu")
    assert plain.blocks_net is plain.net  # float32: no copy
    for (name, a), (_, b) in zip(net.named_parameters(), fast.named_parameters(), strict=True):
        if name.startswith("blocks.") and (".qkv." in name or ".fc1." in name):
            assert a.dtype == torch.float32 and b.dtype == torch.bfloat16, name
        if "norm" in name or name in ("pos_embed", "cls_token"):
            assert a is b, name  # shared, not copied
    image = Image.open(ASSETS / "coffee.jpg")
    got = enc.encode(image, size=112)
    _, pixels, _ = enc.preprocess(image, 112)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = enc.embed(pixels, net)
        for blk in net.blocks:
            x = blk(x)
        x = net.norm(x)
    assert torch.equal(got.tokens, x[0, enc.num_prefix:].float())
    attn = net.blocks[-1].attn
    assert attn.qkv.weight.dtype == torch.float32 and got.q.dtype == torch.float32


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux CPU flags")
def test_cpu_bf16_native_reads_the_cpu_flags():
    from compress.encoder import cpu_bf16_native

    words = Path("/proc/cpuinfo").read_text().split()
    assert cpu_bf16_native() == any(f in words for f in ("avx512_bf16", "amx_bf16", "bf16"))


def test_requests_at_the_same_time_get_their_own_attention(encoder):
    """The app runs one shared model for everyone: encodes of other images and forwards with
    ToMe inside the network run in other threads at the same moment. Each encode must still get
    its own image's q, k and CLS attention (a hook on the shared model once caught another
    request's projection: the wrong attention, or a shape error when the sizes differed)."""
    import threading

    from compress.inside import tome_forward

    photos = [Image.open(ASSETS / name) for name in ("coffee.jpg", "chelsea.jpg", "hubble.jpg")]
    sizes = [336, 224, 280]
    alone = [encoder.encode(p, size=s) for p, s in zip(photos, sizes, strict=True)]
    got, errors = {}, []
    start = threading.Barrier(len(photos) + 1)

    def encode(i):
        try:
            start.wait()
            got[i] = [encoder.encode(photos[i], size=sizes[i]) for _ in range(3)]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    def merge_inside():
        try:
            start.wait()
            for _ in range(3):
                tome_forward(encoder, photos[0], size=224, r=16)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(len(photos))]
    threads.append(threading.Thread(target=merge_inside))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    for i, ref in enumerate(alone):
        for enc in got[i]:
            assert torch.allclose(enc.q, ref.q, atol=1e-5)
            assert torch.allclose(enc.k, ref.k, atol=1e-5)
            assert torch.allclose(enc.cls_attn, ref.cls_attn, atol=1e-6)


def test_thread_policy_is_asked_before_every_block_and_undone_after(encoder, monkeypatch):
    """The app's lone request takes every core block by block (tabs/priority.py): the policy is
    asked before each block, its counts take effect, the caller's count is back afterwards, and
    the tokens are the model's whatever the count."""
    image = Image.open(ASSETS / "coffee.jpg")
    plain = encoder.encode(image, size=224)
    asked, used = [], []

    def policy():
        asked.append(len(asked))
        return 2 if len(asked) % 2 else 1

    original = encoder.net.blocks[0].forward

    def spy(x, *args, **kwargs):
        used.append(torch.get_num_threads())
        return original(x, *args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(Encoder, "thread_policy", staticmethod(policy))
        monkeypatch.setattr(encoder.net.blocks[0], "forward", spy)
        enc = encoder.encode(image, size=224)
        assert torch.get_num_threads() == 1  # restored
    finally:
        torch.set_num_threads(before)
    assert len(asked) == encoder.depth  # once per block
    assert used == [2]  # block 0 ran on the policy's count
    assert torch.allclose(enc.tokens, plain.tokens, atol=1e-4)
    assert torch.allclose(enc.cls_attn, plain.cls_attn, atol=1e-6)


def test_torch_threads_sets_a_count_for_a_block_and_puts_it_back():
    from compress.threads import torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError), torch_threads():
            torch.set_num_threads(2)  # the block may change it (an encode's policy does)
            raise RuntimeError("failed mid-way")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
