"""Datasets in, tensors out: loading, lesion-grouped splits, transforms, class balance.

Every data source becomes one `datasets.Dataset` with the columns

    image     datasets.Image (lazy: decoded when a row is read)
    label     ClassLabel, names = DX_CODES ("dx" scheme) or BINARY_LABELS ("binary", mel -> 1)
    image_id  str (ISIC id or the file name without extension)
    lesion_id str or None (HAM10000's lesion_id; None where the source does not have one)
    dx        str or None (the dx code of the row, kept in the binary scheme too)

`load_image_dataset(spec)` accepts a Hub dataset id (or its local copy / a `save_to_disk`
folder), an image folder with class subfolders, the HAM10000 layout, the ISIC 2017 layout or a
CSV file with `path` and `dx` columns. Unreadable images are dropped at load time (with a
warning and a count), and the batch transform turns a sample that still fails to decode
into an ignored sample (label -100) instead of stopping a long run.

    ds = load_image_dataset("../shared/data/ham10000")            # or a Hub id, folder, CSV
    dd = split_by_lesion(ds, val_size=0.15, test_size=0.15, seed=42)
    write_manifest(dd, "runs/x/split_manifest.json")             # apply_manifest() rebuilds it
    train_ds = with_image_transform(dd["train"], build_transforms(processor, train=True))
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import PIL.Image
import torch
from sklearn.model_selection import train_test_split
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm.auto import tqdm

from model.geometry import processor_geometry
from model.imageio import load_image
from model.labels import BINARY_LABELS, DX_CODES, DX_NAMES, ISIC2017_TO_DX, MELANOMA
from model.modeling_melanoma_vit import IGNORE_INDEX  # the label every loss skips (e.g. a failed decode)

logger = logging.getLogger(__name__)

LABEL_SCHEMES = ("dx", "binary")
SPLIT_NAMES = ("train", "validation", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
HAM_METADATA = "HAM10000_metadata.csv"
HAM_IMAGE_DIRS = ("images", "HAM10000_images", "HAM10000_images_part_1", "HAM10000_images_part_2")
ACCEPTED_SPECS = (
    "a Hub dataset id (datasets.load_dataset) or its local copy, a folder written by "
    "Dataset.save_to_disk, a HAM10000 folder (HAM10000_metadata.csv + images/ISIC_*.jpg, or "
    "the Kaggle HAM10000_images_part_1/2 layout), an ISIC 2017 folder (labels.csv with "
    "image_id, split, label, path), an image folder with one subfolder per class (dx codes or "
    "ISIC names, optionally under train/validation/test folders), or a CSV file with 'path' "
    "and 'dx' (or 'label') columns, paths relative to the CSV"
)


# --------------------------------------------------------------------------------------------
# Label names
# --------------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


# Names seen in HAM10000 mirrors, ISIC challenges and Kaggle folders, mapped onto dx codes.
LABEL_ALIASES: dict[str, str] = {
    **{c: c for c in DX_CODES},
    **{_norm(v): k for k, v in DX_NAMES.items()},
    **ISIC2017_TO_DX,
    "ak": "akiec",
    "actinic_keratosis": "akiec",
    "actinic_keratoses": "akiec",
    "bowen_s_disease": "akiec",
    "actinic_keratoses_and_intraepithelial_carcinoma": "akiec",
    "basal_cell_carcinoma": "bcc",
    "bkl": "bkl",
    "benign_keratosis": "bkl",
    "benign_keratosis_like_lesions": "bkl",
    "seborrheic_keratosis": "bkl",
    "seborrhoeic_keratosis": "bkl",
    "dermatofibroma": "df",
    "melanoma": "mel",
    "nevus": "nv",
    "naevus": "nv",
    "melanocytic_nevi": "nv",
    "melanocytic_nevus": "nv",
    "vascular_lesion": "vasc",
    "vascular_lesions": "vasc",
}
# Only meaningful for the binary scheme: a source that already is melanoma-vs-rest.
_BINARY_ONLY = {"other": "other", "rest": "other", "non_melanoma": "other", "not_melanoma": "other"}


def to_dx(name: str) -> str:
    """Map a class name (dx code, ISIC 2017 name, HAM10000 long name) onto its dx code.

    Raises KeyError for a name that is not a known dermoscopy class.
    """
    key = _norm(name)
    if key in LABEL_ALIASES:
        return LABEL_ALIASES[key]
    raise KeyError(name)


def label_names(label_scheme: str) -> tuple[str, ...]:
    """Class names (index order) of a label scheme: DX_CODES or BINARY_LABELS."""
    if label_scheme == "dx":
        return DX_CODES
    if label_scheme == "binary":
        return BINARY_LABELS
    raise ValueError(f"label_scheme must be one of {LABEL_SCHEMES}, got {label_scheme!r}")


def _encode_labels(names: Sequence[str | None], label_scheme: str, source: str) -> tuple[list[int], list[str | None]]:
    """Class names -> (label ids in the scheme, dx codes or None). Unknown names raise ValueError."""
    label_names(label_scheme)  # validates the scheme
    ids: list[int] = []
    dxs: list[str | None] = []
    unknown: Counter[str] = Counter()
    for name in names:
        try:
            dx = to_dx(name)
        except KeyError:
            if label_scheme == "binary" and _norm(name) in _BINARY_ONLY:
                ids.append(0)
                dxs.append(None)
                continue
            unknown[str(name)] += 1
            continue
        dxs.append(dx)
        ids.append(DX_CODES.index(dx) if label_scheme == "dx" else int(dx == MELANOMA))
    if unknown:
        hint = ""
        if label_scheme == "dx" and set(map(_norm, unknown)) <= set(_BINARY_ONLY):
            hint = " The source looks melanoma-vs-rest: use label_scheme='binary'."
        raise ValueError(
            f"{source}: label names {sorted(unknown)} are not dermoscopy classes this project knows "
            f"(dx codes {list(DX_CODES)}, ISIC 2017 names {sorted(ISIC2017_TO_DX)} or HAM10000 long "
            f"names).{hint}"
        )
    return ids, dxs


def _features(label_scheme: str) -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(label_names(label_scheme))),
            "image_id": datasets.Value("string"),
            "lesion_id": datasets.Value("string"),
            "dx": datasets.Value("string"),
        }
    )


def _from_records(
    paths: Sequence[str],
    names: Sequence[str],
    image_ids: Sequence[str],
    lesion_ids: Sequence[str | None],
    label_scheme: str,
    source: str,
) -> datasets.Dataset:
    labels, dxs = _encode_labels(names, label_scheme, source)
    return datasets.Dataset.from_dict(
        {
            "image": list(paths),
            "label": labels,
            "image_id": [str(i) for i in image_ids],
            "lesion_id": [None if _missing(v) else str(v) for v in lesion_ids],
            "dx": dxs,
        },
        features=_features(label_scheme),
    )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def _load_ham(folder: Path, label_scheme: str) -> datasets.Dataset:
    meta = pd.read_csv(folder / HAM_METADATA, dtype=str)
    missing = {"image_id", "dx"} - set(meta.columns)
    if missing:
        raise ValueError(f"{folder / HAM_METADATA} lacks columns {sorted(missing)}")
    # One lookup of every image file instead of a stat per row (10k rows).
    files: dict[str, Path] = {}
    for sub in HAM_IMAGE_DIRS:
        if (folder / sub).is_dir():
            for p in (folder / sub).iterdir():
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    files.setdefault(p.stem, p)
    keep = meta["image_id"].isin(files.keys())
    if not keep.all():
        logger.warning(
            "HAM10000 at %s: %d of %d metadata rows have no image file under %s; skipped",
            folder, int((~keep).sum()), len(meta), "/".join(HAM_IMAGE_DIRS),
        )
    meta = meta[keep]
    lesions = meta["lesion_id"] if "lesion_id" in meta.columns else [None] * len(meta)
    return _from_records(
        [str(files[i]) for i in meta["image_id"]], list(meta["dx"]), list(meta["image_id"]),
        list(lesions), label_scheme, str(folder / HAM_METADATA),
    )


def _pick_split_rows(table: pd.DataFrame, split: str | None, source: str) -> pd.DataFrame:
    if split is None or "split" not in table.columns:
        return table
    aliases = {"validation": {"validation", "val", "valid"}, "val": {"validation", "val", "valid"}}
    wanted = aliases.get(split, {split})
    rows = table[table["split"].astype(str).str.lower().isin(wanted)]
    if rows.empty:
        raise ValueError(
            f"{source}: no rows with split={split!r}; splits present: {sorted(table['split'].astype(str).unique())}"
        )
    return rows


def _load_csv(csv_path: Path, label_scheme: str, split: str | None) -> tuple[datasets.Dataset, bool]:
    """CSV with `path` and `dx`/`label` columns. Returns (dataset, whether `split` was applied)."""
    table = pd.read_csv(csv_path, dtype=str)
    label_col = next((c for c in ("dx", "label", "labels", "diagnosis") if c in table.columns), None)
    if "path" not in table.columns or label_col is None:
        raise ValueError(
            f"{csv_path}: a CSV spec needs a 'path' column and a 'dx' (or 'label') column; "
            f"found columns {list(table.columns)}"
        )
    has_split = split is not None and "split" in table.columns
    table = _pick_split_rows(table, split, str(csv_path))
    unlabelled = table[label_col].map(_missing)
    if unlabelled.any():
        # e.g. Derm7pt's melanosis / miscellaneous rows have no dx code: left out, never guessed
        logger.warning("%s: %d row(s) without a %r label skipped", csv_path, int(unlabelled.sum()), label_col)
        table = table[~unlabelled]
    root = csv_path.parent
    paths = [str(p if Path(p).is_absolute() else root / p) for p in table["path"]]
    id_col = next((c for c in ("image_id", "case_id") if c in table.columns), None)
    image_ids = table[id_col] if id_col else [Path(p).stem for p in paths]
    lesion_col = next((c for c in ("lesion_id", "lesion_group") if c in table.columns), None)
    lesions = table[lesion_col] if lesion_col else [None] * len(table)
    ds = _from_records(paths, list(table[label_col]), list(image_ids), list(lesions), label_scheme, str(csv_path))
    return ds, has_split


def _class_dirs(folder: Path) -> list[tuple[Path, str]]:
    """Subfolders of `folder` whose names are class names (dx codes, ISIC names, ...)."""
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            to_dx(sub.name)
        except KeyError:
            if _norm(sub.name) not in _BINARY_ONLY:
                continue
        out.append((sub, sub.name))
    return out


def _split_dirs(folder: Path) -> dict[str, Path]:
    names = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation", "test": "test"}
    return {names[p.name.lower()]: p for p in folder.iterdir() if p.is_dir() and p.name.lower() in names}


def _load_image_folder(folder: Path, label_scheme: str) -> datasets.Dataset:
    paths, names = [], []
    for sub, name in _class_dirs(folder):
        for p in sorted(sub.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(p))
                names.append(name)
    if not paths:
        raise ValueError(f"{folder}: class subfolders hold no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return _from_records(paths, names, [Path(p).stem for p in paths], [None] * len(paths), label_scheme, str(folder))


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _pick_from_dict(
    dd: Mapping[str, datasets.Dataset], split: str | None, source: str
) -> tuple[datasets.Dataset, bool]:
    if split is None:
        if len(dd) == 1:
            return next(iter(dd.values())), False
        raise ValueError(f"{source} has splits {sorted(dd)}: pass split= one of them")
    for name in (split, {"validation": "val", "val": "validation"}.get(split, split)):
        if name in dd:
            return dd[name], True
    raise ValueError(f"{source} has no split {split!r}; splits present: {sorted(dd)}")


def _adapt_hf_dataset(ds: datasets.Dataset, label_scheme: str, source: str) -> datasets.Dataset:
    """Any image-classification Dataset -> our columns (image, label, image_id, lesion_id, dx)."""
    image_col = "image" if isinstance(ds.features.get("image"), datasets.Image) else next(
        (c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None
    )
    if image_col is None:
        raise ValueError(f"{source}: no column with a datasets.Image feature; columns: {list(ds.features)}")
    # First candidate without missing values: a dataset saved by this module has "dx" (None
    # for rows of a melanoma-vs-rest source) next to "label".
    candidates = [c for c in ("dx", "label", "labels", "diagnosis") if c in ds.features]
    columns = {c: list(ds.select_columns([c]).with_format(None)[c]) for c in candidates}
    label_col = next((c for c in candidates if not any(_missing(v) for v in columns[c])), None)
    if label_col is None:
        raise ValueError(
            f"{source}: no usable label column (looked for 'dx', 'label', 'labels', 'diagnosis' without "
            f"missing values); columns: {list(ds.features)}"
        )
    feature, values = ds.features[label_col], columns[label_col]
    if isinstance(feature, datasets.ClassLabel):
        names = [feature.int2str(int(v)) for v in values]
    elif getattr(feature, "dtype", None) in ("string", "large_string"):
        names = values
    else:
        raise ValueError(
            f"{source}: label column {label_col!r} holds {getattr(feature, 'dtype', feature)} values without "
            "class names; cast it to datasets.ClassLabel(names=[...]) or store dx codes as strings"
        )
    labels, dxs = _encode_labels(names, label_scheme, source)
    if "image_id" in ds.features:
        image_ids = [str(v) for v in ds.select_columns(["image_id"]).with_format(None)["image_id"]]
    else:
        raw = ds.select_columns([image_col]).cast_column(image_col, datasets.Image(decode=False)).with_format(None)
        paths = [v.get("path") if v else None for chunk in raw.iter(batch_size=1024) for v in chunk[image_col]]
        prefix = Path(source).name or "image"
        image_ids = [Path(p).stem if p else f"{prefix}_{i:06d}" for i, p in enumerate(paths)]
    lesions = (
        [None if _missing(v) else str(v) for v in ds.select_columns(["lesion_id"]).with_format(None)["lesion_id"]]
        if "lesion_id" in ds.features
        else [None] * len(ds)
    )
    out = ds.select_columns([image_col]).with_format(None)
    if image_col != "image":
        out = out.rename_column(image_col, "image")
    out = out.add_column("label", labels).add_column("image_id", image_ids)
    out = out.add_column("lesion_id", lesions).add_column("dx", dxs)
    return out.cast(_features(label_scheme))


def load_image_dataset(
    spec: str | Path,
    label_scheme: str = "dx",
    split: str | None = None,
    verify: bool = True,
) -> datasets.Dataset:
    """Load any supported data source as one `datasets.Dataset` (see the module docstring).

    Args:
        spec: Hub dataset id, local path (folder or CSV file). See `ACCEPTED_SPECS`.
        label_scheme: "dx" (7 classes, names DX_CODES) or "binary" (("other", "mel"), mel -> 1).
        split: rows to return. Sources with their own splits (ISIC 2017's `split` column,
            DatasetDicts, train/validation/test folders) pick that split. Sources without
            (HAM10000, plain CSV, flat image folder) return that part of the project's default
            split, `split_by_lesion(ds, 0.15, 0.15, seed=42)`; use a manifest to rebuild the
            split of a given training run. None: every row.
        verify: open every image once and drop the unreadable ones (warning + count); see
            `verify_images`.

    Returns:
        Dataset with columns image (lazy datasets.Image), label (ClassLabel), image_id, lesion_id, dx.
    """
    label_names(label_scheme)
    path = Path(spec).expanduser()
    split_done = False
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise ValueError(f"unsupported data file {path}: expected {ACCEPTED_SPECS}")
        ds, split_done = _load_csv(path, label_scheme, split)
    elif path.is_dir():
        if _is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded, split_done = _pick_from_dict(loaded, split, str(path))
            ds = _adapt_hf_dataset(loaded, label_scheme, str(path))
        elif (path / HAM_METADATA).is_file():
            ds = _load_ham(path, label_scheme)
        elif (path / "labels.csv").is_file():
            ds, split_done = _load_csv(path / "labels.csv", label_scheme, split)
        elif _class_dirs(path):
            ds = _load_image_folder(path, label_scheme)
        elif (splits := _split_dirs(path)) and any(_class_dirs(p) for p in splits.values()):
            folder, split_done = _pick_from_dict(splits, split, str(path))
            ds = _load_image_folder(folder, label_scheme)
        else:
            ds, split_done = _load_hub(str(path), label_scheme, split)
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(spec)) and not str(spec).startswith("."):
        ds, split_done = _load_hub(str(spec), label_scheme, split)
    else:
        raise ValueError(f"data spec {str(spec)!r} does not exist; expected {ACCEPTED_SPECS}")
    if len(ds) == 0:
        raise ValueError(f"data spec {str(spec)!r} holds no labelled images")
    if verify:
        ds, n_bad = verify_images(ds)
        if n_bad:
            logger.warning("%s: skipped %d unreadable image(s) of %d", spec, n_bad, len(ds) + n_bad)
    if split is not None and not split_done:
        name = {"val": "validation"}.get(split, split)
        if name not in SPLIT_NAMES:
            raise ValueError(f"{spec} has no predefined splits; split must be one of {SPLIT_NAMES}, got {split!r}")
        logger.info("%s has no predefined splits: using split_by_lesion(0.15, 0.15, seed=42)[%r]", spec, name)
        ds = split_by_lesion(ds)[name]
    return ds


def _load_hub(spec: str, label_scheme: str, split: str | None) -> tuple[datasets.Dataset, bool]:
    """datasets.load_dataset(spec, split=split), trying "val" <-> "validation" as well."""
    names = [split] if split is None else [split, {"validation": "val", "val": "validation"}.get(split, split)]
    errors = []
    for name in dict.fromkeys(names):
        try:
            loaded = datasets.load_dataset(spec, split=name)
            break
        except Exception as err:  # offline Hub, unknown id or split, unreadable folder
            errors.append(f"{type(err).__name__}: {err}")
    else:
        raise ValueError(
            f"could not load {spec!r} with datasets.load_dataset ({'; '.join(errors)}); expected {ACCEPTED_SPECS}"
        )
    split_done = split is not None
    if isinstance(loaded, datasets.DatasetDict):
        loaded, split_done = _pick_from_dict(loaded, split, spec)
    return _adapt_hf_dataset(loaded, label_scheme, spec), split_done


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


# Verification decodes JPEGs at reduced size (DCT-domain draft): the whole stream is still read,
# so truncated files still fail, at a fraction of the cost of full-resolution decoding.
VERIFY_SIDE = 64


def _check_image(value: Any) -> str | None:
    """None if the image decodes (`model.imageio.load_image`, as at transform time), else the error."""
    try:
        load_image(value, max_side=VERIFY_SIDE).close()
    except Exception as err:  # any decoder error means "unusable sample", never a crash
        return f"{type(err).__name__}: {err}"
    return None


def verify_images(ds: datasets.Dataset, num_workers: int | None = None) -> tuple[datasets.Dataset, int]:
    """Decode every image once; drop the rows whose image is missing, empty or corrupt.

    Decoding runs in `num_workers` threads (PIL releases the GIL while decoding; default
    min(4, CPUs)), over chunks of rows so that embedded image bytes are never all in memory.

    Returns:
        (dataset without the unreadable rows, number of rows dropped). Each drop is logged.
    """
    raw = ds.select_columns(["image"]).cast_column("image", datasets.Image(decode=False)).with_format(None)
    bad: list[int] = []
    start = 0
    workers = num_workers or min(4, os.cpu_count() or 1)
    bar = tqdm(total=len(raw), desc="verify images", disable=len(raw) < 1000, leave=False)
    with ThreadPoolExecutor(max_workers=workers) as pool, bar:
        for chunk in raw.iter(batch_size=512):
            values = chunk["image"]
            for i, (value, err) in enumerate(zip(values, pool.map(_check_image, values)), start):
                if err is not None:
                    where = value.get("path") if value else None
                    logger.warning("skipping unreadable image %s (row %d): %s", where or "<bytes>", i, err)
                    bad.append(i)
            start += len(values)
            bar.update(len(values))
    if not bad:
        return ds, 0
    drop = set(bad)
    return ds.select([i for i in range(len(ds)) if i not in drop]), len(bad)


# --------------------------------------------------------------------------------------------
# Lesion-grouped splits and manifests
# --------------------------------------------------------------------------------------------


def _column(ds: datasets.Dataset, name: str) -> list:
    return list(ds.select_columns([name]).with_format(None)[name])


def _groups(ds: datasets.Dataset) -> list[str]:
    # An image without a lesion_id is its own lesion; prefixes keep the two id spaces apart.
    return [
        f"lesion:{les}" if les is not None else f"image:{img}"
        for les, img in zip(_column(ds, "lesion_id"), _column(ds, "image_id"))
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
    labels = _column(ds, "label")
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
            for value in set(_column(ds, col)) - {None}:
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
        manifest[name] = _column(ds, "image_id")
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
    for i, image_id in enumerate(_column(ds, "image_id")):
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


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """Training augmentation knobs (0 / None disables one). Dermoscopy has no "up", so the
    flips, 90-degree rotations and transposes together cover all 8 orientations."""

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    transpose: float = 0.5
    crop_scale: tuple[float, float] | None = (0.5, 1.0)  # RandomResizedCrop area; None: plain resize
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    blur: float = 0.1  # probability of a GaussianBlur
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    erasing: float = 0.25  # RandomErasing probability (on the normalised tensor)
    # Acquisition shift between dermoscopes: a per-channel gain up to exp(+-color_cast) (warm or
    # blue casts) and a dark circular vignette (probability `vignette`), as other archives show.
    color_cast: float = 0.0
    vignette: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # probability that a batch is mixed at all

    @classmethod
    def from_any(cls, cfg: AugmentConfig | Mapping[str, Any] | None) -> AugmentConfig:
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown augmentation option(s) {sorted(unknown)}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        return cls(**values)


class RandomColorCast(torch.nn.Module):
    """Multiply each channel of a float image in [0, 1] by exp(U(-strength, strength)) (a colour cast)."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = strength

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        gain = torch.empty(img.shape[-3], 1, 1).uniform_(-self.strength, self.strength).exp()
        return (img * gain).clamp(0, 1)


class RandomVignette(torch.nn.Module):
    """With probability p, darken a float image outside a random circle (the dermoscope's field stop)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        h, w = img.shape[-2:]
        y = torch.linspace(-1, 1, h).view(h, 1)
        x = torch.linspace(-1, 1, w).view(1, w)
        r = (x**2 + y**2).sqrt()  # 1 at the edge midpoints, sqrt(2) in the corners
        radius = float(torch.empty(()).uniform_(0.8, 1.3))
        width = float(torch.empty(()).uniform_(0.02, 0.2))
        floor = float(torch.empty(()).uniform_(0.0, 0.15))
        mask = floor + (1 - floor) * torch.sigmoid((radius - r) / width)  # (H, W)
        return img * mask


class RandomRot90(torch.nn.Module):
    """Rotate an image tensor (..., H, W) by k * 90 degrees, k uniform in {0, 1, 2, 3}."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()))
        out = torch.rot90(img, k, dims=(-2, -1))
        return tv_tensors.wrap(out, like=img) if isinstance(img, tv_tensors.Image) else out


class RandomTranspose(torch.nn.Module):
    """Swap H and W of an image tensor (..., H, W) with probability p."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        out = img.transpose(-2, -1)
        return tv_tensors.wrap(out, like=img) if isinstance(img, tv_tensors.Image) else out


def train_pipeline(image_processor: Any, cfg: AugmentConfig | Mapping[str, Any] | None = None) -> v2.Compose:
    """Per-image training augmentation: RGB PIL image -> normalised float tensor (3, H, W)."""
    cfg = AugmentConfig.from_any(cfg)
    geo = processor_geometry(image_processor)
    interpolation = v2.InterpolationMode(geo.interpolation)
    steps: list[Callable] = [v2.ToImage()]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip:
        steps.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.rot90:
        steps.append(RandomRot90())
    if cfg.transpose:
        steps.append(RandomTranspose(cfg.transpose))
    if cfg.crop_scale:
        steps.append(
            v2.RandomResizedCrop(
                geo.size, cfg.crop_scale, cfg.crop_ratio, interpolation=interpolation, antialias=True
            )
        )
    else:
        steps.append(v2.Resize(geo.size, interpolation=interpolation, antialias=True))
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        steps.append(v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue))
    if cfg.blur:
        kernel = max(3, int(0.05 * min(geo.size)) // 2 * 2 + 1)  # odd, ~5% of the side
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=cfg.blur_sigma)], p=cfg.blur))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if cfg.color_cast:
        steps.append(RandomColorCast(cfg.color_cast))
    if cfg.vignette:
        steps.append(RandomVignette(cfg.vignette))
    steps.append(v2.Normalize(geo.mean, geo.std))
    if cfg.erasing:
        steps.append(v2.RandomErasing(p=cfg.erasing, value=0))
    return v2.Compose(steps)


class ImageBatchTransform:
    """Batch transform for `Dataset.with_transform`: {"image": [...], "label": [...]} ->
    {"pixel_values": float32 (B, 3, H, W), "labels": int64 (B,)}.

    Images may be PIL images or undecoded {"path", "bytes"} dicts (see `with_image_transform`).
    An image that fails to decode becomes a zero tensor with label IGNORE_INDEX (-100), which
    cross-entropy ignores, and is counted in `n_failed`: one bad file never stops a long run.
    """

    def __init__(self, image_processor: Any, train: bool, cfg: AugmentConfig | Mapping[str, Any] | None = None):
        self.image_processor = image_processor
        self.train = train
        self.size = processor_geometry(image_processor).size
        self.pipeline = train_pipeline(image_processor, cfg) if train else None
        self.n_failed = 0

    def _eval_batch(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        # The model's own processor: exactly what inference (app, evaluate) does.
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        labels = list(batch["label"]) if "label" in batch else [IGNORE_INDEX] * len(images)
        decoded: list[PIL.Image.Image | None] = []
        for value in images:
            try:
                decoded.append(load_image(value))
            except Exception as err:  # a corrupt sample must not end a training run
                self.n_failed += 1
                logger.warning(
                    "image failed to decode at transform time (%s); sample ignored (label %d)", err, IGNORE_INDEX
                )
                decoded.append(None)
        good = [img for img in decoded if img is not None]
        if self.train:
            outs = [self.pipeline(img) for img in good]
        else:
            outs = list(self._eval_batch(good)) if good else []
        h, w = outs[0].shape[-2:] if outs else self.size
        it = iter(outs)
        pixel_values = torch.stack([next(it) if img is not None else torch.zeros(3, h, w) for img in decoded])
        labels = [lab if img is not None else IGNORE_INDEX for lab, img in zip(labels, decoded)]
        return {"pixel_values": pixel_values.float(), "labels": torch.as_tensor(labels, dtype=torch.long)}


def build_transforms(
    image_processor: Any, train: bool, cfg: AugmentConfig | Mapping[str, Any] | None = None
) -> ImageBatchTransform:
    """Batch transform for `Dataset.with_transform` from the model's saved image processor.

    Args:
        image_processor: a transformers image processor (ViTImageProcessor,
            TimmWrapperImageProcessor, ...) or a path / Hub id for AutoImageProcessor.
        train: True: augmentation (flips, 90-degree rotations, transposes, RandomResizedCrop,
            ColorJitter, GaussianBlur, RandomErasing; knobs in `AugmentConfig`) at the
            processor's size, normalised with its mean/std. False: the processor itself
            (resize + normalise, deterministic), as used at inference.
        cfg: AugmentConfig or a dict of its fields (training only).

    Returns:
        callable batch -> {"pixel_values": float32 (B, 3, H, W), "labels": int64 (B,)}.
    """
    if isinstance(image_processor, (str, Path)):
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(str(image_processor))
    return ImageBatchTransform(image_processor, train, cfg)


def with_image_transform(ds: datasets.Dataset, transform: Callable) -> datasets.Dataset:
    """`ds.with_transform(transform)` with images left undecoded until the transform, so that a
    file that fails to decode reaches the transform's error handling instead of raising inside
    datasets' formatter. Only the image and label columns are passed to the transform."""
    ds = ds.cast_column("image", datasets.Image(decode=False))
    columns = [c for c in ("image", "label") if c in ds.column_names]
    return ds.with_transform(transform, columns=columns, output_all_columns=False)


class BatchMixer:
    """MixUp / CutMix (torchvision v2) on a collated batch; see `build_batch_mixer`."""

    def __init__(self, mix: Callable, num_classes: int, prob: float = 1.0):
        self.mix = mix
        self.num_classes = num_classes
        self.prob = prob

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = batch["labels"] != IGNORE_INDEX
        x, y = batch["pixel_values"][keep], batch["labels"][keep]
        if len(y) > 1 and torch.rand(()) < self.prob:
            x, y = self.mix(x, y)
        else:
            y = torch.nn.functional.one_hot(y, self.num_classes).float()
        return {"pixel_values": x, "labels": y}


def build_batch_mixer(cfg: AugmentConfig | Mapping[str, Any] | None, num_classes: int) -> BatchMixer | None:
    """MixUp / CutMix (torchvision v2) applied to a collated batch, or None when both are off.

    The mixer maps {"pixel_values": (B, 3, H, W), "labels": (B,) int64} to
    {"pixel_values": (B', 3, H, W), "labels": (B', num_classes) float32 soft targets}, where
    rows with label IGNORE_INDEX are dropped first (B' <= B). With both alphas > 0 each batch
    gets one of the two at random; unmixed batches (mix_prob < 1) get one-hot targets, so the
    loss is always soft-target cross-entropy: `(-labels * logits.log_softmax(-1)).sum(-1).mean()`.
    """
    cfg = AugmentConfig.from_any(cfg)
    mixers = []
    if cfg.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return BatchMixer(mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers), num_classes, cfg.mix_prob)


# --------------------------------------------------------------------------------------------
# Class balance
# --------------------------------------------------------------------------------------------


def class_counts(ds: datasets.Dataset) -> list[int]:
    """Images per class, in ClassLabel index order (length = number of classes)."""
    n = ds.features["label"].num_classes
    labels = np.asarray(_column(ds, "label"), dtype=np.int64)
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
    return weights[torch.as_tensor(_column(ds, "label"), dtype=torch.long)]
