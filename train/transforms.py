"""Augmentation config, per-image pipelines, the batch transform and the batch mixer."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from model.geometry import processor_geometry
from model.imageio import load_image
from model.modeling_melanoma_vit import IGNORE_INDEX  # the label every loss skips (e.g. a failed decode)

logger = logging.getLogger(__name__)



@dataclass
class AugmentConfig:
    """Training augmentation knobs (0 / None disables one). Dermoscopy has no "up", so the
    flips, 90-degree rotations and transposes together cover all 8 orientations."""

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    transpose: float = 0.5
    crop_scale: tuple[float, float] | None = (0.5, 1.0)  # RandomResizedCrop area; None: plain resize
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    blur: float = 0.1  # probability of a GaussianBlur
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    erasing: float = 0.25  # RandomErasing probability (on the normalised tensor)
    # Acquisition shift between dermoscopes: a per-channel gain up to exp(+-color_cast) (warm or
    # blue casts) and a dark circular vignette (probability `vignette`), as other archives show.
    color_cast: float = 0.0
    vignette: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # probability that a batch is mixed at all

    @classmethod
    def from_any(cls, cfg: AugmentConfig | Mapping[str, Any] | None) -> AugmentConfig:
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown augmentation option(s) {sorted(unknown)}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        return cls(**values)


class RandomColorCast(torch.nn.Module):
    """Multiply each channel of a float image in [0, 1] by exp(U(-strength, strength)) (a colour cast)."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = strength

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        gain = torch.empty(img.shape[-3], 1, 1).uniform_(-self.strength, self.strength).exp()
        return (img * gain).clamp(0, 1)


class RandomVignette(torch.nn.Module):
    """With probability p, darken a float image outside a random circle (the dermoscope's field stop)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        h, w = img.shape[-2:]
        y = torch.linspace(-1, 1, h).view(h, 1)
        x = torch.linspace(-1, 1, w).view(1, w)
        r = (x**2 + y**2).sqrt()  # 1 at the edge midpoints, sqrt(2) in the corners
        radius = float(torch.empty(()).uniform_(0.8, 1.3))
        width = float(torch.empty(()).uniform_(0.02, 0.2))
        floor = float(torch.empty(()).uniform_(0.0, 0.15))
        mask = floor + (1 - floor) * torch.sigmoid((radius - r) / width)  # (H, W)
        return img * mask


class RandomRot90(torch.nn.Module):
    """Rotate an image tensor (..., H, W) by k * 90 degrees, k uniform in {0, 1, 2, 3}."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()))
        out = torch.rot90(img, k, dims=(-2, -1))
        return tv_tensors.wrap(out, like=img) if isinstance(img, tv_tensors.Image) else out


class RandomTranspose(torch.nn.Module):
    """Swap H and W of an image tensor (..., H, W) with probability p."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        out = img.transpose(-2, -1)
        return tv_tensors.wrap(out, like=img) if isinstance(img, tv_tensors.Image) else out


def train_pipeline(image_processor: Any, cfg: AugmentConfig | Mapping[str, Any] | None = None) -> v2.Compose:
    """Per-image training augmentation: RGB PIL image -> normalised float tensor (3, H, W)."""
    cfg = AugmentConfig.from_any(cfg)
    geo = processor_geometry(image_processor)
    interpolation = v2.InterpolationMode(geo.interpolation)
    steps: list[Callable] = [v2.ToImage()]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip:
        steps.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.rot90:
        steps.append(RandomRot90())
    if cfg.transpose:
        steps.append(RandomTranspose(cfg.transpose))
    if cfg.crop_scale:
        steps.append(
            v2.RandomResizedCrop(
                geo.size, cfg.crop_scale, cfg.crop_ratio, interpolation=interpolation, antialias=True
            )
        )
    else:
        steps.append(v2.Resize(geo.size, interpolation=interpolation, antialias=True))
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        steps.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    if cfg.blur:
        kernel = max(3, int(0.05 * min(geo.size)) // 2 * 2 + 1)  # odd, ~5% of the side
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=cfg.blur_sigma)], p=cfg.blur))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if cfg.color_cast:
        steps.append(RandomColorCast(cfg.color_cast))
    if cfg.vignette:
        steps.append(RandomVignette(cfg.vignette))
    steps.append(v2.Normalize(geo.mean, geo.std))
    if cfg.erasing:
        steps.append(v2.RandomErasing(p=cfg.erasing, value=0))
    return v2.Compose(steps)


class ImageBatchTransform:
    """Batch transform for `Dataset.with_transform`: {"image": [...], "label": [...]} ->
    {"pixel_values": float32 (B, 3, H, W), "labels": int64 (B,)}.

    Images may be PIL images or undecoded {"path", "bytes"} dicts (see `with_image_transform`).
    An image that fails to decode becomes a zero tensor with label IGNORE_INDEX (-100), which
    cross-entropy ignores, and is counted in `n_failed`: one bad file never stops a long run.
    """

    def __init__(self, image_processor: Any, train: bool, cfg: AugmentConfig | Mapping[str, Any] | None = None):
        self.image_processor = image_processor
        self.train = train
        self.size = processor_geometry(image_processor).size
        self.pipeline = train_pipeline(image_processor, cfg) if train else None
        self.n_failed = 0

    def _eval_batch(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        # The model's own processor: exactly what inference (app, evaluate) does.
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        labels = list(batch["label"]) if "label" in batch else [IGNORE_INDEX] * len(images)
        decoded: list[PIL.Image.Image | None] = []
        for value in images:
            try:
                decoded.append(load_image(value))
            except Exception as err:  # a corrupt sample must not end a training run
                self.n_failed += 1
                logger.warning(
                    "image failed to decode at transform time (%s); sample ignored (label %d)", err, IGNORE_INDEX
                )
                decoded.append(None)
        good = [img for img in decoded if img is not None]
        if self.train:
            outs = [self.pipeline(img) for img in good]
        else:
            outs = list(self._eval_batch(good)) if good else []
        h, w = outs[0].shape[-2:] if outs else self.size
        it = iter(outs)
        pixel_values = torch.stack([next(it) if img is not None else torch.zeros(3, h, w) for img in decoded])
        labels = [lab if img is not None else IGNORE_INDEX for lab, img in zip(labels, decoded)]
        return {"pixel_values": pixel_values.float(), "labels": torch.as_tensor(labels, dtype=torch.long)}


def build_transforms(
    image_processor: Any, train: bool, cfg: AugmentConfig | Mapping[str, Any] | None = None
) -> ImageBatchTransform:
    """Batch transform for `Dataset.with_transform` from the model's saved image processor.

    Args:
        image_processor: a transformers image processor (ViTImageProcessor,
            TimmWrapperImageProcessor, ...) or a path / Hub id for AutoImageProcessor.
        train: True: augmentation (flips, 90-degree rotations, transposes, RandomResizedCrop,
            ColorJitter, GaussianBlur, RandomErasing; knobs in `AugmentConfig`) at the
            processor's size, normalised with its mean/std. False: the processor itself
            (resize + normalise, deterministic), as used at inference.
        cfg: AugmentConfig or a dict of its fields (training only).

    Returns:
        callable batch -> {"pixel_values": float32 (B, 3, H, W), "labels": int64 (B,)}.
    """
    if isinstance(image_processor, (str, Path)):
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(str(image_processor))
    return ImageBatchTransform(image_processor, train, cfg)


def with_image_transform(ds: datasets.Dataset, transform: Callable) -> datasets.Dataset:
    """`ds.with_transform(transform)` with images left undecoded until the transform, so that a
    file that fails to decode reaches the transform's error handling instead of raising inside
    datasets' formatter. Only the image and label columns are passed to the transform."""
    ds = ds.cast_column("image", datasets.Image(decode=False))
    columns = [c for c in ("image", "label") if c in ds.column_names]
    return ds.with_transform(transform, columns=columns, output_all_columns=False)


class BatchMixer:
    """MixUp / CutMix (torchvision v2) on a collated batch; see `build_batch_mixer`."""

    def __init__(self, mix: Callable, num_classes: int, prob: float = 1.0):
        self.mix = mix
        self.num_classes = num_classes
        self.prob = prob

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = batch["labels"] != IGNORE_INDEX
        x, y = batch["pixel_values"][keep], batch["labels"][keep]
        if len(y) > 1 and torch.rand(()) < self.prob:
            x, y = self.mix(x, y)
        else:
            y = torch.nn.functional.one_hot(y, self.num_classes).float()
        return {"pixel_values": x, "labels": y}


def build_batch_mixer(cfg: AugmentConfig | Mapping[str, Any] | None, num_classes: int) -> BatchMixer | None:
    """MixUp / CutMix (torchvision v2) applied to a collated batch, or None when both are off.

    The mixer maps {"pixel_values": (B, 3, H, W), "labels": (B,) int64} to
    {"pixel_values": (B', 3, H, W), "labels": (B', num_classes) float32 soft targets}, where
    rows with label IGNORE_INDEX are dropped first (B' <= B). With both alphas > 0 each batch
    gets one of the two at random; unmixed batches (mix_prob < 1) get one-hot targets, so the
    loss is always soft-target cross-entropy: `(-labels * logits.log_softmax(-1)).sum(-1).mean()`.
    """
    cfg = AugmentConfig.from_any(cfg)
    mixers = []
    if cfg.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return BatchMixer(mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers), num_classes, cfg.mix_prob)
