"""Hybrid MelanomaViT (Dosovitskiy et al. 2020, section 3.1): tokens from a timm EfficientNet-Lite stem's
stride-16 map. Tiny transformer on tf_efficientnet_lite0 at 32 px (a 2x2 token grid)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from torch import nn

import model  # noqa: F401  (registers the Auto classes)
from model import MelanomaViTConfig, MelanomaViTForImageClassification
from model.convert import export_to_vit, load_hybrid_stem_from_timm, save_vit_export
from model.rollout import attention_rollout

TINY_HYBRID = dict(
    image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    patch_embedding_type="hybrid", backbone="tf_efficientnet_lite0", backbone_stage=4, backbone_channels=112,
)  # fmt: skip
# Output channels of blocks[4], the stride-16 stage, per EfficientNet-Lite variant (checked against timm below).
LITE_CHANNELS = {"tf_efficientnet_lite0": 112, "tf_efficientnet_lite1": 112, "tf_efficientnet_lite2": 120}


def hybrid_model(**overrides) -> MelanomaViTForImageClassification:
    torch.manual_seed(0)
    model_ = MelanomaViTForImageClassification(MelanomaViTConfig(**{**TINY_HYBRID, **overrides}))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so saving/loading them is actually checked
        for module in model_.vit.embeddings.patch_embed.stem.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model_.eval()


def stem_of(model_: MelanomaViTForImageClassification) -> nn.Module:
    return model_.vit.embeddings.patch_embed.stem


@pytest.fixture()
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_forward_shapes_on_the_stride_16_grid(pixels):
    model_ = hybrid_model()
    assert model_.vit.embeddings.grid_size == (2, 2) and model_.vit.embeddings.pos_embed.shape == (1, 1 + 4, 32)
    assert stem_of(model_)(pixels).shape == (2, 112, 2, 2)
    out = model_(pixels, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (2, 7) and torch.isfinite(out.logits).all()
    assert all(h.shape == (2, 1 + 4, 32) for h in out.hidden_states)
    assert all(a.shape == (2, 4, 5, 5) for a in out.attentions)
    bigger = model_(torch.randn(1, 3, 48, 64), output_attentions=True)  # interpolated position embeddings
    assert bigger.attentions[0].shape == (1, 4, 1 + 3 * 4, 1 + 3 * 4)
    with pytest.raises(ValueError, match="divisible by the hybrid stem's stride 16"):
        model_(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        model_(torch.randn(1, 1, 32, 32))


def test_stem_keys_and_lite_channels():
    model_ = hybrid_model()
    keys = list(model_.state_dict())
    stem_keys = [k for k in keys if k.startswith("vit.embeddings.patch_embed.stem.")]
    assert "vit.embeddings.patch_embed.stem.conv_stem.weight" in stem_keys
    assert "vit.embeddings.patch_embed.stem.blocks.4.2.bn3.running_var" in stem_keys  # BN statistics are saved
    assert not [k for k in stem_keys if ".blocks.5." in k]  # cut after backbone_stage
    assert "vit.embeddings.patch_embed.projection.weight" in keys
    for name, channels in LITE_CHANNELS.items():
        info = {f["module"]: f for f in timm.create_model(name, pretrained=False).feature_info}["blocks.4"]
        assert (info["num_chs"], info["reduction"]) == (channels, 16), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(patch_size=8), "needs patch_size=16"),
        (dict(backbone=None), "needs backbone"),
        (dict(backbone_channels=None), "needs backbone_channels"),
        (dict(patch_embedding_type="conv"), "patch_embedding_type must be one of"),
    ],
)
def test_invalid_hybrid_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        MelanomaViTConfig(**{**TINY_HYBRID, **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(backbone_stage=3), "use backbone_stage=4"),
        (dict(backbone_channels=120), "set backbone_channels=112"),
        (dict(backbone="resnet18"), "needs a timm EfficientNet"),
    ],
)
def test_backbone_checked_against_timm_at_build(overrides, message):
    with pytest.raises(ValueError, match=message):
        hybrid_model(**overrides)


def test_save_load_gives_equal_logits(tmp_path, pixels):
    model_ = hybrid_model()
    model_.save_pretrained(tmp_path)
    loaded = MelanomaViTForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(pixels).logits, model_(pixels).logits, rtol=0, atol=0)
    for key, value in model_.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_rollout_on_the_hybrid_grid(pixels):
    model_ = hybrid_model(use_distillation_token=True)
    out = model_(pixels, output_attentions=True)
    maps = attention_rollout(out.attentions, num_prefix_tokens=2, token_rows=("cls", "dist"))
    assert maps.shape == (2, 2, 2) and maps.min() >= 0 and maps.max() == 1
    wide = model_(torch.randn(1, 3, 32, 64), output_attentions=True)
    assert attention_rollout(wide.attentions, num_prefix_tokens=2, grid_size=(2, 4)).shape == (1, 2, 4)


def test_precomputed_stem_maps_give_the_same_logits(pixels):
    model_ = hybrid_model()
    with torch.no_grad():
        expected = model_(pixels).logits
        features = stem_of(model_)(pixels)  # (B, 112, 2, 2)
    model_.vit.embeddings.patch_embed.stem = nn.Identity()
    torch.testing.assert_close(model_(pixel_values=features).logits, expected, rtol=1e-6, atol=1e-6)


def test_frozen_stem_trains_projection_and_transformer(pixels):
    model_ = hybrid_model().train()
    stem = stem_of(model_)
    stem.requires_grad_(False)
    stem.eval()  # frozen BatchNorm: running statistics, none updated
    before = {k: v.clone() for k, v in stem.state_dict().items()}
    model_(pixels, labels=torch.tensor([1, 4])).loss.backward()
    assert all(p.grad is None for p in stem.parameters())
    trainable = {n: p for n, p in model_.named_parameters() if not n.startswith("vit.embeddings.patch_embed.stem.")}
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert "vit.embeddings.patch_embed.projection.weight" in trainable
    for key, value in stem.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


@torch.no_grad()
def test_load_stem_from_timm_matches_timm_features(pixels):
    torch.manual_seed(2)
    timm_model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    for param in timm_model.parameters():
        param.normal_(0.0, 0.1)
    model_ = hybrid_model()
    load_hybrid_stem_from_timm(model_, timm_model)
    x = timm_model.bn1(timm_model.conv_stem(pixels))
    for block in timm_model.blocks[:5]:
        x = block(x)
    torch.testing.assert_close(stem_of(model_)(pixels), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit the stem"):
        load_hybrid_stem_from_timm(model_, timm.create_model("tf_efficientnet_lite2", pretrained=False))


def test_stock_vit_export_refuses_hybrid(tmp_path):
    model_ = hybrid_model()
    with pytest.raises(ValueError, match="no stock transformers ViT/DeiT equivalent"):
        export_to_vit(model_)
    with pytest.raises(ValueError, match="no stock transformers ViT/DeiT equivalent"):
        save_vit_export(model_, tmp_path)


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForImageClassification
    folder, pixels_path = sys.argv[1:3]
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(torch.load(pixels_path, weights_only=True)).logits
    print(json.dumps({"class": type(model).__module__, "logits": logits.tolist(),
                      "leaked": sorted(m for m in sys.modules if m == "model" or m.startswith("model."))}))
    """
)


@pytest.mark.slow
def test_fresh_process_remote_code_load(tmp_path, pixels):
    model_ = hybrid_model()
    model_.save_pretrained(tmp_path / "folder")
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = model_(pixels).logits
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(tmp_path / "folder"), str(tmp_path / "pixels.pt")],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["leaked"] == [] and "transformers_modules" in report["class"]
    torch.testing.assert_close(torch.tensor(report["logits"]), expected, atol=1e-5, rtol=1e-5)
