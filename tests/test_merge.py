"""Token merging: the seed's adjacency rule and ToMe's bipartite matching, pinned by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_encoding

from compress import merge_bipartite, merge_threshold
from compress.merge import bipartite_round, connected_components, grid_edges


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def partition(comp) -> set[frozenset[int]]:
    return {frozenset(torch.nonzero(row > 0).flatten().tolist()) for row in comp.assign}


# --- threshold merging (the seed's rule) -------------------------------------------------


def test_threshold_merges_only_adjacent_similar_patches():
    a, b, c = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]
    enc = make_encoding([a, a, b, c, a, b], grid=(2, 3))  # [a a b / c a b]
    out = merge_threshold(enc, 0.9)
    assert partition(out) == {frozenset({0, 1, 4}), frozenset({2, 5}), frozenset({3})}


def test_equal_but_not_adjacent_patches_stay_apart():
    a, b = [1.0, 0.0], [0.0, 1.0]
    enc = make_encoding([a, b, a], grid=(1, 3))
    assert partition(merge_threshold(enc, 0.9)) == {frozenset({0}), frozenset({1}), frozenset({2})}


def test_eight_connectivity_links_diagonals():
    a, b, b2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    enc = make_encoding([a, b, b2, a], grid=(2, 2))  # a's on the diagonal
    assert merge_threshold(enc, 0.9, connectivity=4).num_out == 4
    assert partition(merge_threshold(enc, 0.9, connectivity=8)) == {
        frozenset({0, 3}), frozenset({1}), frozenset({2})
    }


def test_threshold_merging_chains_through_intermediate_patches():
    # 0-20 and 20-40 degrees are similar (cos 20 = 0.94), the ends are not (cos 40 = 0.77),
    # yet all three form one cluster: connected components chain.
    enc = make_encoding([unit(0), unit(20), unit(40)], grid=(1, 3))
    out = merge_threshold(enc, 0.9)
    assert out.num_out == 1
    assert torch.allclose(out.tokens[0], enc.tokens.mean(dim=0))


def test_threshold_is_inclusive_and_merged_token_is_the_mean():
    enc = make_encoding([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]], grid=(1, 3))
    out = merge_threshold(enc, 1.0)  # cosine exactly 1 merges: ">= threshold"
    assert out.num_out == 1
    assert torch.allclose(out.tokens[0], torch.tensor([5 / 3, 0.0]))


def test_threshold_ends():
    torch.manual_seed(0)
    enc = make_encoding(torch.randn(20, 8), grid=(4, 5))
    assert merge_threshold(enc, 1.01).num_out == 20  # > 1 merges nothing
    assert merge_threshold(enc, -1.0).num_out == 1  # everything is >= -1: one component


def test_more_threshold_never_means_fewer_tokens(coffee_enc):
    counts = [merge_threshold(coffee_enc, t).num_out for t in torch.linspace(-1, 1.01, 41).tolist()]
    assert counts == sorted(counts)
    assert counts[0] == 1 and counts[-1] == coffee_enc.num_patches


def test_connected_components_long_snake():
    # A serpentine path through a 6x6 grid: one component, found without one pass per node.
    n = 36
    edges = torch.stack([torch.arange(n - 1), torch.arange(1, n)], dim=1).flip(0)
    assert connected_components(n, edges).unique().numel() == 1
    labels = connected_components(6, torch.tensor([[4, 5], [0, 2]]))
    assert labels.tolist() == [0, 1, 0, 2, 3, 3]  # ordered by smallest member


def test_grid_edges_counts():
    assert grid_edges((3, 4), 4).shape[0] == 3 * 3 + 2 * 4
    assert grid_edges((3, 4), 8).shape[0] == 3 * 3 + 2 * 4 + 2 * 2 * 3


# --- ToMe bipartite soft matching (Bolya et al., ICLR 2023) -----------------------------

# Six tokens: A = positions 0, 2, 4 (even), B = 1, 3, 5 (odd). Angles in degrees.
# Best B for each A: 0 -> 1 (10 deg, cos .985), 2 -> 3 (5 deg, cos .996), 4 -> 1 (35 deg, cos .819).
# Edges ranked: (2->3), (0->1), (4->1).
TOME_ANGLES = [0, 10, 90, 95, 45, 200]


@pytest.mark.parametrize(
    "r, expected",
    [
        (1, [{0}, {1}, {2, 3}, {4}, {5}]),
        (2, [{0, 1}, {2, 3}, {4}, {5}]),
        (3, [{0, 1, 4}, {2, 3}, {5}]),
        (5, [{0, 1, 4}, {2, 3}, {5}]),  # one round removes at most half (r capped at 3)
    ],
)
def test_tome_one_round_is_the_papers_partition(r, expected):
    enc = make_encoding([unit(d) for d in TOME_ANGLES], grid=(2, 3))
    out = merge_bipartite(enc, r=r, metric="tokens")
    assert partition(out) == {frozenset(s) for s in expected}
    assert out.extra["rounds"] == 1


def test_tome_merges_are_size_weighted_means():
    feats = torch.tensor([unit(d) for d in TOME_ANGLES])
    members = torch.eye(6)
    # r=2: 2 -> 3 and 0 -> 1 merge. ToMe's order: unmerged A (4), then B (1+0, 3+2, 5).
    feats, members = bipartite_round(feats, members, 2)
    assert members.sum(dim=1).tolist() == [1, 2, 2, 1]
    assert members[:, 4].tolist() == [1, 0, 0, 0]
    assert members[1].tolist() == [1, 1, 0, 0, 0, 0]
    assert torch.allclose(feats[1], (torch.tensor(unit(0)) + torch.tensor(unit(10))) / 2)
    # Round 2 on [4, {0,1}, {2,3}, 5]: A = (4, {2,3}), B = ({0,1}, 5). 4 (45 deg) is closest
    # to {0,1} (5 deg): cos 40 = .77 beats {2,3} -> {0,1} (cos 87.5 = .04). Sizes weight it.
    feats2, members2 = bipartite_round(feats, members, 1)
    assert members2.sum(dim=1).tolist() == [2, 3, 1]  # [{2,3}], then B: [{0,1,4}, {5}]
    assert members2[1].tolist() == [1, 1, 0, 0, 1, 0]
    expected = (torch.tensor(unit(0)) + torch.tensor(unit(10)) + torch.tensor(unit(45))) / 3
    assert torch.allclose(feats2[1], expected, atol=1e-6)


def test_tome_target_runs_rounds_until_reached(coffee_enc):
    for target in (576, 575, 288, 100, 64, 7, 1):
        out = merge_bipartite(coffee_enc, target=target)
        assert out.num_out == target
        # every output token is the plain mean of the original patches it covers
        members = (out.assign > 0).float()
        means = (members @ coffee_enc.tokens) / members.sum(dim=1, keepdim=True)
        assert torch.allclose(out.tokens, means, atol=1e-4)
    assert merge_bipartite(coffee_enc, target=64).extra["rounds"] == 4  # 288, 144, 72, 64


@pytest.mark.parametrize("target", [1, 7, 64, 200, 575])
def test_tome_target_equals_rounds_of_the_membership_matrix(coffee_enc, target):
    """merge_bipartite tracks membership as a label per patch; it must give the partition,
    sizes and order of repeating bipartite_round (the [T, N] membership matrix) itself."""
    n = coffee_enc.num_patches
    feats = coffee_enc.k[:, coffee_enc.num_prefix:].float().mean(dim=0)
    members = torch.eye(n)
    while members.shape[0] > target:
        t = members.shape[0]
        feats, members = bipartite_round(feats, members, min(t // 2, t - target))
    first = torch.where(members > 0, torch.arange(n), n).amin(dim=1)
    members = members[torch.argsort(first)]
    out = merge_bipartite(coffee_enc, target=target)
    assert torch.equal(out.assign, members / members.sum(dim=1, keepdim=True))
    assert torch.equal(out.extra["sizes"], members.sum(dim=1))


def test_tome_needs_a_budget_and_valid_metric(coffee_enc):
    with pytest.raises(ValueError, match="token budget"):
        merge_bipartite(coffee_enc)
    with pytest.raises(ValueError, match="metric"):
        merge_bipartite(coffee_enc, target=10, metric="values")
    with pytest.raises(ValueError, match="target"):
        merge_bipartite(coffee_enc, target=0)


def test_threshold_rejects_non_numbers(coffee_enc):
    for bad in (float("nan"), float("inf"), "0.9", None):
        with pytest.raises(ValueError, match="threshold"):
            merge_threshold(coffee_enc, bad)
    with pytest.raises(ValueError, match="connectivity"):
        merge_threshold(coffee_enc, 0.9, connectivity=6)
