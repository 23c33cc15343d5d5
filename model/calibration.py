"""A model folder's calibration: where its temperature lives, and the one rule that folds it into the head.

The rule: a fitted temperature T is folded into the classifier head(s) when it is stored
(`train/evaluate.py --write-config`, `train/multisource.py` export, the stock ViT export).
`softmax((W x + b) / T) == softmax((W / T) x + b / T)`, so after `fold_temperature` the model's own
logits are calibrated and every consumer that applies a plain softmax (`pipeline`, the Hub widget and
inference API, the model card snippet, the app) gives the same calibrated probabilities without
remote code. The config keeps the fitted value for the record under `folded_temperature` (and
`folded_head_temperatures` for a multi-source MelanomaViT's extra heads), while the temperature still
to apply (`config_temperature`) becomes 1 / absent, so nothing divides twice.

Unfolded configs (older folders) keep working: MelanomaViTConfig declares `temperature`;
transformers 5 drops an undeclared config key named `temperature` (it takes it for a generation
setting), so configs that do not declare it (TimmWrapper baselines, stock ViT/DeiT) store the
temperature to apply as `calibration_temperature`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    PreTrainedModel,
    TimmWrapperForImageClassification,
    ViTForImageClassification,
)

TEMPERATURE_KEYS: tuple[str, ...] = ("temperature", "calibration_temperature")
FOLDED_KEY = "folded_temperature"
FOLDED_HEADS_KEY = "folded_head_temperatures"


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def config_temperature(config: Any) -> float | None:
    """Temperature T still to apply to the logits (probabilities = softmax(logits / T)), or None.

    None for an uncalibrated model and for a folded one (its logits are already divided by T, see
    `folded_temperature`). Accepts a PretrainedConfig or a config.json dict. T == 1.0 counts as none
    because it is MelanomaViTConfig's default.
    """
    key = config_temperature_key(config)
    return None if key is None else float(_get(config, key))


def config_temperature_key(config: Any) -> str | None:
    """The key (one of `TEMPERATURE_KEYS`) holding the temperature still to apply, or None when there is none."""
    for key in TEMPERATURE_KEYS:
        t = _get(config, key)
        if t is not None and float(t) != 1.0:
            return key
    return None


def folded_temperature(config: Any) -> float | None:
    """The fitted temperature already folded into the main head (for the record), or None."""
    t = _get(config, FOLDED_KEY)
    return None if t is None else float(t)


def temperature_key(config: Any) -> str:
    """The config key a temperature to apply is stored under: `temperature` where the config class declares
    it (MelanomaViTConfig), else `calibration_temperature`."""
    declared = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    return "temperature" if "temperature" in declared else "calibration_temperature"


def store_temperature(config: Any, temperature: float) -> None:
    """Store a fitted temperature to apply (not yet folded) under `temperature_key(config)`, in place."""
    setattr(config, temperature_key(config), float(temperature))


def classifier_heads(model: PreTrainedModel) -> tuple[list[nn.Linear], dict[str, nn.Linear]]:
    """The linear layers whose outputs are a classifier's logits.

    Returns:
        (the main head's layers, averaged into `logits` at inference when there are two, e.g. DeiT's CLS
        and distillation heads; a multi-source MelanomaViT's extra heads by name, else {}).

    Raises:
        ValueError: for a model family without a known linear head.
    """
    extra: dict[str, nn.Linear] = {}
    if isinstance(model, TimmWrapperForImageClassification):
        main = [model.timm_model.get_classifier()]
    elif model.config.model_type == "melanoma_vit":  # also the remote-code copy of the class
        main = [model.head] + ([model.head_dist] if model.head_dist is not None else [])
        extra = dict(model.extra_heads.items())
    elif isinstance(model, DeiTForImageClassificationWithTeacher):
        main = [model.cls_classifier, model.distillation_classifier]
    elif isinstance(model, (ViTForImageClassification, DeiTForImageClassification)):
        main = [model.classifier]
    else:
        raise ValueError(f"No known classifier head to fold a temperature into for {type(model).__name__}.")
    for layer in [*main, *extra.values()]:
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{type(model).__name__}'s classifier is {type(layer).__name__}, not nn.Linear.")
    return main, extra


@torch.no_grad()
def _scale(layers: list[nn.Linear], temperature: float, fold: bool) -> None:
    """Divide (fold) or multiply (unfold) each linear layer's weight and bias by `temperature`."""
    for layer in layers:
        for tensor in (layer.weight, layer.bias):
            if tensor is not None:
                tensor.div_(temperature) if fold else tensor.mul_(temperature)


def fold_temperature(model: PreTrainedModel) -> PreTrainedModel:
    """Fold the config's temperature(s) to apply into the classifier head(s), in place; returns `model`.

    Main head(s) W, b -> W / T, b / T with T = `config_temperature(config)`; a MelanomaViT's extra heads
    by their `head_temperatures`. The config then records `folded_temperature` (and
    `folded_head_temperatures`) and no temperature to apply (`temperature` = 1.0, `calibration_temperature`
    and `head_temperatures` removed), so softmax over the logits is calibrated and the predicted class
    is unchanged. A model with nothing to fold (uncalibrated, or folded already) is returned as is.

    Raises:
        ValueError: when the config records a folded temperature and also has one to apply: was it
            fitted on the raw or on the folded logits? Call `unfold_temperature` before storing a
            temperature fitted on raw logits.
    """
    config = model.config
    t = config_temperature(config)
    head_ts = dict(_get(config, "head_temperatures") or {})
    if t is None and not head_ts:
        return model
    if folded_temperature(config) is not None or _get(config, FOLDED_HEADS_KEY):
        raise ValueError(
            f"The config records folded temperatures ({FOLDED_KEY}={folded_temperature(config)}, "
            f"{FOLDED_HEADS_KEY}={_get(config, FOLDED_HEADS_KEY)}) and also temperatures to apply "
            f"(T={t}, head_temperatures={head_ts or None}); refusing to fold twice. Call unfold_temperature "
            "first and store the temperature fitted on the raw logits."
        )
    main, extra = classifier_heads(model)
    if t is not None:
        _scale(main, t, fold=True)
        setattr(config, FOLDED_KEY, t)
    for name, head_t in head_ts.items():
        _scale([extra[name]], float(head_t), fold=True)
    if head_ts:
        setattr(config, FOLDED_HEADS_KEY, {name: float(v) for name, v in head_ts.items()})
    _clear_temperatures(config)
    return model


def unfold_temperature(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `fold_temperature`, in place: the heads give raw logits again and the config stores the
    temperatures to apply. A model without folded temperatures is returned as is."""
    config = model.config
    t = folded_temperature(config)
    head_ts = dict(_get(config, FOLDED_HEADS_KEY) or {})
    if t is None and not head_ts:
        return model
    main, extra = classifier_heads(model)
    if t is not None:
        _scale(main, t, fold=False)
        store_temperature(config, t)
    for name, head_t in head_ts.items():
        _scale([extra[name]], float(head_t), fold=False)
    if head_ts:
        config.head_temperatures = head_ts
    for key in (FOLDED_KEY, FOLDED_HEADS_KEY):
        _unset(config, key)
    return model


def _clear_temperatures(config: Any) -> None:
    """No temperature left to apply: declared fields back to their defaults, undeclared keys removed."""
    if temperature_key(config) == "temperature":
        config.temperature = 1.0
    _unset(config, "calibration_temperature")
    if _get(config, "head_temperatures") is not None:
        config.head_temperatures = None


def _unset(config: Any, key: str) -> None:
    declared = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    if key in declared:
        setattr(config, key, None)
    elif key in vars(config):
        delattr(config, key)
