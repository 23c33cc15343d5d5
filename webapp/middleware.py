"""ASGI middleware in front of the whole app (REST and Gradio): request-size limits, the
cross-site (Origin) check, and the rule that Gradio endpoints only read files uploaded to this app."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

from gradio.utils import is_in_or_equal
from starlette.types import ASGIApp, Receive, Scope, Send

from model.imageio import format_bytes

logger = logging.getLogger(__name__)


async def _answer(send: Send, status: int, detail: str, close: bool = False) -> None:
    """A JSON error answer `{"detail": ...}` (the shape FastAPI gives the REST routes' errors)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuses oversized request bodies with the app's own 413 JSON: from Content-Length before any
    byte is read, and while streaming for bodies without one (or with a false one).

    Args:
        app: the ASGI app.
        limits: path -> largest body in bytes for POSTs to that path.
        messages: path -> the 413's text where the body limit is not what the user should read (a
            single-file request says its file limit, "20 MiB", not the body's "21,037,056 bytes").
    """

    def __init__(self, app: ASGIApp, limits: dict[str, int], messages: dict[str, str] | None = None):
        self.app, self.limits, self.messages = app, limits, messages or {}

    async def _refuse(self, send: Send, path: str, limit: int) -> None:
        detail = self.messages.get(path, f"Request body is larger than the {format_bytes(limit)} limit.")
        await _answer(send, 413, detail, close=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if limit is None:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, scope["path"], limit)
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
            await self._refuse(send, scope["path"], limit)


def local_host_names() -> set[str]:
    """The names this machine answers to: loopback, its host name and addresses, and on Hugging Face
    Spaces the Space's own host ($SPACE_HOST)."""
    names = {"localhost", "127.0.0.1", "[::1]", "0.0.0.0"}
    try:
        hostname, aliases, addresses = socket.gethostbyname_ex(socket.gethostname())
        names.update(n.lower() for n in (hostname, *aliases, *addresses))
    except OSError:
        pass
    if os.environ.get("SPACE_HOST"):
        names.add(os.environ["SPACE_HOST"].lower())
    return names


class OriginCheckMiddleware:
    """Refuses (403) state-changing browser requests sent from another site's page: a POST whose
    Origin is neither this server's own nor listed in `allowed`. Requests without an Origin header
    (curl, gradio_client, scripts) are not browser cross-site requests and pass.

    "This server's own" is an origin equal to the request's scheme and Host whose host name is one
    this server answers to (`trusted_hosts`): a page of a rebinding domain (evil.example resolving
    to 127.0.0.1) sends a matching Host header, but its name is not trusted.
    """

    def __init__(self, app: ASGIApp, allowed: Sequence[str] = (), trusted_hosts: set[str] | None = None):
        self.app = app
        self.allowed = {origin.strip().rstrip("/").lower() for origin in allowed if origin.strip()}
        self.trusted_hosts = local_host_names() if trusted_hosts is None else trusted_hosts

    def own_origin(self, origin: str, scope: Scope, host: str) -> bool:
        scheme, _, origin_host = origin.partition("://")
        request_schemes = {scope.get("scheme", "http")}
        forwarded = dict(scope["headers"]).get(b"x-forwarded-proto")
        if forwarded:  # behind the Spaces / a TLS proxy the app itself sees http
            request_schemes.add(forwarded.decode("latin-1").split(",")[0].strip().lower())
        name = origin_host.rsplit(":", 1)[0] if not origin_host.endswith("]") else origin_host
        return scheme in request_schemes and origin_host == host and name in self.trusted_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
            host = headers.get(b"host", b"").decode("latin-1").lower()
            if origin and not self.own_origin(origin, scope, host) and origin not in self.allowed:
                return await _answer(send, 403, "Cross-site request refused: this page's origin is not allowed "
                                                "(set MELANOMA_ALLOWED_ORIGINS to allow it).")
        await self.app(scope, receive, send)


def _file_paths(value: Any) -> Iterator[Any]:
    """Every `path` of a file reference (Gradio's FileData: a dict with a "path") anywhere in `value`."""
    if isinstance(value, dict):
        if "path" in value:
            yield value["path"]
        for item in value.values():
            yield from _file_paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from _file_paths(item)


class UploadedFilesOnlyMiddleware:
    """Gradio endpoints read only files that were uploaded to this app.

    A Gradio call names its input files by server path (`{"path": ..., "meta": {"_type":
    "gradio.FileData"}}`). `gr.mount_gradio_app` skips Gradio's own check that such a path was
    uploaded (it runs only after `launch()`), so a raw `POST /gradio_api/call/predict` could make the
    server read any file: `/dev/zero` pinned a core, any image was scored and served back, a missing
    path and a folder answered differently. This refuses (403), before any file is touched, every
    call that names a file outside the upload folder, a URL, or anything that is not a path string:
    one answer for all of them, so it tells nothing about what exists on the server. (Gradio's own
    check, were it on, would still download a URL; so the rule is applied here, for every endpoint.)

    Args:
        app: the ASGI app.
        upload_dir: the folder Gradio keeps uploads in (`gradio.utils.get_upload_folder()`).
        prefix: the Gradio API's path prefix; its upload route itself is not checked.
        max_json_bytes: largest Gradio call body (file references are short: 1 MiB is thousands).
    """

    REFUSED = "Files must be uploaded to this app first (POST /gradio_api/upload); other paths are refused."

    def __init__(self, app: ASGIApp, upload_dir: str, prefix: str = "/gradio_api/", max_json_bytes: int = 2**20,
                 stale_upload_s: float = 600.0):
        self.app, self.prefix, self.max_json_bytes = app, prefix, max_json_bytes
        self.upload_dir = os.path.realpath(upload_dir)
        self.exempt = {prefix + "upload", prefix + "upload/"}
        self.stale_upload_s = stale_upload_s

    def sweep_broken_uploads(self) -> list[str]:
        """Delete the partial files of uploads that never completed; returns their names.

        Gradio streams each upload into `tmp*` at the top of its upload folder and moves it into a
        folder of its own when the request completes; a request cut off by the size limit, a client
        that went away or a malformed form leaves that file behind for good (up to the request limit
        each). A loose `tmp*` file not written to for `stale_upload_s` is such a leftover (an upload in
        progress keeps writing to its file)."""
        removed = []
        cutoff = time.time() - self.stale_upload_s
        try:
            entries = list(os.scandir(self.upload_dir))
        except FileNotFoundError:
            return removed
        for entry in entries:
            try:
                if entry.name.startswith("tmp") and entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except FileNotFoundError:
                continue  # another request swept it
        if removed:
            logger.info("removed %d partial upload file(s) left by broken uploads", len(removed))
        return removed

    def uploaded(self, path: Any) -> bool:
        """True for a path string whose real location (symlinks and `..` resolved) is in the upload folder."""
        if not isinstance(path, str) or not path or "\0" in path or "://" in path:
            return False
        return is_in_or_equal(path, self.upload_dir)  # Gradio's own rule (resolves `..` and symlinks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and scope["method"] == "POST" and path in self.exempt:
            try:
                return await self.app(scope, receive, send)
            finally:
                self.sweep_broken_uploads()
        if not (scope["type"] == "http" and scope["method"] == "POST" and path.startswith(self.prefix)
                and path not in self.exempt):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_json_bytes:
                return await _answer(send, 413, f"Request body is larger than the "
                                                f"{format_bytes(self.max_json_bytes)} limit.", close=True)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            payload = json.loads(body) if body else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            payload = None  # not JSON: Gradio answers it (it names no file we would read)
        if not all(self.uploaded(p) for p in _file_paths(payload)):
            return await _answer(send, 403, self.REFUSED)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class NoSniffMiddleware:
    """Every response says `X-Content-Type-Options: nosniff`: a served upload or CSV is never run as
    another type than the one it is served as (an HTML-looking "image" stays an image)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_header(message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-content-type-options"]
                message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, with_header)
