"""Serving benchmark of app.py (not a test): concurrency, failures and end-to-end latency.

    .venv/bin/python bench/bench_app.py [--clients 20] [--requests 5] [--single 20] [--bulk 200]
        [--parts single,load,memory,sessions,bulk,breakdown] [--sessions 40]

Starts the real app (`python app.py`) in a subprocess on 127.0.0.1:<free port> with 2 torch
threads, using the default model of `models/` (or, when `models/` holds no classifier, a
random-init MelanomaViT of DeiT-Tiny size, 224 px / patch 16 / 192 wide / 12 layers / 3 heads,
built in a temporary folder; `--fallback tiny` builds the 32-px test-size model instead) and
the shipped OOD detector. Then, on the real fixture images:

1. single-image end-to-end latency through gradio_client `/predict` (prediction + attention
   rollout overlay + OOD check + Gradio I/O), sequential; target p50 <= 300 ms on 2 CPU cores;
2. the same through REST (`POST /predict`, poll `GET /from_task/{id}` every 20 ms);
3. N concurrent clients x M requests over REST, then over gradio_client `/predict`:
   failures, HTTP 503 (queue full) answers, p50/p95 latency, throughput;
4. decode memory: peak RSS growth of the server process (its VmHWM, reset through
   /proc/<pid>/clear_refs) for the two small-file, big-image PNGs of issue 10, generated here:
   7000x7000 16-bit greyscale and 7000x7000 RGBA, each sent through REST and gradio_client;
   target <= 300 MB per upload;
5. session memory: `--sessions` single-image predictions, each from a new page session (a new
   gradio_client), after 5 warm-up ones: the server's RSS growth; target <= +150 MB for 40;
6. bulk throughput: one `POST /predict_bulk` of `--bulk` fixture copies, images/s until the task
   is done (upload + admission + decode + scoring), and the server's peak RSS growth;
7. an in-process breakdown (zoo predict, analyze = predict + rollout, OOD check).
Prints REST / gradio ratios side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def fixture_images() -> list[Path]:
    return sorted((FIXTURES / "ham10000" / "images").glob("*.jpg")) + sorted((FIXTURES / "isic2017" / "test").glob("*.jpg"))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(name: str, latencies: list[float], failures: int, extra: str = "") -> str:
    if not latencies:
        return f"{name:46s} no successful request, failures {failures}"
    return (
        f"{name:46s} n={len(latencies):3d} failures={failures} p50 {1000 * statistics.median(latencies):7.0f} ms"
        f"  p95 {1000 * pct(latencies, 95):7.0f} ms {extra}"
    )


def build_fallback_model(root: Path, kind: str) -> str:
    """A random-init MelanomaViT folder under root; returns its name."""
    import torch
    from transformers import ViTImageProcessor

    from model import MelanomaViTConfig, MelanomaViTForImageClassification
    from model.labels import dx_id2label, dx_label2id

    torch.manual_seed(0)
    if kind == "tiny":
        name, size = "bench-vit-tiny32", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=37)
    else:
        name, size = "bench-deit-tiny-size", dict(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12,
                                                  num_attention_heads=3, intermediate_size=768)
    model = MelanomaViTForImageClassification(MelanomaViTConfig(**size, id2label=dx_id2label(), label2id=dx_label2id()))
    model.save_pretrained(root / name)
    side = size["image_size"]
    ViTImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(root / name)
    return name


def start_server(env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # drain logs
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/public_models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("app.py did not answer within 300 s")


def rest_request(client: httpx.Client, base: str, path: Path) -> tuple[float, int]:
    """POST /predict then poll /from_task; returns (latency s, number of 503 answers). Raises on failure."""
    start = time.perf_counter()
    busy = 0
    while True:
        response = client.post(f"{base}predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
        if response.status_code != 503:
            break
        busy += 1
        time.sleep(0.1)
    response.raise_for_status()
    task = response.json()["task_uuid"]
    while True:
        body = client.get(f"{base}from_task/{task}").raise_for_status().json()
        if body["status"] != "pending":
            break
        time.sleep(0.02)
    if body["status"] != "done" or not body["results"] or "prediction" not in body["results"][0]:
        raise RuntimeError(f"task {task} ended as {body}")
    return time.perf_counter() - start, busy


def gradio_request(client, path: Path) -> float:
    from gradio_client import handle_file

    start = time.perf_counter()
    probs, verdict, heatmap, plain, record = client.predict(
        handle_file(str(path)), None, "mean", 0.9, 0, api_name="/predict"
    )
    if not record or "prediction" not in record or not heatmap:
        raise RuntimeError(f"bad /predict answer for {path.name}: {record}")
    return time.perf_counter() - start


def concurrent(kind: str, base: str, clients: int, per_client: int, images: list[Path]) -> tuple[list[float], int, int, float]:
    from gradio_client import Client

    latencies: list[float] = []
    failures = busy = 0
    lock = threading.Lock()

    def worker(i: int) -> None:
        nonlocal failures, busy
        session = httpx.Client(timeout=300) if kind == "rest" else Client(base, verbose=False)
        try:
            for j in range(per_client):
                path = images[(i * per_client + j) % len(images)]
                try:
                    if kind == "rest":
                        latency, n_busy = rest_request(session, base, path)
                    else:
                        latency, n_busy = gradio_request(session, path), 0
                    with lock:
                        latencies.append(latency)
                        busy += n_busy
                except Exception as err:  # noqa: BLE001 - every failure is counted and shown
                    with lock:
                        failures += 1
                    print(f"  {kind} client {i} request {j} failed: {err!r}"[:300])
        finally:
            session.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return latencies, failures, busy, time.perf_counter() - start


def server_memory_mib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of process `pid` in MiB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def reset_peak(pid: int) -> int:
    """Resets the process's peak RSS to its current RSS; returns that RSS (MiB)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return server_memory_mib(pid)[0]


def big_pngs() -> dict[str, bytes]:
    """Issue 10's PNGs: small files that decode to 7000x7000 16-bit greyscale and 7000x7000 RGBA."""
    import io

    import numpy as np
    from PIL import Image

    gradient = np.add.outer(np.arange(7000, dtype=np.uint16), np.arange(7000, dtype=np.uint16)) * 4
    rgba = np.zeros((7000, 7000, 4), dtype=np.uint8)
    rgba[..., 0], rgba[:3500, :, 3] = 200, 255
    out = {}
    for name, image in (("grey16_7000.png", Image.fromarray(gradient)), ("rgba_7000.png", Image.fromarray(rgba, "RGBA"))):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out[name] = buffer.getvalue()
    return out


def decode_memory(base: str, pid: int, tmp: Path) -> None:
    from gradio_client import Client, handle_file

    client = Client(base, verbose=False)
    with httpx.Client(timeout=300) as http:
        for name, data in big_pngs().items():
            (tmp / name).write_bytes(data)
            for route in ("REST /predict", "gradio /predict"):
                before = reset_peak(pid)
                start = time.perf_counter()
                if route.startswith("REST"):
                    task = http.post(f"{base}predict", files={"file": (name, data)}).raise_for_status().json()["task_uuid"]
                    while http.get(f"{base}from_task/{task}").json()["status"] == "pending":
                        time.sleep(0.05)
                else:
                    client.predict(handle_file(str(tmp / name)), None, "mean", 0.9, 0, api_name="/predict")
                growth = server_memory_mib(pid)[1] - before
                verdict = "OK" if growth <= 300 else "MISSED"
                print(f"{name} ({len(data) / 1e3:.0f} KB) {route:16s} peak RSS +{growth:4d} MiB "
                      f"(target <= 300: {verdict}), {time.perf_counter() - start:.1f} s")
    client.close()


def session_memory(base: str, pid: int, images: list[Path], n: int, warm_up: int = 5) -> int:
    """RSS growth (MiB) of the server over `n` single-image predictions from new sessions (one
    gradio_client each, as n visitors), after `warm_up` of them; printed beside the target."""
    from gradio_client import Client

    def one(i: int) -> None:
        client = Client(base, verbose=False)
        gradio_request(client, images[i % len(images)])
        client.close()

    for i in range(warm_up):
        one(i)
    before = server_memory_mib(pid)[0]
    for i in range(n):
        one(i)
    growth = server_memory_mib(pid)[0] - before
    target = 150 * n / 40
    print(f"{'RSS growth over ' + str(n) + ' new sessions':46s} {growth:+d} MiB (RSS {before} MiB before; "
          f"target <= +{target:.0f} MiB) {'OK' if growth <= target else 'MISSED'}")
    return growth


def bulk_throughput(base: str, pid: int, images: list[Path], n: int) -> None:
    uploads = [("files", (f"copy{i:04d}_{images[i % len(images)].name}", images[i % len(images)].read_bytes(), "image/jpeg"))
               for i in range(n)]
    before = reset_peak(pid)
    with httpx.Client(timeout=600) as http:
        start = time.perf_counter()
        response = http.post(f"{base}predict_bulk", files=uploads).raise_for_status().json()
        admitted = time.perf_counter() - start
        while (body := http.get(f"{base}from_task/{response['task_uuid']}").json())["status"] == "pending":
            time.sleep(0.1)
        wall = time.perf_counter() - start
    assert body["status"] == "done" and len(body["results"]) == n, body.get("detail")
    growth = server_memory_mib(pid)[1] - before
    print(f"POST /predict_bulk of {n} images: queued after {admitted:.1f} s, done after {wall:.1f} s = "
          f"{n / wall:.1f} images/s; server peak RSS +{growth} MiB")


def in_process_breakdown(models_dir: str, model_id: str, images: list[Path], n: int) -> None:
    import torch
    from PIL import Image

    from model.catalogue import ModelCatalogue

    torch.set_num_threads(2)
    zoo = ModelCatalogue(models_dir=models_dir, hub_ids=[])
    entry = zoo.get(model_id)
    pil = [Image.open(p).convert("RGB") for p in images]
    zoo.check_ood(pil[:1]), entry.analyze(pil[0]), entry.predict(pil[:1])  # warm-up
    for name, fn in (
        ("zoo predict (1 image)", lambda im: entry.predict([im])),
        ("zoo analyze = predict + rollout overlay", lambda im: entry.analyze(im)),
        ("OOD check (EfficientNet-Lite0 @160 + PPCA)", lambda im: zoo.check_ood([im])),
    ):
        times = []
        for i in range(n):
            start = time.perf_counter()
            fn(pil[i % len(pil)])
            times.append(time.perf_counter() - start)
        print(summary(f"in-process {name}", times, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=5, help="requests per client")
    parser.add_argument("--single", type=int, default=20, help="sequential single-image requests")
    parser.add_argument("--fallback", choices=["deit-tiny", "tiny"], default="deit-tiny")
    parser.add_argument("--max-queued-images", type=int, default=None, help="MELANOMA_MAX_QUEUED_IMAGES (app default 2000)")
    parser.add_argument("--bulk", type=int, default=200, help="images in the bulk-throughput request")
    parser.add_argument("--sessions", type=int, default=40, help="new-session predictions of the sessions part")
    parser.add_argument("--parts", default="single,load,memory,sessions,bulk,breakdown", help="comma-separated parts to run")
    args = parser.parse_args()

    import app as app_module
    from gradio_client import Client

    from model.catalogue import ModelCatalogue

    images = fixture_images()
    models_dir = os.environ.get("MELANOMA_MODELS_DIR") or str(ROOT / "models")
    zoo = ModelCatalogue(models_dir=models_dir, hub_ids=[])
    tmp = None
    if zoo.default_id is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_app_models_")
        models_dir = tmp.name
        model_id = build_fallback_model(Path(models_dir), args.fallback)
        note = f"no classifier under models/: built random-init {model_id}"
    else:
        model_id, note = zoo.default_id, "default model of models/"
    port = app_module.free_port()
    env = {
        **os.environ,
        "MELANOMA_MODELS_DIR": models_dir,
        "MELANOMA_DEFAULT_MODEL": model_id,
        "MELANOMA_HUB_MODELS": "",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
    }
    if args.max_queued_images:
        env["MELANOMA_MAX_QUEUED_IMAGES"] = str(args.max_queued_images)
    parts = set(args.parts.split(","))
    base = f"http://127.0.0.1:{port}/"
    print(f"model: {model_id} ({note}); {len(images)} fixture images; server {base}; "
          f"{os.cpu_count()} CPU cores visible; queue size {env.get('MELANOMA_MAX_QUEUED_IMAGES', '2000 (default)')} images; "
          f"load average {os.getloadavg()[0]:.1f} (timings scale with other processes on the machine)")
    proc = start_server(env, port)
    try:
        client = Client(base, verbose=False)
        for path in images[:3]:
            gradio_request(client, path)  # warm-up: first calls load weights / JIT paths
        if "single" in parts:
            single_g = [gradio_request(client, images[i % len(images)]) for i in range(args.single)]
            with httpx.Client(timeout=300) as http:
                rest_request(http, base, images[0])
                single_r = [rest_request(http, base, images[i % len(images)])[0] for i in range(args.single)]
            print("\n-- single image, sequential (end to end, from the client)")
            print(summary("gradio_client /predict (with rollout)", single_g, 0,
                          "target p50 <= 300 ms " + ("OK" if statistics.median(single_g) <= 0.3 else "MISSED")))
            print(summary("REST POST /predict + poll (no explanation)", single_r, 0))
            print(f"{'ratio REST / gradio_client p50':46s} {statistics.median(single_r) / statistics.median(single_g):.2f}x")
        client.close()

        if "load" in parts:
            print(f"\n-- {args.clients} concurrent clients x {args.requests} requests")
            results = {}
            for kind in ("rest", "gradio"):
                lat, fails, busy, wall = concurrent(kind, base, args.clients, args.requests, images)
                results[kind] = lat
                label = "REST /predict + /from_task" if kind == "rest" else "gradio_client /predict"
                print(summary(label, lat, fails, f" 503 answers {busy}, {len(lat) / wall:5.1f} req/s, wall {wall:.1f} s"))
            if results["rest"] and results["gradio"]:
                print(f"{'ratio REST / gradio_client p50':46s} "
                      f"{statistics.median(results['rest']) / statistics.median(results['gradio']):.2f}x")
        if "memory" in parts:
            print("\n-- decode memory: peak RSS growth of the server per upload")
            with tempfile.TemporaryDirectory(prefix="bench_app_png_") as png_dir:
                decode_memory(base, proc.pid, Path(png_dir))
        if "sessions" in parts:
            print("\n-- session memory: single-image predictions from new page sessions")
            session_memory(base, proc.pid, images, args.sessions)
        if "bulk" in parts:
            print("\n-- bulk throughput (REST)")
            bulk_throughput(base, proc.pid, images, args.bulk)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if "breakdown" in parts:
        print("\n-- in-process breakdown (same model, this process, 2 threads)")
        in_process_breakdown(models_dir, model_id, images, args.single)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
