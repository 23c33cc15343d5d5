"""Attention rollout (Abnar & Zuidema, 2020) and heat-map overlays, as pure tensor functions.

Rollout treats each layer's head-fused attention, mixed with the identity for the residual
connection and row-normalised, as a token-to-token flow, and multiplies the layers:
``R = A_L @ ... @ A_start``. The CLS row of ``R`` over the patch columns says how much each
patch contributed to the CLS token, i.e. to the prediction.

Explanations are research/education aids, not evidence for a diagnosis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HEAD_FUSIONS = ("mean", "max", "min")
TOKEN_ROWS = {"cls": 0, "dist": 1}  # row of each prefix token: [CLS, DIST, patches...]


def _grid(num_patches: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
    if grid_size is not None:
        grid_h, grid_w = grid_size
        if grid_h * grid_w != num_patches:
            raise ValueError(f"grid_size {grid_size} has {grid_h * grid_w} cells but attention has {num_patches} patch tokens")
        return grid_h, grid_w
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"{num_patches} patch tokens do not form a square grid: check num_prefix_tokens or pass grid_size=(h, w)"
        )
    return side, side


def _discard_lowest(attn: torch.Tensor, discard_ratio: float, num_prefix_tokens: int) -> torch.Tensor:
    """Zero the lowest ``discard_ratio`` share of each row's patch columns; prefix columns are kept.

    attn: (B, N, N). Per row, so one image never influences another. A stable sort keeps
    the choice among tied values deterministic.
    """
    patch = attn[..., num_prefix_tokens:]  # (B, N, P)
    num_discard = int(patch.shape[-1] * discard_ratio)
    if num_discard == 0:
        return attn
    order = torch.sort(patch, dim=-1, stable=True).indices[..., :num_discard]  # (B, N, k)
    patch = patch.scatter(-1, order, 0.0)
    return torch.cat([attn[..., :num_prefix_tokens], patch], dim=-1)


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    num_prefix_tokens: int = 1,
    token_rows: Sequence[str] = ("cls",),
    grid_size: tuple[int, int] | None = None,
    detach: bool = True,
) -> torch.Tensor:
    """Attention rollout map per image.

    Args:
        attentions: one (B, heads, N, N) softmax attention tensor per layer, N =
            num_prefix_tokens + grid_h * grid_w (token order [CLS, (DIST,) patches...]), as in
            ``outputs.attentions`` with ``output_attentions=True``.
        head_fusion: how heads are combined: "mean", "max" or "min".
        discard_ratio: share in [0, 1) of each row's lowest patch attentions set to zero
            before rollout (prefix-token columns are never discarded).
        start_layer: first layer (0-based) included in the product.
        num_prefix_tokens: tokens before the patches (1 = CLS, 2 = CLS + distillation).
        token_rows: rows to read the map from: ("cls",) or ("cls", "dist") (averaged).
        grid_size: (grid_h, grid_w) of the patch grid; default: square.
        detach: False keeps the graph, so a training loss can act on the map (the attention
            target of train.losses.attention_mask_loss); True (explanations) does not.

    Returns:
        (B, grid_h, grid_w) float tensor, each image's map min-max normalised to [0, 1]
        (a constant map becomes all zeros: no patch stands out).
    """
    if isinstance(attentions, torch.Tensor) or len(attentions) == 0:
        raise ValueError("attentions must be a non-empty sequence of per-layer (B, heads, N, N) tensors")
    first = attentions[0]
    for i, attn in enumerate(attentions):
        if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
            raise ValueError(f"attention of layer {i} must be (B, heads, N, N), got shape {tuple(attn.shape)}")
        if attn.shape[0] != first.shape[0] or attn.shape[-1] != first.shape[-1]:
            raise ValueError(f"layer {i} has shape {tuple(attn.shape)}, layer 0 has {tuple(first.shape)}")
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if not 0 <= start_layer < len(attentions):
        raise ValueError(f"start_layer must be in [0, {len(attentions) - 1}] for {len(attentions)} layers, got {start_layer}")
    if not token_rows or any(t not in TOKEN_ROWS for t in token_rows):
        raise ValueError(f"token_rows must be a non-empty subset of {tuple(TOKEN_ROWS)}, got {token_rows!r}")
    rows = [TOKEN_ROWS[t] for t in token_rows]
    num_tokens = first.shape[-1]
    if not 1 <= num_prefix_tokens < num_tokens or max(rows) >= num_prefix_tokens:
        raise ValueError(
            f"num_prefix_tokens={num_prefix_tokens} does not fit N={num_tokens} tokens and token_rows={tuple(token_rows)} "
            "(reading the 'dist' row needs num_prefix_tokens=2)"
        )
    grid_h, grid_w = _grid(num_tokens - num_prefix_tokens, grid_size)

    batch = first.shape[0]
    eye = torch.eye(num_tokens, dtype=torch.float32, device=first.device)
    rollout = eye.expand(batch, num_tokens, num_tokens)
    for attn in attentions[start_layer:]:
        attn = attn.detach().float() if detach else attn.float()
        if head_fusion == "mean":
            fused = attn.mean(dim=1)  # (B, N, N)
        elif head_fusion == "max":
            fused = attn.amax(dim=1)
        else:
            fused = attn.amin(dim=1)
        fused = _discard_lowest(fused, discard_ratio, num_prefix_tokens)
        # Residual connection: half of each token's output is itself.
        fused = 0.5 * fused + 0.5 * eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        rollout = fused @ rollout  # (B, N, N)

    maps = rollout[:, rows, num_prefix_tokens:].mean(dim=1)  # (B, P)
    maps = maps.reshape(batch, grid_h, grid_w)  # (B, grid_h, grid_w)
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def overlay_heatmap(
    image: Image.Image | np.ndarray,
    mask: np.ndarray | torch.Tensor,
    alpha: float = 0.5,
    colormap: str = "jet",
) -> np.ndarray:
    """Blend a colour-mapped [0, 1] mask over an RGB image, each pixel in proportion to its weight:
    where the mask is 0 the image shows through unchanged (no blue wash over the whole image).

    Args:
        image: PIL image (any mode, converted to RGB) or (H, W, 3) uint8 array.
        mask: (h, w) values in [0, 1]; resized to (H, W) bilinearly.
        alpha: heat-map opacity in [0, 1] where the mask is 1 (0 returns the image unchanged).
        colormap: a matplotlib colormap name.

    Returns:
        (H, W, 3) uint8 array.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if colormap not in matplotlib.colormaps:
        raise ValueError(f"unknown matplotlib colormap {colormap!r}")
    mask_t = torch.as_tensor(np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask), dtype=torch.float32)
    if mask_t.ndim != 2:
        raise ValueError(f"mask must be (h, w), got shape {tuple(mask_t.shape)}")
    if not torch.isfinite(mask_t).all() or mask_t.min() < 0 or mask_t.max() > 1:
        raise ValueError("mask values must be finite and in [0, 1] (normalise it first)")

    height, width = image.shape[:2]
    resized = F.interpolate(mask_t[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    weight = np.round(resized.clamp(0, 1).numpy().astype(np.float64), 6)  # bilinear's 0.99999994 is 1
    heat = matplotlib.colormaps[colormap](weight)[..., :3] * 255.0  # (H, W, 3)
    opacity = alpha * weight[..., None]  # (H, W, 1)
    blended = (1.0 - opacity) * image.astype(np.float64) + opacity * heat
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
