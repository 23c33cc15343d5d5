"""CNN baselines: TimmWrapper round trips, and EfficientNet-Lite0 really carries ImageNet weights."""

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
    EFFICIENTNET_LITE0_ARCH,
    convert_efficientnet_lite0_state_dict,
    create_efficientnet_lite0,
    create_image_processor,
    create_resnet,
    create_timm_efficientnet_lite0_imagenet,
    efficientnet_lite0_checkpoint_path,
)
from model.labels import DX_CODES

# ImageNet-1k class indices (timm.data.ImageNetInfo agrees, checked below).
IMAGENET_LION, IMAGENET_CHEETAH = 291, 293


def _gradio_image(name: str) -> Path:
    """A natural (non-dermoscopy) photo bundled with the installed gradio package."""
    root = Path(importlib.util.find_spec("gradio").submodule_search_locations[0])
    path = root / "media_assets" / "images" / name
    assert path.is_file(), f"gradio no longer ships {path}"
    return path


@pytest.fixture(scope="module")
def lite0():
    return create_efficientnet_lite0()


@pytest.fixture(scope="module")
def lite0_imagenet():
    return create_timm_efficientnet_lite0_imagenet()


@pytest.fixture(scope="module")
def ham_batch(ham_image_paths, lite0):
    """Two real dermoscopy images, preprocessed for the 224-pixel baselines, (2, 3, 224, 224)."""
    images = [Image.open(p).convert("RGB") for p in ham_image_paths[:2]]
    return create_image_processor(lite0)(images)["pixel_values"]


def test_lite0_image_processor_is_the_tf_lite_preprocessing(lite0):
    # TF EfficientNet-Lite: mean 127 / std 128 on 0..255 pixels, i.e. ~0.5 / 0.5 on [0, 1].
    data = create_image_processor(lite0).data_config
    assert data["mean"] == (0.5, 0.5, 0.5) and data["std"] == (0.5, 0.5, 0.5)
    assert data["input_size"] == (3, 224, 224) and data["crop_pct"] == 0.875


def test_lite0_conversion_matches_reference_implementation(lite0_imagenet):
    """Logit parity with the package's own model code (efficientnet_lite_pytorch)."""
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0").eval()
    reference.load_state_dict(torch.load(efficientnet_lite0_checkpoint_path(), map_location="cpu", weights_only=True))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(lite0_imagenet(x), expected, rtol=1e-4, atol=1e-4)
        # timm's plain efficientnet_lite0 (symmetric padding, BN eps 1e-5) is NOT the same network.
        plain = timm.create_model("efficientnet_lite0").eval()
        plain.load_state_dict(convert_efficientnet_lite0_state_dict(reference.state_dict(), plain.state_dict()))
        assert (plain(x) - expected).abs().max() > 0.1


def test_lite0_keeps_imagenet_top1_on_natural_images(lite0_imagenet):
    names = timm.data.ImageNetInfo()
    assert "lion" in names.index_to_description(IMAGENET_LION)
    assert "cheetah" in names.index_to_description(IMAGENET_CHEETAH)
    processor = create_image_processor(create_efficientnet_lite0(pretrained=False))
    x = processor([Image.open(_gradio_image(n)).convert("RGB") for n in ("lion.jpg", "cheetah1.jpg")])["pixel_values"]
    with torch.no_grad():
        probs = lite0_imagenet(x).softmax(-1)
        torch.manual_seed(0)
        random_probs = timm.create_model(EFFICIENTNET_LITE0_ARCH).eval()(x).softmax(-1)
    # Measured: lion 0.90, cheetah 0.65 (mean=std=0.5 preprocessing).
    assert probs.argmax(-1).tolist() == [IMAGENET_LION, IMAGENET_CHEETAH]
    assert probs[0, IMAGENET_LION] > 0.8 and probs[1, IMAGENET_CHEETAH] > 0.5
    # A randomly initialised network is near-uniform over 1000 classes.
    assert random_probs[0, IMAGENET_LION] < 0.01 and random_probs[1, IMAGENET_CHEETAH] < 0.01


def test_lite0_wrapper_carries_the_imagenet_backbone(lite0, lite0_imagenet, ham_batch):
    with torch.no_grad():
        torch.testing.assert_close(lite0.timm_model.forward_features(ham_batch), lite0_imagenet.forward_features(ham_batch))
    random = create_efficientnet_lite0(pretrained=False)
    assert not torch.equal(random.timm_model.conv_stem.weight, lite0.timm_model.conv_stem.weight)


def test_conversion_rejects_shape_mismatch(lite0_imagenet):
    target = lite0_imagenet.state_dict()
    source = dict(torch.load(efficientnet_lite0_checkpoint_path(), map_location="cpu", weights_only=True))
    key = next(k for k in source if k.endswith("_conv_head.weight"))
    source[key] = source[key][:-1]
    with pytest.raises(ValueError, match="does not match timm conv_head.weight"):
        convert_efficientnet_lite0_state_dict(source, target)
    with pytest.raises(ValueError, match="tensors"):
        convert_efficientnet_lite0_state_dict(dict(list(source.items())[:-1]), target)


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
        lambda: create_efficientnet_lite0(),
    ],
    ids=["resnet18", "resnet50", "efficientnet_lite0"],
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
    model = create_efficientnet_lite0(id2label={0: "other", 1: "mel"}, pretrained=False)
    assert model.config.num_labels == 2 and model.config.label2id == {"other": 0, "mel": 1}
    assert model(torch.zeros(1, 3, 64, 64)).logits.shape == (1, 2)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_save_load_equal_logits(name, tmp_path, ham_batch):
    model = create_resnet("resnet18", pretrained=False) if name == "resnet18" else create_efficientnet_lite0()
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
