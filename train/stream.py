"""Images to score, streamed lazily from any data spec: the input side of train/predict.py.

`RecordSource(spec, split)` yields one `ImageRecord` per input row, in a fixed order, without
decoding anything (decoding is `model.imageio.load_image`'s job, in the data-loader workers):

- a CSV file with a `path` column (paths relative to the CSV; optional `image_id`/`case_id`/`id`
  and `dx`/`label`/`labels`/`diagnosis` columns; `split` picks rows by a `split` column), read in
  chunks, so a 100,000-row CSV never sits in memory;
- a folder `Dataset.save_to_disk` wrote, a Hub dataset id or a local folder `datasets.load_dataset`
  reads: memory-mapped Arrow, read in chunks (the first `datasets.Image` column; labels from a
  `dx` or class-label column when there is one);
- the labelled layouts `train.data.load_image_dataset` reads (HAM10000, ISIC 2017, class
  subfolders), through that function;
- any other folder: every image file under it (`train.data.IMAGE_EXTENSIONS`), sorted, unlabelled.

The source holds only the spec, so it pickles into data-loader workers, which each re-open it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pandas as pd

from .data import IMAGE_EXTENSIONS, is_labelled_layout, load_image_dataset, to_dx

logger = logging.getLogger(__name__)

CSV_CHUNK_ROWS = 4096
ARROW_CHUNK_ROWS = 256
ID_COLUMNS = ("image_id", "case_id", "id")
LABEL_COLUMNS = ("dx", "label", "labels", "diagnosis")
PATIENT_COLUMNS = ("patient_id", "patient")  # which person a lesion belongs to (predict.py's patient context)
# The patient's age / sex / anatomical site (model.metadata_model's optional inputs), by the names
# the sources use: the first present column of each tuple is read.
FIELD_COLUMNS = {
    "age": ("age", "age_approximate", "age_approx"),
    "sex": ("sex",),
    "site": ("site", "localization", "anatom_site_general", "anatom_site_general_challenge"),
}
SPLIT_ALIASES = {name: {"validation", "val", "valid"} for name in ("validation", "val", "valid")}


@dataclass(frozen=True)
class ImageRecord:
    """One input row, not yet decoded.

    index: 0-based position in the input: the key that shards rows over processes and that
        `--resume` skips. id: image id (from the data, else the file name without extension, else
        "row<index>"). path: the image file ("" for images stored as bytes in a dataset).
    label: the row's dx code when the data labels it (HAM10000 codes; ISIC 2017 / HAM10000 long
        names are mapped), else None. image: what `load_image` reads (a path, or a datasets
        `{"bytes", "path"}` value). patient: the person the lesion belongs to, when the data has a
        `patient_id` / `patient` column, else None. fields: the patient's (age, sex, site) as the
        data writes them ("" where a column is missing or empty), None when the data has none of them.
    """

    index: int
    id: str
    path: str
    label: str | None
    image: Any
    patient: str | None = None
    fields: tuple[str, str, str] | None = None


def field_columns(columns: Any) -> dict[str, str]:
    """field -> the data's column for it (`FIELD_COLUMNS`), for the fields the columns have."""
    found = {field: next((c for c in names if c in columns), None) for field, names in FIELD_COLUMNS.items()}
    return {field: column for field, column in found.items() if column is not None}


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()


def _dx_or_none(name: Any) -> str | None:
    if name is None or (isinstance(name, float) and name != name) or str(name).strip() == "":
        return None
    try:
        return to_dx(str(name))
    except KeyError:
        return None


class RecordSource:
    """The rows of one data spec, in input order (see the module docstring).

    Raises:
        ValueError: the spec does not exist or cannot be read; the message says what is accepted.
    """

    def __init__(self, spec: str | Path, split: str | None = None) -> None:
        self.spec, self.split = str(spec), split
        path = Path(self.spec).expanduser()
        if path.is_file():
            if path.suffix.lower() != ".csv":
                raise ValueError(f"{path} is a file but not a CSV; pass a CSV with a 'path' column, a folder or a dataset id")
            self.kind = "csv"
            columns = self._csv_columns()  # fail now, not in a worker
            if split is not None and "split" not in columns:
                raise ValueError(f"{path} has no 'split' column to pick --split {split!r} from; columns {columns}")
        elif path.is_dir() and is_labelled_layout(path):
            self.kind = "layout"
        elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            self.kind = "saved"
        elif path.is_dir() and next(self._image_files(path), None) is not None:
            self.kind = "images"
        else:
            self.kind = "dataset"  # a Hub id or a folder of data files for datasets.load_dataset
        if self.kind == "images" and split is not None:
            raise ValueError(f"{path} is a plain image folder: it has no splits to pick --split {split!r} from")
        self._length: int | None = None

    # ------------------------------------------------------------------------------- reading
    def __iter__(self) -> Iterator[ImageRecord]:
        if self.kind == "csv":
            yield from self._iter_csv()
        elif self.kind == "images":
            for index, file in enumerate(sorted(self._image_files(Path(self.spec)))):
                yield ImageRecord(index, file.stem, str(file), None, str(file))
        else:
            yield from self._iter_dataset(self._dataset())

    def __len__(self) -> int:
        if self._length is None:
            if self.kind == "csv":
                self._length = sum(len(chunk) for chunk in self._csv_chunks(usecols=["path"]))
            elif self.kind == "images":
                self._length = sum(1 for _ in self._image_files(Path(self.spec)))
            else:
                self._length = len(self._dataset())
        return self._length

    @staticmethod
    def _image_files(folder: Path) -> Iterator[Path]:
        return (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

    # ----------------------------------------------------------------------------------- CSV
    def _csv_chunks(self, usecols: list[str]) -> Iterator[pd.DataFrame]:
        """The CSV in chunks of rows (only `split`'s rows when a split is asked for)."""
        if self.split is None:
            yield from pd.read_csv(self.spec, dtype=str, keep_default_na=False, chunksize=CSV_CHUNK_ROWS, usecols=usecols)
            return
        wanted = SPLIT_ALIASES.get(self.split.lower(), {self.split.lower()})
        reader = pd.read_csv(self.spec, dtype=str, keep_default_na=False, chunksize=CSV_CHUNK_ROWS,
                             usecols=[*usecols, "split"])
        for chunk in reader:
            yield chunk[chunk["split"].str.strip().str.lower().isin(wanted)][usecols]

    def _csv_columns(self) -> list[str]:
        columns = list(pd.read_csv(self.spec, dtype=str, nrows=0).columns)
        if "path" not in columns:
            raise ValueError(f"{self.spec}: a CSV of images needs a 'path' column; found columns {columns}")
        return columns

    def _iter_csv(self) -> Iterator[ImageRecord]:
        columns = self._csv_columns()
        id_col = next((c for c in ID_COLUMNS if c in columns), None)
        label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
        patient_col = next((c for c in PATIENT_COLUMNS if c in columns), None)
        fields = field_columns(columns)
        # os.path, not pathlib, per row: pathlib interns every path component for good, so memory
        # would grow with the number of rows.
        root = os.path.dirname(self.spec)
        index = 0
        wanted = dict.fromkeys(c for c in ("path", id_col, label_col, patient_col, *fields.values()) if c)
        for chunk in self._csv_chunks(usecols=list(wanted)):
            for row in chunk.itertuples(index=False):
                values = row._asdict()
                raw = values["path"].strip()
                path = os.path.join(root, raw) if raw else ""
                stem = os.path.splitext(os.path.basename(raw))[0]
                image_id = values[id_col] if id_col and values[id_col] else stem or f"row{index}"
                label = _dx_or_none(values[label_col]) if label_col else None
                patient = values[patient_col].strip() or None if patient_col else None
                given = tuple(_text(values.get(fields[f])) if f in fields else "" for f in FIELD_COLUMNS) if fields else None
                yield ImageRecord(index, image_id, path, label, path, patient, given)
                index += 1

    # ------------------------------------------------------------------------ patient fields
    def _layout_fields(self) -> dict[str, tuple[str, str, str]] | None:
        """image_id -> (age, sex, site) from a HAM10000 / ISIC 2017 folder's metadata CSV, or None."""
        folder = Path(self.spec)
        for csv_path in (folder / "HAM10000_metadata.csv", folder / "labels.csv", folder / "metadata.csv"):
            if not csv_path.is_file():
                continue
            table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
            fields = field_columns(table.columns)
            if "image_id" in table.columns and fields:
                cells = [table[fields[f]].str.strip() if f in fields else pd.Series("", index=table.index) for f in FIELD_COLUMNS]
                return dict(zip(table["image_id"], zip(*cells)))
        return None

    def has_fields(self) -> bool:
        """Whether the rows carry the patient's age / sex / site (any of them): predict.py's header."""
        if self.kind == "csv":
            return bool(field_columns(self._csv_columns()))
        if self.kind == "images":
            return False
        return bool(field_columns(self._dataset().features)) or (self.kind == "layout" and bool(self._layout_fields()))

    # ------------------------------------------------------------------------------ datasets
    def _dataset(self) -> datasets.Dataset:
        if self.kind == "layout":
            return load_image_dataset(self.spec, split=self.split, verify=False)
        try:
            if self.kind == "saved":
                loaded = datasets.load_from_disk(self.spec)
            else:
                loaded = datasets.load_dataset(self.spec, split=self.split)
        except Exception as err:  # offline Hub, unknown id or split, unreadable folder
            raise ValueError(
                f"could not read {self.spec!r} ({type(err).__name__}: {err}); expected a CSV with a 'path' column, "
                "an image folder, a HAM10000 / ISIC 2017 folder, a save_to_disk folder or a Hub dataset id"
            ) from err
        if isinstance(loaded, datasets.DatasetDict):
            name = self.split or (next(iter(loaded)) if len(loaded) == 1 else None)
            if name not in loaded:
                raise ValueError(f"{self.spec} has splits {sorted(loaded)}: pass --split with one of them")
            loaded = loaded[name]
        return loaded

    def _iter_dataset(self, ds: datasets.Dataset) -> Iterator[ImageRecord]:
        image_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
        if image_col is None:
            raise ValueError(f"{self.spec}: no column with a datasets.Image feature; columns: {list(ds.features)}")
        label_col = next((c for c in LABEL_COLUMNS if c in ds.features), None)
        id_col = next((c for c in ID_COLUMNS if c in ds.features), None)
        patient_col = next((c for c in PATIENT_COLUMNS if c in ds.features), None)
        label_feature = ds.features.get(label_col)
        fields = field_columns(ds.features)
        layout_fields = self._layout_fields() if self.kind == "layout" and not fields else None
        raw = ds.select_columns(list(dict.fromkeys(c for c in (image_col, id_col, label_col, patient_col, *fields.values()) if c)))
        raw = raw.cast_column(image_col, datasets.Image(decode=False)).with_format(None)
        index = 0
        for chunk in raw.iter(batch_size=ARROW_CHUNK_ROWS):
            for i, value in enumerate(chunk[image_col]):
                path = (value or {}).get("path") or ""
                image_id = chunk[id_col][i] if id_col else None
                label = chunk[label_col][i] if label_col else None
                if isinstance(label_feature, datasets.ClassLabel) and label is not None:
                    label = label_feature.int2str(int(label))
                stem = os.path.splitext(os.path.basename(path))[0]
                patient = str(chunk[patient_col][i]).strip() or None if patient_col and chunk[patient_col][i] is not None else None
                record_id = str(image_id or stem or f"row{index}")
                given = None
                if fields:
                    given = tuple(_text(chunk[fields[f]][i]) if f in fields else "" for f in FIELD_COLUMNS)
                elif layout_fields is not None:
                    given = layout_fields.get(record_id, ("", "", ""))
                yield ImageRecord(index, record_id, path, _dx_or_none(label), value or b"", patient, given)
                index += 1
