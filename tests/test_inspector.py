"""The token inspector: what holds a patch, what stands in for a dropped one, and the score parts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_encoding

from compress import STRATEGIES, merge_threshold, prune_attention, run_at_budget
from compress.inspector import describe, inspect_patch, stand_ins


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# 2 x 2 grid; tokens (and keys) by angle: 0 and 10 degrees alike, 90 and 100 alike.
ANGLES = (0, 90, 10, 100)
CLS = [[0.1, 0.4, 0.2, 0.3]]


def enc4():
    return make_encoding([unit(a) for a in ANGLES], grid=(2, 2), cls_attn=CLS)


def test_a_merged_patch_names_its_cluster_and_the_edge_that_merged_it():
    # cos(0, 10 deg) = 0.985 joins patches 0 and 2 (vertical neighbours); 90/100 join 1 and 3.
    enc = enc4()
    out = merge_threshold(enc, 0.98)
    r = inspect_patch(enc, out, (1, 0))  # patch 2
    assert r["kept"] and r["token_patches"] == [0, 2] and r["token_size"] == 2
    assert r["token_weights"] == [0.5, 0.5]
    # the token is the mean of 0 and 10 degrees: 5 degrees off each, cosine cos(5 deg)
    assert r["similarity"] == pytest.approx(math.cos(math.radians(5)), abs=1e-4)
    # CLS attention: the token's patches hold 0.1 + 0.2 of 1.0; the patch (0.2) ranks 3rd of 4
    assert r["token_attention"] == pytest.approx(0.3)
    assert (r["patch_attention"], r["patch_attention_rank"]) == (pytest.approx(0.2), 3)
    edge = r["parts"]["best similarity to a merged neighbour"]
    assert edge["value"] == pytest.approx(math.cos(math.radians(10)), abs=1e-5)
    assert r["held_by"] == [[r["token"], 0.5]]


def test_a_dropped_patch_gets_the_kept_token_nearest_on_the_grid_or_by_key():
    enc = enc4()
    out = prune_attention(enc, 0.5)  # keeps 1 (0.4) and 3 (0.3): both near 90 degrees
    assert out.kept_indices().tolist() == [1, 3]
    # patch 2 at (1, 0): kept patch 3 at (1, 1) is 1 away, patch 1 at (0, 1) is sqrt 2 away
    r = inspect_patch(enc, out, 2)
    assert not r["kept"] and r["role"] == "dropped" and "nearest on the grid" in r["stands_in"]
    assert r["token"] == 1 and r["token_patches"] == [3]  # output 1 is patch 3
    assert r["similarity"] == pytest.approx(math.cos(math.radians(90)), abs=1e-4)  # 10 vs 100 deg
    # by key: 10 degrees is nearer 90 (80 deg apart) than 100 (90 deg apart): output 0, patch 1
    by_key = inspect_patch(enc, out, 2, rule="key")
    assert by_key["token"] == 0 and by_key["token_patches"] == [1] and "by key" in by_key["stands_in"]
    assert by_key["similarity"] == pytest.approx(math.cos(math.radians(80)), abs=1e-4)
    assert r["parts"]["CLS attention"] == {"value": pytest.approx(0.2), "rank": 3}
    assert stand_ins(enc, out).tolist() == [0, 0, 1, 1]
    assert stand_ins(enc, out, "key").tolist() == [0, 0, 0, 1]
    kept = inspect_patch(enc, out, 3)
    assert kept["kept"] and kept["role"] == "kept (top-k)" and kept["token"] == 1


def test_soft_rows_list_every_output_drawing_on_the_patch():
    from compress import resample

    enc = enc4()
    out = resample(enc, 2, heads=1, init="random")
    r = inspect_patch(enc, out, 0)
    weights = [w for _, w in r["held_by"]]
    assert len(r["held_by"]) == 2 and weights == sorted(weights, reverse=True)  # softmax: both > 0
    assert r["token"] == r["held_by"][0][0]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_explains_every_patch_in_json(coffee_enc, name):
    out = run_at_budget(name, coffee_enc, 64)
    for patch in (0, 300, 575):
        r = inspect_patch(coffee_enc, out, patch)
        json.dumps(r)  # plain Python all the way down
        assert 0 <= r["token"] < out.num_out
        assert r["kept"] == bool(out.assign[:, patch].gt(0).any())
        assert patch in r["token_patches"] or not r["kept"]
        text = describe(r, coffee_enc.num_patches)
        assert f"#{r['token']}" in text and ("dropped" in text) != r["kept"]
    assert bool(torch.isfinite(torch.tensor(inspect_patch(coffee_enc, out, 10)["similarity"])))


def test_bad_patch_is_named(coffee_enc):
    out = run_at_budget("pool", coffee_enc, 64)
    with pytest.raises(ValueError, match="query"):
        inspect_patch(coffee_enc, out, 576)
