"""A model's two melanoma operating points, measured on its validation predictions, stored in its
config.json (`melanoma_operating_points`) for the app and the REST records.

- `flag`: the model's own threshold (`melanoma_threshold`, chosen for 95% melanoma sensitivity): its
  sensitivity and specificity on validation, so that the app can say how many non-melanomas it
  flags too (the false-alarm rate, 1 - specificity);
- `balanced`: the threshold with the highest sensitivity + specificity on validation (Youden's J),
  a second, less alarm-prone operating point.

Validation only, never a test split. The predictions are `train/evaluate.py --split validation
--no-calibrate` outputs (one folder per source; the sources are pooled):

    for s in ham10000 isic2017 derm7pt; do
      python train/evaluate.py --model models/efficientnet-lite2 --data ../shared/data/$s --split validation \\
        --no-calibrate --output-dir runs/val/efficientnet-lite2/$s
    done
    python train/operating_points.py --model models/efficientnet-lite2 --predictions runs/val/efficientnet-lite2/* --write-config

With `--tta N` the predictions are N-view ones (`evaluate.py --tta N`): the flag threshold is then
chosen on them (95 % pooled validation sensitivity, the project's rule) and stored with both points
under `melanoma_tta` ({views, threshold, operating_points}), what a prediction averaged over N views
is compared with (the app with MELANOMA_TTA_VIEWS=N, predict.py --tta N); the one-view entries stay.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # as a script: train/train.py would shadow the `train` package (see evaluate.py)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from model.labels import MELANOMA  # noqa: E402
from train.metrics import sensitivity_specificity, threshold_balanced, threshold_for_sensitivity  # noqa: E402

logger = logging.getLogger(__name__)
CONFIG_KEY = "melanoma_operating_points"
TTA_KEY = "melanoma_tta"
SOURCE_NAMES = {"ham10000": "HAM10000", "isic2017": "ISIC 2017", "derm7pt": "Derm7pt"}


def read_predictions(folder: Path, views: int = 1) -> tuple[np.ndarray, np.ndarray, str]:
    """(is melanoma, P(mel), "<source> <n>") of one evaluate.py output folder on a validation split,
    scored with `views` test-time views."""
    metrics = json.loads((folder / "metrics.json").read_text())
    if int(metrics.get("tta", 1)) != views:
        raise ValueError(f"{folder} holds {metrics.get('tta', 1)}-view predictions, not {views}-view ones (--tta)")
    if metrics.get("split") != "validation":
        raise ValueError(f"{folder} holds predictions on split {metrics.get('split')!r}; operating points are "
                         "chosen on validation only")
    table = pd.read_csv(folder / "predictions.csv")
    column = f"p_{MELANOMA}"
    if column not in table:
        raise ValueError(f"{folder}/predictions.csv has no {column} column (a model without a melanoma class?)")
    source = Path(metrics["data"]).name
    return (table["label"] == MELANOMA).to_numpy(int), table[column].to_numpy(float), \
        f"{SOURCE_NAMES.get(source, source)} {len(table)}"


def operating_points(y_mel: np.ndarray, p_mel: np.ndarray, flag_threshold: float, data: str) -> dict[str, Any]:
    """The config entry: {"flag": {threshold, sensitivity, specificity}, "balanced": {...}, "data"}."""
    points = {}
    for name, threshold in (("flag", flag_threshold), ("balanced", threshold_balanced(y_mel, p_mel))):
        if threshold is None:
            raise ValueError("the validation predictions need melanomas and non-melanomas")
        sensitivity, specificity = sensitivity_specificity(y_mel, p_mel, threshold)
        points[name] = {"threshold": float(threshold), "sensitivity": sensitivity, "specificity": specificity}
    return {**points, "data": data}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local model folder (config.json is updated)")
    parser.add_argument("--predictions", nargs="+", required=True,
                        help="evaluate.py output folders on validation splits (pooled)")
    parser.add_argument("--write-config", action="store_true", help="store the points in the model's config.json")
    parser.add_argument("--tta", type=int, default=1,
                        help="views the predictions averaged (evaluate.py --tta); > 1 fits that many views' own "
                        "flag threshold and stores it under melanoma_tta")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    config_path = Path(args.model) / "config.json"
    config = json.loads(config_path.read_text())
    parts = [read_predictions(Path(folder), args.tta) for folder in sorted(args.predictions)]
    y_mel = np.concatenate([y for y, _, _ in parts])
    p_mel = np.concatenate([p for _, p, _ in parts])
    data = "validation: " + ", ".join(name for _, _, name in parts)
    flag = float(config.get("melanoma_threshold", 0.5)) if args.tta == 1 else threshold_for_sensitivity(y_mel, p_mel)
    points = operating_points(y_mel, p_mel, flag, data)
    for name in ("flag", "balanced"):
        point = points[name]
        logger.info("%-8s threshold %.4f: sensitivity %.3f, specificity %.3f (%s)", name, point["threshold"],
                    point["sensitivity"], point["specificity"], data)
    if args.write_config:
        command = shlex.join(sys.argv[1:] if argv is None else argv)
        entry = {**points, "command": f"python train/operating_points.py {command}"}
        if args.tta == 1:
            config[CONFIG_KEY] = entry
        else:
            config[TTA_KEY] = {"views": args.tta, "threshold": points["flag"]["threshold"], "operating_points": entry}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        logger.info("wrote %s to %s", CONFIG_KEY if args.tta == 1 else TTA_KEY, config_path)
    return points


if __name__ == "__main__":
    main()
