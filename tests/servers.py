"""Serving the app in-process for tests: uvicorn on a background thread, stopped by the caller."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI

from webapp import free_port


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> tuple[uvicorn.Server, threading.Thread]:
    """Serve `app` on a daemon thread; returns (server, thread) once it accepts connections.

    Stop it with `server.should_exit = True; thread.join()`.
    """
    # Graceful-shutdown timeout: open Gradio heartbeat streams would otherwise block exit.
    config = uvicorn.Config(app, host=host, port=port or free_port(host), log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"Server did not start on {host}:{config.port}.")
        time.sleep(0.05)
    return server, thread

