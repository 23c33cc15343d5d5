"""MelanomaViT: a ViT/DeiT image classifier for dermoscopy, written as a transformers model.

Parameter names mirror timm's `VisionTransformer` (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `head`, `head_dist`) under the
transformers prefixes `vit.embeddings` / `vit.encoder`, so timm ViT and DeiT checkpoints convert with
a pure dict -> dict renaming (see `model/convert.py`).

This file ships to the Hub as remote code: it imports only torch, transformers and (relatively) its
configuration file.

Research/education tool only: never use its outputs for diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import logging

from .configuration_melanoma_vit import MelanomaViTConfig

try:  # transformers >= 5: these skip tensors already filled from a checkpoint.
    from transformers import initialization as init
except ImportError:  # transformers 4.x initialises only missing weights, plain torch init is right there.
    from torch.nn import init

logger = logging.get_logger(__name__)


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
    """Non-overlapping patches -> tokens with one strided convolution (timm's `PatchEmbed`)."""

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__()
        self.patch_size = _pair(config.patch_size)
        self.num_channels = config.num_channels
        self.proj = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, num_channels, H, W) -> tokens (B, h * w, C) and the grid (h, w) = (H / patch, W / patch)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}; preprocess images with the model's image processor."
            )
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ValueError(
                f"Image size ({height}x{width}) must be divisible by the patch size {self.patch_size}; "
                "resize or crop the images to a multiple of it."
            )
        x = self.proj(pixel_values)  # (B, C, h, w)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid  # (B, h * w, C)


class MelanomaViTEmbeddings(nn.Module):
    """Patch tokens with prepended CLS (+ DIST) tokens plus learned absolute position embeddings."""

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__()
        self.patch_embed = MelanomaViTPatchEmbeddings(config)
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
        x, grid = self.patch_embed(pixel_values)
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


class MelanomaViTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Uses `F.scaled_dot_product_attention` unless the attention weights are requested, in which case
    it computes `softmax(q k^T / sqrt(d))` explicitly (the weights are returned before dropout).
    """

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop_prob = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.attn_drop = nn.Dropout(config.attention_probs_dropout_prob)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj_drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, C) -> ((B, N, C), attention weights (B, heads, N, N) or None)."""
        batch, num_tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim)  # (B, N, 3, heads, d)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
        if output_attentions:
            # One contiguous copy up front saves matmul from copying q, k and v separately (~15% faster on CPU).
            q, k, v = qkv.contiguous().unbind(0)  # 3 x (B, heads, N, d)
            weights = (q @ k.transpose(-2, -1)).mul_(self.scale).softmax(dim=-1)  # (B, heads, N, N)
            x = self.attn_drop(weights) @ v  # (B, heads, N, d)
        else:
            q, k, v = qkv.unbind(0)  # 3 x (B, heads, N, d)
            weights = None
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop_prob if self.training else 0.0)
        x = x.transpose(1, 2).reshape(batch, num_tokens, channels)  # (B, N, C)
        return self.proj_drop(self.proj(x)), weights


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


class MelanomaViTLayer(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches."""

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
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.blocks = nn.ModuleList([MelanomaViTLayer(config, drop_path=rate) for rate in rates])
        # Set by `PreTrainedModel.gradient_checkpointing_enable()` together with `_gradient_checkpointing_func`.
        self.gradient_checkpointing = False

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """(B, N, C) -> (last block output (B, N, C), hidden states (L + 1 of (B, N, C)) or None,
        attentions (L of (B, heads, N, N)) or None)."""
        hidden_states = (x,) if output_hidden_states else None
        attentions = () if output_attentions else None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x, weights = self._gradient_checkpointing_func(block.__call__, x, output_attentions)
            else:
                x, weights = block(x, output_attentions)
            if output_hidden_states:
                hidden_states += (x,)
            if output_attentions:
                attentions += (weights,)
        return x, hidden_states, attentions


@dataclass
class MelanomaViTImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus the distillation head's logits (B, num_labels) of DeiT-style models.

    `logits` is the CLS head in training and the mean of the CLS and distillation heads in eval.
    """

    distillation_logits: torch.FloatTensor | None = None


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
        """Truncated normal (std `initializer_range`) weights, zero biases, LayerNorm (1, 0)."""
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
            pixel_values: (B, num_channels, H, W), H and W multiples of the patch size.
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
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embed.proj.weight.dtype), interpolate_pos_encoding)
        x, hidden_states, attentions = self.encoder(x, bool(output_attentions), bool(output_hidden_states))
        x = self.norm(x)
        output = BaseModelOutputWithPooling(
            last_hidden_state=x, pooler_output=x[:, 0], hidden_states=hidden_states, attentions=attentions
        )
        return output if return_dict else output.to_tuple()


class MelanomaViTForImageClassification(MelanomaViTPreTrainedModel):
    """MelanomaViT with a linear head on the CLS token (+ a DeiT distillation head on the DIST token).

    The forward pass returns raw logits. Calibrated probabilities are `softmax(logits / config.temperature)`:
    use `calibrated_probs` / `predict_proba` (transformers' `pipeline` applies a plain softmax, i.e. T = 1).
    """

    def __init__(self, config: MelanomaViTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = MelanomaViTModel(config)
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.head_dist = nn.Linear(config.hidden_size, config.num_labels) if config.use_distillation_token else None
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        distillation_labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MelanomaViTImageClassifierOutput | tuple:
        """Classify images.

        Args:
            pixel_values: (B, num_channels, H, W).
            labels: (B,) class indices or (B, num_labels) soft targets (mixup/cutmix); adds a
                cross-entropy `loss`.
            distillation_labels: (B,) teacher predictions for DeiT hard distillation (distilled models in
                training only). The loss is then `(CE(cls, labels) + CE(dist, distillation_labels)) / 2`;
                without them the distillation head is trained on `labels`.
            output_attentions / output_hidden_states / interpolate_pos_encoding: see `MelanomaViTModel`.

        Returns:
            `MelanomaViTImageClassifierOutput`: loss, logits (B, num_labels) (raw, not temperature
            scaled), distillation_logits (B, num_labels) or None, hidden_states, attentions.
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
        if distillation_labels is not None and not (self.training and self.head_dist is not None):
            raise ValueError(
                "distillation_labels are only used by a distilled model (use_distillation_token=True) in training "
                "mode; drop them or call model.train()."
            )

        loss = None
        if labels is not None:
            loss = self._cross_entropy(logits, labels)
            if self.training and distillation_logits is not None:
                dist_target = distillation_labels if distillation_labels is not None else labels
                loss = (loss + self._cross_entropy(distillation_logits, dist_target)) / 2

        output = MelanomaViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            distillation_logits=distillation_logits,
        )
        return output if return_dict else output.to_tuple()

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.device)
        if labels.is_floating_point():
            if labels.shape != logits.shape:
                raise ValueError(
                    f"Soft labels must have shape (batch, num_labels) = {tuple(logits.shape)}, "
                    f"got {tuple(labels.shape)}."
                )
            return F.cross_entropy(logits.float(), labels.float())
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"labels must have shape (batch,) = ({logits.shape[0]},), got {tuple(labels.shape)}.")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_labels):
            raise ValueError(f"labels must be class indices in [0, {self.num_labels - 1}], got {labels.tolist()}.")
        return F.cross_entropy(logits.float(), labels)

    def calibrated_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, num_labels) raw logits -> (B, num_labels) `softmax(logits / config.temperature)` in float32."""
        return torch.softmax(logits.float() / float(self.config.temperature), dim=-1)

    @torch.no_grad()
    def predict_proba(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B, num_channels, H, W) -> temperature-calibrated class probabilities (B, num_labels).

        Runs the forward pass as is (call `model.eval()` first for inference); extra kwargs go to `forward`.
        """
        return self.calibrated_probs(self(pixel_values, **kwargs).logits)


__all__ = [
    "MelanomaViTDropPath",
    "MelanomaViTPatchEmbeddings",
    "MelanomaViTEmbeddings",
    "MelanomaViTAttention",
    "MelanomaViTMLP",
    "MelanomaViTLayer",
    "MelanomaViTEncoder",
    "MelanomaViTImageClassifierOutput",
    "MelanomaViTPreTrainedModel",
    "MelanomaViTModel",
    "MelanomaViTForImageClassification",
    "resample_pos_embed",
]
