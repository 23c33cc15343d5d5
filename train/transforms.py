"""Augmentation config, per-image pipelines, the batch transform and the batch mixer."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
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
    # What screening images differ in (issue 18 §5): a lesion small in a wide field of skin (with
    # probability `zoom_out`, instead of the crop, the whole image shrunk to a side factor in
    # `zoom_out_scale` on a canvas of its border's median colour) and sensor noise (with probability
    # `noise`, Gaussian of an sd in `noise_sigma`, on the [0, 1] image).
    zoom_out: float = 0.0
    zoom_out_scale: tuple[float, float] = (0.5, 0.9)
    noise: float = 0.0
    noise_sigma: tuple[float, float] = (0.01, 0.06)
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


class _PixelTransform(v2.Transform):
    """A v2 transform of the image only: lesion masks (`tv_tensors.Mask`) pass through unchanged."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return inpt
        out = self.apply(inpt.as_subclass(torch.Tensor), params)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out

    def apply(self, img: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError


class RandomColorCast(_PixelTransform):
    """Multiply each channel of a float image in [0, 1] by exp(U(-strength, strength)) (a colour cast)."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = strength

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        channels = next(i for i in flat_inputs if not isinstance(i, tv_tensors.Mask)).shape[-3]
        return {"gain": torch.empty(channels, 1, 1).uniform_(-self.strength, self.strength).exp()}

    def apply(self, img: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return (img * params["gain"]).clamp(0, 1)


class RandomVignette(_PixelTransform):
    """With probability p, darken a float image outside a random circle (the dermoscope's field stop)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if torch.rand(()) >= self.p:
            return {"apply": False}
        radius = float(torch.empty(()).uniform_(0.8, 1.3))
        width = float(torch.empty(()).uniform_(0.02, 0.2))
        floor = float(torch.empty(()).uniform_(0.0, 0.15))
        return {"apply": True, "radius": radius, "width": width, "floor": floor}

    def apply(self, img: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        if not params["apply"]:
            return img
        h, w = img.shape[-2:]
        y = torch.linspace(-1, 1, h).view(h, 1)
        x = torch.linspace(-1, 1, w).view(1, w)
        r = (x**2 + y**2).sqrt()  # 1 at the edge midpoints, sqrt(2) in the corners
        mask = params["floor"] + (1 - params["floor"]) * torch.sigmoid((params["radius"] - r) / params["width"])  # (H, W)
        return img * mask


class RandomNoise(_PixelTransform):
    """With probability p, add Gaussian noise of an sd drawn from `sigma` to a float image in [0, 1]."""

    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        super().__init__()
        self.p, self.sigma = p, sigma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if torch.rand(()) >= self.p:
            return {"sd": 0.0}
        return {"sd": float(torch.empty(()).uniform_(*self.sigma))}

    def apply(self, img: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        if not params["sd"]:
            return img
        return (img + params["sd"] * torch.randn_like(img)).clamp(0, 1)


class RandomZoomOut(v2.Transform):
    """Shrink an image tensor (..., H, W) to a side factor drawn from `scale` and place it at a random
    offset on a canvas of (H, W) filled with the median colour of its border pixels: the lesion covers
    less of the field, in skin of its own tone (the pasted image's edge blends into the canvas). A
    lesion mask passed with it goes through the same geometry (the canvas is no lesion). Used on the
    whole image, not a crop of it (see `train_pipeline`), so the border is skin, not the lesion."""

    def __init__(self, scale: tuple[float, float]) -> None:
        super().__init__()
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"zoom_out_scale must satisfy 0 < low <= high <= 1, got {scale}")
        self.scale = scale

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image = next(i for i in flat_inputs if not isinstance(i, tv_tensors.Mask))
        h, w = image.shape[-2:]
        factor = float(torch.empty(()).uniform_(*self.scale))
        sh, sw = max(1, round(h * factor)), max(1, round(w * factor))
        top, left = int(torch.randint(h - sh + 1, ())), int(torch.randint(w - sw + 1, ()))
        x = image.as_subclass(torch.Tensor).reshape(-1, h, w)
        ring = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=1)
        return {"size": (sh, sw), "top": top, "left": left, "fill": ring.median(dim=1).values}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        x = inpt.as_subclass(torch.Tensor)
        h, w = x.shape[-2:]
        mask = isinstance(inpt, tv_tensors.Mask)
        planes = x.reshape(1, -1, h, w)  # (1, K, H, W): the image's channels, or a mask's one plane
        mode = v2.InterpolationMode.NEAREST if mask else v2.InterpolationMode.BILINEAR
        small = v2.functional.resize(planes, list(params["size"]), interpolation=mode, antialias=not mask)
        canvas = torch.zeros_like(planes) if mask else params["fill"].to(x.dtype).view(1, -1, 1, 1).expand_as(planes).clone()
        (sh, sw), top, left = params["size"], params["top"], params["left"]
        if mask:
            canvas[..., top:top + sh, left:left + sw] = small
        else:  # feathered over a tenth of the side, so no hard frame marks the pasted image
            ramp = max(1.0, 0.1 * min(sh, sw))
            ys = torch.arange(sh, dtype=torch.float32)
            xs = torch.arange(sw, dtype=torch.float32)
            edge_y = torch.minimum(ys, sh - 1 - ys).view(-1, 1)
            edge_x = torch.minimum(xs, sw - 1 - xs).view(1, -1)
            alpha = (torch.minimum(edge_y, edge_x) / ramp).clamp(max=1.0)
            region = canvas[..., top:top + sh, left:left + sw].float()
            canvas[..., top:top + sh, left:left + sw] = (region + alpha * (small.float() - region)).round().to(x.dtype)
        out = canvas.reshape(x.shape)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class RandomRot90(v2.Transform):
    """Rotate an image tensor (..., H, W) by k * 90 degrees, k uniform in {0, 1, 2, 3}; a lesion mask
    passed with it turns the same way."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(4, ()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1))
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class RandomTranspose(v2.Transform):
    """Swap H and W of an image tensor (..., H, W) with probability p (a lesion mask with it)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"apply": bool(torch.rand(()) < self.p)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"]:
            return inpt
        out = inpt.as_subclass(torch.Tensor).transpose(-2, -1)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


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
        crop: Callable = v2.RandomResizedCrop(geo.size, cfg.crop_scale, cfg.crop_ratio, interpolation=interpolation, antialias=True)
    else:
        crop = v2.Resize(geo.size, interpolation=interpolation, antialias=True)
    if cfg.zoom_out:  # either a crop (lesion as large or larger) or the whole image zoomed out
        zoom = v2.Compose([v2.Resize(geo.size, interpolation=interpolation, antialias=True), RandomZoomOut(cfg.zoom_out_scale)])
        crop = v2.RandomChoice([zoom, crop], p=[cfg.zoom_out, 1.0 - cfg.zoom_out])
    steps.append(crop)
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        steps.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    if cfg.blur:
        kernel = max(3, int(0.05 * min(geo.size)) // 2 * 2 + 1)  # odd, ~5% of the side
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=cfg.blur_sigma)], p=cfg.blur))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if cfg.color_cast:
        steps.append(RandomColorCast(cfg.color_cast))
    if cfg.noise:
        steps.append(RandomNoise(cfg.noise, cfg.noise_sigma))
    if cfg.vignette:
        steps.append(RandomVignette(cfg.vignette))
    steps.append(v2.Normalize(geo.mean, geo.std))
    if cfg.erasing:
        steps.append(v2.RandomErasing(p=cfg.erasing, value=0))
    return v2.Compose(steps)


NO_MASK = -1.0  # the value of every mask pixel of a row that has no lesion mask


def load_mask(path: str | Path, size: tuple[int, int]) -> tv_tensors.Mask:
    """A lesion segmentation (white = lesion) as a float (H, W) mask in {0, 1} at the image's `size` (W, H)."""
    with PIL.Image.open(path) as img:
        mask = img.convert("L")
        if mask.size != tuple(size):
            mask = mask.resize(tuple(size), PIL.Image.NEAREST)
        return tv_tensors.Mask(torch.from_numpy(np.asarray(mask) > 127).float())


class ImageBatchTransform:
    """Batch transform for `Dataset.with_transform`: {"image": [...], "label": [...]} ->
    {"pixel_values": float32 (B, 3, H, W), "labels": int64 (B,)}.

    Images may be PIL images or undecoded {"path", "bytes"} dicts (see `with_image_transform`).
    An image that fails to decode becomes a zero tensor with label IGNORE_INDEX (-100), which
    cross-entropy ignores, and is counted in `n_failed`: one bad file never stops a long run.

    A batch with a "mask" column (lesion segmentation file per row, or None) also gets "masks":
    float32 (B, H, W), each row's mask through the same geometry as its pixels (flips, turns, crop
    and resize; colour changes skip it), NO_MASK everywhere for a row without one. The evaluation
    view resizes the mask to the processor's size, as the processor resizes the whole image.
    """

    def __init__(self, image_processor: Any, train: bool, cfg: AugmentConfig | Mapping[str, Any] | None = None):
        self.image_processor = image_processor
        self.train = train
        self.size = processor_geometry(image_processor).size
        self.pipeline = train_pipeline(image_processor, cfg) if train else None
        self.n_failed = 0

    def _eval_batch(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()

    def _with_masks(self, images: list[PIL.Image.Image], paths: Sequence[str | None]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pixels, masks = [], []
        no_mask = torch.full(self.size, NO_MASK)
        for img, path in zip(images, paths):
            mask = load_mask(path, img.size) if path else None
            if self.train:
                if mask is None:
                    pixels.append(self.pipeline(img))
                else:
                    x, mask = self.pipeline(img, mask)
                    pixels.append(x)
            else:
                pixels.append(self._eval_batch([img])[0])
                if mask is not None:
                    mask = v2.functional.resize(mask, list(self.size), interpolation=v2.InterpolationMode.NEAREST)
            masks.append(no_mask if mask is None else mask.as_subclass(torch.Tensor).float())
        return pixels, masks

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
        mask_outs: list[torch.Tensor] | None = None
        if "mask" in batch:
            paths = [p for p, img in zip(batch["mask"], decoded) if img is not None]
            outs, mask_outs = self._with_masks(good, paths)
        elif self.train:
            outs = [self.pipeline(img) for img in good]
        else:
            outs = list(self._eval_batch(good)) if good else []
        h, w = outs[0].shape[-2:] if outs else self.size
        it = iter(outs)
        pixel_values = torch.stack([next(it) if img is not None else torch.zeros(3, h, w) for img in decoded])
        labels = [lab if img is not None else IGNORE_INDEX for lab, img in zip(labels, decoded)]
        out = {"pixel_values": pixel_values.float(), "labels": torch.as_tensor(labels, dtype=torch.long)}
        if mask_outs is not None:
            it_masks = iter(mask_outs)
            out["masks"] = torch.stack([next(it_masks) if img is not None else torch.full((h, w), NO_MASK) for img in decoded])
        return out


def build_transforms(
    image_processor: Any, train: bool, cfg: AugmentConfig | Mapping[str, Any] | None = None
) -> ImageBatchTransform:
    """Batch transform for `Dataset.with_transform` from the model's saved image processor.

    Args:
        image_processor: a transformers image processor (ViTImageProcessor,
            TimmWrapperImageProcessor, ...) or a path / Hub id for AutoImageProcessor.
        train: True: augmentation (flips, 90-degree rotations, transposes, RandomResizedCrop,
            ColorJitter, GaussianBlur, zoom-out, noise, RandomErasing; knobs in `AugmentConfig`) at the
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
    datasets' formatter. Only the image, label and (lesion) mask columns are passed to the transform."""
    ds = ds.cast_column("image", datasets.Image(decode=False))
    columns = [c for c in ("image", "label", "mask") if c in ds.column_names]
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
