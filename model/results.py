"""Typed results: what a classifier returns for one image, and what a model card says.

A `Prediction` (and an explanation's `Analysis`) comes out of `model.classifier.Classifier`; the
app wraps it into an `ImageResult` with the model's metadata, threshold and OOD check, which
becomes JSON only at the REST / Gradio boundary (`ImageResult.to_json`) and a CSV row in
`model.records`. `CardInfo` is the catalogue's reading of a model card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .labels import MELANOMA
from .sevenpoint import MELANOMA_SCORE_THRESHOLD

if TYPE_CHECKING:  # the detector is optional at run time (its module pulls in timm)
    import torch

    from .ood import OODResult


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
    # Source kinds (e.g. "ham10000") of a multi-source model's `train_config.yaml`, [] for others.
    training_sources: list[str] = field(default_factory=list)


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
class BatchProbabilities:
    """A batch's calibrated probabilities, head by head: each head's softmax (temperatures are folded into the
    weights), averaged over the test-time views. What `Classifier.predict_proba` returns for preprocessed
    pixels or cached stem features, and what a `Prediction` per image is made of."""

    dx: torch.Tensor  # (B, out_dim) float32 on the CPU, columns in id2label order
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # extra head -> (B, n_labels), config order


@dataclass
class HeadResults:
    """A multi-source model's extra heads for one image (`config.extra_heads`)."""

    probabilities: dict[str, dict[str, float]]  # head -> {label: softmax(head logits)}, calibrated heads
    seven_point: SevenPointResult | None = None  # only when the model has every criterion head


@dataclass
class Prediction:
    """One image's calibrated dx probabilities, plus its extra heads' when the model has them."""

    probabilities: dict[str, float]  # dx code -> softmax(logits) of the calibrated head, sums to 1
    heads: HeadResults | None = None
    decision: str | None = None  # the top class by the model's decision rule (model.decision); None: argmax

    @property
    def label(self) -> str:
        """The top dx code: the model's decision (logit-adjusted when its config says so), else the argmax."""
        return self.decision or self.most_probable

    @property
    def most_probable(self) -> str:
        """The dx code with the highest probability (the decision may name a rarer class)."""
        return max(self.probabilities, key=self.probabilities.__getitem__)


@dataclass(kw_only=True)
class Analysis(Prediction):
    """One image's prediction and explanation from a single forward pass where possible."""

    heatmap: np.ndarray  # (H, W, 3) uint8 overlay on the model's view of the image
    mask: np.ndarray  # (h, w) float32 in [0, 1], on the model's input grid; see `Classifier.explanation_overlay`
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
class MetadataScore:
    """P(melanoma) from the image and the patient's age / sex / site (`model.metadata_model`)."""

    inputs: dict[str, Any]  # age, sex, site as given (None: unknown)
    probability: float
    threshold: float | None  # its own threshold (95 % validation sensitivity), None when not fitted

    @property
    def above_threshold(self) -> bool | None:
        return None if self.threshold is None else bool(self.probability >= self.threshold)


@dataclass
class ImageResult:
    """One image's result as it travels from the classifier through the app; JSON only via `to_json`
    (REST responses, the Gradio JSON output); batch CSV rows read the attributes."""

    name: str
    prediction: Prediction
    model: ModelMetadata
    label_name: str  # readable name of `label`
    melanoma_threshold: float  # decision threshold on P(mel)
    ood: OODResult | None = None  # None without an OOD detector
    explanation: str | None = None  # the explanation method, when one was computed
    operating_points: OperatingPoints | None = None  # None for a model without them
    with_metadata: MetadataScore | None = None  # P(mel) with age / sex / site, when given and the model has it
    views: int = 1  # test-time views the probabilities averaged (threshold and operating points fitted for them)

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
        `with_metadata` (inputs, probability, threshold, above_threshold) only when the caller gave
        age / sex / site, the model has a fitted metadata regression and the image is not flagged as
        clearly not dermoscopy.
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
                "views": self.views,
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
        if self.with_metadata is not None and not self.warning:
            result["with_metadata"] = {
                **asdict(self.with_metadata), "above_threshold": self.with_metadata.above_threshold,
            }
        result["ood"] = self.ood.to_dict() if self.ood is not None else None
        result["warning"] = self.warning
        result["caution"] = self.caution
        if self.explanation is not None:
            result["explanation"] = self.explanation
        return result
