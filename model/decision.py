"""The top-class decision of a dx classifier: one rule for the app, evaluate.py and predict.py.

A model's calibrated probabilities P(class | image) reflect the class mix it learnt (HAM10000 is
two thirds nevi), so their argmax rarely names a rare class: balanced accuracy suffers. Logit
adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021) decides on
balanced scores instead: softmax(log P - offsets) with offsets = tau * log prior. The config stores
the offsets per class (`dx_decision_offsets`, in the logits' units); P(melanoma) and every shown
probability stay the calibrated softmax: only which class is called "top" changes.

Offsets come from training (`logit_adjustment` in a recipe: the dx head learnt balanced scores
and the export keeps the prior in its bias) or are fitted afterwards on validation predictions
(`train/decision_rule.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DECISION_KEY = "dx_decision_offsets"


def decision_offsets(config: Any, labels: Sequence[str]) -> np.ndarray | None:
    """(C,) offsets in `labels` order from a config (PretrainedConfig or config.json dict), or None
    when the model decides by plain argmax. A config whose offsets miss a label is an error."""
    stored = config.get(DECISION_KEY) if isinstance(config, Mapping) else getattr(config, DECISION_KEY, None)
    if not stored:
        return None
    missing = [name for name in labels if name not in stored]
    if missing:
        raise ValueError(f"{DECISION_KEY} has no offset for {missing}")
    return np.array([float(stored[name]) for name in labels])


def balanced_scores(probs: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """(N, C) probabilities -> (N, C) scores whose argmax is the decision: softmax(log p - offsets)
    (the probabilities themselves without offsets). Rows sum to 1, so they can be summed into
    coarser label sets (e.g. ISIC 2017's three classes) like probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    if offsets is None:
        return probs
    z = np.log(np.clip(probs, 1e-12, None)) - offsets
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
