"""The page's words: verdicts, class tables, model details and captions, in one unit (percent).

Pure functions of typed results (`model.results.ImageResult`, `model.classifier.Classifier`): no Gradio, no I/O
beyond reading a model folder's config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd

from hub_cards.render import SOURCE_INFO
from model.metrics_schema import HEADLINE_TYPES, METRICS, THRESHOLD_RULE
from model.sevenpoint import SEVEN_POINT
from model.labels import DX_NAMES, MELANOMA
from model.classifier import Classifier
from model.results import CardMetric, HeadResults, ImageResult

MAX_ECHO = 120  # longest user-supplied text (file name, id) echoed back
DISCLAIMER = (
    "**Research and education demo, not a medical device.** It does not diagnose, screen for "
    "or rule out skin cancer, and its scores are not validated for clinical use. Anyone worried "
    "about a skin lesion should see a dermatologist."
)
API_DESCRIPTION = (
    "RESEARCH AND EDUCATION DEMO, NOT A MEDICAL DEVICE: results must not be used for diagnosis.\n\n"
    "Classifies dermoscopic skin-lesion images into the 7 HAM10000 classes (dx codes) and reports "
    "the melanoma probability P(mel) against the model's calibrated threshold. Submit images with "
    "`POST /predict` or `POST /predict_bulk` (multipart), then poll `GET /from_task/{task_uuid}`. "
    "Multi-source models also return `heads` (each extra head's calibrated probabilities) and "
    "`seven_point` (the expected seven-point-checklist score estimated from the criterion heads)."
)
# model/rollout.py's `overlay_heatmap` default colour map: the legend shows the same colours.
EXPLANATION_COLORMAP = "jet"
# metrics_schema's rows by model-index type: the app rebuilds headline names in its own unit.
INDEX_METRICS = {m.index_type: m for m in METRICS if m.index_type}


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """User-supplied text as echoed back: at most `limit` characters."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# How the page's numbers relate, said once wherever secondary numbers are shown.
SECONDARY_NOTE = (
    "The flag above comes from P(melanoma) and the model's threshold alone; the checklist score and "
    "the other heads are separate estimates of the same model, shown for study, and do not change it."
)


def _model_line(result: ImageResult) -> str:
    method = f" Explanation: {result.explanation}." if result.explanation else ""
    views = f" Averaged over {result.views} flipped and rotated views of the image." if result.views > 1 else ""
    return f"Model: `{result.model.model_id}`.{views}{method}"


def _ood_markdown(result: ImageResult) -> str:
    return (
        "## Warning: this is probably not a dermoscopic skin-lesion image\n"
        f"{result.warning}\n\n"
        "The classifier was only trained on dermoscopy; its scores are **not meaningful** for "
        "this image, so no melanoma flag is shown and the class scores are collapsed.\n\n"
        + _model_line(result)
    )


def percent(probability: float) -> str:
    """The page's one way to show a probability (0-1): percent, one decimal. CSV and JSON keep 0-1."""
    return f"{probability:.1%}"


def percent_value(probability: float | None) -> float | None:
    """`percent` as a number, for table columns that must sort numerically."""
    return None if probability is None or pd.isna(probability) else float(percent(probability)[:-1])


def _operating_points_text(result: ImageResult) -> str:
    """What the flag costs in false alarms, and the second (balanced) operating point, both as
    measured on validation; "" for a model without them."""
    points = result.operating_points
    if points is None:
        return ""
    flag, balanced = points.flag, points.balanced
    side = "above" if result.above_balanced else "below"
    return (
        f" On validation this threshold also flagged {percent(1 - flag.specificity)} of the non-melanomas "
        f"(false alarms) and caught {percent(flag.sensitivity)} of the melanomas.\n\n"
        f"Balanced threshold {percent(balanced.threshold)} (on validation: sensitivity {percent(balanced.sensitivity)}, "
        f"false alarms {percent(1 - balanced.specificity)}): this image is **{side}** it."
    )


def verdict_markdown(result: ImageResult) -> str:
    """The risk statement for one result: a clear OOD warning replaces the flag; a borderline one
    adds a caution under it."""
    if result.warning:
        return _ood_markdown(result)
    caution = f"\n\n**Caution:** {result.caution}" if result.caution else ""
    p_mel, threshold = result.melanoma_probability, result.melanoma_threshold
    if p_mel is None:
        return f"Top class: **{result.label_name}** ({percent(result.probability)}). This model has no melanoma class."
    if result.melanoma:
        flag = f"**Above** the model's melanoma threshold of {percent(threshold)} ({THRESHOLD_RULE}): this demo would flag it for a closer look."
    else:
        flag = f"**Below** the model's melanoma threshold of {percent(threshold)} ({THRESHOLD_RULE})."
    flag += _operating_points_text(result)
    top = f"Top class: {result.label_name} ({percent(result.probability)})."
    likeliest = result.prediction.most_probable
    if likeliest != result.label:
        # The decision rule (model.decision) named a rarer class than the most probable one: say both.
        top = (f"Top class: {result.label_name} ({percent(result.probability)}), by this model's balanced decision "
               f"rule, which names rarer classes more often; the most probable class is "
               f"{DX_NAMES.get(likeliest, likeliest)} ({percent(result.probabilities[likeliest])}).")
    if result.melanoma and result.label != MELANOMA:
        # The one sentence that reconciles "flag it" with a benign top class.
        top += " The threshold is set low so that few melanomas are missed: an image is flagged while another class is still the most likely."
    return (
        f"## Melanoma probability: {percent(p_mel)}\n{flag}{caution}\n\n"
        f"{top}{_with_metadata_text(result)} {_model_line(result)} _Research demo output, not a diagnosis._"
    )


def _with_metadata_text(result: ImageResult) -> str:
    """One secondary sentence: P(mel) with the patient's age / sex / site, when given and fitted."""
    score = result.with_metadata
    if score is None:
        return ""
    given = ", ".join(
        f"age {score.inputs['age']:g}" if name == "age" else str(score.inputs[name])
        for name in ("age", "sex", "site") if score.inputs[name] is not None
    )
    side = ""
    if score.threshold is not None:
        side = f" ({'above' if score.above_threshold else 'below'} its own threshold of {percent(score.threshold)})"
    return (f" With the patient's {given}: {percent(score.probability)}{side}, a secondary estimate; the verdict "
            "above is the image's.")


def _readable(name: str) -> str:
    return name.replace("_", " ")


def criteria_markdown(heads: HeadResults) -> str:
    """One image's extra heads: the seven-point criteria table (with every criterion head), then the
    other heads' probabilities, framed as a model's estimates."""
    seven = heads.seven_point
    lines = ["### Secondary estimates (they do not change the verdict)", f"<small>{SECONDARY_NOTE}</small>", ""]
    if seven is not None:
        side = "at or above" if seven.suggests_melanoma else "below"
        lines += [
            "#### Dermoscopic criteria (seven-point checklist)",
            "| Criterion: melanoma-specific pattern | Probability | Points |",
            "|---|---|---|",
        ]
        for criterion, (label, points) in SEVEN_POINT.items():
            pattern = f"{_readable(criterion).capitalize()}: {_readable(label)}"
            lines.append(f"| {pattern} | {percent(seven.criteria[criterion])} | {points} |")
        lines += [
            "",
            f"Expected checklist score **{seven.score:.2f}** of 10: {side} the checklist's melanoma cut-off "
            f"of {seven.threshold}.",
        ]
    other = {name: p for name, p in heads.probabilities.items() if seven is None or name not in SEVEN_POINT}
    if other:
        shown = "; ".join(
            f"`{name}`: " + ", ".join(f"{_readable(label)} {percent(p)}" for label, p in probs.items())
            for name, probs in other.items()
        )
        lines += ["", f"Other heads: {shown}."]
    lines += ["", "_A model's estimates, not a dermatologist's reading; research demo output, not a diagnosis._"]
    return "\n".join(lines)


def readable_probabilities(entry: Classifier, probabilities: dict[str, float]) -> dict[str, float]:
    return {entry.labels.get(code, code): p for code, p in probabilities.items()}


def probabilities_markdown(entry: Classifier, probabilities: dict[str, float], title: str = "Class probabilities") -> str:
    """Every class, highest first, in the page's one unit (gr.Label would round to whole percents)."""
    ranked = sorted(readable_probabilities(entry, probabilities).items(), key=lambda item: -item[1])
    rows = "\n".join(f"| {name} | {percent(p)} |" for name, p in ranked)
    return f"### {title}\n| Class | P |\n|---|---:|\n{rows}"  # a short header: one line at phone width


def _temperature_text(info: dict) -> str:
    if info["folded_temperature"] is not None:
        return f"temperature {info['folded_temperature']:.3g} (folded into the classifier head)"
    return "none (plain softmax of an uncalibrated head)"


def training_data_text(entry: Classifier) -> str:
    """The data a model was trained on: its card's datasets, else (multi-source models) the
    readable names of its training sources; "" when neither says."""
    if entry.card and entry.card.datasets:
        return ", ".join(entry.card.datasets)
    return " + ".join(SOURCE_INFO.get(kind, (kind,))[0] for kind in (entry.card.training_sources if entry.card else []))


def metric_name(metric: CardMetric) -> str:
    """A card metric's name in the page's unit: a threshold it was measured at in percent
    ("Melanoma sensitivity at threshold 21.3%"), not the card's 0-1 value."""
    row = INDEX_METRICS.get(metric.type)
    if row is None or row.threshold is None or "threshold" not in metric.args:
        return metric.name
    return (row.index_name or row.label).format(threshold=percent(float(metric.args["threshold"])))


# What each inference backend is (model/onnx_backend.py), for the model details.
BACKEND_TEXT = {
    "torch": "PyTorch",
    "onnx": "ONNX Runtime, fp32 graph (same probabilities as PyTorch)",
    "onnx-int8": "ONNX Runtime, int8 graph (checked against fp32 on three test sets)",
}


def model_details_markdown(entry: Classifier) -> str:
    """The model's facts as a two-column table: what it is, its calibration and threshold, where it
    comes from, and its headline metrics (model/metrics_schema.py's table picks which)."""
    info = entry.describe()
    no_card_value = "see the model card" if info["license"] else "not stated (no model card)"
    rows = [
        ("Architecture", f"`{info['net_type']}`"),
        ("Parameters", f"{info['num_parameters'] / 1e6:.2f} M"),
        ("Input", f"{info['img_size']}x{info['img_size']} px"),
        ("Classes", str(info["out_dim"])),
        ("Inference", BACKEND_TEXT.get(info["backend"], info["backend"])),
        ("Explanation", info["explanation"]),
        ("Calibration", _temperature_text(info)),
        ("Melanoma threshold", f"{percent(info['melanoma_threshold'])} on P(mel), {THRESHOLD_RULE}"),
        ("Training data", training_data_text(entry) or no_card_value),
        ("License", info["license"] or no_card_value),
    ]
    if info["base_model"]:
        rows.append(("Base model", info["base_model"]))
    if info["extra_heads"]:
        heads = [f"`{name}`" for name in info["extra_heads"] if not (entry.has_seven_point and name in SEVEN_POINT)]
        if entry.has_seven_point:
            heads.insert(0, "the seven-point checklist criteria")
        rows.append(("Extra heads", f"{', '.join(heads)} (shown with each single-image result)"))
    headline = [m for m in entry.card.metrics if m.type in HEADLINE_TYPES] if entry.card else []
    rows += [(f"{metric_name(m)} ({m.dataset})", f"{m.value:.3f}") for m in headline]
    cells = "\n".join(f"| {name} | {value.replace('|', '/')} |" for name, value in rows)
    source = "\n\n<small>Metrics: from the model card.</small>" if headline else ""
    return f"| Model | **{info['model_id']}** |\n|---|---|\n{cells}{source}"


TRANSFORMERS_NAMES = {"vit": "ViT", "deit": "ViT"}  # a DeiT export is the same ViT
CNN_TYPES = ("timm_wrapper", "resnet")  # timm CNNs through TimmWrapper, transformers' own ResNet


def model_label(model_id: str, source: str) -> str:
    """A short dropdown label that says what a model is, from its folder's config.json alone (nothing
    is loaded), short enough for the picker at phone width: e.g. "melanoma-vit-hybrid · CNN+ViT,
    checklist". A stock transformers export is the "stock copy" of a ViT (no remote code); the
    details table says more."""
    config_path = Path(source) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return model_id  # a Hub id or an unreadable folder: the id says it
    kind = config.get("model_type", "")
    if kind in CNN_TYPES:
        what = "CNN"
    elif kind == "melanoma_vit":
        what = "CNN+ViT" if config.get("patch_embedding_type") == "hybrid" else "ViT"
    else:
        what = f"{TRANSFORMERS_NAMES.get(kind, kind)} (stock copy)"
    extras = config.get("extra_heads") or {}
    if extras:
        what += ", checklist" if all(k in extras for k in SEVEN_POINT) else ", extra heads"
    return f"{model_id} · {what}"


def batch_summary(batch: Any) -> str:
    """One batch (`webapp.scoring.BatchResult`) in a sentence: the lesions above the threshold, what
    the threshold costs in false alarms on validation, those above the balanced threshold, the images
    that are not dermoscopy."""
    lesions = [r for r in batch.results if not r.warning]
    text = f"{len(lesions)} lesion image{'s' if len(lesions) != 1 else ''} ranked by P(melanoma): " \
           f"{sum(bool(r.melanoma) for r in lesions)} above the model's threshold"
    points = lesions[0].operating_points if lesions else None
    if points is not None:
        text += (f" (which on validation also flagged {percent(1 - points.flag.specificity)} of the non-melanomas), "
                 f"{sum(bool(r.above_balanced) for r in lesions)} above the balanced threshold "
                 f"{percent(points.balanced.threshold)}")
    text += "."
    others = len(batch.results) - len(lesions)
    if others:
        text += f" {others} image{'s' if others != 1 else ''} not dermoscopy: not ranked, no score."
    return text


def gallery_caption(rank: int | None, result: ImageResult) -> str:
    """A thumbnail's one-line caption, short enough not to be cut off: rank, P(melanoma), the flag.
    An image that is clearly not dermoscopy has neither rank nor score. The file name is in the table
    and the selected image's detail (a long name would truncate it)."""
    if result.warning or rank is None:
        return "not ranked · not dermoscopy"
    tag = "above threshold" if result.melanoma else "below threshold"
    if result.caution:
        tag += ", caution"
    return f"#{rank} · {percent(result.melanoma_probability or 0.0)} · {tag}"


def colour_legend_html(what: str = "explanation weight") -> str:
    """A small colour bar for the explanation overlay, in the overlay's own colour map."""
    cmap = matplotlib.colormaps[EXPLANATION_COLORMAP]
    stops = ", ".join(
        "#{:02x}{:02x}{:02x} {}%".format(*(round(255 * c) for c in cmap(i / 10)[:3]), 10 * i) for i in range(11)
    )
    return (
        '<div id="explanation-legend" style="display:flex;align-items:center;gap:0.5em;font-size:0.9em">'
        f'<span>low (transparent)</span><div role="img" aria-label="colour bar: low {what} transparent, blue to red high" '
        f'style="flex:1;height:12px;border-radius:3px;background:linear-gradient(to right, {stops})"></div>'
        f"<span>high {what}</span></div>"
    )
