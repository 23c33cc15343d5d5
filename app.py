"""Melanoma classification demo: Gradio UI + REST API, the Hugging Face Spaces entry point.

RESEARCH AND EDUCATION DEMO - NOT A MEDICAL DEVICE. It does not diagnose, screen for or rule
out skin cancer.

Run: `python app.py` serves on http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
respected, e.g. 0.0.0.0 on Hugging Face Spaces), offline, with the models under `models/`.
The app itself lives in `webapp/` (see its package docstring); the ML in `model/`.

- Gradio UI at `/` with named API endpoints `/predict` (one image), `/predict_batch` and
  `/explanation_opacity`.
- REST (OpenAPI docs at `/docs`): `GET /public_models`, `POST /predict?model_id=`,
  `POST /predict_bulk?model_id=`, `GET /from_task/{task_uuid}`.

Environment: MELANOMA_MODELS_DIR, MELANOMA_HUB_MODELS, MELANOMA_DEFAULT_MODEL (see model/catalogue.py),
MELANOMA_OOD_PATH (out-of-distribution detector folder; "none" disables it), MELANOMA_BACKEND
(auto | torch | onnx | onnx-int8, default auto: each model's fastest measured backend that meets
the accuracy bar, `model/onnx_backend.py`),
MELANOMA_MAX_QUEUED_IMAGES (REST queue size in images, default 2000), MELANOMA_MAX_QUEUED_BYTES
(REST queue size in bytes of the decoded images it holds, default 512 MiB), MELANOMA_TASK_TTL_S (default
3600), MELANOMA_MAX_REQUEST_BYTES (largest bulk request body, default 256 MiB), MELANOMA_CACHE_TTL_S
(seconds uploads, thumbnails and CSVs are kept, default 3600), MELANOMA_ALLOWED_ORIGINS (comma-separated
origins whose browser pages may POST here; same-origin pages always may).
"""

from __future__ import annotations

import logging
import os

from webapp import build_app, create_app, free_port, serve
from webapp.formatting import DISCLAIMER

__all__ = ["build_app", "create_app", "free_port", "serve"]

logger = logging.getLogger(__name__)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    _, app = build_app()
    zoo = app.state.zoo
    if zoo.default_id is not None:
        zoo.get(zoo.default_id)  # load once at startup, not on the first request
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    logger.info("Serving on http://%s:%d (REST docs at /docs). %s", host, port, DISCLAIMER)
    serve(app, host=host, port=port)


if __name__ == "__main__":
    main()
