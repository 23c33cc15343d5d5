#!/usr/bin/env python
"""Fit a model's age / sex / site melanoma regression (`model.metadata_model`) and measure it.

    python train/fit_metadata.py --model models/efficientnet-lite2 [--write]

1. The model's P(melanoma) for the validation and test images of the sources that record the
   patient (HAM10000: age, sex, site; ISIC 2017: age, sex), from the folder's own
   `split_manifest.json` (cached in --cache; Derm7pt records none).
2. The regression's L2 strength C by 5-fold cross-validation on the validation images only
   (grouped by lesion: HAM10000's lesion_id), for the mean over the two sources of the out-of-fold
   melanoma AUC with every recorded field given.
3. Refit on all validation images with that C; the threshold is the out-of-fold score that gives 95 %
   validation sensitivity (the image model's rule).
4. Measured, never fitted on: each test split's melanoma AUC (where the split records any field;
   this copy of ISIC 2017 has none for its test images) (95 % bootstrap CI) from the image
   alone and with age / sex / site, and the paired bootstrap CI of the difference.

`--write` stores it in the folder's config.json (`melanoma_metadata_model`, with the numbers) only
when the cross-validated validation AUC beats the image's on the mean over the sources: the
decision is made on validation, the test numbers only reported.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # train/train.py would shadow the `train` package

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold
from tqdm.auto import tqdm

from model.classifier import Classifier
from model.imageio import load_image
from model.labels import MELANOMA
from model.metadata_model import CONFIG_KEY, Metadata, MetadataModel, parse_age, parse_sex, parse_site
from train.metrics import bootstrap_auc_ci, melanoma_auc, sensitivity_specificity, threshold_for_sensitivity

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SOURCES = ("ham10000", "isic2017")
C_GRID = (0.01, 0.1, 1.0, 10.0)
FOLDS = 5


def source_table(data: Path, source: str) -> pd.DataFrame:
    """image_id -> path, melanoma (0/1), group (lesion), age, sex, site of one source."""
    if source == "ham10000":
        meta = pd.read_csv(data / "ham10000" / "HAM10000_metadata.csv")
        return pd.DataFrame({
            "image_id": meta["image_id"], "path": [str(data / "ham10000" / "images" / f"{i}.jpg") for i in meta["image_id"]],
            "melanoma": (meta["dx"] == MELANOMA).astype(int), "group": meta["lesion_id"],
            "age": meta["age"], "sex": meta["sex"], "site": meta["localization"],
        }).set_index("image_id")
    labels = pd.read_csv(data / "isic2017" / "labels.csv")
    return pd.DataFrame({
        "image_id": labels["image_id"], "path": [str(data / "isic2017" / p) for p in labels["path"]],
        "melanoma": (labels["label"] == "melanoma").astype(int), "group": labels["image_id"],
        "age": labels["age_approximate"], "sex": labels["sex"], "site": None,
    }).set_index("image_id")


def split_rows(model: Path, data: Path) -> pd.DataFrame:
    """The validation and test rows of SOURCES in the model's split manifest (column `split`, `source`)."""
    manifest = json.loads((model / "split_manifest.json").read_text())
    frames = []
    for source in SOURCES:
        table = source_table(data, source)
        for split in ("validation", "test"):
            ids = [i.split("/", 1)[1] for i in manifest[split] if i.startswith(source + "/")]
            frames.append(table.loc[ids].assign(split=split, source=source))
    return pd.concat(frames).reset_index()


def melanoma_probabilities(classifier: Classifier, paths: list[str], batch_size: int = 32) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(paths), batch_size), desc="P(melanoma)", unit="batch"):
        images = [load_image(p, max_side=1024) for p in paths[start : start + batch_size]]
        out += [pred.probabilities[MELANOMA] for pred in classifier.predict(images, batch_size=batch_size)]
    return np.asarray(out)


def records(rows: pd.DataFrame) -> list[Metadata]:
    """Each row's fields; a value the parser refuses is unknown (the sources' own vocabulary)."""
    def read(parse, value):
        try:
            return parse(value)
        except ValueError:
            return None

    return [Metadata(read(parse_age, a), read(parse_sex, s), read(parse_site, t))
            for a, s, t in zip(rows["age"], rows["sex"], rows["site"])]


def out_of_fold(val: pd.DataFrame, meta: list[Metadata], c: float) -> np.ndarray:
    """Combined P(mel) of every validation row from the regression fitted on the other folds."""
    scores = np.zeros(len(val))
    for fit, held in GroupKFold(FOLDS).split(val, groups=val["group"]):
        model = MetadataModel.fit(val["p_mel"].to_numpy()[fit], [meta[i] for i in fit], val["melanoma"].to_numpy()[fit], c)
        scores[held] = model.probability(val["p_mel"].to_numpy()[held], [meta[i] for i in held])
    return scores


def per_source_auc(frame: pd.DataFrame, scores: np.ndarray) -> dict[str, float]:
    return {s: melanoma_auc(frame["melanoma"][frame.source == s], scores[(frame.source == s).to_numpy()]) for s in SOURCES}


def paired_difference_ci(y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % stratified bootstrap CI of AUC(b) - AUC(a) on the same images."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = []
    for _ in range(n):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        diffs.append(melanoma_auc(y[idx], b[idx]) - melanoma_auc(y[idx], a[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache", type=Path, default=None, help="P(mel) cache (.csv; default runs/metadata/<model>.csv)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--write", action="store_true", help="store the regression in the model's config.json")
    args = parser.parse_args(argv)

    rows = split_rows(args.model, args.data)
    cache = args.cache or ROOT / "runs" / "metadata" / f"{args.model.name}.csv"
    if cache.is_file() and pd.read_csv(cache)["image_id"].tolist() == rows["image_id"].tolist():
        rows["p_mel"] = pd.read_csv(cache)["p_mel"].to_numpy()
    else:
        classifier = Classifier(str(args.model), backend="torch")
        rows["p_mel"] = melanoma_probabilities(classifier, rows["path"].tolist())
        cache.parent.mkdir(parents=True, exist_ok=True)
        rows[["image_id", "source", "split", "p_mel"]].to_csv(cache, index=False)
    val, test = rows[rows.split == "validation"].reset_index(drop=True), rows[rows.split == "test"].reset_index(drop=True)
    val_meta, test_meta = records(val), records(test)

    image_val = per_source_auc(val, val["p_mel"].to_numpy())
    print(f"validation images: {dict(val.source.value_counts())}; image-only AUC "
          + ", ".join(f"{s} {a:.4f}" for s, a in image_val.items()))
    cv = {}
    for c in C_GRID:
        cv[c] = per_source_auc(val, out_of_fold(val, val_meta, c))
        print(f"C = {c:g}: out-of-fold AUC with metadata " + ", ".join(f"{s} {a:.4f}" for s, a in cv[c].items()))
    best = max(C_GRID, key=lambda c: (round(float(np.mean(list(cv[c].values()))), 4), -c))
    oof = out_of_fold(val, val_meta, best)
    threshold = threshold_for_sensitivity(val["melanoma"], oof)
    model = MetadataModel.fit(val["p_mel"].to_numpy(), val_meta, val["melanoma"].to_numpy(), best)
    model.threshold = threshold
    gain = float(np.mean(list(cv[best].values())) - np.mean(list(image_val.values())))
    print(f"chosen C = {best:g}; mean validation AUC gain (out of fold) {gain:+.4f}; threshold {threshold:.4f}")
    print("coefficients: " + ", ".join(f"{k} {v:+.3f}" for k, v in model.coefficients.items() if v) + f", intercept {model.intercept:+.3f}")

    measured = {}
    print(f"{'test set':10s} {'n':>5s} {'image AUC (95% CI)':>26s} {'+ metadata AUC (95% CI)':>28s} {'difference (95% CI)':>24s}")
    for source in SOURCES:
        part = test[test.source == source]
        recorded = sum(not test_meta[i].empty for i in part.index)
        if not recorded:
            print(f"{source:10s} {len(part):5d}   no age / sex / site recorded in this split here: not measured")
            measured[source] = {"n": int(len(part)), "recorded": 0}
            continue
        y, p = part["melanoma"].to_numpy(), part["p_mel"].to_numpy()
        combined = model.probability(p, [test_meta[i] for i in part.index])
        a, b = melanoma_auc(y, p), melanoma_auc(y, combined)
        ci_a, ci_b = bootstrap_auc_ci(y, p, args.bootstrap), bootstrap_auc_ci(y, combined, args.bootstrap)
        diff = paired_difference_ci(y, p, combined, args.bootstrap)
        sens, spec = sensitivity_specificity(y, combined, threshold)
        measured[source] = {"n": int(len(y)), "recorded": int(recorded), "image_auc": a, "image_auc_ci": ci_a, "metadata_auc": b,
                            "metadata_auc_ci": ci_b, "difference_ci": diff, "sensitivity": sens, "specificity": spec}
        print(f"{source:10s} {len(y):5d} {a:8.4f} ({ci_a[0]:.3f}-{ci_a[1]:.3f})      {b:8.4f} ({ci_b[0]:.3f}-{ci_b[1]:.3f})"
              f"      {b - a:+.4f} ({diff[0]:+.3f} to {diff[1]:+.3f});  at the threshold sens {sens:.3f} spec {spec:.3f}")
    model.record = {
        "fit_data": "validation images of the model's split_manifest.json that record the patient: "
                    + ", ".join(f"{s} {n}" for s, n in val.source.value_counts().items()),
        "fit_command": "python train/fit_metadata.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "c": best,
        "validation_out_of_fold": {s: {"image_auc": image_val[s], "metadata_auc": cv[best][s]} for s in SOURCES},
        "test": measured,
    }
    if args.write:
        if gain <= 0:
            print("not written: the metadata does not raise the cross-validated validation AUC")
        else:
            path = args.model / "config.json"
            config = json.loads(path.read_text())
            config[CONFIG_KEY] = model.to_config()
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            print(f"wrote {CONFIG_KEY} into {path}")
    return model.to_config()


if __name__ == "__main__":
    main()
