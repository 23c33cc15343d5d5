"""Seconds per optimizer step of train/train.py's one loop: cached-feature batches vs image batches.

A multi-source recipe runs twice through `train.train.main` on the same real images (a seeded
subset of HAM10000's lesions, the recipe's model, batch size and augmentation; the dx head): once as
written (cached stem features, the cache built first and timed apart) and once with
`feature_cache` removed (image batches, every layer trained: the `*_full.yaml` mode). Prints
seconds per step of each (after 2 warm-up steps, from `val_metrics.json`), their ratio, and what
one epoch of the real recipe costs in each mode at the measured rate. CPU numbers on a shared
machine: quote the load average printed with them.

    python bench/bench_engine.py --config train/configs/multisource_lite2.yaml --steps 6
    python bench/bench_engine.py --config train/configs/multisource_resnet18.yaml --steps 6 --images 400
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from train.train import load_config, main

ROOT = Path(__file__).resolve().parents[1]
HAM = ROOT.parent / "shared" / "data" / "ham10000"
# Training images of the shipped multi-source recipes (models/*/split_manifest.json "sizes.train").
SHIPPED_TRAIN_IMAGES = 9627


def ham_subset(folder: Path, images: int, seed: int) -> Path:
    """A HAM10000 folder (metadata CSV + symlinked images/) with whole lesions up to `images` images."""
    meta = pd.read_csv(HAM / "HAM10000_metadata.csv")
    lesions = meta["lesion_id"].drop_duplicates().sample(frac=1.0, random_state=seed)
    counts = meta.groupby("lesion_id").size()
    keep = lesions[counts.loc[lesions].cumsum().to_numpy() <= images]
    folder.mkdir(parents=True, exist_ok=True)
    meta[meta["lesion_id"].isin(keep)].to_csv(folder / "HAM10000_metadata.csv", index=False)
    (folder / "images").symlink_to(HAM / "images")
    return folder


def run_mode(recipe: dict, out: Path, steps: int, threads: int) -> dict:
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(recipe))
    tick = time.perf_counter()
    main(["--config", str(config), "--output_dir", str(out), "--max_steps", str(steps + 2), "--num_workers", "1",
          "--num_threads", str(threads)])
    result = json.loads((out / "val_metrics.json").read_text())
    result["wall_s"] = time.perf_counter() - tick
    return result


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "train" / "configs" / "multisource_lite2.yaml"))
    parser.add_argument("--steps", type=int, default=6, help="measured steps (after 2 warm-up steps)")
    parser.add_argument("--images", type=int, default=640, help="HAM10000 images in the subset (whole lesions)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(args.config)
    if not cfg.sources:
        raise SystemExit(f"{args.config} is not a multi-source recipe (no `sources:`)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = ham_subset(tmp / "ham", args.images, cfg.seed)
        recipe = yaml.safe_load(Path(args.config).read_text())
        recipe.update(sources=[{"name": "ham10000", "data": str(data), "val_size": 0.1, "test_size": 0.1}],
                      report_to="none", checkpointing_steps=None, metric_for_best_model=None,
                      head_loss_weights={})  # HAM10000 only: the dx head (the other heads are tiny linear layers)
        recipe.get("distillation", {}).pop("teachers", None)  # teachers need their own caches: timed elsewhere
        recipe["feature_cache"] = {**recipe["feature_cache"], "dir": str(tmp / "cache")}
        views = int(recipe["feature_cache"].get("views", 4))
        cached = run_mode(recipe, tmp / "cached", args.steps, args.threads)
        image_recipe = {k: v for k, v in recipe.items() if k != "feature_cache"}
        images = run_mode(image_recipe, tmp / "images", args.steps, args.threads)
    n_val = cached["final"]["n"]
    steps_per_epoch = SHIPPED_TRAIN_IMAGES // cfg.batch_size
    c, i = cached["seconds_per_step"], images["seconds_per_step"]
    print("\n".join([
        f"bench_engine: {cfg.model.name} ({Path(args.config).name}), batch {cfg.batch_size}, {args.threads} threads, "
        f"{args.steps} measured steps, HAM10000 subset of {args.images} images, load average {os.getloadavg()[0]:.1f}",
        f"  cached-feature batches: {c:7.2f} s/step  (cache of {views} views built first; whole run {cached['wall_s']:.0f} s)",
        f"  image batches         : {i:7.2f} s/step  (whole run {images['wall_s']:.0f} s)",
        f"  ratio images / cached : {i / c:7.1f}x",
        f"  one epoch of the shipped recipe ({steps_per_epoch} steps of {cfg.batch_size}): cached {steps_per_epoch * c / 60:.0f} min, "
        f"images {steps_per_epoch * i / 60:.0f} min on this CPU",
        f"  (validation images in the subset: {n_val}; torch {torch.__version__})",
    ]))


if __name__ == "__main__":
    run()
