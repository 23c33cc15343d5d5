"""Tests for train/metrics.py (hand-computed values) and train/evaluate.py (end to end)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from train.metrics import (
    DIHEDRAL_VIEWS,
    apply_view,
    bootstrap_auc_ci,
    expected_calibration_error,
    fit_temperature,
    mask_share,
    melanoma_auc,
    multiclass_metrics,
    sensitivity_specificity,
    tempered_probabilities,
    threshold_for_sensitivity,
    tta_probabilities,
)

# ----------------------------------------------------------------------------- binary metrics


def test_auc_hand_computed():
    # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4
    assert melanoma_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # with a tie (counts 1/2): pos {0.2, 0.9, 0.4} vs neg {0.2, 0.5}: 0.5 + 0 + 1 + 1 + 1 + 0 = 3.5 of 6
    assert melanoma_auc([0, 1, 0, 1, 1], [0.2, 0.2, 0.5, 0.9, 0.4]) == pytest.approx(3.5 / 6)


def test_auc_undefined_for_one_class_and_bad_input():
    assert melanoma_auc([0, 0, 0], [0.1, 0.2, 0.3]) is None
    with pytest.raises(ValueError, match="binary"):
        melanoma_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one score per label"):
        melanoma_auc([0, 1], [0.1, 0.2, 0.3])


def test_sensitivity_specificity_at_threshold():
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.5, 0.3, 0.6, 0.2, 0.1, 0.4]
    sens, spec = sensitivity_specificity(y, s, 0.5)  # 0.5 counts as positive
    assert sens == pytest.approx(2 / 3)
    assert spec == pytest.approx(3 / 4)
    assert sensitivity_specificity([0, 0], [0.1, 0.9], 0.5) == (None, 0.5)


def test_threshold_for_sensitivity():
    y = [1, 1, 1, 1, 0, 0, 0]
    s = [0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1]
    # 95% of 4 melanomas needs all 4: highest threshold catching 0.2
    t95 = threshold_for_sensitivity(y, s, 0.95)
    assert t95 == pytest.approx(0.2)
    assert sensitivity_specificity(y, s, t95) == (pytest.approx(1.0), pytest.approx(1 / 3))
    assert threshold_for_sensitivity(y, s, 0.75) == pytest.approx(0.7)
    assert threshold_for_sensitivity(y, s, 0.5) == pytest.approx(0.8)
    assert threshold_for_sensitivity([0, 0], [0.1, 0.2]) is None
    with pytest.raises(ValueError, match="target"):
        threshold_for_sensitivity(y, s, 1.5)


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    y = (rng.random(80) < 0.3).astype(int)
    s = rng.random(80) + 0.4 * y
    auc = melanoma_auc(y, s)
    ci = bootstrap_auc_ci(y, s, n_resamples=200, seed=7)
    assert ci[0] < auc < ci[1]
    assert 0.0 <= ci[0] <= ci[1] <= 1.0
    assert bootstrap_auc_ci(y, s, n_resamples=200, seed=7) == ci
    assert bootstrap_auc_ci(y, s, n_resamples=200, seed=8) != ci
    assert bootstrap_auc_ci([1, 1], [0.2, 0.3]) is None


# ------------------------------------------------------------------------- multiclass metrics


def test_multiclass_metrics_hand_computed():
    y = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 0, 1]
    m = multiclass_metrics(y, p, ["a", "b", "c"])
    # recalls a 2/3, b 1/2, c 0; F1 a 2/3, b 2*(1/3*1/2)/(1/3+1/2) = 0.4, c 0
    assert m["per_class_recall"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 0.0})
    assert m["balanced_accuracy"] == pytest.approx(7 / 18)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 0.0) / 3)
    assert m["labels"] == ["a", "b", "c"]


def test_multiclass_metrics_over_present_classes_only():
    names = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    y = [4, 4, 5, 2]  # ISIC 2017: mel, mel, nv, bkl
    p = [4, 1, 5, 2]  # one melanoma called bcc: a class with no samples, still an error
    m = multiclass_metrics(y, p, names)
    assert m["labels"] == ["bkl", "mel", "nv"]
    assert m["per_class_recall"] == pytest.approx({"bkl": 1.0, "mel": 0.5, "nv": 1.0})
    assert m["balanced_accuracy"] == pytest.approx(2.5 / 3)
    assert m["accuracy"] == pytest.approx(0.75)
    # F1: bkl 1, mel P=1 R=1/2 -> 2/3, nv 1 (bcc not averaged in)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)


# ------------------------------------------------------------------------------- calibration


def test_ece_hand_computed():
    # bin of 0.95: acc 1/2 -> |0.5-0.95| * 2/4; bin of 0.55: acc 1/2 -> |0.5-0.55| * 2/4
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    y = np.array([0, 1, 0, 0])
    assert expected_calibration_error(probs, y, n_bins=15) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)
    # perfectly calibrated: confidence 0.75, 3 of 4 right
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="N, C"):
        expected_calibration_error(probs, np.array([0, 1]))


def _calibrated_logits(n: int = 4000, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2.0
    y = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=g).squeeze(1)
    return z, y


def test_temperature_scaling_recovers_known_temperature():
    z, y = _calibrated_logits()
    assert fit_temperature(z * 3.0, y) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(z / 2.0, y) == pytest.approx(0.5, rel=0.1)
    # scaling brings ECE down
    probs_raw = tempered_probabilities(z * 3.0)
    probs_cal = tempered_probabilities(z * 3.0, fit_temperature(z * 3.0, y))
    assert expected_calibration_error(probs_cal, y.numpy()) < expected_calibration_error(probs_raw, y.numpy()) / 2


def test_temperature_with_views_and_grouped_labels():
    z, y = _calibrated_logits(c=7, seed=3)
    t = fit_temperature(z * 3.0, y)
    # identical views model the same probabilities -> the same temperature
    assert fit_temperature(torch.stack([z * 3.0, z * 3.0], dim=1), y) == pytest.approx(t, rel=1e-4)
    # binary labels (class 4 vs rest) for a 7-class model: still calibrated at T = 1 for z
    groups = np.zeros((2, 7))
    groups[1, 4] = 1
    groups[0, [0, 1, 2, 3, 5, 6]] = 1
    y_bin = (y == 4).long()
    assert fit_temperature(z * 3.0, y_bin, groups=groups) == pytest.approx(3.0, rel=0.2)


# ------------------------------------------------------------------ test-time augmentation


def test_dihedral_views_are_the_eight_distinct_symmetries():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    views = [apply_view(x, i) for i in range(len(DIHEDRAL_VIEWS))]
    assert len(views) == 8
    for a, b in itertools.combinations(views, 2):
        assert not torch.equal(a, b)
    for v in views:  # pixel permutations, nothing interpolated
        assert torch.equal(v.flatten().sort().values, x.flatten())
    # closed under composition: a group (D4)
    for i, j in itertools.product(range(8), repeat=2):
        assert any(torch.equal(apply_view(views[i], j), v) for v in views)
    with pytest.raises(ValueError):
        apply_view(x, 8)


def test_tta_of_invariant_model_equals_no_tta():
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 4)

    def pooled_model(px: torch.Tensor) -> torch.Tensor:  # global average pool: flip/rotation invariant
        return head(px.mean(dim=(-2, -1)))

    px = torch.randn(2, 3, 8, 8)
    no_tta = tta_probabilities(pooled_model, px, 1)
    torch.testing.assert_close(tta_probabilities(pooled_model, px, 8), no_tta)
    torch.testing.assert_close(no_tta, torch.softmax(pooled_model(px), -1))


def test_full_tta_is_invariant_for_any_model():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    px = torch.randn(2, 3, 8, 8)
    ref = tta_probabilities(conv, px, 8)
    assert not torch.allclose(tta_probabilities(conv, px, 1), ref)  # the model itself is not invariant
    for k in range(8):
        torch.testing.assert_close(tta_probabilities(conv, apply_view(px, k), 8), ref)
    with pytest.raises(ValueError, match="--tta"):
        tta_probabilities(conv, px, 9)


# --------------------------------------------------------------------- explanation quality


def test_mask_share_hand_computed():
    assert mask_share(np.array([[1.0, 3.0], [0.0, 0.0]]), np.array([[1, 0], [1, 1]])) == pytest.approx(0.25)
    # uniform map: share = mask area
    mask = np.zeros((4, 4))
    mask[:2, :2] = 1
    mask[3, 3] = 1
    assert mask_share(np.ones((2, 2)), mask) == pytest.approx(5 / 16)
    # bilinear 2 -> 4 upsampling of columns [1, 0] gives [1, 0.75, 0.25, 0]; left half mask
    left = np.zeros((4, 4))
    left[:, :2] = 1
    assert mask_share(np.array([[1.0, 0.0], [1.0, 0.0]]), left) == pytest.approx(1.75 / 2)
    assert mask_share(np.zeros((2, 2)), left) is None
    with pytest.raises(ValueError, match="non-negative"):
        mask_share(-np.ones((2, 2)), left)
