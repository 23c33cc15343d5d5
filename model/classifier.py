"""The one inference path: load a model folder, preprocess, forward over test-time views, calibrated
probabilities of every head, explanations. The app (through `model.catalogue`), train/evaluate.py,
train/predict.py, the benchmarks and training's distillation teachers (train/multisource.py on cached
stem features, train/train.py's pixel teacher) all score images here; `Classifier.from_model` wraps a
model already in memory.

One stored calibration form: a fitted temperature is folded into the head weights
(`model.calibration.fold_temperature`), so every head's calibrated probabilities are a plain softmax
of its logits; config.json records `folded_temperature` / `folded_head_temperatures` for the record
only. An older folder that stores a temperature still to apply is migrated at load (`model.loading`).

Backends (`model.onnx_backend`): "torch", "onnx" (the folder's fp32 ONNX graph), "onnx-int8" (its
quantized graph) or "auto" (default: the fastest measured that meets the accuracy bar, recorded by
`train/export_onnx.py` in onnx/export.json; torch for a folder without ONNX graphs). Every
prediction (predict, forward_views, analyze's probabilities) runs on the chosen backend;
explanations (attention rollout, Grad-CAM) and anything asking for attention weights run on the
PyTorch model, which is always loaded.

Inference is guarded by a lock: the Gradio worker threads and the REST background worker share
one loaded classifier. Nothing here diagnoses anything: these are research/education models.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

# Importing this module imports the `model` package, which registers MelanomaViT with the Auto classes.
from .calibration import folded_head_temperatures, folded_temperature
from .decision import balanced_scores, decision_offsets
from .geometry import processor_geometry
from .labels import CRITERIA_LABELS, DX_NAMES, MELANOMA
from .metadata_model import FIELDS, SEXES, SITES, Metadata, metadata_model
from .loading import ROLLOUT_MODEL_TYPES, load_classifier, num_prefix_tokens
from .onnx_backend import load_onnx, resolve_backend
from .results import (
    Analysis,
    BatchProbabilities,
    CardInfo,
    HeadResults,
    ImageResult,
    MetadataScore,
    ModelMetadata,
    OperatingPoints,
    Prediction,
    SevenPointResult,
)
from .sevenpoint import SEVEN_POINT, criterion_probability, seven_point_score
from .stem import stem_bypassed, stem_names
from .tta import tta_views

if TYPE_CHECKING:
    from .ood import OODResult

# Smaller model views are upsampled to this width for the explanation overlay (display only).
EXPLAIN_DISPLAY_SIDE = 224


def _net_type(config: Any) -> str:
    if config.model_type == "timm_wrapper":
        return f"timm/{config.architecture}"
    return str(config.model_type)


class Classifier:
    """One loaded classifier with its image processor and calibration.

    Args:
        source: local model folder or Hub id (anything `AutoModelForImageClassification` loads).
        device: torch device for inference.
        model_id: the id results carry (default: the folder name, or the Hub id).
        card: what the model card says (`model.catalogue` reads it), or None.
        backend: "auto", "torch", "onnx" or "onnx-int8" (module docstring); ONNX runs on the CPU.

    Attributes:
        id: model id; path: local folder or Hub id it was loaded from.
        net_type: "melanoma_vit", "vit", "timm/<architecture>", ... ; geometry: the processor's
            `ImageGeometry` (input size, mean, std); img_size: input height (px).
        out_dim: number of classes; id2label: index -> dx code; labels: dx code -> readable name.
        folded_temperature: the fitted temperature already in the main head's weights (for the
            record), or None for an uncalibrated model.
        melanoma_threshold: decision threshold on P(mel) (0.5 when the model has none).
        extra_heads: head name -> label names of a multi-source MelanomaViT's extra heads ({} for others);
        has_seven_point: whether every seven-point criterion head is there (the checklist score is computed).
    """

    def __init__(
        self,
        source: str | Path,
        device: str | torch.device = "cpu",
        model_id: str | None = None,
        card: CardInfo | None = None,
        backend: str = "auto",
    ) -> None:
        model, processor = load_classifier(source, torch.device(device))
        model_id = model_id or (Path(source).name if Path(source).is_dir() else str(source))
        self._attach(model, processor, str(source), model_id, card, backend)

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, processor: Any, model_id: str = "model", card: CardInfo | None = None
    ) -> Classifier:
        """Wrap a classifier already in memory (just trained or exported, built in a test) with its image
        processor: the same inference as a loaded folder, on the model's device. Puts `model` in eval mode
        and migrates an older calibration form (`model.calibration.migrate`), as loading does."""
        from .calibration import migrate

        migrate(model)
        classifier = cls.__new__(cls)
        classifier._attach(model.eval(), processor, model_id, model_id, card, "torch")
        return classifier

    def _attach(
        self, model: torch.nn.Module, processor: Any, path: str, model_id: str, card: CardInfo | None, backend: str
    ) -> None:
        self.path = path
        self.id = model_id
        self.model, self.processor = model, processor
        self.device = next(model.parameters()).device
        self.config = self.model.config
        self.card = card
        self.net_type = _net_type(self.config)
        self.geometry = processor_geometry(self.processor)
        self.img_size = self.geometry.size[0]
        self.id2label: dict[int, str] = {int(k): v for k, v in self.config.id2label.items()}
        self.out_dim = len(self.id2label)
        # The top-class rule (model.decision): logit-adjusted offsets, or None for the plain argmax.
        self.decision_offsets = decision_offsets(self.config, [self.id2label[i] for i in range(self.out_dim)])
        self.labels: dict[str, str] = {code: DX_NAMES.get(code, code) for code in self.id2label.values()}
        self.folded_temperature = folded_temperature(self.config)
        self.folded_head_temperatures = folded_head_temperatures(self.config)
        threshold = getattr(self.config, "melanoma_threshold", None)
        self.melanoma_threshold = float(threshold) if threshold is not None else 0.5
        self.operating_points = OperatingPoints.from_config(getattr(self.config, "melanoma_operating_points", None))
        # Thresholds for predictions averaged over test-time views (`melanoma_tta`, written by
        # train/operating_points.py --tta N): {views: (threshold, operating points)}; one view is above.
        tta = getattr(self.config, "melanoma_tta", None) or {}
        self.tta_thresholds: dict[int, tuple[float, OperatingPoints | None]] = (
            {int(tta["views"]): (float(tta["threshold"]), OperatingPoints.from_config(tta.get("operating_points")))}
            if tta else {}
        )
        # Age / sex / site as optional inputs to P(mel) (model.metadata_model), None when not fitted.
        self.metadata_model = metadata_model(self.config)
        self.has_melanoma_class = MELANOMA in self.id2label.values()
        self.label2id: dict[str, int] = {code: i for i, code in self.id2label.items()}
        self.extra_heads: dict[str, list[str]] = dict(getattr(self.config, "extra_heads", None) or {})
        # The checklist reads each criterion's scoring label by its `CRITERIA_LABELS` index.
        self.has_seven_point = all(
            list(CRITERIA_LABELS[name]) == list(self.extra_heads.get(name, ())) for name in SEVEN_POINT
        )
        self.num_prefix_tokens = num_prefix_tokens(self.config)
        self.num_layers = int(getattr(self.config, "num_hidden_layers", 0) or 0)
        self.uses_rollout = self.config.model_type in ROLLOUT_MODEL_TYPES
        # ONNX Runtime serves the CPU; a model placed on an accelerator keeps PyTorch under "auto".
        auto_torch = backend == "auto" and self.device.type != "cpu"
        self.backend = "torch" if auto_torch else resolve_backend(path, backend)
        self._onnx = None if self.backend == "torch" else load_onnx(path, self.backend, list(self.extra_heads))
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
        """Everything the UI and `GET /public_models` show about the model (card fields empty without a card)."""
        card = self.card
        return {
            **asdict(self.metadata),
            "labels": self.labels,
            "folded_temperature": self.folded_temperature,
            "melanoma_threshold": self.melanoma_threshold,
            "operating_points": asdict(self.operating_points) if self.operating_points else None,
            # views -> the threshold fitted for predictions averaged over that many test-time views
            "tta_thresholds": {views: t for views, (t, _) in self.tta_thresholds.items()},
            "explanation": "attention rollout" if self.uses_rollout else "Grad-CAM",
            "backend": self.backend,
            "extra_heads": self.extra_heads,
            # Optional age / sex / site inputs (REST /predict query parameters) when fitted, else None.
            "metadata_inputs": {"fields": list(FIELDS), "sexes": list(SEXES), "sites": list(SITES)}
            if self.metadata_model is not None else None,
            "num_layers": self.num_layers,
            "num_parameters": self.num_parameters,
            "license": card.license if card else None,
            "datasets": card.datasets if card else [],
            "training_sources": card.training_sources if card else [],
            "base_model": card.base_model if card else None,
            # The REST record of before (name, type, value, dataset); `args` serve the app's own labels.
            "metrics": [
                {"name": m.name, "type": m.type, "value": m.value, "dataset": m.dataset}
                for m in (card.metrics if card else [])
            ],
        }

    def views_for(self, requested: int) -> int:
        """The test-time views to score with when `requested` are asked for: those views when this
        model has thresholds fitted for them (`tta_thresholds`), else one view."""
        return requested if requested in self.tta_thresholds else 1

    def result(
        self, name: str, prediction: Prediction, ood: OODResult | None = None, explanation: str | None = None,
        patient: Metadata | None = None, views: int = 1,
    ) -> ImageResult:
        """One image's typed result: `prediction` with this model's labels, threshold and metadata;
        with `patient` (age / sex / site) and a fitted metadata regression, also P(mel) with them.
        `views`: how many test-time views the prediction averaged; their own threshold and operating
        points when the model has them (`tta_thresholds`), else the one-view ones."""
        threshold, points = self.tta_thresholds.get(views, (self.melanoma_threshold, self.operating_points))
        top = prediction.label
        return ImageResult(
            name=name,
            prediction=prediction,
            model=self.metadata,
            label_name=self.labels.get(top, top),
            melanoma_threshold=threshold,
            ood=ood,
            explanation=explanation,
            operating_points=points,
            views=views,
            # The regression was fitted on one-view scores: none for a prediction averaged over more.
            with_metadata=self.with_metadata(prediction, patient) if views == 1 else None,
        )

    def with_metadata(self, prediction: Prediction, patient: Metadata | None) -> MetadataScore | None:
        """P(mel) from the image and `patient`'s fields (`model.metadata_model`); None without a
        fitted regression, a melanoma class or any field given."""
        p_mel = prediction.probabilities.get(MELANOMA)
        if self.metadata_model is None or patient is None or patient.empty or p_mel is None:
            return None
        probability = float(self.metadata_model.probability(p_mel, patient)[0])
        return MetadataScore(patient.to_json(), probability, self.metadata_model.threshold)

    # ---------------------------------------------------------------------------- inference
    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """list of RGB PIL images -> (B, 3, H, W) float tensor on the model device (the model's processor)."""
        batch = self.processor(images=list(images), return_tensors="pt")
        return batch["pixel_values"].to(self.device)

    def forward_views(self, pixel_values: torch.Tensor, tta: int = 1, attentions: bool = False) -> list[Any]:
        """The model's outputs for the first `tta` dihedral views (`model.tta.tta_views`) of (B, 3, H, W)
        pixel values, identity first; with `attentions`, the identity view's output has them (rollout),
        and every view runs on PyTorch (the ONNX graphs return logits only)."""
        with self._lock:
            return self._forward_views(pixel_values, tta, attentions)

    def _forward_views(self, inputs: torch.Tensor, tta: int = 1, attentions: bool = False, pixels: bool = True) -> list[Any]:
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            # The ONNX graphs take pixel values and return logits: stem features and attentions are PyTorch's.
            if self._onnx is not None and pixels and not attentions:
                return [self._onnx(view) for view in tta_views(inputs, tta)]
            return [
                self.model(pixel_values=view, **({"output_attentions": True} if attentions and v == 0 else {}))
                for v, view in enumerate(tta_views(inputs, tta))
            ]

    def probabilities(self, outputs: Sequence[Any]) -> BatchProbabilities:
        """Forward outputs of one batch -> every head's calibrated probabilities.

        Several outputs are test-time views of the same images: their probabilities are averaged,
        head by head. Every head's weights are calibrated (folded temperature), so each probability
        is a plain softmax of that head's logits.
        """
        dx = torch.stack([_softmax(output.logits) for output in outputs]).mean(dim=0)  # (B, out_dim)
        heads = {
            name: torch.stack([_softmax(output.head_logits[name]) for output in outputs]).mean(dim=0)
            for name in self.extra_heads
        }  # name -> (B, n_labels)
        return BatchProbabilities(dx, heads)

    def predict_proba(
        self, inputs: torch.Tensor, tta: int = 1, batch_size: int = 64, features: bool = False
    ) -> BatchProbabilities:
        """Every head's calibrated probabilities for a preprocessed batch, forwarded `batch_size` rows at a time.

        Args:
            inputs: (N, 3, H, W) pixel values as `pixel_values` makes them; with `features`, the model's
                cached stem features (N, C, h, w) instead (`model.stem`, written by train/features.py),
                read with the stem bypassed; fp16 caches are cast by the model.
            tta: dihedral views averaged (pixels only: the stem is no dihedral-equivariant map, so a cached
                feature map has its one view).
        """
        if features and tta != 1:
            raise ValueError(f"cached stem features have one view: tta must be 1, got {tta}")
        if not len(inputs):
            raise ValueError("predict_proba needs at least one row")
        chunks = []
        with self._lock, stem_bypassed(self.model, stem_names(self.model) if features else ()):
            for start in range(0, len(inputs), batch_size):
                chunks.append(self.probabilities(self._forward_views(inputs[start : start + batch_size], tta,
                                                                     pixels=not features)))
        return BatchProbabilities(
            torch.cat([c.dx for c in chunks]), {name: torch.cat([c.heads[name] for c in chunks]) for name in self.extra_heads}
        )

    def predictions(self, outputs: Sequence[Any]) -> list[Prediction]:
        """Forward outputs of one batch -> per image calibrated dx (and extra-head) probabilities
        (`probabilities`), the top class by the model's decision rule and the checklist score."""
        probs = self.probabilities(outputs)
        dx = probs.dx.numpy()  # (B, out_dim)
        labels = [self.id2label[i] for i in range(self.out_dim)]
        decided = [labels[i] for i in balanced_scores(dx, self.decision_offsets).argmax(axis=1)]  # model.decision
        if not self.extra_heads:
            return [Prediction(dict(zip(labels, map(float, row))), decision=d) for row, d in zip(dx, decided)]
        head_probs = {name: p.numpy() for name, p in probs.heads.items()}  # name -> (B, n_labels)
        if self.has_seven_point:
            scores = seven_point_score(head_probs)  # (B,)
            criteria = {name: criterion_probability(name, head_probs[name]) for name in SEVEN_POINT}  # name -> (B,)
        results = []
        for i, row in enumerate(dx):
            seven_point = None
            if self.has_seven_point:
                seven_point = SevenPointResult(float(scores[i]), {name: float(p[i]) for name, p in criteria.items()})
            heads = {name: dict(zip(self.extra_heads[name], map(float, probs[i]))) for name, probs in head_probs.items()}
            results.append(Prediction(dict(zip(labels, map(float, row))), HeadResults(heads, seven_point), decided[i]))
        return results

    def predict_pixel_values(self, pixel_values: torch.Tensor, tta: int = 1) -> list[Prediction]:
        """Per image of a preprocessed (B, 3, H, W) batch: probabilities averaged over `tta` dihedral views."""
        return self.predictions(self.forward_views(pixel_values, tta))

    def predict(self, images: Sequence[Image.Image], batch_size: int = 32, tta: int = 1) -> list[Prediction]:
        """Per image the calibrated class probabilities (dx code -> probability, sums to 1) and, for
        multi-source models, every extra head's from the same forward pass; averaged over `tta`
        (1..8) dihedral views."""
        results: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            results.extend(self.predict_pixel_values(self.pixel_values(images[start : start + batch_size]), tta))
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
        tta: int = 1,
    ) -> Analysis:
        """Prediction (extra heads included) + explanation for one RGB image; the probabilities are
        averaged over `tta` dihedral views (the explanation is the identity view's).

        ViT-like models: a PyTorch forward with `output_attentions=True` gives the per-layer attentions
        (B, heads, N, N) for attention rollout. CNNs: a PyTorch Grad-CAM pass for the melanoma class (the
        verdict's number; the predicted class for a model without one), which needs gradients. The
        probabilities come from the classifier's backend, as in `predict`, so one image scores the same
        on every path.
        """
        from .rollout import attention_rollout, overlay_heatmap

        if head_fusion not in ("mean", "max", "min"):
            raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}.")
        if not 0.0 <= float(discard_ratio) < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}.")
        pixel_values = self.pixel_values([image])
        with self._lock:
            if self.uses_rollout:
                if not 0 <= int(start_layer) < max(self.num_layers, 1):
                    raise ValueError(f"start_layer must be in [0, {self.num_layers - 1}], got {start_layer}.")
                with torch.inference_mode():
                    traced = self.model(pixel_values=pixel_values, output_attentions=True)
                    out = traced if self._onnx is None else self._onnx(pixel_values)
                token_rows = ("cls", "dist") if self.num_prefix_tokens == 2 else ("cls",)
                mask = attention_rollout(
                    traced.attentions,
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
                    out = self.model(pixel_values=pixel_values) if self._onnx is None else self._onnx(pixel_values)
                # The class of the headline number: melanoma (the top class only without one).
                if self.has_melanoma_class:
                    target, what = self.label2id[MELANOMA], "melanoma class"
                else:
                    target, what = int(out.logits.argmax(-1)[0]), "predicted class"
                mask = grad_cam(self.model, pixel_values.clone(), target=target)[0]
                method = f"Grad-CAM ({what}, last convolutional stage)"
                if not bool(mask.max() > 0):  # Grad-CAM keeps positive evidence only
                    method += f": no region raises the {what.removesuffix(' class')} score"
            # The other test-time views (the identity view's output is `out`): probabilities only.
            with torch.inference_mode():
                outs = [out, *(self.model(pixel_values=view) if self._onnx is None else self._onnx(view)
                               for view in list(tta_views(pixel_values, tta))[1:])]
        mask = mask.detach().float().cpu().numpy()
        heatmap = overlay_heatmap(self._model_view(pixel_values, image), mask)
        (prediction,) = self.predictions(outs)
        return Analysis(prediction.probabilities, prediction.heads, prediction.decision, heatmap=heatmap, mask=mask,
                        method=method)

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
            return overlay_heatmap(self._model_view(self.pixel_values([image]), image), mask, alpha)
        return overlay_heatmap(image, mask, alpha)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) logits of a calibrated head -> (B, K) float32 probabilities on the CPU."""
    return torch.softmax(logits.float(), dim=-1).cpu()
