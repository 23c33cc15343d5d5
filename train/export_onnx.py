"""Export every shipped classifier folder to ONNX, quantize it, check the int8 graph, pick the default backend.

    python train/export_onnx.py models --write              # every classifier folder under models/
    python train/export_onnx.py models/melanoma-vit --write # one folder (after retraining it)

Per folder (`model.onnx_export` describes the files):
1. fp32: `model.onnx`, its weights pointing into model.safetensors; P(melanoma) is checked against
   PyTorch on a few test images (max difference must be < 1e-4, else the run stops).
2. int8: `onnx/model_quantized.onnx`: static QDQ quantization calibrated on training images (a
   dx-stratified sample of each source's train split, from the folder's split_manifest.json) for the
   CNNs (timm_wrapper); dynamic quantization for the ViTs (MelanomaViT, hybrid, transformers DeiT).
3. The accuracy bar, on the HAM10000, ISIC 2017 and Derm7pt test splits (train/evaluate.py's
   selection): int8 melanoma AUC within 0.005 of fp32 ONNX on each, and >= 97% agreement of the
   top class (the app's decision rule) on each. A graph that misses it is deleted: fp32 only.
4. Speed: batch-1 latency and batch-32 images/s of torch, fp32 and (passing) int8 on this machine;
   `default_backend` (what `Classifier(backend="auto")` runs) is the one with the best geometric mean
   of the two speed-ups over torch.
Everything measured goes to `onnx/export.json`. Without --write the same runs on a temporary copy
of each folder and only the summary is printed: the folder is left as it was.

Folders that are not classifiers (models/ood-detector: a PPCA on features of a pip-installed
backbone, no model.safetensors) are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a script, Python puts train/ first on sys.path, where train/train.py shadows the `train`
    # package: drop that entry (what `python -P` does).
    del sys.path[0]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from hub_cards.publish import DEFAULT_MAX_MB as MAX_FOLDER_MB  # noqa: E402
from model.catalogue import is_classifier_folder  # noqa: E402
from model.classifier import Classifier  # noqa: E402
from model.imageio import load_image  # noqa: E402
from model.labels import MELANOMA  # noqa: E402
from model.loading import ROLLOUT_MODEL_TYPES  # noqa: E402
from model.onnx_backend import OnnxModel  # noqa: E402
from model.onnx_export import EXPORT_RECORD, FP32_FILE, INT8_FILE, WEIGHTS_FILE, export_fp32, quantize  # noqa: E402

logger = logging.getLogger(__name__)

#: The three test sets of the accuracy bar (names as in the folders' eval/<name>_test).
TEST_SETS = ("ham10000", "isic2017", "derm7pt")
AUC_TOLERANCE = 0.005
MIN_AGREEMENT = 0.97
FP32_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Scores:
    """One backend's scores on one test set: P(mel) (N,), decided class index (N,), melanoma truth (N,)."""

    p_mel: np.ndarray
    decided: np.ndarray
    y_mel: np.ndarray


def _split(folder: Path, data: str, split: str, limit: int | None, seed: int = 0):
    """train/evaluate.py's image selection: the folder's manifest split of `data` (or its own split column)."""
    from train.evaluate import EvalArgs, _select_data

    test, _, info = _select_data(EvalArgs(model=str(folder), data=data, output_dir="-", split=split, limit=limit, label_scheme="dx",
                                          seed=seed))
    return test, info


def _images(ds) -> list:
    import datasets

    raw = ds.cast_column("image", datasets.Image(decode=False)).with_format(None)
    return [load_image(v) for v in raw["image"]]


def calibration_batches(classifier: Classifier, data_root: Path, per_source: int, batch_size: int = 32) -> list[np.ndarray]:
    """Pixel values of a dx-stratified sample of `per_source` training images of each source."""
    batches = []
    for name in TEST_SETS:
        ds, _ = _split(Path(classifier.path), str(data_root / name), "train", per_source, seed=1)
        images = _images(ds)
        for start in range(0, len(images), batch_size):
            batches.append(classifier.pixel_values(images[start : start + batch_size]).numpy())
    return batches


def score(classifier: Classifier, graphs: dict[str, OnnxModel], ds, batch_size: int = 32) -> dict[str, Scores]:
    """Per ONNX graph, P(mel) and the decided class of every image of `ds` (one decode, one preprocessing)."""
    from train.data import label_names

    raw = ds.with_format(None)
    names = label_names("dx")
    y_mel = np.array([names[i] == MELANOMA for i in raw["label"]], dtype=int)
    images = _images(ds)
    p_mel: dict[str, list[float]] = {k: [] for k in graphs}
    decided: dict[str, list[int]] = {k: [] for k in graphs}
    for start in range(0, len(images), batch_size):
        x = classifier.pixel_values(images[start : start + batch_size])
        for name, graph in graphs.items():
            for prediction in classifier.predictions([graph(x)]):
                p_mel[name].append(prediction.probabilities[MELANOMA])
                decided[name].append(classifier.label2id[prediction.decision])
    return {k: Scores(np.asarray(p_mel[k]), np.asarray(decided[k]), y_mel) for k in graphs}


def fp32_parity(classifier: Classifier, fp32: OnnxModel, images: list) -> float:
    """Max |P(mel) ONNX fp32 - P(mel) PyTorch| over `images` (every head's probabilities, in fact)."""
    x = classifier.pixel_values(images)
    with torch.inference_mode():
        ref = classifier.model(pixel_values=x)
    got = fp32(x)
    diffs = [(torch.softmax(ref.logits, -1) - torch.softmax(got.logits, -1)).abs().max()]
    for name, logits in (getattr(ref, "head_logits", None) or {}).items():
        diffs.append((torch.softmax(logits, -1) - torch.softmax(got.head_logits[name], -1)).abs().max())
    return float(max(diffs))


def int8_check(fp32: Scores, int8: Scores) -> dict[str, Any]:
    """The accuracy bar on one test set: AUCs, their difference, top-class agreement, pass/fail."""
    auc32, auc8 = roc_auc_score(fp32.y_mel, fp32.p_mel), roc_auc_score(int8.y_mel, int8.p_mel)
    agreement = float((fp32.decided == int8.decided).mean())
    return {"n": int(len(fp32.y_mel)), "melanoma_auc_fp32": round(float(auc32), 5), "melanoma_auc_int8": round(float(auc8), 5),
            "auc_difference": round(float(auc8 - auc32), 5), "top_class_agreement": round(agreement, 5),
            "max_p_mel_difference": round(float(np.abs(fp32.p_mel - int8.p_mel).max()), 5),
            "passed": bool(abs(auc8 - auc32) <= AUC_TOLERANCE and agreement >= MIN_AGREEMENT)}


def speed(forward, x1: torch.Tensor, x32: torch.Tensor, repeats: int = 20) -> dict[str, float]:
    """Batch-1 latency p50 (ms) and batch-32 images/s of `forward` (after one warm-up each)."""
    forward(x1)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        forward(x1)
        times.append(time.perf_counter() - t)
    forward(x32)
    t = time.perf_counter()
    for _ in range(3):
        forward(x32)
    return {"batch1_p50_ms": round(1000 * float(np.median(times)), 2),
            "batch32_images_per_s": round(3 * len(x32) / (time.perf_counter() - t), 1)}


def default_backend(speeds: dict[str, dict[str, float]]) -> str:
    """The backend with the best geometric mean of its batch-1 and batch-32 speed-ups over torch."""
    base = speeds["torch"]

    def gain(s: dict[str, float]) -> float:
        return float(np.sqrt(base["batch1_p50_ms"] / s["batch1_p50_ms"] * s["batch32_images_per_s"] / base["batch32_images_per_s"]))

    return max(speeds, key=lambda k: gain(speeds[k]))


def export_folder(folder: Path, data_root: Path, calibration_per_source: int, limit: int | None) -> dict[str, Any]:
    """Steps 1-4 of the module docstring for one folder, written into it; returns the export record."""
    classifier = Classifier(folder, backend="torch")
    record: dict[str, Any] = {"model": folder.name, "command": "python train/export_onnx.py " + shlex.join(sys.argv[1:])}
    record["fp32"] = {"file": FP32_FILE, **export_fp32(classifier.model, folder, classifier.geometry.size)}
    heads = list(classifier.extra_heads)
    fp32 = OnnxModel(folder / FP32_FILE, heads)

    test_sets = {name: _split(folder, str(data_root / name), "test", limit) for name in TEST_SETS}
    first = _images(test_sets["ham10000"][0].select(range(16)))
    record["fp32"]["max_probability_difference_vs_torch"] = parity = fp32_parity(classifier, fp32, first)
    if parity >= FP32_TOLERANCE:
        raise RuntimeError(f"{folder}: fp32 ONNX differs from PyTorch by {parity:.2e} (>= {FP32_TOLERANCE}) on 16 test images")

    static = classifier.config.model_type not in ROLLOUT_MODEL_TYPES
    calibration = calibration_batches(classifier, data_root, calibration_per_source) if static else None
    record["int8"] = {"file": INT8_FILE, **quantize(folder, calibration)}
    int8 = OnnxModel(folder / INT8_FILE, heads)
    checks = {}
    for name, (ds, info) in test_sets.items():
        scores = score(classifier, {"fp32": fp32, "int8": int8}, ds)
        checks[name] = {**int8_check(scores["fp32"], scores["int8"]), **({"sample": info["sample"]} if "sample" in info else {})}
        logger.info("%s %s: %s", folder.name, name, checks[name])
    passed = all(c["passed"] for c in checks.values())
    record["int8"].update(checks=checks, passed=passed, bar=f"|AUC int8 - AUC fp32| <= {AUC_TOLERANCE} and top-class "
                          f"agreement >= {MIN_AGREEMENT:.0%} on each of {', '.join(TEST_SETS)} (test splits)")

    x = classifier.pixel_values(_images(test_sets["ham10000"][0].select(range(32))))
    with torch.inference_mode():
        speeds = {"torch": speed(lambda v: classifier.model(pixel_values=v), x[:1], x)}
    speeds["onnx"] = speed(fp32, x[:1], x)
    size_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6  # publish's MB
    if not passed:
        record["int8"].update(shipped=False, why="missed the accuracy bar")
    elif size_mb > MAX_FOLDER_MB:
        record["int8"].update(shipped=False, why=f"would make the folder {size_mb:.1f} MB, over the {MAX_FOLDER_MB:.0f} MB "
                              "a published folder may hold (hub_cards.publish)")
    else:
        record["int8"]["shipped"] = True
        speeds["onnx-int8"] = speed(int8, x[:1], x)
    if not record["int8"]["shipped"]:
        (folder / INT8_FILE).unlink()
    record["speed"] = {"threads": torch.get_num_threads(), "note": "one image set, this machine, other jobs running",
                       **speeds}
    record["default_backend"] = default_backend(speeds)
    (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="model folders, or a folder of them (models)")
    parser.add_argument("--data-root", default="../shared/data", help="folder with ham10000/, isic2017/, derm7pt/")
    parser.add_argument("--calibration-per-source", type=int, default=128,
                        help="training images per source for static (CNN) calibration")
    parser.add_argument("--limit", type=int, default=None,
                        help="check int8 on a dx-stratified sample of N images per test split (default: all)")
    parser.add_argument("--write", action="store_true",
                        help="write the files into the folders (default: measure on temporary copies)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folders = []
    for path in map(Path, args.paths):
        folders.extend([path] if (path / "config.json").is_file() else sorted(p for p in path.iterdir() if p.is_dir()))
    records = []
    for folder in folders:
        if not (is_classifier_folder(folder) and (folder / WEIGHTS_FILE).is_file()):
            logger.info("%s: not a classifier folder (config.json architectures, %s), skipped", folder, WEIGHTS_FILE)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            # The manifest's data paths are relative to the working directory (the project root).
            target = folder if args.write else Path(shutil.copytree(folder, Path(tmp) / folder.name))
            record = export_folder(target, Path(args.data_root), args.calibration_per_source, args.limit)
        print(json.dumps({k: record[k] for k in ("model", "default_backend")}
                         | {"int8_passed": record["int8"]["passed"], "speed": record["speed"]}))
        records.append(record)
    return records


if __name__ == "__main__":
    main()
