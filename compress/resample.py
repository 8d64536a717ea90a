"""The Perceiver Resampler (Alayrac et al., Flamingo, 2022) and k-means.

L learnable latents cross-attend to the patch tokens. Following Flamingo, the
keys and values come from the patch tokens concatenated with the latents,
tokens and latents have their own layer norms, each layer is a residual
attention followed by a residual feed-forward, and a final norm closes it.

The resampler is untrained here (no vision-language model comes with it), so
``resample`` offers three starting points, and says which one was used:

- ``"random"``: seeded random latents and weights, as at the start of
  training. Its maps are noise: they show the mechanism, not a meaning.
- ``"kmeans"``: latents start at k-means centroids of the (layer-normed)
  patch tokens, the query and key projections start as the identity and the
  residual branches (attention output, second feed-forward layer) at zero, so
  every layer's attention is a softmax over token-to-centroid similarity:
  the maps mean something without training.
- ``"fit"``: start from ``"kmeans"``, then a short Adam optimisation of the
  whole resampler on this image's tokens. Objective (attention-routed
  reconstruction): every layer-normed patch token x_n is rebuilt from the
  output latents o_m, each weighted by how much latent m attended to patch n
  in the last layer (renormalised over m): loss = mean_n ||x_n - sum_m w_mn o_m||^2 / C.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice, check_int, check_real
from .types import Compression, Encoding

INITS = ("random", "kmeans", "fit")
KMEANS_KEPT = 64  # k-means centroids kept per encoding (64 x 384 floats for M = 64: 100 kB)
# Up to this many patches the layer-normed tokens' products (N x N floats: 1.3 MB at N = 576,
# 4 MB at 1024) are kept with the encoding: each new latent count's k-means then costs N x N
# additions per iteration instead of an N x k x D product (3 ms against 7 at N = 576).
KMEANS_GRAM_MAX = 1024


class PerceiverAttention(nn.Module):
    """Latents attend to [tokens; latents]. Returns (update [M, D], attention [H, M, N + M])."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        # True in the k-means layout (``init_from_centroids``): the query and key projections are
        # the identity, so ``attention`` and ``keys`` skip those products (the same numbers:
        # x * 1 plus zeros is x exactly)
        self.identity_qk = False

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm_media(x)
        lat = self.norm_latents(latents)
        h = self.heads
        q = self.to_q(lat).view(lat.shape[0], h, -1).transpose(0, 1)  # [H, M, d]
        k, v = self.to_kv(torch.cat([x, lat])).chunk(2, dim=-1)
        k = k.view(k.shape[0], h, -1).transpose(0, 1)  # [H, N + M, d]
        v = v.view(v.shape[0], h, -1).transpose(0, 1)
        attn = ((q * self.scale) @ k.transpose(-1, -2)).softmax(dim=-1)
        out = (attn @ v).transpose(0, 1).reshape(lat.shape[0], -1)
        return self.to_out(out), attn

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """The keys of rows ``x`` [R, D] (media tokens or latents): [H, R, d]."""
        inner = self.to_q.weight.shape[0]
        k = x if self.identity_qk else F.linear(x, self.to_kv.weight[:inner])
        return k.view(k.shape[0], self.heads, -1).transpose(0, 1)

    def media_keys(self, x: torch.Tensor) -> torch.Tensor:
        """The keys of the media tokens, [H, N, d]: they do not depend on the latents, so a
        caller moving only the latent count can compute them once."""
        return self.keys(self.norm_media(x))

    def attention(self, x: torch.Tensor, latents: torch.Tensor,
                  media_keys: torch.Tensor | None = None) -> torch.Tensor:
        """The attention map alone, [H, M, N + M] (no values, no output projection).

        ``media_keys``: ``self.media_keys(x)`` computed earlier (the same numbers)."""
        lat = self.norm_latents(latents)
        q = lat if self.identity_qk else self.to_q(lat)
        q = q.view(lat.shape[0], self.heads, -1).transpose(0, 1)
        k_media = self.media_keys(x) if media_keys is None else media_keys
        k = torch.cat([k_media, self.keys(lat)], dim=1)
        return ((q * self.scale) @ k.transpose(-1, -2)).softmax(dim=-1)


def _same_norms(a: PerceiverAttention, b: PerceiverAttention) -> bool:
    """Whether two layers' norms (all the attention map depends on with identity q/k) agree."""
    return a.identity_qk and b.identity_qk and all(
        torch.equal(p, q) for p, q in zip((*a.norm_media.parameters(), *a.norm_latents.parameters()),
                                          (*b.norm_media.parameters(), *b.norm_latents.parameters()),
                                          strict=True))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False),
        )


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver Resampler for one image's tokens.

    ``forward(tokens [N, D])`` returns (latents [M, D], attentions: one
    [H, M, N + M] tensor per layer, patch keys first, latent keys last).
    """

    def __init__(self, dim: int, num_latents: int = 64, depth: int = 2, heads: int = 8,
                 dim_head: int | None = None, ff_mult: int = 4):
        super().__init__()
        dim = check_int("dim", dim, 1)
        num_latents = check_int("num_latents", num_latents, 1)
        depth = check_int("depth", depth, 1)
        heads = check_int("heads", heads, 1)
        ff_mult = check_int("ff_mult", ff_mult, 1)
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads}; pass dim_head")
            dim_head = dim // heads
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), FeedForward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        # True while the residual branches are exactly zero (the k-means layout, untrained):
        # the latents then pass every layer unchanged and only the attention maps are computed.
        self.zero_residual = False

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        latents = self.latents
        if self.zero_residual:
            return self.norm(latents), self.layer_maps(tokens, latents)
        maps = []
        for attn, ff in self.layers:
            update, a = attn(tokens, latents)
            latents = latents + update
            latents = latents + ff(latents)
            maps.append(a)
        return self.norm(latents), maps

    @torch.no_grad()
    def init_from_centroids(self, centroids: torch.Tensor) -> None:
        """Latents at ``centroids``; identity q/k projections; zero residual branches."""
        self.latents.copy_(centroids)
        for attn, ff in self.layers:
            inner, dim = attn.to_q.weight.shape
            if inner != dim:
                raise ValueError("k-means init needs heads * dim_head == dim")
            eye = torch.eye(dim, device=centroids.device)
            attn.to_q.weight.copy_(eye)
            attn.to_kv.weight[:inner].copy_(eye)
            attn.to_out.weight.zero_()
            ff[-1].weight.zero_()
            attn.identity_qk = True
        self.zero_residual = True

    def layer_maps(self, tokens: torch.Tensor, latents: torch.Tensor,
                   media_keys: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Every layer's attention map in the k-means layout (``zero_residual``): the latents
        reach every layer unchanged, so each map is one softmax of latent-to-token similarity.
        Layers whose norms are equal compute the same map: it is computed once and shared.
        ``media_keys``: each layer's ``media_keys(tokens)``, computed earlier."""
        maps: list[torch.Tensor] = []
        for i, (attn, _) in enumerate(self.layers):
            same = next((maps[j] for j, (prev, _) in enumerate(self.layers[:i])
                         if _same_norms(prev, attn)), None)
            keys = None if media_keys is None else media_keys[i]
            maps.append(same if same is not None else attn.attention(tokens, latents, keys))
        return maps


def kmeans(x: torch.Tensor, k: int, iters: int = 15, seed: int = 0,
           labels: bool = True, gram: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lloyd's k-means on rows of ``x`` [N, D]. Returns (centroids [k, D], labels [N]).

    ``labels=False`` skips the final assignment (one more distance pass) and
    returns ``None`` for it.

    Seeded initialisation from k distinct points (a random permutation); an
    emptied cluster is re-seeded at the point farthest from its centroid.
    With k > N, the extra centroids are copies of points (ties go to the
    first), so the result is still defined.

    ``gram``: ``x @ x.T`` [N, N], when the caller keeps it. Every centroid is then a mean of
    points, so its products with the points are means of ``gram``'s rows: an iteration costs
    N x N additions instead of an N x k x D product (the same iterations, rounded otherwise).
    """
    k = check_int("k", k, 1)
    iters = check_int("iters", iters, 0)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    n = x.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(x.device)
    if k <= n:
        centroids = x[perm[:k]].clone()
    else:
        extra = torch.randint(n, (k - n,), generator=gen).to(x.device)
        centroids = x[torch.cat([perm, perm[extra]])].clone()
        return centroids, torch.cdist(x, x[perm]).argmin(dim=1) if labels else None
    if gram is not None:
        return _kmeans_gram(x, gram, perm[:k], iters, labels)
    sq = x.pow(2).sum(dim=1, keepdim=True)
    for _ in range(iters):
        # squared distances through one matmul: |x|^2 - 2 x.c + |c|^2
        # (in place, in the same order: -2 (x.c) + |x|^2 is sq - 2 x.c to the bit)
        dist = (x @ centroids.T).mul_(-2).add_(sq).add_(centroids.pow(2).sum(dim=1)).clamp_(min=0)
        near = dist.argmin(dim=1)
        counts = torch.bincount(near, minlength=k)
        new = torch.zeros_like(centroids).index_add_(0, near, x) / counts.clamp(min=1)[:, None]
        empty = counts == 0
        if bool(empty.any()):
            far = dist.gather(1, near[:, None]).squeeze(1).argsort(descending=True)
            new[empty] = x[far[: int(empty.sum())]]
        converged = torch.equal(new, centroids)
        centroids = new
        if converged:
            break
    return centroids, torch.cdist(x, centroids).argmin(dim=1) if labels else None


def _kmeans_gram(x: torch.Tensor, gram: torch.Tensor, seeds: torch.Tensor, iters: int,
                 labels: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``kmeans`` from the points' products ``gram``: centroid j is held as its products with
    every point, ``cx[j]``, and its squared length ``cc[j]``."""
    n, k = gram.shape[0], seeds.shape[0]
    sq = gram.diagonal()
    cx, cc = gram[seeds], sq[seeds].clone()  # the seeds: points
    members = torch.arange(n, device=x.device)
    near = prev = None
    empty_at = far_at = seeds[:0]  # clusters re-seeded at points in the last update
    for _ in range(iters):
        dist = (cx * -2).add_(sq).add_(cc[:, None]).clamp_(min=0)  # [k, N]
        near = dist.min(dim=0).indices  # (argmin along dim 0 is three times slower here)
        if prev is not None and not empty_at.numel() and torch.equal(near, prev):
            break  # the same means again: converged
        counts = torch.bincount(near, minlength=k)
        cx = torch.zeros(k, n, dtype=gram.dtype, device=gram.device).index_add_(0, near, gram)
        inner = torch.zeros(k, dtype=gram.dtype, device=gram.device).index_add_(
            0, near, cx[near, members])  # the sum over pairs of members of x_a . x_b
        size = counts.clamp(min=1).to(gram.dtype)
        cx, cc = cx.div_(size[:, None]), inner.div_(size.pow(2))
        empty_at = (counts == 0).nonzero().flatten()
        if empty_at.numel():
            far = dist.gather(0, near[None, :]).squeeze(0).argsort(descending=True)
            far_at = far[:empty_at.numel()]
            cx[empty_at], cc[empty_at] = gram[far_at], sq[far_at]
        prev = near
    if near is None:  # no iterations: the seeds
        return x[seeds].clone(), (torch.cdist(x, x[seeds]).argmin(dim=1) if labels else None)
    counts = torch.bincount(near, minlength=k).clamp(min=1)
    centroids = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, near, x)
    centroids = centroids / counts[:, None].to(x.dtype)
    centroids[empty_at] = x[far_at]
    return centroids, (torch.cdist(x, centroids).argmin(dim=1) if labels else None)


@functools.lru_cache(maxsize=16)
def _base_resampler(dim: int, depth: int, heads: int, seed: int, structured: bool,
                    device: str) -> PerceiverResampler:
    """A seeded resampler, built once per configuration and never mutated afterwards.

    PyTorch's default init under ``seed``; with ``structured`` the k-means
    layout (identity q/k, zero residual branches) is applied on top. Its
    weights do not depend on the latent count (the latents are supplied per
    call), so moving the latent slider never rebuilds it. Callers run it with
    their own latents through ``functional_call``, or train a deep copy, so
    one cached module can serve concurrent requests.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PerceiverResampler(dim, 1, depth, heads)
    if structured:
        model.init_from_centroids(model.latents.detach().clone())
    return model.to(device).requires_grad_(False)


def random_latents(num_latents: int, dim: int, seed: int) -> torch.Tensor:
    """Seeded standard-normal latents [M, D], as Flamingo initialises them."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(num_latents, dim, generator=gen)


def _reconstruction_loss(normed: torch.Tensor, out: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    n = normed.shape[0]
    weights = last.mean(dim=0)[:, :n]  # [M, N]
    weights = weights / weights.sum(dim=0, keepdim=True).clamp(min=1e-12)
    recon = weights.T @ out
    return (normed - recon).pow(2).mean()


def resample(
    enc: Encoding,
    num_latents: int = 64,
    depth: int = 2,
    heads: int = 8,
    init: str = "kmeans",
    seed: int = 0,
    steps: int = 40,
    lr: float = 1e-3,
    progress: Callable[[int, int, float], None] | None = None,
) -> Compression:
    """Run a Perceiver Resampler with ``num_latents`` latents on the patch tokens.

    Returns a ``Compression`` whose ``tokens`` are the output latents [M, C]
    and whose ``assign`` is the last layer's attention over the patches
    (mean over heads, renormalised over patches). ``extra`` holds
    ``maps`` [depth, H, M, N] (attention over patches, per layer and head),
    ``latent_mass`` [depth, H, M] (attention that went to latent keys),
    ``trained`` (True only for ``"fit"``), ``loss`` (per step, for ``"fit"``),
    ``latents_init`` (the starting latents) and ``latent_space`` (True: the
    output tokens live in the resampler's latent space, not the encoder's
    token space; ``comp.represented(enc.tokens)`` is what each one gathered
    there). ``progress(step, steps, loss)`` is called after every optimisation step.
    """
    num_latents = check_int("num_latents", num_latents, 1)
    depth = check_int("depth", depth, 1, 12)
    heads = check_int("heads", heads, 1)
    check_choice("init", init, INITS)
    seed = check_int("seed", seed)
    steps = check_int("steps", steps, 0, 10_000)
    lr = check_real("lr", lr, 0.0)
    if enc.dim % heads:
        raise ValueError(f"heads must divide the token width {enc.dim}, got {heads}")
    start = time.perf_counter()
    tokens = enc.tokens.float()
    base = _base_resampler(enc.dim, depth, heads, seed, init != "random", str(tokens.device))
    normed = F.layer_norm(tokens, (enc.dim,))
    if init in ("kmeans", "fit"):  # kept per encoding: a slider coming back to a count reuses it
        def centroids():
            gram = (enc.remember(("layer_normed_gram",), lambda: normed @ normed.T)
                    if enc.num_patches <= KMEANS_GRAM_MAX else None)
            return kmeans(normed, num_latents, seed=seed, labels=False, gram=gram)[0]

        latents = enc.remember(("kmeans", num_latents, seed), centroids, keep=KMEANS_KEPT)
    else:
        latents = random_latents(num_latents, enc.dim, seed).to(tokens.device)
    model = base
    losses: list[float] = []
    if init == "fit" and steps:
        model = copy.deepcopy(base).requires_grad_(True)
        model.zero_residual = False  # training moves the residual branches off zero
        for attn, _ in model.layers:  # ... and the q/k projections off the identity
            attn.identity_qk = False
        model.latents = nn.Parameter(latents.clone())
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            # Linear warm-up: Adam's first steps move every weight by about lr at once, which
            # would knock the identity q/k layout about before the gradients mean anything.
            warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 10))
            for step in range(steps):
                out, maps = model(tokens)
                loss = _reconstruction_loss(normed, out, maps[-1])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                warmup.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(step + 1, steps, losses[-1])
    with torch.no_grad():
        if model is base and base.zero_residual:
            # The untrained k-means layout: latents pass unchanged and only attention is computed;
            # the media keys of every layer are kept with the encoding (a latent slider reuses them).
            keys = enc.remember(("resampler_keys", depth, heads, seed), lambda: [
                attn.media_keys(tokens) for attn, _ in base.layers], keep=4)
            maps = base.layer_maps(tokens, latents, keys)
            out = base.norm(latents)
        elif model is base:  # run the shared module with this image's latents, without mutating it
            params = {**dict(base.named_parameters()), "latents": latents}
            out, maps = torch.func.functional_call(base, params, (tokens,))
        else:
            out, maps = model(tokens)
        # The training objective, once more on the final weights: only a trained model reports it
        # (a live latent slider would pay for it on every move and never show it).
        final_loss = float(_reconstruction_loss(normed, out, maps[-1])) if losses else None
    n = enc.num_patches
    if all(m is maps[0] for m in maps):  # one map shared by every layer: no copies of it
        one = maps[0]
        patch_maps = one[..., :n].expand(len(maps), *one[..., :n].shape)
        latent_mass = one[..., n:].sum(dim=-1).expand(len(maps), *one.shape[:-1])
    else:
        stacked = torch.stack(maps)  # [depth, H, M, N + M]
        patch_maps, latent_mass = stacked[..., :n], stacked[..., n:].sum(dim=-1)
    assign = patch_maps[-1].mean(dim=0)
    assign = assign / assign.sum(dim=1, keepdim=True).clamp(min=1e-30)
    return Compression(
        tokens=out.detach(),
        assign=assign.detach(),
        strategy="resample",
        params={"num_latents": num_latents, "depth": depth, "heads": heads, "init": init,
                "seed": seed, "steps": steps if init == "fit" else 0},
        extra={
            "maps": patch_maps.detach(),
            "latent_mass": latent_mass.detach(),
            "trained": init == "fit",
            "loss": losses,
            "final_loss": final_loss,
            "latents_init": latents.detach(),
            "latent_space": True,
        },
        elapsed_ms=(time.perf_counter() - start) * 1e3,
    )
