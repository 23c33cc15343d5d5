"""Speed and peak memory of MelanomaViT against timm and transformers on the same ViT-S/16-224 weights.

    .venv/bin/python bench/bench_vit.py            # ~3 minutes on 2 shared CPU cores

Builds a randomly initialised timm `vit_small_patch16_224` (7 classes), converts it to MelanomaViT
(`convert_timm_checkpoint`) and to transformers' `ViTForImageClassification` (`export_to_vit`),
checks the three give equal logits, then, on CPU in eval mode under `torch.inference_mode` with
`torch.set_num_threads(2)`:

* speed: batch 1 and 16, warm-up then rounds that time every model once in turn (so load changes
  on the shared machine hit all of them alike); images/s from the median round; ratios ours/timm,
  ours/hf (> 1 = ours faster) and the time cost of `output_attentions=True` (target <= 1.3x).
* peak memory of one batch-16 forward pass, each model in its own fresh subprocess: the process's
  resident-set high-water mark is reset (`/proc/self/clear_refs` = 5) after building the model,
  one warm-up pass and `malloc_trim(0)` (so freed heap cannot hide the pass's needs), and the median
  over 5 passes of the increase of `VmHWM` over the resident set before the measured pass is
  reported (activations + allocator growth; the weights are excluded). tracemalloc cannot see torch's
  allocations, hence the kernel counters. Target: ours within 10% of timm.

Numbers are noisy: the CPU is shared with other jobs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

MODELS = ("timm", "ours", "hf", "ours+attn")


def build_models(weights: Path | None = None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The timm, MelanomaViT and transformers ViT-S/16-224 with the same weights, as logits functions."""
    import timm
    from safetensors.torch import load_file, save_file

    from model.convert import convert_timm_checkpoint, export_to_vit

    timm_model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=7).eval()
    if weights is not None and weights.exists():
        timm_model.load_state_dict(load_file(weights))
    elif weights is not None:
        save_file(timm_model.state_dict(), weights)
    ours = convert_timm_checkpoint(timm_model)
    hf = export_to_vit(ours)
    return {
        "timm": timm_model,
        "ours": lambda x: ours(x).logits,
        "hf": lambda x: hf(x).logits,
        "ours+attn": lambda x: ours(x, output_attentions=True).logits,
    }


def time_models(models: dict, batch: int, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per forward pass of each model at `batch`, models interleaved round by round."""
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in models.values():
                fn(x)
        for _ in range(rounds):
            for name, fn in models.items():
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def memory_worker(name: str, weights: Path, batch: int, threads: int, repeats: int = 5) -> None:
    """Print JSON with the median peak resident-memory increase (MiB) of a forward pass of `name`."""
    torch.set_num_threads(threads)
    fn = build_models(weights)[name]
    x = torch.randn(batch, 3, 224, 224)
    libc = ctypes.CDLL("libc.so.6")
    increases = []
    with torch.inference_mode():
        fn(x)  # warm-up: one-off allocations (thread pools, kernels) are not the model's per-pass cost
        for _ in range(repeats):
            # Hand freed heap back to the kernel, else the measured pass reuses it unseen.
            libc.malloc_trim(0)
            before = _status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
            fn(x)
            increases.append((_status_kib("VmHWM") - before) / 1024)
    print(json.dumps({"name": name, "peak_increase_mib": statistics.median(increases), "all_mib": increases}))


def measure_memory(weights: Path, batch: int, threads: int) -> dict[str, float]:
    results = {}
    for name in MODELS:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-worker", name, "--weights", str(weights), "--batch", str(batch),
             "--threads", str(threads)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_increase_mib"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, nargs=2, default=(20, 5), metavar=("B1", "B16"),
                        help="timed rounds at batch 1 and batch 16")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="batch of the memory measurement")
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.weights, args.batch, args.threads)
        return

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU shared with other jobs (noisy)")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "vit_small_patch16_224.safetensors"
        torch.manual_seed(0)
        models = build_models(weights)
        x = torch.randn(2, 3, 224, 224)
        with torch.inference_mode():
            reference = models["timm"](x)
            for name in ("ours", "hf", "ours+attn"):
                torch.testing.assert_close(models[name](x), reference, atol=1e-4, rtol=1e-4)
        print("parity: ours, hf and ours+attn logits equal timm's (atol=rtol=1e-4)")

        print(f"\n{'batch':>5} {'model':>10} {'ms/batch':>10} {'img/s':>8}")
        for batch, rounds in zip((1, 16), args.rounds):
            seconds = time_models(models, batch, rounds, args.warmup)
            for name in MODELS:
                print(f"{batch:>5} {name:>10} {1000 * seconds[name]:>10.1f} {batch / seconds[name]:>8.2f}")
            print(
                f"      speed ours/timm = {seconds['timm'] / seconds['ours']:.3f}   "
                f"ours/hf = {seconds['hf'] / seconds['ours']:.3f}   "
                f"time ours+attn / ours = {seconds['ours+attn'] / seconds['ours']:.3f}   ({rounds} rounds, median)"
            )

        memory = measure_memory(weights, args.batch, args.threads)
        print(f"\npeak resident-memory increase of one batch-{args.batch} forward pass (fresh process per model):")
        for name in MODELS:
            print(f"{name:>10} {memory[name]:>8.1f} MiB")
        print(
            f"      memory ours/timm = {memory['ours'] / memory['timm']:.3f}   "
            f"ours/hf = {memory['ours'] / memory['hf']:.3f}"
        )


if __name__ == "__main__":
    main()
