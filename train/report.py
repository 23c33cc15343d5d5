"""train/predict.py's extra outputs: explanation overlays of the top-ranked images and report.html.

The report is one self-contained HTML file (thumbnails, overlays and the ROC plot embedded as
base64 data URIs, inline CSS, no script, no network), so it opens offline and can be mailed:
summary counts, the top-k images ranked and bordered red (P(mel) at or above the model's
threshold) / blue (below) / grey (may not be dermoscopy) as in the app's batch gallery, their
explanation overlays (`Classifier.analyze`: attention rollout for ViTs, Grad-CAM for CNNs), and,
when the data has labels, the melanoma ROC curve and AUC with its 95% bootstrap CI (train.plots'
`plot_roc`, train.metrics' `melanoma_auc` / `bootstrap_auc_ci`), the plot evaluate.py writes too.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from model.imageio import load_image
from model.labels import MELANOMA
from model.ood import NOT_DERMOSCOPY, POSSIBLY_NOT_DERMOSCOPY
from model.classifier import Classifier
from train.metrics import DISCLAIMER, bootstrap_auc_ci, melanoma_auc
from train.plots import plot_roc
from train.stream import ImageRecord, RecordSource

logger = logging.getLogger(__name__)

REPORT = "report.html"
EXPLANATIONS = "explanations"
THUMB_SIDE = 160
N_BOOTSTRAP = 1000
# The app's batch-gallery border colours (red above threshold, blue below, grey: not dermoscopy?).
COLOURS = {"above": "rgb(220,30,30)", "below": "rgb(30,90,220)", "ood": "rgb(150,150,150)"}
TEMPLATES = Environment(loader=PackageLoader("train", "templates"), autoescape=select_autoescape(["html", "j2"]))

def _data_uri(image: Image.Image | np.ndarray, fmt: str = "JPEG") -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt, quality=85)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def fetch_records(source: RecordSource, indices: set[int]) -> dict[int, ImageRecord]:
    """The records of the given input rows, in one streaming pass that stops once all are found."""
    found: dict[int, ImageRecord] = {}
    for record in source:
        if record.index in indices:
            found[record.index] = record
            if len(found) == len(indices):
                break
    return found


def _file_stem(rank: int, image_id: str) -> str:
    return f"rank{rank:05d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', image_id)[:80]}"


def write_explanations(top: pd.DataFrame, images: dict[int, Image.Image], entry: Classifier, folder: Path) -> dict[int, tuple[np.ndarray, str]]:
    """Overlay PNGs of `top`'s images in `folder` (rank<r>_<id>.png); returns index -> (overlay, method)."""
    folder.mkdir(parents=True, exist_ok=True)
    overlays: dict[int, tuple[np.ndarray, str]] = {}
    for row in top.itertuples(index=False):
        index = int(row.index)
        analysis = entry.analyze(images[index])
        Image.fromarray(analysis.heatmap).save(folder / f"{_file_stem(int(row.rank), str(row.id))}.png")
        overlays[index] = (analysis.heatmap, analysis.method)
    return overlays


def roc_summary(ranked: pd.DataFrame, threshold: float, folder: Path) -> dict[str, Any] | None:
    """ROC plot + AUC (95% CI) over the scored rows that have a label; None when none has one.

    Returns {counts, auc (None with one class only), low, high, n_bootstrap, image (data URI)}."""
    labelled = ranked[(ranked["error"] == "") & (ranked["label"] != "") & (ranked["melanoma_probability"] != "")]
    if labelled.empty:
        return None
    y_mel = (labelled["label"] == MELANOMA).to_numpy(dtype=int)
    p_mel = labelled["melanoma_probability"].astype(float).to_numpy()
    auc = melanoma_auc(y_mel, p_mel)
    summary: dict[str, Any] = {"counts": f"{len(labelled)} labelled images, {int(y_mel.sum())} melanomas", "auc": auc}
    if auc is None:
        return summary
    low, high = bootstrap_auc_ci(y_mel, p_mel, n_resamples=N_BOOTSTRAP, seed=0)
    path = folder / "roc.png"
    plot_roc(y_mel, p_mel, {"model threshold": threshold}, path)
    return {**summary, "low": low, "high": high, "n_bootstrap": N_BOOTSTRAP, "image": _data_uri(Image.open(path), "PNG")}


def _figure(row: Any, image: Image.Image | None, overlay: tuple[np.ndarray, str] | None) -> dict[str, Any]:
    """One top-k image's entry in the report's grid (the template escapes every text)."""
    kind = "ood" if row.ood_level == NOT_DERMOSCOPY else "above" if row.above_threshold == "True" else "below"
    tag = {"ood": "\u26a0 not dermoscopy: no score", "above": "ABOVE threshold", "below": "below threshold"}[kind]
    if row.ood_level == POSSIBLY_NOT_DERMOSCOPY:
        tag += " (caution: may not be dermoscopy)"
    figure = {"kind": kind, "tag": tag, "rank": row.rank, "id": str(row.id), "label": row.label,
              "score": "" if kind == "ood" else f"P(mel) {float(row.melanoma_probability):.1%}, ",
              "top_class": row.top_class_name, "thumb": None, "overlay": None, "method": None}
    if image is not None:
        thumb = image.copy()
        thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
        figure["thumb"] = _data_uri(thumb)
    if overlay is not None:
        view = Image.fromarray(overlay[0])
        view.thumbnail((THUMB_SIDE, THUMB_SIDE))
        figure["overlay"], figure["method"] = _data_uri(view), overlay[1]
    return figure


def render_report(ranked: pd.DataFrame, images: dict[int, Image.Image], overlays: dict[int, tuple[np.ndarray, str]],
                  entry: Classifier, args: argparse.Namespace, folder: Path) -> str:
    """The report's HTML (see the module docstring), from templates/report.html.j2."""
    scored = ranked[ranked["error"] == ""]
    top = scored.head(args.top_k)
    summary = {
        "Model": f"{entry.id} ({entry.net_type}), threshold {entry.melanoma_threshold:.3g} on P(mel)",
        "Data": f"{args.data}" + (f" (split {args.split})" if args.split else ""),
        "Images scored": len(scored),
        "At or above the threshold": int((scored["above_threshold"] == "True").sum()),
        "Not dermoscopy (no score, not ranked)": int((scored["ood_level"] == NOT_DERMOSCOPY).sum()),
        "Possibly not dermoscopy (scored, with a caution)": int((scored["ood_level"] == POSSIBLY_NOT_DERMOSCOPY).sum()),
        "Unreadable (error rows)": len(ranked) - len(scored),
        "Test-time views": args.tta,
        "Command": "predict.py " + shlex.join(sys.argv[1:]),
    }
    figures = [_figure(r, images.get(int(r.index)), overlays.get(int(r.index))) for r in top.itertuples(index=False)]
    return TEMPLATES.get_template("report.html.j2").render(
        colours=COLOURS, disclaimer=DISCLAIMER, summary=summary, roc=roc_summary(ranked, entry.melanoma_threshold, folder),
        figures=figures, n_scored=len(scored),
    )


def write_outputs(ranked: pd.DataFrame, source: RecordSource, entry: Classifier, args: argparse.Namespace, folder: Path) -> None:
    """`--explain K`: overlays of the K top-ranked images; `--report`: report.html (top_k images)."""
    scored = ranked[ranked["error"] == ""]
    shown = scored.head(max(args.top_k if args.report else 0, args.explain))
    records = fetch_records(source, {int(i) for i in shown["index"]})
    images = {i: load_image(r.image, max_side=args.max_side or None) for i, r in records.items()}
    overlays = write_explanations(scored.head(args.explain), images, entry, folder / EXPLANATIONS)
    if args.report:
        (folder / REPORT).write_text(render_report(ranked, images, overlays, entry, args, folder), encoding="utf-8")
        logger.info("report: %s", folder / REPORT)
