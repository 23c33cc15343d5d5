"""Multi-source training: one backbone, one head per dataset (+ seven-point criteria), on cached stem features.

Called by `train/train.py` when the recipe lists `sources:` (see train/configs/multisource_*.yaml):

    accelerate launch train/train.py --config train/configs/multisource_lite0.yaml --output_dir runs/ms_lite0

Each sample adds loss only to the heads its source labels (IGNORE_INDEX elsewhere); a sampler
draws every source with its recipe weight (and the dx classes within a source sqrt-balanced), so
HAM10000 does not drown the smaller archives. The frozen stride-16 stem of the network
(`train.features`) is run once per augmented view; epochs train the rest:

- EfficientNet-Lite (TimmWrapper): the last stages + the dx classifier; the other heads are
  training-only auxiliaries on the pooled features, so the shipped folder stays a stock
  `TimmWrapperForImageClassification` that the Hub inference API and `pipeline` load as is.
- hybrid MelanomaViT: projection + transformer + every head (`config.extra_heads`, shipped).
- pure MelanomaViT (linear patches) and ResNet (TimmWrapper, no ImageNet weights here): nothing is
  frozen, so the "stem" is the identity and the cache holds the processor-sized pixels of each view
  (fp16); `feature_cache.dihedral` adds a random flip / 90-degree rotation per sample and step. `distillation.teachers` distil it from trained
  models that read their own caches once (`teacher_logits`): the DeiT recipe at cached-view cost.

Export: the weights of the epoch with the best mean validation melanoma AUC over the sources,
with the temperature of every head (folded into the heads, `model.calibration.fold_temperature`) and
the 95%-sensitivity melanoma threshold fitted on the multi-source validation split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import TimmWrapperForImageClassification

from model.baselines import EFFICIENTNET_LITE_ARCHS
from model.calibration import fold_temperature, store_temperature
from model.labels import DX_CODES, MELANOMA
from model.modeling_melanoma_vit import IGNORE_INDEX

from model.geometry import processor_geometry
from model.loading import load_classifier

from .features import build_cache, efficientnet_stem_names, load_cache, stem_bypassed
from .losses import distillation_loss, masked_head_loss
from .metrics import fit_temperature, melanoma_auc, threshold_for_sensitivity
from .sources import MAIN_HEAD, SourceSpec, head_labels, load_sources, source_manifest

logger = logging.getLogger("train.multisource")

BEST_WEIGHTS = "best.safetensors"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_MINUTES = 10  # at most this long between checkpoints
HYBRID_STEM = ("vit.embeddings.patch_embed.stem",)
TEACHER_LOGITS = "teacher_logits.safetensors"
DISTILLATION = "_distillation"  # MultiHeadNet's key for a DeiT model's distillation-head logits (training only)


class MultiHeadNet(nn.Module):
    """A classifier plus its extra heads: forward(pixel_values) -> {head: logits (B, n_labels)}.

    MelanomaViT carries its extra heads natively (`config.extra_heads`, `outputs.head_logits`);
    a TimmWrapper CNN gets training-only linear heads on its pooled (pre-logits) features.
    """

    def __init__(self, model: nn.Module, extra_heads: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self.model = model
        self.is_timm = isinstance(model, TimmWrapperForImageClassification)
        width = model.timm_model.num_features if self.is_timm else 0
        self.aux_heads = nn.ModuleDict(
            {name: nn.Linear(width, len(labels)) for name, labels in extra_heads.items()} if self.is_timm else {}
        )

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.is_timm:
            timm_model = self.model.timm_model
            # channels_last: CPU convolutions ~20% faster (ResNet-18 at 128 px, batch 64: 20.5 -> 24.3 img/s)
            x = pixel_values.contiguous(memory_format=torch.channels_last)
            pooled = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)  # (B, F)
            return {MAIN_HEAD: timm_model.get_classifier()(pooled), **{n: h(pooled) for n, h in self.aux_heads.items()}}
        outputs = self.model(pixel_values=pixel_values)
        logits = {MAIN_HEAD: outputs.logits, **(outputs.head_logits or {})}
        if self.training and outputs.distillation_logits is not None:
            logits[DISTILLATION] = outputs.distillation_logits
        return logits

    def stem_names(self) -> tuple[str, ...]:
        """Names (relative to this module) of the frozen stem that cached features replace
        (none for a pure ViT or a CNN without ImageNet weights, e.g. ResNet: their caches hold pixels)."""
        if self.is_timm:
            if self.model.config.architecture not in EFFICIENTNET_LITE_ARCHS.values():
                return ()
            return tuple(f"model.timm_model.{n}" for n in efficientnet_stem_names(self.model))
        if getattr(self.model.config, "patch_embedding_type", "linear") != "hybrid":
            return ()
        return tuple(f"model.{n}" for n in HYBRID_STEM)


def dihedral(x: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Sample i of the square batch x (B, C, H, H) flipped left-right when ops[i] >= 4, then turned
    by (ops[i] % 4) quarter turns: the 8 symmetries of a square, which a dermoscopy image has no
    preferred one of."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral augmentation needs square inputs, got {tuple(x.shape[-2:])}")
    x = torch.where((ops >= 4).view(-1, 1, 1, 1), x.flip(-1), x)
    turns = ops % 4
    for k in (1, 2, 3):
        rows = turns == k
        if rows.any():
            x[rows] = torch.rot90(x[rows], k, (-2, -1))
    return x


@torch.no_grad()
def teacher_logits(teachers: Sequence[Mapping[str, str]], train_ds: Any, output_dir: Path, batch_size: int) -> torch.Tensor | None:
    """Distillation targets for every training row: log of the dx probabilities averaged over the
    teachers and every cached view of each teacher's own cache (N, len(DX_CODES)).

    Each teacher (a trained folder, e.g. models/efficientnet-lite2) reads the stem features its
    recipe cached (`cache`/train), so no image is decoded again. Written once to
    `output_dir/teacher_logits.safetensors` with the teacher list (a resumed run with the same
    teachers reads it back; other teachers recompute it). The teachers' melanoma
    AUC on the training rows is logged per source: a cache whose rows are not this recipe's shows
    up as an AUC near 0.5, and a mismatched row count or geometry is refused.
    """
    if not teachers:
        return None
    path = output_dir / TEACHER_LOGITS
    n = len(train_ds)
    teacher_list = json.dumps([dict(t) for t in teachers], sort_keys=True)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("teachers") == teacher_list and f.get_slice("logits").get_shape()[0] == n:
                return f.get_tensor("logits")
    dx = np.asarray(train_ds["label"])
    sources = np.asarray(train_ds["source"])
    total = torch.zeros(n, len(DX_CODES))
    count = 0
    for teacher in teachers:
        model, processor = load_classifier(teacher["model"])
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if labels != list(DX_CODES):
            raise ValueError(f"teacher {teacher['model']} predicts {labels}, not the dx classes {list(DX_CODES)}")
        cache = Path(teacher["cache"]) / "train"
        recipe = json.loads((cache / "cache.json").read_text()) if (cache / "cache.json").is_file() else {}
        geometry = processor_geometry(processor)
        expected = {"rows": n, "size": list(geometry.size), "mean": list(geometry.mean), "std": list(geometry.std)}
        wrong = sorted(k for k, v in expected.items() if not np.allclose(recipe.get(k, -1), v))
        if wrong:
            raise ValueError(f"teacher cache {cache} does not fit {teacher['model']} on this recipe's rows: {wrong} differ")
        net = MultiHeadNet(model, {})
        features = load_cache(cache)
        with stem_bypassed(net, net.stem_names()):
            for view in range(len(features)):
                p = torch.softmax(_predict(net, features[view], batch_size)[MAIN_HEAD], -1)
                total += p
                count += 1
                aucs = {s: melanoma_auc((dx[sources == s] == DX_CODES.index(MELANOMA)).astype(int),
                                        p[torch.as_tensor(sources == s), DX_CODES.index(MELANOMA)].numpy())
                        for s in dict.fromkeys(sources)}
                logger.info("teacher %s view %d: train melanoma AUC %s", teacher["model"], view,
                            {s: round(a, 3) if a is not None else None for s, a in aucs.items()})
        del features
    logits = (total / count).clamp_min(1e-8).log()
    save_file({"logits": logits.contiguous()}, str(path), metadata={"teachers": teacher_list})
    return logits


def sampler_weights(sources: Sequence[str], dx: Sequence[int], specs: Sequence[SourceSpec], power: float = 0.5) -> torch.Tensor:
    """Per-sample draw weights: each source gets its recipe share; within a source, dx classes
    are weighted count^-power (0.5: square-root balancing; unlabelled rows count as one class)."""
    sources = np.asarray(sources)
    dx = np.asarray(dx)
    total = sum(s.weight for s in specs)
    if total <= 0:
        raise ValueError("at least one source needs a training weight > 0")
    w = np.zeros(len(sources))
    for spec in specs:
        rows = np.flatnonzero(sources == spec.name)
        if not len(rows) or spec.weight == 0:
            continue
        classes, inverse, counts = np.unique(dx[rows], return_inverse=True, return_counts=True)
        per = counts[inverse].astype(float) ** -power
        w[rows] = spec.weight / total * per / per.sum()
    return torch.as_tensor(w, dtype=torch.double)


def head_metrics(logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor], sources: Sequence[str]) -> dict[str, Any]:
    """Validation metrics: melanoma AUC of the dx head per source and their mean; AUC of each extra
    head's last label vs rest (atypical / irregular / present / seborrheic keratosis...)."""
    out: dict[str, Any] = {}
    y = labels[MAIN_HEAD].numpy()
    p_mel = torch.softmax(logits[MAIN_HEAD].float(), -1)[:, DX_CODES.index(MELANOMA)].numpy()
    sources = np.asarray(sources)
    aucs = []
    for source in dict.fromkeys(sources):
        keep = (sources == source) & (y != IGNORE_INDEX)
        auc = melanoma_auc((y[keep] == DX_CODES.index(MELANOMA)).astype(int), p_mel[keep])
        out[f"melanoma_auc/{source}"] = auc
        if auc is not None:
            aucs.append(auc)
    out["melanoma_auc_mean"] = float(np.mean(aucs)) if aucs else None
    for name, z in logits.items():
        if name == MAIN_HEAD:
            continue
        yh = labels[name].numpy()
        keep = yh != IGNORE_INDEX
        if keep.any():
            p = torch.softmax(z.float(), -1)[:, -1].numpy()
            out[f"auc/{name}"] = melanoma_auc((yh[keep] == z.shape[-1] - 1).astype(int), p[keep])
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_weights(net: MultiHeadNet, path: Path) -> None:
    """Load weights saved with the stem bypassed: every key but the (frozen, unchanged) stem's."""
    missing, unexpected = net.load_state_dict(load_file(path), strict=False)
    stray = [k for k in missing if not k.startswith(net.stem_names())] + list(unexpected)
    if stray:
        raise ValueError(f"{path} does not match the model: {stray[:5]}")


def _label_tensors(ds: Any, heads: Sequence[str]) -> dict[str, torch.Tensor]:
    return {MAIN_HEAD: torch.as_tensor(ds["label"]), **{h: torch.as_tensor(ds[h]) for h in heads}}


@torch.no_grad()
def _predict(net: MultiHeadNet, features: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    net.eval()
    chunks = [net(features[i : i + batch_size].float()) for i in range(0, len(features), batch_size)]
    return {name: torch.cat([c[name] for c in chunks]).float() for name in chunks[0]}


def train_multisource(cfg: Any, args: Any, create_model: Any, weight_decay_groups: Any, create_scheduler: Any) -> dict[str, Any]:
    """Run a multi-source recipe (`cfg.sources`, `cfg.feature_cache`); returns the best validation metrics.

    `create_model`, `weight_decay_groups` and `create_scheduler` are train.py's (one definition each).
    """
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(project_config=ProjectConfiguration(project_dir=str(output_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(cfg.seed)
    if accelerator.num_processes > 1:
        raise ValueError("multi-source training on cached features runs in one process (the cache is the speed-up)")

    specs = [SourceSpec(**s) for s in cfg.sources]
    extra = head_labels(specs)
    dd = load_sources(specs)
    output_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(output_dir / "split_manifest.json", json.dumps(source_manifest(dd, specs), indent=1))

    id2label = dict(enumerate(DX_CODES))
    model, processor = create_model(cfg.model, id2label, extra_heads=extra)
    net = MultiHeadNet(model, extra)

    # ---- cached stem features (built once, shared by recipes with the same stem and views)
    cache_cfg = dict(cfg.feature_cache or {})
    cache_dir = Path(cache_cfg.get("dir", output_dir / "feature_cache"))
    views = int(cache_cfg.get("views", 4))
    stem = nn.Sequential(*(net.get_submodule(n) for n in net.stem_names())).eval()  # empty = pixels
    for split, n_views, seed in (("validation", 1, 0), ("train", views, cfg.seed)):
        build_cache(dd[split], stem, processor, cache_dir / split, views=n_views, augment=cfg.augmentation,
                    batch_size=cfg.eval_batch_size, seed=seed, num_workers=args.num_workers)
    train_x = load_cache(cache_dir / "train")[:views]  # (V, N, C, h, w) fp16
    val_x = load_cache(cache_dir / "validation")[0]
    if train_x.shape[1] != len(dd["train"]) or len(val_x) != len(dd["validation"]):
        raise ValueError(f"feature cache {cache_dir} does not match the sources' splits; delete it or set feature_cache.dir")
    train_y = _label_tensors(dd["train"], list(extra))
    val_y = _label_tensors(dd["validation"], list(extra))
    val_sources = dd["validation"]["source"]
    teacher = teacher_logits(cfg.distillation.teachers, dd["train"], output_dir, cfg.eval_batch_size)
    dihedral_aug = bool(cache_cfg.get("dihedral", False))

    # ---- what trains: everything but the stem
    stem_params = {id(p) for p in stem.parameters()}
    for p in net.parameters():
        p.requires_grad_(id(p) not in stem_params)
    groups = [
        {"params": [p for p in g["params"] if p.requires_grad], "weight_decay": g["weight_decay"]}
        for g in weight_decay_groups(net, cfg.weight_decay)
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas))
    weights = sampler_weights(dd["train"]["source"], dd["train"]["label"], specs)
    steps_per_epoch = len(dd["train"]) // cfg.batch_size
    max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    scheduler = create_scheduler(cfg, optimizer, max_steps, steps_per_epoch)
    loss_weights = {MAIN_HEAD: 1.0, **dict(cfg.head_loss_weights)}

    state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "completed_steps": 0, "history": [], "best": None}
    if args.resume_from_checkpoint:
        resume = args.resume_from_checkpoint
        ckpt = _latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
        if ckpt is None or not (ckpt / TRAINER_STATE).is_file():
            raise ValueError(f"--resume_from_checkpoint {resume}: no complete checkpoint ({output_dir}/checkpoint)")
        _load_weights(net, ckpt / "model.safetensors")
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        logger.info("resumed from %s at epoch %d step %d", ckpt, state["epoch"], state["step_in_epoch"])

    logger.info("%s on %d sources: %d train images x %d views, %d epochs x %d steps, heads %s",
                cfg.model.name, len(specs), train_x.shape[1], views, num_epochs, steps_per_epoch, [MAIN_HEAD, *extra])
    start = time.perf_counter()
    with stem_bypassed(net, net.stem_names()):  # the cached features replace the stem's output
        val_logits = _train_epochs(net, cfg, state, train_x, train_y, val_x, val_y, val_sources, weights,
                                   optimizer, scheduler, groups, loss_weights, max_steps, num_epochs,
                                   steps_per_epoch, output_dir, accelerator.is_local_main_process,
                                   teacher=teacher, dihedral_aug=dihedral_aug)
    calibration = export(net, processor, val_logits, val_y, output_dir)
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict["adam_betas"] = list(cfg.adam_betas)
    (output_dir / "train_config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    (output_dir / "command.txt").write_text(f"accelerate launch {shlex.join(sys.argv)}\n")
    result = {"best": state["best"], "history": state["history"], "calibration": calibration,
              "minutes": (time.perf_counter() - start) / 60, "heads": {MAIN_HEAD: list(DX_CODES), **extra}}
    _atomic_write(output_dir / "val_metrics.json", json.dumps(result, indent=2))
    return state["best"]


def _save_checkpoint(net: nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any], output_dir: Path) -> None:
    """Write checkpoint.tmp/ completely (trainer_state.json last), then swap it in for checkpoint/:
    a run killed at any moment leaves a complete checkpoint/ or checkpoint.old/ behind."""
    tmp, ckpt, old = (output_dir / name for name in ("checkpoint.tmp", "checkpoint", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(torch.get_rng_state(), tmp / "rng.pt")  # dropout / drop path continue as if never stopped
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(output_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):
        if (output_dir / name / TRAINER_STATE).is_file():
            return output_dir / name
    return None


def _train_epochs(net, cfg, state, train_x, train_y, val_x, val_y, val_sources, weights, optimizer, scheduler,
                  groups, loss_weights, max_steps, num_epochs, steps_per_epoch, output_dir, show,
                  teacher: torch.Tensor | None = None, dihedral_aug: bool = False) -> dict[str, torch.Tensor]:
    """The epoch loop on cached features (stem bypassed); returns the best epoch's validation logits
    with the best weights loaded into `net`.

    With `teacher` (N, C) logits, the dx term is (1 - alpha) * CE(labels) + alpha * the distillation
    loss of the distillation head (the dx head for models without one) to the teacher rows.

    Checkpoints at every epoch end, every `cfg.checkpointing_steps` steps and at least every
    CHECKPOINT_MINUTES. An epoch's draw order depends only on (seed, epoch), so a run resumed
    mid-epoch skips exactly the steps it had trained.
    """
    views = train_x.shape[0]
    generator = torch.Generator()
    start = last_save = time.perf_counter()
    while state["epoch"] < num_epochs and state["completed_steps"] < max_steps:
        generator.manual_seed(cfg.seed + state["epoch"])
        order = torch.multinomial(weights, steps_per_epoch * cfg.batch_size, replacement=True, generator=generator)
        view = torch.randint(0, views, (len(order),), generator=generator)
        ops = torch.randint(0, 8, (len(order),), generator=generator) if dihedral_aug else None
        net.train()
        running = 0.0
        bar = tqdm(range(state.get("step_in_epoch", 0), steps_per_epoch), desc=f"epoch {state['epoch']}", disable=not show)
        for step in bar:
            if state["completed_steps"] >= max_steps:
                break
            rows = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            idx = order[rows]
            x = train_x[view[rows], idx].float()  # (B, C, h, w)
            if ops is not None:
                x = dihedral(x, ops[rows])
            loss = _loss(net(x), {h: y[idx] for h, y in train_y.items()}, loss_weights, cfg,
                         teacher[idx] if teacher is not None else None)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["completed_steps"] += 1
            state["step_in_epoch"] = step + 1
            running += loss.item()
            if step % 10 == 9:
                bar.set_postfix(loss=f"{running / 10:.3f}")
                running = 0.0
            due = cfg.checkpointing_steps and state["completed_steps"] % cfg.checkpointing_steps == 0
            if due or time.perf_counter() - last_save > CHECKPOINT_MINUTES * 60:
                _save_checkpoint(net, optimizer, scheduler, state, output_dir)
                last_save = time.perf_counter()
        metrics = head_metrics(_predict(net, val_x, cfg.eval_batch_size), val_y, val_sources)
        metrics.update(epoch=state["epoch"], step=state["completed_steps"], minutes=(time.perf_counter() - start) / 60)
        state["history"].append(metrics)
        logger.info("epoch %d: %s", state["epoch"], json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        if state["best"] is None or (metrics["melanoma_auc_mean"] or 0) > state["best"]["melanoma_auc_mean"]:
            state["best"] = {k: metrics[k] for k in ("epoch", "melanoma_auc_mean")}
            save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(output_dir / BEST_WEIGHTS))
        _save_checkpoint(net, optimizer, scheduler, state, output_dir)
        last_save = time.perf_counter()

    _load_weights(net, output_dir / BEST_WEIGHTS)
    return _predict(net, val_x, cfg.eval_batch_size)


def _loss(logits: dict[str, torch.Tensor], labels: Mapping[str, torch.Tensor], weights: Mapping[str, float],
          cfg: Any, teacher: torch.Tensor | None) -> torch.Tensor:
    """Masked multi-head cross-entropy, with DeiT distillation on the dx head(s) when there is a teacher.

    A DeiT model's distillation head learns the teacher (or, without one, the labels too: the model
    averages both heads in eval)."""
    student = logits.pop(DISTILLATION, None)
    main = weights.get(MAIN_HEAD, 1.0)
    if teacher is None and student is None:
        return masked_head_loss(logits, labels, weights, cfg.label_smoothing)[0]
    share = 1 - cfg.distillation.alpha if teacher is not None else 0.5
    loss = masked_head_loss(logits, labels, {**weights, MAIN_HEAD: main * share}, cfg.label_smoothing)[0]
    if teacher is None:
        return loss + masked_head_loss({MAIN_HEAD: student}, {MAIN_HEAD: labels[MAIN_HEAD]}, {MAIN_HEAD: main * 0.5},
                                       cfg.label_smoothing)[0]
    target = student if student is not None else logits[MAIN_HEAD]
    d = cfg.distillation
    return loss + main * d.alpha * distillation_loss(target, teacher, d.kind, d.temperature)


def export(net: MultiHeadNet, processor: Any, val_logits: Mapping[str, torch.Tensor],
           val_y: Mapping[str, torch.Tensor], output_dir: Path) -> dict[str, Any]:
    """save_pretrained the model with its fitted temperatures folded into the heads and the validation
    melanoma threshold."""
    temps = {}
    for name, z in val_logits.items():
        keep = val_y[name] != IGNORE_INDEX
        temps[name] = fit_temperature(z[keep], val_y[name][keep])
    keep = val_y[MAIN_HEAD] != IGNORE_INDEX
    p_mel = torch.softmax(val_logits[MAIN_HEAD][keep] / temps[MAIN_HEAD], -1)[:, DX_CODES.index(MELANOMA)]
    threshold = threshold_for_sensitivity((val_y[MAIN_HEAD][keep] == DX_CODES.index(MELANOMA)).int().numpy(), p_mel.numpy(), 0.95)
    model = net.model
    model.config.melanoma_threshold = threshold
    store_temperature(model.config, temps[MAIN_HEAD])
    if not net.is_timm:
        model.config.head_temperatures = {k: v for k, v in temps.items() if k != MAIN_HEAD}
    fold_temperature(model).eval().save_pretrained(output_dir, safe_serialization=True)
    if not net.is_timm:
        processor.save_pretrained(output_dir)
    return {"temperatures": temps, "melanoma_threshold": threshold, "threshold_rule": "95% melanoma sensitivity on the multi-source validation split"}
