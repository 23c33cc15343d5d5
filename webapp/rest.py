"""REST routes (OpenAPI docs at `/docs`): `GET /public_models`, `POST /predict?model_id=`,
`POST /predict_bulk?model_id=`, `GET /from_task/{task_uuid}`.

Uploads are admitted to the task store (room for their images) before they are decoded, and each
is decoded once, on admission: a bad file is named in the POST's answer, and the queue holds the
decoded working-size images, which the worker scores through the scoring service. The queue's byte
bound (`MELANOMA_MAX_QUEUED_BYTES`) therefore counts decoded pixels (`held_bytes`: at most 4 MiB an
image at the 1024-px working side), what the queue really holds; a file's compressed bytes are gone
once it is decoded. Results become JSON here.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.imageio import InvalidImageError, format_bytes
from model.catalogue import UnknownModelError
from model.classifier import Classifier
from model.metadata_model import SITES, Metadata, MetadataError

from .context import AppContext
from .formatting import API_DESCRIPTION, DISCLAIMER, clip
from .scoring import BatchResult, FileError, held_bytes
from .tasks import QueueFullError, TaskStore

MAX_BULK_FILES = 1000  # also Starlette's default multipart `max_files`: one more gets our 413
MULTIPART_OVERHEAD = 64 * 2**10  # a single-file request body: the file plus this

router = APIRouter()


def get_context(request: Request) -> AppContext:
    return request.app.state.ctx


# ------------------------------------------------------------------------------- JSON boundary
def batch_json(batch: BatchResult, errors: list[FileError]) -> dict[str, Any]:
    """A finished task's body: results in upload order, then every file that could not be used."""
    return {
        "model_id": batch.model_id,
        "disclaimer": API_DESCRIPTION.split("\n")[0],
        "results": [result.to_json() for result in batch.results],
        "errors": [asdict(e) for e in errors + batch.errors],
    }


def scoring_task(
    ctx: AppContext, entry: Classifier, named: list[tuple[str, Image.Image]], errors: list[FileError],
    patient: Metadata | None = None,
) -> Callable:
    """The task store's work for one request: score the admitted, decoded images a chunk per step (so
    other clients get turns in between), return the JSON body."""

    def work() -> Generator[int, None, dict[str, Any]]:
        batch = yield from ctx.scoring.score_chunks(entry, named, patient=patient)
        return batch_json(batch, errors)

    return work


def client_of(request: Request) -> str:
    """Who a request is from, for fair turns: the first forwarded address behind a proxy (Spaces),
    else the peer's address."""
    forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
    return forwarded or (request.client.host if request.client else "")


# -------------------------------------------------------------------------------- uploads
def model_entry(ctx: AppContext, model_id: str | None) -> Classifier:
    try:
        return ctx.scoring.entry(model_id)
    except UnknownModelError as err:
        detail = f"Unknown model {clip(model_id or '')!r}; available: {', '.join(ctx.zoo.ids)}."
        raise HTTPException(status_code=404, detail=detail) from err


def decoded_upload(ctx: AppContext, upload: UploadFile) -> Image.Image:
    """The upload decoded, once, at the working size (bounded memory: `ScoringService.read`); raises
    `InvalidImageError`, or a 413 for a file over the size limit."""
    limit = ctx.settings.max_upload_bytes
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        name = clip(upload.filename or "image")
        raise HTTPException(status_code=413, detail=f"{name}: file is larger than the {format_bytes(limit)} limit.")
    return ctx.scoring.read(data)


def reserve_pixels(tasks: TaskStore, n_bytes: int, request_bytes: int) -> None:
    """Claim `n_bytes` of decoded pixels: `QueueFullError` (503, retry) when they do not fit now, a
    413 when the request's images so far (`request_bytes`) exceed the whole queue (no retry helps)."""
    if request_bytes > tasks.max_bytes:
        detail = (
            f"The images of this request take more than the queue holds in all ({format_bytes(tasks.max_bytes)} "
            "of decoded images, 3 MiB each at 1024x768); send fewer images per request."
        )
        raise HTTPException(status_code=413, detail=detail)
    tasks.reserve_bytes(n_bytes)


# --------------------------------------------------------------------------------- routes
@router.get("/public_models", summary="List the available models", tags=["models"])
def public_models(ctx: AppContext = Depends(get_context)) -> dict[str, Any]:
    """Every model in the zoo with its metadata; Hub ids that could not be reached are in `skipped`."""
    models = []
    for model_id in ctx.zoo.ids:
        try:
            models.append(ctx.zoo.get(model_id).describe())
        except Exception as err:  # a broken folder must not hide the others
            models.append({"model_id": model_id, "error": str(err)})
    return {"default": ctx.zoo.default_id, "models": models, "skipped": ctx.zoo.skipped, "disclaimer": DISCLAIMER}


@router.post("/predict", summary="Classify one image (async task)", tags=["predict"])
def predict(
    request: Request,
    file: UploadFile = File(..., description="One image (JPEG, PNG, ...)"),
    model_id: str | None = Query(None, description="Zoo model id; default model when omitted"),
    age: str | None = Query(None, description="Optional: the patient's age in years (0-120)", max_length=16),
    sex: str | None = Query(None, description="Optional: male or female", max_length=16),
    site: str | None = Query(None, description="Optional: anatomical site (" + ", ".join(SITES) + ")", max_length=32),
    ctx: AppContext = Depends(get_context),
) -> dict[str, str]:
    """Queue one image; poll `GET /from_task/{task_uuid}`. Research demo, not a medical device.

    With any of `age`, `sex`, `site` and a model that has a metadata regression (`metadata_inputs`
    in `GET /public_models`), the result also has `with_metadata`: P(melanoma) from the image and
    those fields, with its own threshold. Other models ignore them."""
    entry = model_entry(ctx, model_id)
    try:
        patient = Metadata.parse(age, sex, site)
    except MetadataError as err:
        raise HTTPException(status_code=422, detail=str(err)) from err
    ctx.tasks.reserve(1)  # admission before any decoding
    try:
        image = decoded_upload(ctx, file)
        size = held_bytes(image)
        reserve_pixels(ctx.tasks, size, size)
    except BaseException:
        ctx.tasks.release(1)
        raise
    named = [(clip(file.filename or "image"), image)]
    return {"task_uuid": ctx.tasks.submit(scoring_task(ctx, entry, named, [], patient), 1, size, client_of(request))}


@router.post("/predict_bulk", summary="Classify many images (async task)", tags=["predict"])
def predict_bulk(
    request: Request,
    files: list[UploadFile] = File(..., description="Images; unreadable ones are listed in `errors`"),
    model_id: str | None = Query(None, description="Zoo model id; default model when omitted"),
    ctx: AppContext = Depends(get_context),
) -> dict[str, Any]:
    """Queue many images; bad files are reported per file and do not abort the batch."""
    entry = model_entry(ctx, model_id)
    tasks = ctx.tasks
    if len(files) > MAX_BULK_FILES:
        raise HTTPException(status_code=413, detail=f"At most {MAX_BULK_FILES} files per request, got {len(files)}.")
    if len(files) > tasks.max_images:
        detail = f"The queue holds at most {tasks.max_images} images; send at most that many per request."
        raise HTTPException(status_code=413, detail=detail)
    tasks.reserve(len(files))  # admission before any decoding
    named: list[tuple[str, Image.Image]] = []
    errors: list[FileError] = []
    size = 0  # decoded bytes claimed so far
    try:
        for upload in files:
            name = clip(upload.filename or f"image_{len(named) + len(errors)}")
            try:
                image = decoded_upload(ctx, upload)
            except (InvalidImageError, HTTPException) as err:
                errors.append(FileError(name, getattr(err, "detail", None) or str(err)))
                continue
            reserve_pixels(tasks, held_bytes(image), size + held_bytes(image))
            named.append((name, image))
            size += held_bytes(image)
    except (QueueFullError, HTTPException):
        tasks.release(0, size)  # the whole request is refused: its bytes,
        named = []  # and (below) all its images
        raise
    finally:
        tasks.release(len(files) - len(named))
    error_json = [asdict(e) for e in errors]
    if not named:
        summary = "; ".join(f"{e.name}: {e.error}" for e in errors)
        content = {"detail": f"No usable image in the request. {summary}", "errors": error_json}
        return JSONResponse(status_code=400, content=content)
    task_uuid = tasks.submit(scoring_task(ctx, entry, named, errors), len(named), size, client_of(request))
    return {"task_uuid": task_uuid, "num_images": len(named), "errors": error_json}


@router.get("/from_task/{task_uuid}", summary="Result of a task", tags=["predict"])
def from_task(task_uuid: str, ctx: AppContext = Depends(get_context)) -> dict[str, Any]:
    """`{"status": "pending"}` while running; then the per-image results (research demo output)."""
    task = ctx.tasks.get(task_uuid)
    if task is None:
        raise HTTPException(status_code=404, detail=f"Unknown or expired task {clip(task_uuid, 40)!r}.")
    return {"task_uuid": task_uuid, **task}


# ------------------------------------------------------------------------------ the app
async def invalid_image(_: Request, err: InvalidImageError) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": str(err)})


async def queue_full(_: Request, err: QueueFullError) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": str(err)}, headers={"Retry-After": "5"})


async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    # Starlette's multipart parser refuses over-many files with its own 400; ours is a 413.
    if err.status_code == 400 and "Too many files" in str(err.detail):
        return JSONResponse(status_code=413, content={"detail": f"At most {MAX_BULK_FILES} files per request."})
    return await http_exception_handler(request, err)


@contextlib.asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    yield
    api.state.ctx.close()


def build_api(ctx: AppContext) -> FastAPI:
    """The FastAPI app with the REST routes; `ctx` is what every route receives."""
    api = FastAPI(
        title="Melanoma ViT API (research demo, not a medical device)", description=API_DESCRIPTION, lifespan=lifespan
    )
    api.state.ctx = ctx
    api.add_exception_handler(InvalidImageError, invalid_image)
    api.add_exception_handler(QueueFullError, queue_full)
    api.add_exception_handler(StarletteHTTPException, http_error)
    api.include_router(router)
    return api
