"""The CSV boundary: one typed `ImageResult` becomes one row of plain values here.

`result_row` gives the model's columns (`result_columns` lists them in order, so a writer knows
its header before the first image): P(melanoma), the threshold flag, the top class, the
not-dermoscopy verdict, every class probability and, for multi-source models, every extra head's
probabilities and the seven-point checklist score. `csv_safe` neutralises spreadsheet formulas
(OWASP "CSV injection"): image ids, paths and error messages come from the user's data.
"""

from __future__ import annotations

from typing import Any

from .classifier import Classifier

from .results import ImageResult

# Cells a spreadsheet would run as a formula (OWASP CSV injection): = + - @ tab CR.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A text cell that starts like a formula gets a leading apostrophe; other values pass unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def head_column(head: str, label: str) -> str:
    """Column of an extra head's label probability, e.g. `p_isic2017_melanoma`."""
    return f"p_{head}_{label}"


def result_columns(entry: Classifier) -> list[str]:
    """The columns `result_row` fills for `entry`'s results, in order."""
    columns = [
        "melanoma_probability", "above_threshold", "threshold", "above_balanced_threshold", "balanced_threshold",
        "top_class", "top_class_name", "top_probability",
        "ood", "ood_level", "ood_score", "model_id",
    ]
    columns += [f"p_{entry.id2label[i]}" for i in range(entry.out_dim)]
    columns += [head_column(head, label) for head, labels in entry.extra_heads.items() for label in labels]
    if entry.has_seven_point:
        columns.append("seven_point_score")
    return columns


def result_row(result: ImageResult) -> dict[str, Any]:
    """One result's cells (keys: `result_columns` of its model); None where a value does not exist
    (no melanoma class, no OOD detector)."""
    ood = result.ood
    row: dict[str, Any] = {
        "melanoma_probability": result.melanoma_probability,
        "above_threshold": result.melanoma,
        "threshold": result.melanoma_threshold,
        "above_balanced_threshold": result.above_balanced,
        "balanced_threshold": result.operating_points.balanced.threshold if result.operating_points else None,
        "top_class": result.label,
        "top_class_name": result.label_name,
        "top_probability": result.probability,
        "ood": ood.is_ood if ood is not None else None,
        "ood_level": ood.level if ood is not None else None,
        "ood_score": ood.score if ood is not None else None,
        "model_id": result.model.model_id,
    }
    row.update({f"p_{code}": p for code, p in result.probabilities.items()})
    heads = result.heads
    if heads is not None:
        for head, probabilities in heads.probabilities.items():
            row.update({head_column(head, label): p for label, p in probabilities.items()})
        if heads.seven_point is not None:
            row["seven_point_score"] = heads.seven_point.score
    return {key: csv_safe(value) for key, value in row.items()}
