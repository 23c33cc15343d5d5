"""The training losses, defined once: train.py's one loop calls `multihead_loss` on the logits of
every head a model returns (single-source runs have the dx head only; multi-source runs add a head
per source and the seven-point criteria, each sample labelled for some).

The model's own `forward(labels=...)` only keeps transformers' standard loss contract (cross-entropy
of `logits` by `problem_type`; a distilled MelanomaViT in training averages it over both heads, as
`classification_loss` does without a teacher), for `Trainer` and quick checks; nothing here calls it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from model.modeling_melanoma_vit import IGNORE_INDEX
from train.sources import MAIN_HEAD  # the 7-class diagnosis head every recipe trains (labels in batch["labels"])

DISTILLATION_KINDS = ("hard", "soft")


class FocalLoss(nn.Module):
    """Multiclass focal loss (Lin et al. 2017): mean of (1 - p_y)^gamma * CE(logits, y), CE optionally class-weighted.

    With `weight`, the mean is normalised by the sum of the targets' weights (as `F.cross_entropy`),
    so gamma = 0 gives exactly `F.cross_entropy(logits, y, weight=weight)`.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, C), target (B,) class indices (IGNORE_INDEX rows are skipped) -> scalar loss."""
        keep = target != IGNORE_INDEX
        logits, target = logits[keep].float(), target[keep]
        log_p = F.log_softmax(logits, dim=-1)
        p_y = log_p.gather(1, target[:, None]).squeeze(1).exp()  # (B,)
        ce = F.cross_entropy(logits, target, weight=self.weight, reduction="none", label_smoothing=self.label_smoothing)
        loss = (1.0 - p_y).pow(self.gamma) * ce
        norm = self.weight[target].sum() if self.weight is not None else torch.tensor(float(len(target)))
        return loss.sum() / norm.clamp_min(1e-12)


def make_criterion(focal_gamma: float, label_smoothing: float, class_weights: torch.Tensor | None) -> nn.Module:
    """Focal loss when `focal_gamma` > 0, else cross-entropy; both class-weighted and label-smoothed as given."""
    if focal_gamma > 0:
        return FocalLoss(focal_gamma, class_weights, label_smoothing)
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """DeiT distillation term: CE to the teacher's argmax (hard) or T^2-scaled KL at temperature T (soft)."""
    if kind == "hard":
        return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student_logits.float() / t, dim=-1),
            F.log_softmax(teacher_logits.float() / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


def classification_loss(
    criterion: nn.Module,
    logits: torch.Tensor,
    labels: torch.Tensor,
    distillation_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    *,
    kind: str = "hard",
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The training loss of a classifier's dx head(s).

    Args:
        criterion: `make_criterion`'s loss, applied to float32 logits.
        logits: (B, C) the CLS head's logits (what a model returns in training mode).
        labels: (B,) class indices (IGNORE_INDEX = no label) or (B, C) soft targets (mixup/cutmix).
        distillation_logits: (B, C) a DeiT-style model's distillation head, or None.
        teacher_logits: (B, C) a teacher's logits for DeiT distillation, or None.
        kind, alpha, temperature: distillation "hard" (teacher's argmax) or "soft" (KL at temperature T);
            alpha weighs the distillation term.

    Returns:
        Without a teacher: criterion(logits, labels), averaged with criterion(distillation_logits, labels)
        when there is a distillation head (both heads learn the labels). With a teacher:
        (1 - alpha) * criterion(logits, labels) + alpha * distillation term of the distillation head
        (the CLS head for models without one).
    """
    loss = criterion(logits.float(), labels)
    if teacher_logits is not None:
        student = distillation_logits if distillation_logits is not None else logits
        return (1 - alpha) * loss + alpha * distillation_loss(student, teacher_logits, kind, temperature)
    if distillation_logits is not None:
        return (loss + criterion(distillation_logits.float(), labels)) / 2
    return loss


def masked_head_loss(
    logits: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Sum over heads of weight * mean cross-entropy over the samples labelled for that head.

    Args:
        logits: {head: (B, C_head)}; labels: {head: (B,) class indices, IGNORE_INDEX = no label};
        weights: {head: weight} (default 1).

    Samples with IGNORE_INDEX add nothing; a head with no labelled sample adds an exact zero (and
    no gradient to its parameters). Returns (loss, {head: labelled samples}).
    """
    total = next(iter(logits.values())).sum() * 0.0  # keeps the graph when nothing is labelled
    counts = {}
    for name, y in labels.items():
        keep = y != IGNORE_INDEX
        counts[name] = int(keep.sum())
        if counts[name]:
            ce = F.cross_entropy(logits[name][keep].float(), y[keep], label_smoothing=label_smoothing)
            total = total + weights.get(name, 1.0) * ce
    return total, counts


DISTILLATION = "_distillation"  # a DeiT model's distillation-head logits (training only)


def multihead_loss(
    criterion: nn.Module,
    logits: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    head_weights: Mapping[str, float],
    label_smoothing: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
    *,
    kind: str = "hard",
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The loss of one training batch, for every recipe.

    Args:
        criterion: `make_criterion`'s loss for the dx head (focal / class-weighted / smoothed).
        logits: {MAIN_HEAD: (B, C), extra head: (B, C_head), ..., DISTILLATION: (B, C) for DeiT models}.
        batch: `labels` (B,) dx indices (IGNORE_INDEX = unlabelled) or (B, C) soft targets
            (mixup/cutmix), and (B,) indices for every extra head in `logits`.
        head_weights: head -> loss weight (default 1).
        teacher_logits: (B, C) distillation targets, or None.

    Returns:
        weight(dx) * `classification_loss` of the dx head(s) (0 when no row of the batch has a dx
        label and there is no teacher) + `masked_head_loss` of the extra heads.
    """
    logits = dict(logits)
    student = logits.pop(DISTILLATION, None)
    main, labels = logits.pop(MAIN_HEAD), batch["labels"]
    if labels.ndim == 1 and not (labels != IGNORE_INDEX).any():
        dx = main.sum() * 0.0  # keeps the graph; no label to learn from
        if teacher_logits is not None:
            dx = dx + alpha * distillation_loss(student if student is not None else main, teacher_logits, kind, temperature)
    else:
        dx = classification_loss(criterion, main, labels, student, teacher_logits, kind=kind, alpha=alpha,
                                 temperature=temperature)
    loss = head_weights.get(MAIN_HEAD, 1.0) * dx
    if logits:
        loss = loss + masked_head_loss(logits, {h: batch[h] for h in logits}, head_weights, label_smoothing)[0]
    return loss


def rollout_mask_share(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(share (B,), has_mask (B,) bool): each map's mass inside its lesion mask, sum(map * mask) / sum(map).

    maps: (B, h, w) non-negative (attention rollout, min-max normalised as `model.rollout` returns it);
    masks: (B, h, w) the lesion's share of each cell, negative (NO_MASK) for rows without a mask. The
    cells are the maps' own, so this is `train.metrics.mask_share` (the bench's measure) with the mask
    averaged over each cell instead of the map upsampled. A row whose map is all zero scores 0."""
    has_mask = masks[:, 0, 0] >= 0
    share = (maps * masks.clamp_min(0)).sum(dim=(1, 2)) / maps.sum(dim=(1, 2)).clamp_min(1e-6)
    return share, has_mask


def attention_mask_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The attention target: 1 - mean rollout share inside the lesion over the rows that have a
    mask (`rollout_mask_share`); 0 (graph kept) when no row of the batch has one."""
    share, has_mask = rollout_mask_share(maps, masks)
    if not has_mask.any():
        return maps.sum() * 0.0
    return 1.0 - share[has_mask].mean()
