"""The model zoo: which classifiers exist, load each once, predict and explain.

Sources of models (all must load with `AutoModelForImageClassification`):
- every folder under `models/` (or `$MELANOMA_MODELS_DIR`) with a `config.json` whose
  `architectures` is an image classifier (other artifacts, e.g. `models/ood-detector/`, are skipped);
- Hub ids from `$MELANOMA_HUB_MODELS` (comma-separated) or the `hub_models:` list of a
  `models.yaml` beside `models/`. A Hub id that cannot be reached (offline, private, missing)
  is skipped and listed in `ModelZoo.skipped` with the reason, so the UI can say so.

Loaded models are cached; loading and inference are guarded by locks because the Gradio
worker threads and the REST background worker share the zoo. Nothing here diagnoses anything:
these are research/education models.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

# Importing this module imports the `model` package, which registers MelanomaViT with the Auto classes.
from .calibration import config_temperature, folded_temperature
from .geometry import processor_geometry
from .labels import CRITERIA_LABELS, DX_NAMES, MELANOMA
from .loading import ROLLOUT_MODEL_TYPES, load_classifier, num_prefix_tokens
from .sevenpoint import MELANOMA_SCORE_THRESHOLD, SEVEN_POINT, criterion_probability, seven_point_score

if TYPE_CHECKING:  # the detector is optional at run time (its module pulls in timm)
    from .ood import OODResult

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS_DIR = ROOT / "models"
# Default model preference: the first id equal to or starting with one of these wins. The best
# measured model comes first (see the README's results table); the ViT is one click away.
DEFAULT_PREFERENCE: tuple[str, ...] = ("efficientnet-lite2", "melanoma-vit-hybrid", "melanoma-vit")
# Smaller model views are upsampled to this width for the explanation overlay (display only).
EXPLAIN_DISPLAY_SIDE = 224


class UnknownModelError(KeyError):
    """The requested model id is not in the zoo (or could not be loaded)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown model"


@dataclass
class CardMetric:
    """One numeric result of a card's model-index."""

    name: str  # metric_name, else metric_type
    type: str  # metric_type (model/metrics_schema.py's index_type for this project's cards)
    value: float
    dataset: str  # dataset_name, else dataset_type
    args: dict[str, Any] = field(default_factory=dict)  # metric_args, e.g. {"threshold": 0.213}


@dataclass
class CardInfo:
    """What the UI shows from a model card (`README.md` beside the weights)."""

    license: str | None = None
    datasets: list[str] = field(default_factory=list)
    base_model: str | None = None
    metrics: list[CardMetric] = field(default_factory=list)


@dataclass
class SevenPointResult:
    """The seven-point checklist as estimated by a model's criterion heads, for one image."""

    score: float  # expected checklist score in [0, 10]: sum over criteria of points x P(pattern)
    criteria: dict[str, float]  # criterion -> P(its melanoma-specific pattern), `SEVEN_POINT` order
    threshold: int = MELANOMA_SCORE_THRESHOLD

    @property
    def suggests_melanoma(self) -> bool:
        return self.score >= self.threshold


@dataclass
class HeadResults:
    """A multi-source model's extra heads for one image (`config.extra_heads`)."""

    probabilities: dict[str, dict[str, float]]  # head -> {label: softmax(head logits / head temperature)}
    seven_point: SevenPointResult | None = None  # only when the model has every criterion head


@dataclass
class Prediction:
    """One image's calibrated dx probabilities, plus its extra heads' when the model has them."""

    probabilities: dict[str, float]  # dx code -> softmax(logits / T), sums to 1
    heads: HeadResults | None = None

    @property
    def label(self) -> str:
        """The top dx code."""
        return max(self.probabilities, key=self.probabilities.__getitem__)


@dataclass(kw_only=True)
class Analysis(Prediction):
    """One image's prediction and explanation from a single forward pass where possible."""

    heatmap: np.ndarray  # (H, W, 3) uint8 overlay on the model's view of the image
    mask: np.ndarray  # (h, w) float32 in [0, 1], on the model's input grid; see `ZooModel.explanation_overlay`
    method: str


@dataclass(frozen=True)
class ModelMetadata:
    """The fields every REST result carries about the model that produced it."""

    model_id: str
    net_type: str
    img_size: int  # input height (px)
    out_dim: int  # number of classes


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold on P(mel) and what it gave on validation (fractions 0-1)."""

    threshold: float
    sensitivity: float
    specificity: float


@dataclass(frozen=True)
class OperatingPoints:
    """A model's two melanoma thresholds measured on its validation data (config.json
    `melanoma_operating_points`, written by `train/operating_points.py`): `flag`, the model's own
    threshold (95% sensitivity rule), and `balanced`, the highest sensitivity + specificity."""

    flag: OperatingPoint
    balanced: OperatingPoint
    data: str  # what they were measured on, e.g. "validation: HAM10000 1498, ISIC 2017 150, Derm7pt 203"

    @classmethod
    def from_config(cls, value: dict[str, Any] | None) -> OperatingPoints | None:
        if not value:
            return None
        return cls(OperatingPoint(**value["flag"]), OperatingPoint(**value["balanced"]), value["data"])


@dataclass
class ImageResult:
    """One image's result as it travels from the zoo through the app; JSON only via `to_json`
    (REST responses, the Gradio JSON output); batch CSV rows read the attributes."""

    name: str
    prediction: Prediction
    model: ModelMetadata
    label_name: str  # readable name of `label`
    melanoma_threshold: float  # decision threshold on P(mel)
    ood: OODResult | None = None  # None without an OOD detector
    explanation: str | None = None  # the explanation method, when one was computed
    operating_points: OperatingPoints | None = None  # None for a model without them

    @property
    def probabilities(self) -> dict[str, float]:
        return self.prediction.probabilities

    @property
    def heads(self) -> HeadResults | None:
        return self.prediction.heads

    @property
    def label(self) -> str:
        """The top dx code."""
        return self.prediction.label

    @property
    def probability(self) -> float:
        """P(top class)."""
        return self.probabilities[self.label]

    @property
    def melanoma_probability(self) -> float | None:
        """P(mel), or None for a model without a melanoma class."""
        return self.probabilities.get(MELANOMA)

    @property
    def melanoma(self) -> bool | None:
        """The melanoma flag, `P(mel) >= melanoma_threshold`; False without a melanoma class, and None
        (no verdict at all) for an image that is clearly not dermoscopy."""
        if self.warning:
            return None
        p_mel = self.melanoma_probability
        return bool(p_mel is not None and p_mel >= self.melanoma_threshold)

    @property
    def above_balanced(self) -> bool | None:
        """P(mel) at or above the model's balanced operating point; None without one, without a
        melanoma class, or for an image that is clearly not dermoscopy."""
        p_mel = self.melanoma_probability
        if self.warning or self.operating_points is None or p_mel is None:
            return None
        return bool(p_mel >= self.operating_points.balanced.threshold)

    @property
    def warning(self) -> str | None:
        """Why the scores are not meaningful when the OOD detector clearly flags the image, else None."""
        return self.ood.reason if self.ood is not None and self.ood.not_dermoscopy else None

    @property
    def caution(self) -> str | None:
        """Why the scores need extra caution when the image is borderline out of distribution, else None
        (the scores and the melanoma flag still stand)."""
        return self.ood.reason if self.ood is not None and self.ood.possibly_not_dermoscopy else None

    def to_json(self) -> dict[str, Any]:
        """The JSON record (REST `from_task`, Gradio JSON output).

        `warning`: the scores mean nothing for this image (clearly not dermoscopy), so
        `prediction.melanoma` is null (no flag either way); `caution`: it may not be dermoscopy, the
        scores stand with a caution (both None for dermoscopy or without a detector).
        Models with extra heads add `heads` ({head: {label: probability}}) and, with every criterion
        head, `seven_point` (score, threshold, suggests_melanoma, criteria: {criterion: P(pattern)});
        other models' records have neither key. `explanation` only when one was computed.
        """
        result: dict[str, Any] = {
            "name": self.name,
            "probabilities": self.probabilities,
            "metadata": asdict(self.model),
            "prediction": {
                "label": self.label,
                "label_name": self.label_name,
                "probability": self.probability,
                "melanoma": self.melanoma,
                "melanoma_probability": self.melanoma_probability,
                "melanoma_threshold": self.melanoma_threshold,
                "above_balanced_threshold": self.above_balanced,
            },
        }
        heads = self.heads
        if heads is not None:
            result["heads"] = heads.probabilities
            if heads.seven_point is not None:
                seven = heads.seven_point
                result["seven_point"] = {
                    "score": seven.score,
                    "threshold": seven.threshold,
                    "suggests_melanoma": seven.suggests_melanoma,
                    "criteria": seven.criteria,
                }
        result["ood"] = self.ood.to_dict() if self.ood is not None else None
        result["warning"] = self.warning
        result["caution"] = self.caution
        if self.explanation is not None:
            result["explanation"] = self.explanation
        return result


def _parse_card(folder: Path) -> CardInfo | None:
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        card = ModelCard.load(readme)
    except Exception as err:  # malformed YAML / model-index: show the model without card data
        logger.warning("Could not parse model card %s: %s", readme, err)
        return None
    data = card.data
    datasets = data.datasets or []
    metrics: list[CardMetric] = []
    for result in data.eval_results or []:
        if isinstance(result.metric_value, (int, float)):
            name = result.metric_name or result.metric_type
            dataset = result.dataset_name or result.dataset_type
            args = dict(result.metric_args or {})
            metrics.append(CardMetric(str(name), str(result.metric_type), float(result.metric_value), str(dataset), args))
    base = data.base_model
    return CardInfo(
        license=data.license,
        datasets=[datasets] if isinstance(datasets, str) else list(datasets),
        base_model=base if isinstance(base, str) or base is None else ", ".join(base),
        metrics=metrics,
    )


def _training_sources(folder: Path) -> list[str]:
    """The source kinds (e.g. "ham10000") a multi-source model was trained on, from the
    `sources:` of the `train_config.yaml` beside its weights; [] when there is none."""
    path = folder / "train_config.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        logger.warning("Could not parse %s: %s", path, err)
        return []
    return [str(source["name"]) for source in config.get("sources") or [] if isinstance(source, dict) and "name" in source]


def _net_type(config: Any) -> str:
    if config.model_type == "timm_wrapper":
        return f"timm/{config.architecture}"
    return str(config.model_type)


class ZooModel:
    """One loaded classifier with its image processor, calibration and card metadata.

    Attributes:
        id: zoo id (folder name or Hub id); path: local folder or Hub id it was loaded from.
        net_type: "melanoma_vit", "vit", "timm/<architecture>", ... ; geometry: the processor's
            `ImageGeometry` (input size, mean, std); img_size: input height (px).
        out_dim: number of classes; id2label: index -> dx code; labels: dx code -> readable name.
        temperature: calibration temperature T still to apply (probabilities = softmax(logits / T)); 1.0
            for folded models, whose logits are already divided by theirs (`folded_temperature`, or None).
        melanoma_threshold: decision threshold on P(mel) (0.5 when the model has none).
        extra_heads: head name -> label names of a multi-source MelanomaViT's extra heads ({} for others);
        has_seven_point: whether every seven-point criterion head is there (the checklist score is computed).
        card: parsed model card, or None. training_sources: source kinds of a multi-source model's
            `train_config.yaml` (e.g. ["ham10000", "isic2017", "derm7pt"]), [] for others.
    """

    def __init__(self, model_id: str, source: str | Path, device: str | torch.device = "cpu") -> None:
        self.id = model_id
        self.path = str(source)
        self.device = torch.device(device)
        self.model, self.processor = load_classifier(source, self.device)
        self.config = self.model.config
        self.net_type = _net_type(self.config)
        self.geometry = processor_geometry(self.processor)
        self.img_size = self.geometry.size[0]
        self.id2label: dict[int, str] = {int(k): v for k, v in self.config.id2label.items()}
        self.out_dim = len(self.id2label)
        self.labels: dict[str, str] = {code: DX_NAMES.get(code, code) for code in self.id2label.values()}
        self.temperature = config_temperature(self.config) or 1.0
        self.folded_temperature = folded_temperature(self.config)
        threshold = getattr(self.config, "melanoma_threshold", None)
        self.melanoma_threshold = float(threshold) if threshold is not None else 0.5
        self.operating_points = OperatingPoints.from_config(getattr(self.config, "melanoma_operating_points", None))
        self.has_melanoma_class = MELANOMA in self.id2label.values()
        self.label2id: dict[str, int] = {code: i for i, code in self.id2label.items()}
        self.extra_heads: dict[str, list[str]] = dict(getattr(self.config, "extra_heads", None) or {})
        # The checklist reads each criterion's scoring label by its `CRITERIA_LABELS` index.
        self.has_seven_point = all(
            list(CRITERIA_LABELS[name]) == list(self.extra_heads.get(name, ())) for name in SEVEN_POINT
        )
        self.num_prefix_tokens = num_prefix_tokens(self.config)
        self.num_layers = int(getattr(self.config, "num_hidden_layers", 0) or 0)
        self.card = _parse_card(Path(source)) if Path(source).is_dir() else None
        self.training_sources = _training_sources(Path(source)) if Path(source).is_dir() else []
        self.uses_rollout = self.config.model_type in ROLLOUT_MODEL_TYPES
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------- metadata
    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def metadata(self) -> ModelMetadata:
        """What every result carries about the model: model_id, net_type, img_size, out_dim."""
        return ModelMetadata(self.id, self.net_type, self.img_size, self.out_dim)

    def describe(self) -> dict[str, Any]:
        """Everything the UI and `GET /public_models` show about the model."""
        card = self.card
        return {
            **asdict(self.metadata),
            "labels": self.labels,
            "temperature": self.temperature,
            "folded_temperature": self.folded_temperature,
            "melanoma_threshold": self.melanoma_threshold,
            "operating_points": asdict(self.operating_points) if self.operating_points else None,
            "explanation": "attention rollout" if self.uses_rollout else "Grad-CAM",
            "extra_heads": self.extra_heads,
            "num_layers": self.num_layers,
            "num_parameters": self.num_parameters,
            "license": card.license if card else None,
            "datasets": card.datasets if card else [],
            "training_sources": self.training_sources,
            "base_model": card.base_model if card else None,
            # The REST record of before (name, type, value, dataset); `args` serve the app's own labels.
            "metrics": [
                {"name": m.name, "type": m.type, "value": m.value, "dataset": m.dataset}
                for m in (card.metrics if card else [])
            ],
        }

    def result(
        self, name: str, prediction: Prediction, ood: OODResult | None = None, explanation: str | None = None
    ) -> ImageResult:
        """One image's typed result: `prediction` with this model's labels, threshold and metadata."""
        top = prediction.label
        return ImageResult(
            name=name,
            prediction=prediction,
            model=self.metadata,
            label_name=self.labels.get(top, top),
            melanoma_threshold=self.melanoma_threshold,
            ood=ood,
            explanation=explanation,
            operating_points=self.operating_points,
        )

    # ---------------------------------------------------------------------------- inference
    def _pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """list of RGB PIL images -> (B, 3, img_size, img_size) float tensor on the model device."""
        batch = self.processor(images=list(images), return_tensors="pt")
        return batch["pixel_values"].to(self.device)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, out_dim) raw logits -> (B, out_dim) float32 softmax(logits / T) on the CPU."""
        return torch.softmax(logits.float() / self.temperature, dim=-1).cpu()

    def predictions(self, outputs: Sequence[Any]) -> list[Prediction]:
        """Forward outputs of one batch -> per image calibrated dx (and extra-head) probabilities.

        Several outputs are test-time views of the same images: their calibrated probabilities are
        averaged (as train/evaluate.py averages them), head by head, before the checklist score.
        """
        dx = torch.stack([self._probabilities(output.logits) for output in outputs]).mean(dim=0).numpy()
        labels = [self.id2label[i] for i in range(self.out_dim)]
        if not self.extra_heads:
            return [Prediction(dict(zip(labels, map(float, row)))) for row in dx]
        # The model's own calibration rule, on logits we already have.
        views = [self.model.calibrated_head_probs(output.head_logits) for output in outputs]
        head_probs = {
            name: torch.stack([view[name].cpu() for view in views]).mean(dim=0).numpy() for name in views[0]
        }  # name -> (B, n_labels)
        if self.has_seven_point:
            scores = seven_point_score(head_probs)  # (B,)
            criteria = {name: criterion_probability(name, head_probs[name]) for name in SEVEN_POINT}  # name -> (B,)
        results = []
        for i, row in enumerate(dx):
            seven_point = None
            if self.has_seven_point:
                seven_point = SevenPointResult(float(scores[i]), {name: float(p[i]) for name, p in criteria.items()})
            heads = {name: dict(zip(self.extra_heads[name], map(float, probs[i]))) for name, probs in head_probs.items()}
            results.append(Prediction(dict(zip(labels, map(float, row))), HeadResults(heads, seven_point)))
        return results

    def predict(self, images: Sequence[Image.Image], batch_size: int = 32) -> list[Prediction]:
        """Per image the calibrated class probabilities (dx code -> probability, sums to 1) and, for
        multi-source models, every extra head's from the same forward pass."""
        results: list[Prediction] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(images), batch_size):
                output = self.model(pixel_values=self._pixel_values(images[start : start + batch_size]))
                results.extend(self.predictions([output]))
        return results

    def _model_view(self, pixel_values: torch.Tensor, image: Image.Image) -> np.ndarray:
        """The image as the model saw it (after resize/crop), (H, W, 3) uint8, for the overlay.

        Un-normalises `pixel_values` (1, 3, h, w); upsampled to `EXPLAIN_DISPLAY_SIDE` so a
        32-px test model still gives a viewable overlay.
        """
        x = pixel_values[0].detach().float().cpu().numpy().transpose(1, 2, 0)  # (h, w, 3)
        x = x * np.asarray(self.geometry.std, dtype=np.float32) + np.asarray(self.geometry.mean, dtype=np.float32)
        view = Image.fromarray(np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8))
        side = max(EXPLAIN_DISPLAY_SIDE, 1)
        if view.width < side:
            view = view.resize((side, round(side * view.height / view.width)), Image.Resampling.BICUBIC)
        return np.asarray(view)

    def analyze(
        self,
        image: Image.Image,
        head_fusion: str = "mean",
        discard_ratio: float = 0.9,
        start_layer: int = 0,
    ) -> Analysis:
        """Prediction (extra heads included) + explanation for one RGB image.

        ViT-like models: one forward with `output_attentions=True` gives the logits, the extra heads'
        logits and the per-layer attentions (B, heads, N, N) for attention rollout. CNNs: a Grad-CAM
        pass for the melanoma class (the verdict's number; the predicted class for a model without one),
        which needs gradients, plus the probabilities from the same logits.
        """
        from .rollout import attention_rollout, overlay_heatmap

        if head_fusion not in ("mean", "max", "min"):
            raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}.")
        if not 0.0 <= float(discard_ratio) < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}.")
        pixel_values = self._pixel_values([image])
        with self._lock:
            if self.uses_rollout:
                if not 0 <= int(start_layer) < max(self.num_layers, 1):
                    raise ValueError(f"start_layer must be in [0, {self.num_layers - 1}], got {start_layer}.")
                with torch.inference_mode():
                    out = self.model(pixel_values=pixel_values, output_attentions=True)
                token_rows = ("cls", "dist") if self.num_prefix_tokens == 2 else ("cls",)
                mask = attention_rollout(
                    out.attentions,
                    head_fusion=head_fusion,
                    discard_ratio=float(discard_ratio),
                    start_layer=int(start_layer),
                    num_prefix_tokens=self.num_prefix_tokens,
                    token_rows=token_rows,
                )[0]
                method = (
                    f"attention rollout (head fusion {head_fusion}, discard {discard_ratio:.2f}, "
                    f"from layer {int(start_layer)})"
                )
            else:
                from .gradcam import grad_cam

                with torch.inference_mode():
                    out = self.model(pixel_values=pixel_values)
                # The class of the headline number: melanoma (the top class only without one).
                if self.has_melanoma_class:
                    target, what = self.label2id[MELANOMA], "melanoma class"
                else:
                    target, what = int(out.logits.argmax(-1)[0]), "predicted class"
                mask = grad_cam(self.model, pixel_values.clone(), target=target)[0]
                method = f"Grad-CAM ({what}, last convolutional stage)"
                if not bool(mask.max() > 0):  # Grad-CAM keeps positive evidence only
                    method += f": no region raises the {what.removesuffix(' class')} score"
        mask = mask.detach().float().cpu().numpy()
        heatmap = overlay_heatmap(self._model_view(pixel_values, image), mask)
        (prediction,) = self.predictions([out])
        return Analysis(prediction.probabilities, prediction.heads, heatmap=heatmap, mask=mask, method=method)

    def explanation_overlay(self, image: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """An `analyze` mask blended over `image` at the image's own geometry.

        Processors that resize the whole image to the input size (every shipped model) stretch the
        mask back over the whole image, so a portrait upload gets a portrait overlay. A cropping
        processor's model saw only part of the image: the overlay is then drawn on that view.

        Args:
            image: the RGB image that was analysed. mask: `Analysis.mask`, (h, w) in [0, 1].
            alpha: heat-map opacity in [0, 1].

        Returns:
            (H, W, 3) uint8: H, W of `image` (of the model's view for cropping processors).
        """
        from .rollout import overlay_heatmap

        if self.geometry.crops:
            return overlay_heatmap(self._model_view(self._pixel_values([image]), image), mask, alpha)
        return overlay_heatmap(image, mask, alpha)


def _hub_ids_from_env_or_yaml(models_dir: Path) -> list[str]:
    env = os.environ.get("MELANOMA_HUB_MODELS", "")
    ids = [s.strip() for s in env.split(",") if s.strip()]
    if ids:
        return ids
    for candidate in (models_dir / "models.yaml", models_dir.parent / "models.yaml"):
        if candidate.is_file():
            import yaml

            data = yaml.safe_load(candidate.read_text()) or {}
            return [str(x) for x in data.get("hub_models", []) or []]
    return []


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hub endpoint accepts a TCP connection (False when HF_HUB_OFFLINE is set)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
    except OSError:
        return False
    return True


def is_classifier_folder(folder: Path) -> bool:
    """A model folder the zoo serves: config.json whose `architectures` is an image classifier."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    architectures = config.get("architectures") or []
    # Substring, not suffix: DeiT exports of distilled models are *ForImageClassificationWithTeacher.
    return any("ForImageClassification" in str(a) for a in architectures)


class ModelZoo:
    """Discovers, loads (once) and caches the available classifiers.

    Args:
        models_dir: folder of model folders (default `$MELANOMA_MODELS_DIR` or `<repo>/models`).
        hub_ids: Hub ids to offer (default `$MELANOMA_HUB_MODELS` or `models.yaml`).
        default: default model id (default `$MELANOMA_DEFAULT_MODEL` or the preference list).
        device: torch device for inference (default "cpu").
        ood_path: out-of-distribution detector folder (default `$MELANOMA_OOD_PATH`, else
            `model.ood`'s default `models/ood-detector`); "none" disables the check.
    """

    def __init__(
        self,
        models_dir: str | Path | None = None,
        hub_ids: Sequence[str] | None = None,
        default: str | None = None,
        device: str = "cpu",
        ood_path: str | Path | None = None,
    ) -> None:
        self.ood_path = ood_path if ood_path is not None else os.environ.get("MELANOMA_OOD_PATH")
        self.models_dir = Path(models_dir or os.environ.get("MELANOMA_MODELS_DIR") or DEFAULT_MODELS_DIR)
        self.device = device
        self._lock = threading.RLock()
        self._loaded: dict[str, ZooModel] = {}
        self.skipped: dict[str, str] = {}
        self._sources: dict[str, str] = {}
        if self.models_dir.is_dir():
            for folder in sorted(p for p in self.models_dir.iterdir() if p.is_dir()):
                if is_classifier_folder(folder):
                    self._sources[folder.name] = str(folder)
        for hub_id in hub_ids if hub_ids is not None else _hub_ids_from_env_or_yaml(self.models_dir):
            if hub_id not in self._sources:
                self._sources[hub_id] = hub_id
        self._hub_ids = [i for i, s in self._sources.items() if s == i and not Path(s).is_dir()]
        self._resolve_hub_ids()
        self._default = default or os.environ.get("MELANOMA_DEFAULT_MODEL") or None
        self._ood_loaded = False
        self._ood_score_lock = threading.Lock()
        self._ood: Any = None
        self.ood_note: str | None = None

    @property
    def ood_detector(self) -> Any:
        """The "is this dermoscopy?" detector from `model.ood`, or None when unavailable.

        Optional: without the module or its artifact the app still works, without OOD warnings;
        the reason is kept in `ood_note`.
        """
        with self._lock:
            if not self._ood_loaded:
                self._ood_loaded = True
                if isinstance(self.ood_path, str) and self.ood_path.lower() == "none":
                    self.ood_note = "Out-of-distribution check disabled (MELANOMA_OOD_PATH=none)."
                    return None
                try:
                    from .ood import load_ood_detector

                    self._ood = load_ood_detector(self.ood_path) if self.ood_path else load_ood_detector()
                except Exception as err:  # optional component: missing module or artifact
                    self.ood_note = f"Out-of-distribution check unavailable: {err}"
                    logger.warning(self.ood_note)
            return self._ood

    @ood_detector.setter
    def ood_detector(self, detector: Any) -> None:
        """Use `detector` (anything with `score(images) -> list[OODResult]`), or None for no check."""
        with self._lock:
            self._ood_loaded, self._ood = True, detector
            self.ood_note = None if detector is not None else "Out-of-distribution check disabled."

    def check_ood(self, images: Sequence[Image.Image]) -> list[OODResult | None]:
        """Per image the detector's OODResult(is_ood, score, reason), or None without a detector."""
        detector = self.ood_detector
        if detector is None:
            return [None] * len(images)
        with self._ood_score_lock:  # one shared feature extractor, built lazily by the detector
            return list(detector.score(list(images)))

    def _resolve_hub_ids(self) -> None:
        """Keep Hub ids whose config can be fetched (or is cached); note the others as skipped."""
        from transformers import AutoConfig

        if not self._hub_ids:
            return
        # One quick probe instead of huggingface_hub's retries per id (~40 s each when offline).
        local_only = not _hub_reachable()
        for hub_id in self._hub_ids:
            try:
                AutoConfig.from_pretrained(hub_id, local_files_only=local_only)
            except Exception as err:  # offline, missing, private, unknown model type
                reason = str(err).splitlines()[0][:200]
                logger.warning("Skipping Hub model %s: %s", hub_id, reason)
                self.skipped[hub_id] = reason
                self._sources.pop(hub_id, None)

    def source(self, model_id: str) -> str:
        """The local folder (or Hub id) that `model_id` loads from."""
        return self._sources[model_id]

    @property
    def ids(self) -> list[str]:
        """Ids of every usable model (local folders first, then reachable Hub ids)."""
        return list(self._sources)

    @property
    def default_id(self) -> str | None:
        """`$MELANOMA_DEFAULT_MODEL`, else the first preference match, else the first model."""
        if self._default:
            if self._default not in self._sources:
                raise UnknownModelError(
                    f"Default model {self._default!r} is not in the zoo; available: {', '.join(self.ids) or 'none'}."
                )
            return self._default
        for preference in DEFAULT_PREFERENCE:
            for model_id in self.ids:
                if model_id == preference or model_id.startswith(preference):
                    return model_id
        return self.ids[0] if self.ids else None

    def get(self, model_id: str | None = None) -> ZooModel:
        """The loaded model for `model_id` (default model when None); loads it on first use."""
        model_id = model_id or self.default_id
        if model_id is None:
            raise UnknownModelError(
                f"No models found in {self.models_dir} (folders with an image-classification config.json)."
            )
        if model_id not in self._sources:
            raise UnknownModelError(f"Unknown model {model_id!r}; available: {', '.join(self.ids) or 'none'}.")
        with self._lock:
            if model_id not in self._loaded:
                logger.info("Loading model %s from %s", model_id, self._sources[model_id])
                self._loaded[model_id] = ZooModel(model_id, self._sources[model_id], device=self.device)
            return self._loaded[model_id]
