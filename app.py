"""Melanoma classification demo: Gradio UI + REST API (glue only; the ML lives in model/).

RESEARCH AND EDUCATION DEMO - NOT A MEDICAL DEVICE. It does not diagnose, screen for or rule
out skin cancer.

Run: `python app.py` serves on http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
respected, e.g. 0.0.0.0 on Hugging Face Spaces), offline, with the models under `models/`.

- Gradio UI at `/` with named API endpoints `/predict` (one image) and `/predict_batch`.
- REST (OpenAPI docs at `/docs`): `GET /public_models`, `POST /predict?model_id=`,
  `POST /predict_bulk?model_id=`, `GET /from_task/{task_uuid}`.

Environment: MELANOMA_MODELS_DIR, MELANOMA_HUB_MODELS, MELANOMA_DEFAULT_MODEL (see model/zoo.py),
MELANOMA_OOD_PATH (out-of-distribution detector folder; "none" disables it),
MELANOMA_MAX_QUEUED_IMAGES (REST queue size in images, default 2000), MELANOMA_TASK_TTL_S (default
3600), MELANOMA_MAX_REQUEST_BYTES (largest bulk request body, default 256 MiB), MELANOMA_CACHE_TTL_S
(seconds uploads, thumbnails and CSVs are kept, default 3600), MELANOMA_ALLOWED_ORIGINS (comma-separated
origins whose browser pages may POST here; same-origin pages always may).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import yaml
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from PIL import Image, ImageOps
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from model.imageio import MAX_BYTES, InvalidImageError, format_bytes, load_image
from model.metrics_schema import HEADLINE_TYPES
from model.records import csv_safe, result_row
from model.sevenpoint import SEVEN_POINT
from model.zoo import HeadResults, ImageResult, ModelZoo, UnknownModelError, ZooModel

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
EXAMPLES_FILE = ROOT / "assets" / "examples.yaml"
# Images are downscaled to this side after decoding: every model input is far smaller, and it
# bounds memory for big uploads.
WORKING_SIDE = 1024
BATCH_CHUNK = 16
MAX_BULK_FILES = 1000  # also Starlette's default multipart `max_files`: one more gets our 413
MAX_QUEUED_IMAGES = 2000  # REST queue bound, in images (>= MAX_BULK_FILES, so any bulk fits)
MAX_REQUEST_BYTES = 256 * 2**20  # largest bulk request body
MULTIPART_OVERHEAD = 64 * 2**10  # a single-file request body: the file plus this
# Every upload is decoded on this one thread: one decode at a time (each bounded by model.imageio),
# and its buffers come from one malloc arena that the next decode reuses, where decoding on the
# request, worker and Gradio threads would leave a freed full-size buffer in each thread's arena.
DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="melanoma-decode")
MAX_ECHO = 120  # longest user-supplied text (file name, id) echoed back
# OWASP CSV injection: a cell starting with one of these is a formula to spreadsheet programs.
THUMB_SIDE = 160
ABOVE_COLOUR, BELOW_COLOUR, OOD_COLOUR = (220, 30, 30), (30, 90, 220), (150, 150, 150)

# How every shipped threshold was set (train/evaluate.py, TARGET_SENSITIVITY).
THRESHOLD_RULE = "chosen on validation for 95% melanoma sensitivity"
DISCLAIMER = (
    "**Research and education demo, not a medical device.** It does not diagnose, screen for "
    "or rule out skin cancer, and its scores are not validated for clinical use. Anyone worried "
    "about a skin lesion should see a dermatologist."
)
API_DESCRIPTION = (
    "RESEARCH AND EDUCATION DEMO, NOT A MEDICAL DEVICE: results must not be used for diagnosis.\n\n"
    "Classifies dermoscopic skin-lesion images into the 7 HAM10000 classes (dx codes) and reports "
    "the melanoma probability P(mel) against the model's calibrated threshold. Submit images with "
    "`POST /predict` or `POST /predict_bulk` (multipart), then poll `GET /from_task/{task_uuid}`. "
    "Multi-source models also return `heads` (each extra head's calibrated probabilities) and "
    "`seven_point` (the expected seven-point-checklist score estimated from the criterion heads)."
)


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """User-supplied text as echoed back: at most `limit` characters."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------- task store
class QueueFullError(RuntimeError):
    """The bounded REST queue is full; the client should retry later."""


class TaskStore:
    """Background REST work: a queue bounded in images in front of one worker, results kept a while.

    Admission comes first: `reserve(n)` claims room for n images before a request's files are
    decoded, `submit(fn, n)` queues the work on that claim, `release(n)` returns an unused one.

    Args:
        max_images: images queued or running at once; more -> `QueueFullError` (HTTP 503).
        ttl_s: seconds a finished task's result is kept.
        max_tasks: most tasks remembered; the oldest finished ones are dropped first.
        workers: worker threads (1: the CPU is the bottleneck, threads would only contend).
    """

    def __init__(self, max_images: int = MAX_QUEUED_IMAGES, ttl_s: float = 3600.0, max_tasks: int = 1000, workers: int = 1):
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="melanoma-task")
        self.max_images = max_images
        self._queued_images = 0
        self._lock = threading.Lock()
        self._tasks: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.ttl_s, self.max_tasks = ttl_s, max_tasks

    @property
    def queued_images(self) -> int:
        with self._lock:
            return self._queued_images

    def reserve(self, n_images: int) -> None:
        """Claim room for `n_images`, or raise `QueueFullError`."""
        with self._lock:
            if self._queued_images + n_images > self.max_images:
                raise QueueFullError(
                    f"The queue holds {self._queued_images} of at most {self.max_images} images; retry in a few seconds."
                )
            self._queued_images += n_images

    def release(self, n_images: int) -> None:
        with self._lock:
            self._queued_images -= n_images

    def _prune(self) -> None:
        now = time.monotonic()
        finished = [k for k, t in self._tasks.items() if t["status"] != "pending"]
        for key in finished:
            if now - self._tasks[key]["finished_at"] > self.ttl_s:
                del self._tasks[key]
        for key in [k for k, t in self._tasks.items() if t["status"] != "pending"]:
            if len(self._tasks) <= self.max_tasks:
                break
            del self._tasks[key]

    def submit(self, fn: Callable[[], dict[str, Any]], n_images: int) -> str:
        """Queue `fn` (returns the task's result dict) on a `reserve(n_images)` claim; returns the uuid."""
        task_uuid = str(uuid.uuid4())
        with self._lock:
            self._prune()
            self._tasks[task_uuid] = {"status": "pending", "finished_at": None}

        def run() -> None:
            try:
                result = {"status": "done", **fn()}
            except Exception as err:  # reported to the client, the worker keeps serving
                logger.exception("Task %s failed", task_uuid)
                result = {"status": "failed", "detail": str(err)}
            finally:
                self.release(n_images)
            with self._lock:
                self._tasks[task_uuid] = {**result, "finished_at": time.monotonic()}

        self._executor.submit(run)
        return task_uuid

    def get(self, task_uuid: str) -> dict[str, Any] | None:
        with self._lock:
            self._prune()
            task = self._tasks.get(task_uuid)
        if task is None:
            return None
        return {k: v for k, v in task.items() if k != "finished_at"}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# -------------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class FileError:
    """A file that could not be used; the rest of the batch goes on."""

    name: str
    error: str


@dataclass
class BatchState:
    """The batch tab's state: ranked results and the path each was read from (names may repeat)."""

    model_id: str
    results: list[ImageResult]
    paths: list[str]


def _ood_markdown(result: ImageResult) -> str:
    return (
        "## Warning: this is probably not a dermoscopic skin-lesion image\n"
        f"{result.warning}\n\n"
        "The classifier was only trained on dermoscopy; its scores are **not meaningful** for "
        "this image, so no melanoma flag is shown and the class scores are collapsed."
    )


def percent(probability: float) -> str:
    """The page's one way to show a probability (0-1): percent, one decimal. CSV and JSON keep 0-1."""
    return f"{probability:.1%}"


def percent_value(probability: float | None) -> float | None:
    """`percent` as a number, for table columns that must sort numerically."""
    return None if probability is None or pd.isna(probability) else float(percent(probability)[:-1])


def verdict_markdown(result: ImageResult) -> str:
    """The risk statement for one result: a clear OOD warning replaces the flag; a borderline one
    adds a caution under it."""
    if result.warning:
        return _ood_markdown(result)
    caution = f"\n\n**Caution:** {result.caution}" if result.caution else ""
    p_mel, threshold = result.melanoma_probability, result.melanoma_threshold
    if p_mel is None:
        return f"Top class: **{result.label_name}** ({percent(result.probability)}). This model has no melanoma class."
    if result.melanoma:
        flag = f"**Above** the model's melanoma threshold of {percent(threshold)} ({THRESHOLD_RULE}): this demo would flag it for a closer look."
    else:
        flag = f"**Below** the model's melanoma threshold of {percent(threshold)} ({THRESHOLD_RULE})."
    return (
        f"### Melanoma probability: {percent(p_mel)}\n{flag}{caution}\n\n"
        f"Top class: {result.label_name} ({percent(result.probability)}). "
        "_Research demo output, not a diagnosis._"
    )


def _readable(name: str) -> str:
    return name.replace("_", " ")


def criteria_markdown(heads: HeadResults) -> str:
    """One image's extra heads: the seven-point criteria table (with every criterion head), then the
    other heads' probabilities, framed as a model's estimates."""
    seven = heads.seven_point
    lines = []
    if seven is not None:
        side = "at or above" if seven.suggests_melanoma else "below"
        lines += [
            "#### Dermoscopic criteria (seven-point checklist)",
            "| Criterion: melanoma-specific pattern | Probability | Points |",
            "|---|---|---|",
        ]
        for criterion, (label, points) in SEVEN_POINT.items():
            pattern = f"{_readable(criterion).capitalize()}: {_readable(label)}"
            lines.append(f"| {pattern} | {percent(seven.criteria[criterion])} | {points} |")
        lines += [
            "",
            f"Expected checklist score **{seven.score:.2f}** of 10: {side} the checklist's melanoma cut-off "
            f"of {seven.threshold}.",
        ]
    other = {name: p for name, p in heads.probabilities.items() if seven is None or name not in SEVEN_POINT}
    if other:
        shown = "; ".join(
            f"`{name}`: " + ", ".join(f"{_readable(label)} {percent(p)}" for label, p in probs.items())
            for name, probs in other.items()
        )
        lines += ["", f"Other heads: {shown}."]
    lines += ["", "_A model's estimates, not a dermatologist's reading; research demo output, not a diagnosis._"]
    return "\n".join(lines)


def readable_probabilities(entry: ZooModel, probabilities: dict[str, float]) -> dict[str, float]:
    return {entry.labels.get(code, code): p for code, p in probabilities.items()}


def probabilities_markdown(entry: ZooModel, probabilities: dict[str, float], title: str = "Class probabilities") -> str:
    """Every class, highest first, in the page's one unit (gr.Label would round to whole percents)."""
    ranked = sorted(readable_probabilities(entry, probabilities).items(), key=lambda item: -item[1])
    rows = "\n".join(f"| {name} | {percent(p)} |" for name, p in ranked)
    return f"#### {title}\n| Class | P |\n|---|---:|\n{rows}"  # a short header: one line at phone width


def _temperature_text(info: dict) -> str:
    if info["folded_temperature"] is not None:
        return f"temperature {info['folded_temperature']:.3g} (folded into the classifier head)"
    return f"temperature {info['temperature']:.3g}"


def model_details_markdown(entry: ZooModel) -> str:
    """The model's facts as a two-column table: what it is, its calibration and threshold, where it
    comes from, and its headline metrics (model/metrics_schema.py's table picks which)."""
    info = entry.describe()
    no_card_value = "see the model card" if info["license"] else "not stated (no model card)"
    rows = [
        ("Architecture", f"`{info['net_type']}`"),
        ("Parameters", f"{info['num_parameters'] / 1e6:.2f} M"),
        ("Input", f"{info['img_size']}x{info['img_size']} px"),
        ("Classes", str(info["out_dim"])),
        ("Explanation", info["explanation"]),
        ("Calibration", _temperature_text(info)),
        ("Melanoma threshold", f"{percent(info['melanoma_threshold'])} on P(mel), {THRESHOLD_RULE}"),
        ("Training data", ", ".join(info["datasets"]) or no_card_value),
        ("License", info["license"] or no_card_value),
    ]
    if info["base_model"]:
        rows.append(("Base model", info["base_model"]))
    if info["extra_heads"]:
        heads = [f"`{name}`" for name in info["extra_heads"] if not (entry.has_seven_point and name in SEVEN_POINT)]
        if entry.has_seven_point:
            heads.insert(0, "the seven-point checklist criteria")
        rows.append(("Extra heads", f"{', '.join(heads)} (shown with each single-image result)"))
    headline = [m for m in info["metrics"] if m["type"] in HEADLINE_TYPES]
    rows += [(f"{m['name']} ({m['dataset']})", f"{m['value']:.3f}") for m in headline]
    cells = "\n".join(f"| {name} | {value.replace('|', '/')} |" for name, value in rows)
    source = "\n\n<small>Metrics: from the model card.</small>" if headline else ""
    return f"| Model | **{info['model_id']}** |\n|---|---|\n{cells}{source}"


TRANSFORMERS_NAMES = {"vit": "ViT", "deit": "DeiT"}


def model_label(model_id: str, source: str) -> str:
    """A dropdown label that says what a model is, from its folder's config.json alone (nothing is
    loaded): e.g. "melanoma-vit-hf: stock transformers DeiT export"."""
    config_path = Path(source) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return model_id  # a Hub id or an unreadable folder: the id says it
    kind = config.get("model_type", "")
    if kind == "timm_wrapper":
        what = f"timm {config.get('architecture', 'CNN')} (CNN)"
    elif kind == "melanoma_vit":
        stem = "hybrid CNN-stem ViT" if config.get("patch_embedding_type") == "hybrid" else "ViT"
        what = f"MelanomaViT, this project's {stem}"
    else:
        what = f"stock transformers {TRANSFORMERS_NAMES.get(kind, kind)} export (no remote code)"
    extras = config.get("extra_heads") or {}
    if extras:
        what += ", with seven-point criteria heads" if all(k in extras for k in SEVEN_POINT) else ", with extra heads"
    return f"{model_id}: {what}"


def _marked_thumbnail(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    thumb = image.copy()
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
    return ImageOps.expand(thumb, border=8, fill=colour)


def gallery_caption(rank: int, result: ImageResult) -> str:
    """A thumbnail's one-line caption, short enough not to be cut off: rank, P(melanoma), the flag.
    The file name is in the table and the selected image's detail (a long name would truncate it)."""
    if result.warning:
        tag = "not dermoscopy?"
    else:
        tag = "above threshold" if result.melanoma else "below threshold"
        if result.caution:
            tag += ", caution"
    return f"#{rank} · {percent(result.melanoma_probability or 0.0)} · {tag}"


# Gallery captions wrap instead of ending in an ellipsis, and phones get two columns (six columns of
# Gradio's 100 px minimum would scroll sideways and cut every caption). Table cells break between
# words only (Gradio's prose breaks "Architecture" mid-word at phone width).
PAGE_CSS = """
#model-details td, #model-details th { word-break: normal; overflow-wrap: normal; }
#ranked-gallery .caption-label { white-space: normal; max-width: calc(100% - 8px); }
@media (max-width: 600px) {
  #ranked-gallery .grid-container { grid-template-columns: repeat(2, minmax(0, 1fr)) !important; }
}
"""


def _csv_row(rank: int, result: ImageResult) -> dict[str, Any]:
    """One batch CSV row: the columns train/predict.py writes too (model.records), ranked."""
    return {"rank": rank, "file": result.name, **result_row(result), "error": ""}


def _error_row(error: FileError) -> dict[str, Any]:
    return {"rank": None, "file": error.name, "error": error.error}


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """The batch CSV, text cells neutralised against formula injection."""
    table.map(csv_safe).to_csv(path, index=False)


class ScratchDir:
    """One temporary folder per app for batch CSVs; files older than `ttl_s` are deleted whenever a
    new one is written, and the folder itself when the app shuts down."""

    def __init__(self, ttl_s: float):
        self.path = Path(tempfile.mkdtemp(prefix="melanoma_app_"))
        self.ttl_s = ttl_s
        # Also removed when an app that was never served is garbage-collected, or at exit.
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)

    def new_file(self, name: str) -> Path:
        cutoff = time.time() - self.ttl_s
        for old in self.path.iterdir():
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(dir=self.path))  # a folder per batch: the download keeps its name
        return folder / name

    def cleanup(self) -> None:
        self._finalizer()


def read_image(source: Any, max_bytes: int = MAX_BYTES) -> Image.Image:
    """Every upload's decoder: `model.imageio.load_image` at the app's working size, on `DECODER`."""
    return DECODER.submit(load_image, source, max_bytes=max_bytes, max_side=WORKING_SIDE).result()


def score_sources(
    zoo: ModelZoo,
    entry: ZooModel,
    sources: Sequence[tuple[str, Any]],
    max_bytes: int = MAX_BYTES,
    on_chunk: Callable[[int], None] | None = None,
    on_image: Callable[[int, Image.Image], None] | None = None,
) -> tuple[list[ImageResult], list[int], list[FileError]]:
    """Results for (name, path or bytes) pairs, decoded and scored `BATCH_CHUNK` at a time, so a
    batch never holds more than one chunk of decoded images.

    Returns:
        (results, index of each result in `sources`, files that could not be used).
        `on_image(index, image)` sees every decoded image (e.g. to keep a thumbnail);
        `on_chunk(done)` reports progress.
    """
    results: list[ImageResult] = []
    indices: list[int] = []
    errors: list[FileError] = []
    for start in range(0, len(sources), BATCH_CHUNK):
        chunk: list[tuple[int, str, Image.Image]] = []
        for index in range(start, min(start + BATCH_CHUNK, len(sources))):
            name, source = sources[index]
            try:
                chunk.append((index, name, read_image(source, max_bytes)))
            except InvalidImageError as err:
                errors.append(FileError(clip(name), str(err)))
        if chunk:
            images = [image for _, _, image in chunk]
            predictions = entry.predict(images)
            oods = zoo.check_ood(images)
            for (index, name, image), prediction, ood in zip(chunk, predictions, oods):
                results.append(entry.result(clip(name), prediction, ood))
                indices.append(index)
                if on_image is not None:
                    on_image(index, image)
        if on_chunk is not None:
            on_chunk(len(results) + len(errors))
    return results, indices, errors


class BodyLimitMiddleware:
    """Refuses oversized request bodies with the app's own 413 JSON: from Content-Length before any
    byte is read, and while streaming for bodies without one (or with a false one).

    Args:
        app: the ASGI app.
        limits: path -> largest body in bytes for POSTs to that path.
    """

    def __init__(self, app: ASGIApp, limits: dict[str, int]):
        self.app, self.limits = app, limits

    @staticmethod
    async def _refuse(send: Send, limit: int) -> None:
        body = json.dumps({"detail": f"Request body is larger than the {format_bytes(limit)} limit."}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if limit is None:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, limit)
        received, exceeded, started = 0, False, False

        async def counted_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer below
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:
                return  # the app's own answer to the cut-off body is replaced by the 413
            started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(send, limit)


class OriginCheckMiddleware:
    """Refuses (403) state-changing browser requests sent from another site's page: a POST whose
    Origin is neither this server's own nor listed in `allowed`. Requests without an Origin header
    (curl, gradio_client, scripts) are not browser cross-site requests and pass.
    """

    def __init__(self, app: ASGIApp, allowed: Sequence[str] = ()):
        self.app = app
        self.allowed = {origin.strip().rstrip("/").lower() for origin in allowed if origin.strip()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
            host = headers.get(b"host", b"").decode("latin-1").lower()
            same_site = origin.split("://", 1)[-1] == host
            if origin and not same_site and origin not in self.allowed:
                body = json.dumps({"detail": "Cross-site request refused: this page's origin is not allowed "
                                             "(set MELANOMA_ALLOWED_ORIGINS to allow it)."}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 403, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _load_examples() -> tuple[list[str], list[str], str]:
    if not EXAMPLES_FILE.is_file():
        return [], [], ""
    spec = yaml.safe_load(EXAMPLES_FILE.read_text()) or {}
    paths, captions = [], []
    for item in spec.get("examples", []):
        path = ROOT / item["path"]
        if path.is_file():
            paths.append(str(path))
            captions.append(item.get("caption", path.name))
    return paths, captions, spec.get("attribution", "")


def example_batch() -> list[str]:
    """The example images as one batch (the batch tab's "Example batch" button)."""
    return _load_examples()[0]


def _name_of(path: str) -> str:
    return clip(Path(path).name)


# ------------------------------------------------------------------------------ the app
def build_app(
    zoo: ModelZoo | None = None,
    max_queued_images: int | None = None,
    task_ttl_s: float | None = None,
    max_upload_bytes: int = MAX_BYTES,
    max_request_bytes: int | None = None,
    cache_ttl_s: float | None = None,
    allowed_origins: Sequence[str] | None = None,
) -> tuple[gr.Blocks, FastAPI]:
    """Build the Gradio Blocks and the FastAPI app (REST routes + the UI mounted at `/`).

    Args:
        zoo: the model zoo (default: `ModelZoo()` from the environment).
        max_queued_images: REST queue size in images (default `$MELANOMA_MAX_QUEUED_IMAGES` or 2000).
        task_ttl_s: seconds REST results are kept (default `$MELANOMA_TASK_TTL_S` or 3600).
        max_upload_bytes: largest accepted file (default 20 MiB).
        max_request_bytes: largest bulk request body (default `$MELANOMA_MAX_REQUEST_BYTES` or 256 MiB).
        cache_ttl_s: seconds uploads, thumbnails and batch CSVs are kept (default `$MELANOMA_CACHE_TTL_S`
            or 3600).
        allowed_origins: other sites whose pages may POST here (default `$MELANOMA_ALLOWED_ORIGINS`).

    Returns:
        (demo, app): serve `app` with uvicorn (see `serve`); `demo` is the mounted Blocks.
    """
    zoo = zoo or ModelZoo()
    tasks = TaskStore(
        max_images=max_queued_images or int(os.environ.get("MELANOMA_MAX_QUEUED_IMAGES", MAX_QUEUED_IMAGES)),
        ttl_s=task_ttl_s or float(os.environ.get("MELANOMA_TASK_TTL_S", 3600)),
    )
    max_request_bytes = max_request_bytes or int(os.environ.get("MELANOMA_MAX_REQUEST_BYTES", MAX_REQUEST_BYTES))
    cache_ttl_s = cache_ttl_s or float(os.environ.get("MELANOMA_CACHE_TTL_S", 3600))
    if allowed_origins is None:
        allowed_origins = os.environ.get("MELANOMA_ALLOWED_ORIGINS", "").split(",")
    scratch = ScratchDir(cache_ttl_s)
    default_id = zoo.default_id
    _ = zoo.ood_detector  # loads the small OOD artifact (or records why there is none) up front

    def get_entry(model_id: str | None) -> ZooModel:
        try:
            return zoo.get(model_id or None)
        except UnknownModelError as err:
            raise gr.Error(str(err)) from err

    # --------------------------------------------------------------- Gradio functions
    def predict(
        image_path: str | None,
        model_id: str | None,
        head_fusion: str = "mean",
        discard_ratio: float = 0.9,
        start_layer: int = 0,
    ):
        """One image -> (class probabilities, verdict, explanation overlay, plain image, JSON record)."""
        if not image_path:
            raise gr.Error("Upload an image first.")
        try:
            image = read_image(image_path, max_upload_bytes)
        except InvalidImageError as err:
            raise gr.Error(str(err)) from err
        entry = get_entry(model_id)
        start_layer = min(int(start_layer), max(entry.num_layers - 1, 0))
        try:
            analysis = entry.analyze(image, head_fusion, float(discard_ratio), start_layer)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        result = entry.result(_name_of(image_path), analysis, zoo.check_ood([image])[0], explanation=analysis.method)
        verdict = verdict_markdown(result)
        if analysis.heads is not None and not result.warning:  # OOD: no score is meaningful
            verdict += "\n\n" + criteria_markdown(analysis.heads)
        return (
            # Clearly not dermoscopy: the class scores are collapsed (they stay in the JSON record).
            "" if result.warning else probabilities_markdown(entry, analysis.probabilities),
            verdict,
            gr.Image(value=analysis.heatmap, label=f"Explanation: {analysis.method}"),
            image,
            result.to_json(),
        )

    def predict_batch(files: list[str] | None, model_id: str | None, progress=gr.Progress()):
        """Many images -> (ranked marked gallery, table, CSV file, error list, state)."""
        if not files:
            raise gr.Error("Upload one or more images first.")
        if len(files) > MAX_BULK_FILES:
            raise gr.Error(f"At most {MAX_BULK_FILES} images per batch, got {len(files)}.")
        entry = get_entry(model_id)
        thumbnails: dict[int, Image.Image] = {}

        def keep_thumbnail(index: int, image: Image.Image) -> None:
            thumb = image.copy()
            thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
            thumbnails[index] = thumb

        total = len(files)
        progress((0, total), desc="Classifying", unit="images")
        results, indices, errors = score_sources(
            zoo,
            entry,
            [(_name_of(path), path) for path in files],
            max_upload_bytes,
            on_chunk=lambda done: progress((done, total), desc="Classifying", unit="images"),
            on_image=keep_thumbnail,
        )
        order = sorted(range(len(results)), key=lambda i: -(results[i].melanoma_probability or 0.0))
        ranked = [results[i] for i in order]
        gallery = []
        for rank, (index, result) in enumerate(zip(order, ranked), start=1):
            colour = OOD_COLOUR if result.warning else ABOVE_COLOUR if result.melanoma else BELOW_COLOUR
            gallery.append((_marked_thumbnail(thumbnails[indices[index]], colour), gallery_caption(rank, result)))
        rows = [_csv_row(rank, r) for rank, r in enumerate(ranked, start=1)] + [_error_row(e) for e in errors]
        table = pd.DataFrame(rows)
        table["rank"] = table["rank"].astype("Int64")
        csv_path = scratch.new_file(f"melanoma_batch_{entry.id.replace('/', '_')}.csv")
        write_csv(table, csv_path)
        columns = (
            "rank", "file", "melanoma_probability", "above_threshold", "seven_point_score", "top_class_name", "ood",
            "error",
        )
        shown = table[[c for c in columns if c in table]].round(4)
        if "melanoma_probability" in table:
            # The page's unit, from the raw values (percent, one decimal, numeric so the column sorts);
            # the CSV keeps 0-1.
            shown["melanoma_probability"] = table["melanoma_probability"].map(percent_value)
        shown = shown.rename(columns={"melanoma_probability": "P(melanoma) %"})
        error_md = (
            "**Files that could not be used** (the rest of the batch was processed):\n"
            + "\n".join(f"- `{e.name}`: {e.error}" for e in errors)
            if errors
            else f"All {len(results)} images processed."
        )
        state = BatchState(entry.id, ranked, [files[indices[i]] for i in order])
        return gallery, shown, str(csv_path), error_md, state

    def show_selected(state: BatchState | None, evt: gr.SelectData):
        if not state or evt.index is None or evt.index >= len(state.results):
            raise gr.Error("Run a batch first.")
        result = state.results[evt.index]
        entry = get_entry(state.model_id)
        image = read_image(state.paths[evt.index], max_upload_bytes)
        analysis = entry.analyze(image)
        return (
            probabilities_markdown(entry, result.probabilities, f"Selected image: {result.name}"),
            f"**{result.name}**\n\n" + verdict_markdown(result),
            gr.Image(value=analysis.heatmap, label=f"Explanation: {analysis.method}"),
            image,
        )

    def on_model_change(model_id: str | None):
        if not model_id:
            return "No model found: add a model folder under models/.", gr.Radio(), gr.Slider(), gr.Slider()
        entry = get_entry(model_id)
        rollout = entry.uses_rollout
        return (
            model_details_markdown(entry),
            gr.Radio(visible=rollout),
            gr.Slider(visible=rollout),
            # Slider needs maximum > minimum; predict() clamps start_layer to the last layer.
            gr.Slider(maximum=max(entry.num_layers - 1, 1), value=0, visible=rollout and entry.num_layers > 1),
        )

    # ----------------------------------------------------------------------- layout
    example_paths, example_captions, attribution = _load_examples()
    cache_every = max(1, int(cache_ttl_s) // 4)
    with gr.Blocks(title="Melanoma ViT: research demo", delete_cache=(cache_every, int(cache_ttl_s))) as demo:
        gr.Markdown("# Melanoma ViT: dermoscopy classifier (research demo)\n\n> " + DISCLAIMER)
        with gr.Row():  # columns with a minimum width: at phone width the details table goes below
            with gr.Column(min_width=320):
                model_choice = gr.Dropdown(
                    choices=[(model_label(i, zoo.source(i)), i) for i in zoo.ids],
                    value=default_id,
                    label="Model",
                    interactive=True,
                )
            with gr.Column(min_width=320), gr.Accordion("Model details", open=True):
                details = gr.Markdown(
                    "No model found: add a model folder under models/." if default_id is None else "",
                    elem_id="model-details",
                )
        if zoo.skipped:
            gr.Markdown("Hub models skipped (unreachable here): " + ", ".join(f"`{k}`" for k in zoo.skipped))
        if zoo.ood_note:
            gr.Markdown(f"_{zoo.ood_note}_")

        with gr.Tab("Single image"):
            with gr.Row():
                with gr.Column():
                    image_in = gr.Image(
                        type="filepath", image_mode=None, label="Dermoscopic image", sources=["upload", "clipboard"]
                    )
                    with gr.Accordion("Explanation settings", open=False):
                        head_fusion = gr.Radio(["mean", "max", "min"], value="mean", label="Rollout head fusion")
                        discard_ratio = gr.Slider(0.0, 0.99, value=0.9, step=0.01, label="Rollout discard ratio")
                        start_layer = gr.Slider(0, 11, value=0, step=1, label="Rollout start layer")
                    run_button = gr.Button("Classify", variant="primary")
                    if example_paths:
                        gr.Examples(
                            examples=[[p] for p in example_paths], inputs=[image_in], example_labels=example_captions
                        )
                        gr.Markdown(f"<small>{attribution}</small>")
                with gr.Column():
                    verdict = gr.Markdown()
                    probs_out = gr.Markdown()
            with gr.Row():
                plain_out = gr.Image(label="Image", type="pil", interactive=False)
                heatmap_out = gr.Image(label="Explanation", interactive=False)
            with gr.Accordion("Raw result (JSON)", open=False):
                json_out = gr.JSON()
            run_button.click(
                predict,
                inputs=[image_in, model_choice, head_fusion, discard_ratio, start_layer],
                outputs=[probs_out, verdict, heatmap_out, plain_out, json_out],
                api_name="predict",
                api_description="One image -> class probabilities, verdict, explanation, image, JSON. "
                + API_DESCRIPTION,
            )

        with gr.Tab("Batch"):
            gr.Markdown(
                "Upload many images at once: results are ranked by melanoma probability, highest first. "
                "Captions: rank · P(melanoma) · threshold. Red border: above the model's threshold; blue: below; "
                "grey: may not be dermoscopy. "
                "Click a thumbnail for details. " + DISCLAIMER
            )
            # A fixed height: a long upload list scrolls inside it instead of pushing the results down.
            files_in = gr.File(file_count="multiple", label="Images", height=180)
            with gr.Row():
                batch_button = gr.Button("Classify all", variant="primary")
                if example_paths:
                    gr.Button("Example batch", variant="secondary").click(
                        example_batch, outputs=[files_in], api_visibility="private"
                    )
            batch_errors = gr.Markdown()
            gallery = gr.Gallery(
                label="Ranked by melanoma probability",
                elem_id="ranked-gallery",
                columns=6,
                height="auto",
                allow_preview=False,
                object_fit="contain",
            )
            with gr.Row():
                sel_probs = gr.Markdown()
                with gr.Column():
                    sel_verdict = gr.Markdown()
                    sel_plain = gr.Image(label="Image", type="pil", interactive=False)
                sel_heatmap = gr.Image(label="Explanation", interactive=False)
            table = gr.Dataframe(label="Results", interactive=False)
            csv_out = gr.File(label="All results (CSV)")
            batch_state = gr.State()
            batch_button.click(
                predict_batch,
                inputs=[files_in, model_choice],
                outputs=[gallery, table, csv_out, batch_errors, batch_state],
                api_name="predict_batch",
                api_description="Many images -> ranked gallery, table, CSV file, errors. " + API_DESCRIPTION,
            )
            gallery.select(
                show_selected,
                inputs=[batch_state],
                outputs=[sel_probs, sel_verdict, sel_heatmap, sel_plain],
                api_visibility="private",
            )

        gr.Markdown(
            f"<small>{DISCLAIMER} Models trained on HAM10000 inherit its CC BY-NC-SA 4.0 terms "
            "(non-commercial).</small>"
        )
        model_choice.change(
            on_model_change,
            inputs=[model_choice],
            outputs=[details, head_fusion, discard_ratio, start_layer],
            api_visibility="private",
        )
        demo.load(
            on_model_change,
            inputs=[model_choice],
            outputs=[details, head_fusion, discard_ratio, start_layer],
            api_visibility="private",
        )

    # ------------------------------------------------------------------------ REST
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        tasks.shutdown()
        scratch.cleanup()

    api = FastAPI(
        title="Melanoma ViT API (research demo, not a medical device)", description=API_DESCRIPTION, lifespan=lifespan
    )

    @api.exception_handler(InvalidImageError)
    async def _invalid_image(_: Request, err: InvalidImageError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(err)})

    @api.exception_handler(QueueFullError)
    async def _queue_full(_: Request, err: QueueFullError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(err)}, headers={"Retry-After": "5"})

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # Starlette's multipart parser refuses over-many files with its own 400; ours is a 413.
        if err.status_code == 400 and "Too many files" in str(err.detail):
            return JSONResponse(status_code=413, content={"detail": f"At most {MAX_BULK_FILES} files per request."})
        return await http_exception_handler(request, err)

    def rest_entry(model_id: str | None) -> ZooModel:
        try:
            return zoo.get(model_id or None)
        except UnknownModelError as err:
            raise HTTPException(
                status_code=404, detail=f"Unknown model {clip(model_id or '')!r}; available: {', '.join(zoo.ids)}."
            ) from err

    def read_upload(upload: UploadFile) -> bytes:
        data = upload.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(
                status_code=413,
                detail=f"{clip(upload.filename or 'image')}: file is larger than the {format_bytes(max_upload_bytes)} limit.",
            )
        return data

    def checked_upload(upload: UploadFile) -> bytes:
        """The upload's bytes once they decode (bounded memory); the decoded image is dropped: the
        queue holds compressed files, the worker decodes them again a chunk at a time."""
        data = read_upload(upload)
        read_image(data, max_upload_bytes)
        return data

    def run_results(entry: ZooModel, named: list[tuple[str, bytes]], errors: list[FileError]) -> Callable:
        def work() -> dict[str, Any]:
            results, _, failed = score_sources(zoo, entry, named, max_upload_bytes)
            return {
                "model_id": entry.id,
                "disclaimer": API_DESCRIPTION.split("\n")[0],
                "results": [result.to_json() for result in results],
                "errors": [asdict(e) for e in errors + failed],
            }

        return work

    @api.get("/public_models", summary="List the available models", tags=["models"])
    def public_models() -> dict[str, Any]:
        """Every model in the zoo with its metadata; Hub ids that could not be reached are in `skipped`."""
        models = []
        for model_id in zoo.ids:
            try:
                models.append(zoo.get(model_id).describe())
            except Exception as err:  # a broken folder must not hide the others
                models.append({"model_id": model_id, "error": str(err)})
        return {"default": default_id, "models": models, "skipped": zoo.skipped, "disclaimer": DISCLAIMER}

    @api.post("/predict", summary="Classify one image (async task)", tags=["predict"])
    def rest_predict(
        file: UploadFile = File(..., description="One image (JPEG, PNG, ...)"),
        model_id: str | None = Query(None, description="Zoo model id; default model when omitted"),
    ) -> dict[str, str]:
        """Queue one image; poll `GET /from_task/{task_uuid}`. Research demo, not a medical device."""
        entry = rest_entry(model_id)
        tasks.reserve(1)  # admission before any decoding
        try:
            named = [(clip(file.filename or "image"), checked_upload(file))]
        except BaseException:
            tasks.release(1)
            raise
        return {"task_uuid": tasks.submit(run_results(entry, named, []), 1)}

    @api.post("/predict_bulk", summary="Classify many images (async task)", tags=["predict"])
    def rest_predict_bulk(
        files: list[UploadFile] = File(..., description="Images; unreadable ones are listed in `errors`"),
        model_id: str | None = Query(None, description="Zoo model id; default model when omitted"),
    ) -> dict[str, Any]:
        """Queue many images; bad files are reported per file and do not abort the batch."""
        entry = rest_entry(model_id)
        if len(files) > MAX_BULK_FILES:
            detail = f"At most {MAX_BULK_FILES} files per request, got {len(files)}."
            raise HTTPException(status_code=413, detail=detail)
        if len(files) > tasks.max_images:
            detail = f"The queue holds at most {tasks.max_images} images; send at most that many per request."
            raise HTTPException(status_code=413, detail=detail)
        tasks.reserve(len(files))  # admission before any decoding
        named: list[tuple[str, bytes]] = []
        errors: list[FileError] = []
        try:
            for upload in files:
                name = clip(upload.filename or f"image_{len(named) + len(errors)}")
                try:
                    named.append((name, checked_upload(upload)))
                except (InvalidImageError, HTTPException) as err:
                    errors.append(FileError(name, getattr(err, "detail", None) or str(err)))
        finally:
            tasks.release(len(files) - len(named))
        error_json = [asdict(e) for e in errors]
        if not named:
            summary = "; ".join(f"{e.name}: {e.error}" for e in errors)
            content = {"detail": f"No usable image in the request. {summary}", "errors": error_json}
            return JSONResponse(status_code=400, content=content)
        task_uuid = tasks.submit(run_results(entry, named, errors), len(named))
        return {"task_uuid": task_uuid, "num_images": len(named), "errors": error_json}

    @api.get("/from_task/{task_uuid}", summary="Result of a task", tags=["predict"])
    def from_task(task_uuid: str) -> dict[str, Any]:
        """`{"status": "pending"}` while running; then the per-image results (research demo output)."""
        task = tasks.get(task_uuid)
        if task is None:
            raise HTTPException(status_code=404, detail=f"Unknown or expired task {clip(task_uuid, 40)!r}.")
        return {"task_uuid": task_uuid, **task}

    api.state.tasks = tasks
    api.state.zoo = zoo
    api.state.scratch = scratch
    example_dirs = sorted({str(Path(p).parent) for p in example_paths})
    # show_error=False: only our own gr.Error messages reach the page, never an exception's text
    # (which can name server paths); Gradio shows a generic "Error" for anything else.
    app = gr.mount_gradio_app(
        api, demo, path="/", max_file_size=max_upload_bytes, allowed_paths=example_dirs, show_error=False, css=PAGE_CSS
    )
    app.add_middleware(
        BodyLimitMiddleware,
        limits={"/predict": max_upload_bytes + MULTIPART_OVERHEAD, "/predict_bulk": max_request_bytes},
    )
    app.add_middleware(OriginCheckMiddleware, allowed=allowed_origins)
    return demo, app


def create_app() -> FastAPI:
    """The ASGI app for `uvicorn app:create_app --factory`."""
    return build_app()[1]


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve `app` with uvicorn; with `block=False` returns (server, thread) once it accepts connections.

    Stop a non-blocking server with `server.should_exit = True; thread.join()`.
    """
    import uvicorn

    # Graceful-shutdown timeout: open Gradio heartbeat streams would otherwise block exit.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    if block:
        server.run()
        return server, None
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"Server did not start on {host}:{port}.")
        time.sleep(0.05)
    return server, thread


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    demo, app = build_app()
    zoo_ = app.state.zoo
    if zoo_.default_id is not None:
        zoo_.get(zoo_.default_id)  # load once at startup, not on the first request
    _ = zoo_.ood_detector
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    logger.info("Serving on http://%s:%d (REST docs at /docs). %s", host, port, DISCLAIMER)
    serve(app, host=host, port=port)
