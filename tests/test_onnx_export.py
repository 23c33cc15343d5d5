"""ONNX export and the ONNX Runtime backend (model/onnx_export.py, model/onnx_backend.py, the
Classifier's backend switch, predict.py's and the app's --backend / MELANOMA_BACKEND,
train/export_onnx.py's accuracy bar), on the tiny real model folders of test_classifier.py and on
every shipped folder under models/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_classifier import MULTISOURCE, shared_tiny_models

from model.classifier import Classifier
from model.imageio import load_image
from model.labels import MELANOMA
from model.onnx_backend import OnnxModel, available_backends, resolve_backend
from model.onnx_export import EXPORT_RECORD, FP32_FILE, INT8_FILE, WEIGHTS_FILE, export_fp32, quantize, safetensors_index
from train.export_onnx import Scores, default_backend, int8_check

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SHIPPED = sorted(p.parent for p in MODELS.glob(f"*/{WEIGHTS_FILE}"))
TINY = ("melanoma-vit-tiny", MULTISOURCE, "resnet18-tiny", "vit-tiny")


@pytest.fixture(scope="module")
def images(ham_image_paths, isic2017_dir) -> list:
    """The 16 fixture images (12 HAM10000 + 4 ISIC 2017), decoded as the app does."""
    return [load_image(p, max_side=1024) for p in ham_image_paths + sorted((isic2017_dir / "test").glob("*.jpg"))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fixtures_dir, images) -> Path:
    """Copies of the tiny model folders with model.onnx and onnx/model_quantized.onnx (static for the CNN)."""
    root = tmp_path_factory.mktemp("onnx_models")
    for name in TINY:
        folder = root / name
        shutil.copytree(shared_tiny_models(tmp_path_factory, fixtures_dir) / name, folder)
        classifier = Classifier(folder, backend="torch")
        export_fp32(classifier.model, folder, classifier.geometry.size)
        static = classifier.net_type.startswith("timm/")
        quantize(folder, [classifier.pixel_values(images).numpy()] if static else None)
    return root


def _p_mel(classifier: Classifier, images: list, tta: int = 1) -> np.ndarray:
    return np.array([p.probabilities[MELANOMA] for p in classifier.predict(images, tta=tta)])


# ------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("name", TINY)
def test_fp32_graph_reads_its_weights_from_model_safetensors_and_matches_torch(exported, images, name):
    folder = exported / name
    graph = onnx.load(str(folder / FP32_FILE), load_external_data=False)
    index = {(offset, length) for _, _, offset, length in safetensors_index(folder / WEIGHTS_FILE).values()}
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    refs = {tuple(int(e.value) for e in t.external_data if e.key in ("offset", "length")) for t in graph.graph.initializer}
    assert locations == {WEIGHTS_FILE}
    assert refs <= index  # every reference is one whole tensor of the safetensors file
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)  # no copied weight

    torch_clf, onnx_clf = Classifier(folder, backend="torch"), Classifier(folder, backend="onnx")
    assert onnx_clf.backend == "onnx"
    for ref, got in zip(torch_clf.predict(images, tta=2), onnx_clf.predict(images, tta=2)):
        assert got.probabilities.keys() == ref.probabilities.keys()
        np.testing.assert_allclose(list(got.probabilities.values()), list(ref.probabilities.values()), atol=1e-5)
        assert got.decision == ref.decision
        if ref.heads is not None:  # every extra head is in the graph, in the config's order
            for head, probs in ref.heads.probabilities.items():
                np.testing.assert_allclose(list(got.heads.probabilities[head].values()), list(probs.values()), atol=1e-5)
            assert got.heads.seven_point.score == pytest.approx(ref.heads.seven_point.score, abs=1e-5)


def test_multisource_graph_outputs_every_head(exported):
    session = ort.InferenceSession(str(exported / MULTISOURCE / FP32_FILE), providers=["CPUExecutionProvider"])
    config = json.loads((exported / MULTISOURCE / "config.json").read_text())
    assert [o.name for o in session.get_outputs()] == ["logits", *(f"logits_{h}" for h in config["extra_heads"])]
    _, channels, height, width = session.get_inputs()[0].shape  # ("batch_size", 3, H, W)
    x = np.zeros((3, channels, height, width), np.float32)
    outs = session.run(None, {"pixel_values": x})  # batch size is dynamic
    assert [o.shape for o in outs] == [(3, 7), *((3, len(v)) for v in config["extra_heads"].values())]


@pytest.mark.parametrize("name", TINY)
def test_int8_graph_is_self_contained_and_close(exported, images, name):
    folder = exported / name
    assert all(t.data_location != onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(folder / INT8_FILE), load_external_data=False).graph.initializer)
    ops = {n.op_type for n in onnx.load(str(folder / INT8_FILE)).graph.node}
    assert ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearConv"}, ops
    p8 = _p_mel(Classifier(folder, backend="onnx-int8"), images)
    p32 = _p_mel(Classifier(folder, backend="onnx"), images)
    assert np.all(np.isfinite(p8)) and np.abs(p8 - p32).max() < 0.1


# ----------------------------------------------------------------------------------- the backends


def test_backend_resolution(exported, tmp_path):
    folder = exported / "melanoma-vit-tiny"
    assert available_backends(folder) == ["torch", "onnx", "onnx-int8"]
    assert resolve_backend(folder, "auto") == "onnx"  # no export record: fp32 ONNX
    record = tmp_path / "with_record"
    shutil.copytree(folder, record)
    (record / EXPORT_RECORD).write_text(json.dumps({"default_backend": "onnx-int8"}))
    assert resolve_backend(record, "auto") == "onnx-int8"
    (record / INT8_FILE).unlink()  # the recorded default is gone: fall back to fp32 ONNX
    assert resolve_backend(record, "auto") == "onnx"
    with pytest.raises(ValueError, match="no onnx/model_quantized.onnx"):
        resolve_backend(record, "onnx-int8")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(record, "tensorrt")
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain, ignore=shutil.ignore_patterns("*.onnx", "onnx"))
    assert resolve_backend(plain, "auto") == "torch"
    with pytest.raises(ValueError, match="export with"):
        Classifier(plain, backend="onnx")


def test_stale_graph_is_refused(exported, tmp_path):
    """A graph exported before extra heads changed would silently drop them: refused at load."""
    with pytest.raises(ValueError, match="re-export"):
        OnnxModel(exported / MULTISOURCE / FP32_FILE, heads=["isic2017"])


@pytest.mark.parametrize("name", ["melanoma-vit-tiny", "resnet18-tiny"])
def test_analyze_explains_with_torch_and_scores_with_the_backend(exported, images, name):
    folder = exported / name
    torch_clf, onnx_clf = Classifier(folder, backend="torch"), Classifier(folder, backend="onnx-int8")
    ref, got = torch_clf.analyze(images[0]), onnx_clf.analyze(images[0])
    np.testing.assert_allclose(got.mask, ref.mask, atol=1e-6)  # the explanation: PyTorch on both
    assert got.method == ref.method
    (bulk,) = onnx_clf.predict(images[:1])
    assert got.probabilities == pytest.approx(bulk.probabilities, abs=1e-6)  # the click scores as bulk does
    assert onnx_clf.describe()["backend"] == "onnx-int8"


def test_forward_views_with_attentions_use_torch(exported, images):
    clf = Classifier(exported / "melanoma-vit-tiny", backend="onnx")
    outs = clf.forward_views(clf.pixel_values(images[:2]), tta=2, attentions=True)
    assert outs[0].attentions is not None and len(outs) == 2


def test_app_catalogue_backend_from_argument_and_environment(exported, monkeypatch):
    from model.catalogue import ModelCatalogue
    from webapp.formatting import model_details_markdown

    assert ModelCatalogue(models_dir=exported, hub_ids=[], backend="torch").get("vit-tiny").backend == "torch"
    monkeypatch.setenv("MELANOMA_BACKEND", "onnx-int8")
    entry = ModelCatalogue(models_dir=exported, hub_ids=[]).get("vit-tiny")
    assert entry.backend == "onnx-int8"
    assert "| Inference | ONNX Runtime, int8 graph" in model_details_markdown(entry)  # the page says which
    monkeypatch.delenv("MELANOMA_BACKEND")
    assert ModelCatalogue(models_dir=exported, hub_ids=[]).get("vit-tiny").backend == "onnx"  # auto


def test_predict_backend_switch(exported, ham_dir, tmp_path):
    import pandas as pd

    from train.predict import PREDICTIONS, main

    tables = {}
    for backend in ("torch", "onnx", "onnx-int8"):
        out = tmp_path / backend
        main(["--model", str(exported / MULTISOURCE), "--data", str(ham_dir / "images"), "--output_dir", str(out),
              "--num_workers", "0", "--ood", "none", "--batch_size", "5", "--backend", backend])
        tables[backend] = pd.read_csv(out / PREDICTIONS).set_index("id").sort_index()
    assert len(tables["torch"]) == 12
    np.testing.assert_allclose(tables["onnx"]["melanoma_probability"], tables["torch"]["melanoma_probability"], atol=1e-5)
    assert not np.allclose(tables["onnx-int8"]["melanoma_probability"], tables["torch"]["melanoma_probability"], atol=1e-7)
    with pytest.raises(ValueError, match="backend must be one of"):
        main(["--model", str(exported / MULTISOURCE), "--data", str(ham_dir / "images"), "--output_dir",
              str(tmp_path / "bad"), "--num_workers", "0", "--ood", "none", "--backend", "gpu"])


# ------------------------------------------------------------------------------- the accuracy bar


def test_int8_check_and_default_backend_rules():
    y = np.array([0, 0, 1, 1])
    fp32 = Scores(np.array([0.1, 0.4, 0.35, 0.8]), np.array([5, 5, 4, 4]), y)  # AUC 0.75
    same = int8_check(fp32, Scores(fp32.p_mel + 0.01, fp32.decided, y))
    assert same["passed"] and same["auc_difference"] == 0 and same["top_class_agreement"] == 1.0
    swapped = int8_check(fp32, Scores(np.array([0.1, 0.3, 0.35, 0.8]), fp32.decided, y))  # AUC 1.0
    assert not swapped["passed"] and swapped["auc_difference"] == pytest.approx(0.25)
    disagree = int8_check(fp32, Scores(fp32.p_mel, np.array([5, 4, 4, 4]), y))
    assert not disagree["passed"] and disagree["top_class_agreement"] == 0.75
    speeds = {"torch": {"batch1_p50_ms": 30.0, "batch32_images_per_s": 10.0},
              "onnx": {"batch1_p50_ms": 10.0, "batch32_images_per_s": 40.0},
              "onnx-int8": {"batch1_p50_ms": 6.0, "batch32_images_per_s": 30.0}}
    assert default_backend(speeds) == "onnx-int8"  # sqrt(5 * 3) > sqrt(3 * 4)
    speeds["onnx-int8"]["batch32_images_per_s"] = 15.0
    assert default_backend(speeds) == "onnx"


# ---------------------------------------------------------------------------- the shipped folders


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_fp32_onnx_matches_torch_on_the_fixtures(folder, images):
    """fp32 ONNX P(melanoma) within 1e-4 of PyTorch (every head's probabilities, in fact)."""
    assert (folder / FP32_FILE).is_file(), f"{folder.name}: no {FP32_FILE}; run python train/export_onnx.py models --write"
    torch_clf, onnx_clf = Classifier(folder, backend="torch"), Classifier(folder, backend="onnx")
    for ref, got in zip(torch_clf.predict(images), onnx_clf.predict(images)):
        assert abs(got.probabilities[MELANOMA] - ref.probabilities[MELANOMA]) < 1e-4
        np.testing.assert_allclose(list(got.probabilities.values()), list(ref.probabilities.values()), atol=1e-4)
        for head, probs in (ref.heads.probabilities if ref.heads else {}).items():
            np.testing.assert_allclose(list(got.heads.probabilities[head].values()), list(probs.values()), atol=1e-4)


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_export_record_says_what_ships(folder):
    record = json.loads((folder / EXPORT_RECORD).read_text())
    int8 = record["int8"]
    assert (folder / INT8_FILE).is_file() == int8["shipped"]
    assert not int8["shipped"] or int8["passed"]
    for name, check in int8["checks"].items():
        assert check["passed"] == (abs(check["auc_difference"]) <= 0.005 and check["top_class_agreement"] >= 0.97), name
    assert record["default_backend"] in available_backends(folder)
    assert record["fp32"]["max_probability_difference_vs_torch"] < 1e-4
    assert resolve_backend(folder) == record["default_backend"]
    assert record["fp32"]["initializers_in_graph"] == 0  # no weight is stored twice
