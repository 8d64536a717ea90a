"""Perceiver Resampler: Flamingo's layout, initialisations, seeds, the fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress import PerceiverResampler, kmeans, resample
from compress.resample import PerceiverAttention


def test_attention_follows_flamingo_layout():
    """Queries from the normed latents; keys/values from [normed tokens; normed latents]."""
    torch.manual_seed(0)
    layer = PerceiverAttention(dim=8, heads=2, dim_head=4)
    for p in layer.parameters():  # non-trivial norms, so that the two norms are told apart
        torch.nn.init.normal_(p)
    x, lat = torch.randn(5, 8), torch.randn(3, 8)
    out, attn = layer(x, lat)
    xn, ln = layer.norm_media(x), layer.norm_latents(lat)
    q = layer.to_q(ln).view(3, 2, 4).transpose(0, 1)
    k, v = layer.to_kv(torch.cat([xn, ln])).chunk(2, dim=-1)
    k, v = k.view(8, 2, 4).transpose(0, 1), v.view(8, 2, 4).transpose(0, 1)
    expected = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1)
    assert attn.shape == (2, 3, 5 + 3)
    assert torch.allclose(attn, expected, atol=1e-5)
    want = layer.to_out((expected @ v).transpose(0, 1).reshape(3, 8))
    assert torch.allclose(out, want, atol=1e-5)


def test_resampler_is_residual_with_final_norm():
    torch.manual_seed(0)
    model = PerceiverResampler(dim=8, num_latents=3, depth=2, heads=2)
    x = torch.randn(5, 8)
    out, maps = model(x)
    lat = model.latents
    for attn, ff in model.layers:
        lat = lat + attn(x, lat)[0]
        lat = lat + ff(lat)
    assert torch.allclose(out, model.norm(lat), atol=1e-5)
    assert len(maps) == 2


@pytest.mark.parametrize("init", ["random", "kmeans"])
def test_assign_is_last_layer_patch_attention_renormalised(coffee_enc, init):
    out = resample(coffee_enc, 16, depth=2, init=init)
    maps = out.extra["maps"]  # [depth, H, M, N]
    assert maps.shape == (2, 8, 16, coffee_enc.num_patches)
    expected = maps[-1].mean(dim=0)
    expected = expected / expected.sum(dim=1, keepdim=True)
    assert torch.allclose(out.assign, expected, atol=1e-6)
    # attention over patches plus attention to the latent keys is all of it
    total = maps.sum(dim=-1) + out.extra["latent_mass"]
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    assert out.extra["trained"] is False
    assert out.kind == "soft"


def test_seeds_reproduce_and_differ(coffee_enc):
    a = resample(coffee_enc, 8, init="random", seed=1)
    b = resample(coffee_enc, 8, init="random", seed=1)
    c = resample(coffee_enc, 8, init="random", seed=2)
    assert torch.equal(a.assign, b.assign) and torch.equal(a.tokens, b.tokens)
    assert not torch.allclose(a.assign, c.assign)


def test_kmeans_maps_follow_the_clusters(coffee_enc):
    """With k-means init each latent attends most to the patches of its own cluster."""
    normed = F.layer_norm(coffee_enc.tokens, (coffee_enc.dim,))
    _, labels = kmeans(normed, 8, seed=0)
    out = resample(coffee_enc, 8, init="kmeans", seed=0)
    winner = out.assign.argmax(dim=0)
    assert (winner == labels).float().mean() > 0.9


def test_kmeans_partitions_and_handles_more_clusters_than_points():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20, 3) + 10, torch.randn(20, 3) - 10])
    centroids, labels = kmeans(x, 2, seed=0)
    assert len(set(labels[:20].tolist())) == 1 and len(set(labels[20:].tolist())) == 1
    assert labels[0] != labels[-1]
    many, _ = kmeans(x[:5], 9, seed=0)
    assert many.shape == (9, 3)


@pytest.mark.parametrize("k", [1, 4, 16, 64, 128, 400, 576])
def test_kmeans_from_the_products_is_lloyds_kmeans(coffee_enc, k):
    """The resampler's k-means reads the tokens' products (``gram``): the same clusters and
    centroids as the plain iterations, on real tokens."""
    x = F.layer_norm(coffee_enc.tokens, (coffee_enc.dim,))
    plain, plain_labels = kmeans(x, k, seed=3)
    fast, fast_labels = kmeans(x, k, seed=3, gram=x @ x.T)
    assert torch.equal(fast_labels, plain_labels)
    assert torch.allclose(fast, plain, atol=1e-5)


@pytest.mark.parametrize("iters", [0, 1, 2, 15])
def test_kmeans_from_the_products_reseeds_emptied_clusters_as_lloyds(iters):
    # three points, twelve exact copies each, and one between: seeds on copies of one point
    # leave clusters empty. Small integers: every product and distance is exact in both ways
    x = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 8.0]]).repeat_interleave(12, dim=0)
    x = torch.cat([x, torch.tensor([[1.0, 2.0]])])
    emptied = 0
    for seed in range(8):
        plain, plain_labels = kmeans(x, 6, iters=iters, seed=seed)
        fast, fast_labels = kmeans(x, 6, iters=iters, seed=seed, gram=x @ x.T)
        assert torch.equal(fast_labels, plain_labels), seed
        assert torch.allclose(fast, plain, atol=1e-6), seed
        emptied += int(torch.bincount(plain_labels, minlength=6).eq(0).any())
    assert iters == 0 or emptied  # the case is exercised


def test_more_latents_than_patches(coffee_enc):
    out = resample(coffee_enc, coffee_enc.num_patches + 40, depth=1, init="kmeans")
    assert out.num_out == coffee_enc.num_patches + 40
    assert torch.allclose(out.assign.sum(dim=1), torch.ones(out.num_out), atol=1e-5)


def test_fit_lowers_its_reconstruction_loss_and_reports_progress(coffee_enc):
    seen = []
    out = resample(coffee_enc, 16, init="fit", steps=12, progress=lambda s, n, loss: seen.append(s))
    loss = out.extra["loss"]
    assert len(loss) == 12 and seen == list(range(1, 13))
    assert out.extra["final_loss"] < loss[0]
    assert out.extra["trained"] is True
    again = resample(coffee_enc, 16, init="fit", steps=12)
    assert torch.allclose(out.assign, again.assign, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_latents": 0}, "num_latents"),
        ({"num_latents": 2.5}, "num_latents"),
        ({"init": "pretrained"}, "init"),
        ({"heads": 7}, "heads"),
        ({"depth": 0}, "depth"),
    ],
)
def test_rejects_bad_arguments(coffee_enc, kwargs, match):
    args = {"num_latents": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        resample(coffee_enc, **args)


def test_zero_residual_shortcut_is_exact(coffee_enc):
    """The k-means layout's shortcut (attention only) equals the full forward."""
    torch.manual_seed(0)
    model = PerceiverResampler(coffee_enc.dim, 12, depth=2, heads=8)
    normed = F.layer_norm(coffee_enc.tokens, (coffee_enc.dim,))
    model.init_from_centroids(kmeans(normed, 12)[0])
    assert model.zero_residual
    with torch.no_grad():
        fast_out, fast_maps = model(coffee_enc.tokens)
        model.zero_residual = False
        full_out, full_maps = model(coffee_enc.tokens)
    assert torch.allclose(fast_out, full_out, atol=1e-5)
    for a, b in zip(fast_maps, full_maps, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
