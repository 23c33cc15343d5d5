"""Fit a trained model's top-class decision rule on its validation predictions (post-hoc logit
adjustment, Menon et al. 2021) and store it in its config.json (`dx_decision_offsets`, read by
`model.decision` in the app, evaluate.py and predict.py).

offsets = tau * log(prior), prior = the dx classes' frequencies in the pooled validation splits,
tau the value of a grid (0 = plain argmax) with the highest mean validation balanced accuracy over
the sources (each source's balanced accuracy: mean recall over the classes it has); then, if it
generalises better, each class's offset refined on its own by coordinate ascent on the same
objective. Which of the two procedures is used is decided by 5-fold cross-validation inside the
validation predictions (folds by lesion, so a lesion's images stay together): the per-class
refinement fits validation more closely but can overfit its rare classes. P(melanoma)
and every probability are untouched: only which class is called "top" changes, so melanoma AUC and
the melanoma threshold stay as they are.

Validation only, never a test split. The predictions are `train/evaluate.py --split validation`
outputs, one folder per source (the same ones `train/operating_points.py` reads):

    for s in ham10000 isic2017 derm7pt; do
      python train/evaluate.py --model models/melanoma-vit-hybrid --data ../shared/data/$s --split validation \\
        --no-calibrate --output-dir runs/val/melanoma-vit-hybrid/$s
    done
    python train/decision_rule.py --model models/melanoma-vit-hybrid --predictions runs/val/melanoma-vit-hybrid/* --write-config
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

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import balanced_accuracy_score  # noqa: E402
from sklearn.model_selection import GroupKFold  # noqa: E402

from model.decision import DECISION_KEY, balanced_scores  # noqa: E402

logger = logging.getLogger(__name__)
RULE_KEY = "dx_decision_rule"
TAUS = tuple(round(0.1 * i, 1) for i in range(21))  # 0.0 ... 2.0
OFFSETS = tuple(np.arange(-3.0, 3.01, 0.25))  # per-class offsets tried by the coordinate ascent
ROUNDS = 3


def read_validation(folder: Path, labels: list[str]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(source name, (N, C) probabilities in `labels` order, (N,) true class index, (N,) group: the
    lesion, else the image) of one evaluate.py output folder on a validation split (rows whose label
    the model lacks are dropped)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    if metrics.get("split") != "validation":
        raise ValueError(f"{folder} holds predictions on split {metrics.get('split')!r}; the decision rule "
                         "is fitted on validation only")
    table = pd.read_csv(folder / "predictions.csv")
    table = table[table["label"].isin(labels)]
    probs = table[[f"p_{name}" for name in labels]].to_numpy(float)
    groups = table["image_id"].astype(str)
    if "lesion_id" in table:
        groups = table["lesion_id"].astype(object).where(table["lesion_id"].notna(), groups).astype(str)
    return Path(metrics["data"]).name, probs, table["label"].map(labels.index).to_numpy(int), groups.to_numpy()


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    """scikit-learn's balanced accuracy: mean recall over the classes present in `y` (a source lacks
    some dx classes; predictions of those count as errors, not as classes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true": expected here
        return float(balanced_accuracy_score(y, predicted))


def mean_balanced_accuracy(sets: list[tuple[str, np.ndarray, np.ndarray]], offsets: np.ndarray) -> dict[str, float]:
    """Each set's validation balanced accuracy under `offsets`, and their mean ("mean")."""
    scores = {name: balanced_accuracy(y, balanced_scores(p, offsets).argmax(axis=1)) for name, p, y in sets}
    return {**scores, "mean": float(np.mean(list(scores.values())))}


def fit(sets: list[tuple[str, np.ndarray, np.ndarray]], num_classes: int, per_class: bool = True) -> dict[str, Any]:
    """The offsets with the best mean validation balanced accuracy over `sets`.

    Two stages: tau on TAUS with offsets = tau * log prior (the logit-adjustment family), then
    (with `per_class`) coordinate ascent from there, one class's offset at a time on OFFSETS (a
    separate decision rule per class: the sources differ in which classes they have, and one tau
    must trade them off), ROUNDS passes, each change kept only if the mean improves.
    """
    y_all = np.concatenate([y for _, _, y in sets])
    prior = np.bincount(y_all, minlength=num_classes) + 1.0  # +1: a class absent from validation
    prior = prior / prior.sum()
    grid = [{"tau": tau, **mean_balanced_accuracy(sets, tau * np.log(prior))} for tau in TAUS]
    best_tau = max(grid, key=lambda row: (row["mean"], -row["tau"]))  # ties: the smaller adjustment
    offsets = best_tau["tau"] * np.log(prior)
    best = mean_balanced_accuracy(sets, offsets)
    for _ in range(ROUNDS if per_class else 0):
        for c in range(num_classes):
            for value in OFFSETS:
                trial = offsets.copy()
                trial[c] = value
                scores = mean_balanced_accuracy(sets, trial)
                if scores["mean"] > best["mean"] + 1e-9:
                    offsets, best = trial, scores
    return {"tau": best_tau["tau"], "tau_scores": best_tau, "offsets": offsets - offsets.mean(), "best": best,
            "grid": grid}


PROCEDURES = {"tau": False, "tau + per-class offsets": True}  # name -> fit(per_class=...)
FOLDS, REPEATS = 5, 2  # the cross-validation that picks the procedure


def group_folds(name: str, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's fold (0 .. folds - 1): scikit-learn's shuffled GroupKFold, so a lesion's images share one."""
    if len(np.unique(groups)) < folds:
        raise ValueError(f"{name}: {len(np.unique(groups))} lesions in validation, fewer than {folds} folds")
    fold = np.empty(len(groups), dtype=int)
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(groups)), groups=groups)):
        fold[held] = k
    return fold


def cross_validate(sets: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], num_classes: int,
                   folds: int = FOLDS, repeats: int = REPEATS) -> dict[str, float]:
    """Mean held-out balanced accuracy (mean over the sources) of each procedure in PROCEDURES:
    each source's validation rows split into `folds` folds by group (scikit-learn's shuffled
    GroupKFold, seeded, `repeats` times), the rule fitted on the other folds of every source and
    scored on the held-out one."""
    scores: dict[str, list[float]] = {name: [] for name in PROCEDURES}
    for repeat in range(repeats):
        fold_of = [group_folds(name, groups, folds, seed=repeat) for name, _, _, groups in sets]
        for k in range(folds):  # group_folds leaves no fold empty
            train = [(n, p[f != k], y[f != k]) for (n, p, y, _), f in zip(sets, fold_of)]
            held = [(n, p[f == k], y[f == k]) for (n, p, y, _), f in zip(sets, fold_of)]
            for name, per_class in PROCEDURES.items():
                scores[name].append(mean_balanced_accuracy(held, fit(train, num_classes, per_class)["offsets"])["mean"])
    return {name: float(np.mean(values)) for name, values in scores.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder (its config.json is read, and written)")
    parser.add_argument("--predictions", type=Path, nargs="+", required=True,
                        help="evaluate.py output folders on validation splits, one per source")
    parser.add_argument("--write-config", action="store_true", help="store the rule in the model's config.json")
    parser.add_argument("--procedure", choices=("cv", *PROCEDURES), default="cv",
                        help="cv (default): the procedure with the higher cross-validated balanced accuracy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config_path = args.model / "config.json"
    config = json.loads(config_path.read_text())
    # transformers configs list the classes as id2label; TimmWrapper folders as label_names
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))] if "id2label" in config \
        else list(config["label_names"])
    grouped = [read_validation(folder, labels) for folder in args.predictions]
    sets = [(name, probs, y) for name, probs, y, _ in grouped]
    cv = None
    if args.procedure == "cv":
        cv = cross_validate(grouped, len(labels))
        procedure = max(PROCEDURES, key=lambda name: (cv[name], -PROCEDURES[name]))  # ties: the simpler
        print("cross-validated balanced accuracy (held-out folds of validation): "
              + ", ".join(f"{name} {score:.3f}" for name, score in cv.items()) + f" -> {procedure}")
    else:
        procedure = args.procedure
    result = fit(sets, len(labels), per_class=PROCEDURES[procedure])
    names = [name for name, _, _ in sets]
    print("validation balanced accuracy\ntau   " + "  ".join(f"{n:>9}" for n in names) + "       mean")
    for row in result["grid"]:
        mark = "  <- best tau" if row["tau"] == result["tau"] else ""
        print(f"{row['tau']:.1f}   " + "  ".join(f"{row[n]:9.3f}" for n in names) + f"  {row['mean']:9.3f}{mark}")
    best = result["best"]
    print(f"{procedure:<18s}" + "  ".join(f"{n:>9}" for n in names) + "       mean")
    print("                  " + "  ".join(f"{best[n]:9.3f}" for n in names) + f"  {best['mean']:9.3f}")
    print("offsets: " + ", ".join(f"{name} {o:+.2f}" for name, o in zip(labels, result["offsets"])))
    rule = {
        "method": "argmax(log p - offsets): logit adjustment (tau * log prior)"
                  + (", then per-class coordinate ascent" if PROCEDURES[procedure] else ""),
        "procedure": procedure,
        **({"cross_validation": {"folds": FOLDS, "repeats": REPEATS, "by": "lesion (else image)",
                                 "balanced_accuracy": {k: round(v, 4) for k, v in cv.items()}}} if cv else {}),
        "tau": result["tau"],
        "prior": "dx class frequencies of the pooled validation splits",
        "objective": "mean over the sources of the validation balanced accuracy",
        "validation_balanced_accuracy": {n: round(best[n], 4) for n in names},
        "validation_balanced_accuracy_argmax": {n: round(result["grid"][0][n], 4) for n in names},
        "data": {n: int(len(y)) for n, _, y in sets},
        "command": "python " + shlex.join(sys.argv if argv is None else ["train/decision_rule.py", *argv]),
    }
    if args.write_config:
        config[DECISION_KEY] = {name: round(float(o), 6) for name, o in zip(labels, result["offsets"])}
        config[RULE_KEY] = rule
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        logger.info("wrote %s and %s (tau %.1f) to %s", DECISION_KEY, RULE_KEY, result["tau"], config_path)
    return rule


if __name__ == "__main__":
    main()
