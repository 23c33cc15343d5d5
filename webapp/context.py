"""What one app instance holds: its settings, the zoo, the scoring service, the REST task store and
its scratch folder. Handlers (Gradio and REST) receive it explicitly; nothing is captured."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from model.imageio import MAX_BYTES
from model.catalogue import ModelCatalogue

from .scoring import ScoringService
from .tasks import MAX_QUEUED_BYTES, MAX_QUEUED_IMAGES, TaskStore

MAX_REQUEST_BYTES = 256 * 2**20  # largest bulk request body


@dataclass(frozen=True)
class AppSettings:
    """Limits and lifetimes of one app; `from_env` fills what is not given from the environment.

    max_queued_images: REST queue size in images; max_queued_bytes: in bytes of the decoded images it
    holds ($MELANOMA_MAX_QUEUED_BYTES, default 512 MiB). task_ttl_s: seconds REST results are kept.
    max_upload_bytes: largest accepted file. max_request_bytes: largest bulk request body.
    cache_ttl_s: seconds uploads, thumbnails and batch CSVs are kept. allowed_origins: other sites
    whose pages may POST here. stale_upload_s: seconds after which a partial file of an upload that
    never completed is removed ($MELANOMA_STALE_UPLOAD_S, default 600).
    """

    max_queued_images: int = MAX_QUEUED_IMAGES
    max_queued_bytes: int = MAX_QUEUED_BYTES
    task_ttl_s: float = 3600.0
    max_upload_bytes: int = MAX_BYTES
    max_request_bytes: int = MAX_REQUEST_BYTES
    cache_ttl_s: float = 3600.0
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    stale_upload_s: float = 600.0
    tta_views: int = 1  # test-time views per image, for models with thresholds fitted for them

    @classmethod
    def from_env(
        cls,
        max_queued_images: int | None = None,
        task_ttl_s: float | None = None,
        max_upload_bytes: int = MAX_BYTES,
        max_request_bytes: int | None = None,
        cache_ttl_s: float | None = None,
        allowed_origins: tuple[str, ...] | list[str] | None = None,
    ) -> AppSettings:
        """Arguments win; then MELANOMA_MAX_QUEUED_IMAGES, MELANOMA_TASK_TTL_S,
        MELANOMA_MAX_REQUEST_BYTES, MELANOMA_CACHE_TTL_S, MELANOMA_ALLOWED_ORIGINS, MELANOMA_TTA_VIEWS; then
        the defaults."""
        env = os.environ.get
        if allowed_origins is None:
            allowed_origins = env("MELANOMA_ALLOWED_ORIGINS", "").split(",")
        return cls(
            max_queued_images=max_queued_images or int(env("MELANOMA_MAX_QUEUED_IMAGES", MAX_QUEUED_IMAGES)),
            max_queued_bytes=int(env("MELANOMA_MAX_QUEUED_BYTES", MAX_QUEUED_BYTES)),
            task_ttl_s=task_ttl_s or float(env("MELANOMA_TASK_TTL_S", 3600)),
            max_upload_bytes=max_upload_bytes,
            max_request_bytes=max_request_bytes or int(env("MELANOMA_MAX_REQUEST_BYTES", MAX_REQUEST_BYTES)),
            cache_ttl_s=cache_ttl_s or float(env("MELANOMA_CACHE_TTL_S", 3600)),
            allowed_origins=tuple(origin for origin in allowed_origins if origin.strip()),
            stale_upload_s=float(env("MELANOMA_STALE_UPLOAD_S", 600)),
            tta_views=tta_views_from(env("MELANOMA_TTA_VIEWS", "1")),
        )


def tta_views_from(value: str) -> int:
    """MELANOMA_TTA_VIEWS: dihedral test-time views, 1 (none) to 8."""
    try:
        views = int(value)
    except ValueError:
        views = 0
    if not 1 <= views <= 8:
        raise ValueError(f"MELANOMA_TTA_VIEWS must be a whole number from 1 to 8, got {value!r}")
    return views


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


class AppContext:
    """One app's shared state, handed to every handler.

    Args:
        zoo: the model zoo. settings: the app's limits (`AppSettings.from_env()` by default).
    """

    def __init__(self, zoo: ModelCatalogue, settings: AppSettings):
        self.zoo, self.settings = zoo, settings
        self.scoring = ScoringService(zoo, settings.max_upload_bytes, settings.tta_views)
        self.tasks = TaskStore(max_images=settings.max_queued_images, ttl_s=settings.task_ttl_s,
                               max_bytes=settings.max_queued_bytes)
        self.scratch = ScratchDir(settings.cache_ttl_s)

    def close(self) -> None:
        """At shutdown: stop the REST worker and remove the scratch folder."""
        self.tasks.shutdown()
        self.scratch.cleanup()
