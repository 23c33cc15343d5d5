"""Batch prediction speed: train/predict.py end to end against the model's raw forward pass.

    .venv/bin/python bench/bench_predict.py --model models/efficientnet-lite2 --n 256 --batch_size 32

Prints, on the same machine and model, at the same batch size:
1. raw forward img/s: `model(pixel_values)` on already preprocessed batches (no decode, no TTA);
2. predict.py end to end img/s: its scoring loop (decode + preprocess in the loader workers,
   forward, CSV write), from the line it logs, in one process;
3. their ratio (target >= 0.7 at batch 32 on CPU);
4. 1 vs 2 processes (accelerate's launcher, CPU processes): scoring-loop img/s and the whole
   command's wall time (start-up and model loading included).
The not-dermoscopy check is off (`--ood none`) unless `--ood` is given: it is a second network.
Numbers on a shared 2-core machine are noisy; run with nothing else busy for clean ones.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from model.imageio import load_image
from model.classifier import Classifier
from train.stream import RecordSource

ROOT = Path(__file__).resolve().parents[1]
PREDICT_PY = ROOT / "train" / "predict.py"
LOOP_LINE = re.compile(r"scoring loop: (\d+) rows in ([\d.]+) s = ([\d.]+) img/s")


def raw_forward(model: str, data: str, batch_size: int, repeats: int) -> float:
    """img/s of the bare forward pass on one preprocessed batch of real images."""
    entry = Classifier(Path(model).name, model)
    records = []
    for record in RecordSource(data):
        records.append(record)
        if len(records) == batch_size:
            break
    images = [load_image(r.image, max_side=1024) for r in records]
    pixel_values = entry.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        entry.model(pixel_values=pixel_values)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            entry.model(pixel_values=pixel_values)
        seconds = time.perf_counter() - start
    return repeats * len(images) / seconds


def predict_run(processes: int, args: argparse.Namespace, out: Path) -> tuple[float, float]:
    """(scoring-loop img/s, whole-command seconds) of one predict.py run."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [*launcher, str(PREDICT_PY), "--cpu", "--model", args.model, "--data", args.data, "--output_dir", str(out),
           "--limit", str(args.n), "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers),
           "--num_threads", str(args.threads), "--ood", args.ood]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    match = LOOP_LINE.search(proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"predict.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(match.group(3)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "efficientnet-lite2"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "isic2017" / "labels.csv"))
    parser.add_argument("--n", type=int, default=256, help="images per predict.py run")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=1, help="loader workers per process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes of the raw batch")
    parser.add_argument("--ood", default="none", help="predict.py's --ood (default none: classifier only)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s) per process, "
          f"batch {args.batch_size}, {args.n} images of {args.data}, model {args.model}, OOD check: {args.ood}")
    forward = raw_forward(args.model, args.data, args.batch_size, args.repeats)
    print(f"raw forward ({args.threads} thread(s)):        {forward:8.2f} img/s")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            runs[processes] = predict_run(processes, args, Path(tmp) / f"p{processes}")
    one = runs.get(1)
    if one is not None:
        print(f"predict.py end to end, 1 process:  {one[0]:8.2f} img/s (command {one[1]:.1f} s)")
        print(f"ratio end to end / raw forward:    {one[0] / forward:8.2f} (target >= 0.7)")
    for processes, (rate, wall) in runs.items():
        if processes != 1:
            line = f"predict.py end to end, {processes} processes: {rate:8.2f} img/s (command {wall:.1f} s)"
            print(line + (f"; {rate / one[0]:.2f}x the 1-process loop" if one else ""))


if __name__ == "__main__":
    main()
