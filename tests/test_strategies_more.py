"""PruMerge(+), VisionZip, DivPrune, pooling and random keep, each rule pinned by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_encoding

import compress
from compress import (
    STRATEGIES,
    divprune,
    pool,
    prumerge,
    prumerge_plus,
    prune_attention,
    random_keep,
    run_at_budget,
    visionzip,
)
from compress.merge import pool_grid
from compress.prune import iqr_outliers, plus_samples
from compress.registry import kernel_for_budget


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def rows_of(comp) -> list[set[int]]:
    return [set(torch.nonzero(row > 0).flatten().tolist()) for row in comp.assign]


# --- PruMerge / PruMerge+ ------------------------------------------------------------------


def test_iqr_bound_is_q3_plus_1_5_iqr_with_linear_quartiles():
    # sorted 1..7, 20: Q1 = 2 + .75 = 2.75, Q3 = 6 + .25 = 6.25, IQR 3.5, bound 6.25 + 5.25 = 11.5
    scores = torch.tensor([5.0, 1, 20, 3, 7, 2, 6, 4])
    mask, bound = iqr_outliers(scores)
    assert bound == pytest.approx(11.5)
    assert mask.nonzero().flatten().tolist() == [2]


# Six patches on a 2 x 3 grid, one head. Patch 2 is the only IQR outlier:
# sorted .05 .05 .1 .1 .1 .6 -> Q1 .0625, Q3 .1, bound .15625.
PM_CLS = [[0.05, 0.05, 0.6, 0.1, 0.1, 0.1]]
# Keys by angle: patch 2 at 0 deg; its nearest are 1 (10 deg) and 5 (20 deg); the rest are far.
PM_KEYS = [unit(d) for d in (90, 10, 0, 135, 180, 20)]
PM_TOKENS = torch.arange(18, dtype=torch.float32).reshape(6, 3) ** 1.5


def pm_enc():
    return make_encoding(PM_TOKENS, grid=(2, 3), keys=PM_KEYS, cls_attn=PM_CLS)


def test_prumerge_keeps_outliers_and_folds_in_attention_weighted_neighbours():
    out = prumerge(pm_enc(), neighbours=2, attention="mean")
    assert out.extra["outliers"].tolist() == [2]
    assert out.extra["neighbours"].tolist() == [[1, 5]]
    assert out.num_out == 2  # the kept patch, then the summary of the pruned ones
    # the code's update x_2 + .05 x_1 + .1 x_5, divided by 1.15 so the row sums to 1
    expected = torch.tensor([0, 0.05, 1.0, 0, 0, 0.1]) / 1.15
    assert torch.allclose(out.assign[0], expected)
    x = PM_TOKENS
    assert torch.allclose(out.tokens[0] * out.extra["scale"][0], x[2] + 0.05 * x[1] + 0.1 * x[5])
    # summary token: pruned patches weighted by attention (.05 .05 .1 .1 .1, sum .4)
    assert torch.allclose(out.assign[1], torch.tensor([0.125, 0.125, 0, 0.25, 0.25, 0.25]))
    assert torch.allclose(out.tokens, out.assign @ x, atol=1e-5)
    assert out.kind == "soft" and out.kept_mask().all()


def test_prumerge_neighbours_may_be_kept_patches_and_never_itself():
    # two outliers (.4 each; the six others 1/30: bound .2625) whose keys are each other's nearest
    cls = [[0.4, 0.4] + [0.2 / 6] * 6]
    keys = [unit(d) for d in (0, 5, 90, 100, 180, 270, 200, 300)]
    enc = make_encoding(torch.randn(8, 4), grid=(2, 4), keys=keys, cls_attn=cls)
    out = prumerge(enc, neighbours=1, attention="mean")
    assert out.extra["kept"].tolist() == [0, 1]
    assert out.extra["neighbours"].flatten().tolist() == [1, 0]
    assert torch.allclose(out.assign[0, :2], torch.tensor([1.0, 0.4]) / 1.4)


def test_prumerge_without_summary_token_and_without_outliers():
    out = prumerge(pm_enc(), neighbours=2, attention="mean", summary_token=False)
    assert out.num_out == 1
    flat = make_encoding(PM_TOKENS, grid=(2, 3), cls_attn=[[1 / 6] * 6])
    none = prumerge(flat, attention="mean")  # no outlier: only the summary token, as the code
    assert none.num_out == 1
    assert torch.allclose(none.tokens[0], PM_TOKENS.mean(dim=0), atol=1e-5)
    top = prumerge(flat, attention="mean", summary_token=False)  # then the top patch is kept
    assert top.num_out == 1 and top.extra["kept"].tolist() == [0]  # ties: first patch


def test_prumerge_concat_attention_is_one_softmax_over_concatenated_heads():
    torch.manual_seed(0)
    enc = make_encoding(torch.randn(4, 3), grid=(2, 2), cls_attn=torch.rand(2, 4),
                        heads=2, num_prefix=1)
    enc.q, enc.k = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    logits = (enc.q[:, 0:1] @ enc.k.transpose(-1, -2)).sum(dim=0)[0] / math.sqrt(6)
    out = prumerge(enc, attention="concat")
    assert torch.allclose(out.extra["scores"], logits.softmax(0)[1:], atol=1e-6)
    mean = prumerge(enc, attention="mean")
    assert torch.allclose(mean.extra["scores"], enc.cls_attn.mean(dim=0))


def test_prumerge_count_adapts_to_the_image():
    few = [[0.9] + [0.1 / 11] * 11]
    many = [[0.3, 0.3, 0.3] + [0.1 / 9] * 9]
    a = prumerge(make_encoding(torch.randn(12, 4), (3, 4), cls_attn=few), attention="mean")
    b = prumerge(make_encoding(torch.randn(12, 4), (3, 4), cls_attn=many), attention="mean")
    assert (a.num_out, b.num_out) == (2, 4)
    assert STRATEGIES["prumerge"].adaptive and STRATEGIES["prumerge_plus"].adaptive
    assert not STRATEGIES["visionzip"].adaptive


def test_prumerge_plus_positions_follow_the_current_official_code():
    # the code (1ca8b2ba): arange(0, 575, int(int(576 / n) / 3)); 32 outliers: stride 18 // 3 = 6
    assert torch.equal(plus_samples(576, 32), torch.arange(0, 571, 6))
    assert plus_samples(576, 32).numel() == 96 and plus_samples(576, 32)[-1] == 570
    # 48 outliers: 576 // 48 = 12, stride 4, last position below 575 is 572
    assert torch.equal(plus_samples(576, 48), torch.arange(0, 575, 4))
    # 100 patches, 7 outliers: 100 // 7 = 14, 14 / 3 = 4.67 -> stride 4: 0, 4, ..., 96 (below 99)
    assert plus_samples(100, 7).tolist() == list(range(0, 97, 4))
    # 12 patches, 1 outlier: 12 // 1 = 12, stride 4: 0, 4, 8 (below 11); no outlier counts as 1
    assert plus_samples(12, 1).tolist() == plus_samples(12, 0).tolist() == [0, 4, 8]
    # over N / 6 outliers the code's stride is 1 (every patch) or 0 (an error): evenly spaced
    # 3n samples instead. 576 patches, 100 outliers: 300 at floor((2i + 1) * 576 / 600)
    many = plus_samples(576, 100)
    assert many.numel() == 300 and many[:4].tolist() == [0, 2, 4, 6] and many[-1] == 575
    assert plus_samples(12, 5).tolist() == list(range(12))  # 15 capped at 12: every patch
    # the switch: 96 outliers of 576 still follow the code (stride 2), 97 do not
    assert torch.equal(plus_samples(576, 96), torch.arange(0, 575, 2))
    assert plus_samples(576, 97).numel() == 291


def test_prumerge_plus_adds_three_uniform_samples_per_outlier():
    cls = [[0.02] * 6 + [0.8] + [0.02] * 5]  # patch 6 is the outlier
    enc = make_encoding(torch.randn(12, 4), grid=(3, 4), cls_attn=cls)
    out = prumerge_plus(enc, attention="mean")
    # samples at 0, 4, 8 (stride 12 // 1 // 3 = 4 from 0); none is the outlier
    assert out.extra["samples"].tolist() == [0, 4, 8]
    assert out.extra["kept"].tolist() == [0, 4, 6, 8]
    assert out.num_out == 5 and out.strategy == "prumerge_plus"  # 4 kept + the summary token
    # one sample per outlier: stride 12, only position 0
    assert prumerge(enc, plus=True, attention="mean", plus_ratio=1).extra["kept"].tolist() == [0, 6]
    # a sample that is already an outlier is not added twice
    cls8 = [[0.02] * 8 + [0.8] + [0.02] * 3]  # patch 8 is the outlier and a sample position
    out8 = prumerge_plus(make_encoding(torch.randn(12, 4), grid=(3, 4), cls_attn=cls8), attention="mean")
    assert out8.extra["samples"].tolist() == [0, 4] and out8.extra["kept"].tolist() == [0, 4, 8]


def _official_prumerge_update(enc, out):
    """The authors' per-token loop, written out: x_i + sum of a_j x_j over 32 nearest keys."""
    keys = enc.k[:, enc.num_prefix:].permute(1, 0, 2).reshape(enc.num_patches, -1)
    unit_keys = F.normalize(keys, dim=-1)
    a = out.extra["scores"]
    values = []
    for i in out.extra["kept"].tolist():
        others = torch.tensor([j for j in range(enc.num_patches) if j != i])
        sims = unit_keys[others] @ unit_keys[i]
        nbr = others[sims.topk(32).indices]
        values.append(enc.tokens[i] + (a[nbr, None] * enc.tokens[nbr]).sum(dim=0))
    return torch.stack(values)


@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_on_a_real_image_matches_the_codes_update(coffee_enc, plus):
    out = prumerge(coffee_enc, plus=plus)
    n_out = int(iqr_outliers(out.extra["scores"])[0].sum())
    assert out.extra["outliers"].numel() == n_out
    kept = out.extra["kept"].numel()
    assert out.num_out == kept + 1
    reference = _official_prumerge_update(coffee_enc, out)
    scaled = out.tokens[:kept] * out.extra["scale"][:kept, None]
    assert torch.allclose(scaled, reference, atol=1e-3, rtol=1e-4)
    assert torch.allclose(out.tokens, out.represented(coffee_enc.tokens), atol=1e-4)


# --- VisionZip -----------------------------------------------------------------------------

# 2 x 4 grid; dominant: patches 1 (.3) and 4 (.2). Remaining in grid order: 0 2 3 5 6 7,
# step 6 // 2 = 3 -> targets 0 and 5. Keys: 0 at 0 deg, 5 at 90; 2 (10 deg) joins 0,
# 3 (80), 6 (45.1) and 7 (170) join 5.
VZ_CLS = [[0.1, 0.3, 0.05, 0.05, 0.2, 0.1, 0.1, 0.1]]
VZ_KEYS = [unit(d) for d in (0, 30, 10, 80, 60, 90, 45.1, 170)]


def test_visionzip_dominant_then_contextual_groups():
    x = torch.randn(8, 5)
    enc = make_encoding(x, grid=(2, 4), keys=VZ_KEYS, cls_attn=VZ_CLS)
    out = visionzip(enc, 4, dominant_ratio=0.5)
    assert out.extra["dominant"].tolist() == [1, 4]
    assert out.extra["targets"].tolist() == [0, 5]
    assert rows_of(out) == [{1}, {4}, {0, 2}, {3, 5, 6, 7}]
    # the authors' code: contextual token = target + mean(members); we keep it halved (rows sum
    # to 1) with the scale 2 in extra, so tokens * scale is the code's value
    assert out.extra["scale"].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert torch.allclose(out.tokens[2] * 2, x[0] + x[2], atol=1e-6)
    assert torch.allclose(out.tokens[3] * 2, x[5] + x[[3, 6, 7]].mean(dim=0), atol=1e-6)
    assert torch.allclose(out.tokens[:2], x[[1, 4]])
    assert out.assign[3, 5] == pytest.approx(0.5) and out.assign[3, 3] == pytest.approx(1 / 6)
    assert out.kind == "merge" and out.kept_mask().all()


def test_visionzip_target_that_nobody_joins_stays_itself():
    x = torch.randn(8, 5)
    enc = make_encoding(x, grid=(2, 4), keys=VZ_KEYS, cls_attn=VZ_CLS)
    # 5 dominant (1, 4, 0 and two of the 0.1s by grid order: 5, 6), 2 contextual from 2, 3, 7:
    # step 3 // 2 = 1, targets 2 and 3; 7 (170 deg) is nearer 3 (80 deg) than 2 (10 deg)
    out = visionzip(enc, 7, dominant_ratio=5 / 7)
    assert out.extra["targets"].tolist() == [2, 3]
    assert rows_of(out)[5:] == [{2}, {3, 7}]
    assert out.extra["scale"][5:].tolist() == [1.0, 2.0]
    assert torch.allclose(out.tokens[5], x[2], atol=1e-6)  # the code: x_2 + 0 (counts clamped to 1)
    assert torch.allclose(out.tokens[6] * 2, x[3] + x[7], atol=1e-6)


def test_visionzip_budget_split():
    enc = make_encoding(torch.randn(8, 5), grid=(2, 4), keys=VZ_KEYS, cls_attn=VZ_CLS)
    # all dominant: exactly top-k by CLS attention
    assert torch.equal(visionzip(enc, 3, dominant_ratio=1.0).assign,
                       prune_attention(enc, 3 / 8).assign)
    # all contextual: 2 targets every 4th patch, each patch joins its most key-similar target
    ctx = visionzip(enc, 2, dominant_ratio=0.0)
    assert ctx.extra["targets"].tolist() == [0, 4]
    assert ctx.kept_mask().all()


def test_visionzip_default_is_the_papers_54_plus_10(coffee_enc):
    out = visionzip(coffee_enc, 64)
    assert (out.extra["num_dominant"], out.extra["num_contextual"]) == (54, 10)
    assert out.num_out == 64
    assert torch.allclose(out.tokens, out.represented(coffee_enc.tokens), atol=1e-4)


# --- DivPrune ------------------------------------------------------------------------------

# Unit vectors at 0, 10, 60, 120, 200 degrees (cosine distance grows with the angle).
# Nearest-other angles: 10, 10, 50, 60, 80 -> first pick 200 (index 4). Then the farthest from
# the picked set: 10 deg (170 away), then 120 (80 from 200), then 60, then 0.
DIV_ANGLES = [0, 10, 60, 120, 200]


def test_divprune_greedy_max_min_picks():
    enc = make_encoding([unit(d) for d in DIV_ANGLES], grid=(1, 5))
    out = divprune(enc, 5)
    assert out.extra["order"].tolist() == [4, 1, 3, 2, 0]
    dist = [1 - math.cos(math.radians(a)) for a in (80, 170, 80, 50, 10)]
    assert torch.allclose(out.extra["min_distance"], torch.tensor(dist), atol=1e-5)
    three = divprune(enc, 3)
    assert three.extra["kept"].tolist() == [1, 3, 4]  # grid order
    assert three.kind == "prune" and torch.equal(three.tokens, enc.tokens[[1, 3, 4]])


def test_divprune_uses_cosine_not_length():
    scales = torch.tensor([5.0, 0.1, 2.0, 30.0, 1.0])[:, None]
    enc = make_encoding(torch.tensor([unit(d) for d in DIV_ANGLES]) * scales, grid=(1, 5))
    assert divprune(enc, 5).extra["order"].tolist() == [4, 1, 3, 2, 0]


def test_divprune_never_picks_a_patch_twice():
    enc = make_encoding([unit(0)] * 3 + [unit(90)], grid=(2, 2))
    out = divprune(enc, 4)
    assert sorted(out.extra["order"].tolist()) == [0, 1, 2, 3]
    assert divprune(enc, 2).extra["kept"].tolist() == [0, 3]  # ties go to the earlier patch


# --- pooling -------------------------------------------------------------------------------


def test_pool_2x2_windows_on_a_4x4_grid():
    x = torch.randn(16, 3)
    out = pool(make_encoding(x, grid=(4, 4)), 2)
    assert rows_of(out) == [{0, 1, 4, 5}, {2, 3, 6, 7}, {8, 9, 12, 13}, {10, 11, 14, 15}]
    assert torch.allclose(out.tokens[0], x[[0, 1, 4, 5]].mean(dim=0), atol=1e-6)
    assert out.kind == "merge" and out.extra["pooled_grid"] == (2, 2)


def test_pool_partial_windows_when_the_grid_is_not_divisible():
    x = torch.randn(25, 3)
    out = pool(make_encoding(x, grid=(5, 5)), 2)  # 3 x 3 windows, the last row/column partial
    rows = rows_of(out)
    assert out.num_out == 9
    assert rows[2] == {4, 9} and rows[6] == {20, 21} and rows[8] == {24}
    grid = x.T.reshape(1, 3, 5, 5)
    ref = F.avg_pool2d(grid, 2, stride=2, ceil_mode=True).reshape(3, 9).T
    assert torch.allclose(out.tokens, ref, atol=1e-6)
    rect = pool(make_encoding(torch.randn(12, 2), grid=(3, 4)), (3, 2))
    assert rows_of(rect) == [{0, 1, 4, 5, 8, 9}, {2, 3, 6, 7, 10, 11}]
    assert pool(make_encoding(x, grid=(5, 5)), 1).num_out == 25
    assert pool(make_encoding(x, grid=(5, 5)), 5).num_out == 1


def test_pool_kernel_for_budget_is_the_closest_count():
    assert kernel_for_budget((24, 24), 64) == (3, 3)
    assert kernel_for_budget((24, 24), 144) == (2, 2)
    assert kernel_for_budget((24, 24), 576) == (1, 1)
    assert kernel_for_budget((24, 24), 1) == (24, 24)
    for grid in ((24, 24), (5, 7), (16, 9)):
        counts = [pool_grid(grid, (a, b)) for a in range(1, grid[0] + 1)
                  for b in range(1, grid[1] + 1)]
        for budget in (2, 7, 20, 50, 100):
            got = math.prod(pool_grid(grid, kernel_for_budget(grid, budget)))
            assert abs(got - budget) == min(abs(h * w - budget) for h, w in counts)


def test_pool_rejects_bad_kernels():
    enc = make_encoding(torch.randn(16, 2), grid=(4, 4))
    for bad in (0, 5, "2", 1.5, (1, 2, 3), (0, 2), (2, 5)):
        with pytest.raises(ValueError, match="kernel"):
            pool(enc, bad)


# --- random keep ---------------------------------------------------------------------------


def test_random_keep_is_reproducible_per_seed_and_differs_across_seeds(coffee_enc):
    a = random_keep(coffee_enc, 64, seed=1)
    assert torch.equal(a.extra["kept"], random_keep(coffee_enc, 64, seed=1).extra["kept"])
    assert not torch.equal(a.extra["kept"], random_keep(coffee_enc, 64, seed=2).extra["kept"])
    kept = a.extra["kept"]
    assert kept.numel() == 64 and kept.unique().numel() == 64
    assert torch.equal(kept, kept.sort().values)
    assert a.kind == "prune" and torch.equal(a.tokens, coffee_enc.tokens[kept])


# --- registry, exports and argument checks -------------------------------------------------

NEW = ["prumerge", "prumerge_plus", "visionzip", "divprune", "pool", "random_keep"]


def test_new_strategies_are_registered_and_exported():
    for name in NEW:
        assert name in STRATEGIES
        assert getattr(compress, name) is not None
    assert {n for n in NEW if STRATEGIES[n].adaptive} == {"prumerge", "prumerge_plus"}


def test_adaptive_at_budget_ignores_the_budget(coffee_enc):
    a = run_at_budget("prumerge", coffee_enc, 10)
    b = run_at_budget("prumerge", coffee_enc, 500)
    assert a.num_out == b.num_out and torch.equal(a.assign, b.assign)


def test_models_without_cls_need_another_score():
    enc = make_encoding(torch.randn(16, 4), grid=(4, 4))  # cls_attn None
    with pytest.raises(ValueError, match="no CLS token"):
        prumerge(enc)
    with pytest.raises(ValueError, match="no CLS token"):
        visionzip(enc, 4)
    for name in NEW:  # the registry falls back to the attention received
        out = run_at_budget(name, enc, 4)
        assert torch.allclose(out.assign.sum(dim=1), torch.ones(out.num_out), atol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda e: visionzip(e, 0), "target"),
        (lambda e: visionzip(e, 7), "target"),
        (lambda e: visionzip(e, 3, dominant_ratio=1.5), "dominant_ratio"),
        (lambda e: visionzip(e, 3, score="query"), "score"),
        (lambda e: divprune(e, 0), "target"),
        (lambda e: divprune(e, 2.5), "target"),
        (lambda e: random_keep(e, 7), "target"),
        (lambda e: random_keep(e, 2, seed=-1), "seed"),
        (lambda e: prumerge(e, neighbours=-1), "neighbours"),
        (lambda e: prumerge(e, attention="max"), "attention"),
        (lambda e: prumerge(e, plus="yes"), "plus"),
        (lambda e: prumerge(e, plus=True, plus_ratio=-1), "plus_ratio"),
    ],
)
def test_arguments_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call(pm_enc())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", NEW)
def test_cpu_gpu_parity(coffee_enc, name):
    import dataclasses

    fields = {f.name: getattr(coffee_enc, f.name) for f in dataclasses.fields(coffee_enc)
              if f.name != "memo"}
    moved = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
    moved["device"] = torch.device("cuda")
    gpu = dataclasses.replace(coffee_enc, **moved)
    a = run_at_budget(name, coffee_enc, 64)
    b = run_at_budget(name, gpu, 64)
    assert b.tokens.device.type == "cuda"
    assert a.num_out == b.num_out
    assert torch.allclose(a.assign, b.assign.cpu(), atol=1e-4)


def test_cosine_gram_is_the_full_symmetric_product():
    from compress.prune import cosine_gram

    unit_rows = F.normalize(torch.randn(10, 4), dim=-1)
    gram = cosine_gram(unit_rows, block=3)  # blocks that do not divide N
    assert torch.allclose(gram, unit_rows @ unit_rows.T, atol=1e-6)
    assert torch.equal(gram, gram.T)
