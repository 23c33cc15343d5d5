"""model/calibration.py: folding a fitted temperature into the classifier head(s), once."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)

from model import MelanomaViTConfig, MelanomaViTForImageClassification
from model.calibration import (
    classifier_heads,
    config_temperature,
    fold_temperature,
    folded_temperature,
    store_temperature,
    unfold_temperature,
)
from model.labels import dx_id2label

from conftest import TINY_VIT as TINY
HEADS = {"isic2017": ["mel", "nv", "sk"], "streaks": ["absent", "regular", "irregular"], "blue_whitish_veil": ["no", "yes"]}
HEAD_TEMPERATURES = {"isic2017": 0.7, "streaks": 2.5}  # blue_whitish_veil: none (1.0)
TOL = dict(rtol=1e-5, atol=1e-6)


def tiny_melanoma_vit() -> MelanomaViTForImageClassification:
    """Distilled (two averaged main heads) with extra heads, temperatures not folded yet."""
    torch.manual_seed(0)
    config = MelanomaViTConfig(**TINY, use_distillation_token=True, temperature=1.8, extra_heads=HEADS,
                               head_temperatures=HEAD_TEMPERATURES, id2label=dx_id2label())
    return MelanomaViTForImageClassification(config).eval()


def tiny_timm_wrapper(temperature: float = 0.6) -> TimmWrapperForImageClassification:
    torch.manual_seed(0)
    net = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=7)).eval()
    store_temperature(net.config, temperature)
    return net


@pytest.fixture
def pixels() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


@torch.no_grad()
def _spread_logits(model: torch.nn.Module) -> None:
    """Random-init heads give near-uniform probabilities; larger heads make T matter in the checks."""
    main, extra = classifier_heads(model)
    for layer in [*main, *extra.values()]:
        layer.weight.mul_(20)


@torch.no_grad()
def test_folding_keeps_every_melanoma_vit_head_calibrated(pixels):
    model = tiny_melanoma_vit()
    _spread_logits(model)
    before = model.predict_heads(pixels)  # softmax(logits / T) per head
    raw = model(pixels)
    fold_temperature(model)
    after = model(pixels)
    # the logits themselves are now calibrated: a plain softmax equals the calibrated probabilities
    torch.testing.assert_close(after.logits, raw.logits / 1.8, **TOL)
    torch.testing.assert_close(after.logits.softmax(-1), before["dx"], **TOL)
    for name in HEADS:
        torch.testing.assert_close(after.head_logits[name].softmax(-1), before[name], **TOL)
        t = HEAD_TEMPERATURES.get(name, 1.0)
        torch.testing.assert_close(after.head_logits[name], raw.head_logits[name] / t, **TOL)
    assert (before["dx"] - torch.softmax(raw.logits, -1)).abs().max() > 1e-3  # T did change the probabilities
    # predict_proba / predict_heads / the app's rule agree with pipeline's plain softmax
    for name, probs in model.predict_heads(pixels).items():
        torch.testing.assert_close(probs, before[name], **TOL)
    config = model.config
    assert config_temperature(config) is None and config.temperature == 1.0 and config.head_temperatures is None
    assert folded_temperature(config) == 1.8 and config.folded_head_temperatures == HEAD_TEMPERATURES


@torch.no_grad()
def test_folding_a_timm_wrapper_head(pixels):
    net = tiny_timm_wrapper(0.6)
    raw = net(pixel_values=pixels).logits
    fold_temperature(net)
    torch.testing.assert_close(net(pixel_values=pixels).logits.softmax(-1), (raw / 0.6).softmax(-1), **TOL)
    assert config_temperature(net.config) is None and folded_temperature(net.config) == 0.6
    assert "calibration_temperature" not in net.config.to_dict()


@torch.no_grad()
def test_folding_a_stock_deit_with_teacher_scales_both_heads(pixels):
    torch.manual_seed(0)
    net = DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY, num_labels=7)).eval()
    raw = net(pixel_values=pixels).logits
    store_temperature(net.config, 1.3)
    fold_temperature(net)
    torch.testing.assert_close(net(pixel_values=pixels).logits, raw / 1.3, **TOL)


@torch.no_grad()
def test_folded_models_save_and_load_calibrated(tmp_path, pixels):
    for name, model in {"vit": tiny_melanoma_vit(), "cnn": tiny_timm_wrapper()}.items():
        expected = fold_temperature(model)(pixel_values=pixels).logits
        model.save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert config_temperature(saved) is None and folded_temperature(saved) == folded_temperature(model.config)
        loaded = AutoModelForImageClassification.from_pretrained(tmp_path / name).eval()
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected)
        assert folded_temperature(loaded.config) == folded_temperature(model.config)
        assert config_temperature(loaded.config) is None


@torch.no_grad()
def test_folding_never_divides_twice(pixels):
    model = tiny_melanoma_vit()
    fold_temperature(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fold_temperature(model)  # nothing left to fold: unchanged
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert folded_temperature(model.config) == 1.8
    # a new temperature on top of a folded one is ambiguous (fitted on raw or folded logits?): refused
    model.config.temperature = 1.2
    with pytest.raises(ValueError, match="refusing to fold twice"):
        fold_temperature(model)
    model.config.temperature = 1.0
    model.config.head_temperatures = {"streaks": 2.0}
    with pytest.raises(ValueError, match="unfold_temperature"):
        fold_temperature(model)
    model.config.head_temperatures = None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def test_unfold_restores_raw_logits_and_temperatures(pixels):
    for model in (tiny_melanoma_vit(), tiny_timm_wrapper(0.6)):
        raw = model(pixel_values=pixels).logits
        before = model.config.to_dict()
        unfold_temperature(fold_temperature(model))
        torch.testing.assert_close(model(pixel_values=pixels).logits, raw, **TOL)
        after = model.config.to_dict()
        assert after == before and folded_temperature(model.config) is None


def test_uncalibrated_models_are_left_alone(pixels):
    model = MelanomaViTForImageClassification(MelanomaViTConfig(**TINY)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fold_temperature(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert folded_temperature(model.config) is None and config_temperature(model.config) is None
