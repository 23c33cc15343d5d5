#!/usr/bin/env python
"""Evaluate a melanoma classifier on a labelled data set: metrics.json, predictions.csv, plots.

    python train/evaluate.py --model models/vit-small --data ../shared/data/isic2017 --split test \
        --output-dir models/vit-small/eval/isic2017_test --tta 8

Research/education tool: the numbers describe a model on a data set, not a diagnosis.

Which images: the model folder's split_manifest.json (or --manifest) picks the --split images (default
test) of the data it split, e.g. the `ham10000/`-prefixed ids of a multi-source manifest for
`--data ../shared/data/ham10000`; any other data (a `path,dx` CSV, a folder) is evaluated whole and
checked against the manifest's train and validation images (`leakage_check` in metrics.json).
`--limit N` evaluates a seeded sample of N of them, stratified by dx.

What is computed (probabilities are softmax(logits / T) averaged over the TTA views, with T the
temperature fitted on validation data, or the one folded into the model's head (`folded_temperature`),
or 1; logits are the raw ones: the folded temperature is multiplied back first):
- melanoma-vs-rest on P(mel): ROC AUC with a 95% stratified percentile bootstrap CI (melanomas
  and others resampled separately, `--bootstrap` resamples, seed 0); sensitivity/specificity at
  0.5 and at the threshold giving 95% sensitivity on validation data (or the model config's
  `melanoma_threshold` when no validation data is given; null when neither exists).
- multiclass: the model's probabilities summed into the data's label space (identity for dx
  data; "mel" vs the sum of the other classes for binary data); predicted class = argmax.
  Accuracy, balanced accuracy (mean recall), macro-F1 and per-class recall are computed over
  the classes present in the labels (ISIC 2017 has only mel/nv/bkl), so absent classes do not
  dilute the means, while predictions of absent classes still count as errors.
- top-label ECE (15 bins) before (T = 1) and after temperature scaling.
- ViT models and data with lesion masks (HAM10000's masks/<image_id>_segmentation.png): the
  share of attention-rollout mass inside the lesion (`rollout_mask_share`) and what a uniform
  map would score (the mean mask area, `rollout_mask_share_uniform`).
- data with subject metadata (HAM10000's sex/age/localization, ISIC 2017's sex/age): melanoma AUC
  with CI and sensitivity/specificity per sex, age band and anatomical site (`subgroups`).

Metrics use scikit-learn: `evaluate.load("roc_auc")` etc. wrap the same functions but fetch their
scripts from the Hugging Face Hub, which fails offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# Command line, parsed before the heavy imports below
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (save_pretrained) or Hub id")
    parser.add_argument("--data", required=True, help="anything train.data.load_image_dataset accepts (folder, CSV with path,dx, Hub id)")
    # --output_dir as an alias: train.py spells its flags with underscores.
    parser.add_argument("--output-dir", "--output_dir", required=True, help="where metrics.json, predictions.csv and the plots go")
    parser.add_argument("--split", default=None,
                        help="split of --data to evaluate (default: 'test' when the manifest split --data, else "
                             "every row; 'all': every row)")
    parser.add_argument("--manifest", default=None,
                        help="split_manifest.json of the training run (default: the model folder's own; 'none': "
                             "no manifest). When it split --data, --split picks its image_ids and its splits are "
                             "checked for shared images/lesions; otherwise the evaluated images are checked against "
                             "its train/validation splits. Named here, its validation split also fits the "
                             "temperature and threshold")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate a random N images of the split, stratified by dx (seeded by --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    parser.add_argument("--val-data", default=None, help="validation data for temperature and the 95%%-sensitivity threshold")
    parser.add_argument("--val-split", default="validation", help="split of --val-data (default: validation; 'all': every row)")
    parser.add_argument("--masks", default=None, help="folder of <image_id>_segmentation.png lesion masks (default: masks/ beside --data)")
    parser.add_argument("--tta", type=int, default=1, help="dihedral test-time views, 1 (none) to 8")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--label-scheme", choices=("auto", "dx", "binary"), default="auto",
                        help="labels of the data: dx codes or melanoma-vs-rest (auto: binary for binary models)")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="fit a temperature on the validation data (default: on)")
    parser.add_argument("--write-config", action="store_true",
                        help="store the fitted temperature (folded into the classifier head) and the validation "
                             "threshold in the model folder")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC CI")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--backend", default="torch",
                        help="torch, onnx, onnx-int8 or auto (model/onnx_backend.py); default torch, the reference the cards report")
    return parser


if __name__ == "__main__":
    # --help and flag errors answer at once instead of after the torch/transformers/datasets imports.
    build_parser().parse_args()
    if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        # Run as a script, Python puts train/ first on sys.path, where train/train.py shadows the
        # `train` package: drop that entry (what `python -P` does); `model` and `train` come from the
        # installed project (`pip install -e .`).
        del sys.path[0]

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import model as _melanoma_models  # noqa: E402,F401  registers MelanomaViT with the Auto classes
from model.calibration import fold_temperature, folded_temperature  # noqa: E402
from model.geometry import processor_geometry  # noqa: E402
from model.imageio import load_image  # noqa: E402
from model.labels import BINARY_LABELS, MELANOMA  # noqa: E402
from model.labels import CRITERIA_LABELS  # noqa: E402
from model.classifier import Classifier  # noqa: E402
from model.decision import balanced_scores, decision_offsets  # noqa: E402
from model.loading import ROLLOUT_MODEL_TYPES, num_prefix_tokens  # noqa: E402
from model.metrics_schema import METRIC_KEYS, TARGET_SENSITIVITY  # noqa: E402
from model.rollout import attention_rollout  # noqa: E402
from model.sevenpoint import MELANOMA_SCORE_THRESHOLD, SEVEN_POINT, criterion_probability, seven_point_score  # noqa: E402
from train.data import label_names, load_image_dataset, unlabelled_image_ids  # noqa: E402
from train.metrics import (  # noqa: E402
    DISCLAIMER,
    ECE_BINS,
    bootstrap_auc_ci,
    expected_calibration_error,
    fit_temperature,
    mask_share,
    melanoma_auc,
    multiclass_metrics,
    sensitivity_specificity,
    tempered_probabilities,
    threshold_for_sensitivity,
)
from train.plots import plot_confidence_hist, plot_confusion, plot_reliability, plot_roc  # noqa: E402
from train.sources import derm7pt_criteria, subject_metadata  # noqa: E402
from train.splits import (  # noqa: E402
    apply_manifest,
    check_no_leakage,
    manifest_image_ids,
    manifest_splits_of,
    read_manifest,
    stratified_sample,
)

logger = logging.getLogger("evaluate")

DEFAULT_THRESHOLD = 0.5
#: The split manifest a training run writes into its model folder (train.py).
MANIFEST = "split_manifest.json"


# ------------------------------------------------------------------------------ model + labels


def model_labels(config: Any) -> list[str]:
    return [config.id2label[i] for i in range(len(config.id2label))]


def label_groups(model_names: list[str], data_names: list[str]) -> np.ndarray:
    """(K, C) 0/1 matrix: which of the model's C classes make up each of the data's K classes.

    A model class named like a data class maps onto it; for binary data ("other", "mel") every
    other model class maps onto "other". Raises ValueError when a model class fits nowhere.
    """
    groups = np.zeros((len(data_names), len(model_names)))
    for c, name in enumerate(model_names):
        if name in data_names:
            groups[data_names.index(name), c] = 1
        elif tuple(data_names) == BINARY_LABELS:
            groups[data_names.index("other"), c] = 1
        else:
            raise ValueError(
                f"model class {name!r} is not one of the data's classes {data_names}; evaluate with "
                "--label-scheme binary (melanoma vs rest) or use a model with dx-code labels."
            )
    return groups


# --------------------------------------------------------------------------------------- data


def _manifest_path(args: EvalArgs) -> tuple[Path | None, bool]:
    """(split manifest, whether --manifest named it): --manifest, else the model folder's own."""
    if args.manifest is not None:
        return (None, True) if args.manifest.lower() == "none" else (Path(args.manifest), True)
    own = Path(args.model) / MANIFEST
    return (own, False) if own.is_file() else (None, False)


def _overlap_check(test: datasets.Dataset, manifest: dict, path: Path) -> dict[str, Any]:
    """Leakage check of data the manifest did not split: which evaluated images the model was trained
    or validated on (by image_id, source prefixes removed)."""
    evaluated = set(rows_all(test, "image_id"))
    overlap = {name: len(evaluated & manifest_image_ids(manifest, name)) for name in ("train", "validation")}
    if not any(overlap.values()):
        check = f"passed: none of the {len(test)} evaluated images is in the train or validation split of {path}"
    else:
        where = " and ".join(f"{k} in its {name} split" for name, k in overlap.items() if k)
        check = (f"FAILED: of the {len(test)} evaluated images, {where} ({path}): metrics on images the model was "
                 "trained or validated on are optimistic")
        logger.warning("leakage check %s", check)
    return {"leakage_check": check, "leakage_overlap": overlap}


def _select_data(args: EvalArgs) -> tuple[datasets.Dataset, datasets.Dataset | None, dict]:
    """Test (and validation) datasets per the CLI, with leakage checks. Returns (test, val, info).

    The split manifest (--manifest, else the model folder's own split_manifest.json) picks the
    --split images (default test) when it split --data (a multi-source manifest: one of its source
    folders), and its splits are checked for shared images or lesions. Other data, and --split all,
    is evaluated whole and checked for images of the manifest's train and validation splits.
    Only a --manifest given by name also supplies the validation split (temperature, threshold);
    by default the model's stored calibration is evaluated.
    """
    info: dict[str, Any] = {}
    val = None
    path, explicit = _manifest_path(args)
    manifest = read_manifest(path) if path is not None else None
    mine = None
    if manifest is not None:
        # Recorded data paths are relative to the training run's working directory: the project
        # root, two folders above models/<name>/split_manifest.json.
        mine = manifest_splits_of(manifest, args.data, roots=(Path.cwd(), *path.resolve().parents[2:3]))
        if explicit and mine is None:
            sources = [s["data"] for s in manifest.get("sources") or []] or [manifest.get("data")]
            raise ValueError(f"--manifest {path} does not split --data {args.data} (it splits {sources})")
        if not explicit and not ({"sources", "data"} & set(manifest)):
            mine = None  # a manifest that records no data path could describe any data: check overlap only
        info.update(manifest=str(path))
    if mine is not None and args.split != "all":
        source, splits = mine
        full = load_image_dataset(args.data, label_scheme=args.label_scheme, split=None)
        dd = apply_manifest(full, splits, unlabelled=unlabelled_image_ids(args.data))
        # A manifest whose splits share an image or a lesion would leak training images.
        check_no_leakage(dd)
        split = args.split or "test"
        if split not in dd:
            raise ValueError(f"--split {split!r} is not in the manifest {path} (splits: {list(dd)})")
        test = dd[split]
        if explicit and args.val_data is None and "validation" in dd and split != "validation":
            val = dd["validation"]
        of = f" of source {source!r}" if source else ""
        info.update(manifest_source=source, manifest_sizes={k: len(v) for k, v in dd.items()},
                    leakage_check=f"passed: no image_id or lesion_id shared by the splits{of} of {path}")
    else:
        split = _all_rows(args.split)
        test = load_image_dataset(args.data, label_scheme=args.label_scheme, split=split)
        if manifest is not None:
            info.update(_overlap_check(test, manifest, path))
        else:
            info["leakage_check"] = "not checked: no split manifest (pass --manifest split_manifest.json)"
    if args.val_data is not None:
        val = load_image_dataset(args.val_data, label_scheme=args.label_scheme, split=args.val_split)
        check_no_leakage({"validation": val, "test": test})
        passed = "passed: no image_id or lesion_id shared by the validation and test images"
        info["leakage_check"] = passed if manifest is None else f"{info['leakage_check']}; {passed}"
    if args.limit is not None and args.limit < len(test):
        info["sample"] = {"n": args.limit, "of": len(test), "seed": args.seed, "stratified_by": "dx"}
        test = stratified_sample(test, args.limit, args.seed)
    info["split"] = split
    return test, val, info


def find_mask_dir(spec: str, masks: str | None) -> Path | None:
    """Folder of <image_id>_segmentation.png lesion masks: --masks, or masks/ beside the data."""
    if masks:
        path = Path(masks)
        if not path.is_dir():
            raise ValueError(f"--masks {masks} is not a folder")
        return path
    path = Path(spec)
    base = path if path.is_dir() else path.parent
    return base / "masks" if (base / "masks").is_dir() else None


def _load_mask(path: Path) -> np.ndarray:
    """(H, W) float 0/1 lesion mask (white = lesion)."""
    with Image.open(path) as img:
        return (np.asarray(img.convert("L")) >= 128).astype(np.float64)


# ---------------------------------------------------------------------------------- inference


def predict(
    classifier: Classifier,
    ds: datasets.Dataset,
    tta: int,
    batch_size: int,
    mask_dir: Path | None = None,
    desc: str = "evaluate",
) -> dict[str, Any]:
    """Logits of every TTA view (`Classifier.forward_views`), plus rollout mask shares where masks exist.

    Returns:
        {"logits": (N, tta, C) float32 raw logits (times the config's `folded_temperature`, so that
         temperatures are fitted and applied as for an unfolded model), "head_logits": {head:
         (N, tta, C_head)} as the model gives them (models with extra heads), "labels": (N,) int,
         "image_ids": [N], "lesion_ids": [N], "mask_shares": [float], "mask_areas": [float]}
         (mask lists over images with masks).
    """
    config = classifier.config
    do_rollout = mask_dir is not None and config.model_type in ROLLOUT_MODEL_TYPES
    raw = ds.cast_column("image", datasets.Image(decode=False)).with_format(None)
    logits, shares, areas = [], [], []
    head_logits: dict[str, list[torch.Tensor]] = {}  # extra heads (multi-source MelanomaViT)
    head_views: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, len(raw), batch_size), desc=desc, unit="batch"):
        rows = raw[start : start + batch_size]
        images = [load_image(v) for v in rows["image"]]
        pixel_values = classifier.pixel_values(images)
        views = []
        for v, out in enumerate(classifier.forward_views(pixel_values, tta, attentions=do_rollout)):
            want_attn = do_rollout and v == 0
            views.append(out.logits.float().cpu())
            for name, z in (getattr(out, "head_logits", None) or {}).items():
                head_views.setdefault(name, []).append(z.float().cpu())
            if want_attn:
                grid = (pixel_values.shape[-2] // _patch(config)[0], pixel_values.shape[-1] // _patch(config)[1])
                num_prefix = num_prefix_tokens(config)
                token_rows = ("cls", "dist") if num_prefix == 2 else ("cls",)
                maps = attention_rollout(out.attentions, num_prefix_tokens=num_prefix, token_rows=token_rows, grid_size=grid)
                for image_id, saliency in zip(rows["image_id"], maps.float().cpu()):
                    mask_path = mask_dir / f"{image_id}_segmentation.png"
                    if mask_path.is_file():
                        mask = _load_mask(mask_path)
                        share = mask_share(saliency, mask)
                        if share is not None:
                            shares.append(share)
                            areas.append(float(mask.mean()))
        logits.append(torch.stack(views, dim=1))  # (B, V, C)
        for name, zs in head_views.items():
            head_logits.setdefault(name, []).append(torch.stack(zs, dim=1))  # (B, V, C_head)
        head_views = {}
    return {
        "logits": torch.cat(logits).numpy() * (folded_temperature(config) or 1.0),
        "head_logits": {name: torch.cat(z).numpy() for name, z in head_logits.items()},
        "labels": np.asarray(rows_all(raw, "label"), dtype=int),
        "image_ids": rows_all(raw, "image_id"),
        "lesion_ids": rows_all(raw, "lesion_id"),
        "mask_shares": shares,
        "mask_areas": areas,
    }


def rows_all(ds: datasets.Dataset, column: str) -> list:
    return list(ds.select_columns([column])[column])


def _patch(config: Any) -> tuple[int, int]:
    p = config.patch_size
    return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))


# ------------------------------------------------------------------------------------ metrics


def compute_metrics(
    pred: dict[str, Any],
    groups: np.ndarray,
    data_names: list[str],
    mel_index: int,
    temperature: float,
    temperature_fitted: float | None,
    threshold_val95: float | None,
    n_bootstrap: int,
    offsets: np.ndarray | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics of one prediction set. Returns (metrics, arrays for plots/CSV).

    The predicted class is the model's decision (`model.decision`): the argmax of its balanced scores
    (`offsets`, the config's `dx_decision_offsets`) summed into the data's classes, the argmax of the
    probabilities without offsets; P(mel) is always the calibrated probability."""
    y = pred["labels"]
    probs_model = tempered_probabilities(pred["logits"], temperature)  # (N, C)
    probs = probs_model @ groups.T  # (N, K) in the data's label space
    p_mel = probs_model[:, mel_index]
    y_mel = np.array([data_names[i] == MELANOMA for i in y], dtype=int)
    predicted = (balanced_scores(probs_model, offsets) @ groups.T).argmax(axis=1)

    sens_d, spec_d = sensitivity_specificity(y_mel, p_mel, DEFAULT_THRESHOLD)
    sens_v, spec_v = (None, None) if threshold_val95 is None else sensitivity_specificity(y_mel, p_mel, threshold_val95)
    ci = bootstrap_auc_ci(y_mel, p_mel, n_resamples=n_bootstrap, seed=0)
    multi = multiclass_metrics(y, predicted, data_names)
    probs_raw = tempered_probabilities(pred["logits"], 1.0) @ groups.T
    probs_cal = None if temperature_fitted is None else tempered_probabilities(pred["logits"], temperature_fitted) @ groups.T
    metrics = {
        "n": int(len(y)),
        "n_melanoma": int(y_mel.sum()),
        "labels": multi["labels"],
        "melanoma_auc": melanoma_auc(y_mel, p_mel),
        "melanoma_auc_ci95": None if ci is None else list(ci),
        "threshold_default": DEFAULT_THRESHOLD,
        "sensitivity_default": sens_d,
        "specificity_default": spec_d,
        "threshold_val95": threshold_val95,
        "sensitivity_val95": sens_v,
        "specificity_val95": spec_v,
        "balanced_accuracy": multi["balanced_accuracy"],
        "decision_rule": "argmax" if offsets is None else "logit-adjusted (config.dx_decision_offsets)",
        "accuracy": multi["accuracy"],
        "macro_f1": multi["macro_f1"],
        "per_class_recall": multi["per_class_recall"],
        "ece": expected_calibration_error(probs_raw, y, ECE_BINS),
        "ece_temperature_scaled": None if probs_cal is None else expected_calibration_error(probs_cal, y, ECE_BINS),
    }
    arrays = {"probs_model": probs_model, "probs_raw": probs_raw, "probs_cal": probs_cal,
              "p_mel": p_mel, "y_mel": y_mel, "predicted": predicted}
    if offsets is not None:  # what the plain argmax would have scored, for comparison
        metrics["balanced_accuracy_argmax"] = multiclass_metrics(y, probs.argmax(axis=1), data_names)["balanced_accuracy"]
    return metrics, arrays


def criteria_metrics(pred: dict[str, Any], y_mel: np.ndarray, config: Any, data: str, n_bootstrap: int) -> dict[str, Any] | None:
    """Seven-point checklist results of a model with criteria heads on Derm7pt-layout data.

    Per criterion: AUC of P(melanoma-specific pattern) (atypical / irregular / present) against
    the dermatologists' label; the expected checklist score's melanoma AUC (95% bootstrap CI) and
    sensitivity/specificity of score >= 3. None when the model or the data has no criteria.
    """
    heads = dict(getattr(config, "extra_heads", None) or {})
    if not set(SEVEN_POINT) <= set(heads):
        return None
    truth = derm7pt_criteria(data)
    if truth is None or not set(pred["image_ids"]) <= set(truth):
        return None
    probs = {h: tempered_probabilities(pred["head_logits"][h]) for h in SEVEN_POINT}  # calibrated (folded) heads
    rows = [truth[i] for i in pred["image_ids"]]
    result: dict[str, Any] = {"criteria": {}}
    for name, (label, points) in SEVEN_POINT.items():
        y = np.array([r[name] == CRITERIA_LABELS[name].index(label) for r in rows], dtype=int)
        ci = bootstrap_auc_ci(y, criterion_probability(name, probs[name]), n_resamples=n_bootstrap, seed=0)
        result["criteria"][name] = {
            "label": label, "points": points, "n_positive": int(y.sum()), "n": int(len(y)),
            "auc": melanoma_auc(y, criterion_probability(name, probs[name])),
            "auc_ci95": None if ci is None else list(ci),
        }
    score = seven_point_score(probs)
    ci = bootstrap_auc_ci(y_mel, score, n_resamples=n_bootstrap, seed=0)
    sens, spec = sensitivity_specificity(y_mel, score, MELANOMA_SCORE_THRESHOLD)
    result.update(
        seven_point_score_melanoma_auc=melanoma_auc(y_mel, score),
        seven_point_score_melanoma_auc_ci95=None if ci is None else list(ci),
        seven_point_score_threshold=MELANOMA_SCORE_THRESHOLD,
        seven_point_score_sensitivity=sens,
        seven_point_score_specificity=spec,
    )
    return result


#: The melanoma class of the per-dataset heads (ISIC 2017's and Derm7pt's label sets).
HEAD_MELANOMA = "melanoma"


def head_metrics(pred: dict[str, Any], y_mel: np.ndarray, config: Any, n_bootstrap: int) -> dict[str, Any] | None:
    """Melanoma AUC (95% CI) of every extra head with a "melanoma" label (the per-dataset heads of a
    multi-source MelanomaViT), on this data; None for a model without such heads."""
    heads = {h: list(labels) for h, labels in (getattr(config, "extra_heads", None) or {}).items()
             if HEAD_MELANOMA in labels and h in pred["head_logits"]}
    if not heads:
        return None
    result = {}
    for name, labels in heads.items():
        p = tempered_probabilities(pred["head_logits"][name])[:, labels.index(HEAD_MELANOMA)]  # calibrated (folded) head
        ci = bootstrap_auc_ci(y_mel, p, n_resamples=n_bootstrap, seed=0)
        result[name] = {"melanoma_auc": melanoma_auc(y_mel, p), "melanoma_auc_ci95": None if ci is None else list(ci)}
    return result


def subgroup_metrics(
    image_ids: list[str], y_mel: np.ndarray, p_mel: np.ndarray, threshold: float | None, data: str, n_bootstrap: int
) -> dict[str, Any] | None:
    """Melanoma metrics per sex, age band and anatomical site (the columns the data's metadata has).

    {column: {value: {n, n_melanoma, melanoma_auc, melanoma_auc_ci95, sensitivity_val95,
    specificity_val95}}}, groups by decreasing n; AUC null where a group lacks either class.
    None when the data has no subject metadata (train.sources.subject_metadata).
    """
    meta = subject_metadata(data)
    if meta is None or not set(image_ids) <= set(meta.index):
        return None
    rows = meta.loc[list(image_ids)]
    result: dict[str, Any] = {}
    for column in rows.columns:
        groups: dict[str, Any] = {}
        for value, count in rows[column].value_counts().items():
            keep = (rows[column] == value).to_numpy()
            y, p = y_mel[keep], p_mel[keep]
            ci = bootstrap_auc_ci(y, p, n_resamples=n_bootstrap, seed=0)
            sens, spec = (None, None) if threshold is None else sensitivity_specificity(y, p, threshold)
            groups[str(value)] = {
                "n": int(count), "n_melanoma": int(y.sum()), "melanoma_auc": melanoma_auc(y, p),
                "melanoma_auc_ci95": None if ci is None else list(ci),
                "sensitivity_val95": sens, "specificity_val95": spec,
            }
        result[column] = groups
    return result


# ------------------------------------------------------------------------------------ writing


def write_calibration(folder: str | Path, net: Any, temperature: float | None, threshold: float | None) -> None:
    """Store a temperature fitted on raw logits and `melanoma_threshold` in a model folder.

    The temperature is folded into the classifier head (`model.calibration.fold_temperature`, replacing
    one folded before), so the folder's weights change in the head only and its config records
    `folded_temperature`; then every plain softmax over its logits (`pipeline`, the Hub widget, the
    card snippet, the app) is calibrated. Without a temperature only config.json is rewritten.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--write-config needs a local model folder with config.json, got {folder}")
    if threshold is not None:
        net.config.melanoma_threshold = float(threshold)
    if temperature is None:
        net.config.save_pretrained(folder)
    else:
        fold_temperature(net, temperature).save_pretrained(folder)
    logger.info("wrote temperature=%s (folded) melanoma_threshold=%s to %s", temperature, threshold, folder)


def write_predictions(pred: dict[str, Any], arrays: dict[str, np.ndarray], names: list[str], data_names: list[str],
                      threshold: float, path: Path) -> None:
    table = pd.DataFrame({
        "image_id": pred["image_ids"],
        "lesion_id": pred["lesion_ids"],
        "label": [data_names[i] for i in pred["labels"]],
        "predicted": [data_names[i] for i in arrays["predicted"]],
    })
    for c, name in enumerate(names):
        table[f"p_{name}"] = arrays["probs_model"][:, c]
    table["melanoma_positive"] = (arrays["p_mel"] >= threshold).astype(int)
    table.to_csv(path, index=False, float_format="%.6f")


# --------------------------------------------------------------------------------------- main


def _all_rows(split: str | None) -> str | None:
    # "all" (or "") selects every row of a source that has splits of its own.
    return None if (split or "").lower() in ("", "all") else split


@dataclass(frozen=True)
class EvalArgs:
    """One evaluation run, as `evaluate` reads it; `from_cli` builds it from `build_parser`'s namespace."""

    model: str  # model folder (save_pretrained) or Hub id
    data: str  # anything train.data.load_image_dataset accepts
    output_dir: str
    split: str | None = None  # None: the manifest's test split when it split `data`, else every row; "all"
    manifest: str | None = None  # split_manifest.json of the training run; None: the model folder's; "none"
    limit: int | None = None  # a stratified (by dx) random sample of this many images
    seed: int = 0  # of the `limit` sample
    val_data: str | None = None
    val_split: str | None = "validation"  # None: every row of val_data
    masks: str | None = None
    tta: int = 1  # dihedral views, 1 (none) to 8
    batch_size: int = 32
    label_scheme: str = "auto"  # auto | dx | binary; `evaluate` resolves auto from the model's labels
    calibrate: bool = True
    write_config: bool = False
    bootstrap: int = 1000  # AUC CI resamples
    device: str = "cpu"
    backend: str = "torch"  # auto, torch, onnx, onnx-int8 (model.onnx_backend)

    def __post_init__(self) -> None:
        if not 1 <= self.tta <= 8:
            raise ValueError(f"--tta must be between 1 and 8 (dihedral views), got {self.tta}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.write_config and self.val_data is None and self.manifest in (None, "none"):
            raise ValueError("--write-config needs validation data: pass --val-data (or --manifest with a validation split)")

    @classmethod
    def from_cli(cls, namespace: argparse.Namespace) -> EvalArgs:
        values = vars(namespace)
        device = values["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
        split = "all" if values["split"] is not None and _all_rows(values["split"]) is None else values["split"]
        return cls(**{**values, "split": split, "val_split": _all_rows(values["val_split"]), "device": device})


def evaluate(args: EvalArgs, command: str) -> dict[str, Any]:
    """Run the evaluation `args` describes; returns the metrics written (metrics.json)."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    classifier = Classifier(args.model, args.device, backend=args.backend)
    net, processor = classifier.model, classifier.processor
    names = model_labels(net.config)
    if MELANOMA not in names:
        raise ValueError(f"the model's classes {names} have no {MELANOMA!r}: melanoma metrics need P(mel)")
    if args.label_scheme == "auto":
        args = dataclasses.replace(args, label_scheme="binary" if tuple(names) == BINARY_LABELS else "dx")
    data_names = list(label_names(args.label_scheme))
    groups = label_groups(names, data_names)
    mel_index = names.index(MELANOMA)

    test, val, info = _select_data(args)
    missing = sorted({data_names[i] for i in set(rows_all(test, "label"))} - {data_names[k] for k in np.flatnonzero(groups.sum(1))})
    if missing:
        raise ValueError(f"the data has classes {missing} the model cannot predict; use --label-scheme binary")

    mask_dir = find_mask_dir(args.data, args.masks)
    if mask_dir is not None and net.config.model_type in ROLLOUT_MODEL_TYPES and processor_geometry(processor).crops:
        logger.warning("the image processor crops: rollout maps would not align with the masks; rollout_mask_share skipped")
        mask_dir = None
    pred = predict(classifier, test, args.tta, args.batch_size, mask_dir, desc=f"evaluate {info['split'] or 'all'}")

    # Temperature and threshold: from validation data when given, else from the model config.
    temperature_fitted = threshold = None
    temperature_source = threshold_source = None
    if val is not None:
        val_pred = predict(classifier, val, args.tta, args.batch_size, desc="validation")
        if args.calibrate:
            temperature_fitted = fit_temperature(val_pred["logits"], val_pred["labels"], groups)
            temperature_source = "validation"
    stored = folded_temperature(net.config)
    if temperature_fitted is None and stored is not None:
        temperature_fitted, temperature_source = stored, "model_config"
    temperature = temperature_fitted or 1.0
    if val is not None:
        val_p_mel = tempered_probabilities(val_pred["logits"], temperature)[:, mel_index]
        val_y_mel = np.array([data_names[i] == MELANOMA for i in val_pred["labels"]], dtype=int)
        threshold = threshold_for_sensitivity(val_y_mel, val_p_mel, TARGET_SENSITIVITY)
        threshold_source = "validation" if threshold is not None else None
    if threshold is None and getattr(net.config, "melanoma_threshold", None) is not None:
        threshold, threshold_source = float(net.config.melanoma_threshold), "model_config"

    metrics, arrays = compute_metrics(pred, groups, data_names, mel_index, temperature, temperature_fitted, threshold,
                                      args.bootstrap, decision_offsets(net.config, names))
    shares = pred["mask_shares"]
    seven_point = criteria_metrics(pred, arrays["y_mel"], net.config, args.data, args.bootstrap)
    per_head = head_metrics(pred, arrays["y_mel"], net.config, args.bootstrap)
    subgroups = subgroup_metrics(pred["image_ids"], arrays["y_mel"], arrays["p_mel"], threshold, args.data, args.bootstrap)
    result: dict[str, Any] = {
        "model": args.model,
        "data": args.data,
        "split": info["split"],
        "tta": args.tta,
        "label_scheme": args.label_scheme,
        "model_labels": names,
        **metrics,
        "temperature": temperature_fitted,
        "temperature_source": temperature_source,
        "threshold_val95_source": threshold_source,
        "n_validation": None if val is None else len(val),
        "rollout_mask_share": float(np.mean(shares)) if shares else None,
        "rollout_mask_share_uniform": float(np.mean(pred["mask_areas"])) if shares else None,
        "rollout_mask_n": len(shares),
        **({"seven_point": seven_point} if seven_point is not None else {}),
        **({"subgroups": subgroups} if subgroups is not None else {}),
        **({"heads": per_head} if per_head is not None else {}),
        **{k: v for k, v in info.items() if k != "split"},
        "notes": {
            "probabilities": "softmax(logits / temperature) averaged over the TTA views (temperature 1 when null)",
            "melanoma_auc_ci95": f"stratified percentile bootstrap, {args.bootstrap} resamples, seed 0",
            "threshold_val95": "highest P(mel) threshold with >= 95% melanoma sensitivity on validation data "
                               "(or the model config's melanoma_threshold); null without either",
            "multiclass": "the top class (argmax of the model's probabilities, or of the decision rule's scores "
                          "where 'decision_rule' names one; balanced_accuracy_argmax is the plain argmax) summed "
                          "into the data's classes; accuracy, balanced accuracy (mean recall), macro-F1 over the "
                          "classes present in the labels",
            "ece": f"top-label, {ECE_BINS} equal-width bins; ece at temperature 1, ece_temperature_scaled at 'temperature'",
            "rollout_mask_share": "mean share of attention-rollout mass inside the lesion mask (ViT + masks only); "
                                  "rollout_mask_share_uniform = mean mask area (what a uniform map scores)",
            "heads": "melanoma AUC of each extra head's own 'melanoma' class (per-dataset heads), same bootstrap",
            "subgroups": "melanoma AUC (same bootstrap) and sensitivity/specificity at threshold_val95 per sex, "
                         "age band and anatomical site from the data's metadata; small groups have wide CIs",
            "leakage_check": "the split manifest's splits share no image or lesion when it split this data (the "
                             "evaluated images are its split's); other data: evaluated image_ids found in its train "
                             "and validation splits (leakage_overlap)",
            **({"sample": "stratified by dx: each class its share of n (largest remainder), seeded"} if "sample" in info else {}),
            "metrics_library": "scikit-learn (evaluate.load needs the Hub)",
            "disclaimer": DISCLAIMER,
        },
        "command": command,
    }
    if val is None:
        result["notes"]["validation"] = "no validation data: temperature and threshold_val95 not fitted (null unless stored in the model config)"

    # The cards, their model-index and the app read these keys (null where undefined).
    unwritten = [key for key in METRIC_KEYS if key not in result]
    if unwritten:
        raise KeyError(f"metrics.json lacks {unwritten}, which model/metrics_schema.py's METRICS table reads")

    chosen = threshold if threshold is not None else DEFAULT_THRESHOLD
    write_predictions(pred, arrays, names, data_names, chosen, out_dir / "predictions.csv")
    points = {"default": DEFAULT_THRESHOLD}
    if threshold is not None:
        points[f"95% sens. on validation ({threshold_source})"] = threshold
    plot_roc(arrays["y_mel"], arrays["p_mel"], points, out_dir / "roc.png")
    plot_confusion(pred["labels"], arrays["predicted"], data_names, out_dir / "confusion_matrix.png")
    curves = {"T = 1": arrays["probs_raw"]}
    if arrays["probs_cal"] is not None:
        curves[f"T = {temperature_fitted:.2f}"] = arrays["probs_cal"]
    plot_reliability(pred["labels"], curves, out_dir / "reliability.png")
    plot_confidence_hist(arrays["y_mel"], arrays["p_mel"], chosen, out_dir / "confidence_hist.png")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")

    if args.write_config:
        if temperature_source != "validation" and threshold_source != "validation":
            raise ValueError("--write-config needs validation data (--val-data or --manifest) to fit the temperature/threshold")
        if args.tta > 1:
            logger.warning("the stored threshold was chosen with --tta %d; single-view serving may differ slightly", args.tta)
        write_calibration(
            args.model, net,
            temperature_fitted if temperature_source == "validation" else None,
            threshold if threshold_source == "validation" else None,
        )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = EvalArgs.from_cli(build_parser().parse_args(argv))
    command = shlex.join(["python", "train/evaluate.py", *argv])
    result = evaluate(args, command)
    logger.info(
        "n=%d melanoma AUC %s CI %s, balanced accuracy %.3f -> %s",
        result["n"], result["melanoma_auc"], result["melanoma_auc_ci95"], result["balanced_accuracy"], args.output_dir,
    )
    return result


if __name__ == "__main__":
    main()
