"""MelanomaViT: a ViT/DeiT image classifier for dermoscopy, written as a transformers model.

Parameter names mirror timm's `VisionTransformer` (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `head`, `head_dist`) under the
transformers prefixes `vit.embeddings` / `vit.encoder`, so timm ViT and DeiT checkpoints convert with
a pure dict -> dict renaming (see `model/convert.py`).

This file ships to the Hub as remote code: it imports only torch, transformers and (relatively) its
configuration file; timm only when a hybrid model (CNN stem, `patch_embedding_type="hybrid"`) is built.

Research/education tool only: never use its outputs for diagnosis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_melanoma_vit import HYBRID_PATCH_SIZE, MelanomaViTConfig

try:  # transformers >= 5: these skip tensors already filled from a checkpoint.
    from transformers import initialization as init
except ImportError:  # transformers 4.x initialises only missing weights, plain torch init is right there.
    from torch.nn import init

logger = logging.get_logger(__name__)

# Label value that masks a sample out of a loss (transformers' and PyTorch's cross-entropy convention).
IGNORE_INDEX = -100


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def resample_pos_embed(
    pos_embed: torch.Tensor, new_size: tuple[int, int], old_size: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """Resize learned position embeddings to another patch grid, exactly like timm's `resample_abs_pos_embed`.

    Args:
        pos_embed: (1, num_prefix_tokens + old_h * old_w, C).
        new_size: target grid (h, w) in patches.
        old_size: grid (h, w) the embeddings were learned for.
        num_prefix_tokens: leading CLS/DIST entries, copied unchanged.

    Returns:
        (1, num_prefix_tokens + h * w, C), bicubic with antialiasing, in the input dtype.
    """
    if tuple(new_size) == tuple(old_size):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)  # (1, C, h0, w0)
    grid = F.interpolate(grid, size=tuple(new_size), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)  # (1, h * w, C)
    return torch.cat([prefix, grid], dim=1)


class MelanomaViTDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample in training (timm's `DropPath`)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # (B, 1, 1)
        return x * mask.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class MelanomaViTPatchEmbeddings(nn.Module):
    """Non-overlapping patches -> patch features with one strided convolution (timm's `PatchEmbed`).

    Returns the (B, C, h, w) map rather than tokens, as timm's `PatchEmbed(output_fmt="NCHW")`: a tensor
    output is what `enable_input_require_grads()` hooks, and the map carries the grid for `MelanomaViTEmbeddings`.
    """

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__()
        self.patch_size = _pair(config.patch_size)
        self.num_channels = config.num_channels
        self.proj = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, num_channels, H, W) -> (B, C, h, w) with (h, w) = (H / patch, W / patch)."""
        _check_pixel_values(pixel_values, self.num_channels, self.patch_size, "the patch size")
        return self.proj(pixel_values)  # (B, C, h, w)


def _check_pixel_values(pixel_values: torch.Tensor, num_channels: int, stride: tuple[int, int], what: str) -> None:
    """Clear errors for input that is not (B, num_channels, H, W) with H, W multiples of `stride`."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values must have shape (batch, {num_channels}, height, width), got "
            f"{tuple(pixel_values.shape)}; preprocess images with the model's image processor."
        )
    height, width = pixel_values.shape[-2:]
    if height % stride[0] or width % stride[1]:
        raise ValueError(
            f"Image size ({height}x{width}) must be divisible by {what} {stride if stride[0] != stride[1] else stride[0]}; "
            "resize or crop the images to a multiple of it."
        )


def _create_timm_efficientnet(config: MelanomaViTConfig) -> nn.Module:
    """`config.backbone` as a randomly initialised timm EfficientNet (weights come from the checkpoint)."""
    # Imported here and inside `try` so linear models (and transformers' remote-code import check,
    # which skips `try` blocks) never need timm.
    try:
        import timm
        from timm.models.efficientnet import EfficientNet
    except ImportError as error:
        raise ImportError("patch_embedding_type='hybrid' builds its CNN stem with timm: pip install timm") from error
    backbone = timm.create_model(config.backbone, pretrained=False, in_chans=config.num_channels)
    if not isinstance(backbone, EfficientNet):
        raise ValueError(
            f"backbone {config.backbone!r} is a timm {type(backbone).__name__}; the hybrid stem needs a timm "
            "EfficientNet (conv_stem, bn1, blocks), e.g. 'tf_efficientnet_lite0'."
        )
    return backbone


class MelanomaViTHybridStem(nn.Module):
    """The first `backbone_stage + 1` stages of a timm EfficientNet: (B, num_channels, H, W) -> (B, C_b, H/16, W/16).

    Submodule names equal timm's (`conv_stem`, `bn1`, `blocks.i.j....`), so timm weights copy in by key
    (`model/convert.py::load_hybrid_stem_from_timm`); BatchNorm statistics are buffers saved with the model.
    """

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__()
        backbone = _create_timm_efficientnet(config)
        stage = config.backbone_stage
        features = {info["module"]: info for info in backbone.feature_info}
        info = features.get(f"blocks.{stage}")
        if info is None or info["reduction"] != HYBRID_PATCH_SIZE:
            stride16 = [int(name.split(".")[1]) for name, f in features.items() if f["reduction"] == HYBRID_PATCH_SIZE]
            raise ValueError(
                f"backbone_stage={stage} is not the stride-{HYBRID_PATCH_SIZE} output of {config.backbone}; "
                f"use backbone_stage={stride16[0] if stride16 else '?'}."
            )
        if info["num_chs"] != config.backbone_channels:
            raise ValueError(
                f"{config.backbone} blocks[{stage}] gives {info['num_chs']} channels but backbone_channels="
                f"{config.backbone_channels}; set backbone_channels={info['num_chs']}."
            )
        self.num_channels = config.num_channels
        self.conv_stem = backbone.conv_stem
        self.bn1 = backbone.bn1  # BatchNorm + activation (timm's BatchNormAct2d)
        self.blocks = nn.Sequential(*backbone.blocks[: stage + 1])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, num_channels, H, W), H and W multiples of 16 -> (B, backbone_channels, H / 16, W / 16)."""
        _check_pixel_values(pixel_values, self.num_channels, (HYBRID_PATCH_SIZE,) * 2, "the hybrid stem's stride")
        return self.blocks(self.bn1(self.conv_stem(pixel_values)))


class MelanomaViTHybridPatchEmbeddings(nn.Module):
    """ViT-hybrid patches (Dosovitskiy et al. 2020, section 3.1): CNN feature map -> 1x1 conv -> (B, C, h, w).

    Each cell of the stem's stride-16 map is one token. `stem` may be swapped for `nn.Identity()` to feed
    precomputed stem maps (B, backbone_channels, h, w) as `pixel_values`, so the channel count is only
    checked by the stem itself.
    """

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__()
        self.stem = MelanomaViTHybridStem(config)
        self.projection = nn.Conv2d(config.backbone_channels, config.hidden_size, kernel_size=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, num_channels, H, W) images (or (B, backbone_channels, h, w) stem maps) -> (B, C, H / 16, W / 16)."""
        return self.projection(self.stem(pixel_values))  # (B, C, h, w)


PATCH_EMBEDDINGS = {"linear": MelanomaViTPatchEmbeddings, "hybrid": MelanomaViTHybridPatchEmbeddings}


class MelanomaViTEmbeddings(nn.Module):
    """Patch tokens with prepended CLS (+ DIST) tokens plus learned absolute position embeddings."""

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__()
        self.patch_embed = PATCH_EMBEDDINGS[config.patch_embedding_type](config)
        self.grid_size = config.grid_size
        self.num_prefix_tokens = config.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_distillation_token else None
        num_positions = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.pos_drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None) -> torch.Tensor:
        """(B, num_channels, H, W) -> (B, num_prefix_tokens + h * w, C), token order [CLS, (DIST,) patches].

        `interpolate_pos_encoding`: None or True resizes the position embeddings when the patch grid
        differs from the configured one; False refuses other input sizes.
        """
        x = self.patch_embed(pixel_values)  # (B, C, h, w)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, h * w, C)
        if grid != self.grid_size and interpolate_pos_encoding is False:
            raise ValueError(
                f"Input gives a {grid} patch grid but the model was configured for {self.grid_size}; resize the "
                "images to config.image_size or pass interpolate_pos_encoding=True."
            )
        batch = x.shape[0]
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(batch, -1, -1))
        x = torch.cat(prefix + [x], dim=1)  # (B, N, C)
        x = x + resample_pos_embed(self.pos_embed, grid, self.grid_size, self.num_prefix_tokens)
        return self.pos_drop(x)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit `softmax(q k^T * scaling) v`: the `attn_implementation="eager"` entry of the attention interface.

    Args:
        query / key / value: (B, heads, N, d).
        attention_mask: part of the interface's signature; always None here (images have no padding).

    Returns:
        ((B, N, heads, d), attention weights (B, heads, N, N) before dropout, which rollout reads).
    """
    weights = torch.matmul(query, key.transpose(-2, -1)) * scaling  # (B, heads, N, N)
    weights = weights.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(F.dropout(weights, p=dropout, training=module.training), value)  # (B, heads, N, d)
    return output.transpose(1, 2), weights  # (B, N, heads, d)


class MelanomaViTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Dispatches on `config._attn_implementation` through transformers' attention interface ("sdpa":
    `F.scaled_dot_product_attention`, "eager": `eager_attention_forward`). Requested attention weights
    always come from the eager path, whatever the implementation, since SDPA does not return them.
    """

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__()
        self.config = config
        self.is_causal = False  # read by transformers' SDPA function (its default is causal)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop_prob = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj_drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, C) -> ((B, N, C), attention weights (B, heads, N, N) or None)."""
        batch, num_tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim)  # (B, N, 3, heads, d)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
        attention: Callable = eager_attention_forward
        if not output_attentions:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        if attention is eager_attention_forward:
            # One contiguous copy up front saves matmul from copying q, k and v separately (~15% faster on CPU).
            qkv = qkv.contiguous()
        q, k, v = qkv.unbind(0)  # 3 x (B, heads, N, d)
        x, weights = attention(
            self, q, k, v, None, dropout=self.attn_drop_prob if self.training else 0.0, scaling=self.scale
        )
        x = x.reshape(batch, num_tokens, channels)  # (B, N, C)
        return self.proj_drop(self.proj(x)), weights if output_attentions else None


class MelanomaViTMLP(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout (timm's `Mlp`)."""

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.drop1 = nn.Dropout(config.hidden_dropout_prob)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.drop2 = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class MelanomaViTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block with stochastic depth on both residual branches.

    As a `GradientCheckpointingLayer`, it recomputes its activations in backward after
    `model.gradient_checkpointing_enable()`; call it with the hidden states positional.
    """

    def __init__(self, config: MelanomaViTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = MelanomaViTAttention(config)
        self.drop_path1 = MelanomaViTDropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MelanomaViTMLP(config)
        self.drop_path2 = MelanomaViTDropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, C) -> ((B, N, C), attention weights (B, heads, N, N) or None)."""
        attn_out, weights = self.attn(self.norm1(x), output_attentions)
        x = x + self.drop_path1(attn_out)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, weights


class MelanomaViTEncoder(nn.Module):
    """A stack of `num_hidden_layers` blocks; drop-path rates rise linearly from 0 to `drop_path_rate`."""

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__()
        # Pure Python (not torch.linspace(...).tolist()) so the model also builds on the meta device.
        last = max(config.num_hidden_layers - 1, 1)
        rates = [config.drop_path_rate * i / last for i in range(config.num_hidden_layers)]
        self.blocks = nn.ModuleList([MelanomaViTLayer(config, drop_path=rate) for rate in rates])

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """(B, N, C) -> (last block output (B, N, C), hidden states (L + 1 of (B, N, C)) or None,
        attentions (L of (B, heads, N, N)) or None)."""
        hidden_states = (x,) if output_hidden_states else None
        attentions = () if output_attentions else None
        for block in self.blocks:
            x, weights = block(x, output_attentions)
            if output_hidden_states:
                hidden_states += (x,)
            if output_attentions:
                attentions += (weights,)
        return x, hidden_states, attentions


@dataclass
class MelanomaViTImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus the distillation head's logits (B, num_labels) of DeiT-style models
    and the raw logits of the extra heads, `{name: (B, len(config.extra_heads[name]))}` (None without extra heads).

    `logits` is the CLS head in training and the mean of the CLS and distillation heads in eval.
    """

    distillation_logits: torch.FloatTensor | None = None
    head_logits: dict[str, torch.FloatTensor] | None = None


def _init_efficientnet_stem(stem: nn.Module) -> None:
    """timm's EfficientNet init (TensorFlow's): convs normal(0, sqrt(2 / fan_out)), BatchNorm (1, 0) with fresh
    statistics. Through transformers' `init` functions, so weights loaded from a checkpoint are left alone."""
    for layer in stem.modules():
        if isinstance(layer, nn.Conv2d):
            fan_out = layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels // layer.groups
            init.normal_(layer.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            if layer.bias is not None:
                init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            init.ones_(layer.weight)
            init.zeros_(layer.bias)
            init.zeros_(layer.running_mean)
            init.ones_(layer.running_var)
            init.zeros_(layer.num_batches_tracked)


class MelanomaViTPreTrainedModel(PreTrainedModel):
    """Weight initialisation (as timm's ViT), gradient checkpointing and Hub loading for MelanomaViT."""

    config_class = MelanomaViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["MelanomaViTEmbeddings", "MelanomaViTLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Truncated normal (std `initializer_range`) weights, zero biases, LayerNorm (1, 0); the hybrid
        stem as timm initialises EfficientNets (TensorFlow's fan-out normal, BatchNorm (1, 0))."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MelanomaViTEmbeddings):
            init.trunc_normal_(module.pos_embed, mean=0.0, std=std)
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            if module.dist_token is not None:
                init.trunc_normal_(module.dist_token, mean=0.0, std=std)
            if isinstance(module.patch_embed, MelanomaViTHybridPatchEmbeddings):
                # Here rather than in a stem branch: transformers skips modules without parameters of their
                # own (the stem) in remote code, and it visits children first, so this replaces the ViT init
                # of the stem's convs, whose std 0.02 would vanish the signal through a deep conv stack.
                _init_efficientnet_stem(module.patch_embed.stem)

    def get_input_embeddings(self) -> nn.Module:
        """The patch embeddings (as transformers' ViT), so `enable_input_require_grads()` hooks their output."""
        return self.base_model.embeddings.patch_embed

    def _base_model_prefix(self) -> str:
        """"" on the base model, "vit." on a model that wraps it: what parameter names start with."""
        return "" if self.base_model is self else f"{self.base_model_prefix}."

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of the parameters that get no weight decay besides biases and norm
        weights: the CLS (and DIST) token and the position embeddings, as timm's `VisionTransformer.no_weight_decay`.
        Only parameters this model has (no `dist_token` without a distillation token)."""
        prefix = f"{self._base_model_prefix()}embeddings."
        return {prefix + name for name, _ in self.base_model.embeddings.named_parameters(recurse=False)}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping spec (for `timm.models.group_parameters`: layer-wise freezing or LR decay), names
        relative to this module.

        "stem": the embeddings (tokens, position embeddings, patch projection or hybrid CNN stem); "blocks": one
        group per transformer block. The final norm and the heads match neither, so timm gives them the last group
        (unlike timm's ViT, which merges the final norm into the last block): a head-only warm-up trains the final
        norm with the heads. `coarse` is timm's signature; a ViT has no finer grouping (as in timm).
        """
        prefix = re.escape(self._base_model_prefix())
        return {"stem": rf"^{prefix}embeddings\.", "blocks": [(rf"^{prefix}encoder\.blocks\.(\d+)\.", None)]}


class MelanomaViTModel(MelanomaViTPreTrainedModel):
    """The ViT backbone: embeddings -> encoder -> final LayerNorm."""

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__(config)
        self.embeddings = MelanomaViTEmbeddings(config)
        self.encoder = MelanomaViTEncoder(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encode images.

        Args:
            pixel_values: (B, num_channels, H, W), H and W multiples of the patch size (hybrid models with
                the stem replaced by `nn.Identity()`: precomputed stem maps (B, backbone_channels, h, w)).
            output_attentions: return per-layer attention weights, each (B, heads, N, N) with
                N = num_prefix_tokens + patches (slower explicit-softmax path).
            output_hidden_states: return the embeddings and every block output, each (B, N, C).
            interpolate_pos_encoding: None/True resize position embeddings for other input sizes,
                False raises on them.

        Returns:
            `BaseModelOutputWithPooling`: last_hidden_state (B, N, C) after the final LayerNorm,
            pooler_output (B, C) = normalised CLS token, hidden_states, attentions.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        x = self.embeddings(pixel_values.to(self.embeddings.cls_token.dtype), interpolate_pos_encoding)
        x, hidden_states, attentions = self.encoder(x, bool(output_attentions), bool(output_hidden_states))
        x = self.norm(x)
        output = BaseModelOutputWithPooling(
            last_hidden_state=x, pooler_output=x[:, 0], hidden_states=hidden_states, attentions=attentions
        )
        return output if return_dict else output.to_tuple()


class MelanomaViTForImageClassification(MelanomaViTPreTrainedModel):
    """MelanomaViT with a linear head on the CLS token (+ a DeiT distillation head on the DIST token), plus
    optional extra linear heads on the same CLS token (`config.extra_heads`, e.g. one per training dataset
    or per seven-point-checklist criterion).

    `logits` is always the main (dx, `id2label`) head, so `pipeline`, the Auto classes and exports see a
    plain classifier. Calibration is stored in one form: the fitted temperatures are folded into the heads'
    weights (`config.folded_temperature`, `config.folded_head_temperatures`, for the record), so every head's
    `softmax(logits)` is calibrated, the same numbers from `predict_proba` / `predict_heads` and transformers'
    `pipeline`. An older config.json that stores temperatures still to apply (`temperature`,
    `head_temperatures`) is migrated once by `from_pretrained`, which folds them into the loaded heads.

    `labels` give transformers' standard `loss` (for `Trainer` and quick checks): that of `logits` by
    `problem_type`, and for a distilled model in training the mean of the CLS and distillation heads' losses,
    so a `labels` step trains every parameter but the extra heads (see `forward`). The project's training
    losses (focal loss, class weights, label smoothing, DeiT distillation from a teacher, the extra heads'
    masked losses) are defined once, in train/losses.py, on the logits returned here.
    """

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = MelanomaViTModel(config)
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.head_dist = nn.Linear(config.hidden_size, config.num_labels) if config.use_distillation_token else None
        # Always present (empty without extra heads) so forward has no branch; adds no state-dict keys.
        self.extra_heads = nn.ModuleDict(
            {name: nn.Linear(config.hidden_size, len(labels)) for name, labels in (config.extra_heads or {}).items()}
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MelanomaViTImageClassifierOutput | tuple:
        """Classify images.

        Args:
            pixel_values: (B, num_channels, H, W).
            labels: targets of the main head, by `config.problem_type` (None: inferred as transformers' ViT
                does: regression when num_labels == 1, single-label for int64/int32 labels, else multi-label):
                "single_label_classification": (B,) class indices, -100 = no label for that sample (masked
                out of the loss), or (B, num_labels) soft targets (mixup/cutmix); cross-entropy.
                "multi_label_classification": (B, num_labels) 0/1 floats; BCE with logits.
                "regression": (B,) or (B, num_labels) floats; mean squared error.
                A distilled model in training mode learns them with both heads: the loss is the mean of the
                CLS and distillation heads' losses (train/losses.py's rule without a teacher); in eval mode
                `logits` is already the two heads' mean. The extra heads take no part: their labels are
                per head and sparse (-100 where a sample's source has none), so they train through
                train/losses.py's `masked_head_loss` on `head_logits`, and a `labels` step leaves their
                gradients None.
            output_attentions / output_hidden_states / interpolate_pos_encoding: see `MelanomaViTModel`.

        Returns:
            `MelanomaViTImageClassifierOutput`: loss (of `logits`, and in training of `distillation_logits`,
            against `labels`; when every label is masked, a zero that still backpropagates), logits (B, num_labels)
            (calibrated when a temperature is folded into the head weights), distillation_logits
            (B, num_labels) or None, head_logits
            {name: (B, n_labels)} or None, hidden_states, attentions.
        """
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        outputs = self.vit(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        tokens = outputs.last_hidden_state  # (B, N, C)
        logits = self.head(tokens[:, 0])  # (B, num_labels)
        distillation_logits = None
        if self.head_dist is not None:
            distillation_logits = self.head_dist(tokens[:, 1])  # (B, num_labels)
            if not self.training:
                logits = (logits + distillation_logits) / 2
        head_logits = {name: head(tokens[:, 0]) for name, head in self.extra_heads.items()} or None

        loss = None
        if labels is not None:
            trained = [logits] if distillation_logits is None or not self.training else [logits, distillation_logits]
            losses = [self._main_loss(head_output, labels) for head_output in trained]
            if losses[0] is None:  # every label masked: a zero that keeps the graph, so `loss.backward()` still works
                loss = sum(head_output.sum() for head_output in trained) * 0.0
            else:
                loss = torch.stack(losses).mean()

        output = MelanomaViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            distillation_logits=distillation_logits,
            head_logits=head_logits,
        )
        return output if return_dict else output.to_tuple()

    def _main_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """The main head's loss by `config.problem_type`; None when every label is masked (-100)."""
        labels = labels.to(logits.device)
        problem_type = self.config.problem_type
        if problem_type is None:  # transformers' ViT rule, without writing it back into the config
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.float().squeeze(), labels.float().squeeze())
            return F.mse_loss(logits.float(), labels.float())
        if problem_type == "multi_label_classification":
            if labels.shape != logits.shape:
                raise ValueError(
                    f"Multi-label targets must have shape (batch, num_labels) = {tuple(logits.shape)}, "
                    f"got {tuple(labels.shape)}."
                )
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        if labels.is_floating_point():
            if labels.shape != logits.shape:
                raise ValueError(
                    f"Soft labels must have shape (batch, num_labels) = {tuple(logits.shape)}, "
                    f"got {tuple(labels.shape)}."
                )
            return F.cross_entropy(logits.float(), labels.float())
        return _masked_cross_entropy(logits, labels, "labels")

    @torch.no_grad()
    def predict_proba(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B, num_channels, H, W) -> float32 class probabilities `softmax(logits)` (B, num_labels), calibrated
        when a temperature is folded into the head.

        Runs the forward pass as is (call `model.eval()` first for inference); extra kwargs go to `forward`.
        """
        return torch.softmax(self(pixel_values, **kwargs).logits.float(), dim=-1)

    @torch.no_grad()
    def predict_heads(self, pixel_values: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        """(B, num_channels, H, W) -> float32 probabilities of every head, each a plain softmax of its logits
        (calibrated where a temperature is folded into that head).

        Returns:
            {"dx": (B, num_labels), then per extra head in config order name: (B, n_labels)}.
            Runs the forward pass as is (call `model.eval()` first); extra kwargs go to `forward`.
        """
        output = self(pixel_values, **kwargs)
        logits = {"dx": output.logits, **(output.head_logits or {})}
        return {name: torch.softmax(z.float(), dim=-1) for name, z in logits.items()}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' `from_pretrained`, plus the one-time migration of an older calibration form: temperatures
        that config.json still stores to apply (`config.unfolded_temperatures`) are folded into the loaded heads,
        so the probabilities are those the folder always gave; `save_pretrained` then stores the migrated form."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        model.fold_unfolded_temperatures()
        return loaded

    @torch.no_grad()
    def fold_unfolded_temperatures(self) -> None:
        """Fold `config.unfolded_temperatures` into the heads (W, b -> W / T, b / T) and record them as
        `folded_temperature` / `folded_head_temperatures`; nothing to do for the stored form."""
        config = self.config
        unfolded = getattr(config, "unfolded_temperatures", None) or {}
        if not unfolded:
            return
        if config.folded_temperature is not None or config.folded_head_temperatures:
            raise ValueError(
                f"config.json records folded temperatures (folded_temperature={config.folded_temperature}, "
                f"folded_head_temperatures={config.folded_head_temperatures}) and also temperatures to apply "
                f"({unfolded}): fitted on the raw or on the folded logits? Remove one of them from config.json."
            )
        temperature = unfolded.get("temperature")
        if temperature is not None:
            for layer in (self.head, self.head_dist):
                if layer is not None:
                    layer.weight.div_(temperature)
                    layer.bias.div_(temperature)
            config.folded_temperature = temperature
        head_temperatures = unfolded.get("head_temperatures") or {}
        for name, head_t in head_temperatures.items():
            self.extra_heads[name].weight.div_(head_t)
            self.extra_heads[name].bias.div_(head_t)
        if head_temperatures:
            config.folded_head_temperatures = {name: float(t) for name, t in head_temperatures.items()}
        config.unfolded_temperatures = {}
        logger.warning(
            "Migrated an older MelanomaViT calibration: folded %s into the classifier head weights (recorded as "
            "folded_temperature / folded_head_temperatures). Probabilities are unchanged; save_pretrained the model "
            "to store this form.",
            unfolded,
        )


def _masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, name: str) -> torch.Tensor | None:
    """Mean cross-entropy of (B, K) logits over the samples whose (B,) class index is not -100; None if none is."""
    if labels.is_floating_point() or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"{name} must be (batch,) = ({logits.shape[0]},) integer class indices, got {labels.dtype} "
            f"{tuple(labels.shape)}."
        )
    labelled = labels != IGNORE_INDEX
    if not labelled.any():
        return None
    if labels[labelled].min() < 0 or labels[labelled].max() >= logits.shape[-1]:
        raise ValueError(
            f"{name} must be class indices in [0, {logits.shape[-1] - 1}] or {IGNORE_INDEX} (no label), "
            f"got {labels.tolist()}."
        )
    return F.cross_entropy(logits[labelled].float(), labels[labelled].long())


__all__ = [
    "MelanomaViTDropPath",
    "MelanomaViTPatchEmbeddings",
    "MelanomaViTHybridStem",
    "MelanomaViTHybridPatchEmbeddings",
    "MelanomaViTEmbeddings",
    "MelanomaViTAttention",
    "MelanomaViTMLP",
    "MelanomaViTLayer",
    "MelanomaViTEncoder",
    "MelanomaViTImageClassifierOutput",
    "MelanomaViTPreTrainedModel",
    "MelanomaViTModel",
    "MelanomaViTForImageClassification",
    "eager_attention_forward",
    "resample_pos_embed",
]
