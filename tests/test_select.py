"""VisPruner, CDPruner, DART-style and DPC-kNN: each rule on a case worked out by hand,
against a plain transcription of the authors' loop on random data, and at the edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_encoding

import compress.knn as knn_mod
import compress.select as select_mod
import compress.types as types_mod
from compress import STRATEGIES, cdpruner, dart, dpc_knn, run_at_budget, vispruner
from compress.prune import cosine_gram, prune_attention


def angles(degrees) -> torch.Tensor:
    """Unit 2-D tokens at the given angles: cos(patch i, patch j) = cos(angle_i - angle_j)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


def cosd(deg: float) -> float:
    return math.cos(math.radians(deg))


# --- VisPruner ------------------------------------------------------------------------------

# A 2 x 4 grid. CLS attention ranks p0, p2, p5, then p3 and p7 tie (grid order: p3 first),
# p6, p1, p4. Token angles in degrees:
VIS_CLS = [0.30, 0.05, 0.20, 0.10, 0.02, 0.15, 0.08, 0.10]
VIS_ANGLES = [0, 10, 200, 15, 100, 190, 60, 120]


def vis_enc():
    return make_encoding(angles(VIS_ANGLES), (2, 4), cls_attn=VIS_CLS, num_prefix=1)


def test_vispruner_rounds_by_hand():
    # target 4, ratio 0.25: T_imp = int(1.0) = 1 important (p0), T_div = 3 diverse.
    # Residual in rank order: [p2, p5, p3, p7, p6, p1, p4]; two drops per round.
    # Round 0: A = [p2, p3, p6, p4], B = [p5, p7, p1]. Best cosine to B:
    #   p2 (200) -> p5 (190): cos 10;  p3 (15) -> p1 (10): cos 5;
    #   p6 (60) -> p1 (10): cos 50;    p4 (100) -> p7 (120): cos 20.
    #   Descending: p3, p2, p4, p6 -> drop p3, p2; next list [p4, p6] + [p5, p7, p1].
    # Round 1: A = [p4, p5, p1], B = [p6, p7]:
    #   p4 (100) -> p7: cos 20;  p5 (190) -> p7: cos 70;  p1 (10) -> p6: cos 50.
    #   Descending: p4, p1, p5 -> drop p4, p1; list [p5, p6, p7] has T_div = 3: stop.
    out = vispruner(vis_enc(), 4, important_ratio=0.25, per_round=2)
    assert out.extra["kept"].tolist() == [0, 5, 6, 7]
    assert out.extra["important"].tolist() == [0]
    assert out.extra["diverse"].tolist() == [5, 6, 7]
    assert out.extra["role_code"].tolist() == [1, 0, 0, 0, 0, 2, 2, 2]
    assert out.extra["dropped_round"].tolist() == [-1, 1, 0, 0, 1, -1, -1, -1]
    dup = out.extra["parts"]["duplication"]
    expected = [math.nan, cosd(50), cosd(10), cosd(5), cosd(20), cosd(70), cosd(50), math.nan]
    assert torch.allclose(dup, torch.tensor(expected), atol=1e-6, equal_nan=True)
    assert torch.allclose(out.extra["parts"]["importance"], torch.tensor(VIS_CLS))
    assert torch.equal(out.tokens, vis_enc().tokens[[0, 5, 6, 7]])
    assert out.kind == "prune"


def test_vispruner_default_round_drops_at_most_eight():
    # Default per_round 8: round 0 may drop min(8, 7 - 3) = 4 = all of A = [p2, p3, p6, p4];
    # the list is then B = [p5, p7, p1], already T_div long.
    out = vispruner(vis_enc(), 4, important_ratio=0.25)
    assert out.extra["kept"].tolist() == [0, 1, 5, 7]


def test_vispruner_important_count_is_int_of_target_times_ratio():
    enc = vis_enc()
    assert vispruner(enc, 3, important_ratio=0.5).extra["important"].tolist() == [0]  # int(1.5)
    assert vispruner(enc, 5, important_ratio=0.5).extra["important"].tolist() == [0, 2]  # int(2.5)


@pytest.mark.parametrize("target", [1, 3, 8])
def test_vispruner_ratio_one_is_top_k_by_attention(target):
    enc = vis_enc()
    out = vispruner(enc, target, important_ratio=1.0)
    assert out.extra["kept"].tolist() == prune_attention(enc, target / 8).extra["kept"].tolist()
    assert (out.extra["role_code"] != 2).all()


def test_vispruner_ratio_zero_is_all_diverse_and_target_n_keeps_all():
    enc = vis_enc()
    out = vispruner(enc, 3, important_ratio=0.0)
    assert out.extra["important"].numel() == 0 and out.extra["diverse"].numel() == 3
    full = vispruner(enc, 8)
    assert full.extra["kept"].tolist() == list(range(8))


def test_vispruner_without_cls_needs_received():
    enc = make_encoding(angles(VIS_ANGLES), (2, 4))
    with pytest.raises(ValueError, match="no CLS token; use score='received'"):
        vispruner(enc, 4)
    assert vispruner(enc, 4, score="received").num_out == 4


def reference_vispruner(attn: torch.Tensor, tokens: torch.Tensor, target: int, ratio: float,
                        per_round: int) -> list[int]:
    """The authors' loop (llava_arch.py encode_images), one image, plain Python lists."""
    gram = cosine_gram(F.normalize(tokens.float(), dim=-1))
    ranked = torch.sort(attn, descending=True, stable=True).indices.tolist()
    num_imp = int(target * ratio)
    num_div = target - num_imp
    important, residual = ranked[:num_imp], ranked[num_imp:]
    if num_div == 0:
        residual = []
    while True:
        r = min(per_round, len(residual) - num_div)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        scores = gram[a][:, b].amax(dim=1).tolist()  # their (a @ b^T).max(-1)
        order = sorted(range(len(a)), key=lambda t: -scores[t])  # stable: ties keep A order
        residual = [a[t] for t in order[r:]] + b
    return sorted(important + residual)


@pytest.mark.parametrize("path", ["gram lists", "computed lists", "short lists, relisted often"])
@pytest.mark.parametrize("target, ratio, per_round", [(40, 0.5, 8), (17, 0.25, 3), (60, 0.1, 8),
                                                      (5, 0.0, 8), (200, 0.5, 8)])
def test_vispruner_matches_the_authors_loop_on_random_tokens(monkeypatch, path, target, ratio,
                                                             per_round):
    # Every way of listing each token's most similar (read from the encoding's kept cosine matrix,
    # computed panel by panel without it, or lists so short that tokens run out of partners in B
    # and are listed anew) must give the rule's result.
    if path != "gram lists":
        monkeypatch.setattr(types_mod, "GRAM_KEPT_MAX", 0)
        monkeypatch.setattr(knn_mod, "PANEL", 64)
    if path.startswith("short"):
        monkeypatch.setattr(select_mod, "_LIST", 2)
        monkeypatch.setattr(select_mod, "_RELIST", 4)
    gen = torch.Generator().manual_seed(target)
    tokens = torch.randn(300, 16, generator=gen)
    attn = torch.rand(300, generator=gen)
    enc = make_encoding(tokens, (15, 20), cls_attn=attn, num_prefix=1)
    out = vispruner(enc, target, important_ratio=ratio, per_round=per_round)
    assert out.extra["kept"].tolist() == reference_vispruner(attn, tokens, target, ratio, per_round)
    assert out.num_out == target


# --- CDPruner -------------------------------------------------------------------------------

# Five 3-D tokens on a 1 x 5 grid: p1 is p0 doubled (cosine 1), p3 lies in the p0-p2 plane.
CD_TOKENS = [[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0.6, 0.8, 0], [0.6, 0, 0.8]]


def cd_enc():
    return make_encoding(CD_TOKENS, (1, 5))


def test_cdpruner_pure_diversity_by_hand():
    # q = 1: d^2 starts at 1 everywhere; ties go to the earlier patch -> p0.
    # After p0: d^2 = 1 - cos^2(., p0) = p1 0, p2 1, p3 1 - .36 = .64, p4 .64 -> p2 (gain 1).
    # After p2 (span e0, e1): p1 0, p3 0, p4 .8^2 = .64 -> p4 (gain .64).
    # Then every d^2 is ~0: the kernel is spent (rank 3); fill by relevance (all 1), grid order.
    out = cdpruner(cd_enc(), 4)
    assert out.extra["order"].tolist() == [0, 2, 4, 1]
    assert out.extra["dpp_picks"] == 3
    assert out.extra["kept"].tolist() == [0, 1, 2, 4]
    gain = out.extra["parts"]["marginal_gain"]
    assert gain[[0, 2, 4]].tolist() == pytest.approx([1.0, 1.0, 0.64], abs=1e-6)
    assert abs(float(gain[1])) < 1e-6 and math.isnan(float(gain[3]))
    assert torch.equal(out.extra["parts"]["relevance"], torch.ones(5))
    assert out.extra["query"] is None


def test_cdpruner_relevance_to_a_clicked_patch_by_hand():
    # Query p3: cosines to it are .6, .6, .8, 1, .36 -> q = (s - .36 + 1e-6) / (.64 + 1e-6):
    # q0 = q1 = .375, q2 = .6875, q3 = 1, q4 ~ 1.6e-6.
    # Pick p3 (q^2 = 1). Then d^2 = q^2 (1 - cos^2(., p3)): p0 = p1 = .140625 * .64 = .09,
    # p2 = .47265625 * .36 = .1701..., p4 ~ 2.4e-12 * .87 -> p2.
    # Then p0, p1 lie in the p3-p2 plane (d^2 = 0) and p4's d^2 ~ 1.6e-12 < 1e-10: spent.
    # Fill by relevance: p0 (.375, earlier than p1).
    out = cdpruner(cd_enc(), 3, query=3)
    q = out.extra["parts"]["relevance"]
    assert q.tolist() == pytest.approx([0.375, 0.375, 0.6875, 1.0, 1.5625e-6], abs=1e-5)
    assert out.extra["order"].tolist() == [3, 2, 0]
    assert out.extra["dpp_picks"] == 2
    gain = out.extra["parts"]["marginal_gain"]
    assert float(gain[3]) == pytest.approx(1.0, abs=1e-6)
    assert float(gain[2]) == pytest.approx(0.6875**2 * 0.36, abs=1e-5)
    assert out.params["query"] == 3 and out.extra["query"] == 3
    assert cdpruner(cd_enc(), 3, query=(0, 3)).extra["order"].tolist() == [3, 2, 0]


def reference_dpp_greedy(kernel: torch.Tensor, count: int) -> list[int]:
    """Greedy MAP by brute force: each step adds the item that maximises log det L_S."""
    chosen: list[int] = []
    for _ in range(count):
        best, best_val = -1, -math.inf
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            idx = chosen + [j]
            val = float(torch.logdet(kernel[idx][:, idx]))
            if val > best_val:
                best, best_val = j, val
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("query", [None, 7])
def test_cdpruner_greedy_is_the_log_det_greedy(query):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(30, 12, generator=gen)
    enc = make_encoding(tokens, (5, 6))
    out = cdpruner(enc, 10, query=query)
    unit = F.normalize(tokens.double(), dim=-1)
    q = out.extra["parts"]["relevance"].double()
    sims = (unit @ unit.T).fill_diagonal_(1.0)  # S_ii = 1 exactly, as ours: the first tie -> patch 0
    kernel = q[:, None] * sims * q[None, :]
    assert out.extra["order"].tolist() == reference_dpp_greedy(kernel, 10)
    assert out.extra["dpp_picks"] == 10


def test_cdpruner_gains_never_rise_and_a_full_budget_is_met(coffee_enc):
    out = cdpruner(coffee_enc, 576)
    assert out.num_out == 576 and out.extra["kept"].tolist() == list(range(576))
    picks = out.extra["dpp_picks"]
    assert 0 < picks <= coffee_enc.dim  # the kernel's rank is at most C = 384
    gains = out.extra["parts"]["marginal_gain"][out.extra["order"][:picks]]
    assert (gains[1:] <= gains[:-1] + 1e-9).all()


def test_cdpruner_bad_query():
    with pytest.raises(ValueError, match="query must be between 0 and 4"):
        cdpruner(cd_enc(), 2, query=5)
    with pytest.raises(ValueError, match="query col must be between 0 and 4"):
        cdpruner(cd_enc(), 2, query=(0, 7))


# --- DART-style -----------------------------------------------------------------------------

# 2 x 3 grid. Token angles (degrees) and key L1 norms (one head, keys (norm, 0)):
DART_ANGLES = [0, 90, 180, 45, 135, 270]
DART_KEY_NORMS = [5.0, 1.0, 2.0, 4.0, 3.0, 0.5]


def dart_enc(**kw):
    keys = torch.tensor([[v, 0.0] for v in DART_KEY_NORMS])
    return make_encoding(angles(DART_ANGLES), (2, 3), keys=keys, num_prefix=1, **kw)


def test_dart_pivots_then_least_similar_by_hand():
    # Pivots by key norm: p0 (5), p3 (4). The other 5 - 2 = 3 are split 2 + 1.
    # p0 (0 deg) takes its 2 least similar free patches: p2 (cos 180 = -1), p4 (cos 135 = -.71).
    # p3 (45 deg) takes 1 of the free {p1, p5}: cos 45 = .71 vs cos 225 = -.71 -> p5.
    out = dart(dart_enc(), 5, pivots=2)
    assert out.extra["pivots"].tolist() == [0, 3]
    assert out.extra["kept"].tolist() == [0, 2, 3, 4, 5]
    assert out.extra["owner"].tolist() == [0, -1, 0, 1, 0, 1]
    sim = out.extra["parts"]["pivot_similarity"]
    expected = [1.0, cosd(45), cosd(135), 1.0, cosd(90), cosd(270)]  # best of cos to p0, p3
    assert sim.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.extra["parts"]["key_norm"].tolist() == pytest.approx(DART_KEY_NORMS)


def test_dart_key_norm_is_l1_over_concatenated_heads():
    keys = torch.tensor([[3.0, -4.0], [1.0, 1.0], [0.0, 2.5], [-1.0, 0.0]])  # L1 per head: 7, 2, 2.5, 1
    enc = make_encoding(torch.eye(4), (2, 2), keys=keys, heads=2)  # both heads: L1 summed = 14, 4, 5, 2
    out = dart(enc, 1, pivots=1)
    assert out.extra["parts"]["key_norm"].tolist() == pytest.approx([14.0, 4.0, 5.0, 2.0])
    assert out.extra["kept"].tolist() == [0]


def test_dart_cls_pivots_and_edges():
    cls = [0.1, 0.5, 0.1, 0.1, 0.1, 0.1]
    out = dart(dart_enc(cls_attn=cls), 2, pivots=1, pivot_by="cls")
    # Pivot p1 (90 deg) takes the free patch least similar to it: p5 (270 deg, cos -1).
    assert out.extra["pivots"].tolist() == [1] and out.extra["kept"].tolist() == [1, 5]
    assert "cls_attention" in out.extra["parts"]
    with pytest.raises(ValueError, match="no CLS token; use pivot_by='key_norm'"):
        dart(dart_enc(), 2, pivot_by="cls")
    assert dart(dart_enc(), 1, pivots=4).extra["kept"].tolist() == [0]  # fewer slots than pivots
    assert dart(dart_enc(), 6).extra["kept"].tolist() == list(range(6))
    with pytest.raises(ValueError, match="pivot_by must be one of"):
        dart(dart_enc(), 2, pivot_by="value_norm")
    with pytest.raises(ValueError, match="pivots must be between 1 and 6"):
        dart(dart_enc(), 2, pivots=0)


# --- DPC-kNN --------------------------------------------------------------------------------

# 1-D tokens (C = 1, so d = |x_i - x_j|) on a 1 x 6 grid, k = 2 (the token itself + its nearest).
DPC_X = [0.0, 1.0, 3.0, 10.0, 10.5, 30.0]


def dpc_enc():
    return make_encoding([[v] for v in DPC_X], (1, 6))


def test_dpc_knn_by_hand():
    # Nearest other token: p0 1, p1 1, p2 2, p3 .5, p4 .5, p5 19.5.
    # density = exp(-(0^2 + d^2) / 2): p0 = p1 = e^-.5, p2 = e^-2, p3 = p4 = e^-.125, p5 ~ 0.
    # Denser-than order (ties: earlier patch first): p3, p4, p0, p1, p2, p5.
    # delta: p3 densest -> the largest distance, 30; p4 -> p3 .5; p0 -> p3 10; p1 -> p0 1;
    # p2 -> p1 2; p5 -> p4 19.5.  score = delta * density:
    # p3 26.5, p0 6.07, p1 .607, p4 .441, p2 .271, p5 0.
    out = dpc_knn(dpc_enc(), 2, k=2)
    parts = out.extra["parts"]
    e = math.exp
    assert parts["density"].tolist() == pytest.approx(
        [e(-0.5), e(-0.5), e(-2), e(-0.125), e(-0.125), e(-19.5**2 / 2)], abs=1e-6)
    assert parts["distance"].tolist() == pytest.approx([10, 1, 2, 30, 0.5, 19.5], abs=1e-5)
    assert out.extra["parent"].tolist() == [3, 0, 1, -1, 3, 4]
    # Centres p3, p0; p1, p2 join p0, p4, p5 join p3 (p5: 20 vs 30).
    assert out.extra["centres"].tolist() == [0, 3]
    assert out.extra["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    assert out.tokens[:, 0].tolist() == pytest.approx([4 / 3, (10 + 10.5 + 30) / 3])
    assert parts["centre_distance"].tolist() == pytest.approx([0, 1, 3, 0, 0.5, 20], abs=1e-5)
    assert out.kind == "merge"
    # A third centre: p1 (score .607); p2 now joins p1 (2 < 3).
    three = dpc_knn(dpc_enc(), 3, k=2)
    assert three.extra["centres"].tolist() == [0, 1, 3]
    assert three.extra["labels"].tolist() == [0, 1, 1, 2, 2, 2]


def reference_dpc_knn(x: torch.Tensor, clusters: int, k: int) -> list[int]:
    """TCFormer's cluster_dpc_knn (one image, no noise: the test data has no density ties)."""
    c = x.shape[1]
    dist = torch.cdist(x.double(), x.double()) / c**0.5
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    mask = density[None, :] > density[:, None]
    delta = torch.where(mask, dist, dist.max()).min(dim=-1).values
    centres = (delta * density).topk(clusters).indices
    labels = dist[:, centres].argmin(dim=1)
    labels[centres] = torch.arange(clusters)
    return [int(centres[i]) for i in labels]  # each patch's centre, as a patch index


@pytest.mark.parametrize("panel", [None, 7])
@pytest.mark.parametrize("clusters, k", [(5, 5), (12, 3), (1, 7)])
def test_dpc_knn_matches_tcformer_on_random_tokens(monkeypatch, clusters, k, panel):
    if panel:  # the nearest tokens found panel by panel (as at N = 4096), not in one
        monkeypatch.setattr(knn_mod, "PANEL", panel)
    gen = torch.Generator().manual_seed(clusters)
    x = torch.randn(48, 6, generator=gen)
    out = dpc_knn(make_encoding(x, (6, 8)), clusters, k=k)
    ours = out.extra["centres"][out.extra["labels"]].tolist()
    assert ours == reference_dpc_knn(x, clusters, k)
    members = out.assign > 0
    for row in range(clusters):  # each output is the plain mean of its members
        assert torch.allclose(out.tokens[row], x[members[row]].mean(dim=0), atol=1e-5)


def test_dpc_knn_budget_moves_reuse_the_kept_neighbours():
    # The nearest lists are kept with the encoding (no budget changes them): later budgets and
    # another k on the same encoding still give TCFormer's result.
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(48, 6, generator=gen)
    enc = make_encoding(x, (6, 8))
    for clusters, k in ((5, 5), (12, 5), (3, 20), (8, 5)):
        out = dpc_knn(enc, clusters, k=k)
        assert out.extra["centres"][out.extra["labels"]].tolist() == reference_dpc_knn(x, clusters, k)
    assert sum(isinstance(key, tuple) and key[0] == "nearest_sqdist" for key in enc.memo) == 2


def test_dpc_knn_edges():
    enc = dpc_enc()
    one = dpc_knn(enc, 1, k=2)
    assert one.extra["centres"].tolist() == [3] and one.tokens[0, 0] == pytest.approx(sum(DPC_X) / 6)
    every = dpc_knn(enc, 6, k=2)
    assert torch.equal(every.tokens, enc.tokens) and every.extra["labels"].tolist() == list(range(6))
    # k = 1: only the token itself, density 1 everywhere; ties go to grid order, p0 densest.
    flat = dpc_knn(enc, 2, k=1)
    assert flat.extra["parts"]["density"].tolist() == [1.0] * 6
    assert flat.extra["parent"].tolist()[0] == -1
    with pytest.raises(ValueError, match="k must be between 1 and 6"):
        dpc_knn(enc, 2, k=7)


# --- all four: registry, arguments ----------------------------------------------------------

NEW = {"vispruner": "VisPruner", "cdpruner": "CDPruner", "dart": "DART-style",
       "dpc_knn": "DPC-kNN merging"}


def test_registered_with_their_labels_and_sources():
    for name, label in NEW.items():
        assert STRATEGIES[name].label == label and not STRATEGIES[name].adaptive
        assert "arXiv:" in STRATEGIES[name].source


@pytest.mark.parametrize("name", list(NEW))
@pytest.mark.parametrize("budget", [1, 7, 8])
def test_exact_budget_on_a_small_grid(name, budget):
    enc = make_encoding(angles(VIS_ANGLES), (2, 4), cls_attn=VIS_CLS, num_prefix=1)
    out = run_at_budget(name, enc, budget)
    assert out.num_out == budget and out.assign.shape == (budget, 8)
    parts = out.extra["parts"]
    assert parts and all(v.shape == (8,) for v in parts.values())


BAD = {
    "VisPruner target 0": (lambda e: vispruner(e, 0), "target must be between 1 and 8"),
    "VisPruner ratio > 1": (lambda e: vispruner(e, 4, important_ratio=1.5),
                            "important_ratio must be between 0.0 and 1.0"),
    "VisPruner ratio NaN": (lambda e: vispruner(e, 4, important_ratio=math.nan),
                            "important_ratio must be finite"),
    "VisPruner score": (lambda e: vispruner(e, 4, score="query"), "score must be one of 'cls', 'received'"),
    "VisPruner per_round 0": (lambda e: vispruner(e, 4, per_round=0), "per_round must be at least 1"),
    "CDPruner target 9": (lambda e: cdpruner(e, 9), "target must be between 1 and 8"),
    "CDPruner query pair": (lambda e: cdpruner(e, 2, query=(1, 2, 3)), "query must be a patch index"),
    "DART target 2.5": (lambda e: dart(e, 2.5), "target must be a whole number"),
    "DPC target 0": (lambda e: dpc_knn(e, 0), "target must be between 1 and 8"),
    "DPC k 0": (lambda e: dpc_knn(e, 2, k=0), "k must be between 1 and 8"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_are_clear_value_errors(case):
    call, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        call(vis_enc())


@pytest.mark.parametrize("kind", ["distinct", "many ties", "signed zeros and infinities"])
def test_vispruner_round_order_is_a_stable_descending_sort(kind):
    # A round's next list is A by descending score, ties in list order: the packed-key sort must
    # equal numpy's stable argsort of the negated scores (-0.0 and 0.0 tie, as they compare).
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 300):
        score = rng.standard_normal(n).astype(np.float32)
        if kind == "many ties":
            score = np.round(score).astype(np.float32)
        elif kind.startswith("signed"):
            score[::2] = 0.0
            score[::3] = -0.0
            score[-1] = -np.inf
            score[0] = np.inf
        assert select_mod._descending(score).tolist() == np.argsort(-score, kind="stable").tolist()


def test_vispruner_reuses_the_kept_lists_for_a_new_budget(monkeypatch):
    # Without a kept cosine matrix (large N) the encoding keeps every patch's nearest list; a
    # second budget (another set of important patches) must read them to the rule's result.
    monkeypatch.setattr(types_mod, "GRAM_KEPT_MAX", 0)
    gen = torch.Generator().manual_seed(7)
    tokens, attn = torch.randn(300, 16, generator=gen), torch.rand(300, generator=gen)
    enc = make_encoding(tokens, (15, 20), cls_attn=attn, num_prefix=1)
    for target, ratio in ((40, 0.5), (120, 0.75), (9, 0.3)):
        out = vispruner(enc, target, important_ratio=ratio)
        assert out.extra["kept"].tolist() == reference_vispruner(attn, tokens, target, ratio, 8)
    assert any(isinstance(k, tuple) and k[0] == "nearest_dot" for k in enc.memo)


@pytest.mark.parametrize("target", [64, 144])
def test_vispruner_matches_the_authors_loop_on_real_tokens(coffee_enc, target):
    # DINOv2's patch tokens have many nearly tied cosines, and each round's drops reorder every
    # later A/B split, so any rounding difference grows: the authors' loop on the float64
    # cosine matrix keeps 0-21 other diverse patches of coffee (README, limits). On the same
    # float32 matrix (kept with the encoding at N = 576) ours keeps exactly theirs.
    attn = select_mod.attention_scores(coffee_enc, "cls")
    out = vispruner(coffee_enc, target)
    assert out.extra["kept"].tolist() == reference_vispruner(attn, coffee_enc.tokens, target, 0.5, 8)
