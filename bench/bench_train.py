"""Training throughput: train/train.py's loop vs a plain timm/torch loop vs the data loader alone.

Same model (built by train.train.create_model; the raw timm model for CNN baselines), same training
split and transforms (train.transforms.build_transforms), same batch size, optimiser and thread count.
Prints images/s for each, the ratio ours / plain (target >= 0.9) and the share of a plain step that
the loader alone would take (loader-bound when it nears 1). CPU numbers; on a shared machine run it
when the machine is quiet and quote the load average printed with the result.

Multi-source recipes with a `feature_cache:` train on cached stem features instead; for
them it prints (1) the plain timm full fine-tuning loop on images, (2) stem feature caching
(build_cache's loop), (3) one training step on cached features (stem bypassed, every head
labelled), the ratio (3)/(1) and what a full run costs once the cache is built.

    python bench/bench_train.py --config train/configs/melanoma_vit_scratch.yaml --steps 12
    python bench/bench_train.py --config train/configs/efficientnet_lite0.yaml --set model.image_size=128
    python bench/bench_train.py --config train/configs/melanoma_vit_scratch.yaml --ours_only  # throughput only
    python bench/bench_train.py --config train/configs/multisource_lite0.yaml --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import TimmWrapperForImageClassification

from model.labels import DX_CODES
from model.stem import stem_bypassed
from train.data import load_image_dataset
from train.losses import masked_head_loss
from train.multisource import MultiHeadNet
from train.sources import MAIN_HEAD, SourceSpec, head_labels, load_sources
from train.splits import split_by_lesion
from train.train import collate, create_model, load_config, main
from train.transforms import AugmentConfig, build_transforms, with_image_transform

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2


def ours(config: str, overrides: list[str], data: str, steps: int, num_workers: int) -> float:
    """train/train.py end to end (accelerate, sampler, EMA off, no checkpoints); its own steady-state images/s."""
    with tempfile.TemporaryDirectory() as out:
        sets = [x for o in overrides + ["checkpointing_steps=null", "report_to=none", "ema=false", "epochs=1"] for x in ("--set", o)]
        main(["--config", config, "--output_dir", out, "--data", data, "--max_steps", str(steps + WARMUP),
              "--num_workers", str(num_workers), *sets])
        return json.loads((Path(out) / "val_metrics.json").read_text())["train_images_per_s"]


def plain_setup(config: str, overrides: list[str], data: str, num_workers: int):
    cfg = load_config(config, overrides + [f"data={json.dumps(data)}"])
    torch.manual_seed(cfg.seed)
    ds = load_image_dataset(cfg.data, label_scheme=cfg.label_scheme)
    train = split_by_lesion(ds, cfg.val_size, cfg.test_size, seed=cfg.split_seed)["train"]
    names = train.features["label"].names
    model, processor = create_model(cfg.model, dict(enumerate(names)))
    if isinstance(model, TimmWrapperForImageClassification):
        model = model.timm_model  # plain timm
    return cfg, model, train_loader(cfg, train, processor, num_workers)


def train_loader(cfg, train, processor, num_workers: int) -> DataLoader:
    """Shuffled batches of the training split with the recipe's training transforms."""
    transform = build_transforms(processor, True, AugmentConfig.from_any(cfg.augmentation))
    return DataLoader(with_image_transform(train, transform), batch_size=cfg.batch_size, shuffle=True,
                      drop_last=True, num_workers=num_workers, collate_fn=collate)


def batches(loader: DataLoader):
    """Endless batches (a new epoch when one ends)."""
    while True:
        yield from loader


def plain(cfg, model: torch.nn.Module, loader: DataLoader, steps: int) -> float:
    """The textbook loop: forward, cross-entropy, backward, AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model.train()
    images, seconds = 0, 0.0
    it = batches(loader)
    for step in range(steps + WARMUP):
        tick = time.perf_counter()
        batch = next(it)
        out = model(batch["pixel_values"])
        logits = out.logits if hasattr(out, "logits") else out
        F.cross_entropy(logits, batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= WARMUP:
            images += len(batch["labels"])
            seconds += time.perf_counter() - tick
    return images / seconds


def loader_only(loader: DataLoader, steps: int) -> float:
    images, it = 0, batches(loader)
    next(it)
    tick = time.perf_counter()
    for _ in range(steps):
        images += len(next(it)["labels"])
    return images / (time.perf_counter() - tick)


def source_specs(cfg) -> list[SourceSpec]:
    """The recipe's sources; relative data folders are read from the repository root, where recipes run."""
    specs = [SourceSpec(**s) for s in cfg.sources]
    for spec in specs:
        if not Path(spec.data).is_absolute() and (ROOT / spec.data).exists():
            spec.data = str(ROOT / spec.data)
    return specs


def multisource_setup(config: str, overrides: list[str], num_workers: int):
    """The trainer's model (MultiHeadNet over create_model) and a loader of its sources' training split."""
    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.seed)
    specs = source_specs(cfg)
    extra = head_labels(specs)
    train = load_sources(specs)["train"]
    model, processor = create_model(cfg.model, dict(enumerate(DX_CODES)), extra_heads=extra)
    return cfg, MultiHeadNet(model, extra), extra, train_loader(cfg, train, processor, num_workers), len(train)


@torch.inference_mode()
def stem_caching(net: MultiHeadNet, loader: DataLoader, steps: int) -> tuple[float, torch.Tensor]:
    """build_cache's loop: next batch (decode + augment), channels_last, frozen stem forward, fp16.

    Returns (images/s, the last batch's features (B, C, H/16, W/16) fp16: real inputs for `cached_step`).
    """
    stem = torch.nn.Sequential(*(net.get_submodule(n) for n in net.stem_names()))
    stem = stem.eval().to(memory_format=torch.channels_last)
    images, seconds, it = 0, 0.0, batches(loader)
    for step in range(steps + WARMUP):
        tick = time.perf_counter()
        x = next(it)["pixel_values"].to(memory_format=torch.channels_last)
        features = stem(x).to(torch.float16).contiguous()
        if step >= WARMUP:
            images += len(x)
            seconds += time.perf_counter() - tick
    return images / seconds, features


def cached_step(cfg, net: MultiHeadNet, extra: dict[str, list[str]], features: torch.Tensor, steps: int) -> float:
    """A cached-feature step (as train.py's loop takes it): fp16 cache -> float, stem bypassed, masked per-head loss with a label for
    every head (the most a batch costs), backward, AdamW over the non-stem parameters. Images/s."""
    stem_params = {id(p) for n in net.stem_names() for p in net.get_submodule(n).parameters()}
    for p in net.parameters():
        p.requires_grad_(id(p) not in stem_params)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sizes = {MAIN_HEAD: len(DX_CODES), **{h: len(labels) for h, labels in extra.items()}}
    labels = {h: torch.randint(0, n, (len(features),)) for h, n in sizes.items()}
    loss_weights = {MAIN_HEAD: 1.0, **dict(cfg.head_loss_weights)}
    net.train()
    images, seconds = 0, 0.0
    with stem_bypassed(net, net.stem_names()):
        for step in range(steps + WARMUP):
            tick = time.perf_counter()
            loss, _ = masked_head_loss(net(features.float()), labels, loss_weights, cfg.label_smoothing)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= WARMUP:
                images += len(features)
                seconds += time.perf_counter() - tick
    return images / seconds


def amortised(n: int, views: int, epochs: int, plain_ips: float, cache_ips: float, cached_ips: float) -> list[str]:
    """What a full run of `n` training images costs: plain epochs vs caching `views` views once, then cached epochs."""
    cache_s, plain_epoch, cached_epoch = n * views / cache_ips, n / plain_ips, n / cached_ips
    break_even = cache_s / (plain_epoch - cached_epoch) if plain_epoch > cached_epoch else float("inf")
    return [f"  speed-up per epoch once cached (3)/(1): {cached_ips / plain_ips:6.1f}x",
            f"  N={n} train images, V={views} views: cache once N*V/(2) = {cache_s / 60:.1f} min, then "
            f"N/(3) = {cached_epoch / 60:.1f} min/epoch (plain N/(1) = {plain_epoch / 60:.1f} min/epoch)",
            f"  epochs per hour: plain {3600 / plain_epoch:.2f}, cached {3600 / cached_epoch:.1f} "
            f"({max(0.0, 3600 - cache_s) / cached_epoch:.1f} in the first hour, which builds the cache)",
            f"  the recipe's {epochs} epochs: plain {epochs * plain_epoch / 3600:.1f} h, cached "
            f"{(cache_s + epochs * cached_epoch) / 3600:.1f} h (cache pays off after {break_even:.1f} epochs)"]


def multisource(args) -> list[str]:
    """Side by side for a `sources:` recipe: plain timm on images, stem caching, a step on cached features."""
    cfg, net, extra, loader, n = multisource_setup(args.config, args.overrides, args.num_workers)
    whole = net.model.timm_model if net.is_timm else net.model  # the hybrid MelanomaViT is its own plain model
    plain_ips = plain(cfg, whole, loader, args.steps)  # first: the stem is still plain (not channels_last)
    cache_ips, features = stem_caching(net, loader, args.steps)
    cached_ips = cached_step(cfg, net, extra, features, args.steps)
    views = int((cfg.feature_cache or {}).get("views", 4))
    return [f"bench_train (multi-source, cached stem features): {cfg.model.name} image_size={cfg.model.image_size or cfg.model.kwargs.get('image_size')}, "
            f"batch {cfg.batch_size}, {args.threads} threads, num_workers {args.num_workers}, {args.steps} steps, "
            f"load average {os.getloadavg()[0]:.1f} (CPU shared with other jobs)",
            f"  (1) plain timm full fine-tuning on images: {plain_ips:8.1f} images/s",
            f"  (2) stem feature caching (load + stem)   : {cache_ips:8.1f} images/s",
            f"  (3) step on cached features {tuple(features.shape[1:])}: {cached_ips:8.1f} images/s",
            *amortised(n, views, cfg.epochs, plain_ips, cache_ips, cached_ips)]


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "train" / "configs" / "melanoma_vit_scratch.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000"),
                        help="single-source recipes; a `sources:` recipe reads its sources' folders")
    parser.add_argument("--steps", type=int, default=12, help="measured steps (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--ours_only", action="store_true", help="only train/train.py's throughput")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if load_config(args.config, args.overrides).sources:
        print("\n".join(multisource(args)))
        return
    ours_ips = ours(args.config, args.overrides, args.data, args.steps, args.num_workers)
    cfg = load_config(args.config, args.overrides)
    what = f"{cfg.model.name} {json.dumps(cfg.model.kwargs) if cfg.model.kwargs else ''} image_size={cfg.model.image_size or cfg.model.kwargs.get('image_size')}"
    lines = [f"bench_train: {what}, batch {cfg.batch_size}, {args.threads} threads, num_workers {args.num_workers}, "
             f"{args.steps} steps, load average {os.getloadavg()[0]:.1f} (CPU shared with other jobs)",
             f"  train/train.py loop : {ours_ips:8.1f} images/s"]
    if not args.ours_only:
        cfg, model, loader = plain_setup(args.config, args.overrides, args.data, args.num_workers)
        plain_ips = plain(cfg, model, loader, args.steps)
        loader_ips = loader_only(loader, args.steps)
        share = plain_ips / loader_ips
        lines += [f"  plain timm/torch    : {plain_ips:8.1f} images/s",
                  f"  data loader alone   : {loader_ips:8.1f} images/s",
                  f"  ratio ours / plain  : {ours_ips / plain_ips:8.2f}  (target >= 0.90)",
                  f"  loader share of a plain step: {share:.0%} -> "
                  + ("loader-bound" if share > 0.5 else "compute-bound (the loader is not the bottleneck)")]
    print("\n".join(lines))


if __name__ == "__main__":
    run()
