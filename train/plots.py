"""The evaluation plots (PNG files): ROC with operating points, confusion matrix, reliability diagram
and P(mel) histograms by outcome. train/evaluate.py writes all four; train/report.py embeds the ROC.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from .metrics import ECE_BINS, expected_calibration_error, reliability_bins, sensitivity_specificity  # noqa: E402


def plot_roc(y_mel: np.ndarray, p_mel: np.ndarray, points: dict[str, float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    if y_mel.min() != y_mel.max():
        RocCurveDisplay.from_predictions(y_mel, p_mel, name="melanoma vs rest", ax=ax, plot_chance_level=True)
        for label, t in points.items():
            sens, spec = sensitivity_specificity(y_mel, p_mel, t)
            ax.plot(1 - spec, sens, "o", label=f"{label} (P(mel) >= {t:.3f})")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "ROC undefined: one class only", ha="center")
    ax.set_title("Melanoma ROC (research use only)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(y: np.ndarray, predicted: np.ndarray, data_names: list[str], path: Path) -> None:
    present = sorted(set(y.tolist()) | set(predicted.tolist()))
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(present), 1.0 + 0.8 * len(present)))
    ConfusionMatrixDisplay.from_predictions(
        y, predicted, labels=present, display_labels=[data_names[i] for i in present], ax=ax, colorbar=False
    )
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(y: np.ndarray, curves: dict[str, np.ndarray], path: Path, n_bins: int = ECE_BINS) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for label, probs in curves.items():
        conf, acc, counts = reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == y, n_bins)
        keep = counts > 0
        ece = expected_calibration_error(probs, y, n_bins)
        ax.plot(conf[keep], acc[keep], "o-", label=f"{label} (ECE {ece:.3f})")
    ax.set_xlabel("top-label confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Reliability ({n_bins} bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confidence_hist(y_mel: np.ndarray, p_mel: np.ndarray, threshold: float, path: Path) -> None:
    positive = p_mel >= threshold
    groups = {
        "TP": (y_mel == 1) & positive,
        "FN": (y_mel == 1) & ~positive,
        "FP": (y_mel == 0) & positive,
        "TN": (y_mel == 0) & ~positive,
    }
    fig, axes = plt.subplots(2, 2, figsize=(8, 6), sharex=True)
    bins = np.linspace(0, 1, 21)
    for ax, (name, sel) in zip(axes.ravel(), groups.items()):
        ax.hist(p_mel[sel], bins=bins, color="tab:red" if name in ("TP", "FN") else "tab:blue")
        ax.axvline(threshold, color="k", ls="--", lw=1)
        ax.set_title(f"{name} (n={int(sel.sum())})")
        ax.set_ylabel("images")
    for ax in axes[1]:
        ax.set_xlabel("P(mel)")
    fig.suptitle(f"P(mel) by outcome at threshold {threshold:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
