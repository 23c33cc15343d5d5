"""How each shipped model's melanoma AUC holds up under what screening images differ in (issue 18 §5).

    .venv/bin/python bench/bench_shift.py [--models models/efficientnet-lite2 ...] [--ham 400]

A screening programme's images show small lesions in a wide field of skin, taken through
phone-attached dermatoscopes of many makes: blur, noise, strong JPEG compression, colour casts and
dim exposure. This bench applies each of those shifts, deterministically, to the validation images
of the shipped models' split (`split_manifest.json`, shared by every multi-source folder: all of
ISIC 2017 val and Derm7pt val, `--ham` HAM10000 val images with every melanoma kept) and prints
each model's melanoma AUC (the mean over the three sources) beside the unshifted one. Validation
only, never a test split: a proxy to steer training by, not a measurement of screening data.

Shifts (on the decoded image, before the model's own processor):
- small lesion: the image shrunk to half its side in the middle of a canvas of its border colour
  (the lesion covers a quarter of the area it did);
- blur: Gaussian, sigma 2 % of the short side; noise: Gaussian, sd 10/255, seeded per image;
- low res: a quarter of the side and back up (bilinear), a camera of fewer pixels; no recipe
  trains on this one, so it checks what the screening augmentations (multisource_lite2_screening.yaml:
  zoom-out, noise, blur) carry over to;
- jpeg: re-encoded at quality 20; colour cast: R x1.10, B x0.85; dim: brightness x0.7.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageFilter

from model.classifier import Classifier
from model.imageio import load_image
from model.labels import MELANOMA
from train.metrics import melanoma_auc

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_MODELS = ("efficientnet-lite2", "melanoma-vit-hybrid", "melanoma-vit", "resnet18")


def small_lesion(image: Image.Image) -> Image.Image:
    a = np.asarray(image)
    ring = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    canvas = Image.new("RGB", image.size, tuple(int(v) for v in np.median(ring, axis=0)))
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC)
    canvas.paste(half, ((image.width - half.width) // 2, (image.height - half.height) // 2))
    return canvas


def blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(0.02 * min(image.size)))


def noise(image: Image.Image, seed: int) -> Image.Image:
    a = np.asarray(image).astype(np.float32)
    a += np.random.default_rng(seed).normal(0.0, 10.0, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def low_resolution(image: Image.Image) -> Image.Image:
    small = image.resize((max(1, image.width // 4), max(1, image.height // 4)), Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BILINEAR)


def jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=20)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def colour_cast(image: Image.Image) -> Image.Image:
    a = np.asarray(image).astype(np.float32) * np.array([1.10, 1.0, 0.85], dtype=np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def dim(image: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(0.7)


SHIFTS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "none": lambda im, _: im,
    "small lesion": lambda im, _: small_lesion(im),
    "blur": lambda im, _: blur(im),
    "noise": noise,
    "low res": lambda im, _: low_resolution(im),
    "jpeg q20": lambda im, _: jpeg(im),
    "colour cast": lambda im, _: colour_cast(im),
    "dim": lambda im, _: dim(im),
}


def validation_images(data: Path, manifest: Path, n_ham: int, seed: int = 0) -> pd.DataFrame:
    """source, image_id, path, melanoma (0/1) of the validation images (see the module docstring)."""
    ids = json.loads(manifest.read_text())["validation"]
    ham = pd.read_csv(data / "ham10000" / "HAM10000_metadata.csv").set_index("image_id")
    isic = pd.read_csv(data / "isic2017" / "labels.csv").set_index("image_id")
    d7 = pd.read_csv(data / "derm7pt" / "labels.csv").set_index("case_id")
    rows = []
    for item in ids:
        source, image_id = item.split("/", 1)
        if source == "ham10000":
            rows.append((source, image_id, data / "ham10000" / "images" / f"{image_id}.jpg", int(ham.at[image_id, "dx"] == MELANOMA)))
        elif source == "isic2017":
            rows.append((source, image_id, data / "isic2017" / isic.at[image_id, "path"], int(isic.at[image_id, "label"] == "melanoma")))
        elif source == "derm7pt" and isinstance(d7.at[image_id, "dx"], str):  # melanosis / misc: no dx
            rows.append((source, image_id, data / "derm7pt" / d7.at[image_id, "path"], int(d7.at[image_id, "dx"] == MELANOMA)))
    table = pd.DataFrame(rows, columns=["source", "image_id", "path", "melanoma"])
    ham_rows = table[table.source == "ham10000"]
    keep = pd.concat([ham_rows[ham_rows.melanoma == 1],
                      ham_rows[ham_rows.melanoma == 0].sample(max(n_ham - int(ham_rows.melanoma.sum()), 0), random_state=seed)])
    return pd.concat([keep, table[table.source != "ham10000"]]).reset_index(drop=True)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[str(ROOT / "models" / m) for m in DEFAULT_MODELS])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--ham", type=int, default=400, help="HAM10000 validation images (every melanoma kept)")
    parser.add_argument("--backend", default="auto", help="the models' backend (auto: as the app serves them)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    table = validation_images(args.data, Path(args.models[0]) / "split_manifest.json", args.ham)
    counts = {s: (int((table.source == s).sum()), int(table.melanoma[table.source == s].sum())) for s in table.source.unique()}
    print("validation images (images, melanomas): " + ", ".join(f"{s} {n} ({m})" for s, (n, m) in counts.items()))
    images = [load_image(p, max_side=1024) for p in table["path"]]
    shifted = {name: [shift(im, i) for i, im in enumerate(images)] for name, shift in SHIFTS.items()}
    results: dict[str, dict[str, float]] = {}
    for folder in args.models:
        entry = Classifier(folder, backend=args.backend)
        start, row = time.perf_counter(), {}
        for name, views in shifted.items():
            p_mel = np.array([pred.probabilities[MELANOMA] for i in range(0, len(views), args.batch_size)
                              for pred in entry.predict(views[i : i + args.batch_size], batch_size=args.batch_size)])
            per_source = [melanoma_auc(table.melanoma[table.source == s], p_mel[(table.source == s).to_numpy()])
                          for s in ("ham10000", "isic2017", "derm7pt")]
            row[name] = float(np.mean(per_source))
        results[Path(folder).name] = row
        print(f"{Path(folder).name}: {time.perf_counter() - start:.0f} s ({entry.backend})", file=sys.stderr, flush=True)
    width = max(len(m) for m in results) + 2
    print("\nmean melanoma AUC over HAM10000 / ISIC 2017 / Derm7pt validation (shifted - none in brackets)")
    print(f"{'model':{width}s}" + "".join(f"{name:>20s}" for name in SHIFTS))
    for model_name, row in results.items():
        cells = [f"{row['none']:.3f}"] + [f"{row[n]:.3f} ({row[n] - row['none']:+.3f})" for n in list(SHIFTS)[1:]]
        print(f"{model_name:{width}s}" + "".join(f"{c:>20s}" for c in cells))
    return results


if __name__ == "__main__":
    main()
