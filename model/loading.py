"""The one rule for loading a classifier to use it: the app's zoo and train/evaluate.py load here.

Every model family loads with `AutoModelForImageClassification` (importing the `model` package
registers MelanomaViT, so no remote code is trusted); transformers' ViT / DeiT exports get the
eager attention kernel, the only one that returns attention weights for rollout; the image
processor is the PIL backend. Evaluation and serving therefore see the same pixels and logits.
An older folder that stores a temperature still to apply is migrated to the one stored calibration
form here (`model.calibration.migrate`), with a warning naming the command that rewrites it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Model types explained by attention rollout (the others, CNNs, by Grad-CAM).
ROLLOUT_MODEL_TYPES = ("melanoma_vit", "vit", "deit")


def load_classifier(source: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """(model in eval mode on `device`, its image processor) from a local folder or a Hub id."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    from .calibration import migrate

    config = AutoConfig.from_pretrained(source)
    kwargs: dict[str, Any] = {}
    if config.model_type in ("vit", "deit"):
        # transformers' ViT / DeiT return attention weights only with the eager kernel.
        kwargs["attn_implementation"] = "eager"
    model = AutoModelForImageClassification.from_pretrained(source, **kwargs).to(device).eval()
    migrated = migrate(model)  # MelanomaViT's from_pretrained has folded its own already
    if migrated:
        logger.warning("%s: folded the older calibration %s into the head weights; store that form once with "
                       "`python -m model.calibration %s`", source, migrated, source)
    try:
        # The PIL backend: measured ~1.6 ms vs ~90 ms for the torchvision one on a 200x150
        # image to 224 px (2 shared CPU cores); latency matters more than the tiny numeric gap.
        processor = AutoImageProcessor.from_pretrained(source, backend="pil")
    except (TypeError, ValueError):
        processor = AutoImageProcessor.from_pretrained(source)
    return model, processor


def num_prefix_tokens(config: Any) -> int:
    """Tokens before the patch tokens: 1 (CLS) or 2 (CLS + distillation).

    MelanomaViT's config says so; transformers' DeiT always has both tokens (its exports of
    distilled models carry no such config key), ViT only CLS.
    """
    return int(getattr(config, "num_prefix_tokens", 2 if config.model_type == "deit" else 1))
