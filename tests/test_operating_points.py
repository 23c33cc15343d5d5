"""train/operating_points.py: the flag's false-alarm rate and a balanced threshold, measured on
validation predictions, stored in config.json and shown by the app's verdict and records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_classifier import shared_tiny_models

from model.imageio import load_image
from model.records import result_row
from train.metrics import sensitivity_specificity, threshold_balanced
from train.operating_points import main

Y = [1, 1, 1, 1, 0, 0, 0]
SCORES = [0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1]


def test_balanced_threshold_maximises_sensitivity_plus_specificity():
    # J = tpr - fpr by threshold: 0.9 .25, 0.8 .50, 0.7 .75, 0.6 .42, 0.3 .08, 0.2 .33, 0.1 0.
    assert threshold_balanced(Y, SCORES) == pytest.approx(0.7)
    assert sensitivity_specificity(Y, SCORES, 0.7) == (pytest.approx(0.75), pytest.approx(1.0))
    assert threshold_balanced([0, 0], [0.1, 0.2]) is None and threshold_balanced([1, 1], [0.1, 0.2]) is None


def _validation_folder(root: Path, source: str, split: str, labels: list[str], p_mel: list[float]) -> Path:
    """What train/evaluate.py writes: metrics.json (data, split) and predictions.csv (label, p_mel)."""
    folder = root / source
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"data": f"../shared/data/{source}", "split": split}))
    pd.DataFrame({"image_id": [f"{source}_{i}" for i in range(len(labels))], "label": labels, "p_mel": p_mel,
                  "p_nv": [1 - p for p in p_mel]}).to_csv(folder / "predictions.csv", index=False)
    return folder


def test_points_are_pooled_over_validation_sources_and_reach_the_verdict(tmp_path_factory, fixtures_dir, tmp_path,
                                                                          ham_image_paths):
    from model.classifier import Classifier
    from webapp.formatting import verdict_markdown

    model = Path(shutil.copytree(shared_tiny_models(tmp_path_factory, fixtures_dir) / "vit-tiny", tmp_path / "vit"))
    config = json.loads((model / "config.json").read_text())
    config["melanoma_threshold"] = 0.5
    (model / "config.json").write_text(json.dumps(config))
    labels = ["mel" if y else "nv" for y in Y]
    ham = _validation_folder(tmp_path / "val", "ham10000", "validation", labels[:4], SCORES[:4])
    isic = _validation_folder(tmp_path / "val", "isic2017", "validation", labels[4:], SCORES[4:])
    test = _validation_folder(tmp_path / "test", "derm7pt", "test", labels, SCORES)

    with pytest.raises(ValueError, match="validation only"):
        main(["--model", str(model), "--predictions", str(test)])
    points = main(["--model", str(model), "--predictions", str(ham), str(isic), "--write-config"])
    # Pooled: the flag at 0.5 catches 3 of 4 melanomas, flags 1 of 3 others; balanced as above.
    assert points["flag"] == {"threshold": 0.5, "sensitivity": 0.75, "specificity": pytest.approx(2 / 3)}
    assert points["balanced"] == {"threshold": pytest.approx(0.7), "sensitivity": 0.75, "specificity": 1.0}
    assert points["data"] == "validation: HAM10000 4, ISIC 2017 3"
    stored = json.loads((model / "config.json").read_text())["melanoma_operating_points"]
    assert stored["command"].startswith("python train/operating_points.py --model ")

    entry = Classifier(model, model_id="vit")
    assert entry.operating_points.balanced.threshold == pytest.approx(0.7)
    image = load_image(ham_image_paths[0], max_side=1024)
    result = entry.result("a.jpg", entry.predict([image])[0])
    verdict = verdict_markdown(result)
    assert "also flagged 33.3% of the non-melanomas (false alarms) and caught 75.0% of the melanomas" in verdict
    side = "above" if result.melanoma_probability >= 0.7 else "below"
    assert f"Balanced threshold 70.0% (on validation: sensitivity 75.0%, false alarms 0.0%): this image is **{side}** it." in verdict
    row = result_row(result)
    assert row["balanced_threshold"] == pytest.approx(0.7) and row["above_balanced_threshold"] == (side == "above")
    assert result.to_json()["prediction"]["above_balanced_threshold"] == (side == "above")

    from webapp.formatting import batch_summary
    from webapp.scoring import BatchResult

    batch = BatchResult("vit", [result, result], [0, 1], [])
    above = 2 if result.melanoma else 0
    balanced = 2 if side == "above" else 0
    assert batch_summary(batch) == (
        f"2 lesion images ranked by P(melanoma): {above} above the model's threshold (which on validation also "
        f"flagged 33.3% of the non-melanomas), {balanced} above the balanced threshold 70.0%."
    )


def test_tta_views_get_their_own_threshold_in_operating_points_the_app_and_predict(
        tmp_path_factory, fixtures_dir, tmp_path, ham_image_paths):
    """`--tta 8` on 8-view validation predictions stores `melanoma_tta` (its own 95 %-sensitivity flag
    threshold and both points); a prediction averaged over 8 views is judged by it in the Classifier,
    the app (MELANOMA_TTA_VIEWS=8) and predict.py --tta 8, one-view ones by the one-view threshold."""
    from model.classifier import Classifier
    from train.predict import main as predict_main
    from webapp.context import AppSettings, tta_views_from
    from webapp.scoring import ScoringService
    from model.catalogue import ModelCatalogue

    models = tmp_path / "models"
    model = Path(shutil.copytree(shared_tiny_models(tmp_path_factory, fixtures_dir) / "vit-tiny", models / "vit"))
    labels = ["mel" if y else "nv" for y in Y]
    one = _validation_folder(tmp_path / "one", "ham10000", "validation", labels, SCORES)
    eight = _validation_folder(tmp_path / "eight", "ham10000", "validation", labels, SCORES)
    (eight / "metrics.json").write_text(json.dumps({"data": "../shared/data/ham10000", "split": "validation", "tta": 8}))
    with pytest.raises(ValueError, match="1-view predictions, not 8-view"):
        main(["--model", str(model), "--predictions", str(one), "--tta", "8"])
    points = main(["--model", str(model), "--predictions", str(eight), "--tta", "8", "--write-config"])
    # 95 % sensitivity on the 8-view scores: all four melanomas, so the lowest melanoma score.
    assert points["flag"]["threshold"] == pytest.approx(0.2) and points["flag"]["sensitivity"] == 1.0
    stored = json.loads((model / "config.json").read_text())
    assert stored["melanoma_tta"]["views"] == 8 and stored["melanoma_tta"]["threshold"] == pytest.approx(0.2)
    assert "--tta 8" in stored["melanoma_tta"]["operating_points"]["command"]

    entry = Classifier(model, model_id="vit", backend="torch")
    assert entry.views_for(8) == 8 and entry.views_for(4) == 1 and entry.describe()["tta_thresholds"] == {8: 0.2}
    image = load_image(ham_image_paths[0], max_side=1024)
    eight_views = entry.predict([image], tta=8)[0]
    judged = entry.result("a.jpg", eight_views, views=8)
    assert judged.melanoma_threshold == pytest.approx(0.2) and judged.operating_points.balanced.threshold == pytest.approx(0.7)
    assert judged.to_json()["prediction"]["views"] == 8
    assert entry.result("a.jpg", entry.predict([image])[0]).melanoma_threshold == entry.melanoma_threshold

    # The app's scoring: 8 views (thresholds fitted for them) for this model, for one image and for a batch.
    scoring = ScoringService(ModelCatalogue(models_dir=models, hub_ids=[], ood_path="none"), tta_views=8)
    explained = scoring.explain(scoring.entry("vit"), "a.jpg", image)
    assert explained.result.views == 8 and explained.result.melanoma_threshold == pytest.approx(0.2)
    assert explained.result.probabilities == pytest.approx(eight_views.probabilities, abs=1e-6)
    batch = scoring.score(scoring.entry("vit"), [("a.jpg", image)])
    assert batch.results[0].probabilities == pytest.approx(eight_views.probabilities, abs=1e-6)
    assert tta_views_from("8") == 8 and AppSettings().tta_views == 1
    with pytest.raises(ValueError, match="MELANOMA_TTA_VIEWS must be a whole number from 1 to 8"):
        tta_views_from("9")

    # predict.py --tta 8: the 8-view threshold in its rows.
    predict_main(["--model", str(model), "--data", str(ham_image_paths[0].parent), "--output_dir", str(tmp_path / "out"),
                  "--num_workers", "0", "--ood", "none", "--tta", "8", "--limit", "2"])
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert rows["threshold"].tolist() == pytest.approx([0.2, 0.2])
