"""The attention target of a ViT recipe (issue 18 section 3): lesion masks travel with every cached
view through the same geometry as its pixels, the loss is the bench's rollout-share measure, and a
tiny ViT trained with it puts more rollout mass on the lesion than the same run without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessor

from model.rollout import attention_rollout
from train.features import load_cache, load_mask_cache
from train.losses import attention_mask_loss, rollout_mask_share
from train.metrics import mask_share
from train.multisource import CachedFeatures
from train.sources import SourceSpec, load_sources
from train.train import _build, _validate, TrainConfig, main
from train.transforms import NO_MASK, build_transforms

AUGMENT = {"crop_scale": [0.3, 1.0], "color_cast": 0.15, "blur": 0.5}  # no vignette: it may black out the corner
# every view zoomed out (the whole image shrunk onto a canvas of its border colour), with noise
ZOOM_OUT = {**AUGMENT, "zoom_out": 1.0, "zoom_out_scale": [0.4, 0.9], "noise": 1.0}


@pytest.fixture()
def quadrant_image(tmp_path: Path, ham_image_paths: list[Path]) -> tuple[Path, Path]:
    """A real fixture image, dimmed, with its top-left quadrant painted white, and a mask of that quadrant."""
    image = Image.open(ham_image_paths[0]).convert("RGB")
    pixels = (np.asarray(image) * 0.7).astype(np.uint8)  # so a zoom-out's canvas (the border colour) is not white
    h, w = pixels.shape[:2]
    pixels[: h // 2, : w // 2] = 255
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2, : w // 2] = 255
    Image.fromarray(pixels).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "img.png", tmp_path / "mask.png"


@pytest.mark.parametrize(("train", "augment"), [(True, AUGMENT), (True, ZOOM_OUT), (False, AUGMENT)])
def test_mask_follows_the_views_geometry(quadrant_image: tuple[Path, Path], train: bool, augment: dict) -> None:
    """Flips, quarter turns, transposes, crops and zoom-outs move the mask with the pixels; colour
    changes and noise leave it binary. The white quadrant stays under the mask in every augmented view."""
    image, mask = quadrant_image
    processor = ViTImageProcessor(size={"height": 64, "width": 64})
    transform = build_transforms(processor, train, augment)
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform({"image": [{"path": str(image), "bytes": None}, {"path": str(image), "bytes": None}],
                         "label": [0, 0], "mask": [str(mask), None]})
        m = out["masks"][0]
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert (out["masks"][1] == NO_MASK).all()
        bright = out["pixel_values"][0].mean(0)  # (H, W), normalised
        if 0 < m.mean() < 1:
            wrong = m.flip(0, 1)  # the same quadrant, misplaced
            assert bright[m == 1].mean() > bright[m == 0].mean() + 0.15, seed
            assert bright[m == 1].mean() > bright[wrong == 1].mean() + 0.15, seed
        torch.manual_seed(seed)  # the mask does not change the pixels' random draws
        alone = transform({"image": [{"path": str(image), "bytes": None}], "label": [0]})
        torch.testing.assert_close(alone["pixel_values"][0], out["pixel_values"][0])


def test_cached_view_and_its_mask_turn_together() -> None:
    """CachedFeatures draws the same view and the same dihedral symmetry for pixels and mask."""
    torch.manual_seed(0)
    masks = (torch.rand(3, 5, 4, 4) > 0.5).half()  # (V, N, h, w)
    features = masks[:, :, None].repeat(1, 1, 2, 1, 1)  # channel c == the mask
    ds = CachedFeatures(features, torch.zeros(5, dtype=torch.long), augment=True, dihedral=True, masks=masks)
    for _ in range(10):
        for item in ds.__getitems__(list(range(5))):
            torch.testing.assert_close(item["pixel_values"][0], item["lesion_mask"])
    with pytest.raises(ValueError, match="do not match"):
        CachedFeatures(features, torch.zeros(5, dtype=torch.long), masks=masks[:2])


def test_loss_is_the_bench_share_on_the_patch_grid() -> None:
    """rollout_mask_share equals train.metrics.mask_share (the bench's measure) when the mask is
    constant on each cell; the loss ignores rows without a mask and passes gradients."""
    torch.manual_seed(0)
    attentions = [torch.softmax(torch.randn(3, 2, 17, 17, requires_grad=True), -1) for _ in range(2)]
    maps = attention_rollout(attentions, grid_size=(4, 4), detach=False)  # (3, 4, 4)
    cells = torch.zeros(3, 4, 4)
    cells[0, 1:3, 1:3] = 1
    cells[1, :, :2] = 1
    cells[2] = NO_MASK
    share, has_mask = rollout_mask_share(maps, cells)
    assert has_mask.tolist() == [True, True, False]
    for i in range(2):
        full = cells[i].repeat_interleave(16, 0).repeat_interleave(16, 1)
        nearest = torch.nn.functional.interpolate(maps[i, None, None].detach(), size=(64, 64), mode="nearest")[0, 0]
        assert abs(float(share[i]) - mask_share(nearest.numpy()[::16, ::16], full.numpy())) < 0.05
    loss = attention_mask_loss(maps, cells)
    assert torch.isclose(loss, 1 - share[:2].mean())
    loss.backward()
    assert attentions[0].grad is None  # non-leaf; the leaves' grads exist
    assert attention_mask_loss(maps.detach(), torch.full((3, 4, 4), NO_MASK)) == 0


def test_a_map_inside_the_lesion_scores_one() -> None:
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 1] = 1.0
    cells = torch.zeros(1, 4, 4)
    cells[0, :2, :2] = 1
    assert float(rollout_mask_share(maps, cells)[0]) == 1.0
    assert float(attention_mask_loss(maps, cells)) == 0.0


@pytest.mark.parametrize(("change", "message"), [
    ({"attention_target": {"weight": 1.0, "masks": {"ham10000": "m"}}}, "needs cached-feature batches"),
    ({"attention_target": {"weight": 1.0, "masks": {"ham": "m"}}, "feature_cache": {"dir": "x"}}, "masks: {source"),
    ({"attention_target": {"weight": 1.0, "mask": {"ham10000": "m"}}, "feature_cache": {"dir": "x"}}, "masks: {source"),
    ({"attention_target": {"weight": 0, "masks": {"ham10000": "m"}}, "feature_cache": {"dir": "x"}}, "weight must be > 0"),
])
def test_recipe_refuses_an_attention_target_it_cannot_use(change: dict, message: str, ham_dir: Path) -> None:
    raw = {"sources": [{"name": "ham10000", "data": str(ham_dir)}], **change}
    with pytest.raises(ValueError, match=message.replace("{", r"\{")):
        _validate(_build(TrainConfig, raw, "recipe"))


def test_single_source_recipe_refuses_an_attention_target() -> None:
    with pytest.raises(ValueError, match="attention_target is for multi-source recipes"):
        _validate(_build(TrainConfig, {"attention_target": {"weight": 1.0, "masks": {"ham10000": "m"}}}, "recipe"))


@pytest.mark.slow
def test_vit_trained_with_the_target_looks_more_at_the_lesion(tmp_path: Path, ham_dir: Path) -> None:
    """Two runs of a tiny pure ViT on the HAM10000 fixtures, with and without the attention target:
    the pixel cache holds each view's mask (view 0: the real mask, resized), validation reports the
    rollout share, and the run with the target ends with the higher share."""
    specs = [{"name": "ham10000", "data": str(ham_dir), "val_size": 0.25, "test_size": 0.01}]
    common = {
        "model": {"name": "melanoma_vit", "kwargs": {
            "image_size": 64, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64}},
        "sources": specs, "feature_cache": {"dir": str(tmp_path / "cache"), "views": 2, "dihedral": True},
        "batch_size": 4, "eval_batch_size": 8, "epochs": 12, "learning_rate": 3e-3, "report_to": "none",
        "attention_target": {"weight": 4.0, "masks": {"ham10000": str(ham_dir / "masks")}},
    }
    shares: dict[str, list[float]] = {}
    for name, weight in (("with", 4.0), ("without", 1e-9)):
        recipe = json.loads(json.dumps(common))
        recipe["attention_target"]["weight"] = weight
        (tmp_path / f"{name}.yaml").write_text(json.dumps(recipe))
        main(["--config", str(tmp_path / f"{name}.yaml"), "--output_dir", str(tmp_path / name), "--num_workers", "0"])
        history = json.loads((tmp_path / name / "val_metrics.json").read_text())["history"]
        shares[name] = [h["rollout_mask_share"] for h in history]
    assert shares["with"][-1] > shares["without"][-1] + 0.05, shares
    assert shares["with"][-1] > shares["with"][0], shares

    # the cache: view 0's mask is the real mask through the processor's resize, pooled per patch
    train = load_sources([SourceSpec(**specs[0])])["train"]
    masks = load_mask_cache(tmp_path / "cache" / "train", 2)
    assert masks.shape == (2, len(train), 4, 4) and load_cache(tmp_path / "cache" / "train").shape[1] == len(train)
    files = [ham_dir / "masks" / f"{i.removeprefix('ham10000/')}_segmentation.png" for i in train["image_id"]]
    assert any(f.is_file() for f in files) and not all(f.is_file() for f in files)  # both kinds of row
    for row, file in enumerate(files):
        if not file.is_file():
            assert (masks[:, row] == NO_MASK).all()
            continue
        real = Image.open(file).convert("L").resize((64, 64), Image.NEAREST)
        expected = torch.nn.functional.avg_pool2d(torch.from_numpy(np.asarray(real) > 127).float()[None, None], 16)[0, 0]
        # PIL and torchvision place nearest-neighbour samples half a pixel apart: one pixel row of a 16-px cell
        torch.testing.assert_close(masks[0, row].float(), expected, atol=1 / 16 + 1e-3, rtol=0)
        assert ((masks[:, row] >= 0) & (masks[:, row] <= 1)).all()
