"""Attention pruning: top-k by CLS attention, attention received, or a chosen query."""

from __future__ import annotations

import pytest
import torch
from conftest import make_encoding

from compress import attention_mass_kept, prune_attention
from compress.prune import attention_scores

CLS = [[0.05, 0.30, 0.10, 0.20, 0.30, 0.05]]  # one head over a 2 x 3 grid


def hand_enc(**kw):
    tokens = torch.arange(12, dtype=torch.float32).reshape(6, 2) + 1
    return make_encoding(tokens, grid=(2, 3), cls_attn=CLS, **kw)


def test_keeps_top_k_by_cls_attention_in_grid_order():
    out = prune_attention(hand_enc(), keep_ratio=0.5)  # k = round(3) = 3
    assert out.extra["kept"].tolist() == [1, 3, 4]
    enc = hand_enc()
    assert torch.equal(out.tokens, enc.tokens[[1, 3, 4]])
    assert out.kind == "prune"
    assert out.kept_mask().tolist() == [False, True, False, True, True, False]


def test_ties_are_broken_by_grid_order():
    out = prune_attention(hand_enc(), keep_ratio=1 / 6)  # k = 1: patches 1 and 4 tie at .30
    assert out.extra["kept"].tolist() == [1]


@pytest.mark.parametrize("ratio, k", [(0.0, 1), (0.01, 1), (0.25, 2), (0.34, 2), (1.0, 6)])
def test_keep_count_is_max_1_round_ratio_n(ratio, k):
    assert prune_attention(hand_enc(), keep_ratio=ratio).num_out == k


def test_attention_mass_kept_is_the_cls_share():
    out = prune_attention(hand_enc(), keep_ratio=0.5)
    assert attention_mass_kept(hand_enc(), out) == pytest.approx(0.80 / 1.0)


def test_head_selection_and_mean_over_heads():
    cls = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.05, 0.05], [0.0, 0.1, 0.1, 0.1, 0.1, 0.6]])
    enc = make_encoding(torch.ones(6, 2), grid=(2, 3), cls_attn=cls, heads=2)
    assert prune_attention(enc, 1 / 6, head=0).extra["kept"].tolist() == [0]
    assert prune_attention(enc, 1 / 6, head=1).extra["kept"].tolist() == [5]
    assert torch.allclose(attention_scores(enc, "cls"), cls.mean(dim=0))
    with pytest.raises(ValueError, match="head"):
        prune_attention(enc, 0.5, head=2)


def test_query_score_is_that_patchs_softmax_row():
    keys = torch.tensor([[1.0, 0], [0, 1.0], [2.0, 0], [0, 2.0]])
    enc = make_encoding(keys, grid=(2, 2))  # queries = keys, scale 1/sqrt(2)
    scores = attention_scores(enc, "query", query=(1, 0))  # patch 2
    expected = torch.softmax(keys @ keys[2] / 2**0.5, dim=0)
    assert torch.allclose(scores, expected, atol=1e-6)
    out = prune_attention(enc, 0.25, score="query", query=2)
    assert out.extra["kept"].tolist() == [2]
    assert out.params["query"] == 2


def test_received_is_mean_attention_over_all_queries():
    keys = torch.tensor([[1.0, 0], [0, 1.0], [2.0, 0], [0, 2.0]])
    enc = make_encoding(keys, grid=(2, 2))
    attn = torch.softmax(keys @ keys.T / 2**0.5, dim=-1)
    assert torch.allclose(attention_scores(enc, "received"), attn.mean(dim=0), atol=1e-6)


def test_model_without_cls_needs_another_score():
    enc = make_encoding(torch.ones(4, 2), grid=(2, 2))  # cls_attn None
    with pytest.raises(ValueError, match="no CLS token"):
        prune_attention(enc, 0.5)
    assert prune_attention(enc, 0.5, score="received").num_out == 2


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half"])
def test_keep_ratio_out_of_range(bad):
    with pytest.raises(ValueError, match="keep_ratio"):
        prune_attention(hand_enc(), bad)


def test_query_outside_grid_is_rejected():
    with pytest.raises(ValueError, match="query"):
        prune_attention(hand_enc(), 0.5, score="query", query=(2, 0))
    with pytest.raises(ValueError, match="query"):
        prune_attention(hand_enc(), 0.5, score="query", query=6)
    with pytest.raises(ValueError, match="query patch"):
        prune_attention(hand_enc(), 0.5, score="query")


def test_real_cls_attention_concentrates_mass(coffee_enc):
    # Keeping a quarter of the patches by CLS attention keeps far more than a quarter of it.
    out = prune_attention(coffee_enc, 0.25)
    assert attention_mass_kept(coffee_enc, out) > 0.4
    full = coffee_enc.attention(slice(0, 1))[:, 0, coffee_enc.num_prefix:]
    assert torch.allclose(full, coffee_enc.cls_attn, atol=1e-6)
