"""Datasets in: every data source loaded as one `datasets.Dataset`, unreadable images dropped.

Every data source becomes one `datasets.Dataset` with the columns

    image     datasets.Image (lazy: decoded when a row is read)
    label     ClassLabel, names = DX_CODES ("dx" scheme) or BINARY_LABELS ("binary", mel -> 1)
    image_id  str (ISIC id or the file name without extension)
    lesion_id str or None (HAM10000's lesion_id; None where the source does not have one)
    dx        str or None (the dx code of the row, kept in the binary scheme too)

`load_image_dataset(spec)` accepts a Hub dataset id (or its local copy / a `save_to_disk`
folder), an image folder with class subfolders, the HAM10000 layout, the ISIC 2017 layout or a
CSV file with `path` and `dx` columns. Unreadable images are dropped at load time (with a
warning and a count). Splits live in train/splits.py, transforms in train/transforms.py,
class balance in train/balance.py:

    ds = load_image_dataset("../shared/data/ham10000")            # or a Hub id, folder, CSV
    dd = split_by_lesion(ds, val_size=0.15, test_size=0.15, seed=42)          # train.splits
    write_manifest(dd, "runs/x/split_manifest.json")             # apply_manifest() rebuilds it
    train_ds = with_image_transform(dd["train"], build_transforms(processor, train=True))  # train.transforms
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
from tqdm.auto import tqdm

from model.imageio import load_image
from model.labels import BINARY_LABELS, DX_CODES, DX_NAMES, ISIC2017_TO_DX, MELANOMA

from .splits import SPLIT_NAMES, split_by_lesion

logger = logging.getLogger(__name__)

LABEL_SCHEMES = ("dx", "binary")
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


def _read_label_csv(csv_path: Path) -> tuple[pd.DataFrame, str]:
    """A CSV spec's rows, with the paths made absolute and an `image_id` column; returns (table, label column)."""
    table = pd.read_csv(csv_path, dtype=str)
    label_col = next((c for c in ("dx", "label", "labels", "diagnosis") if c in table.columns), None)
    if "path" not in table.columns or label_col is None:
        raise ValueError(
            f"{csv_path}: a CSV spec needs a 'path' column and a 'dx' (or 'label') column; "
            f"found columns {list(table.columns)}"
        )
    root = csv_path.parent
    table["path"] = [str(p if Path(p).is_absolute() else root / p) for p in table["path"]]
    id_col = next((c for c in ("image_id", "case_id") if c in table.columns), None)
    table["image_id"] = table[id_col] if id_col else [Path(p).stem for p in table["path"]]
    return table, label_col


def unlabelled_image_ids(spec: str | Path) -> set[str]:
    """Image ids of the rows a CSV source (a CSV file, or a folder's labels.csv) lists without a label,
    which `load_image_dataset` skips (e.g. Derm7pt's melanosis cases); empty for other sources."""
    path = Path(spec).expanduser()
    csv = path if path.is_file() and path.suffix.lower() == ".csv" else path / "labels.csv"
    if not csv.is_file() or (path.is_dir() and ((path / HAM_METADATA).is_file() or _is_saved_dataset(path))):
        return set()
    table, label_col = _read_label_csv(csv)
    return set(table.loc[table[label_col].map(_missing), "image_id"])


def _load_csv(csv_path: Path, label_scheme: str, split: str | None) -> tuple[datasets.Dataset, bool]:
    """CSV with `path` and `dx`/`label` columns. Returns (dataset, whether `split` was applied)."""
    table, label_col = _read_label_csv(csv_path)
    has_split = split is not None and "split" in table.columns
    table = _pick_split_rows(table, split, str(csv_path))
    unlabelled = table[label_col].map(_missing)
    if unlabelled.any():
        # e.g. Derm7pt's melanosis / miscellaneous rows have no dx code: left out, never guessed
        logger.warning("%s: %d row(s) without a %r label skipped", csv_path, int(unlabelled.sum()), label_col)
        table = table[~unlabelled]
    paths = list(table["path"])
    image_ids = table["image_id"]
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


def is_labelled_layout(folder: str | Path) -> bool:
    """Whether `load_image_dataset` reads `folder` as one of its labelled folder layouts: HAM10000
    (metadata CSV + images), ISIC 2017 (labels.csv), class subfolders (optionally under
    train/validation/test). Saved datasets and plain image folders are not layouts."""
    path = Path(folder)
    if not path.is_dir() or _is_saved_dataset(path):
        return False
    if (path / HAM_METADATA).is_file() or (path / "labels.csv").is_file() or _class_dirs(path):
        return True
    return any(_class_dirs(p) for p in _split_dirs(path).values())


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
