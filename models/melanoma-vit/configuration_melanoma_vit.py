"""Configuration of MelanomaViT, a ViT/DeiT image classifier written for the Hugging Face ecosystem.

This file ships to the Hub as remote code next to ``modeling_melanoma_vit.py``: it must only import
torch/transformers and sibling files by relative import, never other modules of this project.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Copy of model/labels.py::DX_CODES (HAM10000 `dx` codes, the class index order of every 7-class
# model). Copied rather than imported so the remote-code folder is self-contained; a test keeps
# the two in sync.
DEFAULT_DX_CODES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu", "swish")
_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
PATCH_EMBEDDING_TYPES = ("linear", "hybrid")
# Output stride of the hybrid stem's feature map, so the patch size a hybrid model must declare.
HYBRID_PATCH_SIZE = 16
# Names an extra head may not take: the main head's name in `predict_heads` and the output field.
_RESERVED_HEAD_NAMES = ("dx", "logits")
_HEAD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# config.json keys of the removed unfolded calibration form (a temperature still to divide the logits by).
# A config that has them is migrated once at load: see `MelanomaViTConfig.unfolded_temperatures`.
UNFOLDED_TEMPERATURE_KEYS = ("temperature", "head_temperatures")


def _as_pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}.")


class MelanomaViTConfig(PretrainedConfig):
    r"""Configuration of [`MelanomaViTModel`] / [`MelanomaViTForImageClassification`].

    Field names follow transformers' `ViTConfig`, so a ViT-S/16 is
    `MelanomaViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)`.

    Args:
        image_size: Input resolution (pixels) the position embeddings are learned for; int or (H, W).
            Other sizes work through bicubic interpolation of the position embeddings.
        patch_size: Side of the square patches (pixels); int or (H, W). Must divide `image_size`.
        num_channels: Input channels (3 for RGB).
        hidden_size: Token width C. Must be divisible by `num_attention_heads`.
        num_hidden_layers: Number of pre-norm transformer blocks.
        num_attention_heads: Attention heads per block.
        intermediate_size: Hidden width of the MLP in each block.
        hidden_act: MLP activation, a transformers `ACT2FN` name ("gelu" is the exact GELU used by timm).
        hidden_dropout_prob: Dropout after the position embeddings, the attention projection and the MLP.
        attention_probs_dropout_prob: Dropout on the attention weights.
        layer_norm_eps: LayerNorm epsilon (timm ViT/DeiT use 1e-6).
        qkv_bias: Whether the fused query/key/value projection has a bias.
        drop_path_rate: Stochastic-depth rate of the last block; block i uses `rate * i / (L - 1)`.
        use_distillation_token: Add a DeiT distillation token (token order `[CLS, DIST, patches]`) and
            a second head.
        initializer_range: Std of the truncated normal used to initialise weights.
        melanoma_threshold: Decision threshold on P(mel) chosen on validation data, or None.
        extra_heads: Optional ordered mapping head name -> label names (at least 2) of further linear
            classification heads on the CLS token, e.g. one per extra dataset or per seven-point-checklist
            criterion: `{"pigment_network": ["absent", "typical", "atypical"]}`. Names are identifiers,
            not "dx" or "logits". The main head (`logits`, `id2label`) is unaffected.
        folded_temperature: The calibration temperature fitted on validation data, already folded into the
            main head(s) (weights and bias divided by it, so `softmax(logits)` is calibrated), kept for the
            record; None when none is folded. The only stored calibration form: older configs that store
            `temperature` / `head_temperatures` still to apply are migrated once at load
            (`MelanomaViTForImageClassification.from_pretrained` folds them into the heads).
        folded_head_temperatures: The same per extra head, or None.
        patch_embedding_type: "linear" (ViT patches: one strided convolution) or "hybrid" (the ViT paper's
            hybrid: a CNN stem's stride-16 feature map, projected by a 1x1 convolution, gives the tokens;
            `patch_size` must then be 16).
        backbone: timm model name of the hybrid stem, an EfficientNet such as "tf_efficientnet_lite0".
        backbone_stage: Index into the timm model's `blocks` whose output is the stride-16 feature map
            (4 for tf_efficientnet_lite0/1/2).
        backbone_channels: Channels of that feature map (112 for tf_efficientnet_lite0/1, 120 for lite2);
            checked against timm when the model is built.
        problem_type: As in transformers: "regression", "single_label_classification" or
            "multi_label_classification"; None infers it from `num_labels` and the labels' dtype.
        id2label / label2id: Class names; default: the 7 HAM10000 dx codes.

    Attributes:
        unfolded_temperatures: {"temperature": T, "head_temperatures": {name: T}} read from an older config.json
            and not folded yet ({} for the stored form); never serialised. `from_pretrained` of the model folds
            them into the head weights (and empties this), so saving the model stores the migrated form.
    """

    model_type = "melanoma_vit"

    # Declared as fields so transformers >= 5 (dataclass configs) serialises them as model fields.
    image_size: int | list[int] = 224
    patch_size: int | list[int] = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    use_distillation_token: bool = False
    initializer_range: float = 0.02
    melanoma_threshold: float | None = None
    extra_heads: dict[str, list[str]] | None = None
    folded_temperature: float | None = None
    folded_head_temperatures: dict[str, float] | None = None
    patch_embedding_type: str = "linear"
    backbone: str | None = None
    backbone_stage: int | None = None
    backbone_channels: int | None = None

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        use_distillation_token: bool = False,
        initializer_range: float = 0.02,
        melanoma_threshold: float | None = None,
        extra_heads: dict[str, list[str]] | None = None,
        folded_temperature: float | None = None,
        folded_head_temperatures: dict[str, float] | None = None,
        patch_embedding_type: str = "linear",
        backbone: str | None = None,
        backbone_stage: int | None = None,
        backbone_channels: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Before the base __init__: transformers 5 silently drops an undeclared `temperature` (a generation
        # parameter), which would change an older folder's probabilities without a word.
        unfolded = {key: kwargs.pop(key) for key in UNFOLDED_TEMPERATURE_KEYS if key in kwargs}
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = dict(enumerate(DEFAULT_DX_CODES))
        self.image_size = list(image_size) if isinstance(image_size, (tuple, list)) else image_size
        self.patch_size = list(patch_size) if isinstance(patch_size, (tuple, list)) else patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.drop_path_rate = drop_path_rate
        self.use_distillation_token = use_distillation_token
        self.initializer_range = initializer_range
        self.melanoma_threshold = melanoma_threshold
        if isinstance(extra_heads, dict):
            # Lists, as JSON gives them back, so a saved and a loaded config compare equal.
            extra_heads = {name: list(v) if isinstance(v, tuple) else v for name, v in extra_heads.items()}
        self.extra_heads = extra_heads or None
        self.folded_temperature = folded_temperature
        self.folded_head_temperatures = folded_head_temperatures or None
        self.patch_embedding_type = patch_embedding_type
        self.backbone = backbone
        self.backbone_stage = backbone_stage
        self.backbone_channels = backbone_channels
        super().__init__(**kwargs)
        self.unfolded_temperatures = _unfolded(unfolded.get("temperature"), unfolded.get("head_temperatures"))
        if self.id2label is not None and not self.label2id:
            self.label2id = {label: int(i) for i, label in self.id2label.items()}
        self._validate_melanoma_vit()

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: CLS (+ DIST when `use_distillation_token`)."""
        return 2 if self.use_distillation_token else 1

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) at the native `image_size`."""
        (ih, iw), (ph, pw) = _as_pair(self.image_size, "image_size"), _as_pair(self.patch_size, "patch_size")
        return ih // ph, iw // pw

    def _validate_melanoma_vit(self) -> None:
        """Raise ValueError naming the field to change when the combination cannot build a model."""
        for name in ("num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); change one of them (e.g. hidden_size="
                f"{self.num_attention_heads * max(1, round(self.hidden_size / self.num_attention_heads))})."
            )
        image, patch = _as_pair(self.image_size, "image_size"), _as_pair(self.patch_size, "patch_size")
        if min(image) <= 0 or min(patch) <= 0:
            raise ValueError(f"image_size ({image}) and patch_size ({patch}) must be positive.")
        if image[0] % patch[0] or image[1] % patch[1]:
            raise ValueError(
                f"image_size {image} must be divisible by patch_size {patch}; change image_size to a multiple "
                f"of the patch size (e.g. {patch[0] * max(1, image[0] // patch[0])})."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}.")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}.")
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range <= 0:
            raise ValueError(f"initializer_range must be > 0, got {self.initializer_range!r}.")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}.")
        folded = self.folded_temperature
        if folded is not None and (isinstance(folded, bool) or not isinstance(folded, (int, float)) or folded <= 0):
            raise ValueError(f"folded_temperature must be None or a float > 0, got {folded!r}.")
        threshold = self.melanoma_threshold
        if threshold is not None and (not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0):
            raise ValueError(f"melanoma_threshold must be None or a probability in [0, 1], got {threshold!r}.")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}.")
        if self.problem_type is not None and self.problem_type not in _PROBLEM_TYPES:
            raise ValueError(f"problem_type must be None or one of {_PROBLEM_TYPES}, got {self.problem_type!r}.")
        self._validate_extra_heads()
        self._validate_patch_embedding()

    def _validate_extra_heads(self) -> None:
        heads = self.extra_heads or {}
        if not isinstance(heads, dict):
            raise ValueError(f"extra_heads must be None or a dict head name -> label names, got {heads!r}.")
        for name, labels in heads.items():
            # ModuleDict methods (keys, items, update, ...) cannot be module names either.
            valid = isinstance(name, str) and _HEAD_NAME.match(name) and name not in _RESERVED_HEAD_NAMES
            if not valid or hasattr(nn.ModuleDict, name):
                raise ValueError(
                    f"extra_heads name {name!r} is not allowed: use an identifier (letters, digits, _) other than "
                    f"{_RESERVED_HEAD_NAMES} and nn.ModuleDict attribute names, e.g. 'pigment_network'."
                )
            if (
                not isinstance(labels, list)
                or len(labels) < 2
                or not all(isinstance(label, str) for label in labels)
                or len(set(labels)) != len(labels)
            ):
                raise ValueError(
                    f"extra_heads[{name!r}] must list at least 2 distinct label names (strings), got {labels!r}."
                )
        pending = {"head_temperatures": self.unfolded_temperatures.get("head_temperatures")}
        for field in ("head_temperatures", "folded_head_temperatures"):
            temperatures = pending[field] if field in pending else getattr(self, field)
            temperatures = temperatures or {}
            if not isinstance(temperatures, dict):
                raise ValueError(f"{field} must be None or a dict head name -> T, got {temperatures!r}.")
            for name, value in temperatures.items():
                if name not in heads:
                    raise ValueError(f"{field} names {name!r}, which is not in extra_heads {list(heads)}.")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"{field}[{name!r}] must be a float > 0, got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        """transformers' serialisation, without `unfolded_temperatures` (the model's load folds them)."""
        output = super().to_dict()
        output.pop("unfolded_temperatures", None)
        return output

    def _validate_patch_embedding(self) -> None:
        if self.patch_embedding_type not in PATCH_EMBEDDING_TYPES:
            raise ValueError(
                f"patch_embedding_type must be one of {PATCH_EMBEDDING_TYPES}, got {self.patch_embedding_type!r}."
            )
        if self.patch_embedding_type == "linear":
            return
        if _as_pair(self.patch_size, "patch_size") != (HYBRID_PATCH_SIZE, HYBRID_PATCH_SIZE):
            raise ValueError(
                f"patch_embedding_type='hybrid' needs patch_size={HYBRID_PATCH_SIZE} (the stem's output stride), "
                f"got {self.patch_size!r}."
            )
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(
                "patch_embedding_type='hybrid' needs backbone, a timm EfficientNet name such as "
                f"'tf_efficientnet_lite0', got {self.backbone!r}."
            )
        for name in ("backbone_stage", "backbone_channels"):
            value = getattr(self, name)
            minimum = 0 if name == "backbone_stage" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"patch_embedding_type='hybrid' needs {name} as an int >= {minimum} (tf_efficientnet_lite0: "
                    f"backbone_stage=4, backbone_channels=112), got {value!r}."
                )


def _unfolded(temperature: Any, head_temperatures: Any) -> dict[str, Any]:
    """An older config's temperatures still to apply, {} when there are none (T = 1.0 and no head T)."""
    unfolded: dict[str, Any] = {}
    if temperature is not None and temperature != 1.0:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature (an older config's calibration) must be a float > 0, got {temperature!r}.")
        unfolded["temperature"] = float(temperature)
    if head_temperatures:
        unfolded["head_temperatures"] = dict(head_temperatures)
    if unfolded:
        logger.warning(
            "This MelanomaViT config.json stores calibration temperatures still to apply (%s), a form this code no "
            "longer applies: MelanomaViTForImageClassification.from_pretrained folds them into the head weights. "
            "Save the loaded model (save_pretrained) to store the migrated form.",
            unfolded,
        )
    return unfolded
