"""Lesion-grouped train/validation/test splits, the leakage check and split manifests."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
from sklearn.model_selection import train_test_split

from .balance import class_counts, column

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")


def _groups(ds: datasets.Dataset) -> list[str]:
    # An image without a lesion_id is its own lesion; prefixes keep the two id spaces apart.
    return [
        f"lesion:{les}" if les is not None else f"image:{img}"
        for les, img in zip(column(ds, "lesion_id"), column(ds, "image_id"))
    ]


def _split_groups(keys: list[str], strata: list[int], size: float | int, seed: int) -> tuple[list[str], list[str]]:
    """train_test_split of group keys, stratified when every stratum allows it."""
    if size == 0:
        return keys, []
    counts = Counter(strata)
    # Classes with too few lesions to be spread over both parts share one "rare" stratum.
    pooled = [s if counts[s] >= 2 else -1 for s in strata]
    if Counter(pooled)[-1] == 1:
        pooled = [s if s != -1 else max(counts, key=counts.get) for s in pooled]
    try:
        rest, held = train_test_split(keys, test_size=size, random_state=seed, stratify=pooled)
    except ValueError:
        logger.info("too few lesions per class to stratify %d groups; splitting them unstratified", len(keys))
        rest, held = train_test_split(keys, test_size=size, random_state=seed)
    return rest, held


def split_by_lesion(
    ds: datasets.Dataset, val_size: float = 0.15, test_size: float = 0.15, seed: int = 42
) -> datasets.DatasetDict:
    """Split into train/validation/test with no lesion in two splits, stratified by class.

    Lesions (images sharing a lesion_id; an image without one is its own lesion) are the
    units: `val_size` and `test_size` are fractions of lesions, so image fractions are close
    but not exact. Each lesion's stratum is its most common label. Deterministic for a seed.
    Tiny data: a split gets at least one lesion when its size is > 0 (sklearn rounds the
    held-out count up); classes with fewer than two lesions are pooled into one stratum and,
    when even that cannot be stratified, the lesions are shuffled unstratified.

    Returns:
        DatasetDict(train, validation, test); rows keep their order in `ds`. `dd.split_info`
        holds the parameters (used by `write_manifest`).
    """
    if not (0 <= val_size < 1 and 0 <= test_size < 1 and val_size + test_size < 1):
        raise ValueError(f"val_size and test_size must be in [0, 1) with sum < 1, got {val_size}, {test_size}")
    groups = _groups(ds)
    labels = column(ds, "label")
    by_group: dict[str, Counter] = {}
    for g, y in zip(groups, labels):
        by_group.setdefault(g, Counter())[y] += 1
    keys = sorted(by_group)
    needed = 1 + (val_size > 0) + (test_size > 0)
    if len(keys) < needed:
        raise ValueError(
            f"{len(keys)} lesion group(s) cannot fill {needed} non-empty splits; lower val_size/test_size to 0"
        )
    strata = {k: by_group[k].most_common(1)[0][0] for k in keys}
    rest, test_keys = _split_groups(keys, [strata[k] for k in keys], test_size, seed)
    val_frac = val_size / (1 - test_size) if val_size else 0
    if val_size and len(rest) < 2:
        raise ValueError(f"only {len(rest)} lesion group(s) left after the test split; lower test_size or val_size")
    train_keys, val_keys = _split_groups(sorted(rest), [strata[k] for k in sorted(rest)], val_frac, seed)
    part = {**{k: "train" for k in train_keys}, **{k: "validation" for k in val_keys}, **{k: "test" for k in test_keys}}
    index: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for i, g in enumerate(groups):
        index[part[g]].append(i)
    dd = datasets.DatasetDict({name: ds.select(idx) for name, idx in index.items()})
    dd.split_info = {"seed": seed, "val_size": val_size, "test_size": test_size, "method": "split_by_lesion"}
    return dd


def check_no_leakage(dd: Mapping[str, datasets.Dataset]) -> None:
    """Raise ValueError if an image_id or a lesion_id appears in more than one split."""
    seen: dict[str, dict[str, str]] = {"image_id": {}, "lesion_id": {}}
    for name, ds in dd.items():
        for col in ("image_id", "lesion_id"):
            for value in set(column(ds, col)) - {None}:
                other = seen[col].setdefault(value, name)
                if other != name:
                    raise ValueError(f"leakage: {col} {value!r} is in both {other!r} and {name!r}")


def write_manifest(dd: Mapping[str, datasets.Dataset], path: str | Path, seed: int | None = None, **extra: Any) -> dict:
    """Write {split: [image_ids], "splits", "seed", "sizes", "class_counts", ...} as JSON.

    `seed` (and val_size/test_size) default to `dd.split_info` from `split_by_lesion`.
    Returns the manifest written.
    """
    info = dict(getattr(dd, "split_info", {}))
    if seed is not None:
        info["seed"] = seed
    manifest: dict[str, Any] = {**info, **extra, "splits": list(dd)}
    manifest["sizes"] = {name: len(ds) for name, ds in dd.items()}
    manifest["class_counts"] = {
        name: dict(zip(ds.features["label"].names, class_counts(ds))) for name, ds in dd.items()
    }
    for name, ds in dd.items():
        manifest[name] = column(ds, "image_id")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(path: str | Path) -> dict:
    """Read a manifest written by `write_manifest`."""
    manifest = json.loads(Path(path).read_text())
    splits = manifest.get("splits", SPLIT_NAMES) if isinstance(manifest, dict) else []
    if not any(isinstance(manifest.get(s), list) for s in splits):
        raise ValueError(f"{path} is not a split manifest (no lists of image_ids under {SPLIT_NAMES})")
    return manifest


def apply_manifest(ds: datasets.Dataset, manifest: Mapping[str, Any] | str | Path) -> datasets.DatasetDict:
    """Rebuild the splits of a manifest from `ds` (rows in manifest order).

    Image ids of the manifest that `ds` lacks (e.g. images dropped as unreadable) are logged
    and skipped; rows of `ds` in no split are left out.
    """
    if not isinstance(manifest, Mapping):
        manifest = read_manifest(manifest)
    where: dict[str, list[int]] = {}
    for i, image_id in enumerate(column(ds, "image_id")):
        where.setdefault(image_id, []).append(i)
    out = {}
    for name in manifest.get("splits", [s for s in SPLIT_NAMES if s in manifest]):
        ids = manifest[name]
        missing = [i for i in ids if i not in where]
        if missing:
            logger.warning(
                "manifest split %r: %d image_id(s) not in the dataset, e.g. %s", name, len(missing), missing[:3]
            )
        out[name] = ds.select([row for i in ids for row in where.get(i, [])])
    return datasets.DatasetDict(out)
