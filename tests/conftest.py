"""Shared fixtures: the real bundled encoder (offline) and hand-built encodings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.serve import free_port  # noqa: F401 - re-exported for the tests
from compress import Encoder, Encoding

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    """The bundled pretrained DINOv2 ViT-S/14 on the CPU."""
    return Encoder(device="cpu")


@pytest.fixture(scope="session")
def coffee_enc(encoder) -> Encoding:
    """coffee.jpg at 336 px: 24 x 24 = 576 patch tokens."""
    return encoder.encode(Image.open(ASSETS / "coffee.jpg"), size=336)


def make_encoding(tokens, grid, keys=None, cls_attn=None, heads: int = 1,
                  num_prefix: int = 0, queries=None) -> Encoding:
    """A hand-built Encoding: ``tokens`` [N, C] on a ``grid``; keys default to the tokens."""
    tokens = torch.as_tensor(tokens, dtype=torch.float32)
    n, c = tokens.shape
    k = tokens if keys is None else torch.as_tensor(keys, dtype=torch.float32)
    prefix = torch.zeros(num_prefix, c)
    kk = torch.cat([torch.zeros(num_prefix, k.shape[1]), k]).unsqueeze(0).repeat(heads, 1, 1)
    qq = kk.clone() if queries is None else torch.as_tensor(queries, dtype=torch.float32)
    if cls_attn is not None:
        cls_attn = torch.as_tensor(cls_attn, dtype=torch.float32).reshape(-1, n)
    return Encoding(
        image=Image.new("RGB", (grid[1] * 14, grid[0] * 14)), grid=tuple(grid), patch_size=14,
        tokens=tokens, prefix=prefix, q=qq, k=kk, cls_attn=cls_attn,
        device=torch.device("cpu"), encode_ms=0.0, model="hand-built",
    )


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """The real app (``python app.py``) on a free loopback port; yields its URL."""
    from bench.serve import HOST, start_app, stop_app

    port = free_port()
    proc = start_app(port, tmp_path_factory.mktemp("app") / "server.log")
    yield f"http://{HOST}:{port}/"
    stop_app(proc)


def more_args(strategy: str = "divprune", budget: int = 64) -> list:
    """The "More methods" tab's inputs in the app's order: strategy, budget, then every
    strategy's knobs at their defaults (``tabs.more.KNOBS``), so API calls follow the registry."""
    from tabs.more import KNOBS

    return [strategy, budget, *(k.default for _, k in KNOBS)]


# The "Inside the ViT" tab's inputs: method, r, keep ratio, fuse, EViT blocks, block shown.
INSIDE = ("tome", 16, 0.7, True, [3, 6, 9], 12, 0)  # ..., block, ToMe schedule
