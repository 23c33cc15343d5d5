"""Melanoma classification models for the Hugging Face ecosystem (research/education only, not diagnostic).

Importing `model` registers MelanomaViT with transformers' Auto classes, and marks its classes for
`register_for_auto_class` so `save_pretrained` writes `auto_map` and copies the code files: saved
folders then load anywhere with `AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True)`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_melanoma_vit import MelanomaViTConfig
from .modeling_melanoma_vit import (
    MelanomaViTForImageClassification,
    MelanomaViTImageClassifierOutput,
    MelanomaViTModel,
    MelanomaViTPreTrainedModel,
)

AutoConfig.register(MelanomaViTConfig.model_type, MelanomaViTConfig, exist_ok=True)
AutoModel.register(MelanomaViTConfig, MelanomaViTModel, exist_ok=True)
AutoModelForImageClassification.register(MelanomaViTConfig, MelanomaViTForImageClassification, exist_ok=True)

MelanomaViTConfig.register_for_auto_class()
MelanomaViTModel.register_for_auto_class("AutoModel")
MelanomaViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "MelanomaViTConfig",
    "MelanomaViTForImageClassification",
    "MelanomaViTImageClassifierOutput",
    "MelanomaViTModel",
    "MelanomaViTPreTrainedModel",
]
