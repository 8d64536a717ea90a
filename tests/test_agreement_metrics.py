"""Task-agreement metrics (saliency benchmark definitions), each pinned on a hand-sized map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compress.metrics import (
    KL_EPS,
    saliency_agreement,
    saliency_cc,
    saliency_kl,
    saliency_sim,
    top_iou,
    top_set,
)


def test_cc_by_hand():
    """a = [1 2; 3 4], b = [1 3; 2 4]: both means 2.5.

    deviations a: -1.5 -0.5 0.5 1.5; b: -1.5 0.5 -0.5 1.5
    sum(da db) = 2.25 - 0.25 - 0.25 + 2.25 = 4; sum(da^2) = sum(db^2) = 5; CC = 4 / 5 = 0.8.
    """
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    assert saliency_cc(a, b) == pytest.approx(0.8, abs=1e-12)
    assert saliency_cc(a, 2 * b + 7) == pytest.approx(0.8, abs=1e-12)  # affine-invariant
    assert saliency_cc(a, a.flip(0).flip(1)) == pytest.approx(-1.0, abs=1e-12)  # [4 3; 2 1]
    assert math.isnan(saliency_cc(a, torch.ones(2, 2)))  # no variance: undefined, as the benchmark


def test_kl_by_hand_and_its_direction():
    """P = ref = [1, 3] / 4 = [0.25, 0.75], Q = other = [1, 1] / 2 = [0.5, 0.5].

    KL = 0.25 ln(0.25 / 0.5) + 0.75 ln(0.75 / 0.5) = -0.17329 + 0.30410 = 0.130812...
    Swapped (P = [0.5, 0.5], Q = [0.25, 0.75]): 0.5 ln 2 + 0.5 ln(2/3) = 0.143841...: P is the reference.
    """
    ref, other = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])
    assert saliency_kl(ref, other) == pytest.approx(0.13081203594113697, abs=1e-12)
    assert saliency_kl(other, ref) == pytest.approx(0.14384103622589042, abs=1e-12)
    assert saliency_kl(ref, 5 * other) == pytest.approx(0.13081203594113697, abs=1e-12)  # sums normalised
    assert abs(saliency_kl(ref, ref)) < 1e-12


def test_kl_eps_is_matlabs():
    """P = [1, 0], Q = [0, 1]: 1 * ln(eps + 1 / (0 + eps)) + 0 = ln(2^52 + 2^-52) = 52 ln 2 = 36.0437."""
    assert KL_EPS == 2.0**-52
    kl = saliency_kl(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert kl == pytest.approx(52 * math.log(2), rel=1e-12)


def test_sim_by_hand():
    """a = [0 1 2 3] -> min-max [0 1/3 2/3 1] -> / sum 2 -> [0 1/6 1/3 1/2].

    b = [3 2 1 0] -> [1/2 1/3 1/6 0]; min(a, b) = [0 1/6 1/6 0]: SIM = 1/3.
    c = [0 0 0 1] -> [0 0 0 1]; min(a, c) = [0 0 0 1/2]: SIM = 1/2.
    """
    a = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert saliency_sim(a, a.flip(0)) == pytest.approx(1 / 3, abs=1e-12)
    assert saliency_sim(a, torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.5, abs=1e-12)
    assert saliency_sim(a, a + 10) == pytest.approx(1.0, abs=1e-12)  # a floor gains nothing
    assert saliency_sim(a, 2 * a) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(saliency_sim(a, torch.full((4,), 0.5)))  # constant: 0 / 0, as the benchmark


def test_top_iou_by_hand():
    """A 4 x 5 map (n = 20), top 10 %: k = ceil(0.1 * 20) = 2 pixels.

    a = 0..19: top set {18, 19} (flat positions). b: a with positions 17 and 18
    swapped, top set {17, 19}: IoU = |{19}| / |{17, 18, 19}| = 1/3.
    c: a with positions 0 and 1 set to 18: the 2nd largest value is 18, and
    every pixel tied with it counts, so the set is {0, 1, 18, 19} (4 > k):
    IoU(a, c) = |{18, 19}| / |{0, 1, 18, 19}| = 1/2.
    """
    a = torch.arange(20.0).reshape(4, 5)
    b = a.flatten().clone()
    b[17], b[18] = 18.0, 17.0
    c = a.flatten().clone()
    c[0] = c[1] = 18.0
    b, c = b.reshape(4, 5), c.reshape(4, 5)
    assert np.flatnonzero(top_set(a)).tolist() == [18, 19]
    assert np.flatnonzero(top_set(c)).tolist() == [0, 1, 18, 19]
    assert top_set(a).shape == (4, 5)
    assert top_iou(a, b) == pytest.approx(1 / 3)
    assert top_iou(a, c) == pytest.approx(1 / 2)
    assert top_iou(a, a) == 1.0
    assert top_set(torch.arange(15.0)).sum() == 2  # k = ceil(1.5) = 2
    assert np.flatnonzero(top_set(a, top=0.25)).tolist() == [15, 16, 17, 18, 19]


@pytest.mark.parametrize("top", [0.0, 1.5, -0.1, "x"])
def test_bad_top_is_a_value_error(top):
    with pytest.raises(ValueError, match="top"):
        top_iou(torch.rand(4, 4), torch.rand(4, 4), top=top)


def test_agreement_returns_all_four_and_checks_shapes():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    out = saliency_agreement(a, b)
    assert out == {"cc": saliency_cc(a, b), "kl": saliency_kl(a, b), "sim": saliency_sim(a, b),
                   "top_iou": top_iou(a, b)}
    with pytest.raises(ValueError, match="same non-empty shape"):
        saliency_agreement(a, torch.ones(3, 3))
