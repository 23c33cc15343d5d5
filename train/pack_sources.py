"""Pack the three dermoscopy sources small enough to travel with the code to a GPU machine.

Every image the multi-source recipes train or validate on, squashed to SIZE x SIZE (what the
processors do to the whole field of view) and re-encoded as JPEG, in the same folder layout as
../shared/data, so a recipe only changes its sources' `data:` folders
(train/configs/multisource_lite2_gpu.yaml):

- ham10000/: HAM10000_metadata.csv + images/ (all 10,015: the lesion-grouped split is computed from
  the whole set, so its test lesions stay out of training exactly as here);
- isic2017/, derm7pt/: labels.csv + images/ of every row (their official `split` column; the loaders
  expect all three splits). Test numbers that ship come from the full-size images here.

The JPEG quality starts at --quality and steps down until the pack fits --max_mib (a GPU session
carries at most 64 MiB of working tree). Re-runs skip images already written at the same quality.

    python train/pack_sources.py --out packed --size 192 --max_mib 60
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # as a script: train/train.py would shadow the `train` package (see evaluate.py)

import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from model.imageio import load_image  # noqa: E402

logger = logging.getLogger(__name__)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def encode(path: Path, size: int, quality: int) -> bytes:
    """`path` decoded (the project's decoder: EXIF orientation, RGB), squashed to size x size, JPEG."""
    image = load_image(path).resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def plan(data: Path) -> dict[str, tuple[pd.DataFrame, str, list[tuple[Path, str]]]]:
    """Per source: (its label table, the table's file name, [(source image, relative path in the pack)])."""
    ham = pd.read_csv(data / "ham10000" / "HAM10000_metadata.csv")
    ham_files = [(data / "ham10000" / "images" / f"{i}.jpg", f"images/{i}.jpg") for i in ham["image_id"]]
    out = {"ham10000": (ham, "HAM10000_metadata.csv", ham_files)}
    for source in ("isic2017", "derm7pt"):
        table = pd.read_csv(data / source / "labels.csv")
        files = [(data / source / p, str(Path("images") / Path(p).name)) for p in table["path"]]
        table["path"] = [rel for _, rel in files]
        out[source] = (table, "labels.csv", files)
    return out


def pack(data: Path, out: Path, size: int, quality: int, workers: int) -> int:
    """Write the pack at one JPEG quality; returns its size in bytes."""
    total = 0
    for source, (table, table_name, files) in plan(data).items():
        folder = out / source
        (folder / "images").mkdir(parents=True, exist_ok=True)
        table.to_csv(folder / table_name, index=False)

        def one(item: tuple[Path, str]) -> int:
            src, rel = item
            target = folder / rel
            if not target.is_file():
                target.write_bytes(encode(src, size, quality))
            return target.stat().st_size

        with ThreadPoolExecutor(workers) as pool:
            sizes = list(tqdm(pool.map(one, files), total=len(files), desc=f"{source} q{quality}", unit="img"))
        total += sum(sizes) + (folder / table_name).stat().st_size
        logger.info("%s: %d images, %.1f MiB", source, len(files), sum(sizes) / 2**20)
    return total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (ham10000/, isic2017/, derm7pt/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--quality", type=int, default=80, help="first JPEG quality tried")
    parser.add_argument("--max_mib", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for quality in range(args.quality, 19, -10):
        marker = args.out / "pack.json"
        if marker.is_file() and json.loads(marker.read_text()).get("quality") != quality:
            for image in args.out.glob("*/images/*.jpg"):  # another quality: re-encode every image
                image.unlink()
        size = pack(args.data, args.out, args.size, quality, args.workers)
        info = {"size": args.size, "quality": quality, "bytes": size, "mib": round(size / 2**20, 1)}
        marker.write_text(json.dumps(info))
        logger.info("pack at quality %d: %.1f MiB (limit %.0f)", quality, size / 2**20, args.max_mib)
        if size <= args.max_mib * 2**20:
            return info
    raise SystemExit(f"no JPEG quality >= 20 fits {args.max_mib} MiB at {args.size} px; try a smaller --size")


if __name__ == "__main__":
    main()
