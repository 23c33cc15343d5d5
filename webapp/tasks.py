"""The REST task store: background work behind a queue bounded in images and bytes, served fairly
between clients, results kept a while."""

from __future__ import annotations

import inspect
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from model.imageio import format_bytes

logger = logging.getLogger(__name__)

MAX_QUEUED_IMAGES = 2000  # queue bound, in images (>= MAX_BULK_FILES, so any bulk fits)
# Queue bound in bytes of what it holds: REST queues decoded working-size images (webapp.rest), up to
# 4 MiB each (1024x768: 3 MiB), so about 170 of them; a bulk request over it in all gets a 413.
MAX_QUEUED_BYTES = 512 * 2**20
MAX_RESULTS_PER_CLIENT = 500  # unexpired results kept per client; over it, that client's oldest go

Work = Callable[[], dict[str, Any]] | Callable[[], Generator[Any, None, dict[str, Any]]]


class QueueFullError(RuntimeError):
    """The bounded REST queue is full; the client should retry later."""


@dataclass
class _Job:
    task_uuid: str
    steps: Generator[Any, None, dict[str, Any]]
    n_images: int
    n_bytes: int


@dataclass
class _Result:
    client: str
    status: str = "pending"
    body: dict[str, Any] = field(default_factory=dict)
    finished_at: float | None = None


def _as_steps(work: Work) -> Generator[Any, None, dict[str, Any]]:
    """`work` as a generator of steps: a generator function as it is (one step per `yield`), a plain
    function as one step."""
    if inspect.isgeneratorfunction(work):
        return (yield from work())
    return work()


class TaskStore:
    """Background REST work: a queue bounded in images and bytes in front of one worker, served
    fairly between clients, results kept a while.

    Admission comes first: `reserve(n)` claims room for n images before a request's files are read,
    `reserve_bytes(b)` for their bytes as they are read, `submit(work, n, b, client)` queues the
    work on those claims, `release(n, b)` returns an unused claim.

    Fairness: each client (REST: its address) has its own queue, and the worker takes one step of
    one task per turn, round robin between clients. A scoring task steps one chunk of images at a
    time (`ScoringService.score_chunks`), so one client's 1000 images delay another's single image
    by at most a chunk per turn, not by the whole batch.

    Results expire `ttl_s` after they finish. A client holds at most `max_results_per_client`
    unexpired results; beyond that its own oldest are dropped, never another client's.

    Args:
        max_images / max_bytes: images / bytes of decoded images queued or running at once; more ->
            `QueueFullError` (HTTP 503).
        ttl_s: seconds a finished task's result is kept.
        max_results_per_client: unexpired results kept per client.
        clock: monotonic seconds (tests inject their own).
    """

    def __init__(
        self,
        max_images: int = MAX_QUEUED_IMAGES,
        ttl_s: float = 3600.0,
        max_bytes: int = MAX_QUEUED_BYTES,
        max_results_per_client: int = MAX_RESULTS_PER_CLIENT,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_images, self.max_bytes, self.ttl_s = max_images, max_bytes, ttl_s
        self.max_results_per_client, self.clock = max_results_per_client, clock
        self._queued_images = self._queued_bytes = 0
        self._cond = threading.Condition()
        self._pending: OrderedDict[str, deque[_Job]] = OrderedDict()  # client -> its jobs, in turn order
        self._results: OrderedDict[str, _Result] = OrderedDict()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="melanoma-task", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------------------- admission
    @property
    def queued_images(self) -> int:
        with self._cond:
            return self._queued_images

    @property
    def queued_bytes(self) -> int:
        with self._cond:
            return self._queued_bytes

    def reserve(self, n_images: int) -> None:
        """Claim room for `n_images`, or raise `QueueFullError`."""
        with self._cond:
            if self._queued_images + n_images > self.max_images:
                raise QueueFullError(
                    f"The queue holds {self._queued_images} of at most {self.max_images} images; retry in a few seconds."
                )
            self._queued_images += n_images

    def reserve_bytes(self, n_bytes: int) -> None:
        """Claim room for `n_bytes` of files, or raise `QueueFullError`."""
        with self._cond:
            if self._queued_bytes + n_bytes > self.max_bytes:
                raise QueueFullError(
                    f"The queue holds {format_bytes(self._queued_bytes)} of at most {format_bytes(self.max_bytes)} "
                    "of images; retry in a few seconds."
                )
            self._queued_bytes += n_bytes

    def release(self, n_images: int, n_bytes: int = 0) -> None:
        with self._cond:
            self._queued_images -= n_images
            self._queued_bytes -= n_bytes

    # ------------------------------------------------------------------------------- work
    def submit(self, work: Work, n_images: int, n_bytes: int = 0, client: str = "") -> str:
        """Queue `work` (returns the task's result dict; a generator function yields between steps)
        on a `reserve(n_images)` / `reserve_bytes(n_bytes)` claim; returns the task's uuid."""
        task_uuid = str(uuid.uuid4())
        with self._cond:
            self._prune(client)
            self._results[task_uuid] = _Result(client)
            self._pending.setdefault(client, deque()).append(_Job(task_uuid, _as_steps(work), n_images, n_bytes))
            self._cond.notify()
        return task_uuid

    def _next_job(self) -> tuple[str, _Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            client, jobs = next(iter(self._pending.items()))
            return client, jobs[0]

    def _run(self) -> None:
        while (turn := self._next_job()) is not None:
            client, job = turn
            body = None
            try:
                next(job.steps)  # one step: a chunk of images
            except StopIteration as stop:
                body = {"status": "done", **stop.value}
            except Exception as err:  # reported to the client; the worker keeps serving
                logger.exception("Task %s failed", job.task_uuid)
                body = {"status": "failed", "detail": str(err)}
            with self._cond:
                jobs = self._pending[client]
                if body is not None:
                    jobs.popleft()
                    self._queued_images -= job.n_images
                    self._queued_bytes -= job.n_bytes
                    result = self._results.get(job.task_uuid)
                    if result is not None:
                        result.status, result.body, result.finished_at = body["status"], body, self.clock()
                if jobs:
                    self._pending.move_to_end(client)  # the next client's turn
                else:
                    del self._pending[client]

    # ---------------------------------------------------------------------------- results
    def _prune(self, client: str | None = None) -> None:
        """Drop expired results; then, for `client`, its own oldest finished results over the cap."""
        now = self.clock()
        for key in [k for k, r in self._results.items() if r.finished_at is not None and now - r.finished_at > self.ttl_s]:
            del self._results[key]
        if client is None:
            return
        own = [k for k, r in self._results.items() if r.client == client]
        finished = [k for k in own if self._results[k].finished_at is not None]
        for key in finished[: max(0, len(own) + 1 - self.max_results_per_client)]:
            del self._results[key]

    def get(self, task_uuid: str) -> dict[str, Any] | None:
        """{"status": "pending"} while queued or running; then the task's result; None when unknown
        or expired."""
        with self._cond:
            self._prune()
            result = self._results.get(task_uuid)
            if result is None:
                return None
            return dict(result.body) if result.finished_at is not None else {"status": "pending"}

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
