"""Grad-CAM: a crafted CNN with a known answer, the real TimmWrapper baselines and their stock ResNet export."""

import pytest
import torch
from PIL import Image
from torch import nn

from model.baselines import create_efficientnet_lite, create_image_processor, create_resnet
from model.gradcam import grad_cam


def _colour_cnn() -> nn.Module:
    """Class 0 = mean red, class 1 = mean green: a 1x1 conv copies R and G into two channels."""
    conv = nn.Conv2d(3, 2, kernel_size=1, bias=False)
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])[:, :, None, None])
        head.weight.copy_(torch.eye(2))
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def _red_green_image() -> torch.Tensor:
    """(1, 3, 8, 8): a red 3x3 square top-left and a smaller green 2x2 square bottom-right."""
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, 0:3, 0:3] = 1.0
    x[0, 1, 6:8, 6:8] = 1.0
    return x


def _state(model: nn.Module):
    return (
        {name: m.training for name, m in model.named_modules()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        [h for m in model.modules() for h in (*m._forward_hooks, *m._forward_pre_hooks, *m._backward_hooks)],
    )


def test_crafted_cnn_peaks_on_the_region_of_the_target_class():
    model, x = _colour_cnn(), _red_green_image()
    red_region = torch.zeros(8, 8, dtype=torch.bool)
    red_region[0:3, 0:3] = True
    cam_red = grad_cam(model, x, target=0)[0]
    assert cam_red.shape == (8, 8)
    assert cam_red[red_region].eq(1).all() and cam_red[~red_region].eq(0).all()
    cam_green = grad_cam(model, x, target=1)[0]
    assert cam_green[6:8, 6:8].eq(1).all() and cam_green.sum() == 4
    # Default target is the prediction: the red square is larger, so class 0 wins.
    assert _colour_cnn()(x).argmax().item() == 0
    torch.testing.assert_close(grad_cam(model, x), cam_red[None])


def test_per_image_targets_and_batch_independence():
    model = _colour_cnn()
    x = torch.cat([_red_green_image(), _red_green_image().flip(-1)])
    cams = grad_cam(model, x, target=[0, 1])
    torch.testing.assert_close(cams[0], grad_cam(model, x[:1], target=0)[0])
    torch.testing.assert_close(cams[1], grad_cam(model, x[1:], target=1)[0])
    assert cams[1][6:8, 0:2].eq(1).all()  # the flipped green square is bottom-left


def test_model_state_is_restored():
    model = _colour_cnn().train()
    model[0].weight.requires_grad_(False)
    before = _state(model)
    with torch.no_grad():  # works even when the caller disabled autograd
        grad_cam(model, _red_green_image())
    assert _state(model) == before and before[2] == []
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs():
    model, x = _colour_cnn(), _red_green_image()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        grad_cam(model, x, target=2)
    with pytest.raises(ValueError, match="one per image"):
        grad_cam(model, x, target=[0, 1])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        grad_cam(model, x[0])
    with pytest.raises(ValueError, match="target_layer"):
        grad_cam(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), x)


@pytest.fixture(scope="module")
def fixture_batch(ham_image_paths):
    images = [Image.open(p).convert("RGB") for p in ham_image_paths[:2]]
    return create_image_processor(create_resnet("resnet18", pretrained=False))(images)["pixel_values"]


@pytest.mark.parametrize(
    "factory",
    [lambda: create_resnet("resnet18", pretrained=False), lambda: create_efficientnet_lite("lite0")],
    ids=["resnet18", "lite0"],
)
def test_timm_wrapper_baselines_on_real_images(factory, fixture_batch):
    model = factory()
    before = _state(model)
    cams = grad_cam(model, fixture_batch)
    assert cams.shape == (2, 7, 7)  # 224 / 32
    assert torch.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    assert (cams.amax(dim=(1, 2)) == 1).all()  # not a constant map
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())


def test_forward_features_path_equals_hook_on_last_stage(fixture_batch):
    model = create_resnet("resnet18", pretrained=False)
    torch.testing.assert_close(
        grad_cam(model, fixture_batch, target=[4, 5]),
        grad_cam(model, fixture_batch, target=[4, 5], target_layer=model.timm_model.layer4),
    )


def test_stock_resnet_export_gets_the_timm_map(fixture_batch):
    """transformers' ResNet is explained on its last stage's output (hidden_states[-1]), the tensor timm's
    forward_features gives, so the stock export of a timm ResNet has the same map; its last nn.Conv2d
    (before BatchNorm and the residual sum) would not."""
    from model.convert import convert_timm_resnet

    wrapper = create_resnet("resnet18", pretrained=False)
    stock = convert_timm_resnet(wrapper.timm_model)
    before = _state(stock)
    expected = grad_cam(wrapper, fixture_batch, target=[4, 5])
    cams = grad_cam(stock, fixture_batch, target=[4, 5])
    torch.testing.assert_close(cams, expected, atol=1e-5, rtol=1e-4)
    assert (cams.amax(dim=(1, 2)) == 1).all()  # not a constant map
    assert _state(stock) == before and all(p.grad is None for p in stock.parameters())
    last_conv = [m for m in stock.modules() if isinstance(m, nn.Conv2d)][-1]
    assert not torch.allclose(grad_cam(stock, fixture_batch, target=[4, 5], target_layer=last_conv), expected)
