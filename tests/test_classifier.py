"""model/classifier.py, model/catalogue.py and model/imageio.py: discovery, loading, calibrated
predictions, explanations, and safe decoding of every kind of bad or unusual image input.

The models are real (tiny) MelanomaViT / transformers ViT / timm ResNet-18 folders built and
briefly fine-tuned on the fixture images by `make_tiny_model_folders` (also used by test_app.py),
plus a hybrid multi-source MelanomaViT with every extra head (dataset and seven-point criteria).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from model.calibration import fold_temperature
from model.imageio import InvalidImageError, load_image
from model.labels import CRITERIA_LABELS, DERM7PT_LABELS, DX_CODES, ISIC2017_LABELS, dx_id2label, dx_label2id

from conftest import edit_config_json

# --------------------------------------------------------------------------- tiny model folders


def _fixture_batch(fixtures_dir: Path) -> tuple[list[Image.Image], torch.Tensor]:
    """The 16 fixture images with their dx labels (ISIC 2017 labels mapped onto dx codes)."""
    from model.labels import ISIC2017_TO_DX

    images, labels = [], []
    ham = pd.read_csv(fixtures_dir / "ham10000" / "HAM10000_metadata.csv")
    for row in ham.itertuples():
        images.append(Image.open(fixtures_dir / "ham10000" / "images" / f"{row.image_id}.jpg").convert("RGB"))
        labels.append(dx_label2id()[row.dx])
    isic = pd.read_csv(fixtures_dir / "isic2017" / "labels.csv")
    for row in isic.itertuples():
        images.append(Image.open(fixtures_dir / "isic2017" / row.path).convert("RGB"))
        labels.append(dx_label2id()[ISIC2017_TO_DX[row.label]])
    return images, torch.tensor(labels)


def _fine_tune(model: torch.nn.Module, processor, images, labels, steps: int = 10) -> list[float]:
    """A few full-batch AdamW steps on the fixture images; returns the loss per step."""
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(pixel_values=pixel_values).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


MULTISOURCE = "multisource-hybrid-tiny"


def save_multisource_model(folder: Path) -> None:
    """A hybrid MelanomaViT (tf_efficientnet_lite0 stem, image 64, 4x4 tokens) with every extra head a
    multi-source model ships: `isic2017`, `derm7pt` and the seven criteria; random init, with head weights
    spread out (the init gives near-uniform probabilities) and a temperature folded into every head but one."""
    from transformers import ViTImageProcessor

    from model import MelanomaViTConfig, MelanomaViTForImageClassification

    heads = {"isic2017": list(ISIC2017_LABELS), "derm7pt": list(DERM7PT_LABELS)}
    heads |= {name: list(labels) for name, labels in CRITERIA_LABELS.items()}
    config = MelanomaViTConfig(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, patch_embedding_type="hybrid", backbone="tf_efficientnet_lite0", backbone_stage=4,
        backbone_channels=112, id2label=dx_id2label(), label2id=dx_label2id(), extra_heads=heads,
    )
    model = MelanomaViTForImageClassification(config).eval()
    with torch.no_grad():
        for head in model.extra_heads.values():
            head.weight.normal_(std=0.5)
    head_temperatures = {name: 0.5 + 0.25 * i for i, name in enumerate(heads) if name != "vascular_structures"}
    fold_temperature(model, 1.5, head_temperatures)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)


def make_tiny_model_folders(root: Path, fixtures_dir: Path, cnn: bool = True) -> dict[str, Path]:
    """Save tiny real model folders under `root` (a models/ directory); returns name -> folder.

    - melanoma-vit-tiny: MelanomaViT (image 32, patch 8, hidden 32, 2 layers, 4 heads), fine-tuned (10 steps)
      on the 16 fixture images, temperature 2.0 folded into its head and the median fixture P(mel) as
      melanoma threshold,
      and a model card with a license and a model-index metric;
    - vit-tiny: transformers' ViTForImageClassification with the same sizes (random init);
    - multisource-hybrid-tiny: `save_multisource_model` (extra heads, seven-point criteria);
    - resnet18-tiny (cnn=True): timm ResNet-18 through TimmWrapper at 32 px (random init).
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from model import MelanomaViTConfig, MelanomaViTForImageClassification

    torch.manual_seed(0)
    images, labels = _fixture_batch(fixtures_dir)
    folders: dict[str, Path] = {}
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    sizes = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )

    vit = MelanomaViTForImageClassification(
        MelanomaViTConfig(**sizes, id2label=dx_id2label(), label2id=dx_label2id())
    )
    losses = _fine_tune(vit, processor, images, labels)
    assert losses[-1] < losses[0], losses
    # Threshold at the median P(mel) of the fixture images, so the app shows both flags.
    with torch.no_grad():
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        p_mel = torch.softmax(vit(pixel_values=pixel_values).logits / 2.0, dim=-1)[:, dx_label2id()["mel"]]
    vit.config.melanoma_threshold = round(float(p_mel.median()), 6)
    fold_temperature(vit, 2.0)
    folders["melanoma-vit-tiny"] = root / "melanoma-vit-tiny"
    vit.save_pretrained(folders["melanoma-vit-tiny"])
    processor.save_pretrained(folders["melanoma-vit-tiny"])
    (folders["melanoma-vit-tiny"] / "README.md").write_text(
        "---\nlicense: cc-by-nc-sa-4.0\ndatasets:\n- ham10000-fixtures\n"
        "model-index:\n- name: melanoma-vit-tiny\n  results:\n  - task:\n      type: image-classification\n"
        "    dataset:\n      name: ISIC 2017 fixtures\n      type: isic2017\n    metrics:\n"
        "    - type: roc_auc\n      name: Melanoma AUC\n      value: 0.5\n---\n# tiny test model\n"
    )

    hf_vit = ViTForImageClassification(
        ViTConfig(**sizes, id2label=dx_id2label(), label2id=dx_label2id())
    )
    folders["vit-tiny"] = root / "vit-tiny"
    hf_vit.save_pretrained(folders["vit-tiny"])
    processor.save_pretrained(folders["vit-tiny"])

    folders[MULTISOURCE] = root / MULTISOURCE
    save_multisource_model(folders[MULTISOURCE])

    if cnn:
        from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

        import timm

        pretrained_cfg = timm.models.get_pretrained_cfg("resnet18").to_dict()
        pretrained_cfg.update(input_size=(3, 32, 32), crop_pct=1.0)
        config = TimmWrapperConfig(
            architecture="resnet18", pretrained_cfg=pretrained_cfg, num_labels=7,
            id2label=dx_id2label(), label2id=dx_label2id(),
        )
        cnn_model = TimmWrapperForImageClassification(config).eval()
        folders["resnet18-tiny"] = root / "resnet18-tiny"
        cnn_model.save_pretrained(folders["resnet18-tiny"])

    # Not a classifier: must be ignored by the zoo (like models/ood-detector/).
    (root / "not-a-model").mkdir(exist_ok=True)
    (root / "not-a-model" / "config.json").write_text(json.dumps({"model_type": "something_else"}))
    return folders


def shared_tiny_models(tmp_path_factory, fixtures_dir) -> Path:
    """The tiny model folders, built once per pytest session (test_classifier.py and test_app.py share them)."""
    root = tmp_path_factory.getbasetemp() / "tiny_models"
    if not (root / ".complete").exists():
        root.mkdir(exist_ok=True)
        make_tiny_model_folders(root, fixtures_dir)
        (root / ".complete").touch()
    return root


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, fixtures_dir) -> Path:
    return shared_tiny_models(tmp_path_factory, fixtures_dir)


@pytest.fixture(scope="module")
def zoo(models_dir):
    from model.catalogue import ModelCatalogue

    return ModelCatalogue(models_dir=models_dir, hub_ids=["someone/not-reachable-model"])


# -------------------------------------------------------------------------------------- zoo


def test_discovery_default_and_skipped_hub_ids(zoo, models_dir, monkeypatch):
    from model.catalogue import ModelCatalogue, UnknownModelError

    assert zoo.ids == ["melanoma-vit-tiny", MULTISOURCE, "resnet18-tiny", "vit-tiny"]
    assert zoo.default_id == "melanoma-vit-tiny"  # preference "melanoma-vit" prefix
    assert "someone/not-reachable-model" in zoo.skipped  # offline: skipped with a reason
    assert zoo.skipped["someone/not-reachable-model"]
    with pytest.raises(UnknownModelError, match="available: melanoma-vit-tiny"):
        zoo.get("nope")
    monkeypatch.setenv("MELANOMA_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("MELANOMA_DEFAULT_MODEL", "vit-tiny")
    monkeypatch.setenv("MELANOMA_HUB_MODELS", "a/b, c/d")
    env_zoo = ModelCatalogue()
    assert env_zoo.default_id == "vit-tiny"
    assert set(env_zoo.skipped) == {"a/b", "c/d"}
    with pytest.raises(UnknownModelError):
        ModelCatalogue(models_dir=models_dir, hub_ids=[], default="missing").default_id


def test_models_yaml_lists_hub_ids(tmp_path):
    from model.catalogue import ModelCatalogue

    (tmp_path / "models").mkdir()
    (tmp_path / "models.yaml").write_text("hub_models:\n  - org/melanoma-vit-base\n")
    zoo = ModelCatalogue(models_dir=tmp_path / "models")
    assert zoo.ids == [] and list(zoo.skipped) == ["org/melanoma-vit-base"]
    assert zoo.default_id is None


def test_entry_metadata_and_card(zoo, models_dir):
    entry = zoo.get("melanoma-vit-tiny")
    saved = json.loads((models_dir / "melanoma-vit-tiny" / "config.json").read_text())
    assert zoo.get("melanoma-vit-tiny") is entry  # loaded once, cached
    assert entry.net_type == "melanoma_vit"
    assert (entry.img_size, entry.out_dim) == (32, 7)
    assert entry.folded_temperature == 2.0 and 0.0 < entry.melanoma_threshold < 1.0
    assert entry.melanoma_threshold == saved["melanoma_threshold"]
    assert entry.labels["mel"] == "Melanoma" and list(entry.labels) == list(DX_CODES)
    info = entry.describe()
    assert info["license"] == "cc-by-nc-sa-4.0"
    assert info["metrics"] == [{"name": "Melanoma AUC", "type": "roc_auc", "value": 0.5, "dataset": "ISIC 2017 fixtures"}]
    assert info["explanation"] == "attention rollout"
    cnn = zoo.get("resnet18-tiny")
    assert cnn.net_type == "timm/resnet18" and cnn.img_size == 32
    assert cnn.melanoma_threshold == 0.5 and cnn.folded_temperature is None  # defaults: uncalibrated
    assert cnn.describe()["explanation"] == "Grad-CAM"


def test_predict_is_the_softmax_of_the_calibrated_head(zoo, ham_image_paths):
    entry = zoo.get("melanoma-vit-tiny")
    images = [Image.open(p).convert("RGB") for p in ham_image_paths[:5]]
    probs = entry.predict(images, batch_size=2)  # exercises several batches
    assert len(probs) == 5
    pixel_values = entry.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = entry.model(pixel_values=pixel_values).logits
    got = torch.tensor([[p.probabilities[c] for c in DX_CODES] for p in probs])
    torch.testing.assert_close(got, torch.softmax(logits, dim=-1), atol=1e-5, rtol=1e-5)  # T = 2 is in the head
    # Test-time views: the mean of the views' probabilities (identity and mirror image).
    two = entry.predict(images[:2], tta=2)
    with torch.no_grad():
        views = [torch.softmax(entry.model(pixel_values=pixel_values[:2].flip(-1) if v else pixel_values[:2]).logits, -1)
                 for v in (0, 1)]
    got = torch.tensor([[p.probabilities[c] for c in DX_CODES] for p in two])
    torch.testing.assert_close(got, torch.stack(views).mean(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(views[0], views[1])  # the views differ, so the check has teeth
    # Batched equals one-by-one.
    single = entry.predict(images[:1])[0]
    assert single.probabilities == pytest.approx(probs[0].probabilities, abs=1e-5)


def test_analyze_rollout_matches_predict(zoo, ham_image_paths):
    entry = zoo.get("melanoma-vit-tiny")
    image = Image.open(ham_image_paths[0]).convert("RGB")
    result = entry.analyze(image, head_fusion="max", discard_ratio=0.5, start_layer=1)
    assert result.probabilities == pytest.approx(entry.predict([image])[0].probabilities, abs=1e-5)
    assert result.heatmap.dtype == np.uint8 and result.heatmap.ndim == 3 and result.heatmap.shape[2] == 3
    assert "rollout" in result.method and "max" in result.method
    heatmap_mean = entry.analyze(image, head_fusion="mean").heatmap
    assert heatmap_mean.shape == result.heatmap.shape
    assert not np.array_equal(heatmap_mean, result.heatmap)  # controls change the map
    with pytest.raises(ValueError, match="head_fusion"):
        entry.analyze(image, head_fusion="median")
    with pytest.raises(ValueError, match="start_layer"):
        entry.analyze(image, start_layer=2)
    # transformers' ViT gives attentions too (loaded with the eager kernel).
    vit = zoo.get("vit-tiny").analyze(image)
    assert "rollout" in vit.method and vit.heatmap.shape[2] == 3


def test_analyze_gradcam_for_cnn(zoo, ham_image_paths):
    entry = zoo.get("resnet18-tiny")
    image = Image.open(ham_image_paths[1]).convert("RGB")
    result = entry.analyze(image)
    assert result.method.startswith("Grad-CAM (melanoma class, last convolutional stage)")
    assert result.heatmap.dtype == np.uint8 and result.heatmap.shape[2] == 3
    # The map is the melanoma class's (the verdict's number), whatever the top class.
    from model.gradcam import grad_cam

    pixel_values = entry.pixel_values([image])
    expected = grad_cam(entry.model, pixel_values, target=entry.label2id["mel"])[0].numpy()
    np.testing.assert_allclose(result.mask, expected, atol=1e-5)
    assert result.probabilities == pytest.approx(entry.predict([image])[0].probabilities, abs=1e-5)
    assert all(p.grad is None for p in entry.model.parameters())  # no gradient left behind


def test_extra_heads_come_from_the_same_forward_pass(zoo, ham_image_paths):
    """Multi-source model: every head's softmax (temperatures folded) as `predict_heads`, the seven-point score from them,
    in `predict` (batched), `analyze` (the rollout forward) and the JSON record."""
    from model.sevenpoint import SEVEN_POINT, criterion_probability, seven_point_score
    from model.results import SevenPointResult

    entry = zoo.get(MULTISOURCE)
    assert entry.has_seven_point and entry.extra_heads == entry.config.extra_heads
    images = [Image.open(p).convert("RGB") for p in ham_image_paths[:4]]
    predictions = entry.predict(images, batch_size=3)  # two batches
    pixel_values = entry.processor(images=images, return_tensors="pt")["pixel_values"]
    expected = entry.model.predict_heads(pixel_values)
    assert list(expected) == ["dx", *entry.extra_heads]
    got_dx = torch.tensor([[p.probabilities[c] for c in DX_CODES] for p in predictions])
    torch.testing.assert_close(got_dx, expected["dx"], atol=1e-5, rtol=1e-5)
    for name, labels in entry.extra_heads.items():
        got = torch.tensor([[p.heads.probabilities[name][label] for label in labels] for p in predictions])
        torch.testing.assert_close(got, expected[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.sum(-1), torch.ones(len(images)), atol=1e-5, rtol=0)
    with torch.no_grad():
        raw = entry.model(pixel_values=pixel_values).head_logits["isic2017"]
    assert entry.folded_head_temperatures["isic2017"] == 0.5 and entry.config.unfolded_temperatures == {}
    got = torch.tensor([list(p.heads.probabilities["isic2017"].values()) for p in predictions])
    torch.testing.assert_close(got, torch.softmax(raw, dim=-1), atol=1e-5, rtol=1e-5)  # nothing divided twice

    scores = seven_point_score({name: expected[name].numpy() for name in SEVEN_POINT})
    for i, prediction in enumerate(predictions):
        seven = prediction.heads.seven_point
        assert seven.score == pytest.approx(float(scores[i]), abs=1e-5) and 0.0 < seven.score < 10.0
        criteria = {name: float(criterion_probability(name, expected[name][i].numpy())) for name in SEVEN_POINT}
        assert seven.criteria == pytest.approx(criteria, abs=1e-5)
        assert seven.suggests_melanoma == (seven.score >= 3)
    assert SevenPointResult(3.0, {}).suggests_melanoma and not SevenPointResult(2.99, {}).suggests_melanoma

    analysis = entry.analyze(images[0], discard_ratio=0.5)  # one forward with attentions (4x4 hybrid grid)
    assert "rollout" in analysis.method and analysis.heatmap.dtype == np.uint8
    assert analysis.probabilities == pytest.approx(predictions[0].probabilities, abs=1e-5)
    for name, probs in predictions[0].heads.probabilities.items():
        assert analysis.heads.probabilities[name] == pytest.approx(probs, abs=1e-5)
    seven = analysis.heads.seven_point
    assert seven.score == pytest.approx(predictions[0].heads.seven_point.score, abs=1e-5)

    record = entry.result("lesion.jpg", analysis).to_json()
    assert list(record) == ["name", "probabilities", "metadata", "prediction", "heads", "seven_point", "ood", "warning", "caution"]
    assert record["heads"] == analysis.heads.probabilities
    assert record["seven_point"] == {
        "score": seven.score, "threshold": 3, "suggests_melanoma": seven.score >= 3, "criteria": seven.criteria
    }
    assert json.loads(json.dumps(record)) == record  # plain JSON types
    assert entry.describe()["extra_heads"] == entry.config.extra_heads


def test_models_without_extra_heads_keep_their_record(zoo, ham_image_paths):
    image = Image.open(ham_image_paths[2]).convert("RGB")
    for model_id in ("melanoma-vit-tiny", "vit-tiny", "resnet18-tiny"):
        entry = zoo.get(model_id)
        (prediction,) = entry.predict([image])
        assert entry.extra_heads == {} and not entry.has_seven_point
        assert prediction.heads is None and entry.analyze(image).heads is None
        record = entry.result("lesion.jpg", prediction).to_json()
        assert list(record) == ["name", "probabilities", "metadata", "prediction", "ood", "warning", "caution"], model_id
        assert record["probabilities"] == prediction.probabilities


def test_predict_proba_on_pixels_and_cached_stem_features_is_predict(zoo, ham_image_paths):
    """The entry point for preprocessed tensors (training's teachers): every head's calibrated probabilities,
    chunked, equal `predict`'s; on cached stem features (`model.stem`: the hybrid's CNN stem bypassed) too."""
    from model.stem import stem_names

    images = [Image.open(p).convert("RGB") for p in ham_image_paths[:5]]
    entry = zoo.get(MULTISOURCE)
    predictions = entry.predict(images, tta=2)
    pixel_values = entry.pixel_values(images)
    probs = entry.predict_proba(pixel_values, tta=2, batch_size=2)  # three chunks
    expected_dx = torch.tensor([[p.probabilities[c] for c in DX_CODES] for p in predictions])
    torch.testing.assert_close(probs.dx, expected_dx, atol=1e-6, rtol=0)
    assert list(probs.heads) == list(entry.extra_heads)
    for name, labels in entry.extra_heads.items():
        expected = torch.tensor([[p.heads.probabilities[name][label] for label in labels] for p in predictions])
        torch.testing.assert_close(probs.heads[name], expected, atol=1e-6, rtol=0)

    assert stem_names(entry.model) == ("vit.embeddings.patch_embed.stem",)
    with torch.no_grad():
        features = entry.model.vit.embeddings.patch_embed.stem(pixel_values)  # what train/features.py caches
    from_features = entry.predict_proba(features.half(), batch_size=4, features=True)
    plain = entry.predict_proba(pixel_values)
    torch.testing.assert_close(from_features.dx, plain.dx, atol=2e-3, rtol=0)  # fp16 cache
    for name in entry.extra_heads:
        torch.testing.assert_close(from_features.heads[name], plain.heads[name], atol=2e-3, rtol=0)
    assert not isinstance(entry.model.vit.embeddings.patch_embed.stem, torch.nn.Identity)  # the stem is back
    with pytest.raises(ValueError, match="tta must be 1"):
        entry.predict_proba(features, tta=2, features=True)
    # a model without a stem (pure ViT, ResNet without ImageNet weights): its cache holds pixels
    vit = zoo.get("melanoma-vit-tiny")
    assert stem_names(vit.model) == () and stem_names(zoo.get("resnet18-tiny").model) == ()
    vit_pixels = vit.pixel_values(images)
    assert torch.equal(vit.predict_proba(vit_pixels, features=True).dx, vit.predict_proba(vit_pixels).dx)


def test_from_model_wraps_a_model_in_memory_like_its_folder(zoo, ham_image_paths):
    """`Classifier.from_model`: a model already in memory (just trained, exported) scores as its folder does."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from model.classifier import Classifier

    images = [Image.open(p).convert("RGB") for p in ham_image_paths[:3]]
    for name in ("melanoma-vit-tiny", MULTISOURCE, "resnet18-tiny"):
        entry = zoo.get(name)
        model = AutoModelForImageClassification.from_pretrained(entry.path).train()
        wrapped = Classifier.from_model(model, AutoImageProcessor.from_pretrained(entry.path), model_id=name)
        assert not model.training and wrapped.id == name and wrapped.device == torch.device("cpu")
        assert (wrapped.folded_temperature, wrapped.melanoma_threshold) == (entry.folded_temperature,
                                                                            entry.melanoma_threshold)
        for before, after in zip(entry.predict(images), wrapped.predict(images)):
            assert after.probabilities == pytest.approx(before.probabilities, abs=1e-5)
            assert after.label == before.label


def test_image_result_is_typed_and_becomes_json_only_in_to_json():
    """The melanoma flag at the threshold, the OOD warning and the JSON record from one typed result."""
    from model.ood import OODResult
    from model.results import ImageResult, ModelMetadata, Prediction

    meta = ModelMetadata("m", "vit", 32, 3)
    probs = {"nv": 0.35, "mel": 0.4, "bkl": 0.25}
    at = ImageResult("a.jpg", Prediction(probs), meta, "Melanocytic nevi", melanoma_threshold=0.4)
    above = ImageResult("a.jpg", Prediction(probs), meta, "Melanoma", melanoma_threshold=0.41)
    assert at.label == "mel" and at.probability == 0.4 and at.melanoma and not above.melanoma
    assert at.warning is None and at.to_json()["ood"] is None and "explanation" not in at.to_json()
    flagged = OODResult(True, 9.5, 3.0, "Does not look like dermoscopy.")
    result = ImageResult("b.png", Prediction({"nv": 1.0}), meta, "Melanocytic nevi", 0.5, flagged, "Grad-CAM")
    assert result.melanoma_probability is None and result.melanoma is None  # not dermoscopy: no flag either way
    assert result.warning == "Does not look like dermoscopy."
    record = result.to_json()
    assert list(record) == ["name", "probabilities", "metadata", "prediction", "ood", "warning", "caution", "explanation"]
    assert record["ood"] == {
        "is_ood": True, "level": "not_dermoscopy", "score": 9.5, "threshold": 3.0, "clinical_probability": None,
        "reason": "Does not look like dermoscopy.",
    }
    assert record["warning"] == "Does not look like dermoscopy." and record["caution"] is None
    borderline = OODResult(True, 3.1, 3.0, "May not be dermoscopy.", "possibly_not_dermoscopy")
    cautious = ImageResult("c.png", Prediction(probs), meta, "Melanoma", 0.4, borderline)
    assert cautious.warning is None and cautious.caution == "May not be dermoscopy." and cautious.melanoma
    assert record["metadata"] == {"model_id": "m", "net_type": "vit", "img_size": 32, "out_dim": 3}
    assert record["prediction"] == {
        "label": "nv", "label_name": "Melanocytic nevi", "probability": 1.0, "melanoma": None,  # no verdict
        "melanoma_probability": None, "melanoma_threshold": 0.5, "above_balanced_threshold": None,
        "views": 1,  # test-time views averaged
    }
    assert json.loads(json.dumps(record)) == record


def test_extra_heads_without_every_criterion_give_no_checklist(tmp_path, ham_image_paths):
    from transformers import ViTImageProcessor

    from model import MelanomaViTConfig, MelanomaViTForImageClassification
    from model.classifier import Classifier

    torch.manual_seed(0)
    heads = {"isic2017": list(ISIC2017_LABELS), "pigment_network": list(CRITERIA_LABELS["pigment_network"])}
    config = MelanomaViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=37, id2label=dx_id2label(), extra_heads=heads)
    MelanomaViTForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    entry = Classifier(tmp_path, model_id="two-heads")
    (prediction,) = entry.predict([Image.open(ham_image_paths[0]).convert("RGB")])
    assert not entry.has_seven_point and prediction.heads.seven_point is None
    assert list(prediction.heads.probabilities) == list(heads)
    record = entry.result("lesion.jpg", prediction).to_json()
    assert record["heads"] == prediction.heads.probabilities and "seven_point" not in record


def test_classifier_is_thread_safe(models_dir, ham_image_paths):
    from concurrent.futures import ThreadPoolExecutor

    from model.catalogue import ModelCatalogue

    zoo = ModelCatalogue(models_dir=models_dir, hub_ids=[])
    image = Image.open(ham_image_paths[2]).convert("RGB")
    with ThreadPoolExecutor(4) as pool:
        entries = list(pool.map(lambda _: zoo.get("vit-tiny"), range(4)))
        results = list(pool.map(lambda e: e.predict([image])[0].probabilities, entries))
    assert all(e is entries[0] for e in entries)
    assert all(r == pytest.approx(results[0], abs=1e-6) for r in results)


# -------------------------------------------------------------------------------- load_image


def _png_bytes(im: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def png_header_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with one tiny IDAT: a bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_image_files(directory: Path, fixture_jpeg: Path) -> dict[str, Path]:
    """Write every kind of bad input under `directory`; returns kind -> path."""
    jpeg = fixture_jpeg.read_bytes()
    files = {
        "empty": (b"", "empty.jpg"),
        "truncated": (jpeg[: len(jpeg) // 3], "truncated.jpg"),
        "text": (b"just some text, definitely not pixels\n" * 10, "notes.txt"),
        "html": (b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>", "page.jpg"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>', "vector.svg"),
        "bomb": (png_header_bomb(), "bomb.png"),
        "tiny": (_png_bytes(Image.new("RGB", (3, 3))), "tiny.png"),
    }
    paths = {}
    for kind, (data, name) in files.items():
        paths[kind] = directory / name
        paths[kind].write_bytes(data)
    return paths


def test_bad_inputs_refused_with_clear_messages(tmp_path, ham_image_paths):
    files = bad_image_files(tmp_path, ham_image_paths[0])
    expected = {
        "empty": "empty",
        "truncated": "truncated or corrupt",
        "text": "Not a recognised image",
        "html": "not a raster image",
        "svg": "not a raster image",
        "bomb": "decompression",
        "tiny": "at least 8 pixels",
    }
    for kind, message in expected.items():
        with pytest.raises(InvalidImageError, match=message):
            load_image(files[kind])
        with pytest.raises(InvalidImageError, match=message):
            load_image(files[kind].read_bytes())
    big = tmp_path / "big.jpg"
    big.write_bytes(ham_image_paths[0].read_bytes() + b"\0" * 2_000_000)
    with pytest.raises(InvalidImageError, match="limit is 1 MB"):
        load_image(big, max_bytes=1_000_000)
    with pytest.raises(InvalidImageError, match="limit is 1 MB"):
        load_image(big.read_bytes(), max_bytes=1_000_000)
    # A real but large image beyond max_pixels is refused from its header.
    with pytest.raises(InvalidImageError, match="pixels; the limit is 100"):
        load_image(ham_image_paths[0], max_pixels=100)
    with pytest.raises(InvalidImageError, match="No such image file"):
        load_image(tmp_path / "missing.png")
    assert isinstance(InvalidImageError("x"), ValueError)


def test_eps_is_never_decoded(tmp_path):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(InvalidImageError, match="Not a recognised image"):
        load_image(eps)


def test_unusual_but_valid_images_are_converted(ham_image_paths):
    rgb = np.asarray(Image.open(ham_image_paths[0]).convert("RGB"))[:60, :80]  # (60, 80, 3)

    # 16-bit greyscale: 65535 -> 255, 257 * 100 -> 100.
    grey16 = np.full((20, 30), 257 * 100, dtype=np.uint16)
    grey16[0, 0] = 65535
    out = load_image(_png_bytes(Image.fromarray(grey16)))
    assert Image.open(io.BytesIO(_png_bytes(Image.fromarray(grey16)))).mode.startswith("I")
    arr = np.asarray(out)
    assert out.mode == "RGB" and arr.shape == (20, 30, 3)
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[5, 5].tolist() == [100, 100, 100]

    # RGBA: transparent pixels become white, opaque ones keep their colour.
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:10, :, 3] = 255
    arr = np.asarray(load_image(_png_bytes(Image.fromarray(rgba, "RGBA"))))
    assert arr[0, 0].tolist() == [200, 0, 0] and arr[15, 0].tolist() == [255, 255, 255]

    # Palette, greyscale, CMYK JPEG.
    palette = Image.fromarray(rgb).quantize(16)
    assert palette.mode == "P"
    out = load_image(_png_bytes(palette))
    assert out.mode == "RGB" and np.abs(np.asarray(out, float) - rgb).mean() < 20
    grey = load_image(_png_bytes(Image.fromarray(rgb).convert("L")))
    assert grey.mode == "RGB" and np.array_equal(np.asarray(grey)[..., 0], np.asarray(grey)[..., 2])
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG", quality=95)
    out = load_image(buffer.getvalue())
    assert out.mode == "RGB" and np.abs(np.asarray(out, float) - rgb).mean() < 12

    # Animated GIF: the first frame is used.
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = np.asarray(load_image(buffer.getvalue()))
    assert out[8, 8, 0] > 200 and out[8, 8, 2] < 50

    # EXIF orientation 6 (rotate 90 clockwise): an 80x60 JPEG becomes 60x80.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", exif=exif.tobytes())
    out = load_image(buffer.getvalue())
    assert out.size == (60, 80)
    assert Image.open(io.BytesIO(buffer.getvalue())).size == (80, 60)


def test_real_fixture_roundtrip(ham_image_paths):
    for path in ham_image_paths[:3]:
        out = load_image(path)
        assert out.mode == "RGB" and out.size == Image.open(path).size
        assert np.array_equal(np.asarray(out), np.asarray(Image.open(path).convert("RGB")))


def test_rollout_on_stock_deit_export_of_a_distilled_model(tmp_path, ham_image_paths):
    """The stock export of a distilled MelanomaViT (DeiT-with-teacher) explains like the original."""
    from transformers import ViTImageProcessor

    from model import MelanomaViTConfig, MelanomaViTForImageClassification
    from model.convert import save_vit_export
    from model.labels import dx_id2label
    from model.catalogue import ModelCatalogue
    from model.classifier import Classifier

    torch.manual_seed(0)
    config = MelanomaViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=37, id2label=dx_id2label(),
                               use_distillation_token=True)
    ours = MelanomaViTForImageClassification(config).eval()
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    for name, save in (("ours", ours.save_pretrained), ("export", lambda d: save_vit_export(ours, d))):
        save(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    image = Image.open(ham_image_paths[0]).convert("RGB")
    a = Classifier(tmp_path / "ours", model_id="ours").analyze(image, discard_ratio=0.5)
    b = Classifier(tmp_path / "export", model_id="export").analyze(image, discard_ratio=0.5)
    assert "rollout" in b.method
    assert ModelCatalogue(models_dir=tmp_path, hub_ids=[]).ids == ["export", "ours"]  # both discovered
    assert b.probabilities == pytest.approx(a.probabilities, abs=1e-4)
    np.testing.assert_allclose(b.heatmap.astype(int), a.heatmap.astype(int), atol=2)


def test_older_unfolded_folders_load_migrated_with_their_probabilities(zoo, tmp_path, ham_image_paths, caplog):
    """One stored calibration form: a folder that still stores temperatures to apply (older exports) is
    folded once at load, with a warning, and gives what applying them gave."""
    import logging
    import shutil

    from model.classifier import Classifier
    from webapp.formatting import model_details_markdown

    images = [Image.open(p).convert("RGB") for p in ham_image_paths[:3]]
    for name in ("melanoma-vit-tiny", MULTISOURCE):
        entry = zoo.get(name)
        assert "folded into the classifier head" in model_details_markdown(entry)
        # The older form: raw heads (a fit of 1.0 replaces the fold), T and head temperatures stored to apply.
        old = entry.model.__class__.from_pretrained(entry.path)
        fold_temperature(old, 1.0, {head: 1.0 for head in entry.folded_head_temperatures} or None)
        folder = shutil.copytree(entry.path, tmp_path / name)
        old.save_pretrained(folder)
        edit_config_json(folder, temperature=entry.folded_temperature,
                         head_temperatures=entry.folded_head_temperatures or None, folded_temperature=None,
                         folded_head_temperatures=None)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            migrated = Classifier(folder, model_id=name)
        assert "Migrated an older MelanomaViT calibration" in caplog.text
        assert migrated.folded_temperature == entry.folded_temperature
        assert migrated.folded_head_temperatures == entry.folded_head_temperatures
        assert "folded into the classifier head" in model_details_markdown(migrated)
        for before, after in zip(entry.predict(images), migrated.predict(images)):
            assert after.probabilities == pytest.approx(before.probabilities, abs=1e-5)
            if before.heads is not None:
                for head, probs in before.heads.probabilities.items():
                    assert after.heads.probabilities[head] == pytest.approx(probs, abs=1e-5), head
                assert after.heads.seven_point.score == pytest.approx(before.heads.seven_point.score, abs=1e-4)
    assert zoo.get(MULTISOURCE).folded_head_temperatures  # the extra heads were calibrated, so folding mattered


def test_big_non_rgb_images_are_shrunk_in_bands_like_a_full_conversion():
    """With max_side, 16-bit, RGBA and palette images are converted band by band and shrunk on the
    way (bounded memory, see bench/bench_app.py); the pixels match converting the whole image and
    then downscaling, and EXIF orientation is still applied."""
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (45, 60, 3), dtype=np.uint8)).resize((1800, 1350)))
    rgba = np.dstack([smooth, np.full(smooth.shape[:2], 255, np.uint8)])
    rgba[:400, :, 3] = 0  # a transparent strip: white after compositing
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", exif=exif.tobytes())
    images = {
        "rgba_rotated.png": buffer.getvalue(),
        "grey16.png": _png_bytes(Image.fromarray(smooth[..., 0].astype(np.uint16) * 257)),
        "palette.png": _png_bytes(Image.fromarray(smooth).quantize(64)),
    }
    for name, data in images.items():
        full = load_image(data)
        full.thumbnail((200, 200), Image.Resampling.LANCZOS)
        small = load_image(data, max_side=200)
        assert small.size == full.size and max(small.size) == 200, name
        assert np.abs(np.asarray(small, float) - np.asarray(full, float)).mean() < 0.5, name
    rotated = load_image(images["rgba_rotated.png"], max_side=200)
    assert rotated.size == (150, 200)  # portrait after orientation 6
    assert np.asarray(rotated)[:, -20:].min() == 255  # the transparent top strip is now on the right, white


def test_size_limits_are_stated_in_the_limits_unit():
    from model.imageio import MAX_BYTES, format_bytes

    assert format_bytes(MAX_BYTES) == "20 MiB" and format_bytes(10**6) == "1 MB" and format_bytes(1234) == "1,234 bytes"
    with pytest.raises(InvalidImageError, match=r"File is 20\.5 MiB; the limit is 20 MiB\."):
        load_image(b"\xff" * (20 * 2**20 + 2**19))
