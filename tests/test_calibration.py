"""model/calibration.py: the one stored calibration form (temperatures folded into the heads) and the
one-time migration of older folders that store temperatures still to apply."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)

from model import MelanomaViTConfig, MelanomaViTForImageClassification
from model.calibration import (
    classifier_heads,
    fold_temperature,
    folded_head_temperatures,
    folded_temperature,
    main,
    migrate,
    unfolded_temperatures,
)
from model.labels import dx_id2label
from model.loading import load_classifier

from conftest import ROOT, TINY_VIT as TINY, edit_config_json

HEADS = {"isic2017": ["mel", "nv", "sk"], "streaks": ["absent", "regular", "irregular"], "blue_whitish_veil": ["no", "yes"]}
HEAD_TEMPERATURES = {"isic2017": 0.7, "streaks": 2.5}  # blue_whitish_veil: none (1.0)
TOL = dict(rtol=1e-5, atol=1e-6)


@torch.no_grad()
def _spread_logits(model: torch.nn.Module) -> None:
    """Random-init heads give near-uniform probabilities; larger heads make T matter in the checks."""
    main_heads, extra = classifier_heads(model)
    for layer in [*main_heads, *extra.values()]:
        layer.weight.mul_(20)


def tiny_melanoma_vit() -> MelanomaViTForImageClassification:
    """Distilled (two averaged main heads) with extra heads, uncalibrated, heads spread out."""
    torch.manual_seed(0)
    config = MelanomaViTConfig(**TINY, use_distillation_token=True, extra_heads=HEADS, id2label=dx_id2label())
    model = MelanomaViTForImageClassification(config).eval()
    _spread_logits(model)
    return model


def tiny_timm_wrapper() -> TimmWrapperForImageClassification:
    torch.manual_seed(0)
    pretrained_cfg = timm.get_pretrained_cfg("test_resnet").to_dict()  # its image processor
    pretrained_cfg.pop("num_classes", None)
    config = TimmWrapperConfig(architecture="test_resnet", id2label=dx_id2label(), pretrained_cfg=pretrained_cfg)
    net = TimmWrapperForImageClassification(config).eval()
    _spread_logits(net)
    return net


@pytest.fixture
def pixels() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


@torch.no_grad()
def test_folding_keeps_every_melanoma_vit_head_calibrated(pixels):
    model = tiny_melanoma_vit()
    raw = model(pixels)
    fold_temperature(model, 1.8, HEAD_TEMPERATURES)
    after = model(pixels)
    # the logits themselves are calibrated: a plain softmax is softmax(raw logits / T), head by head
    torch.testing.assert_close(after.logits, raw.logits / 1.8, **TOL)
    for name in HEADS:
        torch.testing.assert_close(after.head_logits[name], raw.head_logits[name] / HEAD_TEMPERATURES.get(name, 1.0),
                                   **TOL)
    assert (after.logits.softmax(-1) - raw.logits.softmax(-1)).abs().max() > 1e-3  # T did change the probabilities
    # predict_proba / predict_heads are that plain softmax
    torch.testing.assert_close(model.predict_proba(pixels), (raw.logits / 1.8).softmax(-1), **TOL)
    for name, probs in model.predict_heads(pixels).items():
        torch.testing.assert_close(probs, (after.logits if name == "dx" else after.head_logits[name]).softmax(-1))
    assert folded_temperature(model.config) == 1.8 and folded_head_temperatures(model.config) == HEAD_TEMPERATURES
    assert unfolded_temperatures(model.config) == {}


@torch.no_grad()
def test_a_new_fit_replaces_the_earlier_fold(pixels):
    """evaluate.py refits on raw logits (the fold multiplied back): folding it replaces, never compounds."""
    model = tiny_melanoma_vit()
    raw = model(pixels)
    fold_temperature(model, 1.8, {"streaks": 2.5})
    fold_temperature(model, 0.9, {"streaks": 0.5})
    after = model(pixels)
    torch.testing.assert_close(after.logits, raw.logits / 0.9, **TOL)
    torch.testing.assert_close(after.head_logits["streaks"], raw.head_logits["streaks"] / 0.5, **TOL)
    torch.testing.assert_close(after.head_logits["isic2017"], raw.head_logits["isic2017"], **TOL)
    assert folded_temperature(model.config) == 0.9 and folded_head_temperatures(model.config) == {"streaks": 0.5}


def test_fold_refuses_bad_temperatures():
    model = tiny_melanoma_vit()
    with pytest.raises(ValueError, match="temperature must be a float > 0"):
        fold_temperature(model, 0.0)
    with pytest.raises(ValueError, match="No extra head 'other'"):
        fold_temperature(model, None, {"other": 2.0})


@torch.no_grad()
def test_folding_a_timm_wrapper_and_a_stock_deit_with_teacher(pixels):
    net = tiny_timm_wrapper()
    raw = net(pixel_values=pixels).logits
    fold_temperature(net, 0.6)
    torch.testing.assert_close(net(pixel_values=pixels).logits, raw / 0.6, **TOL)
    assert folded_temperature(net.config) == 0.6
    torch.manual_seed(0)
    deit = DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY, num_labels=7)).eval()
    raw = deit(pixel_values=pixels).logits
    fold_temperature(deit, 1.3)  # both heads, averaged at inference
    torch.testing.assert_close(deit(pixel_values=pixels).logits, raw / 1.3, **TOL)


@torch.no_grad()
def test_folded_models_save_and_load_calibrated(tmp_path, pixels):
    for name, model in {"vit": tiny_melanoma_vit(), "cnn": tiny_timm_wrapper()}.items():
        expected = fold_temperature(model, 1.8)(pixel_values=pixels).logits
        model.save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert folded_temperature(saved) == 1.8 and unfolded_temperatures(saved) == {}
        assert not {"temperature", "head_temperatures", "calibration_temperature", "unfolded_temperatures"} & set(saved)
        loaded = AutoModelForImageClassification.from_pretrained(tmp_path / name).eval()
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected)
        assert folded_temperature(loaded.config) == 1.8


def _old_melanoma_vit_folder(tmp_path):
    """An older MelanomaViT folder: raw heads, `temperature` and `head_temperatures` still to apply,
    with its remote code (as on the Hub). Returns (folder, raw model)."""
    model = tiny_melanoma_vit()
    folder = tmp_path / "old_vit"
    model.save_pretrained(folder)
    edit_config_json(folder, temperature=1.8, head_temperatures=HEAD_TEMPERATURES, folded_temperature=None,
                     folded_head_temperatures=None)
    return folder, model


@torch.no_grad()
def test_an_old_melanoma_vit_folder_is_folded_once_at_load(tmp_path, pixels, caplog):
    """What the folder always meant (softmax(logits / T) per head) is what it loads as: the temperatures
    are folded into the loaded heads with a warning, and saving stores the one form. (The Hub's remote-code
    copy does the same: test_modeling_melanoma_vit's fresh-process test loads an old folder.)"""
    folder, raw_model = _old_melanoma_vit_folder(tmp_path)
    raw = raw_model(pixels)
    with caplog.at_level(logging.WARNING):
        loaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert "Migrated an older MelanomaViT calibration" in caplog.text
    out = loaded(pixel_values=pixels)
    torch.testing.assert_close(out.logits, raw.logits / 1.8, **TOL)
    for name in HEADS:
        torch.testing.assert_close(out.head_logits[name], raw.head_logits[name] / HEAD_TEMPERATURES.get(name, 1.0),
                                   **TOL)
    config = loaded.config
    assert folded_temperature(config) == 1.8 and folded_head_temperatures(config) == HEAD_TEMPERATURES
    assert unfolded_temperatures(config) == {} and not hasattr(config, "temperature")
    loaded.save_pretrained(tmp_path / "migrated")
    saved = json.loads((tmp_path / "migrated" / "config.json").read_text())
    assert unfolded_temperatures(saved) == {} and saved["folded_temperature"] == 1.8
    caplog.clear()
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "migrated")
    torch.testing.assert_close(again.eval()(pixel_values=pixels).logits, out.logits)  # folded once, not twice
    assert "Migrated" not in caplog.text


def test_an_old_config_alone_keeps_its_temperatures_unserialised(tmp_path):
    """transformers 5 would drop an undeclared `temperature` silently: the config reads it, says so, and
    never writes it back (only the model's load can fold it)."""
    folder, _ = _old_melanoma_vit_folder(tmp_path)
    config = AutoConfig.from_pretrained(folder)
    assert config.unfolded_temperatures == {"temperature": 1.8, "head_temperatures": HEAD_TEMPERATURES}
    assert unfolded_temperatures(config) == config.unfolded_temperatures
    assert not {"temperature", "head_temperatures", "unfolded_temperatures"} & set(config.to_dict())
    # the stored form's former defaults are no temperature at all (every shipped folder had them)
    assert MelanomaViTConfig(temperature=1.0, head_temperatures=None).unfolded_temperatures == {}
    with pytest.raises(ValueError, match="temperature .* must be a float > 0"):
        MelanomaViTConfig(temperature=0.0)
    with pytest.raises(ValueError, match="head_temperatures names 'other'"):
        MelanomaViTConfig(**TINY, extra_heads=HEADS, head_temperatures={"other": 2.0})


@torch.no_grad()
def test_a_model_built_from_an_old_config_is_migrated_before_folding(pixels):
    torch.manual_seed(0)
    model = MelanomaViTForImageClassification(MelanomaViTConfig(**TINY, temperature=2.0)).eval()
    raw = model(pixels).logits
    with pytest.raises(ValueError, match="migrate them first"):
        fold_temperature(model, 1.5)
    assert migrate(model) == {"temperature": 2.0} and migrate(model) == {}
    torch.testing.assert_close(model(pixels).logits, raw / 2.0, **TOL)


def test_old_folders_with_both_forms_are_refused(tmp_path):
    folder, _ = _old_melanoma_vit_folder(tmp_path)
    edit_config_json(folder, folded_temperature=0.9)
    with pytest.raises(ValueError, match="fitted on the raw or on the folded logits"):
        AutoModelForImageClassification.from_pretrained(folder)


@torch.no_grad()
def test_an_old_timm_folder_is_migrated_by_the_loader_and_rewritten_by_the_command(tmp_path, pixels, caplog):
    """TimmWrapper / stock ViT exports stored `calibration_temperature`: `load_classifier` folds it (no
    class of ours to hook), and `python -m model.calibration <folder>` stores the folded form."""
    net = tiny_timm_wrapper()
    raw = net(pixel_values=pixels).logits
    folder = tmp_path / "old_cnn"
    net.save_pretrained(folder)
    edit_config_json(folder, calibration_temperature=0.6)
    with caplog.at_level(logging.WARNING, logger="model.loading"):
        loaded, _ = load_classifier(folder)
    assert f"python -m model.calibration {folder}" in caplog.text
    torch.testing.assert_close(loaded(pixel_values=pixels).logits, raw / 0.6, **TOL)
    assert folded_temperature(loaded.config) == 0.6 and unfolded_temperatures(loaded.config) == {}
    assert main([str(folder)]) == 0
    saved = json.loads((folder / "config.json").read_text())
    assert unfolded_temperatures(saved) == {} and saved["folded_temperature"] == 0.6
    plain = AutoModelForImageClassification.from_pretrained(folder).eval()  # no migration needed any more
    torch.testing.assert_close(plain(pixel_values=pixels).logits, raw / 0.6, **TOL)


def test_uncalibrated_models_are_left_alone():
    model = MelanomaViTForImageClassification(MelanomaViTConfig(**TINY)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert migrate(model) == {}
    fold_temperature(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert folded_temperature(model.config) is None and unfolded_temperatures(model.config) == {}


def test_no_remaining_use_of_the_removed_names():
    """The unfolded form survives only where it is read to be migrated."""
    readers = {"model/calibration.py", "model/configuration_melanoma_vit.py", "model/modeling_melanoma_vit.py"}
    for path in sorted((ROOT / "model").glob("*.py")):
        if path.relative_to(ROOT).as_posix() in readers:
            continue
        text = path.read_text()
        for name in ("head_temperatures=", "config.temperature", "calibration_temperature", "config_temperature"):
            assert name not in text, f"{path.name} uses {name}"
