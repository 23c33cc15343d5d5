"""A model folder's calibration: one stored form, and the one rule that folds a fitted temperature into the head.

The form: the classifier head(s) are calibrated in their weights. A temperature T fitted on the raw
logits (`train/evaluate.py --write-config`, train/train.py's export) is folded in by `fold_temperature`:
`softmax((W x + b) / T) == softmax((W / T) x + b / T)`, so the model's own logits are calibrated and
every consumer that applies a plain softmax (`pipeline`, the Hub widget and inference API, the model
card snippet, `model.classifier`) gives the same calibrated probabilities without remote code.
config.json records the fitted value under `folded_temperature` (and `folded_head_temperatures` for a
multi-source MelanomaViT's extra heads), for the record only.

Older folders stored a temperature still to apply: `temperature` / `head_temperatures` (MelanomaViT) or
`calibration_temperature` (TimmWrapper and stock ViT exports). Nothing applies those any more; they are
migrated once, at load: MelanomaViT's `from_pretrained` folds its own (the remote code on the Hub does
too), and `model.loading.load_classifier` folds `calibration_temperature` (`migrate`), each with a
warning. `python -m model.calibration <folder>` rewrites such a folder in the stored form. Every folder
under models/ is in the one form.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Mapping, Sequence
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

logger = logging.getLogger(__name__)

FOLDED_KEY = "folded_temperature"
FOLDED_HEADS_KEY = "folded_head_temperatures"
# A temperature still to apply, as older TimmWrapper / stock ViT exports stored it (transformers 5 drops an
# undeclared `temperature` key, so they could not use that name).
LEGACY_KEY = "calibration_temperature"
# The same for MelanomaViT configs (`MelanomaViTConfig` reads them into `unfolded_temperatures`).
MELANOMA_VIT_LEGACY_KEYS = ("temperature", "head_temperatures")


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def folded_temperature(config: Any) -> float | None:
    """The fitted temperature already folded into the main head (for the record), or None."""
    t = _get(config, FOLDED_KEY)
    return None if t is None else float(t)


def folded_head_temperatures(config: Any) -> dict[str, float]:
    """The fitted temperatures already folded into the extra heads, by head name ({} when none)."""
    return {name: float(t) for name, t in (_get(config, FOLDED_HEADS_KEY) or {}).items()}


def unfolded_temperatures(config: Any) -> dict[str, Any]:
    """The temperatures an older config still asks to apply, {key: value} ({} for the one stored form).

    Accepts a config.json dict (as read from disk) or a loaded config; a MelanomaViT config keeps its
    older keys in `unfolded_temperatures` until its model's `from_pretrained` folds them. T == 1.0 counts
    as none (it was MelanomaViTConfig's default).
    """
    if isinstance(config, Mapping):
        found = {key: config.get(key) for key in MELANOMA_VIT_LEGACY_KEYS}
    else:
        found = dict(getattr(config, "unfolded_temperatures", None) or {})
    found[LEGACY_KEY] = _get(config, LEGACY_KEY)
    return {key: value for key, value in found.items() if value and value != 1.0}


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
            main head; None leaves the main head as it is.
        head_temperatures: a MelanomaViT's extra heads by name, each fitted on that head's raw logits
            and replacing its earlier fold; heads not named keep theirs.

    The config then records `folded_temperature` (and `folded_head_temperatures`), so softmax over the
    logits is calibrated and the predicted class is unchanged.

    Raises:
        ValueError: a temperature that is not > 0, an unknown head, or a config that still stores an
            older temperature to apply (`migrate` it first).
    """
    config = model.config
    if unfolded_temperatures(config):
        raise ValueError(f"The config still stores temperatures to apply ({unfolded_temperatures(config)}): "
                         "migrate them first (model.calibration.migrate(model)), then fold the new ones.")
    main, extra = classifier_heads(model)
    if temperature is not None:
        _check_positive("temperature", temperature)
        previous = folded_temperature(config)
        _scale(main, float(temperature) / (previous or 1.0))
        setattr(config, FOLDED_KEY, float(temperature))
    if head_temperatures:
        folded = folded_head_temperatures(config)
        for name, head_t in head_temperatures.items():
            if name not in extra:
                raise ValueError(f"No extra head {name!r} to fold a temperature into; heads: {sorted(extra)}.")
            _check_positive(f"head_temperatures[{name!r}]", head_t)
            _scale([extra[name]], float(head_t) / folded.get(name, 1.0))
            folded[name] = float(head_t)
        setattr(config, FOLDED_HEADS_KEY, folded)
    return model


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not float(value) > 0:
        raise ValueError(f"{name} must be a float > 0, got {value!r}.")


def migrate(model: PreTrainedModel) -> dict[str, Any]:
    """Fold what an older config still stores to apply into the heads, in place, once.

    MelanomaViT: what its `from_pretrained` folds (`unfolded_temperatures`), for a model built from such a
    config without loading. Others: `calibration_temperature`, folded and removed from the config.

    Returns:
        What was folded, {key: value} ({} for a model in the stored form).

    Raises:
        ValueError: the config also records a folded temperature (fitted on the raw or on the folded
            logits? ambiguous: fix config.json by hand).
    """
    config = model.config
    unfolded = unfolded_temperatures(config)
    if not unfolded:
        return {}
    if config.model_type == "melanoma_vit":  # also the remote-code copy of the class
        model.fold_unfolded_temperatures()
        return unfolded
    if folded_temperature(config) is not None:
        raise ValueError(f"config.json records {FOLDED_KEY}={folded_temperature(config)} and also {unfolded} to "
                         f"apply: fitted on the raw or on the folded logits? Remove one of them from config.json.")
    main, _ = classifier_heads(model)
    _scale(main, float(unfolded[LEGACY_KEY]))
    setattr(config, FOLDED_KEY, float(unfolded[LEGACY_KEY]))
    delattr(config, LEGACY_KEY)
    return unfolded


def unset_config_key(config: Any, key: str) -> None:
    """Remove `key` from a config: a declared field back to None, an undeclared key deleted."""
    declared = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    if key in declared:
        setattr(config, key, None)
    elif key in vars(config):
        delattr(config, key)


@torch.no_grad()
def _scale(layers: list[nn.Linear], temperature: float) -> None:
    """Divide each linear layer's weight and bias by `temperature`."""
    for layer in layers:
        for tensor in (layer.weight, layer.bias):
            if tensor is not None:
                tensor.div_(temperature)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m model.calibration <folder>`: rewrite an older model folder in the one stored form."""
    from .loading import load_classifier

    parser = argparse.ArgumentParser(description="Fold the temperatures an older model folder stores to apply into "
                                     "its head weights (the one stored calibration form) and save it in place.")
    parser.add_argument("folder")
    args = parser.parse_args(argv)
    model, _ = load_classifier(args.folder)  # folds at load (see `migrate`)
    model.save_pretrained(args.folder)
    logger.info("%s: stored in the folded form (folded_temperature=%s, folded_head_temperatures=%s)", args.folder,
                folded_temperature(model.config), folded_head_temperatures(model.config) or None)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
