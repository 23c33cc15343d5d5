"""The one table of evaluation metrics: what train/evaluate.py writes into metrics.json, what the
model card's results table and model-index show (hub_cards/render.py), and which metrics the app's
model details headline (app.py, from the card's model-index).

Rows are in the card's order. A metric measured at a P(mel) threshold names that threshold's key:
its card row and model-index entry exist only when the threshold does. Labels may use
`{threshold}` (that threshold, formatted), `{source}` (where `threshold_val95` came from) and
`{temperature}` (" (T = ...)" when a temperature was fitted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# The one melanoma threshold rule (`train.metrics.threshold_for_sensitivity`): the highest threshold on
# P(mel) whose melanoma sensitivity on validation data is at least TARGET_SENSITIVITY. evaluate.py's
# `threshold_val95`, the shipped `melanoma_threshold`s and the app's flag all follow it.
TARGET_SENSITIVITY = 0.95
THRESHOLD_RULE = f"chosen on validation for {TARGET_SENSITIVITY:.0%} melanoma sensitivity"


@dataclass(frozen=True)
class Metric:
    """One metrics.json value.

    key: its metrics.json key. label: the card's results-table row.
    threshold: key of the P(mel) threshold it is measured at (None: not threshold-dependent).
    ci95: key of its [low, high] 95% confidence interval, shown beside it.
    baseline: key of what a uniform (uninformative) explanation map scores, shown beside it.
    index_type / index_name / index_args: its model-index entry (`EvalResult` metric_type,
        metric_name (default: `label`), metric_args); no entry when index_type is None.
    headline: shown in the app's model details (from the card's model-index).
    """

    key: str
    label: str
    threshold: str | None = None
    ci95: str | None = None
    baseline: str | None = None
    index_type: str | None = None
    index_name: str | None = None
    index_args: dict[str, Any] = field(default_factory=dict)
    headline: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        """Every metrics.json key this row reads."""
        return tuple(k for k in (self.key, self.threshold, self.ci95, self.baseline) if k)


METRICS: tuple[Metric, ...] = (
    Metric("n", "Images (n)"),
    Metric("n_melanoma", "Melanomas among them"),
    Metric("n_validation", "Validation images (temperature / threshold fitting)"),
    Metric("tta", "Test-time augmentation (views)"),
    Metric("melanoma_auc", "Melanoma ROC AUC (mel vs rest)", ci95="melanoma_auc_ci95", index_type="roc_auc",
           headline=True),
    Metric("balanced_accuracy", "Balanced accuracy", index_type="balanced_accuracy", headline=True),
    Metric("accuracy", "Accuracy", index_type="accuracy"),
    Metric("macro_f1", "Macro F1", index_type="f1", index_args={"average": "macro"}),
    Metric("sensitivity_default", "Melanoma sensitivity at P(mel) >= {threshold}", threshold="threshold_default"),
    Metric("specificity_default", "Melanoma specificity at P(mel) >= {threshold}", threshold="threshold_default"),
    Metric("threshold_val95", "Melanoma threshold ({source})"),
    Metric("sensitivity_val95", "Melanoma sensitivity at P(mel) >= {threshold}", threshold="threshold_val95",
           index_type="recall", index_name="Melanoma sensitivity at threshold {threshold}", headline=True),
    Metric("specificity_val95", "Melanoma specificity at P(mel) >= {threshold}", threshold="threshold_val95",
           index_type="specificity", index_name="Melanoma specificity at threshold {threshold}"),
    Metric("ece", "Expected calibration error (ECE)", index_type="ece", index_name="Expected calibration error"),
    Metric("ece_temperature_scaled", "ECE after temperature scaling{temperature}"),
    Metric("rollout_mask_share", "Attention-rollout mass inside the lesion mask",
           baseline="rollout_mask_share_uniform"),
)

#: Every key the table reads; train/evaluate.py must write each (null where undefined).
METRIC_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for metric in METRICS for k in metric.keys))

#: model-index metric types the app headlines.
HEADLINE_TYPES: frozenset[str] = frozenset(m.index_type for m in METRICS if m.headline and m.index_type)
