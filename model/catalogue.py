"""The catalogue: which classifiers exist, their model-card metadata, each loaded once.

Sources of models (all must load with `AutoModelForImageClassification`):
- every folder under `models/` (or `$MELANOMA_MODELS_DIR`) with a `config.json` whose
  `architectures` is an image classifier (other artifacts, e.g. `models/ood-detector/`, are skipped);
- Hub ids from `$MELANOMA_HUB_MODELS` (comma-separated) or the `hub_models:` list of a
  `models.yaml` beside `models/`. A Hub id that cannot be reached (offline, private, missing)
  is skipped and listed in `ModelCatalogue.skipped` with the reason, so the UI can say so.

Loaded classifiers (`model.classifier.Classifier`) are cached; loading is guarded by a lock because
the Gradio worker threads and the REST background worker share the catalogue. Used by the app.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .classifier import Classifier
from .results import CardInfo, CardMetric

if TYPE_CHECKING:  # the detector is optional at run time (its module pulls in timm)
    from .ood import OODResult

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS_DIR = ROOT / "models"
# Default model preference: the first id equal to or starting with one of these wins. The best
# measured model comes first (see the README's results table); the ViT is one click away.
DEFAULT_PREFERENCE: tuple[str, ...] = ("efficientnet-lite2", "melanoma-vit-hybrid", "melanoma-vit")


class UnknownModelError(KeyError):
    """The requested model id is not in the catalogue (or could not be loaded)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown model"


def parse_card(folder: Path) -> CardInfo | None:
    """The model card (`README.md`) beside a model's weights, with its training sources; None without a card."""
    readme = folder / "README.md"
    sources = training_sources(folder)
    if not readme.is_file():
        return CardInfo(training_sources=sources) if sources else None
    try:
        from huggingface_hub import ModelCard

        card = ModelCard.load(readme)
    except Exception as err:  # malformed YAML / model-index: show the model without card data
        logger.warning("Could not parse model card %s: %s", readme, err)
        return CardInfo(training_sources=sources) if sources else None
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
        training_sources=sources,
    )


def training_sources(folder: Path) -> list[str]:
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
    """A model folder the catalogue serves: config.json whose `architectures` is an image classifier."""
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


class ModelCatalogue:
    """Discovers, loads (once) and caches the available classifiers.

    Args:
        models_dir: folder of model folders (default `$MELANOMA_MODELS_DIR` or `<repo>/models`).
        hub_ids: Hub ids to offer (default `$MELANOMA_HUB_MODELS` or `models.yaml`).
        default: default model id (default `$MELANOMA_DEFAULT_MODEL` or the preference list).
        device: torch device for inference (default "cpu").
        ood_path: out-of-distribution detector folder (default `$MELANOMA_OOD_PATH`, else
            `model.ood`'s default `models/ood-detector`); "none" disables the check.
        backend: inference backend of every model (default `$MELANOMA_BACKEND`, else "auto": the
            folder's fastest that meets the accuracy bar; see `model.onnx_backend`).
    """

    def __init__(
        self,
        models_dir: str | Path | None = None,
        hub_ids: Sequence[str] | None = None,
        default: str | None = None,
        device: str = "cpu",
        ood_path: str | Path | None = None,
        backend: str | None = None,
    ) -> None:
        self.ood_path = ood_path if ood_path is not None else os.environ.get("MELANOMA_OOD_PATH")
        self.models_dir = Path(models_dir or os.environ.get("MELANOMA_MODELS_DIR") or DEFAULT_MODELS_DIR)
        self.device = device
        self.backend = backend or os.environ.get("MELANOMA_BACKEND") or "auto"
        self._lock = threading.RLock()
        self._loaded: dict[str, Classifier] = {}
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
                    f"Default model {self._default!r} is not in the catalogue; available: {', '.join(self.ids) or 'none'}."
                )
            return self._default
        for preference in DEFAULT_PREFERENCE:
            for model_id in self.ids:
                if model_id == preference or model_id.startswith(preference):
                    return model_id
        return self.ids[0] if self.ids else None

    def get(self, model_id: str | None = None) -> Classifier:
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
                source = self._sources[model_id]
                card = parse_card(Path(source)) if Path(source).is_dir() else None
                self._loaded[model_id] = Classifier(source, self.device, model_id=model_id, card=card,
                                                     backend=self.backend)
            return self._loaded[model_id]
