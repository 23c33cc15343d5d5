"""The seven-point checklist (Argenziano et al., Arch. Dermatol. 1998) from criteria probabilities.

Major criteria count 2 points (atypical pigment network, blue-whitish veil, atypical vascular
pattern), minor criteria 1 point (irregular streaks, irregular pigmentation, irregular dots and
globules, regression structures). A total of 3 or more suggests melanoma. A model with one head
per criterion (`model.labels.CRITERIA_LABELS`) gives the probability of each melanoma-specific
pattern; the expected score is the points-weighted sum of those probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .labels import CRITERIA_LABELS

# criterion -> (the label that scores, points)
SEVEN_POINT: dict[str, tuple[str, int]] = {
    "pigment_network": ("atypical", 2),
    "blue_whitish_veil": ("present", 2),
    "vascular_structures": ("irregular", 2),
    "streaks": ("irregular", 1),
    "pigmentation": ("irregular", 1),
    "dots_and_globules": ("irregular", 1),
    "regression_structures": ("present", 1),
}
MELANOMA_SCORE_THRESHOLD = 3


def criterion_probability(criterion: str, probabilities: np.ndarray) -> np.ndarray:
    """P(the melanoma-specific pattern) of one criterion from its head's (N, n_labels) probabilities."""
    label, _ = SEVEN_POINT[criterion]
    return np.asarray(probabilities)[..., CRITERIA_LABELS[criterion].index(label)]


def seven_point_score(head_probabilities: Mapping[str, np.ndarray]) -> np.ndarray:
    """Expected seven-point checklist score (N,) in [0, 10] from every criterion head's probabilities.

    Args:
        head_probabilities: criterion name -> (N, n_labels) calibrated probabilities, label order
            as `CRITERIA_LABELS`. All seven criteria are required.

    Raises:
        KeyError: a criterion head is missing.
    """
    missing = set(SEVEN_POINT) - set(head_probabilities)
    if missing:
        raise KeyError(f"seven-point score needs every criterion head; missing {sorted(missing)}")
    return sum(points * criterion_probability(name, head_probabilities[name]) for name, (_, points) in SEVEN_POINT.items())


def seven_point_score_from_labels(labels: Mapping[str, str]) -> int:
    """The checklist score of one lesion from its criteria labels (grouped names of CRITERIA_LABELS)."""
    return sum(points for name, (label, points) in SEVEN_POINT.items() if labels[name] == label)
