"""The REST task store: background work behind a queue bounded in images, results kept a while."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

MAX_QUEUED_IMAGES = 2000  # queue bound, in images (>= MAX_BULK_FILES, so any bulk fits)


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
