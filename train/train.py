#!/usr/bin/env python
"""Train a melanoma classifier (MelanomaViT, or a timm CNN baseline) with accelerate.

Research/education tool, not a diagnostic device.

    accelerate launch train/train.py --config train/configs/melanoma_vit_scratch.yaml --output_dir runs/vit
    python train/train.py --config train/configs/efficientnet_lite0.yaml --output_dir runs/effnet \
        --set epochs=5 --set learning_rate=3e-4
    accelerate launch train/train.py --config ... --output_dir runs/vit --resume_from_checkpoint latest
    accelerate launch --multi_gpu --num_processes 8 train/train.py --config train/configs/multisource_lite2.yaml --output_dir runs/ms

One loop for every recipe: set_seed -> data -> model -> batches -> one `accelerator.prepare` ->
epochs of `train_step` (backward, accumulation, clipping) -> `validate` (gather_for_metrics,
save_state) -> `export` (calibrated, save_pretrained). The model is always a `MultiHeadNet`
(pixels or cached features -> {head: logits}); a single-source recipe has the dx head only, a
`sources:` recipe (train/multisource.py) one head per source and criterion. The batches come from
images (decoded and augmented per step) or, with `feature_cache:`, from a stem's cached output
with the stem bypassed (train/features.py).

Hyperparameters live in a YAML file (`TrainConfig`, overridable with `--set key=value`, dotted keys for
the `model:` / `distillation:` sections); argparse only carries infrastructure (paths, precision,
workers, resume). The output folder ends up Hub-ready: `save_pretrained` model + image processor
(loads with `AutoModelForImageClassification` / `AutoImageProcessor`), `split_manifest.json`,
`val_metrics.json`, `train_config.yaml`, `training_args.json` and `command.txt`; `checkpoints/`
holds `accelerator.save_state` folders for `--resume_from_checkpoint`, `runs/` the TensorBoard logs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import json
import logging
import math
import os
import re
import shlex
import sys
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# --------------------------------------------------------------------------------------------
# Command line (infrastructure only), parsed before the heavy imports below
# --------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML file of TrainConfig fields (train/configs/*.yaml)")
    # --output-dir as an alias: evaluate.py spells its flags with hyphens.
    parser.add_argument("--output_dir", "--output-dir", type=str, required=True,
                        help="run folder: exported model, checkpoints/, runs/")
    parser.add_argument("--data", type=str, default=None, help="dataset spec (overrides the config's `data`)")
    parser.add_argument("--max_steps", type=int, default=None, help="stop after N optimizer steps (overrides epochs)")
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help="smoke runs: train on a seeded random N images of the train split")
    parser.add_argument("--max_eval_samples", type=int, default=None,
                        help="smoke runs: validate on a seeded random N images of the validation split")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    parser.add_argument("--seed", type=int, default=None, help="training seed (overrides the config)")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (0 = main process)")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch intra-op threads per process (default: torch's); 1 on a CPU shared with other jobs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set learning_rate=3e-4 --set model.kwargs.hidden_size=128")
    return parser.parse_args(argv)


if __name__ == "__main__":
    # --help and flag errors answer at once instead of after ~20 s of torch/transformers/timm imports.
    parse_args()
    if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        # Python puts train/ first on sys.path, where this file shadows the `train` package: drop
        # that entry (what `python -P` does); `model` and `train` come from the installed project.
        del sys.path[0]

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from accelerate import Accelerator, DistributedDataParallelKwargs  # noqa: E402
from accelerate.utils import ProjectConfiguration, set_seed  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from timm.models import group_parameters  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    TimmWrapperForImageClassification,
    ViTImageProcessor,
    get_scheduler,
)

import model as melanoma_models  # noqa: E402  (registers MelanomaViT with the Auto classes)
from model.baselines import (  # noqa: E402
    EFFICIENTNET_LITE_ARCHS,
    create_efficientnet_lite,
    create_image_processor,
    create_resnet,
    create_timm_efficientnet_lite_imagenet,
)
from model.convert import load_hybrid_stem_from_timm  # noqa: E402
from model.geometry import processor_geometry  # noqa: E402
from model.calibration import classifier_heads, fold_temperature, unset_config_key  # noqa: E402
from model.classifier import Classifier  # noqa: E402
from model.metrics_schema import TARGET_SENSITIVITY, THRESHOLD_RULE  # noqa: E402
from model.labels import DX_CODES, MELANOMA  # noqa: E402
from model.modeling_melanoma_vit import IGNORE_INDEX  # noqa: E402
from model.stem import stem_bypassed  # noqa: E402
from train.balance import balanced_sampler_weights, class_weights  # noqa: E402
from train.data import load_image_dataset  # noqa: E402
from train.features import build_cache, load_cache, load_mask_cache  # noqa: E402
from train.losses import (  # noqa: E402
    DISTILLATION,
    DISTILLATION_KINDS,
    attention_mask_loss,
    make_criterion,
    multihead_loss,
    rollout_mask_share,
)
from train.metrics import fit_temperature, threshold_for_sensitivity  # noqa: E402
from train.multisource import (  # noqa: E402
    ROLLOUT,
    CachedFeatures,
    MultiHeadNet,
    RowTargets,
    head_metrics,
    sampler_weights,
    teacher_logits,
)
from train.sources import MAIN_HEAD, SourceSpec, head_labels, load_sources, source_manifest  # noqa: E402
from train.splits import split_by_lesion, write_manifest  # noqa: E402
from train.transforms import AugmentConfig, build_batch_mixer, build_transforms, with_image_transform  # noqa: E402

logger = logging.getLogger("train")
ranks = logging.getLogger("train.ranks")  # one line per process, also from the non-main ones

CNN_BASELINES = ("resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
SCHEDULERS = ("cosine", "linear", "constant", "cosine_with_restarts", "cosine_with_min_lr", "step")
IMBALANCE = ("sampler", "class_weights", "none")
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"
BEST_WEIGHTS = "best.safetensors"  # the weights of the best validation epoch (metric_for_best_model)
CHECKPOINT_MINUTES = 10  # at most this long between checkpoints


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    """`model:` section: which architecture, at which resolution, with which kwargs."""

    name: str = "melanoma_vit"  # melanoma_vit | resnet18 | resnet50 | efficientnet_lite{0,1,2} | path / Hub id
    image_size: int | None = None  # training resolution (px); melanoma_vit also reads kwargs.image_size
    pretrained: bool | None = None  # CNN baselines: ImageNet weights (None = when available)
    kwargs: dict[str, Any] = field(default_factory=dict)  # MelanomaViTConfig fields / from_pretrained kwargs
    trust_remote_code: bool = False  # fine-tuning a Hub/path model with custom code


@dataclass
class DistillationArgs:
    """`distillation:` section (DeiT): a fine-tuned teacher (path / Hub id) in eval mode."""

    teacher: str | None = None
    kind: str = "hard"  # hard: CE(dist_logits, teacher argmax); soft: KL at `temperature`
    alpha: float = 0.5  # weight of the distillation term; (1 - alpha) on CE(cls_logits, labels)
    temperature: float = 1.0  # soft distillation only
    # multi-source recipes: teachers read their own cached stem features once, before training:
    # [{"model": folder or Hub id, "cache": that model's recipe's feature_cache.dir}, ...]; their
    # dx probabilities (averaged over teachers and cached views) are the distillation targets
    teachers: list[dict[str, str]] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Every hyperparameter of a run (one YAML file per recipe under train/configs/)."""

    model: ModelArgs = field(default_factory=ModelArgs)
    distillation: DistillationArgs = field(default_factory=DistillationArgs)
    # data
    data: str = "../shared/data/ham10000"  # load_image_dataset spec (Hub id, folder, CSV)
    label_scheme: str = "dx"  # dx (7 classes) | binary (other / mel)
    val_size: float = 0.15
    test_size: float = 0.15
    # smoke runs: seeded random subsets of the train / validation splits (the manifest keeps the whole split)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    split_seed: int = 42  # lesion-grouped split; keep fixed across recipes so they share one split
    augmentation: dict[str, Any] = field(default_factory=dict)  # passed to train.transforms.build_transforms
    # multi-source recipes (train/multisource.py): list of train.sources.SourceSpec fields; when set,
    # `data`/`val_size`/`test_size` are per source and training runs on cached stem features
    sources: list[dict[str, Any]] | None = None
    # multi-source batches from cached stem features (none: image batches, the whole network trains):
    # {"dir": shared cache folder, "views": augmented views (+ 1 eval view), "dihedral": random flips/turns}
    feature_cache: dict[str, Any] | None = None
    head_loss_weights: dict[str, float] = field(default_factory=dict)  # extra head -> loss weight (default 1)
    # a ViT's attention target (cached-feature multi-source recipes): {"weight": w, "masks": {source: folder of
    # <image_id>_segmentation.png}}; adds w * (1 - share of the plain attention rollout inside the lesion) to
    # the loss for the rows that have a mask (train.losses.attention_mask_loss), and the validation share
    attention_target: dict[str, Any] | None = None
    # optimisation
    epochs: int = 10
    max_steps: int | None = None  # optimizer updates; overrides epochs when set
    batch_size: int = 32
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    label_smoothing: float = 0.0
    scheduler: str = "cosine"  # one of SCHEDULERS
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    min_lr: float = 0.0  # cosine_with_min_lr
    restart_cycles: int = 2  # cosine_with_restarts: number of hard restarts
    step_size_epochs: float = 10.0  # step: decay every this many epochs
    step_gamma: float = 0.1
    # class imbalance
    imbalance: str = "sampler"  # one of IMBALANCE
    focal_gamma: float = 0.0  # 0 = cross-entropy
    # tau of the logit-adjusted dx loss (Menon et al. 2021): CE(logits + tau * log prior), prior = the
    # dx classes' share of the training draws. The head learns balanced scores; the export keeps the
    # prior in its bias (calibrated probabilities as before) and stores the offsets that undo it for
    # the top-class decision (config.dx_decision_offsets). 0 = off
    logit_adjustment: float = 0.0
    # frozen-backbone warm-up and gradual unfreezing (blocks from the head down)
    freeze_backbone: int = 0  # train only the head for this many epochs/steps (0 = off)
    unfreeze_every: int = 0  # then unfreeze one more block every this many epochs/steps (0 = all at once)
    freeze_unit: str = "epochs"  # epochs | steps
    # weights average
    ema: bool = False
    ema_decay: float = 0.999
    # checkpointing / logging
    checkpointing_steps: int | None = None  # save_state every N optimizer steps (and at every epoch end)
    checkpoints_total_limit: int | None = 2
    logging_steps: int = 10
    report_to: str = "tensorboard"  # tensorboard | none
    # the exported weights: those of the epoch with the highest value of this validation metric
    # (e.g. melanoma_auc_mean, the mean over sources), or the last epoch's when null
    metric_for_best_model: str | None = None
    seed: int = 42


SINGLE_SOURCE_KEYS = ("data", "label_scheme", "val_size", "test_size", "split_seed", "max_train_samples", "max_eval_samples")
FEATURE_CACHE_KEYS = ("dir", "views", "dihedral")
ATTENTION_TARGET_KEYS = ("weight", "masks")
# Fitted on a trained folder's own predictions: a recipe that fine-tunes the folder drops them (the new
# weights get their own), and takes its calibrated logits as the run's starting logits (the run's export
# folds the temperature it fits on top of them).
FITTED_CONFIG_KEYS = ("melanoma_operating_points", "dx_decision_offsets", "dx_decision_rule", "melanoma_threshold",
                      "folded_temperature", "folded_head_temperatures")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Dataclass `cls` from a dict, with a clear error on unknown keys."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key in ("model", "distillation") and cls is TrainConfig:
            sub = ModelArgs if key == "model" else DistillationArgs
            value = _build(sub, value or {}, f"{where}.{key}")
        elif key == "adam_betas":
            value = tuple(float(v) for v in value)
        elif value is not None and not isinstance(value, bool):
            # YAML 1.1 reads "1e-4" as a string: coerce to the field's numeric type.
            kinds = typing.get_args(hints[key]) or (hints[key],)
            try:
                if float in kinds and isinstance(value, (int, str)):
                    value = float(value)
                elif int in kinds and isinstance(value, str):
                    value = int(value)
            except ValueError as err:
                raise ValueError(f"{where}.{key}: expected a number, got {value!r}") from err
        kwargs[key] = value
    return cls(**kwargs)


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `key=value` (dotted keys for nested sections; value parsed as YAML)."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for part in parts[:-1]:
        if isinstance(node, list):  # list items by index, e.g. sources.1.weight
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"--set {key}: {part!r} is not an index of a {len(node)}-item list")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ValueError(f"--set {key}: {part!r} is not a section")
    if isinstance(node, list):
        raise ValueError(f"--set {key}: set a field of a list item (e.g. sources.0.weight), not the item")
    node[parts[-1]] = yaml.safe_load(value)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file plus `key=value` overrides, validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a YAML mapping of TrainConfig fields")
    for assignment in overrides:
        _apply_override(raw, assignment)
    cfg = _build(TrainConfig, raw, str(path or "config"))
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.scheduler in SCHEDULERS, f"scheduler must be one of {SCHEDULERS}, got {cfg.scheduler!r}"),
        (cfg.imbalance in IMBALANCE, f"imbalance must be one of {IMBALANCE}, got {cfg.imbalance!r}"),
        (cfg.label_scheme in ("dx", "binary"), f"label_scheme must be 'dx' or 'binary', got {cfg.label_scheme!r}"),
        (cfg.freeze_unit in ("epochs", "steps"), f"freeze_unit must be 'epochs' or 'steps', got {cfg.freeze_unit!r}"),
        (cfg.distillation.kind in DISTILLATION_KINDS, f"distillation.kind must be 'hard' or 'soft', got {cfg.distillation.kind!r}"),
        (0.0 <= cfg.distillation.alpha <= 1.0, f"distillation.alpha must be in [0, 1], got {cfg.distillation.alpha}"),
        (cfg.distillation.temperature > 0, "distillation.temperature must be > 0"),
        (cfg.batch_size >= 1 and cfg.eval_batch_size >= 1, "batch_size and eval_batch_size must be >= 1"),
        (cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
        (cfg.epochs >= 1 or (cfg.max_steps or 0) >= 1, "set epochs >= 1 or max_steps >= 1"),
        (cfg.focal_gamma >= 0, f"focal_gamma must be >= 0, got {cfg.focal_gamma}"),
        (cfg.logit_adjustment >= 0, f"logit_adjustment must be >= 0, got {cfg.logit_adjustment}"),
        (cfg.checkpointing_steps is None or cfg.checkpointing_steps >= 1, "checkpointing_steps must be >= 1 or null"),
        (cfg.report_to in ("tensorboard", "none"), f"report_to must be 'tensorboard' or 'none', got {cfg.report_to!r}"),
        (all(n is None or n >= 1 for n in (cfg.max_train_samples, cfg.max_eval_samples)),
         "max_train_samples and max_eval_samples must be >= 1 or null"),
        (bool(cfg.sources) or not cfg.distillation.teachers,
         "distillation.teachers (teachers on cached features) is for multi-source recipes; use distillation.teacher"),
        (not (cfg.sources and cfg.distillation.teacher),
         "multi-source recipes distil from cached features: use distillation.teachers [{model, cache}], not distillation.teacher"),
        (all(isinstance(t, dict) and set(t) == {"model", "cache"} for t in cfg.distillation.teachers),
         "each distillation.teachers entry is {model: folder or Hub id, cache: its recipe's feature_cache.dir}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    _validate_mode(cfg)


def _validate_mode(cfg: TrainConfig) -> None:
    """Refuse every key the recipe's mode would ignore, naming it (a silent no-op is a wrong experiment)."""
    defaults = TrainConfig()
    if cfg.sources:
        ignored = [k for k in SINGLE_SOURCE_KEYS if getattr(cfg, k) != getattr(defaults, k)]
        if ignored:
            raise ValueError(f"{ignored} are single-source keys: a `sources:` recipe sets data and splits per source "
                             "(use --max_steps for a short multi-source run)")
        augment = AugmentConfig.from_any(cfg.augmentation)
        if augment.mixup_alpha > 0 or augment.cutmix_alpha > 0:
            raise ValueError("augmentation.mixup_alpha / cutmix_alpha mix labels of one head; a `sources:` recipe "
                             "has several heads per image: set them to 0")
        unknown = sorted(set(cfg.feature_cache or {}) - set(FEATURE_CACHE_KEYS))
        if unknown:
            raise ValueError(f"unknown feature_cache key(s) {unknown}; valid: {list(FEATURE_CACHE_KEYS)}")
        heads = [MAIN_HEAD, *head_labels([SourceSpec(**s) for s in cfg.sources])]
        untrained = sorted(set(cfg.head_loss_weights) - set(heads))
        if untrained:
            raise ValueError(f"head_loss_weights {untrained}: no source of this recipe trains such a head (heads: {heads})")
        if cfg.attention_target is not None:
            target = cfg.attention_target
            unknown = sorted(set(target) - set(ATTENTION_TARGET_KEYS))
            names = {s["name"] for s in cfg.sources}
            if unknown or not set(target.get("masks") or {}) <= names or not target.get("masks"):
                raise ValueError(f"attention_target is {{weight: number > 0, masks: {{source: mask folder}}}} with sources "
                                 f"from {sorted(names)}; got {target}")
            if not float(target.get("weight", 0)) > 0:
                raise ValueError(f"attention_target.weight must be > 0, got {target.get('weight')}")
            if not cfg.feature_cache:
                raise ValueError("attention_target needs cached-feature batches (feature_cache): the masks are cached "
                                 "with each view")
    else:
        for key in ("feature_cache", "head_loss_weights", "attention_target"):
            if getattr(cfg, key):
                raise ValueError(f"{key} is for multi-source recipes (`sources:`); remove it from this recipe")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def create_model(
    cfg: ModelArgs, id2label: dict[int, str], extra_heads: dict[str, list[str]] | None = None
) -> tuple[PreTrainedModel, Any]:
    """Model (train mode) and its image processor for `cfg.name`, with a head for `id2label`.

    `extra_heads` (name -> labels) become MelanomaViT's `config.extra_heads`; CNN baselines ignore
    them (multi-source training adds training-only auxiliary heads instead).
    """
    label2id = {name: i for i, name in id2label.items()}
    if cfg.name == "melanoma_vit":
        kwargs = dict(cfg.kwargs)
        if cfg.image_size is not None:
            kwargs["image_size"] = cfg.image_size
        if extra_heads:
            kwargs["extra_heads"] = extra_heads
        config = melanoma_models.MelanomaViTConfig(**kwargs, id2label=id2label, label2id=label2id)
        model = melanoma_models.MelanomaViTForImageClassification(config)
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        if getattr(config, "patch_embedding_type", "linear") == "hybrid":
            # The CNN stem keeps its ImageNet weights and the normalisation they were trained with.
            mean, std = load_hybrid_stem_imagenet(model)
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        processor = ViTImageProcessor(
            do_resize=True,
            size={"height": size, "width": size},
            resample=3,  # bicubic
            image_mean=list(mean),
            image_std=list(std),
        )
    elif cfg.name in CNN_BASELINES:
        if cfg.name.startswith("efficientnet_lite"):
            variant = cfg.name.removeprefix("efficientnet_")
            model = create_efficientnet_lite(variant, id2label=id2label, pretrained=cfg.pretrained is not False, **cfg.kwargs)
        else:
            model = create_resnet(cfg.name, id2label=id2label, pretrained=cfg.pretrained, **cfg.kwargs)
        if cfg.image_size is not None:
            # The saved config's pretrained_cfg is what TimmWrapperImageProcessor reloads: train and ship
            # at the same resolution; squash the whole field of view to a square (no crop: lesions can sit
            # near the edge), as the ViTs' processor does.
            pretrained_cfg = dict(model.config.pretrained_cfg)
            pretrained_cfg.update(input_size=[3, cfg.image_size, cfg.image_size], crop_pct=1.0, crop_mode="squash")
            pretrained_cfg.pop("test_input_size", None)
            model.config.pretrained_cfg = pretrained_cfg
        processor = create_image_processor(model)
    else:
        model = AutoModelForImageClassification.from_pretrained(
            cfg.name,
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
            trust_remote_code=cfg.trust_remote_code,
            **cfg.kwargs,
        )
        processor = AutoImageProcessor.from_pretrained(cfg.name, trust_remote_code=cfg.trust_remote_code)
        for key in FITTED_CONFIG_KEYS:
            unset_config_key(model.config, key)
    return model.train(), processor


def load_hybrid_stem_imagenet(model: PreTrainedModel) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Copy the ImageNet EfficientNet-Lite stages into a hybrid MelanomaViT's stem (in place).

    Returns the (mean, std) normalisation those weights expect (0.5, 0.5 for the TF Lite ports).
    """
    arch = model.config.backbone
    variant = next((v for v, a in EFFICIENTNET_LITE_ARCHS.items() if a == arch), None)
    if variant is None:
        raise ValueError(f"ImageNet weights exist here for {sorted(EFFICIENTNET_LITE_ARCHS.values())} stems, not {arch!r}")
    load_hybrid_stem_from_timm(model, create_timm_efficientnet_lite_imagenet(variant))
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def parameter_blocks(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped into blocks ordered from the head down to the stem, by the model's own timm-style
    `group_matcher` (timm's `group_parameters`).

    MelanomaViT: [heads + final norm, last block, ..., first block, embeddings (tokens, position embeddings, patch
    projection or hybrid CNN stem)]; timm models (TimmWrapper): `group_matcher(coarse=True)` reversed (ResNet and
    EfficientNet stages). Any other model is one block, frozen or trained as a whole.
    """
    if isinstance(model, TimmWrapperForImageClassification):
        module, prefix = model.timm_model, "timm_model."
    elif isinstance(model, melanoma_models.MelanomaViTPreTrainedModel):
        module, prefix = model, ""
    else:
        return [[name for name, _ in model.named_parameters()]]
    groups = group_parameters(module, module.group_matcher(coarse=True))
    return [[prefix + name for name in groups[k]] for k in sorted(groups, reverse=True)]


def trainable_block_count(progress: int, n_blocks: int, freeze_backbone: int, unfreeze_every: int) -> int:
    """How many blocks (counted from the head) train at `progress` (an epoch or step index)."""
    if freeze_backbone <= 0:
        return n_blocks
    if progress < freeze_backbone:
        return 1
    if unfreeze_every <= 0:
        return n_blocks
    return min(n_blocks, 2 + (progress - freeze_backbone) // unfreeze_every)


def apply_freezing(model: nn.Module, blocks: list[list[str]], n_trainable: int) -> None:
    """requires_grad on the first `n_trainable` blocks only; BatchNorms of frozen blocks stop updating stats."""
    trainable = {name for block in blocks[:n_trainable] for name in block}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            module.train(model.training and (not params or any(p.requires_grad for p in params)))


def no_weight_decay_patterns(model: nn.Module) -> set[str]:
    """Full names (fnmatch patterns, as timm's optimizer factory reads them) of the parameters that the models in
    `model` (itself or wrapped, e.g. by multi-source training) exempt from weight decay: MelanomaViT's and timm's
    `no_weight_decay()` (timm models without one exempt nothing beyond 1-D tensors)."""
    patterns = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, melanoma_models.MelanomaViTPreTrainedModel):
            patterns |= {prefix + name for name in module.no_weight_decay()}
        elif isinstance(module, TimmWrapperForImageClassification):
            no_weight_decay = getattr(module.timm_model, "no_weight_decay", set)  # timm's own optional-method rule
            patterns |= {f"{prefix}timm_model.{name}" for name in no_weight_decay()}
    return patterns


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups [decay, no decay]: no decay for biases, norm weights (all 1-D tensors) and the
    model's `no_weight_decay()` parameters (cls/dist tokens, position embeddings), as timm's
    `param_groups_weight_decay`.

    Every parameter is included (also currently frozen ones) so that unfreezing needs no new optimizer.
    """
    patterns = no_weight_decay_patterns(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, p) for p in patterns):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, max_steps: int, updates_per_epoch: int, num_processes: int = 1
) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning-rate schedule over `max_steps` optimizer updates (transformers' schedules; torch StepLR for "step").

    Counted in scheduler calls: accelerate steps a prepared scheduler once per process per update.
    cosine / linear / constant / cosine_with_min_lr: linear warm-up then decay; cosine_with_restarts:
    `restart_cycles` hard restarts; step: x `step_gamma` every `step_size_epochs` epochs after the warm-up.
    """
    total = max_steps * num_processes
    warmup = (cfg.warmup_steps or int(round(cfg.warmup_ratio * max_steps))) * num_processes
    if cfg.scheduler == "step":
        step_size = max(1, int(round(cfg.step_size_epochs * updates_per_epoch))) * num_processes
        decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=cfg.step_gamma)
        if warmup == 0:
            return decay
        ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, decay], milestones=[warmup])
    specific: dict[str, Any] = {}
    if cfg.scheduler == "cosine_with_restarts":
        specific = {"num_cycles": cfg.restart_cycles}
    elif cfg.scheduler == "cosine_with_min_lr":
        specific = {"min_lr": cfg.min_lr}
    return get_scheduler(
        "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
        optimizer=optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs=specific,
    )


# --------------------------------------------------------------------------------------------
# Class imbalance
# --------------------------------------------------------------------------------------------
def imbalance_weights(imbalance: str, train_split: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(class weights (C,) for the loss, per-image weights (N,) for the sampler); at most one is set.

    "class_weights": inverse-frequency CE weights; "sampler": class-balanced WeightedRandomSampler
    weights (every class drawn equally often); "none": neither.
    """
    if imbalance == "class_weights":
        return class_weights(train_split), None
    if imbalance == "sampler":
        return None, balanced_sampler_weights(train_split)
    if imbalance == "none":
        return None, None
    raise ValueError(f"imbalance must be one of {IMBALANCE}, got {imbalance!r}")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
class EpochSeededSampler(Sampler[tuple[int, int, int]]):
    """Shuffling (or class-balanced drawing with `weights`) re-seeded from `seed + epoch`.

    Yields (epoch, position, index) keys for `SeededAugmentation`. The order of an epoch depends
    only on (seed, epoch), so a run resumed mid-epoch replays the same order and
    `skip_first_batches` skips exactly the batches already trained on.
    """

    def __init__(self, num_items: int, seed: int, weights: Sequence[float] | torch.Tensor | None = None) -> None:
        self.generator = torch.Generator()
        self.seed = seed
        self.epoch = 0
        if weights is None:
            self.sampler: Sampler[int] = RandomSampler(range(num_items), generator=self.generator)
        else:
            self.sampler = WeightedRandomSampler(weights, num_items, replacement=True, generator=self.generator)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        self.generator.manual_seed(self.seed + self.epoch)
        epoch = self.epoch
        return ((epoch, position, int(index)) for position, index in enumerate(self.sampler))

    def __len__(self) -> int:
        return len(self.sampler)


class SeededAugmentation(torch.utils.data.Dataset):
    """Random augmentation seeded per batch from (seed, epoch, position of its first draw).

    Augmentation then draws from its own RNG stream instead of the global one, so it does not
    depend on DataLoader prefetching, worker count or where a run was resumed, and the global
    RNG (dropout, drop path) restored by `load_state` continues exactly as in an uninterrupted run.
    Keys come from `EpochSeededSampler`.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
        epoch, position, _ = keys[0]
        seed = int(np.random.SeedSequence([self.seed, epoch, position]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset.__getitems__([index for _, _, index in keys])

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """[{"pixel_values": (3, H, W) or (C, h, w), "labels": int, other per-row targets}] -> a batch of
    stacked tensors ("labels" and integer targets as int64)."""
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
             "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)}
    for key in examples[0].keys() - batch.keys():
        batch[key] = torch.stack([torch.as_tensor(e[key]) for e in examples])
    return batch


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_heads(
    model: nn.Module, dataloader: DataLoader, accelerator: Accelerator, dx_offset: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({head: logits (N, C_head) float32}, {head: labels (N,)}) over `dataloader`, gathered from
    every process in dataset order (the padding of the last batch dropped). `model` maps pixels
    (or cached features) to {head: logits}, as `MultiHeadNet`; label keys are those of the batches
    (`labels` is the dx head's). `dx_offset`: the logit adjustment added to the dx logits.

    Not `model.classifier.Classifier` (the inference path of shipped folders, which the teachers use):
    validation scores the network being trained, whose raw logits (the loss, and the temperatures
    `calibrate` fits and folds) include a CNN's training-only auxiliary heads that no shipped model has,
    on batches sharded across processes."""
    was_training = model.training
    model.eval()
    logits: dict[str, list[torch.Tensor]] = {}
    labels: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(dataloader, desc="eval", leave=False, disable=not accelerator.is_local_main_process):
        out = {k: v.float() for k, v in with_dx_offset(model(batch["pixel_values"]), dx_offset).items() if k != ROLLOUT}
        y = {h: batch["labels" if h == MAIN_HEAD else h] for h in out}
        out, y = accelerator.gather_for_metrics((out, y))
        for h in out:
            logits.setdefault(h, []).append(out[h].cpu())
            labels.setdefault(h, []).append(y[h].cpu())
    model.train(was_training)
    return {h: torch.cat(v) for h, v in logits.items()}, {h: torch.cat(v) for h, v in labels.items()}


@torch.no_grad()
def validation_rollout_share(model: nn.Module, dataloader: DataLoader, accelerator: Accelerator) -> float | None:
    """Mean share of the plain attention rollout inside the lesion over the validation rows that have
    a mask (`train.losses.rollout_mask_share`; None without any), gathered from every process."""
    was_training = model.training
    model.eval()
    shares, has = [], []
    for batch in dataloader:
        share, has_mask = rollout_mask_share(model(batch["pixel_values"])[ROLLOUT].float(), batch["lesion_mask"])
        share, has_mask = accelerator.gather_for_metrics((share, has_mask))
        shares.append(share.cpu())
        has.append(has_mask.cpu())
    model.train(was_training)
    share, has_mask = torch.cat(shares), torch.cat(has)
    return float(share[has_mask].mean()) if has_mask.any() else None


def validation_metrics(
    logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], label_names: Sequence[str],
    sources: Sequence[str] | None = None, decision_offsets: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Loss, accuracy, balanced accuracy and melanoma one-vs-rest AUC (None if undefined) of the dx
    head; with `sources` (one per row), also the per-source melanoma AUCs, their mean and each
    extra head's AUC (`head_metrics`). The decisions are argmax(logits - `decision_offsets`) (the
    logit adjustment undone), plain argmax without offsets."""
    z, y = logits[MAIN_HEAD], labels[MAIN_HEAD]
    keep = y != IGNORE_INDEX  # unlabelled rows, images that failed to decode
    z, y = z[keep], y[keep]
    preds = (z - decision_offsets.cpu() if decision_offsets is not None else z).argmax(-1).numpy()
    metrics: dict[str, Any] = {
        "loss": float(F.cross_entropy(z, y)),
        "accuracy": float(accuracy_score(y.numpy(), preds)),
        "balanced_accuracy": float(balanced_accuracy_score(y.numpy(), preds)),
        "melanoma_auc": None,
        "n": int(len(y)),
    }
    if MELANOMA in label_names:
        mel = list(label_names).index(MELANOMA)
        is_mel = (y == mel).numpy()
        if 0 < is_mel.sum() < len(y):
            metrics["melanoma_auc"] = float(roc_auc_score(is_mel, torch.softmax(z, -1)[:, mel].numpy()))
    if sources is not None:
        metrics.update(head_metrics(logits, labels, sources))
    return metrics


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _checkpoint_index(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[-1])


def write_trainer_state(checkpoint: Path, state: dict[str, Any]) -> None:
    """Write `checkpoint/trainer_state.json` through a temp file and `os.replace`.

    The file marks the checkpoint complete, so a run killed mid-write must leave no file (the
    previous checkpoint stays `latest`), never an empty or truncated one.
    """
    tmp = checkpoint / f"{TRAINER_STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, checkpoint / TRAINER_STATE)


def _readable_state(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return False
    except ValueError:  # written before trainer_state.json was replaced atomically
        logger.warning("skipping %s: unreadable %s", checkpoint, TRAINER_STATE)
        return False
    return True


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoints/checkpoint_N` folders whose save finished (trainer_state.json is written last), oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"checkpoint_\d+", p.name) and _readable_state(p)]
    return sorted(found, key=_checkpoint_index)


def resolve_checkpoint(resume: str, output_dir: Path) -> Path:
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise ValueError(f"--resume_from_checkpoint latest: no complete checkpoint under {output_dir / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not _readable_state(path):
        raise ValueError(f"--resume_from_checkpoint {resume}: not a complete checkpoint folder (no readable {TRAINER_STATE})")
    return path


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
class TeacherAdapter:
    """A DeiT distillation teacher (a trained folder, frozen) that reads the student's batches.

    Loaded and run by the one inference path (`model.classifier.Classifier`: its loading rule, calibration
    form and forward). The student's pixels become the teacher's: undo the student processor's
    normalisation, apply the teacher's, and resize (bicubic) when the teacher expects another size.
    """

    def __init__(self, name: str, label_names: Sequence[str], student_processor: Any, device: torch.device) -> None:
        self.classifier = Classifier(name, device)
        teacher_labels = [self.classifier.id2label[i] for i in range(self.classifier.out_dim)]
        if teacher_labels != list(label_names):
            raise ValueError(f"teacher {name} predicts {teacher_labels}, the student {list(label_names)}")
        student, teacher = processor_geometry(student_processor), self.classifier.geometry
        s_mean, s_std, t_mean, t_std = (torch.tensor(v) for v in (student.mean, student.std, teacher.mean, teacher.std))
        self.scale = (s_std / t_std).view(1, 3, 1, 1).to(device)
        self.shift = ((s_mean - t_mean) / t_std).view(1, 3, 1, 1).to(device)
        self.size = tuple(teacher.size)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Student-normalised (B, 3, H, W) -> teacher logits (B, num_labels) (its calibrated head's: the
        distillation loss takes logits; a copy outside inference mode, so the loss may keep it for backward)."""
        pixels = pixel_values * self.scale + self.shift
        if self.size != tuple(pixels.shape[-2:]):
            pixels = F.interpolate(pixels, size=self.size, mode="bicubic", align_corners=False)
        (output,) = self.classifier.forward_views(pixels)
        return output.logits.clone()


@dataclass
class Batches:
    """One batch source of the training loop: the datasets it reads and what the loss needs.

    Image batches decode and augment images; cached-feature batches read a stem's fp16 output
    (`feature_cache`), with `stem` naming the modules the features replace. Both yield
    {"pixel_values", "labels", extra head labels, "teacher" (cached-teacher logits)}.
    """

    train: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset
    label_names: list[str]
    heads: dict[str, list[str]]  # extra heads (name -> labels), none for a single-source recipe
    sample_weights: torch.Tensor | None  # sampler draw weights (N,), or None for a uniform shuffle
    class_weights: torch.Tensor | None  # dx loss weights (C,), or None
    val_sources: list[str] | None  # the validation rows' sources (multi-source recipes)
    cached: bool = False  # cached-feature batches
    stem: tuple[str, ...] = ()  # modules of `MultiHeadNet` that cached features replace (none: cached pixels)


@dataclass
class TrainingRun:
    """Everything one training run holds once `accelerator.prepare` is done."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: nn.Module  # prepared MultiHeadNet (possibly DDP-wrapped): pixels or features -> {head: logits}
    processor: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    train_dataloader: DataLoader
    eval_dataloader: DataLoader
    loader_generator: torch.Generator
    criterion: nn.Module
    batches: Batches
    max_steps: int
    mixer: Callable | None = None
    teacher: TeacherAdapter | None = None
    ema: ModelEmaV3 | None = None
    blocks: list[list[str]] = field(default_factory=list)
    dx_offset: torch.Tensor | None = None  # (C,) tau * log prior added to the dx logits (logit_adjustment)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # holds the stem bypass
    # Progress, saved in every checkpoint's trainer_state.json.
    state: dict[str, Any] = field(default_factory=lambda: {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0,
                                                           "history": [], "best": None})
    # Training throughput (data loading + step, evaluation and checkpointing excluded), after 2 warm-up steps.
    speed: dict[str, Any] = field(default_factory=lambda: {"images": 0, "steps": 0, "seconds": 0.0, "warmup": 2})
    running_loss: torch.Tensor | None = None
    running_count: int = 0
    last_save: float = field(default_factory=time.monotonic)

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def label_names(self) -> list[str]:
        return self.batches.label_names

    @property
    def images_per_s(self) -> float | None:
        return self.speed["images"] / self.speed["seconds"] if self.speed["seconds"] else None

    @property
    def seconds_per_step(self) -> float | None:
        return self.speed["seconds"] / self.speed["steps"] if self.speed["steps"] else None



def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The YAML config plus `--set` overrides, with --data / --max_steps / --max_*_samples / --seed applied last."""
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data={json.dumps(args.data)}")
    for key in ("max_steps", "max_train_samples", "max_eval_samples"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return load_config(args.config, overrides)


def create_accelerator(cfg: TrainConfig, args: argparse.Namespace) -> Accelerator:
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(Path(args.output_dir)),  # also the logging dir: init_trackers("runs") logs to output_dir/runs
            automatic_checkpoint_naming=True,
            total_limit=cfg.checkpoints_total_limit,
        ),
        # Frozen blocks, and the heads of sources absent from a batch, get no gradient; DDP must be told.
        kwargs_handlers=([DistributedDataParallelKwargs(find_unused_parameters=True)]
                         if cfg.freeze_backbone > 0 or cfg.sources else None),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.WARNING)
        ranks.setLevel(logging.INFO)
    return accelerator


def load_splits(cfg: TrainConfig, accelerator: Accelerator, output_dir: Path) -> datasets.DatasetDict:
    """The lesion-grouped train/validation/test split of `cfg.data`, its manifest written to `output_dir`;
    train / validation cut to `max_train_samples` / `max_eval_samples` after the manifest is written."""
    dataset = load_image_dataset(cfg.data, label_scheme=cfg.label_scheme)
    splits = split_by_lesion(dataset, val_size=cfg.val_size, test_size=cfg.test_size, seed=cfg.split_seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(splits, output_dir / "split_manifest.json", data=cfg.data)
    for name, limit in (("train", cfg.max_train_samples), ("validation", cfg.max_eval_samples)):
        if limit is not None and limit < len(splits[name]):
            logger.info("%s split: a random %d of its %d images (max_%s_samples)", name, limit, len(splits[name]),
                        "train" if name == "train" else "eval")
            splits[name] = splits[name].shuffle(seed=cfg.seed).select(range(limit))
    return splits


def create_optimizer(
    cfg: TrainConfig, model: nn.Module, train_dataloader: DataLoader, num_processes: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, int]:
    """(AdamW, learning-rate schedule, max_steps in optimizer updates)."""
    optimizer = torch.optim.AdamW(
        weight_decay_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=tuple(cfg.adam_betas)
    )
    # Per-process optimizer updates per epoch, as after prepare() shards the batches over processes.
    updates_per_epoch = math.ceil(math.ceil(len(train_dataloader) / num_processes) / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_steps if cfg.max_steps else cfg.epochs * updates_per_epoch
    return optimizer, create_scheduler(cfg, optimizer, max_steps, updates_per_epoch, num_processes), max_steps


def load_data(cfg: TrainConfig, accelerator: Accelerator, output_dir: Path) -> tuple[datasets.DatasetDict, list[str], dict[str, list[str]]]:
    """(train/validation/test splits, dx label names, extra heads); the split manifest written to `output_dir`.

    Multi-source recipes: every source's splits in one DatasetDict (`train.sources.load_sources`),
    with a `source` column and one label column per extra head.
    """
    if not cfg.sources:
        splits = load_splits(cfg, accelerator, output_dir)
        return splits, list(splits["train"].features["label"].names), {}
    specs = [SourceSpec(**s) for s in cfg.sources]
    dd = load_sources(specs)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / "split_manifest.json.tmp"
        tmp.write_text(json.dumps(source_manifest(dd, specs), indent=1))
        os.replace(tmp, output_dir / "split_manifest.json")
    return dd, list(DX_CODES), head_labels(specs)


def draw_weights(cfg: TrainConfig, splits: datasets.DatasetDict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`imbalance` for the recipe's data: (sampler draw weights (N,), dx loss weights (C,)), at most one per role.

    Single-source: "sampler" draws every class equally often, "class_weights" weighs the loss by
    inverse frequency. Multi-source: the sampler always gives every source its recipe share; within a
    source "sampler" weighs dx classes by count^-1/2 (square-root balancing; full balancing
    over-draws the few melanomas of the small archives), "class_weights" adds inverse-frequency
    loss weights over the labelled rows, "none" neither.
    """
    if not cfg.sources:
        loss_weights, draws = imbalance_weights(cfg.imbalance, splits["train"])
        return draws, loss_weights
    train = splits["train"].select_columns(["source", "label"]).with_format(None)
    sources, dx = train["source"], np.asarray(train["label"])
    specs = [SourceSpec(**s) for s in cfg.sources]
    draws = sampler_weights(sources, dx, specs, power=0.5 if cfg.imbalance == "sampler" else 0.0)
    loss_weights = None
    if cfg.imbalance == "class_weights":
        loss_weights = class_weights(np.bincount(dx[dx != IGNORE_INDEX], minlength=len(DX_CODES)).tolist())
    return draws, loss_weights


def make_batches(
    cfg: TrainConfig, accelerator: Accelerator, splits: datasets.DatasetDict, label_names: list[str],
    heads: dict[str, list[str]], net: MultiHeadNet, processor: Any, output_dir: Path, num_workers: int,
) -> Batches:
    """The recipe's batch source: cached features when `feature_cache` is set, image batches otherwise."""
    sample_weights, loss_weights = draw_weights(cfg, splits)
    sources = list(splits["validation"]["source"]) if cfg.sources else None
    train_targets = {h: torch.as_tensor(splits["train"][h]) for h in heads}
    val_targets = {h: torch.as_tensor(splits["validation"][h]) for h in heads}
    if cfg.distillation.teachers:
        with accelerator.main_process_first():
            train_targets["teacher"] = teacher_logits(cfg.distillation.teachers, splits["train"], output_dir,
                                                      cfg.eval_batch_size)
    common = dict(label_names=label_names, heads=heads, sample_weights=sample_weights, class_weights=loss_weights,
                  val_sources=sources)
    if not cfg.feature_cache:
        augmentation = AugmentConfig.from_any(cfg.augmentation)
        train = with_image_transform(splits["train"], build_transforms(processor, True, augmentation))
        val = with_image_transform(splits["validation"], build_transforms(processor, False))
        if train_targets:
            train, val = RowTargets(train, train_targets), RowTargets(val, val_targets)
        return Batches(train=train, validation=val, **common)

    cache_dir = Path(cfg.feature_cache.get("dir", output_dir / "feature_cache"))
    views = int(cfg.feature_cache.get("views", 4))
    stem = nn.Sequential(*(net.get_submodule(n) for n in net.stem_names())).eval()  # empty: the cache holds pixels
    # The main process builds what is missing (the others then find it); the cache's own seeds
    # must not move the training RNG.
    with accelerator.main_process_first(), torch.random.fork_rng(devices=[]):
        for split, n_views, seed in (("validation", 1, 0), ("train", views, cfg.seed)):
            masks = lesion_mask_paths(splits[split], cfg.attention_target["masks"]) if cfg.attention_target else None
            build_cache(splits[split], stem, processor, cache_dir / split, views=n_views, augment=cfg.augmentation,
                        batch_size=cfg.eval_batch_size, seed=seed, num_workers=num_workers, masks=masks,
                        mask_cell=mask_cell(net) if masks else 16)
    train_x = load_cache(cache_dir / "train")[:views]  # (V, N, C, h, w) fp16
    val_x = load_cache(cache_dir / "validation")[:1]
    if train_x.shape[1] != len(splits["train"]) or val_x.shape[1] != len(splits["validation"]):
        raise ValueError(f"feature cache {cache_dir} does not match the sources' splits; delete it or set feature_cache.dir")
    dihedral = bool(cfg.feature_cache.get("dihedral", False))
    train_m = val_m = None
    if cfg.attention_target:
        train_m, val_m = load_mask_cache(cache_dir / "train", views), load_mask_cache(cache_dir / "validation", 1)
    train = CachedFeatures(train_x, torch.as_tensor(splits["train"]["label"]), augment=True, dihedral=dihedral, masks=train_m)
    val = CachedFeatures(val_x, torch.as_tensor(splits["validation"]["label"]), masks=val_m)
    return Batches(train=RowTargets(train, train_targets), validation=RowTargets(val, val_targets),
                   cached=True, stem=net.stem_names(), **common)


def lesion_mask_paths(split: datasets.Dataset, folders: dict[str, str]) -> list[str | None]:
    """Each row's lesion segmentation file (`<folder>/<image_id>_segmentation.png` of its source's
    folder in `folders`), None where its source has no folder or the file does not exist."""
    ids = split.select_columns(["image_id", "source"]).with_format(None)
    paths: list[str | None] = []
    for image_id, source in zip(ids["image_id"], ids["source"]):
        folder = folders.get(source)
        path = Path(folder) / f"{str(image_id).removeprefix(source + '/')}_segmentation.png" if folder else None
        paths.append(str(path) if path is not None and path.is_file() else None)
    if not any(paths):
        raise FileNotFoundError(f"attention_target.masks {folders}: no row of the split has a mask there")
    return paths


def mask_cell(net: MultiHeadNet) -> int:
    """Pixels per patch-grid cell of the ViT in `net` (its patch size; 16 for the hybrid's stride-16 stem)."""
    if net.is_timm:
        raise ValueError("attention_target is for MelanomaViT models (attention rollout), not CNNs")
    size = net.model.config.patch_size
    return size if isinstance(size, int) else size[0]


def create_dataloaders(cfg: TrainConfig, batches: Batches, num_workers: int) -> tuple[DataLoader, DataLoader, torch.Generator]:
    """(train loader, validation loader, the train loader's generator, re-seeded every epoch)."""
    # Own generator: DataLoader workers' base seed must not consume the global RNG (exact resume).
    loader_generator = torch.Generator()
    workers = 0 if batches.cached else num_workers  # cached features are in memory already
    train_dataloader = DataLoader(
        SeededAugmentation(batches.train, cfg.seed),
        batch_size=cfg.batch_size,
        sampler=EpochSeededSampler(len(batches.train), cfg.seed, batches.sample_weights),
        collate_fn=collate,
        num_workers=workers,
        drop_last=len(batches.train) > cfg.batch_size,  # a size-1 last batch breaks BatchNorm
        generator=loader_generator,
    )
    eval_dataloader = DataLoader(
        batches.validation,
        batch_size=cfg.eval_batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return train_dataloader, eval_dataloader, loader_generator


def draw_prior(labels: np.ndarray, sample_weights: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """(C,) float64: each dx class's share of the training draws (the sampler's weights summed per
    class over the labelled rows; plain frequencies for a uniform shuffle). Never 0: a class no row
    has gets the smallest share of one row."""
    keep = labels != IGNORE_INDEX
    weights = np.ones(len(labels)) if sample_weights is None else sample_weights.double().numpy()
    mass = np.bincount(labels[keep], weights=weights[keep], minlength=num_classes)
    floor = weights[keep].min() if keep.any() else 1.0
    mass = np.maximum(mass, floor)
    return torch.as_tensor(mass / mass.sum())


def model_blocks(net: MultiHeadNet) -> list[list[str]]:
    """`parameter_blocks` of the classifier inside `net` (head first), named as in `net`; the
    training-only auxiliary heads unfreeze with the head."""
    blocks = [[f"model.{n}" for n in block] for block in parameter_blocks(net.model)]
    blocks[0] += [n for n, _ in net.aux_heads.named_parameters(prefix="aux_heads")]
    return blocks


def setup(cfg: TrainConfig, args: argparse.Namespace, accelerator: Accelerator) -> TrainingRun:
    """set_seed -> data -> model (+ teacher) -> batches -> optimizer/scheduler -> the one `accelerator.prepare`."""
    set_seed(cfg.seed)
    output_dir = Path(args.output_dir)
    splits, label_names, heads = load_data(cfg, accelerator, output_dir)
    model, processor = create_model(cfg.model, dict(enumerate(label_names)), extra_heads=heads)
    net = MultiHeadNet(model, heads)
    if cfg.attention_target:
        mask_cell(net)  # refuses a CNN
        net.rollout = True
    blocks = model_blocks(net)
    teacher = None
    if cfg.distillation.teacher:
        teacher = TeacherAdapter(cfg.distillation.teacher, label_names, processor, accelerator.device)
    batches = make_batches(cfg, accelerator, splits, label_names, heads, net, processor, output_dir, args.num_workers)
    stack = contextlib.ExitStack()
    stack.enter_context(stem_bypassed(net, batches.stem))  # cached features replace the stem's output
    labels = np.asarray(splits["train"].select_columns(["label"]).with_format(None)["label"])
    logger.info("train %d images, dx counts %s, heads %s, %s batches", len(splits["train"]),
                dict(zip(label_names, np.bincount(labels[labels != IGNORE_INDEX], minlength=len(label_names)).tolist())),
                [MAIN_HEAD, *heads], "cached-feature" if batches.cached else "image")
    mixer = build_batch_mixer(AugmentConfig.from_any(cfg.augmentation), len(label_names))
    if mixer is not None and cfg.focal_gamma > 0:
        raise ValueError("focal loss needs hard labels: set focal_gamma: 0 or turn off mixup/cutmix")
    train_dataloader, eval_dataloader, loader_generator = create_dataloaders(cfg, batches, args.num_workers)
    dx_offset = None
    if cfg.logit_adjustment > 0:
        prior = draw_prior(labels, batches.sample_weights, len(label_names))
        logger.info("logit adjustment tau %.2f, training draw prior %s", cfg.logit_adjustment,
                    dict(zip(label_names, prior.round(decimals=4).tolist())))
        dx_offset = (cfg.logit_adjustment * prior.log()).float().to(accelerator.device)
    optimizer, lr_scheduler, max_steps = create_optimizer(cfg, net, train_dataloader, accelerator.num_processes)
    net, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        net, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    unwrapped = accelerator.unwrap_model(net)
    return TrainingRun(
        cfg=cfg, accelerator=accelerator, model=net, processor=processor, optimizer=optimizer,
        lr_scheduler=lr_scheduler, train_dataloader=train_dataloader, eval_dataloader=eval_dataloader,
        loader_generator=loader_generator,
        criterion=make_criterion(cfg.focal_gamma, cfg.label_smoothing, batches.class_weights).to(accelerator.device),
        batches=batches, max_steps=max_steps, mixer=mixer, teacher=teacher, blocks=blocks, stack=stack, dx_offset=dx_offset,
        ema=ModelEmaV3(unwrapped, decay=cfg.ema_decay) if cfg.ema else None,
        running_loss=torch.zeros((), device=accelerator.device),
    )


def resume(run: TrainingRun, resume_from: str, output_dir: Path) -> None:
    """Load model/optimizer/scheduler/RNG/EMA state and progress from a checkpoint."""
    checkpoint = resolve_checkpoint(resume_from, output_dir)
    logger.info("resuming from %s", checkpoint)
    run.accelerator.load_state(str(checkpoint))
    run.state = json.loads((checkpoint / TRAINER_STATE).read_text())
    if run.ema is not None:
        run.ema.load_state_dict(load_file(checkpoint / EMA_WEIGHTS))
    existing = [_checkpoint_index(p) for p in (output_dir / "checkpoints").glob("checkpoint_*")]
    run.accelerator.project_configuration.iteration = max(existing) + 1


def save_checkpoint(run: TrainingRun) -> None:
    location = Path(run.accelerator.save_state())
    if run.accelerator.is_main_process:
        if run.ema is not None:
            save_file({k: v.contiguous() for k, v in run.ema.state_dict().items()}, location / EMA_WEIGHTS)
        # Written last: marks the checkpoint complete for --resume_from_checkpoint latest.
        write_trainer_state(location, run.state)
    run.last_save = time.monotonic()


def refresh_freezing(run: TrainingRun) -> None:
    """Freeze all but the blocks the warm-up schedule trains at the current epoch / step."""
    cfg = run.cfg
    if cfg.freeze_backbone > 0:
        progress = run.state["epoch"] if cfg.freeze_unit == "epochs" else run.state["completed_steps"]
        n = trainable_block_count(progress, len(run.blocks), cfg.freeze_backbone, cfg.unfreeze_every)
        apply_freezing(run.unwrapped, run.blocks, n)


def with_dx_offset(logits: dict[str, torch.Tensor], offset: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The dx logits (and a DeiT model's distillation logits) + `offset` (C,): the logit-adjusted
    scores the loss and the validation posterior use; unchanged without an offset."""
    if offset is None:
        return logits
    return {k: v + offset if k in (MAIN_HEAD, DISTILLATION) else v for k, v in logits.items()}


def train_step(run: TrainingRun, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward, loss, backward and (at the end of an accumulation window) the optimizer update."""
    cfg, accelerator = run.cfg, run.accelerator
    with accelerator.accumulate(run.model):
        logits = with_dx_offset(run.model(batch["pixel_values"]), run.dx_offset)
        maps = logits.pop(ROLLOUT, None)
        teacher_logits = batch.get("teacher")
        if run.teacher is not None:
            with accelerator.autocast():
                teacher_logits = run.teacher(batch["pixel_values"])
        d = cfg.distillation
        loss = multihead_loss(run.criterion, logits, batch, cfg.head_loss_weights, cfg.label_smoothing, teacher_logits,
                              kind=d.kind, alpha=d.alpha, temperature=d.temperature)
        if maps is not None:
            loss = loss + float(cfg.attention_target["weight"]) * attention_mask_loss(maps, batch["lesion_mask"])
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.max_grad_norm:
            accelerator.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], cfg.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss


def after_update(run: TrainingRun, batch: dict[str, torch.Tensor], seconds: float, progress: tqdm) -> None:
    """Bookkeeping after one optimizer update: throughput, EMA, unfreezing, logging, checkpoints."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    state["completed_steps"] += 1
    if run.speed["warmup"] > 0:
        run.speed["warmup"] -= 1
    else:
        run.speed["images"] += len(batch["pixel_values"]) * cfg.gradient_accumulation_steps * accelerator.num_processes
        run.speed["steps"] += 1
        run.speed["seconds"] += seconds
    progress.update(1)
    if run.ema is not None:
        run.ema.update(run.unwrapped, step=state["completed_steps"])
    if cfg.freeze_unit == "steps":
        refresh_freezing(run)
    if state["completed_steps"] % cfg.logging_steps == 0 or state["completed_steps"] == run.max_steps:
        mean_loss = accelerator.reduce(run.running_loss, reduction="mean").item() / max(run.running_count, 1)
        accelerator.log({"train/loss": mean_loss, "train/lr": run.lr_scheduler.get_last_lr()[0], "epoch": state["epoch"],
                         "train/images_per_s": run.images_per_s or 0.0},
                        step=state["completed_steps"])
        progress.set_postfix(loss=f"{mean_loss:.4f}")
        run.running_loss.zero_()
        run.running_count = 0
    due = cfg.checkpointing_steps and state["completed_steps"] % cfg.checkpointing_steps == 0
    if not due and state["completed_steps"] % cfg.logging_steps == 0:
        # Long epochs (a CPU, a big cache) also checkpoint every CHECKPOINT_MINUTES; every process must
        # agree to save, so they compare clocks (a collective: only at logging steps, not every step).
        overdue = torch.tensor(float(time.monotonic() - run.last_save > CHECKPOINT_MINUTES * 60), device=accelerator.device)
        due = accelerator.reduce(overdue, reduction="sum").item() > 0
    if due:
        save_checkpoint(run)


def train_epoch(run: TrainingRun, progress: tqdm) -> None:
    """One pass over the training data (the rest of it when resumed mid-epoch), up to max_steps."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    epoch = state["epoch"]
    run.model.train()
    refresh_freezing(run)
    # accelerate's loader calls sampler.set_epoch(its own counter) when iterated: set that counter.
    run.train_dataloader.set_epoch(epoch)
    run.loader_generator.manual_seed(cfg.seed + epoch)
    skip = state["batches_in_epoch"]
    batches = accelerator.skip_first_batches(run.train_dataloader, skip) if skip else run.train_dataloader
    tick = time.perf_counter()
    for batch in batches:
        if state["completed_steps"] >= run.max_steps:
            break
        if run.mixer is not None:
            batch = run.mixer(batch)  # labels become (B, num_labels) soft targets
        loss = train_step(run, batch)
        state["batches_in_epoch"] += 1
        run.running_loss += loss.detach()
        run.running_count += 1
        if not accelerator.sync_gradients:
            continue
        after_update(run, batch, time.perf_counter() - tick, progress)
        tick = time.perf_counter()


def _eval_model(run: TrainingRun) -> nn.Module:
    return run.ema.module if run.ema is not None else run.model


def validate(run: TrainingRun, output_dir: Path) -> dict[str, Any]:
    """Evaluate (the EMA weights when kept), record in the history, keep the best weights, log, then checkpoint."""
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    logits, labels = predict_heads(_eval_model(run), run.eval_dataloader, accelerator, run.dx_offset)
    metrics = validation_metrics(logits, labels, run.label_names, run.batches.val_sources, run.dx_offset)
    if cfg.attention_target:
        metrics["rollout_mask_share"] = validation_rollout_share(_eval_model(run), run.eval_dataloader, accelerator)
    metrics.update(epoch=state["epoch"], step=state["completed_steps"])
    state["history"].append(metrics)
    accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=state["completed_steps"])
    logger.info("epoch %d step %d: %s", state["epoch"], state["completed_steps"], _fmt(metrics))
    key = cfg.metric_for_best_model
    if key is not None:
        if key not in metrics:
            raise ValueError(f"metric_for_best_model {key!r} is not a validation metric: {sorted(metrics)}")
        best = state["best"]
        if best is None or (metrics[key] is not None and (best[key] is None or metrics[key] > best[key])):
            state["best"] = {"epoch": state["epoch"], key: metrics[key]}
            if accelerator.is_main_process:
                weights = accelerator.unwrap_model(_eval_model(run)).state_dict()
                save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(output_dir / BEST_WEIGHTS))
    state["epoch"] += 1
    state["batches_in_epoch"] = 0
    save_checkpoint(run)
    return metrics


def add_to_dx_bias(model: PreTrainedModel, offset: torch.Tensor) -> None:
    """Add `offset` (C,) to the bias of the dx head(s) (both of a DeiT model), in place."""
    main, _ = classifier_heads(model)
    with torch.no_grad():
        for layer in main:
            layer.bias.add_(offset.to(layer.bias))


def calibrate(model: PreTrainedModel, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
              label_names: Sequence[str]) -> dict[str, Any]:
    """Fit each head's temperature on the validation logits and fold it into the head (the one stored
    form, `model.calibration.fold_temperature`); the melanoma threshold of the project's one rule
    (`TARGET_SENSITIVITY` on validation) into the config."""
    temps = {}
    for name, z in logits.items():
        keep = labels[name] != IGNORE_INDEX
        if keep.any():
            temps[name] = fit_temperature(z[keep], labels[name][keep])
    threshold = None
    keep = labels[MAIN_HEAD] != IGNORE_INDEX
    if MELANOMA in label_names and MAIN_HEAD in temps:
        mel = list(label_names).index(MELANOMA)
        p_mel = torch.softmax(logits[MAIN_HEAD][keep] / temps[MAIN_HEAD], -1)[:, mel]
        threshold = threshold_for_sensitivity((labels[MAIN_HEAD][keep] == mel).int().numpy(), p_mel.numpy(), TARGET_SENSITIVITY)
    model.config.melanoma_threshold = threshold
    # A TimmWrapper's extra heads are training-only auxiliaries: nothing to fold them into.
    extra = {k: v for k, v in temps.items() if k != MAIN_HEAD} if not isinstance(model, TimmWrapperForImageClassification) else {}
    fold_temperature(model, temps.get(MAIN_HEAD), extra or None)
    return {"temperatures": temps, "melanoma_threshold": threshold, "threshold_rule": THRESHOLD_RULE}


def export(run: TrainingRun, args: argparse.Namespace, output_dir: Path, minutes: float) -> dict[str, Any]:
    """The exported weights (best epoch, else EMA, else last) calibrated on the validation split, then
    save_pretrained model + processor, train_config.yaml, training_args.json, command.txt, val_metrics.json."""
    cfg, accelerator, unwrapped = run.cfg, run.accelerator, run.unwrapped
    accelerator.wait_for_everyone()
    if run.state["best"] is not None:
        unwrapped.load_state_dict(load_file(output_dir / BEST_WEIGHTS))
    elif run.ema is not None:
        unwrapped.load_state_dict(run.ema.module.state_dict())
    logits, labels = predict_heads(run.model, run.eval_dataloader, accelerator, run.dx_offset)
    final = validation_metrics(logits, labels, run.label_names, run.batches.val_sources, run.dx_offset)
    run.stack.close()  # the stem is back: the model takes pixels again
    if not accelerator.is_main_process:
        return final
    model = unwrapped.model.eval()
    if run.dx_offset is not None:
        add_to_dx_bias(model, run.dx_offset.cpu())  # the shipped logits are the posterior form
    calibration = calibrate(model, logits, labels, run.label_names)
    if run.dx_offset is not None:
        # Temperature folding divided the offset in the bias by T: the decision undoes offset / T.
        offsets = run.dx_offset.cpu() / calibration["temperatures"][MAIN_HEAD]
        model.config.dx_decision_offsets = {name: round(float(o), 6) for name, o in zip(run.label_names, offsets)}
        calibration["dx_decision_offsets"] = model.config.dx_decision_offsets
    model.save_pretrained(output_dir, safe_serialization=True)
    if not isinstance(model, TimmWrapperForImageClassification):  # timm keeps it in config.json
        run.processor.save_pretrained(output_dir)
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict["adam_betas"] = list(cfg.adam_betas)
    (output_dir / "train_config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    infra = {k: v for k, v in vars(args).items() if k != "overrides"}
    (output_dir / "training_args.json").write_text(
        json.dumps({"config": cfg_dict, "infrastructure": infra, "num_processes": accelerator.num_processes,
                    "mixed_precision": accelerator.mixed_precision}, indent=2)
    )
    launcher = "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ else "python"
    (output_dir / "command.txt").write_text(f"{launcher} {shlex.join(sys.argv)}\n")
    result = {"final": final, "best": run.state["best"], "history": run.state["history"], "labels": run.label_names,
              "heads": {MAIN_HEAD: run.label_names, **run.batches.heads}, "calibration": calibration, "ema": cfg.ema,
              "steps": run.state["completed_steps"], "num_processes": accelerator.num_processes,
              "train_images_per_s": run.images_per_s, "seconds_per_step": run.seconds_per_step, "minutes": minutes}
    (output_dir / "val_metrics.json").write_text(json.dumps(result, indent=2))
    logger.info("saved %s to %s (validation: %s)", cfg.model.name, output_dir, _fmt(final))
    return final


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run training; returns the validation metrics of the exported weights (also in val_metrics.json)."""
    args = parse_args(argv)
    cfg = config_from_args(args)
    output_dir = Path(args.output_dir)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = create_accelerator(cfg, args)
    start = time.perf_counter()
    run = setup(cfg, args, accelerator)
    updates_per_epoch = math.ceil(len(run.train_dataloader) / cfg.gradient_accumulation_steps)
    num_epochs = math.ceil(run.max_steps / updates_per_epoch)
    if args.resume_from_checkpoint:
        resume(run, args.resume_from_checkpoint, output_dir)
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("runs", config=_flat_hparams(cfg))
    ranks.info("process %d of %d: %d training batches of %d per epoch", accelerator.process_index,
               accelerator.num_processes, len(run.train_dataloader), cfg.batch_size)
    logger.info(
        "%s: %d epochs x %d updates (max_steps %d), batch %d x accumulation %d x %d processes",
        cfg.model.name, num_epochs, updates_per_epoch, run.max_steps, cfg.batch_size,
        cfg.gradient_accumulation_steps, accelerator.num_processes,
    )
    progress = tqdm(total=run.max_steps, initial=run.state["completed_steps"], desc="train",
                    disable=not accelerator.is_local_main_process)
    while run.state["epoch"] < num_epochs:
        if run.state["completed_steps"] >= run.max_steps and run.state["batches_in_epoch"] == 0:
            break  # resumed from the checkpoint written after the last evaluation
        train_epoch(run, progress)
        validate(run, output_dir)
        if run.state["completed_steps"] >= run.max_steps:
            break
    progress.close()
    final = export(run, args, output_dir, (time.perf_counter() - start) / 60)
    accelerator.end_training()
    return final


def _flat_hparams(cfg: TrainConfig) -> dict[str, Any]:
    """TensorBoard hparams accept scalars/strings only: flatten nested sections."""
    flat: dict[str, Any] = {}
    for key, value in dataclasses.asdict(cfg).items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            name = f"{key}.{sub}" if sub else key
            flat[name] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return flat


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


if __name__ == "__main__":
    main()
