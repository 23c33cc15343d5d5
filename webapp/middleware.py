"""ASGI middleware in front of the whole app (REST and Gradio): request-size limits and the
cross-site (Origin) check."""

from __future__ import annotations

import json
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from model.imageio import format_bytes


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
