"""knn.nearest: every row's best partners, panel by panel, against the whole matrix."""

from __future__ import annotations

import pytest
import torch

from compress.knn import nearest


@pytest.mark.parametrize("panel", [None, 1, 5, 16, 64])
@pytest.mark.parametrize("n, k", [(50, 6), (37, 37), (9, 20)])
def test_nearest_by_dot_is_each_rows_top_k(panel, n, k):
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(n + k))
    vals, idx = nearest(x, k, "dot", panel=panel)
    full = x @ x.T
    want = full.topk(min(k, n), dim=1).values
    assert vals.shape == idx.shape == (n, min(k, n))
    assert torch.allclose(vals, want, atol=1e-5)
    assert torch.allclose(full.gather(1, idx), vals, atol=1e-5)  # the indices carry the values
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # no partner twice


@pytest.mark.parametrize("panel", [None, 3, 16])
def test_nearest_by_distance_starts_with_itself_and_knows_the_farthest_pair(panel):
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    vals, idx, far = nearest(x, 4, "sqdist", panel=panel, with_extreme=True)
    d2 = torch.cdist(x.double(), x.double()) ** 2
    assert (idx[:, 0] == torch.arange(40)).all() and (vals[:, 0] == 0).all()
    assert torch.allclose(vals.double(), d2.topk(4, dim=1, largest=False).values, atol=1e-4)
    assert far == pytest.approx(float(d2.max()), rel=1e-5)
    assert (vals.diff(dim=1) >= 0).all()  # nearest first


def test_equal_scores_are_listed_by_index():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    _, idx = nearest(x, 3, "dot", panel=2)
    assert idx[0].tolist() == idx[1].tolist() == idx[2].tolist() == [0, 1, 2]
    # 3 itself first (1.0), then two of the three tied zeros (which two is not promised), by index
    assert idx[3, 0] == 3 and idx[3, 1] < idx[3, 2] < 3


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match="'dot' or 'sqdist'"):
        nearest(torch.randn(4, 2), 2, "cosine")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("score", ["dot", "sqdist"])
def test_gpu_lists_match_the_cpu_panels(score):
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(3))
    cpu = nearest(x, 8, score, panel=64, with_extreme=True)
    gpu = nearest(x.cuda(), 8, score, with_extreme=True)
    assert gpu[0].device.type == "cuda"
    assert torch.allclose(cpu[0], gpu[0].cpu(), atol=1e-4)
    assert cpu[2] == pytest.approx(gpu[2], rel=1e-5)
