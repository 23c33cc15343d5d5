"""Render the dataset card (README.md) of the prepared, lesion-grouped HAM10000 split.

Split sizes come from the split manifest written by train/splits.py (`write_manifest`): JSON
``{split: [image_ids...], "splits": [...], "seed": ..., ...}``. With the HAM10000 metadata CSV,
per-split class counts, distinct lesions and lesions shared between splits are counted too.

CLI::

    python -m hub_cards.dataset_card --manifest split_manifest.json --output-dir DIR \
        [--metadata ../shared/data/ham10000/HAM10000_metadata.csv]
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from hub_cards.render import LICENSE, TEMPLATE_DIR, read_json, manifest_split_sizes
from model.labels import DX_CODES, DX_NAMES

logger = logging.getLogger(__name__)

DATASET_CARD_TEMPLATE = TEMPLATE_DIR / "dataset_card.md.j2"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def _read_metadata(path: Path) -> dict[str, dict[str, str]]:
    """{image_id: row} from HAM10000_metadata.csv (columns lesion_id, image_id, dx, ...)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"image_id", "lesion_id", "dx"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks column(s) {sorted(missing)}: pass HAM10000_metadata.csv.")
        return {row["image_id"]: row for row in reader}


def _split_stats(manifest: dict[str, Any], names: list[str], metadata: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Per-split class counts and lesion ids from the metadata; shared lesions between splits."""
    counts: dict[str, dict[str, int]] = {}
    lesions: dict[str, set[str]] = {}
    for name in names:
        ids = manifest[name]
        unknown = [i for i in ids if i not in metadata]
        if unknown:
            raise ValueError(f"split '{name}' has {len(unknown)} image_id(s) not in the metadata CSV "
                             f"(e.g. {unknown[:3]}): pass the metadata of the dataset the manifest was made from.")
        counts[name] = {code: 0 for code in DX_CODES}
        for i in ids:
            dx = metadata[i]["dx"]
            counts[name][dx] = counts[name].get(dx, 0) + 1
        lesions[name] = {metadata[i]["lesion_id"] for i in ids}
    shared = sum(
        len(lesions[a] & lesions[b]) for k, a in enumerate(names) for b in names[k + 1:]
    )
    return {"counts": counts, "lesions": {n: len(v) for n, v in lesions.items()}, "shared_lesions": shared}


def render_dataset_card(
    manifest_path: Path,
    *,
    metadata_csv: Path | None = None,
    pretty_name: str = "HAM10000 (lesion-grouped train/validation/test split)",
    template: Path = DATASET_CARD_TEMPLATE,
    command: str | None = None,
) -> DatasetCard:
    """Render the dataset card of a prepared HAM10000 split.

    Args:
        manifest_path: split_manifest.json ({split: [image_ids...], "seed": ..., ...}).
        metadata_csv: HAM10000_metadata.csv; adds class counts and lesion counts per split.
        pretty_name: title of the card.
        template: Jinja template rendered by `DatasetCard.from_template`.
        command: the command line that rendered the card (shown in it for provenance).
    """
    manifest = read_json(Path(manifest_path))
    sizes, params = manifest_split_sizes(manifest)
    names = list(sizes)
    stats = None
    if metadata_csv is not None:
        stats = _split_stats(manifest, names, _read_metadata(Path(metadata_csv)))
    elif isinstance(manifest.get("class_counts"), dict):
        stats = {"counts": {n: manifest["class_counts"][n] for n in names if n in manifest["class_counts"]},
                 "lesions": None, "shared_lesions": None}
    class_rows = []
    if stats:
        for code in DX_CODES:
            class_rows.append((code, DX_NAMES[code], [str(stats["counts"].get(n, {}).get(code, 0)) for n in names]))
    total = sum(sizes.values())
    card_data = DatasetCardData(
        pretty_name=pretty_name,
        license=LICENSE,
        task_categories=["image-classification"],
        size_categories=[_size_category(total)],
        source_datasets=["original"],
        annotations_creators=["expert-generated"],
        tags=["dermoscopy", "skin-lesion", "melanoma", "medical-imaging", "ham10000", "research-only"],
        dataset_info={
            "features": [
                {"name": "image", "dtype": "image"},
                {"name": "label", "dtype": {"class_label": {"names": {str(i): c for i, c in enumerate(DX_CODES)}}}},
                {"name": "image_id", "dtype": "string"},
                {"name": "lesion_id", "dtype": "string"},
            ],
            "splits": [{"name": n, "num_examples": k} for n, k in sizes.items()],
        },
    )
    card = DatasetCard.from_template(
        card_data,
        template_path=str(template),
        pretty_name=pretty_name,
        splits=[(n, str(k)) for n, k in sizes.items()],
        total=str(total),
        params=[(k, str(v)) for k, v in params.items()],
        split_names=names,
        class_rows=class_rows,
        lesions=[(n, str(stats["lesions"][n])) for n in names] if stats and stats["lesions"] else [],
        shared_lesions=None if not stats or stats["shared_lesions"] is None else str(stats["shared_lesions"]),
        labels=[(i, c, DX_NAMES[c]) for i, c in enumerate(DX_CODES)],
        command=command,
    )
    return DatasetCard(re.sub(r"\n{3,}", "\n\n", str(card)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the dataset card of a prepared HAM10000 split.")
    parser.add_argument("--manifest", type=Path, required=True, help="split_manifest.json")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder to write README.md into")
    parser.add_argument("--metadata", type=Path, help="HAM10000_metadata.csv (adds class/lesion counts)")
    parser.add_argument("--pretty-name", default="HAM10000 (lesion-grouped train/validation/test split)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        card = render_dataset_card(args.manifest, metadata_csv=args.metadata, pretty_name=args.pretty_name,
                                   command=shlex.join(["python", "-m", "hub_cards.dataset_card", *(argv or sys.argv[1:])]))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    card.save(args.output_dir / "README.md")
    logger.info("wrote %s", args.output_dir / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
