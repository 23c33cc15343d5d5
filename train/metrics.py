"""Pure metric functions for melanoma classification (numpy / torch in, numbers out).

Ranking and confusion-matrix metrics come from scikit-learn. `evaluate.load("roc_auc")` and
friends wrap the same scikit-learn functions but fetch their scripts from the Hugging Face
Hub, which is unreachable offline (HF_HUB_OFFLINE=1), so scikit-learn is called directly.
What neither library offers (stratified bootstrap CI of the AUC, top-label ECE, temperature
scaling, mask share of an explanation map) is written here.

Conventions: `y_true` are integer class ids, `scores`/`p_mel` are probabilities of melanoma,
a sample is called positive when `score >= threshold` (the convention of `roc_curve`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from model.metrics_schema import TARGET_SENSITIVITY


__all__ = [
    "DISCLAIMER",
    "ECE_BINS",
    "bootstrap_auc_ci",
    "expected_calibration_error",
    "fit_temperature",
    "mask_share",
    "melanoma_auc",
    "multiclass_metrics",
    "reliability_bins",
    "sensitivity_specificity",
    "tempered_probabilities",
    "threshold_for_sensitivity",
]

#: What every evaluation output (metrics.json, the batch report) says of its numbers.
DISCLAIMER = "Research/education tool, not a medical device: these metrics do not support any diagnosis."
#: Equal-width confidence bins of the reported top-label ECE and of the reliability diagram.
ECE_BINS = 15


# ----------------------------------------------------------------------------- binary metrics


def _as_binary(y_true: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} entries but scores has {s.size}; pass one score per label.")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must be binary (1 = melanoma, 0 = other).")
    return y, s


def melanoma_auc(y_true: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> float | None:
    """ROC AUC of melanoma-vs-rest; None when only one class is present (AUC undefined).

    Args:
        y_true: (N,) 1 for melanoma, 0 otherwise.
        scores: (N,) P(mel).
    """
    y, s = _as_binary(y_true, scores)
    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, s))


def bootstrap_auc_ci(
    y_true: np.ndarray | Sequence[int],
    scores: np.ndarray | Sequence[float],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the melanoma AUC.

    Stratified: melanomas and non-melanomas are resampled separately with replacement, each
    to its own count, so every resample keeps the prevalence of the test set and has both
    classes (a plain bootstrap of a small test set can draw resamples without melanoma).
    Deterministic for a given `seed`. Returns (lo, hi) for a (1 - alpha) interval, or None
    when only one class is present.
    """
    y, s = _as_binary(y_true, scores)
    if y.min() == y.max():
        return None
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}.")
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    aucs = np.empty(n_resamples)
    for i in range(n_resamples):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        aucs[i] = roc_auc_score(y[idx], s[idx])
    lo, hi = np.percentile(aucs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def sensitivity_specificity(
    y_true: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float], threshold: float
) -> tuple[float | None, float | None]:
    """(sensitivity, specificity) of `score >= threshold`; None for a class with no samples."""
    y, s = _as_binary(y_true, scores)
    tn, fp, fn, tp = confusion_matrix(y, (s >= threshold).astype(int), labels=[0, 1]).ravel()
    sens = float(tp / (tp + fn)) if tp + fn else None
    spec = float(tn / (tn + fp)) if tn + fp else None
    return sens, spec


def threshold_for_sensitivity(
    y_true: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float], target: float = TARGET_SENSITIVITY
) -> float | None:
    """Highest threshold on P(mel) whose sensitivity is at least `target` (the project's melanoma
    threshold rule with the default target, `model.metrics_schema.TARGET_SENSITIVITY`).

    The highest such threshold gives the best specificity among thresholds meeting the
    target. The threshold is one of the scores (positive means `score >= threshold`), so it
    reaches the target exactly on the data it was chosen on. None when there is no melanoma.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}.")
    y, s = _as_binary(y_true, scores)
    if not y.any():
        return None
    if y.all():
        return float(s.min())
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    # tpr increases along the curve; the first point reaching the target has the highest threshold.
    # The first threshold of roc_curve is +inf (tpr 0), never selected for target > 0.
    i = int(np.argmax(tpr >= target - 1e-12))
    return float(thresholds[i])


def threshold_balanced(y_true: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> float | None:
    """The threshold on P(mel) with the highest sensitivity + specificity (Youden's J); of equal ones
    the highest. None unless both classes are present."""
    y, s = _as_binary(y_true, scores)
    if y.all() or not y.any():
        return None
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    j = tpr - fpr
    i = int(np.argmax(j[1:] >= j[1:].max() - 1e-12)) + 1  # skip roc_curve's +inf point
    return float(thresholds[i])


# ------------------------------------------------------------------------- multiclass metrics


def multiclass_metrics(
    y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int], label_names: Sequence[str]
) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and per-class recall over the classes present in `y_true`.

    A 7-class model tested on ISIC 2017 (only mel/nv/bkl) would otherwise average in four
    classes with no samples; predictions of absent classes still count as errors.

    Args:
        y_true: (N,) class ids into `label_names`.
        y_pred: (N,) predicted class ids into `label_names` (-1 = a class outside them, always wrong).
        label_names: names of the class ids.

    Returns:
        {"labels": present names, "accuracy", "balanced_accuracy" (mean per-class recall),
        "macro_f1", "per_class_recall": {name: recall}}.
    """
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(y_pred).astype(int).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} entries but y_pred has {p.size}.")
    if y.size == 0:
        raise ValueError("No samples to evaluate.")
    present = sorted(set(y.tolist()))
    recalls = recall_score(y, p, labels=present, average=None, zero_division=0)
    with warnings.catch_warnings():
        # Predictions of classes absent from y_true are expected (7-class model, 3-class data):
        # sklearn warns, then averages recall over the classes present in y_true, as wanted.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced_accuracy = float(balanced_accuracy_score(y, p))
    return {
        "labels": [label_names[i] for i in present],
        "accuracy": float(accuracy_score(y, p)),
        "balanced_accuracy": balanced_accuracy,
        "macro_f1": float(f1_score(y, p, labels=present, average="macro", zero_division=0)),
        "per_class_recall": {label_names[i]: float(r) for i, r in zip(present, recalls)},
    }


# ------------------------------------------------------------------------------- calibration


def reliability_bins(
    confidences: np.ndarray, correct: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (mean confidence, accuracy, count) over `n_bins` equal-width bins of (0, 1].

    Bins are right-closed, (k/n, (k+1)/n], as in Guo et al. 2017; empty bins give NaN.
    """
    conf = np.asarray(confidences, dtype=float).ravel()
    corr = np.asarray(correct, dtype=float).ravel()
    if conf.shape != corr.shape:
        raise ValueError("confidences and correct must have the same length.")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_ids = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bin_ids, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bin_ids, weights=conf, minlength=n_bins) / counts
        acc = np.bincount(bin_ids, weights=corr, minlength=n_bins) / counts
    return mean_conf, acc, counts


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error (Guo et al. 2017), in [0, 1].

    ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b| over `n_bins` equal-width bins of
    the top-label confidence max_c p_c; a prediction is correct when argmax_c p_c == y.

    Args:
        probs: (N, C) class probabilities.
        y_true: (N,) class ids.
    """
    probs = np.asarray(probs, dtype=float)
    y = np.asarray(y_true).astype(int).ravel()
    if probs.ndim != 2 or probs.shape[0] != y.size:
        raise ValueError(f"probs must be (N, C) with N = len(y_true) = {y.size}, got {probs.shape}.")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    mean_conf, acc, counts = reliability_bins(conf, correct, n_bins)
    nonempty = counts > 0
    return float(np.sum(counts[nonempty] / y.size * np.abs(acc[nonempty] - mean_conf[nonempty])))


def tempered_probabilities(logits: torch.Tensor | np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of logits / T, averaged over test-time views.

    Args:
        logits: (N, C) or (N, V, C) for V augmented views.
    Returns:
        (N, C) probabilities.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.ndim == 2:
        z = z[:, None]
    return F.softmax(z / temperature, dim=-1).mean(dim=1).numpy()


def fit_temperature(
    logits: torch.Tensor | np.ndarray,
    y_true: torch.Tensor | np.ndarray,
    groups: np.ndarray | None = None,
    max_iter: int = 100,
) -> float:
    """Temperature T minimising the validation NLL of softmax(logits / T) (Guo et al. 2017).

    Optimised with L-BFGS on log T (keeps T > 0). With several test-time views the modelled
    probability is the mean over views of softmax(view logits / T), exactly what is reported.

    Args:
        logits: (N, C) or (N, V, C) model logits (V views).
        y_true: (N,) label ids: model class ids, or ids into `groups` rows.
        groups: optional (K, C) 0/1 matrix mapping the model's C classes onto the K label
            classes (e.g. a binary "other vs mel" label set for a 7-class model): the probability
            of label k is the sum of the probabilities of its model classes.
    Returns:
        The fitted temperature (> 0).
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.ndim == 2:
        z = z[:, None]
    y = torch.as_tensor(np.asarray(y_true), dtype=torch.long)
    if z.ndim != 3 or z.shape[0] != y.numel():
        raise ValueError(f"logits must be (N, C) or (N, V, C) with N = len(y_true), got {tuple(z.shape)}.")
    n_classes = z.shape[-1]
    g = torch.eye(n_classes, dtype=torch.float64) if groups is None else torch.as_tensor(groups, dtype=torch.float64)
    if g.shape[1] != n_classes:
        raise ValueError(f"groups must be (K, {n_classes}), got {tuple(g.shape)}.")
    views = torch.tensor(float(z.shape[1]), dtype=torch.float64)
    # log P(label) = logsumexp over views and the label's model classes - log V
    member = torch.log(g[y])[:, None, :]  # (N, 1, C): 0 for member classes, -inf otherwise

    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        log_p = F.log_softmax(z / log_t.exp(), dim=-1)  # (N, V, C)
        log_p_label = torch.logsumexp((log_p + member).flatten(1), dim=1) - views.log()
        loss = -log_p_label.mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())


# --------------------------------------------------------------------- explanation quality


def mask_share(saliency: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> float | None:
    """Share of an explanation map's mass that falls inside a lesion mask.

    The map is bilinearly upsampled to the mask's size; share = sum(map * mask) / sum(map).
    A uniform map scores mean(mask), the baseline to compare with. None for an all-zero map.

    Args:
        saliency: (h, w) non-negative map, e.g. attention rollout on the patch grid.
        mask: (H, W) lesion mask, values in [0, 1] (1 = lesion).
    """
    s = torch.as_tensor(np.asarray(saliency), dtype=torch.float64)
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float64)
    if s.ndim != 2 or m.ndim != 2:
        raise ValueError(f"saliency and mask must be 2-D, got shapes {tuple(s.shape)} and {tuple(m.shape)}.")
    if (s < 0).any():
        raise ValueError("saliency must be non-negative.")
    up = F.interpolate(s[None, None], size=tuple(m.shape), mode="bilinear", align_corners=False)[0, 0]
    total = up.sum()
    if total <= 0:
        return None
    return float((up * m).sum() / total)
