"""Cached frozen-stem features: train the top of a network for many epochs at the cost of a few.

On 2 CPU cores a full EfficientNet-Lite forward/backward is the bottleneck of every epoch. The
first stages (stride 16) are generic ImageNet filters that training keeps frozen anyway, so their
outputs for a few augmented views of every training image are computed once, stored in fp16, and
epochs then only run what is trained: the last CNN stages + heads, or a hybrid ViT's projection +
transformer (the same stride-16 tokens).

    stem = efficientnet_stem(model)                       # conv_stem, bn1, blocks[0..4]
    build_cache(dd["train"], stem, processor, "runs/cache/train", views=4, augment=cfg)
    feats = load_cache("runs/cache/train")                # (views, N, C, H/16, W/16) fp16

View 0 is always the model's own image processor (what inference sees); views 1.. are the
recipe's training augmentation, each with its own seed. Each view is one safetensors file, written
atomically, so an interrupted build resumes at the first missing view.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import datasets
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from model.geometry import processor_geometry
from model.stem import efficientnet_stem_names

from .transforms import AugmentConfig, build_transforms, with_image_transform

logger = logging.getLogger(__name__)


def efficientnet_stem(model: nn.Module) -> nn.Sequential:
    """The stride-16 stem of a TimmWrapper EfficientNet-Lite, sharing its modules.

    Input (B, 3, H, W) normalised pixels; output (B, C, H/16, W/16) (C = 112 for Lite0).
    """
    return nn.Sequential(*(model.timm_model.get_submodule(name) for name in efficientnet_stem_names(model)))


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


@torch.inference_mode()
def build_cache(
    ds: datasets.Dataset,
    stem: nn.Module,
    image_processor: Any,
    out_dir: str | Path,
    views: int = 1,
    augment: AugmentConfig | dict | None = None,
    batch_size: int = 64,
    seed: int = 0,
    num_workers: int = 1,
    masks: Sequence[str | None] | None = None,
    mask_cell: int = 16,
) -> Path:
    """Write `views` files `view_<v>.safetensors` with the stem's fp16 output for every row of `ds`.

    With `masks` (a lesion segmentation file per row, or None), each view also gets
    `mask_<v>.safetensors`: the mask through the same geometry as the view's pixels, as the lesion's
    share of every `mask_cell` x `mask_cell` pixel cell (fp16 (N, H/cell, W/cell); NO_MASK for rows
    without a mask), the patch grid of a ViT with that patch size.

    Args:
        ds: dataset with an `image` column (rows in the order the cache keeps).
        stem: frozen module, (B, 3, H, W) -> (B, C, h, w); run in eval mode.
        image_processor: the model's processor (geometry, normalisation; view 0 uses it as is).
        views: 1 = the processor view only; v >= 1 adds training-augmented views.
        augment: `AugmentConfig` (or dict) of the augmented views.

    Returns:
        `out_dir`. A view whose files exist is skipped, so reruns resume.
    """
    if masks is not None and len(masks) != len(ds):
        raise ValueError(f"{len(masks)} mask paths for {len(ds)} rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geometry = processor_geometry(image_processor)
    recipe = {
        "rows": len(ds), "size": list(geometry.size), "mean": list(geometry.mean), "std": list(geometry.std),
        "augment": json.loads(json.dumps(dataclasses.asdict(AugmentConfig.from_any(augment)))),
    }
    meta = out / "cache.json"
    if meta.is_file():
        # A cache is only reused for the same rows, geometry and augmentation (keys it records).
        old = json.loads(meta.read_text())
        changed = sorted(k for k in recipe if k in old and old[k] != recipe[k])
        if changed:
            raise ValueError(f"feature cache {out} was built with other {changed}; delete it or use another dir")
    stem = stem.eval().to(memory_format=torch.channels_last)
    images = ds.select_columns(["image"])
    if masks is not None:
        images = images.add_column("mask", list(masks))
    for view in range(views):
        path = out / f"view_{view}.safetensors"
        mask_path = out / f"mask_{view}.safetensors"
        if path.exists() and (masks is None or mask_path.exists()):
            continue
        transform = build_transforms(image_processor, train=view > 0, cfg=augment)
        loader = torch.utils.data.DataLoader(
            with_image_transform(images, transform),
            batch_size=batch_size,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed * 1000 + view),
            worker_init_fn=lambda worker: torch.manual_seed(seed * 1000 + view * 10 + worker),
        )
        if num_workers == 0:
            torch.manual_seed(seed * 1000 + view)
        chunks, mask_chunks = [], []
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"stem features {out.name} view {view}/{views - 1}", unit="batch")
        for batch in bar:
            x = batch["pixel_values"].to(memory_format=torch.channels_last)
            chunks.append(stem(x).to(torch.float16).contiguous())
            if masks is not None:  # (B, H, W) -> lesion share per cell (B, H/cell, W/cell)
                mask_chunks.append(torch.nn.functional.avg_pool2d(batch["masks"][:, None], mask_cell)[:, 0].to(torch.float16))
            bar.set_postfix(img_s=f"{sum(len(c) for c in chunks) / (time.perf_counter() - start):.1f}")
        features = torch.cat(chunks)
        if masks is not None:
            _atomic_save({"masks": torch.cat(mask_chunks).contiguous()}, mask_path, {"view": str(view), "cell": str(mask_cell)})
        _atomic_save({"features": features}, path, {"view": str(view), "n_failed": str(transform.n_failed)})
        logger.info("cached view %d of %s: %s in %.0f s", view, out, tuple(features.shape), time.perf_counter() - start)
    meta.write_text(json.dumps({**recipe, "views": max(views, json.loads(meta.read_text()).get("views", 0) if meta.is_file() else 0)}))
    return out


def load_mask_cache(out_dir: str | Path, views: int) -> torch.Tensor:
    """(views, N, h, w) fp16 lesion shares per cell of the first `views` views (see `build_cache`)."""
    files = [Path(out_dir) / f"mask_{v}.safetensors" for v in range(views)]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir} has no lesion masks {missing}; build the cache with masks")
    return torch.stack([load_file(str(p))["masks"] for p in files])


def load_cache(out_dir: str | Path) -> torch.Tensor:
    """(views, N, C, h, w) fp16 features of every view file in `out_dir`, view 0 first."""
    files = sorted(Path(out_dir).glob("view_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise FileNotFoundError(f"no cached views in {out_dir}; build them with train.features.build_cache")
    return torch.stack([load_file(str(p))["features"] for p in files])
