"""Converters: timm ViT/DeiT -> MelanomaViT -> stock transformers ViT/DeiT, timm ResNet -> transformers ResNet,
checked by logits parity."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from PIL import Image
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ResNetForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTForImageClassification,
    ViTImageProcessor,
)

import model  # noqa: F401  (registers the Auto classes)
from model import MelanomaViTConfig, MelanomaViTForImageClassification
from model.calibration import fold_temperature
from model.baselines import create_image_processor
from model.convert import (
    convert_timm_checkpoint,
    convert_timm_resnet,
    export_to_vit,
    melanoma_vit_config_from_timm,
    melanoma_vit_state_dict_to_vit,
    resnet_config_from_timm,
    resnet_image_processor,
    save_resnet_export,
    save_vit_export,
    timm_resnet_state_dict_to_resnet,
    timm_state_dict_to_melanoma_vit,
)
from model.labels import DX_CODES, dx_id2label, dx_label2id

TIMM_CASES = {
    "vit_tiny_custom": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                                      mlp_ratio=37 / 32, num_classes=7)),
    "vit_small_no_qkv_bias": ("vit_small_patch16_224", dict(img_size=48, patch_size=16, embed_dim=48, depth=3,
                                                             num_heads=3, num_classes=3, qkv_bias=False)),
    "vit_rect": ("vit_base_patch16_224", dict(img_size=(32, 48), patch_size=8, embed_dim=24, depth=1, num_heads=2,
                                               num_classes=2)),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                                     num_heads=4, num_classes=7)),
}  # fmt: skip
TOL = dict(atol=1e-4, rtol=1e-4)


def random_timm(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm model with every parameter random (timm zero-inits some biases, which would hide mix-ups)."""
    torch.manual_seed(seed)
    timm_model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for param in timm_model.parameters():
            param.normal_(0.0, 0.2)
    return timm_model


def pixels_for(timm_model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    height, width = timm_model.patch_embed.img_size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", params=sorted(TIMM_CASES))
def timm_case(request):
    name, kwargs = TIMM_CASES[request.param]
    return random_timm(name, **kwargs)


@torch.no_grad()
def test_timm_conversion_parity(timm_case):
    ours = convert_timm_checkpoint(timm_case)
    x = pixels_for(timm_case)
    expected = timm_case(x)
    assert expected.std() > 0.1  # logits carry signal, so equality means something
    torch.testing.assert_close(ours(x).logits, expected, **TOL)
    torch.testing.assert_close(ours(x, output_attentions=True).logits, expected, **TOL)
    assert ours.config.use_distillation_token == hasattr(timm_case, "dist_token")
    assert ours.config.num_labels == timm_case.num_classes


@torch.no_grad()
def test_timm_state_dict_conversion_is_pure_renaming(timm_case):
    timm_sd = timm_case.state_dict()
    converted = timm_state_dict_to_melanoma_vit(timm_sd)
    assert len(converted) == len(timm_sd)
    assert {id(t) for t in converted.values()} == {id(t) for t in timm_sd.values()}  # same tensors, new names
    ours = MelanomaViTForImageClassification(melanoma_vit_config_from_timm(timm_case))
    assert set(converted) == set(ours.state_dict())


@torch.no_grad()
def test_interpolated_input_matches_timm_dynamic_size():
    name, kwargs = TIMM_CASES["deit_tiny_distilled"]
    timm_model = random_timm(name, dynamic_img_size=True, **kwargs)
    ours = convert_timm_checkpoint(timm_model)
    x = torch.randn(2, 3, 48, 40)
    torch.testing.assert_close(ours(x).logits, timm_model(x), **TOL)


def test_default_labels_and_custom_id2label():
    name, kwargs = TIMM_CASES["vit_tiny_custom"]
    timm_model = random_timm(name, **kwargs)
    assert [convert_timm_checkpoint(timm_model).config.id2label[i] for i in range(7)] == list(DX_CODES)
    names = {i: f"class_{i}" for i in range(7)}
    assert convert_timm_checkpoint(timm_model, id2label=names).config.label2id["class_3"] == 3
    with pytest.raises(ValueError, match="id2label has 2 entries but the timm head has 7 classes"):
        convert_timm_checkpoint(timm_model, id2label={0: "a", 1: "b"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(init_values=1e-5), "layer scale"),
        (dict(reg_tokens=2), "register tokens"),
        (dict(global_pool="avg"), "global_pool='avg'"),
        (dict(class_token=False, global_pool="avg"), "class token"),
        (dict(qk_norm=True), "qk-norm"),
        (dict(num_classes=0), "num_classes > 0"),
    ],
)
def test_unsupported_timm_variants_raise(kwargs, message):
    timm_model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4,
        **{"num_classes": 7, **kwargs},
    )
    with pytest.raises(ValueError, match=message):
        convert_timm_checkpoint(timm_model)


def test_state_dict_with_unknown_keys_raises():
    name, kwargs = TIMM_CASES["vit_tiny_custom"]
    state_dict = random_timm(name, **kwargs).state_dict()
    state_dict["blocks.0.ls1.gamma"] = torch.ones(32)
    with pytest.raises(ValueError, match=r"no MelanomaViT equivalent: \['blocks.0.ls1.gamma'\]"):
        timm_state_dict_to_melanoma_vit(state_dict)


@torch.no_grad()
def test_export_to_vit_parity(timm_case):
    ours = convert_timm_checkpoint(timm_case)
    exported = export_to_vit(ours)
    distilled = ours.config.use_distillation_token
    expected_class = DeiTForImageClassificationWithTeacher if distilled else ViTForImageClassification
    assert type(exported) is expected_class and not exported.training
    x = pixels_for(timm_case)
    torch.testing.assert_close(exported(x).logits, ours(x).logits, **TOL)
    assert exported.config.id2label == ours.config.id2label


@torch.no_grad()
def test_export_keeps_the_folded_calibration():
    """The one stored form: the temperature is in the head weights, so the export carries it as they are."""
    torch.manual_seed(0)
    config = MelanomaViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37, melanoma_threshold=0.3)  # fmt: skip
    ours = MelanomaViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    logits = ours(x).logits
    fold_temperature(ours, 2.0)
    exported = export_to_vit(ours)
    torch.testing.assert_close(exported(x).logits, logits / 2.0, **TOL)
    torch.testing.assert_close(exported(x).logits.softmax(-1), ours.predict_proba(x), **TOL)
    assert exported.config.melanoma_threshold == 0.3 and exported.config.folded_temperature == 2.0
    assert not hasattr(exported.config, "calibration_temperature")


@torch.no_grad()
def test_export_of_a_model_built_from_an_older_config_folds_its_temperature():
    """Built (not loaded, which migrates) from a config with a temperature still to apply: the export folds
    it into a copy, so the stock model's softmax is what the older form meant; the source is left as it was."""
    torch.manual_seed(0)
    config = MelanomaViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37, temperature=2.0)  # fmt: skip
    ours = MelanomaViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    logits = ours(x).logits
    exported = export_to_vit(ours)
    torch.testing.assert_close(exported(x).logits, logits / 2.0, **TOL)
    assert exported.config.folded_temperature == 2.0
    assert ours.config.unfolded_temperatures == {"temperature": 2.0} and ours(x).logits.equal(logits)


def test_state_dict_to_vit_layouts_and_errors():
    name, kwargs = TIMM_CASES["vit_tiny_custom"]
    ours_sd = convert_timm_checkpoint(random_timm(name, **kwargs)).state_dict()
    v5 = melanoma_vit_state_dict_to_vit(ours_sd, 2, layout="v5")
    v4 = melanoma_vit_state_dict_to_vit(ours_sd, 2, layout="v4")
    assert len(v4) == len(v5) == len(ours_sd) + 2 * 2 * 2  # qkv weight+bias split in 3 per block
    qkv = ours_sd["vit.encoder.blocks.1.attn.qkv.weight"]
    torch.testing.assert_close(v4["vit.encoder.layer.1.attention.attention.key.weight"], qkv[32:64])
    torch.testing.assert_close(v5["vit.layers.1.attention.k_proj.weight"], qkv[32:64])
    with pytest.raises(ValueError, match="layout must be one of"):
        melanoma_vit_state_dict_to_vit(ours_sd, 2, layout="v3")
    with pytest.raises(ValueError, match="lacks a distillation token"):
        melanoma_vit_state_dict_to_vit(ours_sd, 2, distilled=True)


FRESH_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForImageClassification, pipeline
    from PIL import Image
    pixels_path, image_path, *folders = sys.argv[1:]
    pixels = torch.load(pixels_path, weights_only=True)
    report = {}
    for folder in folders:
        model = AutoModelForImageClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(pixels).logits
        preds = pipeline("image-classification", model=folder, device="cpu")(Image.open(image_path), top_k=3)
        report[folder] = {"class": type(model).__name__, "logits": logits.tolist(), "preds": preds}
    report["leaked"] = sorted(m for m in sys.modules if m == "model" or m.startswith("model."))
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_saved_vit_export_loads_without_remote_code_in_fresh_process(tmp_path, ham_image_paths):
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "pixels.pt")
    expected = {}
    for case, hf_class in (("vit_tiny_custom", "ViTForImageClassification"),
                           ("deit_tiny_distilled", "DeiTForImageClassificationWithTeacher")):  # fmt: skip
        name, kwargs = TIMM_CASES[case]
        ours = convert_timm_checkpoint(random_timm(name, **kwargs))
        folder = save_vit_export(ours, tmp_path / case)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
        assert "auto_map" not in json.loads((folder / "config.json").read_text())
        assert not list(folder.glob("*.py"))  # stock transformers only
        with torch.no_grad():
            expected[str(folder)] = (hf_class, ours(x).logits)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD_SCRIPT, str(tmp_path / "pixels.pt"), str(ham_image_paths[1]), *expected],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("leaked") == []
    for folder, (hf_class, logits) in expected.items():
        assert report[folder]["class"] == hf_class
        torch.testing.assert_close(torch.tensor(report[folder]["logits"]), logits, **TOL)
        assert len(report[folder]["preds"]) == 3 and {p["label"] for p in report[folder]["preds"]} <= set(DX_CODES)


# ------------------------------------------------------------------------------------------- ResNet
# Tiny timm ResNets of both block kinds (channels 8..64, one or two blocks per stage).
RESNET_CASES = {
    "basic": dict(block=BasicBlock, layers=[1, 2, 1, 1], channels=(8, 16, 32, 64)),
    "bottleneck": dict(block=Bottleneck, layers=[2, 1, 1, 1], channels=(8, 16, 32, 64)),
}


def random_timm_resnet(case: str, seed: int = 0, **kwargs) -> ResNet:
    """A tiny timm ResNet with random weights and BatchNorm statistics (defaults would hide BN mix-ups)."""
    torch.manual_seed(seed)
    timm_model = ResNet(**{**RESNET_CASES[case], "num_classes": 7, **kwargs}).eval()
    with torch.no_grad():
        for param in timm_model.parameters():
            param.normal_(0.0, 0.2)
        for name, buffer in timm_model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buffer.normal_(0.0, 0.2)
    return timm_model


@pytest.mark.parametrize("case", sorted(RESNET_CASES))
@torch.no_grad()
def test_timm_resnet_conversion_parity(case):
    timm_model = random_timm_resnet(case)
    ours = convert_timm_resnet(timm_model)
    assert type(ours) is ResNetForImageClassification and not ours.training
    assert ours.config.layer_type == case and ours.config.depths == RESNET_CASES[case]["layers"]
    for x in (torch.randn(2, 3, 64, 64), torch.randn(2, 3, 48, 40)):  # any input size, as in timm
        expected = timm_model(x)
        assert expected.std() > 0.1  # logits carry signal, so equality means something
        torch.testing.assert_close(ours(x).logits, expected, **TOL)
    assert [ours.config.id2label[i] for i in range(7)] == list(DX_CODES)


@pytest.mark.parametrize("case", sorted(RESNET_CASES))
def test_timm_resnet_state_dict_conversion_is_pure_renaming(case):
    timm_sd = random_timm_resnet(case).state_dict()
    converted = timm_resnet_state_dict_to_resnet(timm_sd)
    assert len(converted) == len(timm_sd)
    assert {id(t) for t in converted.values()} == {id(t) for t in timm_sd.values()}  # same tensors, new names
    assert converted["resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var"] is timm_sd[
        "layer2.0.downsample.1.running_var"]
    assert converted["resnet.encoder.stages.3.layers.0.layer.1.convolution.weight"] is timm_sd["layer4.0.conv2.weight"]
    hf = ResNetForImageClassification(resnet_config_from_timm(random_timm_resnet(case)))
    assert set(converted) == set(hf.state_dict())
    with pytest.raises(ValueError, match=r"no transformers ResNet equivalent: \['layer1.0.se.fc1.weight'\]"):
        timm_resnet_state_dict_to_resnet({**timm_sd, "layer1.0.se.fc1.weight": torch.ones(1)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(stem_type="deep"), "deep or non-7x7 stem"),
        (dict(avg_down=True), "average-pool or k x k shortcuts"),
        (dict(block=Bottleneck, cardinality=2, base_width=32), "grouped or dilated"),
        (dict(output_stride=16), "grouped or dilated"),
        (dict(act_layer=torch.nn.SiLU), "other than ReLU"),
        (dict(num_classes=0), "num_classes > 0"),
    ],
)
def test_unsupported_timm_resnet_variants_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert_timm_resnet(random_timm_resnet("basic", **kwargs))


def tiny_timm_wrapper_resnet(**config_keys) -> TimmWrapperForImageClassification:
    """A TimmWrapper resnet18 (narrowed to channels 8..64, one block per stage) at 32 px with squash
    preprocessing, as train.py saves its timm models."""
    pretrained_cfg = timm.models.get_pretrained_cfg("resnet18").to_dict()
    pretrained_cfg.update(input_size=[3, 32, 32], crop_pct=1.0, crop_mode="squash")
    config = TimmWrapperConfig(architecture="resnet18", pretrained_cfg=pretrained_cfg, id2label=dx_id2label(),
                               label2id=dx_label2id(), model_args={"channels": [8, 16, 32, 64], "layers": [1, 1, 1, 1]},
                               **config_keys)
    torch.manual_seed(0)
    return TimmWrapperForImageClassification(config).eval()


@torch.no_grad()
def test_save_resnet_export_keeps_logits_labels_project_keys_and_pixels(tmp_path, ham_image_paths):
    points = {"flag": {"threshold": 0.07, "sensitivity": 0.95, "specificity": 0.3}, "command": "python ..."}
    offsets = {code: 0.1 * i for i, code in enumerate(DX_CODES)}
    wrapper = tiny_timm_wrapper_resnet(folded_temperature=0.75, melanoma_threshold=0.07,
                                       melanoma_operating_points=points, dx_decision_offsets=offsets)
    folder = save_resnet_export(wrapper, tmp_path / "stock")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["ResNetForImageClassification"] and config["model_type"] == "resnet"
    assert [config["id2label"][str(i)] for i in range(7)] == list(DX_CODES)
    assert (config["folded_temperature"], config["melanoma_threshold"]) == (0.75, 0.07)
    assert config["melanoma_operating_points"] == points and config["dx_decision_offsets"] == offsets
    assert not {"label_names", "pretrained_cfg", "architecture", "num_classes", "model_args"} & set(config)

    stock = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    images = [Image.open(p).convert("RGB") for p in ham_image_paths[:3]]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    # the same pixels as the TimmWrapper processor (squash resize, bicubic, its mean/std), then the same logits
    torch.testing.assert_close(pixels, create_image_processor(wrapper)(images)["pixel_values"], **TOL)
    torch.testing.assert_close(stock(pixels).logits, wrapper(pixels).logits, **TOL)


@torch.no_grad()
def test_save_resnet_export_folds_a_temperature_still_to_apply(tmp_path):
    wrapper = tiny_timm_wrapper_resnet(calibration_temperature=2.0)
    x = torch.randn(2, 3, 32, 32)
    raw = wrapper(x).logits
    stock = AutoModelForImageClassification.from_pretrained(save_resnet_export(wrapper, tmp_path / "stock"))
    torch.testing.assert_close(stock.eval()(x).logits, raw / 2.0, **TOL)
    assert stock.config.folded_temperature == 2.0 and getattr(stock.config, "calibration_temperature", None) is None
    assert wrapper.config.calibration_temperature == 2.0  # the source is left as it was
    fold_temperature(stock, 4.0)  # a ResNet head folds like the others (refit on raw logits)
    torch.testing.assert_close(stock(x).logits, raw / 4.0, **TOL)


def test_resnet_image_processor_refuses_cropping_geometry():
    wrapper = tiny_timm_wrapper_resnet()
    wrapper.config.pretrained_cfg = {**wrapper.config.pretrained_cfg, "crop_mode": "center", "crop_pct": 0.875}
    with pytest.raises(ValueError, match="only a squash resize"):
        resnet_image_processor(create_image_processor(wrapper))
