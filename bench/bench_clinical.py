"""Fit and measure the clinical-photograph part of the "not dermoscopy" warning (model/ood.py).

    .venv/bin/python bench/bench_clinical.py [--cache /tmp/ood_clinical_features.npz] [--write]

Clinical photographs of skin sit close to dermoscopy in the detector's PPCA density, so a logistic
regression on the same EfficientNet-Lite0 features separates them (`model.ood.fit_clinical_test`):
- clinical photographs: SD-198 (`../shared/data/sd198_clinical`, 802), split in halves stratified
  by disease (seed 42, byte-identical files kept together): one half to fit, the other only measured;
- dermoscopy to fit: 800 HAM10000 training images (the project's lesion-grouped split, the
  shipped models' `split_manifest.json`; `--ham-train`), every ISIC 2017 train image (2000;
  `--isic-train`), the Derm7pt train split;
- thresholds: P(clinical) quantiles on held-out dermoscopy (400 HAM10000 validation images,
  ISIC 2017 val, Derm7pt val): --caution-rate of them get a caution ("possibly_not_dermoscopy"),
  --clear-rate a warning ("not_dermoscopy"), and the PPCA threshold is their --percentile; with
  `--val-budget B` the pair (percentile, caution rate) is the most sensitive of `OPERATING_GRID`
  that warns at most B of every validation source (the shipped detector: `--val-budget 0.01`);
- measured: the held-out clinical half and every dermoscopy test set (HAM10000 test, ISIC 2017
  test, Derm7pt test), as the share warned (either level, PPCA or clinical test) and
  clearly warned. Targets: clinical warned >= 98 %, dermoscopy warned <= 1 % per set.

Features are cached in one .npz (`--cache`, outside the repository); `--write` saves the detector
with the clinical test and the measured rates into models/ood-detector/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from model.imageio import load_image
from model.ood import (
    DEFAULT_OOD_PATH,
    DERMOSCOPY,
    NOT_DERMOSCOPY,
    create_feature_extractor,
    extract_features,
    fit_clinical_test,
    fit_ood_detector,
    load_ood_detector,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# The shipped multi-source models' split (ids "<source>/<image_id>"); HAM10000's part is the
# project's lesion-grouped split (seed 42).
MANIFEST = ROOT / "models" / "efficientnet-lite2" / "split_manifest.json"
DERMOSCOPY_FIT = ("ham_train", "isic_train", "d7_train")
DERMOSCOPY_VAL = ("ham_val", "isic_val", "d7_val")
MEASURED = ("sd198_heldout", "ham_test", "isic_test", "d7_test")


def image_sets(data: Path, seed: int = 42, ham_train: int = 800, isic_train: int = 2000) -> dict[str, list[Path]]:
    """The image paths of every set, by name (module docstring); `ham_train` / `isic_train` images
    of those sources' training splits are fitted on (a fixed random subset when fewer than all)."""
    rng = np.random.default_rng(seed)
    manifest = {
        split: [i.split("/", 1)[1] for i in ids if i.startswith("ham10000/")]
        for split, ids in json.loads(MANIFEST.read_text()).items() if split in ("train", "validation", "test")
    }
    ham = lambda ids: [data / "ham10000/images" / f"{i}.jpg" for i in ids]  # noqa: E731
    isic = pd.read_csv(data / "isic2017/labels.csv")
    d7 = pd.read_csv(data / "derm7pt/labels.csv")
    sd = pd.read_csv(data / "sd198_clinical/labels.csv")
    return {
        "sd198": [data / "sd198_clinical" / p for p in sd["path"]],
        "ham_train": ham(rng.permutation(sorted(manifest["train"]))[:ham_train]),
        "ham_val": ham(rng.permutation(sorted(manifest["validation"]))[:400]),
        "ham_test": ham(manifest["test"]),
        "isic_train": [data / "isic2017" / p for p in
                       isic[isic.split == "train"]["path"].sample(frac=1.0, random_state=seed)[:isic_train]],
        "isic_val": [data / "isic2017" / p for p in isic[isic.split == "val"]["path"]],
        "isic_test": [data / "isic2017" / p for p in isic[isic.split == "test"]["path"]],
        "d7_train": [data / "derm7pt" / p for p in d7[d7.split == "train"]["path"]],
        "d7_val": [data / "derm7pt" / p for p in d7[d7.split == "val"]["path"]],
        "d7_test": [data / "derm7pt" / p for p in d7[d7.split == "test"]["path"]],
    }


def features(sets: dict[str, list[Path]], cache: Path, image_size: int) -> dict[str, np.ndarray]:
    """(N, 1280) features per set (the detector's own extractor and preprocessing), cached."""
    if cache.is_file():
        stored = np.load(cache)
        if all(name in stored and [str(p) for p in paths] == stored[name + "_paths"].tolist() for name, paths in sets.items()):
            return {name: stored[name] for name in sets}
    backbone = create_feature_extractor()
    out: dict[str, np.ndarray] = {}
    for name, paths in sets.items():
        start = time.time()
        chunks = []
        for i in range(0, len(paths), 64):
            images = [load_image(p, max_side=1024) for p in paths[i : i + 64]]
            chunks.append(extract_features(backbone, images, image_size).numpy())
        out[name], out[name + "_paths"] = np.concatenate(chunks), np.array([str(p) for p in paths])
        print(f"features {name}: {out[name].shape} in {time.time() - start:.0f} s", flush=True)
    np.savez(cache, **out)
    return {name: out[name] for name in sets}


def clinical_halves(paths: list[Path], seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the fitting and held-out halves of SD-198: stratified by disease folder,
    byte-identical files in the same half."""
    digests = [hashlib.md5(p.read_bytes()).hexdigest() for p in paths]
    groups = pd.DataFrame({"label": [p.parent.name for p in paths], "digest": digests})
    fit: list[int] = []
    rng = np.random.default_rng(seed)
    for _, rows in groups.groupby("label"):
        unique = rows["digest"].drop_duplicates().to_numpy()
        chosen = set(rng.permutation(unique)[: len(unique) // 2])
        fit += [i for i in rows.index if groups.at[i, "digest"] in chosen]
    fit_idx = np.array(sorted(fit))
    return fit_idx, np.setdiff1d(np.arange(len(paths)), fit_idx)


C_GRID = (0.25, 1.0, 4.0, 16.0)


def choose_c(clinical: torch.Tensor, dermoscopy: torch.Tensor, caution_rate: float, folds: int = 5) -> tuple[float, dict]:
    """The logistic regression's C by cross-validation on the fitting images only: per fold, the
    share of held-out clinical photographs at or above the P(clinical) that warns `caution_rate` of
    the held-out dermoscopy. Returns (best C, {C: mean recall}); ties go to the stronger prior."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from model.ood import normalise

    x = torch.cat([normalise(clinical), normalise(dermoscopy)]).numpy()
    y = np.r_[np.ones(len(clinical)), np.zeros(len(dermoscopy))]
    recall = {}
    for c in C_GRID:
        scores = []
        for train, held in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y):
            model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(x[train], y[train])
            p = model.predict_proba(x[held])[:, 1]
            cut = np.quantile(p[y[held] == 0], 1.0 - caution_rate)
            scores.append(float(np.mean(p[y[held] == 1] >= cut)))
        recall[c] = float(np.mean(scores))
    best = max(C_GRID, key=lambda c: (round(recall[c], 4), -c))
    return best, recall


#: (PPCA percentile, clinical caution rate) pairs from the most to the least sensitive: `--val-budget`
#: takes the first that warns at most the budget of every held-out dermoscopy validation source.
OPERATING_GRID = ((99.7, 0.003), (99.8, 0.002), (99.9, 0.001), (100.0, 0.0))


def warned_rate(detector, features: torch.Tensor) -> float:
    """Share of images warned (either level, either test)."""
    scores, clinical = detector.score_features(features), detector.clinical_probability(features)
    return float(np.mean([detector.result(float(s), float(p)).level != DERMOSCOPY for s, p in zip(scores, clinical)]))


def build(base, feats: dict[str, torch.Tensor], args: argparse.Namespace, fit_data: str, percentile: float,
          caution_rate: float):
    """The detector at one operating point: the PPCA refitted (with --refit-ppca) at `percentile`,
    the clinical test at `caution_rate` (its clear rate no higher)."""
    detector = base
    if args.refit_ppca:
        detector = fit_ood_detector(
            torch.cat([feats[n] for n in DERMOSCOPY_FIT]),
            torch.cat([feats[n] for n in DERMOSCOPY_VAL]),
            base.image_size,
            n_components=base.components.shape[0],
            percentile=percentile,
            config={k: v for k, v in base.config.items() if k in ("feature_extractor", "preprocessing", "score")},
        )
        detector.config.update(
            fit_data=fit_data,
            threshold_data=f"{percentile}th percentile of 400 HAM10000 validation + ISIC 2017 val + Derm7pt val",
            fit_command="python bench/bench_clinical.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        )
    fit_clinical_test(
        detector,
        feats["sd198_fit"],
        torch.cat([feats[n] for n in DERMOSCOPY_FIT]),
        torch.cat([feats[n] for n in DERMOSCOPY_VAL]),
        caution_rate=caution_rate,
        clear_rate=min(args.clear_rate, caution_rate),
        c=args.c,
    )
    detector.clear_ratio = args.clear_ratio
    return detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ood_clinical_features.npz"))
    parser.add_argument("--detector", type=Path, default=DEFAULT_OOD_PATH, help="the PPCA detector to extend")
    parser.add_argument("--caution-rate", type=float, default=0.003,
                        help="share of held-out dermoscopy the clinical test may caution (the target: <= 1 %% warned "
                             "per dermoscopy set, shared with the PPCA test's --percentile)")
    parser.add_argument("--clear-rate", type=float, default=0.002)
    parser.add_argument("--clear-ratio", type=float, default=1.5, help="PPCA score / threshold above which it is clear")
    parser.add_argument("--c", default="auto",
                        help="inverse L2 strength of the logistic regression; auto: chosen by 5-fold cross-validation "
                             "on the fitting images (never the measured ones)")
    parser.add_argument("--refit-ppca", action="store_true",
                        help="also refit the PPCA density on the three dermoscopy sources' fitting images "
                        "(threshold: --percentile of the held-out ones), keeping its n_components")
    parser.add_argument("--percentile", type=float, default=99.7)
    parser.add_argument("--val-budget", type=float, default=None,
                        help="pick the PPCA percentile and the caution rate (from --percentile / --caution-rate "
                        "towards stricter, OPERATING_GRID) as the first that warns at most this share of every "
                        "held-out dermoscopy validation source (e.g. 0.005); the test sets play no part")
    parser.add_argument("--ham-train", type=int, default=800, help="HAM10000 training images to fit on")
    parser.add_argument("--isic-train", type=int, default=2000, help="ISIC 2017 training images to fit on (2000: all)")
    parser.add_argument("--write", action="store_true", help="save the extended detector into --detector")
    args = parser.parse_args()

    torch.set_num_threads(1)
    detector = load_ood_detector(args.detector)
    sets = image_sets(args.data, ham_train=args.ham_train, isic_train=args.isic_train)
    fit_data = (f"{len(sets['ham_train'])} HAM10000 train (project split) + {len(sets['isic_train'])} ISIC 2017 train"
                f" + Derm7pt train ({len(sets['d7_train'])})")
    feats = {name: torch.from_numpy(f) for name, f in features(sets, args.cache, detector.image_size).items()}
    fit_idx, held_idx = clinical_halves(sets["sd198"])
    feats["sd198_fit"], feats["sd198_heldout"] = feats["sd198"][fit_idx], feats["sd198"][held_idx]
    if args.c == "auto":
        args.c, recall = choose_c(feats["sd198_fit"], torch.cat([feats[n] for n in DERMOSCOPY_FIT]), args.caution_rate)
        print("C by 5-fold CV on the fitting images (clinical recall at the caution rate): "
              + ", ".join(f"{c:g}: {r:.1%}" for c, r in recall.items()) + f" -> C = {args.c:g}")
    args.c = float(args.c)
    base = detector
    settings = [(args.percentile, args.caution_rate)]
    if args.val_budget is not None:
        settings = [(p, r) for p, r in OPERATING_GRID if p >= args.percentile and r <= args.caution_rate]
    for percentile, caution_rate in settings:
        detector = build(base, feats, args, fit_data, percentile, caution_rate)
        rates = {name: warned_rate(detector, feats[name]) for name in DERMOSCOPY_VAL}
        print(f"PPCA percentile {percentile}, clinical caution rate {caution_rate:.1%}: validation warned "
              + ", ".join(f"{n} {r:.1%}" for n, r in rates.items()))
        if args.val_budget is None or max(rates.values()) <= args.val_budget:
            break
    else:
        print(f"no setting keeps every validation source at or under {args.val_budget:.1%}: the strictest one is used")
    args.percentile, args.caution_rate = percentile, caution_rate
    print(f"clinical test: caution at P(clinical) >= {detector.clinical_caution:.3f}, "
          f"clear at >= {detector.clinical_clear:.3f}; PPCA clear above {args.clear_ratio}x its threshold")
    measured = {}
    print(f"{'set':16s} {'n':>5s} {'warned':>8s} {'clear':>8s} {'PPCA only':>10s}  target")
    for name in ("sd198_fit", *MEASURED, *DERMOSCOPY_VAL):
        scores = detector.score_features(feats[name])
        clinical = detector.clinical_probability(feats[name])
        levels = [detector.result(float(s), float(p)).level for s, p in zip(scores, clinical)]
        warned = float(np.mean([lv != DERMOSCOPY for lv in levels]))
        clear = float(np.mean([lv == NOT_DERMOSCOPY for lv in levels]))
        ppca = float((scores > detector.threshold).float().mean())
        target = ">= 98 %" if name.startswith("sd198") else "<= 1 %"
        ok = (warned >= 0.98) if name.startswith("sd198") else (warned <= 0.01)
        note = "(fitted on)" if name == "sd198_fit" else ("(thresholds)" if name in DERMOSCOPY_VAL else ("OK" if ok else "MISSED"))
        print(f"{name:16s} {len(levels):5d} {warned:8.1%} {clear:8.1%} {ppca:10.1%}  {target} {note}")
        measured[name] = {"n": len(levels), "warned": warned, "clear": clear}
    if args.write:
        detector.config.update(
            clinical_fit_data=f"SD-198 clinical half (stratified by disease, seed 42) vs {fit_data}",
            clinical_threshold_data=f"P(clinical) quantiles: {args.caution_rate:.1%} (caution) and "
            f"{min(args.clear_rate, args.caution_rate):.1%} (clear) of 400 HAM10000 validation + ISIC 2017 val + Derm7pt val",
            clinical_fit_command="python bench/bench_clinical.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            measured_warning_rates=measured,
        )
        detector.save(args.detector)
        print(f"wrote {args.detector}")


if __name__ == "__main__":
    main()
