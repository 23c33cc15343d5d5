"""Multi-source training parts: the model with one head per dataset (+ seven-point criteria), the
two batch sources of train.py's loop for it, the source-balanced sampler, cached-teacher targets
and per-source validation metrics.

`train/train.py` runs a recipe that lists `sources:` (train/configs/multisource_*.yaml) in its one
accelerate loop:

    accelerate launch train/train.py --config train/configs/multisource_lite2.yaml --output_dir runs/ms_lite2

Each sample adds loss only to the heads its source labels (IGNORE_INDEX elsewhere); a sampler
draws every source with its recipe weight (and the dx classes within a source balanced), so
HAM10000 does not drown the smaller archives. Two batch sources:

- cached features (`feature_cache:` set): the frozen stride-16 stem of the network
  (`train.features`) runs once per augmented view; epochs train the rest.
  - EfficientNet-Lite (TimmWrapper): the last stages + the dx classifier; the other heads are
    training-only auxiliaries on the pooled features, so the shipped folder stays a stock
    `TimmWrapperForImageClassification` that the Hub inference API and `pipeline` load as is.
  - hybrid MelanomaViT: projection + transformer + every head (`config.extra_heads`, shipped).
  - pure MelanomaViT (linear patches) and ResNet (no ImageNet weights here): nothing is frozen,
    so the "stem" is the identity and the cache holds the processor-sized pixels of each view
    (fp16); `feature_cache.dihedral` adds a random flip / 90-degree rotation per sample and step.
- image batches (no `feature_cache:`, the `*_full.yaml` recipes): decoded and augmented images,
  the whole network trained, the backbone unfrozen on the recipe's schedule.

`distillation.teachers` distil from trained models that read their own caches once
(`teacher_logits`, through the one inference path, `model.classifier.Classifier`): the DeiT recipe at
cached-view cost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TimmWrapperForImageClassification

from model.classifier import Classifier
from model.labels import DX_CODES, MELANOMA
from model.loading import num_prefix_tokens
from model.rollout import attention_rollout
from model.modeling_melanoma_vit import IGNORE_INDEX
from model.stem import stem_names
from model.tta import dihedral

from .features import load_cache
from .losses import DISTILLATION
from .metrics import melanoma_auc
from .sources import MAIN_HEAD, SourceSpec

logger = logging.getLogger("train.multisource")

TEACHER_LOGITS = "teacher_logits.safetensors"
ROLLOUT = "rollout"  # MultiHeadNet's output key of the attention-rollout map (not a head)


class MultiHeadNet(nn.Module):
    """A classifier plus its extra heads: forward(pixel_values) -> {head: logits (B, n_labels)}.

    MelanomaViT carries its extra heads natively (`config.extra_heads`, `outputs.head_logits`);
    a TimmWrapper CNN gets training-only linear heads on its pooled (pre-logits) features.
    """

    def __init__(self, model: nn.Module, extra_heads: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self.model = model
        self.is_timm = isinstance(model, TimmWrapperForImageClassification)
        self.rollout = False  # set by a recipe with an attention target (ViTs only)
        width = model.timm_model.num_features if self.is_timm else 0
        self.aux_heads = nn.ModuleDict(
            {name: nn.Linear(width, len(labels)) for name, labels in extra_heads.items()} if self.is_timm else {}
        )

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """{head: logits}; with `self.rollout` on (a ViT trained with an attention target) also
        {ROLLOUT: (B, grid_h, grid_w)}, the plain attention rollout that `bench/bench_rollout.py`
        measures, with its graph."""
        if self.is_timm:
            timm_model = self.model.timm_model
            # channels_last: CPU convolutions ~20% faster (ResNet-18 at 128 px, batch 64: 20.5 -> 24.3 img/s)
            x = pixel_values.contiguous(memory_format=torch.channels_last)
            pooled = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)  # (B, F)
            return {MAIN_HEAD: timm_model.get_classifier()(pooled), **{n: h(pooled) for n, h in self.aux_heads.items()}}
        outputs = self.model(pixel_values=pixel_values, output_attentions=self.rollout)
        logits = {MAIN_HEAD: outputs.logits, **(getattr(outputs, "head_logits", None) or {})}
        distillation = getattr(outputs, "distillation_logits", None)
        if self.training and distillation is not None:
            logits[DISTILLATION] = distillation
        if self.rollout:
            prefix = num_prefix_tokens(self.model.config)
            grid = int(round((outputs.attentions[0].shape[-1] - prefix) ** 0.5))
            logits[ROLLOUT] = attention_rollout(outputs.attentions, num_prefix_tokens=prefix,
                                                token_rows=("cls", "dist") if prefix == 2 else ("cls",),
                                                grid_size=(grid, grid), detach=False)
        return logits

    def stem_names(self) -> tuple[str, ...]:
        """Names (relative to this module) of the frozen stem that cached features replace (`model.stem`;
        none for a pure ViT or a CNN without ImageNet weights, e.g. ResNet: their caches hold pixels)."""
        return tuple(f"model.{n}" for n in stem_names(self.model))


@torch.no_grad()
def teacher_logits(teachers: Sequence[Mapping[str, str]], train_ds: Any, output_dir: Path, batch_size: int) -> torch.Tensor | None:
    """Distillation targets for every training row: log of the dx probabilities averaged over the
    teachers and every cached view of each teacher's own cache (N, len(DX_CODES)).

    Each teacher (a trained folder, e.g. models/efficientnet-lite2, loaded and scored by the one inference
    path, `Classifier.predict_proba` with `features=True`: its calibrated dx probabilities) reads the stem
    features its recipe cached (`cache`/train), so no image is decoded again. Written once to
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
        classifier = Classifier(teacher["model"])
        labels = [classifier.id2label[i] for i in range(classifier.out_dim)]
        if labels != list(DX_CODES):
            raise ValueError(f"teacher {teacher['model']} predicts {labels}, not the dx classes {list(DX_CODES)}")
        cache = Path(teacher["cache"]) / "train"
        recipe = json.loads((cache / "cache.json").read_text()) if (cache / "cache.json").is_file() else {}
        geometry = classifier.geometry
        expected = {"rows": n, "size": list(geometry.size), "mean": list(geometry.mean), "std": list(geometry.std)}
        wrong = sorted(k for k, v in expected.items() if not np.allclose(recipe.get(k, -1), v))
        if wrong:
            raise ValueError(f"teacher cache {cache} does not fit {teacher['model']} on this recipe's rows: {wrong} differ")
        features = load_cache(cache)
        for view in range(len(features)):
            p = classifier.predict_proba(features[view], batch_size=batch_size, features=True).dx  # (N, C)
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


class RowTargets(torch.utils.data.Dataset):
    """Per-row training targets added to the items of a dataset: {name: tensor (N, ...)} indexed by row.

    Extra-head labels and cached-teacher logits travel in the batch this way, whatever its source.
    """

    def __init__(self, dataset: Any, targets: Mapping[str, torch.Tensor]) -> None:
        self.dataset = dataset
        self.targets = dict(targets)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        items = self.dataset.__getitems__(indices)
        rows = torch.as_tensor(indices)
        picked = {name: t[rows] for name, t in self.targets.items()}
        return [{**item, **{name: t[i] for name, t in picked.items()}} for i, item in enumerate(items)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]


class CachedFeatures(torch.utils.data.Dataset):
    """Rows of a feature cache (V views, N rows, C, h, w) fp16 as training items.

    Training (`augment=True`): each item reads a random cached view, turned by a random dihedral
    symmetry when `dihedral`; the draws come from the torch RNG, which `SeededAugmentation` seeds
    per batch, so they do not depend on the number of processes or where a run resumed.
    Evaluation: view 0 as is. Items: {"pixel_values": (C, h, w) float32, "labels": dx index}, plus
    "lesion_mask" (h', w') when `masks` (V, N, h', w') holds the views' lesion shares per patch cell
    (`build_cache(masks=...)`): the same view, turned the same way.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, augment: bool = False, dihedral: bool = False,
                 masks: torch.Tensor | None = None) -> None:
        if features.shape[1] != len(labels):
            raise ValueError(f"the feature cache holds {features.shape[1]} rows for {len(labels)} images")
        if masks is not None and masks.shape[:2] != features.shape[:2]:
            raise ValueError(f"masks {tuple(masks.shape[:2])} do not match the cache's (views, rows) {tuple(features.shape[:2])}")
        self.features = features
        self.labels = labels
        self.augment = augment
        self.dihedral = dihedral
        self.masks = masks

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        rows = torch.as_tensor(indices)
        view = torch.randint(0, len(self.features), (len(rows),)) if self.augment else torch.zeros(len(rows), dtype=torch.long)
        x = self.features[view, rows].float()  # (B, C, h, w)
        m = None if self.masks is None else self.masks[view, rows].float()[:, None]  # (B, 1, h', w')
        if self.augment and self.dihedral:
            ops = torch.randint(0, 8, (len(rows),))
            x = dihedral(x, ops)
            m = None if m is None else dihedral(m, ops)
        items = [{"pixel_values": x[i], "labels": self.labels[r]} for i, r in enumerate(rows.tolist())]
        if m is not None:
            for item, mask in zip(items, m[:, 0]):
                item["lesion_mask"] = mask
        return items

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]
