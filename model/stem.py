"""The frozen stem of a classifier: the modules that cached stem features replace.

Training on many epochs at the cost of a few caches the output of a network's first, frozen stages
(train/features.py); a model that reads such a cache has those modules bypassed. Which modules they
are is a fact of the model family, used by training (the cache and the loop) and by the classifier
(`Classifier.predict_proba(features, features=True)`, e.g. a distillation teacher on its own cache):

- TimmWrapper EfficientNet-Lite: `conv_stem`, `bn1`, `blocks.0..4` (stride 16, ImageNet weights);
- hybrid MelanomaViT: its CNN stem (`vit.embeddings.patch_embed.stem`, the same stride-16 map);
- anything else (pure ViT, ResNet without ImageNet weights): no stem, the cache holds pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from .baselines import EFFICIENTNET_LITE_ARCHS, efficientnet_lite_stem_modules

HYBRID_STEM = ("vit.embeddings.patch_embed.stem",)


def efficientnet_stem_names(model: nn.Module) -> list[str]:
    """Submodule names (relative to the timm model) of a TimmWrapper EfficientNet-Lite's stride-16 stem."""
    arch = model.config.architecture
    variant = next((v for v, a in EFFICIENTNET_LITE_ARCHS.items() if a == arch), None)
    if variant is None:
        raise ValueError(f"cached stem features need an EfficientNet-Lite ({sorted(EFFICIENTNET_LITE_ARCHS.values())}), got {arch}")
    return efficientnet_lite_stem_modules(variant)


def stem_names(model: nn.Module) -> tuple[str, ...]:
    """Names (relative to `model`, a loaded classifier) of its frozen stem, () when it has none."""
    config = model.config
    if config.model_type == "timm_wrapper":
        if config.architecture not in EFFICIENTNET_LITE_ARCHS.values():
            return ()
        return tuple(f"timm_model.{n}" for n in efficientnet_stem_names(model))
    if getattr(config, "patch_embedding_type", "linear") != "hybrid":
        return ()
    return HYBRID_STEM


@contextlib.contextmanager
def stem_bypassed(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Temporarily replace the submodules `names` of `model` by nn.Identity.

    With the stem bypassed, the model takes cached stem features where it took pixels. The
    original modules are put back on exit, also when the body raises.
    """
    saved = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        saved[name] = (parent, child, getattr(parent, child) if not child.isdigit() else parent[int(child)])
        if child.isdigit():
            parent[int(child)] = nn.Identity()
        else:
            setattr(parent, child, nn.Identity())
    try:
        yield model
    finally:
        for parent, child, module in saved.values():
            if child.isdigit():
                parent[int(child)] = module
            else:
                setattr(parent, child, module)
