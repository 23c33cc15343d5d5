"""Age, sex and site as optional inputs to P(melanoma) (model/metadata_model.py): parsing, the fit,
the Classifier's result, predict.py's columns (CSV and HAM10000 layout) and REST /predict's query
parameters on a launched app, with the tiny real models of test_classifier.py."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from gradio_client import Client, handle_file
from conftest import edit_config_json
from sklearn.metrics import roc_auc_score
from test_classifier import shared_tiny_models

from model.classifier import Classifier
from model.imageio import load_image
from model.metadata_model import (
    CONFIG_KEY,
    FEATURES,
    HIDDEN_SUBSETS,
    SITES,
    Metadata,
    MetadataError,
    MetadataModel,
)
from servers import serve_in_thread
from train.predict import WITH_METADATA_COLUMNS, main
from train.stream import RecordSource

VIT = "vit-tiny"


def synthetic_patients(n: int = 1500, seed: int = 0) -> tuple[np.ndarray, list[Metadata], np.ndarray]:
    """Images' P(mel) and patients where melanoma also depends on age and site, as in HAM10000 (older
    patients, the back): what the regression has to find beside the image score."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(5, 90, n)
    sex = rng.choice(["male", "female"], n)
    site = rng.choice(["back", "face", "lower extremity", "acral"], n)
    risk = -2.0 + 0.05 * (age - 50) + 1.0 * (site == "back")
    y = (rng.random(n) < 1 / (1 + np.exp(-risk))).astype(int)
    image_logit = 1.2 * (2 * y - 1) + rng.normal(0, 1.5, n)
    p_mel = 1 / (1 + np.exp(-image_logit))
    return p_mel, [Metadata(a, s, t) for a, s, t in zip(age, sex, site)], y


def test_fields_parse_or_say_which_values_they_take():
    assert Metadata.parse("63", "M", "Lower_Extremity") == Metadata(63.0, "male", "lower extremity")
    assert Metadata.parse(None, "", "unknown").empty and Metadata.parse(float("nan")).empty
    with pytest.raises(MetadataError, match=r"age must be between 0 and 120"):
        Metadata.parse(age=130)
    with pytest.raises(MetadataError, match=r"age must be a number"):
        Metadata.parse(age="old")
    with pytest.raises(MetadataError, match=r"sex must be one of male, female"):
        Metadata.parse(sex="x")
    with pytest.raises(MetadataError, match=r"site must be one of abdomen, acral, back"):
        Metadata.parse(site="elbow")


def test_fit_finds_age_and_site_and_unknown_fields_fall_back_towards_the_image():
    p_mel, patients, y = synthetic_patients()
    model = MetadataModel.fit(p_mel[:1000], patients[:1000], y[:1000])
    held_p, held_patients, held_y = p_mel[1000:], patients[1000:], y[1000:]
    image_auc = roc_auc_score(held_y, held_p)
    combined = model.probability(held_p, held_patients)
    assert roc_auc_score(held_y, combined) > image_auc + 0.02  # the fields carry real signal here
    assert model.coefficients["age"] > 0 and model.coefficients["site_back"] > model.coefficients["site_face"]
    # Every field hidden: a monotone map of the image score alone (same ranking as the image).
    nothing = model.probability(held_p, [Metadata()] * len(held_p))
    assert roc_auc_score(held_y, nothing) == pytest.approx(image_auc, abs=1e-9)
    # Fitted with each field hidden in turn: one field given still helps over none.
    age_only = model.probability(held_p, [Metadata(age=m.age) for m in held_patients])
    assert roc_auc_score(held_y, age_only) > image_auc
    assert len(HIDDEN_SUBSETS) == 8
    # Stored as plain numbers in config.json and read back identically; unknown features refused.
    model.threshold = 0.3
    back = MetadataModel.from_config(model.to_config())
    assert np.allclose(back.probability(held_p, held_patients), combined) and back.threshold == 0.3
    with pytest.raises(ValueError, match="features this version does not know"):
        MetadataModel.from_config({**model.to_config(), "coefficients": {**model.coefficients, "bmi": 1.0}})
    assert set(model.to_config()["features"]) == set(FEATURES)


@pytest.fixture(scope="module")
def fitted_models(tmp_path_factory, fixtures_dir) -> Path:
    """A copy of the tiny models where vit-tiny has a metadata regression (fitted on synthetic patients)."""
    root = tmp_path_factory.mktemp("metadata_models")
    source = shared_tiny_models(tmp_path_factory, fixtures_dir)
    for name in (VIT, "resnet18-tiny"):
        shutil.copytree(source / name, root / name)
    p_mel, patients, y = synthetic_patients()
    model = MetadataModel.fit(p_mel, patients, y)
    model.threshold = 0.25
    edit_config_json(root / VIT, **{CONFIG_KEY: model.to_config()})
    return root


def test_classifier_result_adds_p_mel_with_the_patients_fields(fitted_models, ham_image_paths):
    entry = Classifier(str(fitted_models / VIT), backend="torch")
    assert entry.describe()["metadata_inputs"]["sites"] == list(SITES)
    image = load_image(ham_image_paths[0], max_side=1024)
    prediction = entry.predict([image])[0]
    patient = Metadata(72.0, "male", "back")
    result = entry.result("a.jpg", prediction, patient=patient)
    expected = entry.metadata_model.probability(prediction.probabilities["mel"], patient)[0]
    assert result.with_metadata.probability == pytest.approx(expected)
    record = result.to_json()["with_metadata"]
    assert record["inputs"] == {"age": 72.0, "sex": "male", "site": "back"}
    assert record["above_threshold"] == (expected >= 0.25)
    # Fitted on one-view scores: none for a prediction averaged over test-time views.
    assert entry.result("a.jpg", entry.predict([image], tta=8)[0], patient=patient, views=8).with_metadata is None
    # No fields, or a model without the regression: no such record.
    assert "with_metadata" not in entry.result("a.jpg", prediction, patient=Metadata()).to_json()
    plain = Classifier(str(fitted_models / "resnet18-tiny"), backend="torch")
    assert plain.describe()["metadata_inputs"] is None
    assert plain.result("a.jpg", plain.predict([image])[0], patient=patient).with_metadata is None


def test_predict_csv_and_ham_layout_get_p_mel_with_metadata(fitted_models, ham_dir, ham_image_paths, tmp_path):
    torch.set_num_threads(1)
    csv_path = tmp_path / "visits.csv"
    ages, sexes, sites = ["45", "81", "old", ""], ["female", "m", "male", ""], ["back", "face", "back", ""]
    pd.DataFrame({"path": [str(p) for p in ham_image_paths[:4]], "age": ages, "sex": sexes,
                  "localization": sites}).to_csv(csv_path, index=False)
    args = ["--num_workers", "0", "--ood", "none", "--batch_size", "3"]
    main(["--model", str(fitted_models / VIT), "--data", str(csv_path), "--output_dir", str(tmp_path / "csv"), *args])
    table = pd.read_csv(tmp_path / "csv" / "predictions.csv", dtype={"metadata_error": str, "age": str}).set_index("index")
    assert set(WITH_METADATA_COLUMNS) <= set(table.columns)
    entry = Classifier(str(fitted_models / VIT), backend="torch")
    for i in (0, 1):
        patient = Metadata.parse(ages[i], sexes[i], sites[i])
        expected = entry.metadata_model.probability(table.loc[i, "melanoma_probability"], patient)[0]
        assert table.loc[i, "melanoma_probability_with_metadata"] == pytest.approx(expected, abs=1e-5)
        assert bool(table.loc[i, "above_threshold_with_metadata"]) == (expected >= 0.25)
    # A value the model cannot read: the image is still scored, the row says why.
    assert "age must be a number" in table.loc[2, "metadata_error"] and pd.isna(table.loc[2, "melanoma_probability_with_metadata"])
    assert not pd.isna(table.loc[2, "melanoma_probability"])
    assert pd.isna(table.loc[3, "melanoma_probability_with_metadata"])  # nothing given
    # The HAM10000 layout: its own HAM10000_metadata.csv gives age, sex and site.
    assert RecordSource(ham_dir).has_fields()
    main(["--model", str(fitted_models / VIT), "--data", str(ham_dir), "--output_dir", str(tmp_path / "ham"), *args])
    ham = pd.read_csv(tmp_path / "ham" / "predictions.csv")
    meta = pd.read_csv(ham_dir / "HAM10000_metadata.csv").set_index("image_id")
    assert ham["melanoma_probability_with_metadata"].notna().all()
    assert list(ham["site"]) == list(meta.loc[ham["id"], "localization"])
    # A model without the regression writes no such columns.
    main(["--model", str(fitted_models / "resnet18-tiny"), "--data", str(csv_path), "--output_dir", str(tmp_path / "plain"), *args])
    assert not set(WITH_METADATA_COLUMNS) & set(pd.read_csv(tmp_path / "plain" / "predictions.csv").columns)


def test_rest_predict_takes_age_sex_and_site(fitted_models, ham_image_paths):
    import app as app_module
    from model.catalogue import ModelCatalogue

    zoo = ModelCatalogue(models_dir=fitted_models, hub_ids=[], ood_path="none")
    _, fastapi_app = app_module.build_app(zoo)
    port = app_module.free_port()
    server, thread = serve_in_thread(fastapi_app, port=port)
    url = f"http://127.0.0.1:{port}/"
    try:
        models = {m["model_id"]: m for m in httpx.get(url + "public_models").json()["models"]}
        assert models[VIT]["metadata_inputs"]["fields"] == ["age", "sex", "site"]
        path = ham_image_paths[1]
        upload = {"file": (path.name, path.read_bytes(), "image/jpeg")}
        response = httpx.post(url + "predict", params={"model_id": VIT, "age": "67", "sex": "female", "site": "back"},
                              files=upload)
        assert response.status_code == 200, response.text
        deadline, body = time.monotonic() + 60, {"status": "pending"}
        while body["status"] == "pending" and time.monotonic() < deadline:
            body = httpx.get(url + f"from_task/{response.json()['task_uuid']}").json()
            time.sleep(0.1)
        (result,) = body["results"]
        expected = zoo.get(VIT).metadata_model.probability(result["prediction"]["melanoma_probability"],
                                                           Metadata(67.0, "female", "back"))[0]
        assert result["with_metadata"]["probability"] == pytest.approx(expected, abs=1e-6)
        bad = httpx.post(url + "predict", params={"model_id": VIT, "site": "elbow"}, files=upload)
        assert bad.status_code == 422 and "site must be one of" in bad.text and "Traceback" not in bad.text
        # The page's optional inputs, through the Gradio API: the verdict adds the secondary estimate.
        client = Client(url, verbose=False)
        try:
            _, verdict, *_, record = client.predict(handle_file(str(path)), VIT, "mean", 0.9, 0, 67, "female", "back",
                                                    api_name="/predict")[:5]
            assert record["with_metadata"]["probability"] == pytest.approx(expected, abs=1e-6)
            assert "With the patient's age 67, female, back:" in verdict and "secondary estimate" in verdict
            _, verdict, *_ = client.predict(handle_file(str(path)), VIT, api_name="/predict")
            assert "With the patient's" not in verdict  # nothing given: the image's verdict alone
        finally:
            client.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
