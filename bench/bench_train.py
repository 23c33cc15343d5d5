"""Training throughput: train/train.py's loop vs a plain timm/torch loop vs the data loader alone.

Same model (built by train.train.create_model; the raw timm model for CNN baselines), same training
split and transforms (train.data.build_transforms), same batch size, optimiser and thread count.
Prints images/s for each, the ratio ours / plain (target >= 0.9) and the share of a plain step that
the loader alone would take (loader-bound when it nears 1). CPU numbers; on a shared machine run it
when the machine is quiet and quote the load average printed with the result.

    python bench/bench_train.py --config train/configs/melanoma_vit_scratch.yaml --steps 12
    python bench/bench_train.py --config train/configs/efficientnet_lite0.yaml --set model.image_size=128
    python bench/bench_train.py --config train/configs/melanoma_vit_scratch.yaml --ours_only  # throughput only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import TimmWrapperForImageClassification  # noqa: E402

from train import data as data_lib  # noqa: E402
from train.train import collate, create_model, load_config, main  # noqa: E402

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
    ds = data_lib.load_image_dataset(cfg.data, label_scheme=cfg.label_scheme)
    train = data_lib.split_by_lesion(ds, cfg.val_size, cfg.test_size, seed=cfg.split_seed)["train"]
    names = train.features["label"].names
    model, processor = create_model(cfg.model, dict(enumerate(names)))
    if isinstance(model, TimmWrapperForImageClassification):
        model = model.timm_model  # plain timm
    transform = data_lib.build_transforms(processor, True, data_lib.AugmentConfig.from_any(cfg.augmentation))
    loader = DataLoader(data_lib.with_image_transform(train, transform), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=True, num_workers=num_workers, collate_fn=collate)
    return cfg, model, loader


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


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "train" / "configs" / "melanoma_vit_scratch.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000"))
    parser.add_argument("--steps", type=int, default=12, help="measured steps (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--ours_only", action="store_true", help="only train/train.py's throughput")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
