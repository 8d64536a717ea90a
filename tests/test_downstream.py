"""From a Compression back to the patch grid (hand-checked), and task agreement through the real head."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ASSETS, make_encoding
from PIL import Image

from compress import STRATEGIES, Compression, merge_bipartite, merge_threshold, prumerge, resample
from compress.downstream import (
    agreement_sweep,
    compressed_map,
    patch_tokens,
    reference_map,
    task_agreement,
)
from compress.heads import head_for
from compress.registry import fidelity_sweep, run_at_budget


def hand(tokens, assign, **extra) -> Compression:
    return Compression(tokens=torch.tensor(tokens), assign=torch.tensor(assign), strategy="hand",
                       extra=extra)


@pytest.fixture(scope="module")
def head():
    found = head_for("dinov2-s14")
    assert found is not None
    return found


# --- patch_tokens: hand cases --------------------------------------------------------------


@pytest.mark.parametrize("dropped", ["key", "position", "zero", "mean"])
def test_merge_gives_each_patch_its_cluster_token(dropped):
    """1 x 4 grid, clusters {0, 1} and {2, 3}: tokens [2, 0] and [0, 3]; nothing is dropped."""
    enc = make_encoding([[1, 0], [3, 0], [0, 2], [0, 4]], (1, 4))
    comp = hand([[2.0, 0.0], [0.0, 3.0]], [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    expected = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 3.0]])
    assert torch.equal(patch_tokens(enc, comp, dropped), expected)


PRUNE_TOKENS = [[1, 0], [0, 1], [1, 1], [2, 2]]
# Keys: patch 1's key [0.1, 1] is closest (cosine) to kept patch 3's [0, 1]; patch 2's [1, 0.1] to
# kept patch 0's [1, 0]. On the 1 x 4 grid patch 1 is nearest kept patch 0 and patch 2 nearest
# kept patch 3: the "key" and "position" rules disagree on both dropped patches.
PRUNE_KEYS = [[1, 0], [0.1, 1], [1, 0.1], [0, 1]]


@pytest.mark.parametrize("dropped, expected", [
    ("key", [[1, 0], [2, 2], [1, 0], [2, 2]]),  # patch 1 <- output 1 (patch 3), patch 2 <- output 0
    ("position", [[1, 0], [1, 0], [2, 2], [2, 2]]),  # patch 1 <- output 0, patch 2 <- output 1
    ("zero", [[1, 0], [0, 0], [0, 0], [2, 2]]),
    ("mean", [[1, 0], [1.5, 1], [1.5, 1], [2, 2]]),  # the mean of [1, 0] and [2, 2]
])
def test_pruning_fills_dropped_patches_by_rule(dropped, expected):
    """Keep patches 0 and 3 of a 1 x 4 grid (one-hot rows); a CLS prefix token comes first in the keys."""
    enc = make_encoding(PRUNE_TOKENS, (1, 4), keys=PRUNE_KEYS, num_prefix=1, heads=2)
    comp = hand([[1.0, 0.0], [2.0, 2.0]], [[1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    assert torch.allclose(patch_tokens(enc, comp, dropped), torch.tensor(expected, dtype=torch.float32))


def test_position_ties_go_to_the_earlier_output():
    """1 x 3 grid, keep 0 and 2: patch 1 is 1 away from both, and takes output 0."""
    enc = make_encoding([[1, 0], [5, 5], [0, 1]], (1, 3))
    comp = hand([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0, 0], [0, 0, 1.0]])
    assert patch_tokens(enc, comp, "position")[1].tolist() == [1.0, 0.0]


def test_soft_rows_mix_in_proportion():
    """A = [[.5, .5, 0], [0, .25, .75]], V = [[1, 0], [0, 1]].

    patch 0: only output 0 -> [1, 0]; patch 2: only output 1 -> [0, 1];
    patch 1: (0.5 [1, 0] + 0.25 [0, 1]) / 0.75 = [2/3, 1/3].
    """
    enc = make_encoding([[9, 9], [9, 9], [9, 9]], (1, 3))
    comp = hand([[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]])
    out = patch_tokens(enc, comp)
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [2 / 3, 1 / 3], [0.0, 1.0]]))


def test_latent_space_outputs_are_read_through_what_they_gathered():
    """extra["latent_space"]: V = A @ X = [[1, 1], [4, 4]] for A = [[.5, .5, 0], [0, 0, 1]], X below."""
    enc = make_encoding([[2, 0], [0, 2], [4, 4]], (1, 3))
    assign = [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    latent = hand([[7.0, 7.0, 7.0], [8.0, 8.0, 8.0]], assign, latent_space=True)  # 3-wide: not tokens
    assert torch.allclose(patch_tokens(enc, latent), torch.tensor([[1.0, 1.0], [1.0, 1.0], [4.0, 4.0]]))
    with pytest.raises(ValueError, match="latent_space"):
        patch_tokens(enc, hand([[7.0, 7.0, 7.0], [8.0, 8.0, 8.0]], assign))


def test_bad_arguments_are_value_errors():
    enc = make_encoding([[1, 0], [0, 1]], (1, 2))
    comp = hand([[1.0, 0.0]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="dropped must be one of"):
        patch_tokens(enc, comp, "nearest")
    other = make_encoding([[1, 0], [0, 1], [1, 1]], (1, 3))
    with pytest.raises(ValueError, match="another encoding"):
        patch_tokens(other, comp)


# --- patch_tokens on real strategies -------------------------------------------------------


def test_real_merge_rows_are_cluster_tokens(coffee_enc):
    comp = merge_bipartite(coffee_enc, target=64)
    out = patch_tokens(coffee_enc, comp)
    assert torch.allclose(out, comp.tokens[comp.labels()], atol=1e-6)


def test_resampler_is_flagged_and_prumerge_tokens_are_token_space(coffee_enc):
    comp = resample(coffee_enc, 16)
    assert comp.extra["latent_space"] is True
    assert torch.allclose(patch_tokens(coffee_enc, comp),
                          comp.assign.T @ comp.represented(coffee_enc.tokens)
                          / comp.assign.sum(dim=0)[:, None], atol=1e-5)
    pm = prumerge(coffee_enc)
    # PruMerge's tokens are rows of assign @ x (the code's sum divided by extra["scale"]).
    assert torch.allclose(pm.tokens, pm.represented(coffee_enc.tokens), atol=1e-4)
    assert bool(pm.kept_mask().all())  # the summary token covers every pruned patch


# --- task agreement through the real head --------------------------------------------------


def test_keeping_everything_agrees_perfectly(coffee_enc, head):
    comp = merge_threshold(coffee_enc, 1.01)  # nothing merges: 576 clusters of one patch
    assert comp.num_out == coffee_enc.num_patches
    out = task_agreement(coffee_enc, comp, head)
    assert out["cc"] == pytest.approx(1.0, abs=1e-9)
    assert abs(out["kl"]) < 1e-9
    assert out["sim"] == pytest.approx(1.0, abs=1e-9)
    assert out["top_iou"] == 1.0


def test_reference_map_is_computed_once(coffee_enc, head):
    enc = dataclasses.replace(coffee_enc, memo={})
    first = reference_map(enc, head)
    assert first.shape == (336, 336) and reference_map(enc, head) is first


def test_no_head_or_an_unreadable_encoding_gives_none(coffee_enc, head):
    comp = merge_bipartite(coffee_enc, target=64)
    assert task_agreement(coffee_enc, comp, None) is None
    hand_enc = make_encoding(torch.randn(4, 384), (2, 2))
    assert head.supports(hand_enc) and task_agreement(hand_enc, hand(torch.randn(1, 384).tolist(),
                                                                     [[0.25] * 4]), head) is None
    assert agreement_sweep(hand_enc, head) is None


def test_dropped_rule_changes_the_map_of_a_pruning(coffee_enc, head):
    comp = run_at_budget("random_keep", coffee_enc, 64)
    key, zero = compressed_map(coffee_enc, comp, head, "key"), compressed_map(coffee_enc, comp, head, "zero")
    assert key.shape == zero.shape == (336, 336) and not torch.allclose(key, zero)
    assert task_agreement(coffee_enc, comp, head, "key") == head.compare(reference_map(coffee_enc, head), key)


def test_sweep_points_progress_cache_and_batching(coffee_enc, head):
    names, budgets = ["pool", "random_keep", "prumerge"], [16, 64]
    enc = dataclasses.replace(coffee_enc, memo={})
    seen: list[tuple[int, int]] = []
    curves = agreement_sweep(enc, head, budgets, names, progress=lambda d, t: seen.append((d, t)), batch=4)
    assert list(curves) == names
    total = 2 * (2 + 2 + 1)  # one compression and one map per point; PruMerge is adaptive: one point
    assert seen[-1] == (total, total) and all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))
    fid = fidelity_sweep(enc, budgets, names)
    assert {n: [m for m, _ in pts] for n, pts in curves.items()} == {n: [m for m, _ in pts]
                                                                     for n, pts in fid.items()}
    assert agreement_sweep(enc, head, budgets, names) is curves  # cached on the encoding
    one_by_one = agreement_sweep(dataclasses.replace(coffee_enc, memo={}), head, budgets, names, batch=1)
    for name in names:
        for (m, a), (m1, b) in zip(curves[name], one_by_one[name], strict=True):
            assert m == m1 and all(abs(a[k] - b[k]) < 1e-6 for k in a)
    single = task_agreement(enc, run_at_budget("pool", enc, 16), head)
    assert all(abs(single[k] - curves["pool"][0][1][k]) < 1e-6 for k in single)


def test_sweep_rejects_unknown_strategies(coffee_enc, head):
    with pytest.raises(ValueError, match="strategy must be one of"):
        agreement_sweep(coffee_enc, head, [16], ["nope"])


# --- the CLI's sweep -----------------------------------------------------------------------


def test_cli_sweep_prints_agreement_beside_fidelity(encoder, capsys):
    from compress.__main__ import print_sweep

    enc = encoder.encode(Image.open(ASSETS / "coffee.jpg"), size=112)  # 8 x 8 grid: a quick sweep
    print_sweep(enc, "dinov2-s14")
    out = capsys.readouterr().out
    assert "fidelity and task agreement (saliency CC) against the budget M" in out
    assert out.count("sal. CC") == sum(not s.adaptive for s in STRATEGIES.values())
    assert "top-10% IoU" in out and "not available" not in out


def test_cli_sweep_without_a_head_says_why_in_one_line(coffee_enc, capsys):
    from compress.__main__ import print_sweep

    enc = dataclasses.replace(coffee_enc, memo={}, layer=5)  # as if read from block 5
    print_sweep(enc, "vit_base_patch16_224")
    print_sweep(enc, "dinov2-s14")
    lines = [line for line in capsys.readouterr().out.splitlines() if "task agreement" in line]
    assert lines == [
        "task agreement: not available (no trained head for model 'vit_base_patch16_224': the saliency "
        "decoder was trained on the bundled 'dinov2-s14' backbone only)",
        "task agreement: not available (the head reads the last block's tokens (block 11, after the final "
        "norm); this encoding is from block 5)",
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_maps_match_cpu(coffee_enc, head):
    gpu = dataclasses.replace(coffee_enc, tokens=coffee_enc.tokens.cuda(), memo={})
    on_gpu = head.run(gpu, gpu.tokens)
    assert on_gpu.device.type == "cuda"
    assert (on_gpu.cpu() - head.run(coffee_enc, coffee_enc.tokens)).abs().max() < 1e-4
