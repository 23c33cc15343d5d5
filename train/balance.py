"""Class balance: class counts, per-class loss weights and per-image sampler weights."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np
import torch


def column(ds: datasets.Dataset, name: str) -> list:
    """One column as a plain list (no image decoding, no formatting)."""
    return list(ds.select_columns([name]).with_format(None)[name])


def class_counts(ds: datasets.Dataset) -> list[int]:
    """Images per class, in ClassLabel index order (length = number of classes)."""
    n = ds.features["label"].num_classes
    labels = np.asarray(column(ds, "label"), dtype=np.int64)
    return np.bincount(labels, minlength=n).tolist()


def class_weights(
    ds_or_counts: datasets.Dataset | Sequence[int], scheme: str = "inverse", beta: float = 0.999
) -> torch.Tensor:
    """Per-class loss weights (num_classes,) float32, scaled so that sum_c n_c * w_c = N
    (the mean weight per training image is 1, so the loss scale is unchanged).

    schemes: "inverse" w_c ~ 1/n_c (= sklearn's "balanced"), "sqrt_inverse" w_c ~ 1/sqrt(n_c),
    "effective_number" w_c ~ (1 - beta) / (1 - beta^n_c) (Cui et al., CVPR 2019).
    A class with no images gets weight 0.
    """
    counts = class_counts(ds_or_counts) if isinstance(ds_or_counts, datasets.Dataset) else list(ds_or_counts)
    n = torch.as_tensor(counts, dtype=torch.float64)
    present = n > 0
    if not present.any():
        raise ValueError("class_weights needs at least one labelled image")
    raw = torch.zeros_like(n)
    if scheme == "inverse":
        raw[present] = 1.0 / n[present]
    elif scheme == "sqrt_inverse":
        raw[present] = 1.0 / n[present].sqrt()
    elif scheme == "effective_number":
        if not 0 < beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        raw[present] = (1 - beta) / (1 - beta ** n[present])
    else:
        raise ValueError(f"scheme must be 'inverse', 'sqrt_inverse' or 'effective_number', got {scheme!r}")
    return (raw * n.sum() / (raw * n).sum()).float()


def balanced_sampler_weights(ds: datasets.Dataset, scheme: str = "inverse") -> torch.Tensor:
    """Per-image weights (N,) float64 for torch.utils.data.WeightedRandomSampler: the class
    weight of each image's label, so that with "inverse" every class is drawn equally often."""
    weights = class_weights(ds, scheme).double()
    return weights[torch.as_tensor(column(ds, "label"), dtype=torch.long)]
