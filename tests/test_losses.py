"""train/losses.py, the one place of the training losses: focal loss, DeiT distillation and the
distillation head, the masked per-head losses of multi-source runs (hand-computed values)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import MelanomaViTForImageClassification
from model.modeling_melanoma_vit import IGNORE_INDEX
from train.losses import FocalLoss, classification_loss, distillation_loss, make_criterion, masked_head_loss

from conftest import tiny_vit


def tiny_model(**overrides) -> MelanomaViTForImageClassification:
    return tiny_vit(**overrides).train()


@pytest.fixture()
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_focal_loss_hand_computed() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 2])
    # p_y by hand: e^2 / (e^2 + 2) and 1 / (2 + e)
    p = torch.tensor([math.exp(2) / (math.exp(2) + 2), 1 / (2 + math.e)])
    expected = ((1 - p) ** 2 * -torch.log(p)).mean()
    torch.testing.assert_close(FocalLoss(gamma=2.0)(logits, target), expected)
    weight = torch.tensor([1.0, 1.0, 3.0])
    expected_w = ((1 - p) ** 2 * -torch.log(p) * torch.tensor([1.0, 3.0])).sum() / 4.0
    torch.testing.assert_close(FocalLoss(gamma=2.0, weight=weight)(logits, target), expected_w)
    # gamma = 0 is (weighted) cross-entropy; IGNORE_INDEX rows are skipped as F.cross_entropy does.
    target_ignore = torch.tensor([0, IGNORE_INDEX])
    torch.testing.assert_close(FocalLoss(0.0, weight)(logits, target_ignore), F.cross_entropy(logits, target_ignore, weight=weight))
    torch.testing.assert_close(FocalLoss(0.0, weight)(logits, target), F.cross_entropy(logits, target, weight=weight))


def test_distillation_losses() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 5.0], [3.0, 0.0, 0.0]])
    torch.testing.assert_close(distillation_loss(student, teacher, "hard", 1.0), F.cross_entropy(student, torch.tensor([2, 0])))
    t = 2.0
    p_t = torch.softmax(teacher / t, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    torch.testing.assert_close(distillation_loss(student, teacher, "soft", t), kl)
    assert distillation_loss(teacher, teacher, "soft", t).abs() < 1e-6


def test_make_criterion_picks_focal_or_cross_entropy() -> None:
    weight = torch.tensor([1.0, 2.0, 3.0])
    ce = make_criterion(0.0, 0.1, weight)
    assert isinstance(ce, torch.nn.CrossEntropyLoss) and ce.label_smoothing == 0.1 and torch.equal(ce.weight, weight)
    focal = make_criterion(2.0, 0.1, weight)
    assert isinstance(focal, FocalLoss) and focal.gamma == 2.0 and focal.label_smoothing == 0.1


def test_classification_loss_of_a_distilled_model(pixels) -> None:
    """Without a teacher both heads learn the labels; with one, DeiT's rule on the distillation head."""
    model_ = tiny_model(use_distillation_token=True)
    out = model_(pixels)
    cls_logits, dist_logits = out.logits, out.distillation_logits
    labels, teacher = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    criterion = torch.nn.CrossEntropyLoss()
    plain = classification_loss(criterion, cls_logits, labels)
    torch.testing.assert_close(plain, F.cross_entropy(cls_logits, labels))
    both = classification_loss(criterion, cls_logits, labels, dist_logits)
    torch.testing.assert_close(both, (F.cross_entropy(cls_logits, labels) + F.cross_entropy(dist_logits, labels)) / 2)
    teacher_logits = F.one_hot(teacher, 7).float() * 5.0
    hard = classification_loss(criterion, cls_logits, labels, dist_logits, teacher_logits, kind="hard", alpha=0.5)
    torch.testing.assert_close(hard, (F.cross_entropy(cls_logits, labels) + F.cross_entropy(dist_logits, teacher)) / 2)
    # A model without a distillation head distils into its CLS head.
    soft = classification_loss(criterion, cls_logits, labels, None, teacher_logits, kind="soft", alpha=0.25, temperature=2.0)
    expected = 0.75 * F.cross_entropy(cls_logits, labels) + 0.25 * distillation_loss(cls_logits, teacher_logits, "soft", 2.0)
    torch.testing.assert_close(soft, expected)
    hard.backward()
    assert model_.head_dist.weight.grad.abs().sum() > 0 and model_.head.weight.grad.abs().sum() > 0


def test_masked_loss_matches_hand_computed_and_masks_gradients() -> None:
    torch.manual_seed(0)
    features = torch.randn(4, 8, requires_grad=True)
    heads = torch.nn.ModuleDict({"dx": torch.nn.Linear(8, 7), "a": torch.nn.Linear(8, 3), "b": torch.nn.Linear(8, 2)})
    logits = {n: h(features) for n, h in heads.items()}
    labels = {"dx": torch.tensor([4, IGNORE_INDEX, 5, 0]), "a": torch.tensor([IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]),
              "b": torch.full((4,), IGNORE_INDEX)}
    loss, counts = masked_head_loss(logits, labels, {"a": 0.5})
    expected = (
        F.cross_entropy(logits["dx"][[0, 2, 3]], torch.tensor([4, 5, 0]))
        + 0.5 * F.cross_entropy(logits["a"][[1]], torch.tensor([2]))
    )
    torch.testing.assert_close(loss, expected)
    assert counts == {"dx": 3, "a": 1, "b": 0}
    loss.backward()
    assert heads["dx"].weight.grad.abs().sum() > 0 and heads["a"].weight.grad.abs().sum() > 0
    assert heads["b"].weight.grad is None or heads["b"].weight.grad.abs().sum() == 0
    # only label-free samples: zero loss that still backpropagates
    empty, _ = masked_head_loss(logits, {"b": labels["b"]}, {})
    assert empty.item() == 0.0 and empty.requires_grad


def test_masked_head_loss_on_melanoma_vit_extra_heads(pixels) -> None:
    heads = {"isic2017": ["melanoma", "nevus", "seborrheic_keratosis"], "pigment_network": ["absent", "typical", "atypical"],
             "streaks": ["absent", "present"]}
    model_ = tiny_model(extra_heads=heads)
    out = model_(pixels)
    logits = {"dx": out.logits, **out.head_logits}
    labels = {"dx": torch.tensor([4, IGNORE_INDEX, 1]), "isic2017": torch.tensor([IGNORE_INDEX, 2, 0]),
              "pigment_network": torch.tensor([1, 1, IGNORE_INDEX]), "streaks": torch.full((3,), IGNORE_INDEX)}
    loss, counts = masked_head_loss(logits, labels, {"pigment_network": 0.5})
    expected = (
        F.cross_entropy(out.logits[[0, 2]], torch.tensor([4, 1]))
        + F.cross_entropy(out.head_logits["isic2017"][[1, 2]], torch.tensor([2, 0]))
        + 0.5 * F.cross_entropy(out.head_logits["pigment_network"][[0, 1]], torch.tensor([1, 1]))
    )
    torch.testing.assert_close(loss, expected)
    assert counts == {"dx": 2, "isic2017": 2, "pigment_network": 2, "streaks": 0}
    # By hand for one term: -log softmax at the label, averaged over the labelled samples.
    log_probs = out.head_logits["isic2017"].log_softmax(-1)
    torch.testing.assert_close(
        F.cross_entropy(out.head_logits["isic2017"][[1, 2]], torch.tensor([2, 0])), -(log_probs[1, 2] + log_probs[2, 0]) / 2
    )
    loss.backward()
    assert model_.extra_heads["isic2017"].weight.grad.abs().sum() > 0 and model_.head.weight.grad.abs().sum() > 0
    grad = model_.extra_heads["streaks"].weight.grad  # every label masked: no gradient at all
    assert grad is None or not grad.any()
