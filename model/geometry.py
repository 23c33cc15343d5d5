"""The one reader of an image processor's geometry: input size, mean, std, resampling, cropping.

Training (augmentation at the model's size, teacher re-normalisation, feature caches),
evaluation (whether rollout maps cover the lesion mask) and the app (input size, un-normalising
the model's view for the explanation overlay) all read these facts here, from the processor
saved beside the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# PIL resampling filters (`resample` of transformers' processors) by their integer value.
_PIL_FILTERS = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImageGeometry:
    """What the model sees of an image.

    size: (H, W) pixels of the model input. mean, std: per-channel normalisation of pixel values
    scaled to [0, 1] ((0, 0, 0) and (1, 1, 1) when the processor does not normalise).
    interpolation: resize filter name ("bilinear", "bicubic", "nearest", ...; torchvision's
    `InterpolationMode` values). crops: whether the processor crops, i.e. the model does not see
    the whole field of view.
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crops: bool


def _size_dict(size: Any) -> dict[str, int | None]:
    """transformers' size (SizeDict, dict or int) -> {"height", "width", "shortest_edge"}."""
    if isinstance(size, int):
        return {"height": size, "width": size, "shortest_edge": None}
    get = size.get if isinstance(size, Mapping) else lambda k: getattr(size, k, None)
    return {k: get(k) for k in ("height", "width", "shortest_edge")}


def processor_geometry(image_processor: Any) -> ImageGeometry:
    """Geometry of a transformers image processor.

    Works for ViTImageProcessor-like processors (`size`, `crop_size` with `do_center_crop`,
    `image_mean`, `image_std`, `do_normalize`, `resample`) and TimmWrapperImageProcessor
    (`data_config`: `input_size`, `mean`, `std`, `interpolation`, `crop_pct`).

    Raises:
        ValueError: the processor's `size` names no input size.
    """
    config = getattr(image_processor, "data_config", None)
    if config is not None:
        _, h, w = config["input_size"]
        return ImageGeometry(
            size=(int(h), int(w)),
            mean=tuple(config["mean"]),
            std=tuple(config["std"]),
            interpolation=str(config.get("interpolation", "bilinear")),
            crops=float(config.get("crop_pct", 1.0)) < 1.0,
        )
    size = _size_dict(image_processor.size)
    if size.get("height") and size.get("width"):
        hw = (int(size["height"]), int(size["width"]))
    elif size.get("shortest_edge"):
        hw = (int(size["shortest_edge"]),) * 2
    else:
        raise ValueError(f"cannot read an input size from the image processor's size {image_processor.size}")
    crop = getattr(image_processor, "crop_size", None)
    crops = bool(getattr(image_processor, "do_center_crop", False))
    if crops and crop:
        crop = _size_dict(crop)
        hw = (int(crop["height"]), int(crop["width"]))
    normalize = getattr(image_processor, "do_normalize", True)
    mean = tuple(image_processor.image_mean) if normalize else (0.0, 0.0, 0.0)
    std = tuple(image_processor.image_std) if normalize else (1.0, 1.0, 1.0)
    resample = getattr(image_processor, "resample", 2)
    try:
        interpolation = _PIL_FILTERS.get(int(resample), "bilinear")
    except (TypeError, ValueError):
        interpolation = str(getattr(resample, "name", resample)).lower()
    return ImageGeometry(size=hw, mean=mean, std=std, interpolation=interpolation, crops=crops)
