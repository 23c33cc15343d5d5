"""Render the model card (README.md) of a Hub-ready model folder.

The card is built from what the pipeline wrote into `models/<name>/`:

- `config.json` (architecture, id2label, image size, `folded_temperature` or a temperature still to
  apply, `melanoma_threshold`),
- the image processor (`preprocessor_config.json`, or timm's `pretrained_cfg`): input size,
- `*.safetensors` headers (parameter count, read without loading the weights),
- training files when present: `train_config.yaml|yml|json` or `training_args.json`,
  `command.txt`, `val_metrics.json`, `split_manifest.json`,
- evaluation outputs `eval/<dataset>_<split>/metrics.json` (written by train/evaluate.py) and
  their plots (`roc.png`, `confusion_matrix.png`, `reliability.png`, `confidence_hist.png`).

Nothing is invented: a metric that is missing or null is left out of the tables and of the
model-index metadata, and a folder without evaluation says "not evaluated yet".

CLI::

    python -m hub_cards.render models/<name> [--write] [--repo-id OWNER/NAME]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from model.calibration import folded_temperature, unfolded_temperatures
from model.decision import DECISION_KEY
from model.geometry import processor_geometry
from model.labels import DX_NAMES, MELANOMA
from model.metrics_schema import METRICS, Metric

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
MODEL_CARD_TEMPLATE = TEMPLATE_DIR / "model_card.md.j2"

#: HAM10000 is CC BY-NC-SA 4.0; models trained on it inherit the non-commercial terms.
LICENSE = "cc-by-nc-sa-4.0"

#: The project's Hub owner (user or organisation) until one is chosen: a placeholder that model
#: cards (code snippets) and the Space card (`models:` ids) use unless --repo-id / --owner say otherwise.
DEFAULT_OWNER = "OWNER"

#: Placeholder used in the card's code snippets when no repo id is given.
PLACEHOLDER_REPO_ID = DEFAULT_OWNER + "/{name}"

#: Known evaluation datasets: folder prefix -> (readable name, model-index dataset type).
KNOWN_DATASETS: dict[str, tuple[str, str]] = {
    "ham10000": ("HAM10000", "ham10000"),
    "isic2017": ("ISIC 2017 Part 3", "isic2017"),
    "derm7pt": ("Derm7pt", "derm7pt"),
}

#: Training sources a multi-source manifest can name: kind -> (readable name, licence, origin).
SOURCE_INFO: dict[str, tuple[str, str, str]] = {
    "ham10000": ("HAM10000", "CC BY-NC-SA 4.0",
                 "Tschandl et al. 2018; Medical University of Vienna (Austria) and a practice in Queensland (Australia)"),
    "isic2017": ("ISIC 2017 Part 3", "ISIC Archive terms (CC-0 / CC BY-NC)",
                 "Codella et al. 2017; the ISIC Archive's contributing clinics"),
    "derm7pt": ("Derm7pt", "CC BY-NC-ND 4.0",
                "Kawahara et al. 2019; the Interactive Atlas of Dermoscopy, with seven-point checklist labels"),
}

#: Plots written by train/evaluate.py, in the order the card shows them.
PLOTS: tuple[tuple[str, str], ...] = (
    ("roc.png", "ROC curve (melanoma vs rest)"),
    ("confusion_matrix.png", "Confusion matrix"),
    ("reliability.png", "Reliability diagram"),
    ("confidence_hist.png", "Confidence histogram"),
)

TRAIN_CONFIG_FILES = ("train_config.yaml", "train_config.yml", "train_config.json", "training_args.json")


@dataclass
class EvalSet:
    """One evaluation run: `eval/<dataset>_<split>/metrics.json` and its plots."""

    key: str
    dataset_name: str
    dataset_type: str
    split: str
    metrics: dict[str, Any]
    rows: list[tuple[str, str]] = field(default_factory=list)
    per_class_recall: list[tuple[str, str, str]] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration: str = ""
    method_notes: list[tuple[str, str]] = field(default_factory=list)
    criteria: list[tuple[str, ...]] = field(default_factory=list)
    seven_point: list[tuple[str, str]] = field(default_factory=list)
    subgroups: list[tuple[str, list[tuple[str, ...]]]] = field(default_factory=list)
    heads: list[tuple[str, str]] = field(default_factory=list)


def is_number(value: Any) -> bool:
    """A real number from a metrics file (not a bool, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def fmt_number(value: Any, digits: int = 3) -> str:
    """Format a number from a metrics file for a table (3 decimals for floats)."""
    if isinstance(value, bool) or not is_number(value):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _cell(text: Any) -> str:
    """Escape a value for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def read_json(path: Path) -> Any:
    """Parse a JSON file; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); regenerate it.") from err


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} has no config.json: pass a folder written by save_pretrained.")
    return read_json(path)


def _id2label(config: dict[str, Any]) -> dict[int, str]:
    """Class names by index: `id2label`, or `label_names` (how TimmWrapperConfig saves them)."""
    if config.get("id2label"):
        return {int(k): v for k, v in config["id2label"].items()}
    return dict(enumerate(config.get("label_names") or []))


def _image_size(model_dir: Path) -> str | None:
    """Input resolution "HxW" of the folder's image processor (`model.geometry`), None without one."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        logger.warning("no image processor in %s (%s): input size left out of the card", model_dir, err)
        return None
    height, width = processor_geometry(processor).size
    return f"{height}x{width}"


def count_parameters(model_dir: Path) -> int | None:
    """Number of stored parameters, summed from the safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys, keeping scalars and short lists; a short list of dicts
    (a recipe's sources, distillation teachers) gets index keys (`sources.0.name`)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif isinstance(data, (list, tuple)):
        if len(data) <= 8 and all(not isinstance(v, (dict, list)) for v in data):
            out[prefix[:-1]] = list(data)
        elif len(data) <= 8 and all(isinstance(v, dict) for v in data):
            for i, value in enumerate(data):
                out.update(_flatten(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = data
    return out


def _read_training(model_dir: Path) -> dict[str, Any]:
    """Training config, command, validation metrics and split sizes, each only when its file exists."""
    info: dict[str, Any] = {"config_file": None, "hyperparameters": [], "command": None, "val_metrics": [],
                            "splits": [], "split_params": []}
    for name in TRAIN_CONFIG_FILES:
        path = model_dir / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
            if isinstance(data, dict):
                info["config_file"] = name
                info["raw_config"] = data
                info["hyperparameters"] = [(_cell(k), _cell(_fmt_param(v))) for k, v in _flatten(data).items()]
            break
    command = model_dir / "command.txt"
    if command.is_file():
        info["command"] = command.read_text(encoding="utf-8").strip()
    export_command = model_dir / "export_command.txt"
    if export_command.is_file():
        info["export_command"] = export_command.read_text(encoding="utf-8").strip()
    val = model_dir / "val_metrics.json"
    if val.is_file():
        info["val_metrics"] = [
            (_cell(k), fmt_number(v)) for k, v in _flatten(read_json(val)).items() if is_number(v)
        ]
    manifest = model_dir / "split_manifest.json"
    if manifest.is_file():
        data = read_json(manifest)
        splits, params = manifest_split_sizes(data)
        info["splits"] = [(name, str(n)) for name, n in splits.items()]
        info["split_params"] = [(_cell(k), _cell(v)) for k, v in params.items()]
        info["sources"] = manifest_sources(data)
    return info


def manifest_sources(manifest: dict[str, Any]) -> list[dict[str, str]]:
    """One row per training source of a multi-source manifest (train/sources.py); [] otherwise."""
    rows = []
    for source in manifest.get("sources") or []:
        if not isinstance(source, dict):
            continue
        kind = str(source.get("kind", source.get("name", "")))
        name, licence, origin = SOURCE_INFO.get(kind, (str(source.get("name", kind)), "see the data's terms", ""))
        sizes = source.get("sizes") or {}
        rows.append({
            "name": name, "licence": licence, "origin": origin,
            "sizes": " / ".join(str(sizes.get(split, "-")) for split in ("train", "validation", "test")),
            "split": _cell(source.get("split", "")),
            "weight": fmt_number(source.get("weight")) if is_number(source.get("weight")) else "-",
            "heads": ", ".join(f"`{h}`" for h in source.get("heads") or []),
        })
    return rows


def _fmt_param(value: Any) -> str:
    return fmt_number(value, digits=6) if isinstance(value, float) else str(value)


def manifest_split_sizes(manifest: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """Split sizes and scalar parameters of a split manifest (train/splits.py `write_manifest`).

    The manifest is JSON ``{split: [image_ids...], "splits": [split names], "seed": ..., ...}``;
    without a ``"splits"`` list every list-valued key is a split. Sizes are counted from the
    image-id lists themselves. Returns ({split: n_images}, {param: value}).
    """
    if not isinstance(manifest, dict):
        raise ValueError("split manifest must be a JSON object {split: [image_ids...], 'seed': ...}.")
    names = manifest.get("splits")
    if not isinstance(names, list):
        names = [k for k, v in manifest.items() if isinstance(v, list)]
    sizes = {n: len(manifest[n]) for n in names if isinstance(manifest.get(n), list)}
    if not sizes:
        raise ValueError("split manifest has no split lists: expected {'train': [image_ids...], ...}.")
    params = {k: v for k, v in manifest.items() if not isinstance(v, (list, dict))}
    return sizes, params


def _dataset_of(key: str, metrics: dict[str, Any]) -> tuple[str, str, str]:
    """(readable name, dataset type, split) of an eval folder named `<dataset>_<split>`."""
    split = metrics.get("split")
    if not split:
        split = key.rsplit("_", 1)[1] if "_" in key else "test"
    prefix = key[: -len(split) - 1] if key.endswith(f"_{split}") else key
    name, dtype = KNOWN_DATASETS.get(prefix.lower(), (prefix, prefix.lower()))
    return name, dtype, str(split)


def _present(metric: Metric, m: dict[str, Any]) -> bool:
    """Whether metrics.json holds the metric (and the threshold it is measured at)."""
    return is_number(m.get(metric.key)) and (metric.threshold is None or is_number(m.get(metric.threshold)))


def _eval_rows(m: dict[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """Table rows (metric, value) for every metric of `METRICS` present in metrics.json, plus notes on gaps."""
    rows: list[tuple[str, str]] = []
    words = {
        "source": _threshold_source(m),
        "temperature": f" (T = {fmt_number(m['temperature'])})" if is_number(m.get("temperature")) else "",
    }
    for metric in METRICS:
        if not _present(metric, m):
            continue
        text = fmt_number(m[metric.key])
        ci = m.get(metric.ci95) if metric.ci95 else None
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(v) for v in ci):
            text += f" (95% CI {fmt_number(ci[0])} to {fmt_number(ci[1])})"
        if metric.baseline and is_number(m.get(metric.baseline)):
            text += f" (a uniform map would score {fmt_number(m[metric.baseline])})"
        threshold = fmt_number(m[metric.threshold]) if metric.threshold else None
        rows.append((metric.label.format(threshold=threshold, **words), text))
    notes: list[str] = []
    if not is_number(m.get("threshold_val95")):
        notes.append("Sensitivity/specificity at a validation-chosen threshold: not available "
                     "(no validation data was given to the evaluation).")
    if isinstance(m.get("leakage_check"), str):
        notes.append(f"Leakage check: {m['leakage_check']}.")
    return rows, notes


def auc_text(auc: Any, ci: Any) -> str:
    """"0.873 (0.84 to 0.90)", with "at chance" when the 95% CI includes 0.5; "undefined" without an AUC."""
    if not is_number(auc):
        return "undefined (one class only)"
    text = fmt_number(auc)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(v) for v in ci):
        text += f" ({fmt_number(ci[0])} to {fmt_number(ci[1])})"
        if ci[0] <= 0.5 <= ci[1]:
            text += ", at chance"
    return text


def _criteria_rows(m: dict[str, Any]) -> tuple[list[tuple[str, ...]], list[tuple[str, str]]]:
    """Seven-point checklist tables from metrics.json's `seven_point` (Derm7pt-layout data)."""
    sp = m.get("seven_point")
    if not isinstance(sp, dict):
        return [], []
    criteria = [
        (_cell(name.replace("_", " ")), _cell(c.get("label", "")), str(c.get("points", "")),
         f"{c.get('n_positive', '')} / {c.get('n', '')}", auc_text(c.get("auc"), c.get("auc_ci95")))
        for name, c in (sp.get("criteria") or {}).items()
    ]
    score = []
    if "seven_point_score_melanoma_auc" in sp:
        score.append(("Melanoma AUC of the expected checklist score (95% CI)",
                      auc_text(sp["seven_point_score_melanoma_auc"], sp.get("seven_point_score_melanoma_auc_ci95"))))
    for key, label in (("seven_point_score_sensitivity", "Sensitivity of score >= {t}"),
                       ("seven_point_score_specificity", "Specificity of score >= {t}")):
        if is_number(sp.get(key)):
            score.append((label.format(t=fmt_number(sp.get("seven_point_score_threshold"))), fmt_number(sp[key])))
    return criteria, score


def _subgroup_rows(m: dict[str, Any]) -> list[tuple[str, list[tuple[str, ...]]]]:
    """(column title, rows) per subgroup column of metrics.json's `subgroups`."""
    titles = {"sex": "Sex", "age_band": "Age band (years)", "site": "Anatomical site"}
    out = []
    for column, groups in (m.get("subgroups") or {}).items():
        if set(groups) <= {"unknown"}:  # the data has no such metadata for these images
            continue
        rows = [
            (_cell(value), str(g.get("n")), str(g.get("n_melanoma")),
             auc_text(g.get("melanoma_auc"), g.get("melanoma_auc_ci95")),
             fmt_number(g["sensitivity_val95"]) if is_number(g.get("sensitivity_val95")) else "-",
             fmt_number(g["specificity_val95"]) if is_number(g.get("specificity_val95")) else "-")
            for value, g in groups.items()
        ]
        out.append((titles.get(column, column), rows))
    return out


def overview_table(eval_sets: list[EvalSet]) -> tuple[list[str], list[list[str]]]:
    """The card's one-table overview: (header, rows), with only the columns some set has."""
    def sens_spec(m: dict[str, Any]) -> str | None:
        if is_number(m.get("sensitivity_val95")) and is_number(m.get("specificity_val95")):
            return f"{fmt_number(m['sensitivity_val95'])} / {fmt_number(m['specificity_val95'])}"
        return None

    columns: list[tuple[str, Any]] = [
        ("Images (melanomas)", lambda m: f"{m.get('n')} ({m['n_melanoma']})" if is_number(m.get("n_melanoma")) else None),
        ("Melanoma AUC (95% CI)", lambda m: auc_text(m["melanoma_auc"], m.get("melanoma_auc_ci95"))
         if is_number(m.get("melanoma_auc")) else None),
        ("Balanced accuracy", lambda m: (fmt_number(m["balanced_accuracy"]) + (
            f" (argmax {fmt_number(m['balanced_accuracy_argmax'])})" if is_number(m.get("balanced_accuracy_argmax")) else ""))
         if is_number(m.get("balanced_accuracy")) else None),
        ("Sensitivity / specificity at the validation threshold", sens_spec),
        ("ECE after temperature scaling",
         lambda m: fmt_number(m["ece_temperature_scaled"]) if is_number(m.get("ece_temperature_scaled")) else None),
    ]
    cells = [[get(es.metrics) for _, get in columns] for es in eval_sets]
    keep = [i for i in range(len(columns)) if any(row[i] is not None for row in cells)]
    header = ["Set", *(columns[i][0] for i in keep)]
    rows = [[f"{es.dataset_name} {es.split}", *(row[i] or "-" for i in keep)] for es, row in zip(eval_sets, cells)]
    return header, rows


def _decision_method(config: dict[str, Any]) -> str | None:
    """How the stored decision offsets were chosen, in words (training or train/decision_rule.py)."""
    rule = config.get("dx_decision_rule")
    if rule:
        cv = rule.get("cross_validation")
        chosen = (f"; chosen over the other procedure by {cv['folds']}-fold cross-validation inside validation "
                  "(held-out balanced accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in cv["balanced_accuracy"].items()) + ")"
                  if cv else "")
        steps = f"tau {rule['tau']} alone" if rule.get("procedure") == "tau" else f"tau {rule['tau']} then per-class offsets"
        return (f"{steps} fitted on validation for the mean balanced accuracy over the sources{chosen}: "
                f"`{rule['command']}`")
    if config.get(DECISION_KEY):
        return "learnt in training: the recipe's `logit_adjustment`"
    return None


def _tta_text(config: dict[str, Any]) -> str | None:
    """The thresholds fitted for predictions averaged over test-time views (`melanoma_tta`), in words."""
    value = config.get("melanoma_tta")
    if not value:
        return None
    points = value.get("operating_points") or {}
    flag, balanced = points.get("flag"), points.get("balanced")
    text = f"{value['views']} dihedral views: melanoma threshold {fmt_number(value['threshold'])}"
    if flag and balanced:
        text += (f" (on validation: sensitivity {fmt_number(flag['sensitivity'])}, specificity "
                 f"{fmt_number(flag['specificity'])}), balanced threshold {fmt_number(balanced['threshold'])} "
                 f"(sensitivity {fmt_number(balanced['sensitivity'])}, specificity {fmt_number(balanced['specificity'])}), "
                 f"{points.get('data', 'validation')}; `{points.get('command', '')}`")
    return text


def _metadata_model_text(config: dict[str, Any]) -> str | None:
    """The age / sex / site regression (model.metadata_model) in words, with what it measured."""
    value = config.get("melanoma_metadata_model")
    if not value:
        return None
    val = value.get("validation_out_of_fold", {})
    parts = [f"{name}: image {fmt_number(v['image_auc'])} -> {fmt_number(v['metadata_auc'])}" for name, v in val.items()]
    tests = []
    for name, v in value.get("test", {}).items():
        if v.get("recorded"):
            lo, hi = v["difference_ci"]
            tests.append(f"{name} test (n={v['n']}): {fmt_number(v['image_auc'])} -> {fmt_number(v['metadata_auc'])} "
                         f"(difference 95% CI {lo:+.3f} to {hi:+.3f})")
        else:
            tests.append(f"{name} test: not measured (its images record no age, sex or site here)")
    return (f"melanoma AUC out of fold on validation, {'; '.join(parts)}; {'; '.join(tests)}. "
            f"Fitted by `{value.get('fit_command', 'train/fit_metadata.py')}`")


def _threshold_source(m: dict[str, Any]) -> str:
    """Where threshold_val95 came from, in words (evaluate.py's `threshold_val95_source`)."""
    source = m.get("threshold_val95_source", "validation")
    if source == "model_config":
        return "stored in the model config as melanoma_threshold"
    return "chosen on validation data for 95% melanoma sensitivity"


def _calibration(m: dict[str, Any]) -> str:
    """One sentence on calibration from metrics.json (ECE before/after, temperature, threshold)."""
    parts = []
    if is_number(m.get("ece")):
        text = f"ECE {fmt_number(m['ece'])}"
        if is_number(m.get("ece_temperature_scaled")):
            text += f" before and {fmt_number(m['ece_temperature_scaled'])} after temperature scaling"
        if is_number(m.get("temperature")):
            text += f" (T = {fmt_number(m['temperature'])})"
        parts.append(text)
    if is_number(m.get("threshold_val95")):
        parts.append(f"melanoma threshold {fmt_number(m['threshold_val95'])} ({_threshold_source(m)})")
    return "; ".join(parts)


def _eval_results(es: EvalSet) -> list[EvalResult]:
    """model-index entries for the metrics of `METRICS` with a model-index type present in one evaluation set."""
    m = es.metrics
    common = dict(task_type="image-classification", task_name="Image Classification",
                  dataset_type=es.dataset_type, dataset_name=es.dataset_name, dataset_split=es.split)
    results: list[EvalResult] = []
    for metric in METRICS:
        if metric.index_type is None or not _present(metric, m):
            continue
        args = dict(metric.index_args)
        threshold = None
        if metric.threshold:
            args["threshold"] = m[metric.threshold]
            threshold = fmt_number(m[metric.threshold])
        name = (metric.index_name or metric.label).format(threshold=threshold)
        results.append(EvalResult(metric_type=metric.index_type, metric_value=m[metric.key], metric_name=name,
                                  metric_args=args or None, **common))
    return results


def load_eval_sets(model_dir: Path, eval_dirs: dict[str, Path] | None = None) -> list[EvalSet]:
    """Read every evaluation folder: `eval_dirs` if given, else `model_dir/eval/*/metrics.json`.

    Plot links are relative to `model_dir` (where README.md lives); plots outside the folder are
    not uploaded with it, so they are not linked (a warning is logged).
    """
    model_dir = Path(model_dir)
    if eval_dirs is None:
        eval_root = model_dir / "eval"
        order = list(KNOWN_DATASETS)
        found = sorted(eval_root.glob("*/metrics.json"),
                       key=lambda p: (next((i for i, k in enumerate(order) if p.parent.name.startswith(k)), len(order)),
                                      p.parent.name))
        eval_dirs = {p.parent.name: p.parent for p in found}
    sets: list[EvalSet] = []
    for key, folder in eval_dirs.items():
        folder = Path(folder)
        metrics_path = folder / "metrics.json"
        if not metrics_path.is_file():
            raise ValueError(f"eval folder {folder} for '{key}' has no metrics.json: run train/evaluate.py "
                             "with --output-dir pointing there.")
        metrics = read_json(metrics_path)
        name, dtype, split = _dataset_of(key, metrics)
        es = EvalSet(key=key, dataset_name=name, dataset_type=dtype, split=split, metrics=metrics)
        es.rows, es.notes = _eval_rows(metrics)
        ci = metrics.get("melanoma_auc_ci95")
        if isinstance(ci, list) and len(ci) == 2 and all(is_number(v) for v in ci) and ci[0] <= 0.5 <= ci[1]:
            es.notes.insert(0, "The melanoma AUC is at chance on this set: its 95% CI includes 0.5.")
        es.criteria, es.seven_point = _criteria_rows(metrics)
        es.subgroups = _subgroup_rows(metrics)
        es.heads = [(_cell(h), auc_text(r.get("melanoma_auc"), r.get("melanoma_auc_ci95")))
                    for h, r in (metrics.get("heads") or {}).items() if isinstance(r, dict)]
        es.calibration = _calibration(metrics)
        notes = metrics.get("notes") if isinstance(metrics.get("notes"), dict) else {}
        es.method_notes = [(_cell(k), _cell(v)) for k, v in notes.items() if k != "disclaimer" and isinstance(v, str)]
        recall = metrics.get("per_class_recall") or {}
        es.per_class_recall = [(code, _cell(DX_NAMES.get(code, code)), fmt_number(r))
                               for code, r in recall.items() if is_number(r)]
        for filename, title in PLOTS:
            plot = folder / filename
            if not plot.is_file():
                continue
            rel = os.path.relpath(plot.resolve(), model_dir.resolve())
            if rel.startswith(".."):
                logger.warning("plot %s lies outside %s and would not be uploaded; not linked", plot, model_dir)
                continue
            es.plots.append((title, Path(rel).as_posix()))
        sets.append(es)
    return sets


def _describe_model(config: dict[str, Any], model_dir: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    archs = config.get("architectures") or []
    if archs:
        rows.append(("Architecture", ", ".join(archs)))
    if config.get("model_type"):
        rows.append(("model_type", str(config["model_type"])))
    if config.get("architecture"):  # timm wrapper: the timm model name
        rows.append(("timm architecture", str(config["architecture"])))
    size = _image_size(model_dir)
    if size:
        rows.append(("Input size", size))
    if config.get("patch_embedding_type") == "hybrid":
        rows.append(("Patch embedding", f"hybrid: the ImageNet `{config.get('backbone')}` stem (frozen in training) "
                                        "+ a 1x1 projection to the transformer width"))
    for key, label in (("patch_size", "Patch size"), ("hidden_size", "Hidden size"),
                       ("num_hidden_layers", "Layers"), ("num_attention_heads", "Attention heads"),
                       ("intermediate_size", "MLP size"), ("use_distillation_token", "Distillation token"),
                       ("layer_type", "Block type"), ("depths", "Blocks per stage"),
                       ("hidden_sizes", "Channels per stage")):
        if config.get(key) is not None:
            rows.append((label, str(config[key])))
    heads = config.get("extra_heads")
    if isinstance(heads, dict) and heads:
        rows.append(("Extra heads", ", ".join(f"`{h}` ({len(v)})" for h, v in heads.items())))
    n_params = count_parameters(model_dir)
    if n_params is not None:
        rows.append(("Parameters (from the safetensors files)", f"{n_params:,}"))
    return rows


def _onnx_record(model_dir: Path) -> dict[str, Any] | None:
    """onnx/export.json of the folder (train/export_onnx.py), or None without an exported graph."""
    path = model_dir / "onnx" / "export.json"
    return json.loads(path.read_text()) if path.is_file() and (model_dir / "model.onnx").is_file() else None


def render_model_card(
    model_dir: Path,
    *,
    model_name: str,
    eval_dirs: dict[str, Path] | None = None,
    template: Path = MODEL_CARD_TEMPLATE,
    repo_id: str | None = None,
) -> ModelCard:
    """Render the model card of `model_dir` (a save_pretrained folder) as a `ModelCard`.

    Args:
        model_dir: folder with config.json, *.safetensors and optional training/eval files.
        model_name: the model's name in the card and in model-index.
        eval_dirs: {"<dataset>_<split>": folder with metrics.json}; default: `model_dir/eval/*/`.
        template: Jinja template rendered by `ModelCard.from_template`.
        repo_id: Hub id used in the code snippets; default "OWNER/<model_name>".

    Returns:
        The card; `card.data` holds license, tags and model-index (only for metrics present).
    """
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    id2label = _id2label(config)
    labels = [(i, code, DX_NAMES.get(code, code)) for i, code in sorted(id2label.items())]
    model_type = config.get("model_type", "")
    trust_remote_code = model_type == "melanoma_vit" or "auto_map" in config
    eval_sets = load_eval_sets(model_dir, eval_dirs)
    training = _read_training(model_dir)

    eval_results = [r for es in eval_sets for r in _eval_results(es)]
    metric_types = sorted({r.metric_type for r in eval_results})
    base_model = (training.get("raw_config") or {}).get("base_model")
    card_data = ModelCardData(
        model_name=model_name,
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["image-classification", "vision", "dermoscopy", "skin-lesion", "melanoma", "medical-imaging",
              "research-only", *([model_type] if model_type else [])],
        metrics=metric_types or None,
        eval_results=eval_results or None,
        base_model=base_model if isinstance(base_model, str) and "/" in base_model else None,
    )
    unfolded = unfolded_temperatures(config)
    if unfolded:
        raise ValueError(f"{model_dir}: config.json stores a temperature still to apply ({unfolded}); fold it into the "
                         f"head weights once (`python -m model.calibration {model_dir}`), then render the card.")
    folded = folded_temperature(config)
    threshold = config.get("melanoma_threshold")
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        repo_id=repo_id or PLACEHOLDER_REPO_ID.format(name=model_name),
        model_rows=_describe_model(config, model_dir),
        labels=labels,
        melanoma_label=MELANOMA,
        has_melanoma=MELANOMA in id2label.values(),
        trust_remote_code=trust_remote_code,
        eval_sets=eval_sets,
        overview=overview_table(eval_sets),
        training=training,
        extra_heads=[(h, ", ".join(f"`{v}`" for v in labels)) for h, labels in (config.get("extra_heads") or {}).items()],
        folded_temperature=fmt_number(folded) if folded is not None else None,
        config_threshold=fmt_number(threshold) if is_number(threshold) else None,
        decision_offsets=", ".join(f"`{k}` {v:+.2f}" for k, v in (config.get(DECISION_KEY) or {}).items()) or None,
        decision_method=_decision_method(config),
        metadata_model=_metadata_model_text(config),
        tta=_tta_text(config),
        onnx=_onnx_record(model_dir),
    )
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render models/<name>/README.md from the folder's files.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--write", action="store_true", help="write MODEL_DIR/README.md (default: print)")
    parser.add_argument("--model-name", help="name in the card (default: the folder name)")
    parser.add_argument("--repo-id", help="Hub id used in the code snippets (default OWNER/<name>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        card = render_model_card(args.model_dir, model_name=args.model_name or args.model_dir.resolve().name,
                                 repo_id=args.repo_id)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.write:
        out = args.model_dir / "README.md"
        card.save(out)
        logger.info("wrote %s", out)
    else:
        print(card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
