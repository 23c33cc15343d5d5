"""The Gradio page: handlers at module level (each takes the `AppContext` first; `bind` hands it
over), then the layout in `build_blocks`.

Named API endpoints: `/predict` (one image), `/predict_batch` (many) and `/explanation_opacity`
(re-blend the last explanation at another opacity, no new prediction).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio.utils import NamedString
import yaml
from PIL import Image, ImageOps

from model.imageio import InvalidImageError
from model.ood import NOT_DERMOSCOPY
from model.catalogue import UnknownModelError
from model.classifier import Classifier
from model.metadata_model import SEXES, SITES, Metadata, MetadataError
from model.results import ImageResult

from .context import AppContext
from .formatting import (
    API_DESCRIPTION,
    DISCLAIMER,
    clip,
    colour_legend_html,
    criteria_markdown,
    gallery_caption,
    model_details_markdown,
    model_label,
    batch_summary,
    percent_value,
    probabilities_markdown,
    verdict_markdown,
)
from .rest import MAX_BULK_FILES
from .scoring import BatchResult, Explained

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_FILE = ROOT / "assets" / "examples.yaml"
ABOVE_COLOUR, BELOW_COLOUR, OOD_COLOUR = (220, 30, 30), (30, 90, 220), (150, 150, 150)
DEFAULT_OPACITY = 0.5
IMAGE_HEIGHT = 260  # px: the upload and its explanation side by side, above the fold at 1400 px
# WCAG AA: white on the primary button and the small grey texts reach 4.5:1 (Gradio's defaults:
# white on orange-500 2.8:1, grey-400 labels 2.5:1).
THEME = gr.themes.Default(primary_hue="blue").set(
    button_primary_background_fill="*primary_700",
    button_primary_background_fill_hover="*primary_800",
    button_primary_text_color="white",
    body_text_color_subdued="*neutral_600",
    block_label_text_color="*neutral_700",
    block_info_text_color="*neutral_600",
)
# Bounded memory: a page's kept explanation / batch (a decoded image of up to 1024 px each) is let go
# this long after its last use, and at most this many Gradio events wait (one runs at a time).
STATE_TTL_S = 900
# On a phone the verdict is a screen below the Classify button: bring it into view.
SCROLL_TO_VERDICT = (
    "() => { if (window.innerWidth < 700) document.getElementById('verdict')?.scrollIntoView({block: 'start'}); }"
)
GRADIO_QUEUE_SIZE = 64
NO_MODEL = "No model found: add a model folder under models/."
# The batch table's columns and their headers on the page, the score first (the CSV has every
# column, by its name).
SHOWN_COLUMNS = {
    "melanoma_probability": "P(melanoma) %", "rank": "Rank", "file": "File", "above_threshold": "Flagged",
    "above_balanced_threshold": "Above balanced threshold", "seven_point_score": "Checklist score",
    "top_class_name": "Top class", "ood_level": "Dermoscopy check", "error": "Error",
}

# The ranked gallery grows with its rows and scrolls with the page: Gradio's height="auto" gallery is a
# box of at most 55vh with a scroll bar of its own (a scroll inside the page's scroll; 24 images showed
# two and a half rows). Captions sit under their thumbnail, whole and wrapped, instead of over the
# lesion's lower part, and phones get two columns (six columns of Gradio's 100 px minimum would scroll
# sideways and cut every caption). Table cells break between words only (Gradio's prose breaks
# "Architecture" or a checklist criterion mid-word at phone width); a percentage never wraps.
PAGE_CSS = """
#model-details td, #model-details th, #verdict td, #verdict th { word-break: normal; overflow-wrap: normal; }
#class-table td:last-child { white-space: nowrap; }
#ranked-gallery .grid-wrap { max-height: none !important; overflow-y: visible !important; }
#ranked-gallery .thumbnail-item { aspect-ratio: auto; height: auto; display: flex; flex-direction: column; }
#ranked-gallery .thumbnail-item > img { aspect-ratio: 1 / 1; height: auto; flex: none; }
#ranked-gallery .caption-label {
  position: static; max-width: none; white-space: normal; text-align: center; opacity: 1;
  border: 0; border-top: 1px solid var(--border-color-primary); border-radius: 0;
}
#batch-table th, #batch-table td, #batch-table th *, #batch-table td * { word-break: normal !important; overflow-wrap: normal !important; }
@media (max-width: 600px) {
  #ranked-gallery .grid-container { grid-template-columns: repeat(2, minmax(0, 1fr)) !important; }
  #batch-table th, #batch-table td, #batch-table th *, #batch-table td * { white-space: nowrap !important; }
}
"""


def bind(handler: Callable, ctx: AppContext) -> Callable:
    """`handler` with `ctx` as its first argument. Like functools.partial, but a bound method keeps
    what Gradio reads from a handler: its name and its type hints (gr.SelectData)."""
    return types.MethodType(handler, ctx)


def uploaded_file(**kwargs: Any) -> gr.File:
    """A `gr.File(type="filepath", **kwargs)` whose handlers get the uploaded file's path and nothing
    else on disk.

    Gradio's `File.preprocess` (6.31) also creates an empty `NamedTemporaryFile` in its upload folder
    for every file of every call and never uses or deletes it: one zero-byte file left per upload
    (issue 19), which no cache expiry removes (Gradio deletes only the files it tracks). The
    component's per-file step is replaced on this instance: a subclass would do the same, but Gradio
    writes a `.pyi` stub beside any module that defines a component class.
    """
    component = gr.File(type="filepath", **kwargs)
    component._process_single_file = lambda f: NamedString(f.path)  # f: gradio.data_classes.FileData
    return component


@dataclass
class BatchState:
    """The batch tab's state: ranked results and the path each was read from (names may repeat)."""

    model_id: str
    results: list[ImageResult]
    paths: list[str]


def _entry(ctx: AppContext, model_id: str | None) -> Classifier:
    try:
        return ctx.scoring.entry(model_id)
    except UnknownModelError as err:
        raise gr.Error(str(err)) from err


def _read(ctx: AppContext, path: str) -> Image.Image:
    """An upload decoded by the project's decoder; its friendly message when it cannot be."""
    try:
        return ctx.scoring.read(path)
    except InvalidImageError as err:
        raise gr.Error(str(err)) from err


def _name_of(path: str) -> str:
    return clip(Path(path).name)


def _overlay_image(ctx: AppContext, explained: Explained, opacity: float) -> np.ndarray:
    """The overlay as a plain value: a returned component (gr.Image(label=...)) would give the
    session its own copy of the page's config, megabytes per visitor kept for hours. The method is
    named in the verdict."""
    return ctx.scoring.overlay(explained, opacity)


def _marked_thumbnail(thumb: Image.Image, result: ImageResult) -> Image.Image:
    colour = OOD_COLOUR if result.warning else ABOVE_COLOUR if result.melanoma else BELOW_COLOUR
    return ImageOps.expand(thumb, border=8, fill=colour)


# -------------------------------------------------------------------------- single image
def preview(ctx: AppContext, image_path: str | None):
    """A new upload: shown as the model will see it (or the decoder's message for a file it cannot
    read), the previous image's results cleared -> (image, overlay, verdict, classes, state)."""
    image = _read(ctx, image_path) if image_path else None
    return image, None, "", "", None


def predict(
    ctx: AppContext,
    image_path: str | None,
    model_id: str | None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.9,
    start_layer: int = 0,
    age: float | None = None,
    sex: str | None = None,
    site: str | None = None,
):
    """One image -> (class probabilities, verdict, explanation overlay, plain image, JSON record, state).
    `age` / `sex` / `site` (optional) add P(mel) with them for a model that has a metadata regression."""
    if not image_path:
        raise gr.Error("Upload an image first.")
    try:
        patient = Metadata.parse(age, sex, site)
    except MetadataError as err:
        raise gr.Error(str(err)) from err
    image = _read(ctx, image_path)
    entry = _entry(ctx, model_id)
    try:
        explained = ctx.scoring.explain(entry, _name_of(image_path), image, head_fusion, discard_ratio, start_layer,
                                        patient)
    except ValueError as err:
        raise gr.Error(str(err)) from err
    result = explained.result
    verdict = verdict_markdown(result)
    if result.heads is not None and not result.warning:  # OOD: no score is meaningful
        verdict += "\n\n" + criteria_markdown(result.heads)
    return (
        # Clearly not dermoscopy: the class scores are collapsed (they stay in the JSON record).
        "" if result.warning else probabilities_markdown(entry, result.probabilities),
        verdict,
        _overlay_image(ctx, explained, DEFAULT_OPACITY),
        image,
        result.to_json(),
        explained,
    )


def explanation_opacity(ctx: AppContext, explained: Explained | None, opacity: float):
    """The last explanation re-blended at `opacity` (0: the image, 1: the heat map alone); no new
    prediction: the heat map is the one kept in the page's state."""
    if explained is None:
        return gr.skip()
    return _overlay_image(ctx, explained, opacity)


def re_explain(
    ctx: AppContext,
    explained: Explained | None,
    head_fusion: str,
    discard_ratio: float,
    start_layer: int,
    opacity: float,
):
    """The last image explained again with new rollout options (same model, same image)."""
    if explained is None:
        return gr.skip(), gr.skip()
    entry = _entry(ctx, explained.model_id)
    try:
        kept = explained.result.with_metadata  # the patient's fields stay with the kept result
        explained = ctx.scoring.explain(
            entry, explained.result.name, explained.image, head_fusion, discard_ratio, start_layer,
            Metadata(**kept.inputs) if kept is not None else None,
        )
    except ValueError as err:
        raise gr.Error(str(err)) from err
    return _overlay_image(ctx, explained, opacity), explained


# --------------------------------------------------------------------------------- batch
def predict_batch(ctx: AppContext, files: list[str] | None, model_id: str | None, progress=gr.Progress()):
    """Many images -> (ranked marked gallery, table, CSV file, error list, state)."""
    if not files:
        raise gr.Error("Upload one or more images first.")
    if len(files) > MAX_BULK_FILES:
        raise gr.Error(f"At most {MAX_BULK_FILES} images per batch, got {len(files)}.")
    entry = _entry(ctx, model_id)
    total = len(files)
    progress((0, total), desc="Classifying", unit="images")
    batch = ctx.scoring.score(
        entry,
        [(_name_of(path), path) for path in files],
        on_chunk=lambda done: progress((done, total), desc="Classifying", unit="images"),
        thumbnails=True,
    )
    ranking = batch.ranking
    gallery = [
        (_marked_thumbnail(batch.thumbnails[i], batch.results[i]), gallery_caption(rank, batch.results[i]))
        for rank, i in batch.ranks()
    ]
    rows = batch.rows()
    csv_path = ctx.scratch.new_file(f"melanoma_batch_{entry.id.replace('/', '_')}.csv")
    batch.write_csv(csv_path)
    state = BatchState(entry.id, [batch.results[i] for i in ranking], [files[batch.sources[i]] for i in ranking])
    return gallery, _shown_table(rows), str(csv_path), _errors_markdown(batch), state


def _shown_table(rows: Any) -> Any:
    """The page's table: fewer columns than the CSV, P(melanoma) in the page's unit (percent, one
    decimal, numeric so that the column sorts, from the raw values); the CSV keeps 0-1. An image that
    is clearly not dermoscopy shows no P(melanoma), as on the single-image tab."""
    shown = rows[[c for c in SHOWN_COLUMNS if c in rows]].round(4)
    if "melanoma_probability" in rows:
        meaningless = rows["ood_level"] == NOT_DERMOSCOPY if "ood_level" in rows else False
        shown["melanoma_probability"] = rows["melanoma_probability"].map(percent_value).mask(meaningless)
        if "top_class_name" in shown:
            shown["top_class_name"] = shown["top_class_name"].mask(meaningless, "")
    return shown.rename(columns=SHOWN_COLUMNS)


def _errors_markdown(batch: BatchResult) -> str:
    """The batch in one line (how many are above each threshold, what the flag costs in false
    alarms), then the files that could not be used."""
    summary = batch_summary(batch)
    if not batch.errors:
        return summary
    return summary + "\n\n**Files that could not be used** (the rest of the batch was processed):\n" + "\n".join(
        f"- `{e.name}`: {e.error}" for e in batch.errors
    )


def fold_uploads(files: list[str] | None):
    """The upload list folds away once there are files (results stay in view); it opens when empty."""
    if not files:
        return gr.Accordion(label="Images", open=True)
    return gr.Accordion(label=f"Images: {len(files)} file{'s' if len(files) != 1 else ''} (open to change)", open=False)


def show_selected(ctx: AppContext, state: BatchState | None, evt: gr.SelectData):
    """A gallery thumbnail's detail: class table, verdict, image and its explanation overlay."""
    if not state or evt.index is None or evt.index >= len(state.results):
        raise gr.Error("Run a batch first.")
    result = state.results[evt.index]
    entry = _entry(ctx, state.model_id)
    image = _read(ctx, state.paths[evt.index])
    explained = ctx.scoring.explain(entry, result.name, image)
    return (
        probabilities_markdown(entry, result.probabilities, f"Selected image: {result.name}"),
        f"**{result.name}**\n\n" + verdict_markdown(explained.result),
        _overlay_image(ctx, explained, DEFAULT_OPACITY),
        image,
    )


# ------------------------------------------------------------------------------ the model
def on_model_change(ctx: AppContext, model_id: str | None):
    """Model details, and the rollout settings shown for ViTs only: a CNN's Grad-CAM has none, so
    no empty panel either."""
    if not model_id:
        return NO_MODEL, gr.Accordion(visible=False), gr.Slider()
    entry = _entry(ctx, model_id)
    rollout = entry.uses_rollout
    return (
        model_details_markdown(entry),
        gr.Accordion(visible=rollout),
        # Slider needs maximum > minimum; the scoring service clamps start_layer to the last layer.
        gr.Slider(maximum=max(entry.num_layers - 1, 1), value=0, visible=rollout and entry.num_layers > 1),
    )


def cleared(count: int, model_id: str | None = None) -> tuple[None, ...]:
    """`count` empty outputs: a model change clears the previous model's results (its verdict would
    otherwise stay on the page under the new model's name)."""
    return (None,) * count


def load_examples() -> tuple[list[str], list[str], str]:
    """assets/examples.yaml: (image paths, captions, attribution)."""
    if not EXAMPLES_FILE.is_file():
        return [], [], ""
    spec = yaml.safe_load(EXAMPLES_FILE.read_text()) or {}
    paths, captions = [], []
    for item in spec.get("examples", []):
        path = ROOT / item["path"]
        if path.is_file():
            paths.append(str(path))
            captions.append(item.get("caption", path.name))
    return paths, captions, spec.get("attribution", "")


def example_batch() -> list[str]:
    """The example images as one batch (the batch tab's "Example batch" button)."""
    return load_examples()[0]


# ---------------------------------------------------------------------------------- layout
def single_image_tab(ctx: AppContext, model_choice: gr.Dropdown, examples: tuple[list[str], list[str], str]):
    """The single-image tab's components and events; returns the rollout settings panel and its
    start-layer slider (which the model choice shows, hides or sets), and the model's results (which
    a model change clears)."""
    example_paths, example_captions, attribution = examples
    with gr.Row():
        with gr.Column():
            # A file input, decoded by model.imageio: an unreadable file gets the decoder's
            # message (Gradio's image input would fail with a bare "Error" first).
            image_in = uploaded_file(label="Dermoscopic image", file_count="single", height=120)
            run_button = gr.Button("Classify", variant="primary")
            with gr.Accordion("Attention rollout settings", open=False) as settings:
                gr.Markdown("<small>How the ViT's attention maps are combined into the heat map "
                            "(Abnar & Zuidema, 2020). The defaults suit most images.</small>")
                head_fusion = gr.Radio(
                    ["mean", "max", "min"], value="mean", label="Head fusion",
                    info="How each layer's attention heads are combined: their mean, or the strongest (max) or weakest (min) head.",
                )
                discard_ratio = gr.Slider(
                    0.0, 0.99, value=0.9, step=0.01, label="Discard ratio",
                    info="Share of the weakest attention links dropped in each layer: higher gives a sharper, sparser map.",
                )
                start_layer = gr.Slider(
                    0, 11, value=0, step=1, label="Start layer",
                    info="First layer multiplied in: later layers show what the model attends to last.",
                )
            with gr.Accordion("Patient (optional): age, sex, site", open=False):
                views_note = (" Not while this server scores several test-time views per image "
                              "(MELANOMA_TTA_VIEWS): the regression was fitted on one-view scores."
                              if ctx.settings.tta_views > 1 else "")
                gr.Markdown("<small>For a model with an age / sex / site regression (efficientnet-lite2), the "
                            f"verdict adds P(melanoma) with them, a secondary estimate. Nothing is stored.{views_note}</small>")
                with gr.Row():
                    age = gr.Number(label="Age (years)", value=None, minimum=0, maximum=120, precision=0)
                    sex = gr.Radio(["unknown", *SEXES], value="unknown", label="Sex")
                site = gr.Dropdown(["unknown", *SITES], value="unknown", label="Anatomical site")
            # The image and its explanation right under the button: with the verdict beside them,
            # the whole result is in the first screen at 1400 px.
            with gr.Row():
                plain_out = gr.Image(label="Image", type="pil", interactive=False, height=IMAGE_HEIGHT)
                # PNG: lossless, so that opacity 0 shows the decoded upload exactly.
                heatmap_out = gr.Image(
                    label="Explanation", interactive=False, format="png", elem_id="explanation-overlay",
                    height=IMAGE_HEIGHT,
                )
            opacity = gr.Slider(
                0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Overlay opacity", elem_id="overlay-opacity"
            )
            gr.HTML(colour_legend_html())
        with gr.Column():
            verdict = gr.Markdown(elem_id="verdict")
            probs_out = gr.Markdown(elem_id="class-table")
    if example_paths:
        gr.Examples(examples=[[p] for p in example_paths], inputs=[image_in], example_labels=example_captions)
        gr.Markdown(f"<small>{attribution}</small>")
    with gr.Accordion("Raw result (JSON)", open=False):
        json_out = gr.JSON()
    explained = gr.State(time_to_live=STATE_TTL_S)
    image_in.change(
        bind(preview, ctx),
        inputs=[image_in],
        outputs=[plain_out, heatmap_out, verdict, probs_out, explained],
        api_visibility="private",
    )
    run_button.click(
        bind(predict, ctx),
        inputs=[image_in, model_choice, head_fusion, discard_ratio, start_layer, age, sex, site],
        outputs=[probs_out, verdict, heatmap_out, plain_out, json_out, explained],
        api_name="predict",
        api_description="One image -> class probabilities, verdict, explanation, image, JSON. "
        + API_DESCRIPTION,
    ).success(  # the page's opacity, if the slider was moved before the click
        bind(explanation_opacity, ctx), inputs=[explained, opacity], outputs=[heatmap_out],
        api_name="explanation_after_predict", api_visibility="private",
    ).then(None, js=SCROLL_TO_VERDICT)
    opacity.change(
        bind(explanation_opacity, ctx),
        inputs=[explained, opacity],
        outputs=[heatmap_out],
        api_name="explanation_opacity",
        api_description="Re-blend the last /predict explanation at another opacity (0-1), no new prediction.",
    )
    gr.on(
        [head_fusion.change, discard_ratio.change, start_layer.change],
        bind(re_explain, ctx),
        inputs=[explained, head_fusion, discard_ratio, start_layer, opacity],
        outputs=[heatmap_out, explained],
        api_visibility="private",
    )
    return (settings, start_layer), [probs_out, verdict, heatmap_out, json_out, explained]


def batch_tab(ctx: AppContext, model_choice: gr.Dropdown, example_paths: list[str]) -> list[gr.components.Component]:
    """The batch tab's components and events; returns the model's results (which a model change clears)."""
    gr.Markdown(
        "Upload many images at once: results are ranked by melanoma probability, highest first. "
        "Captions: rank · P(melanoma) · threshold. Red border: above the model's threshold; blue: below; "
        "grey: not dermoscopy (not ranked, no score). "
        "Click a thumbnail for details. " + DISCLAIMER
    )
    # Folded once files are there, and a fixed height when open: a long upload list never
    # pushes the results down.
    with gr.Accordion("Images", open=True) as uploads:
        files_in = uploaded_file(file_count="multiple", label="Images", height=180)
    with gr.Row():
        batch_button = gr.Button("Classify all", variant="primary")
        if example_paths:
            gr.Button("Example batch", variant="secondary").click(
                example_batch, outputs=[files_in], api_visibility="private"
            )
    batch_errors = gr.Markdown()
    gallery = gr.Gallery(
        label="Ranked by melanoma probability",
        elem_id="ranked-gallery",
        columns=6,
        height="auto",
        allow_preview=False,
        object_fit="contain",
    )
    with gr.Row():  # the verdict (a level-2 heading) before its class table (level 3)
        with gr.Column():
            sel_verdict = gr.Markdown()
            sel_plain = gr.Image(label="Image", type="pil", interactive=False)
        sel_probs = gr.Markdown()
        sel_heatmap = gr.Image(label="Explanation", interactive=False)
    # Rows grow with the page (no scroll box of 12 rows inside the page's scroll) and cells wrap, so
    # every column fits beside the gallery on a desktop; a phone scrolls the table sideways only.
    table = gr.Dataframe(label="Results", interactive=False, wrap=True, max_height=100_000, elem_id="batch-table")
    csv_out = gr.File(label="All results (CSV)")
    batch_state = gr.State(time_to_live=STATE_TTL_S)
    files_in.change(fold_uploads, inputs=[files_in], outputs=[uploads], api_visibility="private")
    batch_button.click(
        bind(predict_batch, ctx),
        inputs=[files_in, model_choice],
        outputs=[gallery, table, csv_out, batch_errors, batch_state],
        api_name="predict_batch",
        api_description="Many images -> ranked gallery, table, CSV file, errors. " + API_DESCRIPTION,
    )
    gallery.select(
        bind(show_selected, ctx),
        inputs=[batch_state],
        outputs=[sel_probs, sel_verdict, sel_heatmap, sel_plain],
        api_visibility="private",
    )
    return [gallery, table, csv_out, batch_errors, batch_state, sel_probs, sel_verdict, sel_heatmap, sel_plain]


def build_blocks(ctx: AppContext) -> gr.Blocks:
    """The page: model choice and details, the single-image tab and the batch tab."""
    zoo = ctx.zoo
    cache_ttl = int(ctx.settings.cache_ttl_s)
    with gr.Blocks(title="Melanoma classifier: research demo", delete_cache=(max(1, cache_ttl // 4), cache_ttl)) as demo:
        gr.Markdown("# Melanoma classifier for dermoscopy images (research demo)\n\n> " + DISCLAIMER)
        with gr.Row():  # columns with a minimum width: at phone width the details table goes below
            with gr.Column(min_width=320):
                model_choice = gr.Dropdown(
                    choices=[(model_label(i, zoo.source(i)), i) for i in zoo.ids],
                    value=zoo.default_id,
                    label="Model",
                    interactive=True,
                )
            with gr.Column(min_width=320), gr.Accordion("Model details", open=False):
                details = gr.Markdown(NO_MODEL if zoo.default_id is None else "", elem_id="model-details")
        if zoo.skipped:
            gr.Markdown("Hub models skipped (unreachable here): " + ", ".join(f"`{k}`" for k in zoo.skipped))
        if zoo.ood_note:
            gr.Markdown(f"_{zoo.ood_note}_")

        examples = load_examples()
        with gr.Tab("Single image"):
            (settings, start_layer), single_results = single_image_tab(ctx, model_choice, examples)
        with gr.Tab("Batch"):
            batch_results = batch_tab(ctx, model_choice, examples[0])

        gr.Markdown(
            f"<small>{DISCLAIMER} Models trained on HAM10000 inherit its CC BY-NC-SA 4.0 terms "
            "(non-commercial).</small>"
        )
        gr.on(
            [model_choice.change, demo.load],
            bind(on_model_change, ctx),
            inputs=[model_choice],
            outputs=[details, settings, start_layer],
            api_visibility="private",
        )
        results = single_results + batch_results
        model_choice.change(functools.partial(cleared, len(results)), inputs=[model_choice], outputs=results,
                            api_visibility="private")
    return demo.queue(max_size=GRADIO_QUEUE_SIZE, default_concurrency_limit=1)
