#!/usr/bin/env python
"""Score a whole image collection with one model: predictions.csv ranked by P(melanoma), optionally
an offline HTML report. Research/education tool: a ranking by a model's score, not a diagnosis.

    accelerate launch train/predict.py --model models/efficientnet-lite2 --data ../shared/data/isic2017 \
        --split test --output_dir runs/predict/isic2017_test --report --explain 8
    python train/predict.py --model models/melanoma-vit --data my_images/ --output_dir out --tta 4 --resume

--data is a folder of images, a CSV with a `path` column, a `save_to_disk` folder, a Hub dataset id
(or a local folder `datasets.load_dataset` reads), or a HAM10000 / ISIC 2017 / class-folder layout
(train/stream.py). Rows are streamed and decoded by `model.imageio.load_image` (the app's decoder
and error messages) in the data-loader workers; an unreadable image becomes a row with `error`
set. Row i goes to process i % num_processes; each process appends its rows to
`parts/rank-<r>.csv` as it goes (what `--resume` skips), and when every process is done the main
process merges the parts into `predictions.csv`: scored rows ranked by P(melanoma) (rank 1 =
highest), then the error rows. The output folder must be visible to every process (one machine,
or a shared disk). Columns: rank, index (input row), id, path, label (dx code when the data has
labels), patient, the model's columns (`model.records.result_columns`), error.

When the model has an age / sex / site regression (`model.metadata_model`, fitted by
train/fit_metadata.py) and the data records any of those fields (columns age / age_approximate,
sex, site / localization / anatom_site_general; a HAM10000 or ISIC 2017 folder's own metadata),
the rows also get age, sex, site (as given), melanoma_probability_with_metadata,
above_threshold_with_metadata (its own validation threshold) and metadata_error (a value the model
cannot read; the image is still scored). The ranking stays by the image's P(melanoma).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a script, Python puts train/ first on sys.path, where train/train.py shadows the `train`
    # package: drop that entry (what `python -P` does).
    del sys.path[0]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder or Hub id (AutoModelForImageClassification)")
    parser.add_argument("--data", required=True, help="image folder, CSV with a path column, dataset folder or Hub id")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="predictions.csv, parts/, report.html")
    parser.add_argument("--split", default=None, help="split of a dataset / ISIC 2017 folder (default: all rows)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2, help="data-loader workers per process (0 = main)")
    parser.add_argument("--tta", type=int, default=1, help="test-time views (dihedral, 1-8), probabilities averaged")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N input rows")
    parser.add_argument("--resume", action="store_true", help="skip rows already written to output_dir/parts")
    parser.add_argument("--report", action="store_true", help="also write report.html (self-contained)")
    parser.add_argument("--top_k", type=int, default=48, help="images shown in the report")
    parser.add_argument("--explain", type=int, default=0, metavar="K",
                        help="explanation overlays (rollout / Grad-CAM) of the K highest-ranked images")
    parser.add_argument("--ood", default=None, help="not-dermoscopy detector folder (default models/ood-detector; "
                        "'none' turns the check off)")
    parser.add_argument("--max_side", type=int, default=1024,
                        help="decode images down to this side first, as the app does (0 = full size)")
    parser.add_argument("--num_threads", type=int, default=None, help="torch (and ONNX Runtime) threads per process")
    parser.add_argument("--backend", default="auto",
                        help="auto (default): the folder's fastest measured backend that meets the accuracy bar (onnx/export.json); "
                        "onnx / onnx-int8: its ONNX graphs on ONNX Runtime (CPU); torch: PyTorch. Explanations: PyTorch")
    parser.add_argument("--cpu", action="store_true",
                        help="run on the CPU even with a GPU; several CPU processes need a distributed launch "
                        "(`accelerate launch --multi_gpu --num_processes N ... --cpu`, or torchrun)")
    args = parser.parse_args(argv)
    if not 1 <= args.tta <= 8:
        parser.error(f"--tta must be in 1..8 (the dihedral views), got {args.tta}")
    for name in ("batch_size", "top_k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.limit is not None and args.limit < 0 or args.explain < 0 or args.num_workers < 0:
        parser.error("--limit, --explain and --num_workers must be >= 0")
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # --help answers before torch is imported

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import model as _melanoma_models  # noqa: E402,F401  registers MelanomaViT with the Auto classes
from model.imageio import load_image  # noqa: E402
from model.ood import (  # noqa: E402
    DEFAULT_OOD_PATH, NOT_DERMOSCOPY, OODDetector, create_feature_extractor, load_ood_detector,
)
from model.ood import preprocess as ood_preprocess  # noqa: E402
from model.metadata_model import Metadata, MetadataError  # noqa: E402
from model.records import csv_safe, result_columns, result_row  # noqa: E402
from model.classifier import Classifier  # noqa: E402
from train.stream import ImageRecord, RecordSource  # noqa: E402

logger = logging.getLogger("predict")

PARTS = "parts"
PREDICTIONS = "predictions.csv"
ROW_COLUMNS = ("rank", "index", "id", "path", "label", "patient")
# With a model that has an age / sex / site regression (model.metadata_model) and data that records
# any of those fields: the fields as given, P(mel) with them, its flag, and why a value was not read.
FIELD_COLUMNS = ("age", "sex", "site")
WITH_METADATA_COLUMNS = ("melanoma_probability_with_metadata", "above_threshold_with_metadata", "metadata_error")
# Added after ranking when the data names patients: the lesion among its patient's lesions.
PATIENT_CONTEXT_COLUMNS = ("patient_lesions", "patient_rank", "patient_relative_logit")


# ------------------------------------------------------------------------------------- input


class ImageStream(IterableDataset):
    """One process's rows of a `RecordSource` (row i: process i % world), decoded and preprocessed
    in the data-loader workers (this process's j-th row: worker j % num_workers).

    Yields dicts: record, error ("" or the decoder's message), pixel_values (3, H, W) for the
    model and ood_pixel_values (3, S, S) for the detector (None where not computed).
    """

    def __init__(self, source: RecordSource, processor: Any, ood_size: int | None, max_side: int | None,
                 rank: int = 0, world: int = 1, done: frozenset[int] = frozenset(), limit: int | None = None) -> None:
        self.source, self.processor, self.ood_size, self.max_side = source, processor, ood_size, max_side
        self.rank, self.world, self.done, self.limit = rank, world, done, limit

    def records(self) -> Iterator[ImageRecord]:
        """This process's rows still to score, in input order."""
        for record in self.source:
            if self.limit is not None and record.index >= self.limit:
                return
            if record.index % self.world == self.rank and record.index not in self.done:
                yield record

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j, record in enumerate(self.records()):
            if j % workers == worker:
                yield self.decode(record)

    def decode(self, record: ImageRecord) -> dict[str, Any]:
        item: dict[str, Any] = {"record": record, "error": "", "pixel_values": None, "ood_pixel_values": None}
        try:
            image = load_image(record.image, max_side=self.max_side)
            item["pixel_values"] = self.processor(images=[image], return_tensors="pt")["pixel_values"][0]
            if self.ood_size is not None:
                item["ood_pixel_values"] = ood_preprocess([image], self.ood_size)[0]
        except Exception as err:  # a bad image is an error row, never a crash; InvalidImageError says why
            item["error"] = str(err) or type(err).__name__
        return item


@dataclass
class Batch:
    """Decoded rows: `scored` (decoded images, in the order of `pixel_values`) and `failed` (with
    their error messages)."""

    scored: list[ImageRecord]
    pixel_values: torch.Tensor | None  # (B, 3, H, W)
    ood_pixel_values: torch.Tensor | None  # (B, 3, S, S)
    failed: list[tuple[ImageRecord, str]]


def collate(items: list[dict[str, Any]]) -> Batch:
    ok = [item for item in items if not item["error"]]
    stack = lambda key: torch.stack([item[key] for item in ok]) if ok and ok[0][key] is not None else None  # noqa: E731
    return Batch([item["record"] for item in ok], stack("pixel_values"), stack("ood_pixel_values"),
                 [(item["record"], item["error"]) for item in items if item["error"]])


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode and resize; the model's threads are the main process's


# ------------------------------------------------------------------------------------ output


def columns_for(entry: Classifier, fields: bool = False) -> list[str]:
    """predictions.csv's header for `entry`; `fields`: the data records age / sex / site and the
    model can use them (`uses_fields`)."""
    if fields:
        return [*ROW_COLUMNS, *FIELD_COLUMNS, *result_columns(entry), *WITH_METADATA_COLUMNS, "error"]
    return [*ROW_COLUMNS, *result_columns(entry), "error"]


def uses_fields(entry: Classifier, source: RecordSource) -> bool:
    return entry.metadata_model is not None and source.has_fields()


def patient_fields(record: ImageRecord) -> tuple[Metadata | None, str]:
    """The record's age / sex / site read for the model, or (None, why not) for a value it refuses."""
    if record.fields is None:
        return None, ""
    try:
        return Metadata.parse(*record.fields), ""
    except MetadataError as err:
        return None, str(err)


def with_metadata_cells(record: ImageRecord, result: Any) -> dict[str, Any]:
    """The FIELD_COLUMNS and WITH_METADATA_COLUMNS cells of one scored row."""
    given = record.fields or ("", "", "")
    cells: dict[str, Any] = {name: csv_safe(value) for name, value in zip(FIELD_COLUMNS, given)}
    patient, problem = patient_fields(record)
    score = result.with_metadata if result is not None and not result.warning else None
    cells.update({
        "melanoma_probability_with_metadata": score.probability if score else None,
        "above_threshold_with_metadata": score.above_threshold if score else None,
        "metadata_error": csv_safe(problem),
    })
    return cells


def _record_cells(record: ImageRecord) -> dict[str, Any]:
    return {"index": record.index, "id": csv_safe(record.id), "path": csv_safe(record.path), "label": record.label,
            "patient": csv_safe(record.patient or "")}


def read_parts(output_dir: Path, columns: list[str]) -> pd.DataFrame:
    """Every row already written to output_dir/parts (all columns as text; empty when none).

    Raises:
        ValueError: a part has another header (another model's predictions).
    """
    frames = []
    for part in sorted((output_dir / PARTS).glob("rank-*.csv")):
        frame = pd.read_csv(part, dtype=str, keep_default_na=False)
        if list(frame.columns) != columns:
            raise ValueError(
                f"{part} holds predictions with other columns (another model?); use a fresh --output_dir "
                "or delete it to start over"
            )
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True).drop_duplicates("index", keep="first")


def _drop_partial_line(path: Path) -> None:
    """Cut a row a killed run left half-written (no final newline); that row is scored again."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class PartWriter:
    """Appends one process's rows to output_dir/parts/rank-<r>.csv, flushed after every batch."""

    def __init__(self, output_dir: Path, rank: int, columns: list[str]) -> None:
        path = output_dir / PARTS / f"rank-{rank}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file() or path.stat().st_size == 0
        self.file = path.open("a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=columns)
        if new:
            self.writer.writeheader()

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.writer.writerows(rows)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def rank_predictions(parts: pd.DataFrame) -> pd.DataFrame:
    """Scored rows by P(melanoma), highest first (ties: input order), ranked 1..n; then the images
    that are clearly not dermoscopy (their score means nothing: no rank); then the error rows."""
    p_mel = pd.to_numeric(parts["melanoma_probability"], errors="coerce")
    failed = parts["error"] != ""
    unranked = parts["ood_level"] == NOT_DERMOSCOPY if "ood_level" in parts else pd.Series(False, parts.index)
    order = pd.DataFrame({
        "group": failed.astype(int) * 2 + (unranked & ~failed).astype(int),
        "p": -p_mel.fillna(float("-inf")).where(~unranked, 0.0),
        "index": parts["index"].astype(int),
    }).sort_values(["group", "p", "index"], kind="stable").index
    ranked = parts.loc[order].reset_index(drop=True)
    lesions = ranked["error"] == ""
    if "ood_level" in ranked:
        lesions &= ranked["ood_level"] != NOT_DERMOSCOPY
    ranked["rank"] = ""
    ranked.loc[lesions, "rank"] = [str(r) for r in range(1, int(lesions.sum()) + 1)]
    if "patient" in ranked and (ranked["patient"] != "").any():
        ranked = add_patient_context(ranked, lesions)
    return ranked


def add_patient_context(ranked: pd.DataFrame, lesions: pd.Series) -> pd.DataFrame:
    """The "ugly duckling" sign (a lesion unlike the same patient's others), as three columns before
    `error`, for ranked lesions whose row names a patient:

    - patient_lesions: how many ranked lesions the patient has;
    - patient_rank: the lesion's rank by P(melanoma) among them (1 = the patient's most suspicious);
    - patient_relative_logit: logit P(mel) minus the median logit of the patient's other lesions
      (> 0: more suspicious than the rest of that patient's lesions; empty with a single lesion).

    A screening aid to read beside P(mel), not a diagnosis: a patient's only atypical lesion stands
    out here even when its P(mel) is below the model's threshold.
    """
    ranked = ranked.copy()
    cells = {name: pd.Series("", index=ranked.index) for name in PATIENT_CONTEXT_COLUMNS}
    p = pd.to_numeric(ranked["melanoma_probability"], errors="coerce").clip(1e-6, 1 - 1e-6)
    logit = np.log(p / (1 - p))
    mine = lesions & (ranked["patient"] != "") & p.notna()
    for _, rows in ranked[mine].groupby("patient", sort=False).groups.items():
        rows = list(rows)  # already in rank order: highest P(mel) first
        cells["patient_lesions"][rows] = str(len(rows))
        cells["patient_rank"][rows] = [str(r) for r in range(1, len(rows) + 1)]
        if len(rows) > 1:
            z = logit[rows].to_numpy()
            others = [np.median(np.delete(z, i)) for i in range(len(rows))]
            cells["patient_relative_logit"][rows] = [f"{z[i] - others[i]:.3f}" for i in range(len(rows))]
    at = list(ranked.columns).index("error")
    for offset, name in enumerate(PATIENT_CONTEXT_COLUMNS):
        ranked.insert(at + offset, name, cells[name])
    return ranked


# ----------------------------------------------------------------------------------- scoring


def score_batch(entry: Classifier, detector: OODDetector | None, batch: Batch, tta: int,
                fields: bool = False) -> list[dict[str, Any]]:
    """The CSV rows of one batch: calibrated probabilities averaged over `tta` dihedral views; with
    `fields`, also P(mel) with each row's age / sex / site (`columns_for`)."""
    rows = [{**_record_cells(record), **(with_metadata_cells(record, None) if fields else {}), "error": csv_safe(error)}
            for record, error in batch.failed]
    if not batch.scored:
        return rows
    predictions = entry.predict_pixel_values(batch.pixel_values, tta)
    oods = detector.score_pixel_values(batch.ood_pixel_values) if detector is not None else [None] * len(predictions)
    for record, prediction, ood in zip(batch.scored, predictions, oods):
        result = entry.result(record.id, prediction, ood, patient=patient_fields(record)[0] if fields else None,
                              views=tta)
        extra = with_metadata_cells(record, result) if fields else {}
        rows.append({**_record_cells(record), **result_row(result), **extra, "error": ""})
    return rows


def load_detector(path: str | None, device: torch.device) -> OODDetector | None:
    """The not-dermoscopy detector (the app's), its backbone on `device`; None for 'none'."""
    if path is not None and path.lower() == "none":
        return None
    return load_ood_detector(path or DEFAULT_OOD_PATH, backbone=create_feature_extractor().to(device))


def model_id(source: str) -> str:
    """The zoo's id of a model: its folder name, or the Hub id."""
    return Path(source).name if Path(source).is_dir() else source


def _own_rows(total: int, rank: int, world: int, done: set[int]) -> int:
    return len(range(rank, total, world)) - sum(1 for i in done if i < total and i % world == rank)


def predict(args: argparse.Namespace, accelerator: Accelerator) -> pd.DataFrame | None:
    """Score this process's rows into its part file; on the main process return the merged, ranked
    table (also written to predictions.csv), elsewhere None."""
    output_dir = Path(args.output_dir)
    source = RecordSource(args.data, args.split)
    entry = Classifier(args.model, accelerator.device, model_id=model_id(args.model), backend=args.backend)
    detector = load_detector(args.ood, accelerator.device)
    fields = uses_fields(entry, source)
    columns = columns_for(entry, fields)
    if not args.resume and (output_dir / PARTS).is_dir() and any((output_dir / PARTS).iterdir()):
        raise FileExistsError(f"{output_dir / PARTS} already holds predictions: pass --resume, or a fresh --output_dir")
    if args.resume and accelerator.is_main_process:
        for part in (output_dir / PARTS).glob("rank-*.csv"):
            _drop_partial_line(part)
    accelerator.wait_for_everyone()
    done = set(read_parts(output_dir, columns)["index"].astype(int)) if args.resume else set()
    accelerator.wait_for_everyone()  # every process has read the parts before any appends
    rank, world = accelerator.process_index, accelerator.num_processes
    total = len(source) if args.limit is None else min(len(source), args.limit)
    stream = ImageStream(source, entry.processor, detector.image_size if detector else None, args.max_side or None,
                         rank, world, frozenset(done), args.limit)
    loader = DataLoader(stream, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers,
                        worker_init_fn=_worker_init if args.num_workers else None)
    writer = PartWriter(output_dir, rank, columns)
    progress = tqdm(total=_own_rows(total, rank, world, done), desc=f"predict ({world} process(es))", unit="img",
                    disable=not accelerator.is_main_process)
    start, n_rows = time.perf_counter(), 0
    try:
        for batch in loader:
            writer.write(score_batch(entry, detector, batch, args.tta, fields))
            n_rows += len(batch.scored) + len(batch.failed)
            progress.update(len(batch.scored) + len(batch.failed))
    finally:
        writer.close()
        progress.close()
    loops = gather_object([(n_rows, time.perf_counter() - start)])  # (rows, seconds) of every process
    if not accelerator.is_main_process:
        return None
    rows, seconds = sum(n for n, _ in loops), max(s for _, s in loops)
    logger.info("scoring loop: %d rows in %.2f s = %.2f img/s (decode + preprocess + forward + write, %d process(es))",
                rows, seconds, rows / seconds if seconds else float("nan"), world)
    ranked = rank_predictions(read_parts(output_dir, columns))
    ranked.to_csv(output_dir / PREDICTIONS, index=False)
    n_failed = int((ranked["error"] != "").sum())
    logger.info("%d images scored, %d unreadable: %s", len(ranked) - n_failed, n_failed, output_dir / PREDICTIONS)
    if args.report or args.explain:
        from train.report import write_outputs

        write_outputs(ranked, source, entry, args, output_dir)
    return ranked


def main(argv: Sequence[str] | None = None) -> pd.DataFrame | None:
    args = parse_args(argv) if argv is not None or __name__ != "__main__" else ARGS
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator(cpu=args.cpu)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return predict(args, accelerator)


if __name__ == "__main__":
    main()
