"""Lesion-grouped train/validation/test splits, the leakage check, split manifests and stratified samples."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
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


def apply_manifest(
    ds: datasets.Dataset, manifest: Mapping[str, Any] | str | Path, unlabelled: Collection[str] = ()
) -> datasets.DatasetDict:
    """Rebuild the splits of a manifest from `ds` (rows in manifest order).

    An image id of the manifest that `ds` lacks is an error (the manifest describes other data, or
    images went missing), except those in `unlabelled`: rows the data lists without a label, which
    `load_image_dataset` skips (`train.data.unlabelled_image_ids`). Rows of `ds` in no split are
    left out.
    """
    if not isinstance(manifest, Mapping):
        manifest = read_manifest(manifest)
    where: dict[str, list[int]] = {}
    for i, image_id in enumerate(column(ds, "image_id")):
        where.setdefault(image_id, []).append(i)
    skipped = set(unlabelled)
    out = {}
    for name in manifest.get("splits", [s for s in SPLIT_NAMES if s in manifest]):
        ids = manifest[name]
        missing = [i for i in ids if i not in where and i not in skipped]
        if missing:
            raise ValueError(
                f"manifest split {name!r}: {len(missing)} of its {len(ids)} image_ids are not in the data, "
                f"e.g. {missing[:3]}; is the data the one the manifest was written for?"
            )
        out[name] = ds.select([row for i in ids for row in where.get(i, [])])
    return datasets.DatasetDict(out)


def _same_folder(recorded: str | Path, data: str | Path, roots: Sequence[Path]) -> bool:
    """Whether a manifest's recorded data path (relative to the run's working directory, tried
    against each of `roots`) is the folder `data` names (a layout's labels CSV names its folder)."""
    target = Path(data).expanduser()
    if target.name in ("labels.csv", "HAM10000_metadata.csv"):
        target = target.parent
    target = target.resolve()
    recorded = Path(recorded).expanduser()
    candidates = [recorded] if recorded.is_absolute() else [root / recorded for root in roots]
    return any(c.resolve() == target for c in candidates)


def manifest_splits_of(
    manifest: Mapping[str, Any], data: str | Path, roots: Sequence[Path] = ()
) -> tuple[str | None, dict[str, list[str]]] | None:
    """The splits a manifest made of `data`: (source name, {split: image ids as `data` names them}).

    A multi-source manifest (train/sources.py `source_manifest`) records each source's folder and
    prefixes its image ids with `<source name>/`: the source whose folder is `data` gives its ids,
    prefix removed. A single-source manifest gives all its ids (source None), unless it records a
    `data` path that is another folder. None when the manifest split other data.
    """
    names = manifest.get("splits", [s for s in SPLIT_NAMES if s in manifest])
    sources = manifest.get("sources") or []
    if not sources:
        if "data" in manifest and not _same_folder(manifest["data"], data, roots):
            return None
        return None, {name: list(manifest[name]) for name in names}
    for source in sources:
        if _same_folder(source["data"], data, roots):
            prefix = f"{source['name']}/"
            return source["name"], {name: [i[len(prefix):] for i in manifest[name] if i.startswith(prefix)] for name in names}
    return None


def manifest_image_ids(manifest: Mapping[str, Any], split: str) -> set[str]:
    """Image ids of one split of a manifest, without the `<source name>/` prefixes of a multi-source one."""
    prefixes = tuple(f"{source['name']}/" for source in manifest.get("sources") or [])
    return {next((i[len(p):] for p in prefixes if i.startswith(p)), i) for i in manifest.get(split) or []}


def stratified_sample(ds: datasets.Dataset, n: int, seed: int = 0) -> datasets.Dataset:
    """A seeded random `n` rows of `ds`, stratified by dx (the label where dx is None), in `ds` order.

    Each class gets its share of `n` by largest remainder (ties to the larger class), so a class
    as rare as one image in a hundred can still be drawn; sklearn's stratified splitters refuse
    classes with fewer than two members. All of `ds` when `n >= len(ds)`.
    """
    if n < 1:
        raise ValueError(f"a sample needs n >= 1, got {n}")
    if n >= len(ds):
        return ds
    strata = [dx if dx is not None else str(y) for dx, y in zip(column(ds, "dx"), column(ds, "label"))]
    rows: dict[str, list[int]] = {}
    for i, stratum in enumerate(strata):
        rows.setdefault(stratum, []).append(i)
    shares = {k: n * len(v) / len(ds) for k, v in rows.items()}
    quota = {k: int(share) for k, share in shares.items()}
    by_remainder = sorted(rows, key=lambda k: (-(shares[k] - quota[k]), -len(rows[k]), k))
    for k in by_remainder[: n - sum(quota.values())]:
        quota[k] += 1
    rng = np.random.default_rng(seed)
    picked = [int(i) for k in sorted(rows) for i in rng.choice(rows[k], size=quota[k], replace=False)]
    return ds.select(sorted(picked))
