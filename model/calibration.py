"""Where a model folder's calibration lives in its config (shared by evaluation, zoo and cards).

MelanomaViTConfig declares `temperature`. transformers 5 drops an undeclared config key named
`temperature` (it takes it for a generation setting), so configs that do not declare it
(TimmWrapper baselines) store the fitted value as `calibration_temperature`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TEMPERATURE_KEYS: tuple[str, ...] = ("temperature", "calibration_temperature")


def config_temperature(config: Any) -> float | None:
    """Fitted temperature T (probabilities = softmax(logits / T)), or None when uncalibrated.

    Accepts a PretrainedConfig or a config.json dict. T == 1.0 counts as uncalibrated because
    it is MelanomaViTConfig's default.
    """
    for key in TEMPERATURE_KEYS:
        t = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if t is not None and float(t) != 1.0:
            return float(t)
    return None
