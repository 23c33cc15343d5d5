"""The one scoring service behind the page and REST: decode, score, rank, explain, build rows.

Results stay typed (`model.results.ImageResult` inside `BatchResult` / `Explained`); they become
JSON only at the boundary (REST responses, the Gradio JSON output) and CSV cells only through
`model.records`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from model.imageio import MAX_BYTES, InvalidImageError, load_image
from model.records import csv_safe, result_row
from model.catalogue import ModelCatalogue
from model.classifier import Classifier
from model.metadata_model import Metadata
from model.results import ImageResult

from .formatting import clip

# Images are downscaled to this side after decoding: every model input is far smaller, and it
# bounds memory for big uploads.
WORKING_SIDE = 1024
BATCH_CHUNK = 16
THUMB_SIDE = 160
# Every upload is decoded on this one thread: one decode at a time (each bounded by model.imageio),
# and its buffers come from one malloc arena that the next decode reuses, where decoding on the
# request, worker and Gradio threads would leave a freed full-size buffer in each thread's arena.
DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="melanoma-decode")


def read_image(source: Any, max_bytes: int = MAX_BYTES) -> Image.Image:
    """Every upload's decoder: `model.imageio.load_image` at the app's working size, on `DECODER`."""
    return DECODER.submit(load_image, source, max_bytes=max_bytes, max_side=WORKING_SIDE).result()


def held_bytes(image: Image.Image) -> int:
    """The memory a decoded image holds: Pillow keeps an RGB pixel in 4 bytes (RGBX), so a
    1024x768 working-size image holds 3 MiB whatever its file's size."""
    return image.width * image.height * 4


@dataclass(frozen=True)
class FileError:
    """A file that could not be used; the rest of the batch goes on."""

    name: str
    error: str


@dataclass
class BatchResult:
    """Many images scored by one model, in upload order.

    results: one per usable file; sources: each result's index among the inputs; errors: the
    files that could not be used; thumbnails: each result's thumbnail (when asked for).
    """

    model_id: str
    results: list[ImageResult]
    sources: list[int]
    errors: list[FileError]
    thumbnails: list[Image.Image] = field(default_factory=list)

    @property
    def ranking(self) -> list[int]:
        """Positions in `results` in display order: the lesions by P(melanoma), highest first (rank 1 =
        `ranking[0]`), then the images that are clearly not dermoscopy, unranked, in upload order."""
        lesions = [i for i, result in enumerate(self.results) if not result.warning]
        others = [i for i, result in enumerate(self.results) if result.warning]
        return sorted(lesions, key=lambda i: -(self.results[i].melanoma_probability or 0.0)) + others

    def ranks(self) -> list[tuple[int | None, int]]:
        """(rank, position in `results`) in display order; rank None for an image that is clearly not
        dermoscopy (its score means nothing, so it has no place among the lesions)."""
        return [(None if self.results[i].warning else rank, i) for rank, i in enumerate(self.ranking, start=1)]

    def rows(self) -> pd.DataFrame:
        """The batch table: one row per result in display order with the columns train/predict.py
        writes too (model.records), then one row per unusable file."""
        rows = [
            {"rank": rank, "file": self.results[i].name, **result_row(self.results[i]), "error": ""}
            for rank, i in self.ranks()
        ]
        rows += [{"rank": None, "file": error.name, "error": error.error} for error in self.errors]
        table = pd.DataFrame(rows)
        table["rank"] = table["rank"].astype("Int64")
        return table

    def write_csv(self, path: Path) -> None:
        """`rows()` as CSV, text cells neutralised against formula injection (model.records)."""
        self.rows().map(csv_safe).to_csv(path, index=False)


@dataclass
class Explained:
    """One image scored and explained: what the page shows and keeps (in gr.State) so that
    changing the opacity only re-blends, and changing the explanation options only re-explains.

    image: the decoded image at the working size (the upload's aspect ratio); mask: the
    explanation on the model's input grid, (h, w) in [0, 1]; method: how it was computed.
    """

    model_id: str
    result: ImageResult
    image: Image.Image
    mask: np.ndarray
    method: str


class ScoringService:
    """Scores uploads with the zoo's models for the page and REST alike.

    Args:
        zoo: the model zoo. max_upload_bytes: largest accepted file. tta_views: test-time views per
            image for a model with thresholds fitted for that many (`Classifier.views_for`), else one.
    """

    def __init__(self, zoo: ModelCatalogue, max_upload_bytes: int = MAX_BYTES, tta_views: int = 1):
        self.zoo, self.max_upload_bytes, self.tta_views = zoo, max_upload_bytes, tta_views

    def entry(self, model_id: str | None) -> Classifier:
        """The zoo's model (the default one for None or ""); raises `UnknownModelError`."""
        return self.zoo.get(model_id or None)

    def read(self, source: Any) -> Image.Image:
        """One upload (path or bytes) decoded at the working size; raises `InvalidImageError`."""
        return read_image(source, self.max_upload_bytes)

    def score(
        self,
        entry: Classifier,
        sources: Sequence[tuple[str, Any]],
        on_chunk: Callable[[int], None] | None = None,
        thumbnails: bool = False,
    ) -> BatchResult:
        """(name, source) pairs scored `BATCH_CHUNK` at a time: a path or bytes is decoded (`read`) as
        its chunk comes, so a batch of files never holds more than one chunk of decoded images; an
        image that `read` already decoded is scored as it is. `on_chunk(done)` reports progress."""
        chunks = self.score_chunks(entry, sources, thumbnails)
        while True:
            try:
                done = next(chunks)
            except StopIteration as stop:
                return stop.value
            if on_chunk is not None:
                on_chunk(done)

    def score_chunks(
        self, entry: Classifier, sources: Sequence[tuple[str, Any]], thumbnails: bool = False,
        patient: Metadata | None = None,
    ) -> Generator[int, None, BatchResult]:
        """`score` one chunk per step: yields the number of files done after each chunk and returns
        the `BatchResult` (the REST worker takes one step per client's turn). `patient`: age / sex /
        site of the person every image shows (REST /predict), for models with a metadata regression."""
        batch = BatchResult(entry.id, [], [], [])
        for start in range(0, len(sources), BATCH_CHUNK):
            chunk: list[tuple[int, str, Image.Image]] = []
            for index in range(start, min(start + BATCH_CHUNK, len(sources))):
                name, source = sources[index]
                try:
                    chunk.append((index, name, source if isinstance(source, Image.Image) else self.read(source)))
                except InvalidImageError as err:
                    batch.errors.append(FileError(clip(name), str(err)))
            if chunk:
                images = [image for _, _, image in chunk]
                views = entry.views_for(self.tta_views)
                predictions = entry.predict(images, tta=views)
                oods = self.zoo.check_ood(images)
                for (index, name, image), prediction, ood in zip(chunk, predictions, oods):
                    batch.results.append(entry.result(clip(name), prediction, ood, patient=patient, views=views))
                    batch.sources.append(index)
                    if thumbnails:
                        thumb = image.copy()
                        thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
                        batch.thumbnails.append(thumb)
            yield len(batch.results) + len(batch.errors)
        return batch

    def explain(
        self,
        entry: Classifier,
        name: str,
        image: Image.Image,
        head_fusion: str = "mean",
        discard_ratio: float = 0.9,
        start_layer: int = 0,
        patient: Metadata | None = None,
    ) -> Explained:
        """One image's result and explanation (rollout options clamped to the model's layers);
        raises ValueError for options the model refuses."""
        start_layer = min(int(start_layer), max(entry.num_layers - 1, 0))
        views = entry.views_for(self.tta_views)
        analysis = entry.analyze(image, head_fusion, float(discard_ratio), start_layer, tta=views)
        result = entry.result(clip(name), analysis, self.zoo.check_ood([image])[0], explanation=analysis.method,
                              patient=patient, views=views)
        return Explained(entry.id, result, image, analysis.mask, analysis.method)

    def overlay(self, explained: Explained, opacity: float = 0.5) -> np.ndarray:
        """The explanation over the image at the image's own geometry, (H, W, 3) uint8."""
        return self.entry(explained.model_id).explanation_overlay(explained.image, explained.mask, float(opacity))
