"""Grad-CAM (Selvaraju et al., 2017) for the CNN baselines.

The class score's gradient with respect to the last convolutional feature map, averaged
over space, weighs that map's channels; the ReLU of the weighted sum is the map. The feature
map is the last stage's output, just before global pooling: ``forward_features`` for timm models
(and transformers' TimmWrapper around them), the last ``hidden_states`` entry for transformers'
own CNNs (``ResNetForImageClassification``: the same tensor as timm's, so a stock export of a
timm ResNet gets the same map); for any other CNN a forward hook reads the output of
``target_layer`` (default: its last ``nn.Conv2d``).

Explanations are research/education aids, not evidence for a diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel


def _timm_model(model: nn.Module) -> nn.Module | None:
    """The timm model inside a TimmWrapper, the model itself if it is a timm model, else None."""
    inner = getattr(model, "timm_model", model)
    if hasattr(inner, "forward_features") and hasattr(inner, "forward_head"):
        return inner
    return None


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output


def _targets(target: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    batch, num_classes = logits.shape
    if target is None:
        return logits.argmax(dim=-1)
    index = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if index.numel() == 1:
        index = index.expand(batch)
    if index.numel() != batch:
        raise ValueError(f"target must be one class index or one per image ({batch}), got {index.numel()}")
    if (index < 0).any() or (index >= num_classes).any():
        raise ValueError(f"target classes must be in [0, {num_classes - 1}], got {index.tolist()}")
    return index


def _features_and_logits(model: nn.Module, pixel_values: torch.Tensor, target_layer: nn.Module | None):
    """Run the model, returning the (B, C, h, w) target feature map and the (B, num_classes) logits."""
    timm_model = _timm_model(model) if target_layer is None else None
    if timm_model is not None:
        # The score's gradient is needed with respect to the feature map only: the backbone runs
        # without autograd and only the head is differentiated (no backward pass through the CNN).
        with torch.no_grad():
            features = timm_model.forward_features(pixel_values)
        features.requires_grad_(True)
        return features, timm_model.forward_head(features)
    if target_layer is None and isinstance(model, PreTrainedModel):
        # transformers CNNs: hidden_states[-1] is the last stage's (B, C, h, w) map (its last conv is pre-residual).
        output = model(pixel_values=pixel_values, output_hidden_states=True)
        return output.hidden_states[-1], output.logits

    if target_layer is None:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError("model has no nn.Conv2d: pass target_layer= (a module whose output is (B, C, h, w))")
        target_layer = convs[-1]
    captured: list[torch.Tensor] = []
    handle = target_layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        logits = _logits(model(pixel_values))
    finally:
        handle.remove()
    if not captured:
        raise ValueError("target_layer was not called in the forward pass")
    return captured[-1], logits


def grad_cam(
    model: nn.Module,
    pixel_values: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    target_layer: nn.Module | None = None,
) -> torch.Tensor:
    """Grad-CAM maps for a batch.

    Args:
        model: a ``TimmWrapperForImageClassification``, a timm CNN, a transformers CNN
            (``ResNetForImageClassification``), or any CNN returning logits (a tensor or an output
            with ``.logits``).
        pixel_values: (B, 3, H, W) preprocessed images.
        target: class index for every image, one index per image, or ``None`` for each
            image's predicted class.
        target_layer: module whose (B, C, h, w) output is explained; default: the feature map
            before global pooling (timm, transformers) or the last ``nn.Conv2d``.

    Returns:
        (B, h, w) float tensor on the model's device; each map min-max normalised to [0, 1]
        (a constant map, e.g. no positive evidence, becomes all zeros). The model's train/eval
        modes, ``requires_grad`` flags and parameter ``.grad`` are left as they were, and no
        hook remains.
    """
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (B, C, H, W), got shape {tuple(pixel_values.shape)}")
    param = next(model.parameters(), None)
    if param is not None:
        pixel_values = pixel_values.to(param.device, param.dtype)
    # Gradients flow to the feature map through the input, so frozen parameters need no change.
    pixel_values = pixel_values.detach().clone().requires_grad_(True)

    modes = {module: module.training for module in model.modules()}
    model.eval()  # BatchNorm running statistics, no dropout: each image is explained on its own.
    try:
        with torch.enable_grad():
            features, logits = _features_and_logits(model, pixel_values, target_layer)
            if features.ndim != 4:
                raise ValueError(f"explained feature map must be (B, C, h, w), got shape {tuple(features.shape)}")
            index = _targets(target, logits)
            score = logits.gather(1, index[:, None]).sum()
            (grads,) = torch.autograd.grad(score, features)
    finally:
        for module, training in modes.items():
            module.train(training)

    weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = torch.relu((weights * features).sum(dim=1)).detach()  # (B, h, w)
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
