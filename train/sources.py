"""Several dermoscopy sources as one multi-head dataset: one backbone, one head per source.

A recipe lists its sources (see `SourceSpec`); each row of the combined dataset carries a label
for every head its source knows and IGNORE_INDEX (-100) for the others, so a loss masks what a
source does not label instead of guessing it:

    source     dx (7 HAM codes)  isic2017 (3)   derm7pt (5)   seven criteria (2-3 each)
    ham10000   yes               -              -             -
    isic2017   yes (mel/nv/bkl)  yes            -             -
    derm7pt    yes (24 missing)  -              yes           yes

Splits stay leakage-free per source: HAM10000 by lesion_id (`split_by_lesion`, the project's
default seed), ISIC 2017 and Derm7pt by their official `split` column.

    specs = [SourceSpec(name="ham10000", data="../shared/data/ham10000"), ...]
    dd = load_sources(specs)             # DatasetDict(train, validation, test) with a `source` column
    heads = head_labels(specs)           # {"isic2017": [...], "pigment_network": [...], ...}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd

from model.labels import CRITERIA_LABELS, DERM7PT_LABELS, DX_CODES, ISIC2017_LABELS, ISIC2017_TO_DX
from model.modeling_melanoma_vit import IGNORE_INDEX

from .data import load_image_dataset
from .splits import SPLIT_NAMES, check_no_leakage, split_by_lesion

logger = logging.getLogger(__name__)

MAIN_HEAD = "dx"
SOURCE_KINDS = ("ham10000", "isic2017", "derm7pt")
# Heads each kind of source has labels for (the main dx head first).
SOURCE_HEADS: dict[str, tuple[str, ...]] = {
    "ham10000": (MAIN_HEAD,),
    "isic2017": (MAIN_HEAD, "isic2017"),
    "derm7pt": (MAIN_HEAD, "derm7pt", *CRITERIA_LABELS),
}
EXTRA_HEAD_LABELS: dict[str, tuple[str, ...]] = {
    "isic2017": ISIC2017_LABELS,
    "derm7pt": DERM7PT_LABELS,
    **CRITERIA_LABELS,
}

# Derm7pt raw values -> the grouped head labels (Kawahara et al. 2019).
_DERM7PT_DIAGNOSIS = {"basal cell carcinoma": "bcc", "seborrheic keratosis": "seborrheic_keratosis"}
_CRITERIA_GROUPS: dict[str, dict[str, str]] = {
    "pigment_network": {"absent": "absent", "typical": "typical", "atypical": "atypical"},
    "streaks": {"absent": "absent", "regular": "regular", "irregular": "irregular"},
    "pigmentation": {
        "absent": "absent", "diffuse regular": "regular", "localized regular": "regular",
        "diffuse irregular": "irregular", "localized irregular": "irregular",
    },
    "regression_structures": {
        "absent": "absent", "blue areas": "present", "white areas": "present", "combinations": "present",
    },
    "dots_and_globules": {"absent": "absent", "regular": "regular", "irregular": "irregular"},
    "blue_whitish_veil": {"absent": "absent", "present": "present"},
    "vascular_structures": {
        "absent": "absent", "arborizing": "regular", "comma": "regular", "hairpin": "regular",
        "within regression": "regular", "wreath": "regular", "dotted": "irregular", "linear irregular": "irregular",
    },
}


def derm7pt_diagnosis(diagnosis: str) -> str:
    """One of Derm7pt's 20 diagnoses -> its DERM7PT_LABELS group."""
    name = diagnosis.strip().lower()
    if name in _DERM7PT_DIAGNOSIS:
        return _DERM7PT_DIAGNOSIS[name]
    if name.startswith("melanoma") and "melanosis" not in name:
        return "melanoma"
    if "nevus" in name:
        return "nevus"
    return "misc"  # dermatofibroma, lentigo, melanosis, vascular lesion, miscellaneous


@dataclass
class SourceSpec:
    """One data source of a multi-source recipe.

    Attributes:
        name: unique name (also the `source` column value); the kind defaults to it.
        data: folder of the source (see ../shared/data/README.md layouts).
        kind: "ham10000", "isic2017" or "derm7pt" (which heads and which split rule).
        heads: heads to train from this source (default: every head of its kind).
        weight: share of each training batch drawn from this source, relative to the others; 0
            keeps the source for validation and test only (single-source baselines on one cache).
    """

    name: str
    data: str
    kind: str | None = None
    heads: list[str] | None = None
    weight: float = 1.0
    val_size: float = 0.15
    test_size: float = 0.15
    split_seed: int = 42

    def __post_init__(self) -> None:
        self.kind = self.kind or self.name
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"source {self.name!r}: kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        known = SOURCE_HEADS[self.kind]
        self.heads = list(known if self.heads is None else self.heads)
        unknown = set(self.heads) - set(known)
        if unknown:
            raise ValueError(f"source {self.name!r} has no labels for heads {sorted(unknown)}; it has {list(known)}")
        if self.weight < 0:
            raise ValueError(f"source {self.name!r}: weight must be >= 0, got {self.weight}")


def head_labels(specs: Sequence[SourceSpec]) -> dict[str, list[str]]:
    """Extra heads (not dx) trained by any of `specs`, in a fixed order: name -> label names."""
    wanted = {h for spec in specs for h in spec.heads}
    return {name: list(labels) for name, labels in EXTRA_HEAD_LABELS.items() if name in wanted}


def _features(heads: Sequence[str]) -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("string"),
            "lesion_id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "label": datasets.Value("int64"),
            **{h: datasets.Value("int64") for h in heads},
        }
    )


def _paths(ds: datasets.Dataset) -> list[str]:
    raw = ds.select_columns(["image"]).cast_column("image", datasets.Image(decode=False)).with_format(None)
    return [v["path"] for v in raw["image"]]


def _from_project_dataset(ds: datasets.Dataset, spec: SourceSpec) -> pd.DataFrame:
    """A `load_image_dataset` result (dx scheme) -> records with one column per head."""
    frame = pd.DataFrame(
        {
            "image": _paths(ds),
            "image_id": ds["image_id"],
            "lesion_id": ds["lesion_id"],
            "label": ds["label"],
        }
    )
    if "isic2017" in spec.heads:
        dx_to_isic = {DX_CODES.index(dx): ISIC2017_LABELS.index(name) for name, dx in ISIC2017_TO_DX.items()}
        frame["isic2017"] = [dx_to_isic.get(y, IGNORE_INDEX) for y in frame["label"]]
    return frame


#: The columns of a Derm7pt labels.csv (../shared/data/README.md).
DERM7PT_COLUMNS = ("case_id", "split", "path", "diagnosis", "dx", *_CRITERIA_GROUPS)


def _load_derm7pt(spec: SourceSpec) -> dict[str, pd.DataFrame]:
    return _derm7pt_frames(Path(spec.data) / "labels.csv")


def _derm7pt_frames(csv: Path) -> dict[str, pd.DataFrame]:
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    missing = set(DERM7PT_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{csv} lacks Derm7pt columns {sorted(missing)}")
    frame = pd.DataFrame(
        {
            "image": [str(csv.parent / p) for p in table["path"]],
            "image_id": table["case_id"],
            "lesion_id": table.get("lesion_group", table["case_id"]),
            "label": [DX_CODES.index(dx) if dx in DX_CODES else IGNORE_INDEX for dx in table["dx"]],
            "derm7pt": [DERM7PT_LABELS.index(derm7pt_diagnosis(d)) for d in table["diagnosis"]],
        }
    )
    for name, groups in _CRITERIA_GROUPS.items():
        unknown = set(table[name]) - set(groups)
        if unknown:
            raise ValueError(f"{csv}: unknown {name} values {sorted(unknown)}")
        frame[name] = [CRITERIA_LABELS[name].index(groups[v]) for v in table[name]]
    split = table["split"].str.lower().replace({"val": "validation", "valid": "validation"})
    return {name: frame[(split == name).to_numpy()] for name in SPLIT_NAMES}


def derm7pt_criteria(data: str | Path) -> dict[str, dict[str, int]] | None:
    """case_id -> {criterion: index into CRITERIA_LABELS} of a Derm7pt folder (or its labels.csv);
    None when `data` is not a Derm7pt layout (e.g. a plain `path,dx` CSV has no criteria columns)."""
    path = Path(data)
    csv = path if path.suffix == ".csv" else path / "labels.csv"
    if not csv.is_file() or not set(DERM7PT_COLUMNS) <= set(pd.read_csv(csv, nrows=0).columns):
        return None
    try:
        parts = _derm7pt_frames(csv)
    except ValueError:
        return None
    frame = pd.concat(parts.values())
    return {row["image_id"]: {c: int(row[c]) for c in CRITERIA_LABELS} for _, row in frame.iterrows()}


#: Subject metadata columns of the layouts that have them -> the project's names.
_METADATA_COLUMNS = {"sex": "sex", "age": "age", "age_approximate": "age", "localization": "site",
                     "anatom_site_general": "site"}
#: Age bands for subgroup metrics: (label, lowest age, highest age exclusive).
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<30", 0, 30), ("30-49", 30, 50), ("50-69", 50, 70), (">=70", 70, float("inf")),
)


def subject_metadata(data: str | Path) -> pd.DataFrame | None:
    """image_id -> sex, age_band, site of a HAM10000 or ISIC 2017 folder (columns it has); None
    when `data` has no such metadata. Missing or "unknown" values become "unknown"."""
    path = Path(data)
    candidates = [path] if path.suffix == ".csv" else [path / "HAM10000_metadata.csv", path / "labels.csv"]
    for csv in candidates:
        if not csv.is_file():
            continue
        frame = pd.read_csv(csv)
        present = {c: n for c, n in _METADATA_COLUMNS.items() if c in frame.columns}
        if "image_id" not in frame.columns or not present:
            continue
        out = frame[["image_id", *present]].rename(columns=present).set_index("image_id")
        if "age" in out.columns:
            age = pd.to_numeric(out.pop("age"), errors="coerce")
            band = pd.Series("unknown", index=out.index)
            for label, low, high in AGE_BANDS:
                band[(age >= low) & (age < high)] = label
            out["age_band"] = band
        for column in out.columns:
            values = out[column].fillna("unknown").astype(str).str.strip()
            out[column] = values.where(values != "", "unknown")
        return out
    return None


def _load_source(spec: SourceSpec) -> dict[str, pd.DataFrame]:
    if spec.kind == "derm7pt":
        return _load_derm7pt(spec)
    if spec.kind == "ham10000":
        dd = split_by_lesion(load_image_dataset(spec.data), spec.val_size, spec.test_size, spec.split_seed)
        return {name: _from_project_dataset(dd[name], spec) for name in SPLIT_NAMES}
    return {name: _from_project_dataset(load_image_dataset(spec.data, split=name), spec) for name in SPLIT_NAMES}


def load_sources(specs: Sequence[SourceSpec]) -> datasets.DatasetDict:
    """Every source's train/validation/test rows in one DatasetDict with a `source` column.

    Columns: image, image_id, lesion_id, source, label (dx index or -100) and one int64 column per
    extra head of `head_labels(specs)` (-100 where the row's source has no such label). Image ids
    and lesion ids are prefixed with the source name, so that sources never collide; the splits
    are checked for leakage.
    """
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise ValueError(f"sources need unique names, got {names}")
    heads = list(head_labels(specs))
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in SPLIT_NAMES}
    for spec in specs:
        for split, frame in _load_source(spec).items():
            frame = frame.copy()
            for head in heads:
                if head not in spec.heads or head not in frame:
                    frame[head] = IGNORE_INDEX
            if MAIN_HEAD not in spec.heads:
                frame["label"] = IGNORE_INDEX
            frame["source"] = spec.name
            frame["image_id"] = spec.name + "/" + frame["image_id"].astype(str)
            frame["lesion_id"] = [None if v is None or v == "" else f"{spec.name}/{v}" for v in frame["lesion_id"]]
            parts[split].append(frame[["image", "image_id", "lesion_id", "source", "label", *heads]])
            logger.info("source %s %s: %d images", spec.name, split, len(frame))
    features = _features(heads)
    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_pandas(pd.concat(frames, ignore_index=True), features=features, preserve_index=False)
            for split, frames in parts.items()
        }
    )
    check_no_leakage(dd)
    return dd


def source_manifest(dd: datasets.DatasetDict, specs: Sequence[SourceSpec]) -> dict:
    """What `write_manifest`-style JSON records for a multi-source run: per split, the image ids;
    per source, its split rule and sizes."""
    manifest: dict = {"method": "multi_source", "splits": list(dd)}
    manifest["sources"] = [
        {
            "name": s.name, "kind": s.kind, "data": s.data, "heads": s.heads, "weight": s.weight,
            "split": "split_by_lesion" if s.kind == "ham10000" else "official split column",
            **({"val_size": s.val_size, "test_size": s.test_size, "seed": s.split_seed} if s.kind == "ham10000" else {}),
            "sizes": {split: sum(1 for v in dd[split]["source"] if v == s.name) for split in dd},
        }
        for s in specs
    ]
    manifest["sizes"] = {name: len(ds) for name, ds in dd.items()}
    for name, ds in dd.items():
        manifest[name] = list(ds["image_id"])
    return manifest
