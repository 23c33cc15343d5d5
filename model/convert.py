"""Checkpoint converters: timm ViT/DeiT -> MelanomaViT -> stock transformers ViT/DeiT; timm ResNet ->
stock transformers ResNet.

* `convert_timm_checkpoint(timm_model)`: a timm `VisionTransformer` (vit_*, deit_*) or
  `VisionTransformerDistilled` (deit_*_distilled_*) as a `MelanomaViTForImageClassification`.
* `export_to_vit(model)`: the same weights as transformers' own `ViTForImageClassification`
  (or `DeiTForImageClassificationWithTeacher` for distilled models), so a published model works with
  the Hub widget and `pipeline` without `trust_remote_code`.
* `save_vit_export(model, folder)`: writes that export in the transformers 4.x key layout
  (`vit.encoder.layer.N.attention.attention.query`, ...), which 4.x loads natively and transformers 5
  renames on load through its checkpoint conversion mapping, so one folder serves both.
  Exports carry the main (dx) head only; hybrid models (CNN stem) have no stock equivalent.
* `load_hybrid_stem_from_timm(model, timm_model)`: copies a timm EfficientNet's first stages (e.g.
  pretrained `tf_efficientnet_lite0`) into a hybrid MelanomaViT's stem.

* `convert_timm_resnet(timm_model)`: a timm `ResNet` (basic or bottleneck blocks: resnet18/34/50/101/152)
  as transformers' `ResNetForImageClassification` with equal logits.
* `save_resnet_export(model, folder)`: a `TimmWrapperForImageClassification` ResNet as a Hub-ready stock
  folder (config.json with the project's keys, model.safetensors, a `ViTImageProcessor` with the
  TimmWrapper processor's squash geometry), which `pipeline` and the Hub inference API serve without timm.

The state-dict functions are pure `dict -> dict` renamings (plus the qkv split for the export).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ResNetConfig,
    ResNetForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from . import calibration
from .configuration_melanoma_vit import DEFAULT_DX_CODES, MelanomaViTConfig
from .geometry import processor_geometry
from .modeling_melanoma_vit import MelanomaViTForImageClassification

logger = logging.getLogger(__name__)

# timm key -> MelanomaViT key, first match wins; anything unmatched is an unsupported timm feature.
_TIMM_TO_OURS: tuple[tuple[str, str], ...] = (
    (r"^cls_token$", "vit.embeddings.cls_token"),
    (r"^dist_token$", "vit.embeddings.dist_token"),
    (r"^pos_embed$", "vit.embeddings.pos_embed"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"vit.embeddings.patch_embed.proj.\1"),
    (
        r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$",
        r"vit.encoder.blocks.\1.\2.\3",
    ),
    (r"^norm\.(weight|bias)$", r"vit.norm.\1"),
    (r"^(head|head_dist)\.(weight|bias)$", r"\1.\2"),
)

_GELU_NAMES = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}

# Per-block parameter names of transformers' ViT/DeiT: transformers >= 5 layout first, then 4.x.
_HF_LAYER_PREFIX = {"v5": "{base}.layers.{i}.", "v4": "{base}.encoder.layer.{i}."}
_HF_LAYER_NAMES = {
    "v5": {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj",
           "norm1": "layernorm_before", "norm2": "layernorm_after", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    "v4": {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
           "o": "attention.output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after",
           "fc1": "intermediate.dense", "fc2": "output.dense"},
}  # fmt: skip


def timm_state_dict_to_melanoma_vit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm ViT/DeiT state dict to MelanomaViT names (tensors are shared, not copied).

    Raises:
        ValueError: for keys of timm features MelanomaViT does not implement (layer scale, register
            tokens, qk-norm, fc_norm/global average pooling, pre-norm, ...).
    """
    converted, unsupported = {}, []
    for key, tensor in state_dict.items():
        for pattern, replacement in _TIMM_TO_OURS:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            unsupported.append(key)
    if unsupported:
        raise ValueError(
            f"These timm parameters have no MelanomaViT equivalent: {unsupported[:8]}"
            f"{' ...' if len(unsupported) > 8 else ''}. Only plain ViT/DeiT (class token, learned absolute "
            "position embeddings, no layer scale / register tokens / qk-norm / fc_norm) can be converted."
        )
    return converted


def melanoma_vit_config_from_timm(timm_model: nn.Module, id2label: dict[int, str] | None = None) -> MelanomaViTConfig:
    """Build a `MelanomaViTConfig` describing a timm `VisionTransformer` / `VisionTransformerDistilled`.

    Args:
        timm_model: the timm model (any weights).
        id2label: class names for its head; default: the 7 dx codes if it has 7 classes, else LABEL_i.

    Raises:
        ValueError: when the timm model uses a variant MelanomaViT does not implement.
    """
    problems = []
    if getattr(timm_model, "cls_token", None) is None or getattr(timm_model, "pos_embed", None) is None:
        problems.append("needs a class token and learned position embeddings")
    if getattr(timm_model, "global_pool", "token") != "token":
        problems.append(f"global_pool={timm_model.global_pool!r} (only 'token' is supported)")
    if getattr(timm_model, "no_embed_class", False):
        problems.append("no_embed_class=True (DeiT-III style position embeddings)")
    if getattr(timm_model, "reg_token", None) is not None:
        problems.append("register tokens")
    for name in ("norm_pre", "fc_norm", "patch_embed.norm"):
        module = timm_model.get_submodule(name) if _has_submodule(timm_model, name) else None
        if module is not None and not isinstance(module, nn.Identity):
            problems.append(f"{name} is {type(module).__name__}, not Identity")
    if getattr(timm_model, "attn_pool", None) is not None:
        problems.append("attention pooling head")
    blocks = list(timm_model.blocks)
    block = blocks[0]
    for name in ("ls1", "ls2", "attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm"):
        if _has_submodule(block, name) and not isinstance(block.get_submodule(name), nn.Identity):
            problems.append(f"blocks.*.{name} (layer scale / qk-norm / scale-norm)")
    if type(block).__name__ != "Block" or not hasattr(block, "norm1"):
        problems.append(f"block type {type(block).__name__} (only timm's pre-norm Block)")
    act = getattr(getattr(block, "mlp", None), "act", None)
    if not isinstance(act, nn.GELU):
        problems.append(f"MLP activation {type(act).__name__} (only GELU)")
    if isinstance(getattr(timm_model, "head", None), nn.Identity):
        problems.append("no classification head (num_classes=0); create it with num_classes > 0")
    if problems:
        raise ValueError(f"Cannot convert this timm model to MelanomaViT: {'; '.join(problems)}.")

    num_classes = timm_model.num_classes
    if id2label is None:
        default_names = DEFAULT_DX_CODES if num_classes == len(DEFAULT_DX_CODES) else None
        id2label = {i: default_names[i] if default_names else f"LABEL_{i}" for i in range(num_classes)}
    if len(id2label) != num_classes:
        raise ValueError(f"id2label has {len(id2label)} entries but the timm head has {num_classes} classes.")
    return MelanomaViTConfig(
        image_size=list(timm_model.patch_embed.img_size),
        patch_size=list(timm_model.patch_embed.patch_size),
        num_channels=timm_model.patch_embed.proj.in_channels,
        hidden_size=timm_model.embed_dim,
        num_hidden_layers=len(blocks),
        num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features,
        hidden_act=_GELU_NAMES[act.approximate],
        layer_norm_eps=timm_model.norm.eps,
        qkv_bias=block.attn.qkv.bias is not None,
        use_distillation_token=getattr(timm_model, "dist_token", None) is not None,
        id2label=dict(id2label),
    )


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def convert_timm_checkpoint(
    timm_model: nn.Module, id2label: dict[int, str] | None = None
) -> MelanomaViTForImageClassification:
    """A timm ViT/DeiT (plain or distilled) as an eval-mode `MelanomaViTForImageClassification` with equal logits.

    Eval-mode logits match timm's `timm_model.eval()(x)` for inputs at the timm model's image size
    (distilled models: timm and MelanomaViT both average the two heads in eval).
    """
    config = melanoma_vit_config_from_timm(timm_model, id2label=id2label)
    model = MelanomaViTForImageClassification(config)
    model.load_state_dict(timm_state_dict_to_melanoma_vit(timm_model.state_dict()), strict=True)
    return model.eval()


def _vit_config_kwargs(config: MelanomaViTConfig) -> dict:
    return dict(
        image_size=config.image_size if isinstance(config.image_size, int) else list(config.image_size),
        patch_size=config.patch_size if isinstance(config.patch_size, int) else list(config.patch_size),
        num_channels=config.num_channels,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        layer_norm_eps=config.layer_norm_eps,
        qkv_bias=config.qkv_bias,
        initializer_range=config.initializer_range,
        problem_type=config.problem_type,
        id2label=dict(config.id2label),
        label2id=dict(config.label2id),
    )


def vit_config_from_melanoma_vit(config: MelanomaViTConfig) -> ViTConfig | DeiTConfig:
    """The stock transformers config of an export: `DeiTConfig` for distilled models, else `ViTConfig`.

    `melanoma_threshold` and `folded_temperature` are kept as extra attributes (the calibration is in the
    head weights, `model.calibration`). Extra heads are not part of the export.

    Raises:
        ValueError: for hybrid models (no stock transformers equivalent) and non-square patches.
    """
    if config.patch_embedding_type != "linear":
        raise ValueError(
            f"A patch_embedding_type={config.patch_embedding_type!r} model (CNN stem {config.backbone}) has no stock "
            "transformers ViT/DeiT equivalent; publish it with its remote code (save_pretrained) instead."
        )
    if not isinstance(config.patch_size, int) and config.patch_size[0] != config.patch_size[1]:
        raise ValueError(f"transformers' ViT needs square patches, got patch_size={config.patch_size}.")
    kwargs = _vit_config_kwargs(config)
    kwargs["patch_size"] = kwargs["patch_size"] if isinstance(kwargs["patch_size"], int) else kwargs["patch_size"][0]
    config_class = DeiTConfig if config.use_distillation_token else ViTConfig
    vit_config = config_class(**kwargs)
    vit_config.melanoma_threshold = config.melanoma_threshold
    if calibration.folded_temperature(config) is not None:
        vit_config.folded_temperature = calibration.folded_temperature(config)
    return vit_config


def melanoma_vit_state_dict_to_vit(
    state_dict: dict[str, torch.Tensor], num_hidden_layers: int, distilled: bool = False, layout: str = "v5"
) -> dict[str, torch.Tensor]:
    """Convert MelanomaViT weights to transformers' ViT (or DeiT-with-teacher when `distilled`) names.

    Args:
        state_dict: `MelanomaViTForImageClassification.state_dict()`.
        num_hidden_layers: number of blocks.
        distilled: target `DeiTForImageClassificationWithTeacher` (needs `vit.embeddings.dist_token`).
        layout: "v5" (transformers >= 5: `layers.N.attention.q_proj`) or "v4"
            (`encoder.layer.N.attention.attention.query`).

    Returns:
        A new dict; the fused qkv (3C, C) is split into query/key/value (C, C) each.
    """
    if layout not in _HF_LAYER_NAMES:
        raise ValueError(f"layout must be one of {sorted(_HF_LAYER_NAMES)}, got {layout!r}.")
    if any(key.startswith(_HYBRID_STEM_PREFIX) for key in state_dict):
        raise ValueError("This is a hybrid MelanomaViT (CNN stem): stock transformers ViT/DeiT has no equivalent.")
    if distilled != ("vit.embeddings.dist_token" in state_dict):
        raise ValueError(
            f"distilled={distilled} but the state dict {'lacks' if distilled else 'has'} a distillation token; "
            "pass distilled=config.use_distillation_token."
        )
    base = "deit" if distilled else "vit"
    out = {
        f"{base}.embeddings.cls_token": state_dict["vit.embeddings.cls_token"],
        f"{base}.embeddings.position_embeddings": state_dict["vit.embeddings.pos_embed"],
        f"{base}.embeddings.patch_embeddings.projection.weight": state_dict["vit.embeddings.patch_embed.proj.weight"],
        f"{base}.embeddings.patch_embeddings.projection.bias": state_dict["vit.embeddings.patch_embed.proj.bias"],
        f"{base}.layernorm.weight": state_dict["vit.norm.weight"],
        f"{base}.layernorm.bias": state_dict["vit.norm.bias"],
    }
    if distilled:
        out["deit.embeddings.distillation_token"] = state_dict["vit.embeddings.dist_token"]
        heads = {"cls_classifier": "head", "distillation_classifier": "head_dist"}
    else:
        heads = {"classifier": "head"}
    for target, source in heads.items():
        out[f"{target}.weight"], out[f"{target}.bias"] = state_dict[f"{source}.weight"], state_dict[f"{source}.bias"]

    names = _HF_LAYER_NAMES[layout]
    for i in range(num_hidden_layers):
        src = f"vit.encoder.blocks.{i}."
        dst = _HF_LAYER_PREFIX[layout].format(base=base, i=i)
        renames = (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "o"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))
        for ours, theirs in renames:
            for kind in ("weight", "bias"):
                out[f"{dst}{names[theirs]}.{kind}"] = state_dict[f"{src}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            if f"{src}attn.qkv.{kind}" not in state_dict:
                continue  # qkv_bias=False
            q, k, v = state_dict[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)  # 3 x (C, C) or 3 x (C,)
            for part, tensor in zip("qkv", (q, k, v)):
                out[f"{dst}{names[part]}.{kind}"] = tensor
    return out


_HYBRID_STEM_PREFIX = "vit.embeddings.patch_embed.stem."


def timm_efficientnet_state_dict_to_hybrid_stem(
    state_dict: dict[str, torch.Tensor], backbone_stage: int
) -> dict[str, torch.Tensor]:
    """Select and rename a timm EfficientNet's stem weights to hybrid MelanomaViT names (tensors shared).

    Keeps `conv_stem.*`, `bn1.*` and `blocks.i.*` for i <= `backbone_stage` (BatchNorm statistics
    included) under `vit.embeddings.patch_embed.stem.`; the later blocks and the classifier are dropped.
    """
    kept = {}
    for key, tensor in state_dict.items():
        match = re.match(r"^blocks\.(\d+)\.", key)
        if key.startswith(("conv_stem.", "bn1.")) or (match and int(match.group(1)) <= backbone_stage):
            kept[_HYBRID_STEM_PREFIX + key] = tensor
    return kept


@torch.no_grad()
def load_hybrid_stem_from_timm(model: MelanomaViTForImageClassification, timm_model: nn.Module) -> None:
    """Copy the first stages of a timm EfficientNet (e.g. pretrained `tf_efficientnet_lite0`) into the stem
    of a hybrid `model` (patch_embedding_type="hybrid", same `backbone`), in place.

    Raises:
        ValueError: for a linear model, or when the timm model's stages do not fit the stem (another backbone).
    """
    if model.config.patch_embedding_type != "hybrid":
        raise ValueError("load_hybrid_stem_from_timm needs a patch_embedding_type='hybrid' MelanomaViT.")
    stem = model.vit.embeddings.patch_embed.stem
    converted = timm_efficientnet_state_dict_to_hybrid_stem(timm_model.state_dict(), model.config.backbone_stage)
    stem_state = {key.removeprefix(_HYBRID_STEM_PREFIX): tensor for key, tensor in converted.items()}
    expected = stem.state_dict()
    mismatched = sorted(
        set(stem_state) ^ set(expected)
        | {key for key in set(stem_state) & set(expected) if stem_state[key].shape != expected[key].shape}
    )
    if mismatched:
        raise ValueError(
            f"The timm model's stages do not fit the stem of a {model.config.backbone} hybrid (mismatched: "
            f"{mismatched[:6]}{' ...' if len(mismatched) > 6 else ''}); create it with timm.create_model("
            f"{model.config.backbone!r})."
        )
    stem.load_state_dict(stem_state, strict=True)


def _installed_layout(hf_model: nn.Module, base: str) -> str:
    keys = hf_model.state_dict().keys()
    for layout, names in _HF_LAYER_NAMES.items():
        if f"{_HF_LAYER_PREFIX[layout].format(base=base, i=0)}{names['q']}.weight" in keys:
            return layout
    raise RuntimeError(f"Unrecognised parameter names in the installed transformers {type(hf_model).__name__}.")


def _to_export(model: MelanomaViTForImageClassification) -> MelanomaViTForImageClassification:
    """`model`, or, when built from an older config with temperatures still to apply (not loaded, which
    migrates), a copy with them folded into the heads (`calibration.migrate`)."""
    if model.config.extra_heads:
        logger.warning(
            "The stock transformers export keeps only the main (dx) head; the extra heads %s are dropped.",
            list(model.config.extra_heads),
        )
    if not calibration.unfolded_temperatures(model.config):
        return model
    model = copy.deepcopy(model)
    calibration.migrate(model)
    return model


def _export_state_dict(model: MelanomaViTForImageClassification, layout: str) -> dict:
    return melanoma_vit_state_dict_to_vit(
        dict(model.state_dict()), model.config.num_hidden_layers, distilled=model.config.use_distillation_token,
        layout=layout,
    )


def export_to_vit(
    model: MelanomaViTForImageClassification,
) -> ViTForImageClassification | DeiTForImageClassificationWithTeacher:
    """The same network as a stock transformers model (no remote code), in eval mode.

    Plain models become `ViTForImageClassification`; distilled models (`use_distillation_token`) become
    `DeiTForImageClassificationWithTeacher`, which like MelanomaViT averages its CLS and distillation
    heads at inference. A calibration is in the head weights (`config.folded_temperature`), so it exports
    with them: every softmax over the stock model's logits (pipeline, Hub widget) is calibrated.

    Logits match MelanomaViT at the configured image size; other sizes interpolate position embeddings
    differently in transformers' ViT.
    """
    model = _to_export(model)
    vit_config = vit_config_from_melanoma_vit(model.config)
    distilled = model.config.use_distillation_token
    hf_class = DeiTForImageClassificationWithTeacher if distilled else ViTForImageClassification
    hf_model = hf_class(vit_config)
    layout = _installed_layout(hf_model, "deit" if distilled else "vit")
    hf_model.load_state_dict(_export_state_dict(model, layout), strict=True)
    return hf_model.to(model.dtype).eval()


def save_vit_export(model: MelanomaViTForImageClassification, folder: str | Path) -> Path:
    """Write `export_to_vit(model)` to `folder` (config.json + model.safetensors) in the 4.x key layout.

    transformers 4.x reads these names directly and transformers 5 converts them on load (its
    "ViTModel" checkpoint conversion mapping), so the folder loads with
    `AutoModelForImageClassification.from_pretrained(folder)` in both, without remote code.
    Save an image processor (e.g. `ViTImageProcessor`) next to it for `pipeline`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = _to_export(model)
    vit_config = vit_config_from_melanoma_vit(model.config)
    vit_config.architectures = [
        "DeiTForImageClassificationWithTeacher" if model.config.use_distillation_token else "ViTForImageClassification"
    ]
    vit_config.save_pretrained(folder)
    state_dict = _export_state_dict(model, "v4")
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    logger.info("Saved a stock transformers %s export to %s", vit_config.architectures[0], folder)
    return folder


# ------------------------------------------------------------------------------------------- ResNet
_BN_PARAMS = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_RESNET_KEYS: tuple[tuple[str, str], ...] = (
    (r"^conv1\.weight$", "resnet.embedder.embedder.convolution.weight"),
    (rf"^bn1\.{_BN_PARAMS}$", "resnet.embedder.embedder.normalization.{0}"),
    (r"^layer(\d+)\.(\d+)\.conv(\d)\.weight$", "resnet.encoder.stages.{0-1}.layers.{1}.layer.{2-1}.convolution.weight"),
    (rf"^layer(\d+)\.(\d+)\.bn(\d)\.{_BN_PARAMS}$", "resnet.encoder.stages.{0-1}.layers.{1}.layer.{2-1}.normalization.{3}"),
    (r"^layer(\d+)\.(\d+)\.downsample\.0\.weight$", "resnet.encoder.stages.{0-1}.layers.{1}.shortcut.convolution.weight"),
    (rf"^layer(\d+)\.(\d+)\.downsample\.1\.{_BN_PARAMS}$", "resnet.encoder.stages.{0-1}.layers.{1}.shortcut.normalization.{2}"),
    (r"^fc\.(weight|bias)$", "classifier.1.{0}"),
)  # fmt: skip


def _resnet_key(key: str) -> str | None:
    """transformers' ResNet name of a timm ResNet key; timm counts stages and convs from 1, transformers from 0."""
    for pattern, template in _RESNET_KEYS:
        match = re.match(pattern, key)
        if match:
            groups = match.groups()
            return re.sub(
                r"\{(\d)(-1)?\}",
                lambda m: str(int(groups[int(m[1])]) - 1) if m[2] else groups[int(m[1])],
                template,
            )
    return None


def timm_resnet_state_dict_to_resnet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm ResNet state dict to transformers' `ResNetForImageClassification` names (tensors shared).

    `layer{s}.{b}.conv{i}` -> `resnet.encoder.stages.{s-1}.layers.{b}.layer.{i-1}.convolution`, `bn{i}` ->
    `...normalization`, `downsample.0/1` -> `shortcut.convolution/normalization`, the stem `conv1`/`bn1` ->
    `resnet.embedder.embedder.*`, `fc` -> `classifier.1`.

    Raises:
        ValueError: for keys of timm variants transformers' ResNet does not have (deep stem, SE, ...).
    """
    converted, unsupported = {}, []
    for key, tensor in state_dict.items():
        new_key = _resnet_key(key)
        if new_key is None:
            unsupported.append(key)
        else:
            converted[new_key] = tensor
    if unsupported:
        raise ValueError(
            f"These timm parameters have no transformers ResNet equivalent: {unsupported[:8]}"
            f"{' ...' if len(unsupported) > 8 else ''}. Only the plain ResNet (7x7 stem, basic or bottleneck "
            "blocks, 1x1 strided projection shortcuts, no SE / attention) can be converted."
        )
    return converted


def resnet_config_from_timm(timm_model: nn.Module, id2label: dict[int, str] | None = None) -> ResNetConfig:
    """A transformers `ResNetConfig` describing a timm `ResNet` (resnet18/34/50/101/152 layouts).

    Args:
        timm_model: the timm model (any weights).
        id2label: class names for its head; default: the 7 dx codes if it has 7 classes, else LABEL_i.

    Raises:
        ValueError: for variants transformers' ResNet does not implement: deep stems (resnet*d), average-pool
            shortcuts, grouped or wide bottlenecks (resnext, wide_resnet), SE / anti-aliasing, dilation,
            activations other than ReLU, another global pooling, no head.
    """
    from timm.models.resnet import BasicBlock, Bottleneck

    problems = []
    stem = timm_model.conv1
    if not isinstance(stem, nn.Conv2d) or stem.kernel_size != (7, 7) or stem.stride != (2, 2):
        problems.append("a deep or non-7x7 stem (only the single 7x7 stride-2 convolution)")
    pool = getattr(timm_model, "maxpool", None)
    if not isinstance(pool, nn.MaxPool2d) or (pool.kernel_size, pool.stride, pool.padding) != (3, 2, 1):
        problems.append("a stem pool other than 3x3 stride-2 max pooling")
    stages = [timm_model.get_submodule(f"layer{i}") for i in range(1, 5)]
    blocks = [block for stage in stages for block in stage]
    kinds = {type(block) for block in blocks}
    if kinds not in ({BasicBlock}, {Bottleneck}):
        problems.append(f"block types {sorted(k.__name__ for k in kinds)} (only BasicBlock or Bottleneck)")
    for block in blocks:
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        if any(c.groups != 1 or c.dilation != (1, 1) for c in convs):
            problems.append("grouped or dilated convolutions (resnext, output_stride < 32)")
        if getattr(block, "se", None) is not None or not isinstance(getattr(block, "aa", nn.Identity()), nn.Identity):
            problems.append("squeeze-excitation or anti-aliasing in the blocks")
        shortcut = block.downsample
        if shortcut is not None and (len(shortcut) != 2 or not isinstance(shortcut[0], nn.Conv2d)
                                     or shortcut[0].kernel_size != (1, 1)):
            problems.append("average-pool or k x k shortcuts (only a strided 1x1 convolution + BatchNorm)")
        if isinstance(block, Bottleneck) and (block.conv3.out_channels != 4 * block.conv1.out_channels
                                              or block.conv1.stride != (1, 1)):
            problems.append("a bottleneck whose width is not a quarter of its output or strided in its 1x1 convolution")
        norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
        if any(n.eps != 1e-5 for n in [*norms, timm_model.bn1]):
            problems.append("BatchNorm eps other than 1e-5")
    acts = [timm_model.act1, *(m for block in blocks for name, m in block.named_children() if name.startswith("act"))]
    if any(not isinstance(act, nn.ReLU) for act in acts):
        problems.append("an activation other than ReLU")
    if getattr(timm_model.global_pool, "pool_type", "avg") != "avg":
        problems.append(f"global pooling {timm_model.global_pool.pool_type!r} (only average)")
    if not isinstance(getattr(timm_model, "fc", None), nn.Linear):
        problems.append("no classification head (num_classes=0); create it with num_classes > 0")
    if problems:
        raise ValueError(f"Cannot convert this timm model to transformers' ResNet: {'; '.join(dict.fromkeys(problems))}.")

    num_classes = timm_model.num_classes
    if id2label is None:
        default_names = DEFAULT_DX_CODES if num_classes == len(DEFAULT_DX_CODES) else None
        id2label = {i: default_names[i] if default_names else f"LABEL_{i}" for i in range(num_classes)}
    if len(id2label) != num_classes:
        raise ValueError(f"id2label has {len(id2label)} entries but the timm head has {num_classes} classes.")
    last_conv = "conv3" if kinds == {Bottleneck} else "conv2"
    return ResNetConfig(
        num_channels=stem.in_channels,
        embedding_size=stem.out_channels,
        hidden_sizes=[stage[0].get_submodule(last_conv).out_channels for stage in stages],
        depths=[len(stage) for stage in stages],
        layer_type="bottleneck" if kinds == {Bottleneck} else "basic",
        hidden_act="relu",
        downsample_in_first_stage=False,  # timm's layer1 keeps the stem's resolution
        downsample_in_bottleneck=False,  # timm strides a bottleneck's 3x3 convolution
        id2label={int(i): str(name) for i, name in id2label.items()},
        label2id={str(name): int(i) for i, name in id2label.items()},
    )


def convert_timm_resnet(timm_model: nn.Module, id2label: dict[int, str] | None = None) -> ResNetForImageClassification:
    """A timm ResNet as an eval-mode transformers `ResNetForImageClassification` with equal logits (any input size)."""
    model = ResNetForImageClassification(resnet_config_from_timm(timm_model, id2label=id2label))
    model.load_state_dict(timm_resnet_state_dict_to_resnet(timm_model.state_dict()), strict=True)
    return model.to(next(timm_model.parameters()).dtype).eval()


def resnet_image_processor(timm_processor) -> ViTImageProcessor:
    """A stock `ViTImageProcessor` with the geometry of a `TimmWrapperImageProcessor` (`model.geometry`).

    The project's timm folders squash the whole image to the input size (crop_mode "squash", crop_pct 1),
    which is exactly what `ViTImageProcessor` does: resize to (H, W) with the same PIL filter, rescale
    by 1/255, normalise with the same mean and std.

    Raises:
        ValueError: for a processor that crops or keeps the aspect ratio (no squash-resize equivalent).
    """
    data = timm_processor.data_config
    geometry = processor_geometry(timm_processor)
    if data.get("crop_mode", "center") != "squash" or geometry.crops:
        raise ValueError(
            f"The timm processor resizes with crop_mode={data.get('crop_mode')!r}, crop_pct={data.get('crop_pct')}: "
            "only a squash resize of the whole image (crop_mode 'squash', crop_pct 1.0) has a ViTImageProcessor "
            "equivalent."
        )
    height, width = geometry.size
    return ViTImageProcessor(
        do_resize=True,
        size={"height": height, "width": width},
        resample=int(Image.Resampling[geometry.interpolation.upper()]),
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(geometry.mean),
        image_std=list(geometry.std),
    )


# What a TimmWrapper config.json holds that the stock folder expresses otherwise: the timm description
# (architecture, pretrained_cfg -> preprocessor_config.json) and the labels (label_names -> id2label).
_TIMM_ONLY_KEYS = frozenset(TimmWrapperConfig().to_dict()) | {"pretrained_cfg"}


def project_config_keys(config: TimmWrapperConfig) -> dict:
    """The keys this project adds to a model's config (calibration record, thresholds, operating points,
    decision offsets and rule, ...): everything `TimmWrapperConfig` itself does not define."""
    return {key: value for key, value in config.to_dict().items() if key not in _TIMM_ONLY_KEYS}


def save_resnet_export(model: TimmWrapperForImageClassification, folder: str | Path) -> Path:
    """Write a TimmWrapper ResNet as a stock transformers ResNet folder: config.json, model.safetensors,
    preprocessor_config.json.

    The config is a `ResNetConfig` with the wrapper's labels as id2label/label2id and every project key
    of the wrapper's config (`project_config_keys`: folded_temperature, melanoma_threshold,
    melanoma_operating_points, dx_decision_offsets, ...); the processor is `resnet_image_processor` of
    the wrapper's own. A temperature still to apply is folded into the head first (`fold_temperature`),
    so a plain softmax of the logits (pipeline, Hub widget) is calibrated. Logits equal the wrapper's on
    the same pixels (`convert_timm_resnet`); `AutoModelForImageClassification`, `AutoImageProcessor` and
    `pipeline` load the folder without timm.
    """
    from .baselines import create_image_processor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if calibration.unfolded_temperatures(model.config):
        model = calibration.fold_temperature(copy.deepcopy(model))
    id2label = {int(i): name for i, name in model.config.id2label.items()}
    resnet = convert_timm_resnet(model.timm_model, id2label=id2label)
    for key, value in project_config_keys(model.config).items():
        setattr(resnet.config, key, value)
    resnet.save_pretrained(folder)
    resnet_image_processor(create_image_processor(model)).save_pretrained(folder)
    logger.info("Saved a stock transformers ResNetForImageClassification export to %s", folder)
    return folder


__all__ = [
    "convert_timm_checkpoint",
    "convert_timm_resnet",
    "project_config_keys",
    "resnet_config_from_timm",
    "resnet_image_processor",
    "save_resnet_export",
    "timm_resnet_state_dict_to_resnet",
    "export_to_vit",
    "load_hybrid_stem_from_timm",
    "melanoma_vit_config_from_timm",
    "melanoma_vit_state_dict_to_vit",
    "save_vit_export",
    "timm_efficientnet_state_dict_to_hybrid_stem",
    "timm_state_dict_to_melanoma_vit",
    "vit_config_from_melanoma_vit",
]
