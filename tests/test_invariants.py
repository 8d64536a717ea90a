"""Invariants every strategy keeps, parametrised over the one strategy list."""

from __future__ import annotations

import pytest
import torch

from compress import STRATEGIES, fidelity, merge_threshold, run_at_budget, summary
from compress.registry import threshold_for_budget

NAMES = list(STRATEGIES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [1, 64, 144, 576])
def test_compression_form(coffee_enc, name, budget):
    out = run_at_budget(name, coffee_enc, budget)
    n, c = coffee_enc.tokens.shape
    m = out.num_out
    assert out.assign.shape == (m, n) and out.tokens.shape == (m, c)
    assert (out.assign >= 0).all()
    assert torch.allclose(out.assign.sum(dim=1), torch.ones(m), atol=1e-5)
    assert out.tokens.device == coffee_enc.tokens.device
    assert out.labels().shape == (n,)
    assert out.ratio == pytest.approx(n / m)
    if name != "merge_threshold" and not STRATEGIES[name].adaptive:
        # merge_threshold's rule has no budget (closest count is checked below); adaptive
        # strategies (PruMerge) choose their own count from the image
        assert m == budget
    if out.kind in ("merge", "soft"):
        assert out.kept_mask().all()  # every patch is covered
    if out.kind == "merge":
        assert ((out.assign > 0).sum(dim=0) == 1).all()  # each patch in exactly one cluster
    s = summary(coffee_enc, out)
    assert 0.0 <= s["fidelity"] <= 1.0 + 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(coffee_enc, name):
    a = run_at_budget(name, coffee_enc, 50)
    b = run_at_budget(name, coffee_enc, 50)
    assert torch.equal(a.assign, b.assign)


def test_threshold_budget_search_finds_the_closest_count(coffee_enc):
    for budget in (5, 58, 200, 500):
        t = threshold_for_budget(coffee_enc, budget)
        got = merge_threshold(coffee_enc, t).num_out
        # no threshold on a fine sweep gets closer
        sweep = [merge_threshold(coffee_enc, x / 200).num_out for x in range(-200, 203)]
        assert abs(got - budget) <= min(abs(s - budget) for s in sweep)


def test_fidelity_is_one_when_nothing_is_lost(coffee_enc):
    assert fidelity(coffee_enc, merge_threshold(coffee_enc, 1.01)) == pytest.approx(1.0, abs=1e-5)


def test_unknown_strategy_and_budget(coffee_enc):
    with pytest.raises(ValueError, match="unknown strategy"):
        run_at_budget("zip", coffee_enc, 10)
    with pytest.raises(ValueError, match="budget"):
        run_at_budget("resample", coffee_enc, 0)


@pytest.mark.parametrize("name", ["prune_attention", "divprune", "random_keep", "cdpruner",
                                  "merge_bipartite"])
def test_fidelity_shortcut_for_selections_gives_the_same_number(coffee_enc, name):
    """Selections read the kept patch-to-patch cosines; the general formula agrees."""
    import torch.nn.functional as F

    out = run_at_budget(name, coffee_enc, 64)
    rep = F.normalize(out.represented(coffee_enc.tokens.float()), dim=-1)
    unit = F.normalize(coffee_enc.tokens.float(), dim=-1)
    assert fidelity(coffee_enc, out) == pytest.approx(float((unit @ rep.T).amax(dim=1).mean()), abs=1e-6)


def test_only_small_encodings_keep_the_cosine_of_every_pair():
    """A server keeps encodings for many people: the N x N cosines are kept up to 2048 patches
    (16 MB), never at 896 px (4096 patches, 64 MB); the numbers are the same either way."""
    from conftest import make_encoding

    from compress.types import GRAM_KEPT_MAX

    gen = torch.Generator().manual_seed(0)
    small = make_encoding(torch.randn(48 * 48, 8, generator=gen)[:GRAM_KEPT_MAX], (32, 64))
    big = make_encoding(torch.randn(64 * 64, 8, generator=gen), (64, 64))
    assert small.cosine_gram() is small.cosine_gram()  # kept
    first = big.cosine_gram()
    assert first is not big.cosine_gram() and ("cosine_gram",) not in big.memo
    unit = torch.nn.functional.normalize(big.tokens.float(), dim=-1)
    assert torch.allclose(first, unit @ unit.T, atol=1e-5)
    out = run_at_budget("divprune", big, 32)  # fidelity's general formula at this size
    rep = torch.nn.functional.normalize(out.tokens.float(), dim=-1)
    assert fidelity(big, out) == pytest.approx(float((unit @ rep.T).amax(dim=1).mean()), abs=1e-6)
