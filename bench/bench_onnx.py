"""CPU speed of the backends (not a test): PyTorch vs ONNX fp32 vs ONNX int8, side by side, one run.

    .venv/bin/python bench/bench_onnx.py [--threads 2] [--repeats 30] [--single 20] [--bulk 100]
        [--models efficientnet-lite2,...] [--app-model efficientnet-lite2] [--parts models,app]

1. models: for every classifier folder under models/ and every backend it has (torch, onnx,
   onnx-int8; `model.onnx_backend`), through `Classifier.predict_pixel_values` (forward + calibrated
   softmax of every head, the app's and predict.py's path) on preprocessed fixture images:
   batch-1 latency p50 / p95 over --repeats runs, and images/s at batch 32 (three batches), after
   a warm-up; the ratios to PyTorch on the same rows.
2. app: the real app (bench/bench_app.py's server) once per backend (MELANOMA_BACKEND) with the
   --app-model as default: single-click latency through gradio_client `/predict` (prediction +
   explanation overlay + OOD check + Gradio I/O) p50 / p95, and `POST /predict_bulk` images/s.

Every row runs with the same --threads (torch's, which ONNX Runtime sessions take too) in this
one process, so ratios are comparable even on a shared machine; absolute numbers are not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def model_rows(folders: list[Path], images: list[Path], repeats: int) -> None:
    import torch
    from PIL import Image

    from bench_app import pct

    from model.classifier import Classifier
    from model.onnx_backend import available_backends, resolve_backend

    pil = [Image.open(p).convert("RGB") for p in images]
    print(f"\n-- models: Classifier.predict_pixel_values, {torch.get_num_threads()} threads; ratios vs torch")
    print(f"{'model':22s} {'backend':10s} {'b1 p50 ms':>9s} {'b1 p95 ms':>9s} {'b32 img/s':>9s} {'b1 x':>6s} {'b32 x':>6s}"
          "  default")
    for folder in folders:
        base = None
        default = resolve_backend(folder)
        for backend in available_backends(folder):
            clf = Classifier(folder, backend=backend)
            x = clf.pixel_values((pil * 3)[:32])
            one = timed(lambda: clf.predict_pixel_values(x[:1]), repeats)
            batch = timed(lambda: clf.predict_pixel_values(x), 3)
            p50, p95, ips = 1000 * statistics.median(one), 1000 * pct(one, 95), len(x) / statistics.mean(batch)
            base = base or (p50, ips)
            print(f"{folder.name:22s} {backend:10s} {p50:9.1f} {p95:9.1f} {ips:9.1f} "
                  f"{base[0] / p50:5.2f}x {ips / base[1]:5.2f}x  {'<-' if backend == default else ''}")


def app_rows(model_id: str, models_dir: str, images: list[Path], single: int, bulk: int, threads: int) -> None:
    import httpx
    from gradio_client import Client

    from bench_app import gradio_request, pct, start_server

    import app as app_module
    from model.onnx_backend import available_backends

    print(f"\n-- app: {model_id} as default model, per backend (MELANOMA_BACKEND), {threads} threads")
    print(f"{'backend':10s} {'click p50 ms':>12s} {'click p95 ms':>12s} {'bulk img/s':>10s} {'click x':>8s} {'bulk x':>7s}")
    base = None
    for backend in available_backends(Path(models_dir) / model_id):
        port = app_module.free_port()
        env = {**os.environ, "MELANOMA_MODELS_DIR": models_dir, "MELANOMA_DEFAULT_MODEL": model_id, "MELANOMA_HUB_MODELS": "",
               "MELANOMA_BACKEND": backend, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
               "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        proc = start_server(env, port)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            for path in images[:3]:
                gradio_request(client, path)  # warm-up
            clicks = [gradio_request(client, images[i % len(images)]) for i in range(single)]
            client.close()
            uploads = [("files", (f"copy{i:04d}_{images[i % len(images)].name}", images[i % len(images)].read_bytes(),
                                  "image/jpeg")) for i in range(bulk)]
            with httpx.Client(timeout=600) as http:
                start = time.perf_counter()
                task = http.post(f"http://127.0.0.1:{port}/predict_bulk", files=uploads).raise_for_status().json()
                while (body := http.get(f"http://127.0.0.1:{port}/from_task/{task['task_uuid']}").json())["status"] == "pending":
                    time.sleep(0.1)
                wall = time.perf_counter() - start
            assert body["status"] == "done" and len(body["results"]) == bulk, body.get("detail")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        p50, ips = 1000 * statistics.median(clicks), bulk / wall
        base = base or (p50, ips)
        print(f"{backend:10s} {p50:12.1f} {1000 * pct(clicks, 95):12.1f} {ips:10.1f} {base[0] / p50:7.2f}x {ips / base[1]:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=30, help="batch-1 runs per model and backend")
    parser.add_argument("--single", type=int, default=20, help="single clicks per backend in the app")
    parser.add_argument("--bulk", type=int, default=100, help="images of the app's bulk request")
    parser.add_argument("--models", default=None, help="comma-separated folder names (default: every classifier)")
    parser.add_argument("--app-model", default=None, help="the app's model (default: the app's default model)")
    parser.add_argument("--parts", default="models,app")
    args = parser.parse_args()

    import torch

    from bench_app import fixture_images

    from model.catalogue import ModelCatalogue, is_classifier_folder

    torch.set_num_threads(args.threads)
    models_dir = os.environ.get("MELANOMA_MODELS_DIR") or str(ROOT / "models")
    folders = sorted(p for p in Path(models_dir).iterdir() if is_classifier_folder(p))
    if args.models:
        folders = [p for p in folders if p.name in args.models.split(",")]
    images = fixture_images()
    print(f"{len(images)} fixture images; {os.cpu_count()} CPU cores visible; load average {os.getloadavg()[0]:.1f} "
          "(other processes slow every row alike; compare ratios)")
    parts = set(args.parts.split(","))
    if "models" in parts:
        model_rows(folders, images, args.repeats)
    if "app" in parts:
        model_id = args.app_model or ModelCatalogue(models_dir=models_dir, hub_ids=[]).default_id
        app_rows(model_id, models_dir, images, args.single, args.bulk, args.threads)


if __name__ == "__main__":
    main()
