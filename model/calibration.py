"""A model folder's calibration: one stored form, and the one rule that folds a fitted temperature into the head.

The form: the classifier head(s) are calibrated in their weights. A temperature T fitted on the raw
logits (`train/evaluate.py --write-config`, `train/multisource.py` export, the stock ViT export) is
folded in by `fold_temperature`: `softmax((W x + b) / T) == softmax((W / T) x + b / T)`, so the
model's own logits are calibrated and every consumer that applies a plain softmax (`pipeline`, the Hub
widget and inference API, the model card snippet, `model.classifier`) gives the same calibrated
probabilities without remote code. config.json records the fitted value under `folded_temperature`
(and `folded_head_temperatures` for a multi-source MelanomaViT's extra heads), for the record only.

Older folders stored a temperature still to apply, under `temperature` (MelanomaViTConfig),
`calibration_temperature` (configs that do not declare `temperature`: transformers 5 drops an
undeclared key of that name) or `head_temperatures`. Nothing applies those any more: the classifier
refuses such a folder (`unfolded_temperatures`), and `fold_temperature(model)` migrates it once.
Every folder under models/ is in the one form (no temperature left to apply).
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
    ResNetForImageClassification,
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


def folded_head_temperatures(config: Any) -> dict[str, float]:
    """The fitted temperatures already folded into the extra heads, by head name ({} when none)."""
    return {name: float(t) for name, t in (_get(config, FOLDED_HEADS_KEY) or {}).items()}


def unfolded_temperatures(config: Any) -> dict[str, Any]:
    """The temperatures an older config still asks to apply, {key: value} ({} for the one stored form)."""
    found: dict[str, Any] = {}
    key = config_temperature_key(config)
    if key is not None:
        found[key] = float(_get(config, key))
    if _get(config, "head_temperatures"):
        found["head_temperatures"] = dict(_get(config, "head_temperatures"))
    return found


def temperature_key(config: Any) -> str:
    """The config key a temperature to apply is stored under: `temperature` where the config class declares
    it (MelanomaViTConfig), else `calibration_temperature`."""
    declared = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    return "temperature" if "temperature" in declared else "calibration_temperature"


def store_temperature(config: Any, temperature: float) -> None:
    """Store a fitted temperature to apply (not yet folded) under `temperature_key(config)`, in place.

    Transitional, for train/multisource.py's export (store, then `fold_temperature(model)`): pass the
    temperature to `fold_temperature` instead; nothing applies a stored temperature any more."""
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
    elif isinstance(model, ResNetForImageClassification):
        main = [model.classifier[-1]]  # Sequential(Flatten, Linear)
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


def fold_temperature(
    model: PreTrainedModel,
    temperature: float | None = None,
    head_temperatures: Mapping[str, float] | None = None,
) -> PreTrainedModel:
    """Fold fitted temperatures into the classifier head(s), in place; returns `model`.

    Args:
        model: a classifier with a linear head (`classifier_heads`).
        temperature: T fitted on the main head's raw logits (an earlier fold already undone, as
            train/evaluate.py's logits are): W, b -> W / T, b / T, replacing any earlier fold of the
            main head. None: fold what an older config still stores to apply (`temperature` /
            `calibration_temperature` / `head_temperatures`), the one-time migration of such a folder
            and what `store_temperature` callers rely on.
        head_temperatures: a MelanomaViT's extra heads by name, each fitted on that head's raw logits
            and replacing its earlier fold; heads not named keep theirs.

    The config then records `folded_temperature` (and `folded_head_temperatures`) and no temperature to
    apply (`temperature` = 1.0, `calibration_temperature` and `head_temperatures` removed), so softmax over
    the logits is calibrated and the predicted class is unchanged. With nothing to fold the model is
    returned as is.

    Raises:
        ValueError: with `temperature` None, when the config records a folded temperature and also has one
            to apply: was it fitted on the raw or on the folded logits? Pass the temperature instead.
    """
    config = model.config
    if temperature is None and head_temperatures is None:
        return _fold_stored(model)
    if _get(config, "head_temperatures") or config_temperature(config) is not None:
        raise ValueError(f"The config still stores temperatures to apply ({unfolded_temperatures(config)}): "
                         "fold those first (fold_temperature(model)), then pass the new ones.")
    main, extra = classifier_heads(model)
    if temperature is not None:
        _check_positive("temperature", temperature)
        previous = folded_temperature(config)
        _scale(main, float(temperature) / (previous or 1.0), fold=True)
        setattr(config, FOLDED_KEY, float(temperature))
    if head_temperatures:
        folded = folded_head_temperatures(config)
        for name, head_t in head_temperatures.items():
            if name not in extra:
                raise ValueError(f"No extra head {name!r} to fold a temperature into; heads: {sorted(extra)}.")
            _check_positive(f"head_temperatures[{name!r}]", head_t)
            _scale([extra[name]], float(head_t) / folded.get(name, 1.0), fold=True)
            folded[name] = float(head_t)
        setattr(config, FOLDED_HEADS_KEY, folded)
    return model


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not float(value) > 0:
        raise ValueError(f"{name} must be a float > 0, got {value!r}.")


def _fold_stored(model: PreTrainedModel) -> PreTrainedModel:
    """Fold the temperatures an older config stores to apply (see `fold_temperature`)."""
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
        unset_config_key(config, key)
    return model


def _clear_temperatures(config: Any) -> None:
    """No temperature left to apply: declared fields back to their defaults, undeclared keys removed."""
    if temperature_key(config) == "temperature":
        config.temperature = 1.0
    unset_config_key(config, "calibration_temperature")
    if _get(config, "head_temperatures") is not None:
        config.head_temperatures = None


def unset_config_key(config: Any, key: str) -> None:
    """Remove `key` from a config: a declared field back to None, an undeclared key deleted."""
    declared = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    if key in declared:
        setattr(config, key, None)
    elif key in vars(config):
        delattr(config, key)
