"""The melanoma demo app, split by job (app.py at the repository root is the Spaces entry point):

- `context`: one app's settings and shared state (zoo, scoring service, task store, scratch folder);
- `scoring`: the one service that decodes, scores, ranks, explains and builds rows, with typed results;
- `formatting`: the page's words (verdicts, tables, captions) from typed results;
- `ui`: the Gradio page, handlers at module level; `rest`: the REST routes; `tasks`: the REST task
  store; `middleware`: request-size limits, the cross-site check and "uploaded files only" for the
  whole app.

RESEARCH AND EDUCATION DEMO - NOT A MEDICAL DEVICE.
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Sequence
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from gradio.utils import get_upload_folder

from model.imageio import MAX_BYTES, format_bytes
from model.catalogue import ModelCatalogue

from .context import AppContext, AppSettings
from .middleware import BodyLimitMiddleware, NoSniffMiddleware, OriginCheckMiddleware, UploadedFilesOnlyMiddleware
from .rest import MULTIPART_OVERHEAD, build_api
from .ui import PAGE_CSS, THEME, build_blocks, load_examples

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas (what MALLOC_ARENA_MAX=2 does), from now on; False off glibc.

    glibc gives threads that allocate at the same time arenas of their own, and an image buffer freed
    in one stays in that arena: with Gradio's worker threads the server's RSS grew by about 4 MiB per
    visitor that never came back (`bench/bench_app.py --parts sessions`: +175 MiB over 40 new
    sessions; +20 MiB with two arenas).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, count))
    except (OSError, AttributeError):
        return False  # not glibc (macOS, musl): nothing to cap


def build_app(
    zoo: ModelCatalogue | None = None,
    max_queued_images: int | None = None,
    task_ttl_s: float | None = None,
    max_upload_bytes: int = MAX_BYTES,
    max_request_bytes: int | None = None,
    cache_ttl_s: float | None = None,
    allowed_origins: Sequence[str] | None = None,
) -> tuple[gr.Blocks, FastAPI]:
    """Build the Gradio Blocks and the FastAPI app (REST routes + the UI mounted at `/`).

    Args:
        zoo: the model zoo (default: `ModelCatalogue()` from the environment).
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
    limit_malloc_arenas()
    settings = AppSettings.from_env(
        max_queued_images, task_ttl_s, max_upload_bytes, max_request_bytes, cache_ttl_s, allowed_origins
    )
    ctx = AppContext(zoo or ModelCatalogue(), settings)
    _ = ctx.zoo.ood_detector  # loads the small OOD artifact (or records why there is none) up front
    demo = build_blocks(ctx)
    api = build_api(ctx)
    api.state.tasks, api.state.zoo, api.state.scratch = ctx.tasks, ctx.zoo, ctx.scratch
    example_dirs = sorted({str(Path(p).parent) for p in load_examples()[0]})
    # show_error=False: only our own gr.Error messages reach the page, never an exception's text
    # (which can name server paths); Gradio shows a generic "Error" for anything else.
    # Gradio's own per-file limit refuses a whole multi-file upload for one oversize file; the app's
    # decoder refuses that file alone (a listed error, the rest of the batch scored), so Gradio
    # only bounds a file by the request limit (what /gradio_api/upload accepts in all).
    app = gr.mount_gradio_app(
        api, demo, path="/", max_file_size=settings.max_request_bytes, allowed_paths=example_dirs, show_error=False, css=PAGE_CSS, theme=THEME
    )
    app.add_middleware(
        BodyLimitMiddleware,
        limits={
            "/predict": max_upload_bytes + MULTIPART_OVERHEAD,
            "/predict_bulk": settings.max_request_bytes,
            "/gradio_api/upload": settings.max_request_bytes,  # Gradio limits each file, not their sum
        },
        messages={"/predict": f"File is larger than the {format_bytes(max_upload_bytes)} limit."},
    )
    # Gradio calls name their input files by server path: only uploads to this app are read.
    app.add_middleware(UploadedFilesOnlyMiddleware, upload_dir=get_upload_folder(), stale_upload_s=settings.stale_upload_s)
    app.add_middleware(OriginCheckMiddleware, allowed=settings.allowed_origins)
    app.add_middleware(NoSniffMiddleware)
    return demo, app


def create_app() -> FastAPI:
    """The ASGI app for `uvicorn app:create_app --factory`."""
    return build_app()[1]


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve `app` with uvicorn until interrupted (tests serve it on a thread: tests/servers.py)."""
    import uvicorn

    # Graceful-shutdown timeout: open Gradio heartbeat streams would otherwise block exit.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
