"""Does a ViT look at the lesion? Share of plain attention-rollout mass inside the HAM10000 lesion
masks, for every ViT folder in models/, beside what a uniform map scores (the mean mask area).

Plain rollout (model.rollout.attention_rollout with its defaults): heads averaged, identity added,
rows normalised, multiplied through every layer, the CLS row (CLS and distillation rows averaged
for DeiT-style models), no discarding; the map min-max normalised, bilinearly upsampled to the
mask (train.metrics.mask_share), as `train/evaluate.py` reports `rollout_mask_share`. Images: a
seeded sample of each model's own HAM10000 test split (its split_manifest.json), the same sample
for every model.

    python bench/bench_rollout.py                 # 300 test images per model
    python bench/bench_rollout.py --images 1497   # the whole HAM10000 test split
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.classifier import Classifier
from model.loading import ROLLOUT_MODEL_TYPES, num_prefix_tokens
from model.rollout import attention_rollout
from train.metrics import mask_share

ROOT = Path(__file__).resolve().parents[1]
HAM = ROOT.parent / "shared" / "data" / "ham10000"


def ham_test_ids(folder: Path) -> list[str]:
    """The model's HAM10000 test image ids (multi-source manifests prefix them with `ham10000/`)."""
    manifest = json.loads((folder / "split_manifest.json").read_text())
    return [i.removeprefix("ham10000/") for i in manifest["test"] if not i.startswith(("isic2017/", "derm7pt/"))]


def patch_size(config) -> int:
    size = config.patch_size
    return size if isinstance(size, int) else size[0]


@torch.inference_mode()
def shares(classifier: Classifier, ids: list[str], batch_size: int) -> tuple[list[float], list[float]]:
    """(rollout share inside the mask, mask area) per image."""
    inside, areas = [], []
    num_prefix = num_prefix_tokens(classifier.config)
    rows = ("cls", "dist") if num_prefix == 2 else ("cls",)
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        images = [Image.open(HAM / "images" / f"{i}.jpg").convert("RGB") for i in batch]
        pixels = classifier.pixel_values(images)
        out = classifier.forward_views(pixels, 1, attentions=True)[0]
        grid = (pixels.shape[-2] // patch_size(classifier.config), pixels.shape[-1] // patch_size(classifier.config))
        maps = attention_rollout(out.attentions, num_prefix_tokens=num_prefix, token_rows=rows, grid_size=grid)
        for image_id, saliency in zip(batch, maps.float()):
            mask = np.asarray(Image.open(HAM / "masks" / f"{image_id}_segmentation.png").convert("L"), np.float64) / 255.0
            share = mask_share(saliency, mask)
            if share is not None:
                inside.append(share)
                areas.append(float(mask.mean()))
    return inside, areas


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--images", type=int, default=300, help="HAM10000 test images per model (seeded sample)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--target", type=float, default=0.45, help="the share each ViT should reach")
    args = parser.parse_args()
    folders = [p for p in sorted(args.models.iterdir()) if (p / "config.json").is_file()
               and json.loads((p / "config.json").read_text()).get("model_type") in ROLLOUT_MODEL_TYPES]
    lines = [f"bench_rollout: plain attention rollout inside the HAM10000 lesion masks, {args.images} test images per model",
             f"{'model':<24}{'images':>7}{'rollout':>9}{'uniform':>9}{'ratio':>7}  target {args.target:.2f}"]
    for folder in folders:
        ids = ham_test_ids(folder)
        ids = [ids[i] for i in sorted(np.random.default_rng(0).permutation(len(ids))[: args.images])]
        tick = time.perf_counter()
        inside, areas = shares(Classifier(folder), ids, args.batch_size)
        share, uniform = float(np.mean(inside)), float(np.mean(areas))
        verdict = "met" if share >= args.target else f"{args.target - share:.2f} short"
        lines.append(f"{folder.name:<24}{len(inside):>7}{share:>9.3f}{uniform:>9.3f}{share / uniform:>7.2f}  {verdict}"
                     f"  ({time.perf_counter() - tick:.0f} s)")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    run()
