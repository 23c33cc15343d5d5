"""train/pack_sources.py: the sources packed small for a GPU machine load as the same splits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

from test_multisource import derm7pt_dir, isic_dir  # noqa: F401  (fixtures: the real layouts over fixture images)
from train.pack_sources import main as pack_main
from train.sources import SourceSpec, load_sources


def test_packed_sources_keep_every_split_and_fit_the_budget(tmp_path: Path, ham_dir: Path, isic_dir: Path,
                                                            derm7pt_dir: Path) -> None:
    data = tmp_path / "data"
    for name, folder in (("ham10000", ham_dir), ("isic2017", isic_dir), ("derm7pt", derm7pt_dir)):
        shutil.copytree(folder, data / name)
    out = tmp_path / "packed"
    info = pack_main(["--data", str(data), "--out", str(out), "--size", "48", "--max_mib", "1"])
    assert info["size"] == 48 and info["bytes"] <= 2**20
    assert json.loads((out / "pack.json").read_text()) == info
    images = list(out.glob("*/images/*.jpg"))
    assert images and all(Image.open(p).size == (48, 48) for p in images)

    def splits(root: Path) -> dict[str, list[str]]:
        specs = [SourceSpec(name="ham10000", data=str(root / "ham10000"), val_size=0.2, test_size=0.2),
                 SourceSpec(name="isic2017", data=str(root / "isic2017")),
                 SourceSpec(name="derm7pt", data=str(root / "derm7pt"))]
        dd = load_sources(specs)
        return {split: sorted(dd[split]["image_id"]) for split in dd}

    assert splits(out) == splits(data)  # the same images in every split (HAM10000's lesion-grouped split too)
