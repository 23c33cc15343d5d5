"""The top-class decision rule (model.decision) and its validation fit (train/decision_rule.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.classifier import Classifier
from model.decision import DECISION_KEY, balanced_scores, decision_offsets
from train.decision_rule import fit, main as decision_rule_main

from test_classifier import shared_tiny_models


def test_balanced_scores_hand_computed() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4]])
    offsets = np.log([0.7, 0.2, 0.1])  # tau 1, prior = the first row
    scores = balanced_scores(probs, offsets)
    np.testing.assert_allclose(scores[0], [1 / 3] * 3)  # p / prior is flat: every class equal
    expected = np.array([0.5 / 0.7, 0.1 / 0.2, 0.4 / 0.1])
    np.testing.assert_allclose(scores[1], expected / expected.sum())
    assert scores[1].argmax() == 2 and probs[1].argmax() == 0  # the rare class wins once the prior is removed
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)
    assert np.array_equal(balanced_scores(probs, None), probs)  # no rule: the probabilities decide


def test_decision_offsets_read_in_label_order_and_refuse_a_missing_label() -> None:
    config = {DECISION_KEY: {"nv": 1.5, "mel": -0.5, "bkl": 0.0}}
    np.testing.assert_array_equal(decision_offsets(config, ["mel", "nv", "bkl"]), [-0.5, 1.5, 0.0])
    assert decision_offsets({}, ["mel"]) is None
    with pytest.raises(ValueError, match=r"no offset for \['vasc'\]"):
        decision_offsets(config, ["mel", "vasc"])


def test_classifier_top_class_follows_the_stored_rule_and_probabilities_do_not(tmp_path_factory, fixtures_dir,
                                                                             ham_image_paths) -> None:
    source = shared_tiny_models(tmp_path_factory, fixtures_dir) / "melanoma-vit-tiny"
    folder = Path(shutil.copytree(source, tmp_path_factory.mktemp("decision") / "vit"))
    images = [Image.open(p).convert("RGB") for p in ham_image_paths[:4]]
    plain = Classifier(folder).predict(images)
    config = json.loads((folder / "config.json").read_text())
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    # An offset of -100 for `df` makes it every image's decision; +100 elsewhere changes nothing in P.
    config[DECISION_KEY] = {name: (-100.0 if name == "df" else 0.0) for name in labels}
    (folder / "config.json").write_text(json.dumps(config))
    ruled = Classifier(folder).predict(images)
    assert all(p.label != "df" for p in plain) and all(r.label == "df" for r in ruled)
    for p, r in zip(plain, ruled):
        assert r.probabilities == pytest.approx(p.probabilities, abs=1e-6)
    assert Classifier(folder).analyze(images[0]).label == "df"  # the app's single-image path (with its explanation)


def _write_validation(folder: Path, source: str, labels: list[str], probs: np.ndarray, y: np.ndarray) -> Path:
    """SYNTHETIC TEST INPUT: an evaluate.py validation output folder (metrics.json + predictions.csv)."""
    import pandas as pd

    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"split": "validation", "data": f"../shared/data/{source}"}))
    table = pd.DataFrame({"image_id": [f"{source}_{i}" for i in range(len(y))], "label": [labels[c] for c in y]})
    for c, name in enumerate(labels):
        table[f"p_{name}"] = probs[:, c]
    table.to_csv(folder / "predictions.csv", index=False)
    return folder


def test_decision_rule_fit_lifts_validation_balanced_accuracy_and_writes_the_config(tmp_path) -> None:
    """A model biased towards its common class: 90 rows of class a (P(a) 0.6-0.9), 10 of class b
    whose P(b) is higher than the a rows' but below 0.5: argmax never says b (balanced accuracy
    0.5), the fitted rule does."""
    rng = np.random.default_rng(0)
    labels = ["a", "b"]
    p_b = np.concatenate([rng.uniform(0.1, 0.3, 90), rng.uniform(0.35, 0.45, 10)])
    probs = np.stack([1 - p_b, p_b], axis=1)
    y = np.array([0] * 90 + [1] * 10)
    result = fit([("set", probs, y)], 2)
    assert result["grid"][0]["mean"] == pytest.approx(0.5)  # tau 0: plain argmax
    assert result["best"]["mean"] == pytest.approx(1.0)
    decided = balanced_scores(probs, result["offsets"]).argmax(axis=1)
    assert np.array_equal(decided, y)

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))
    folder = _write_validation(tmp_path / "val", "ham10000", labels, probs, y)
    rule = decision_rule_main(["--model", str(model), "--predictions", str(folder), "--write-config"])
    config = json.loads((model / "config.json").read_text())
    assert set(config[DECISION_KEY]) == {"a", "b"} and math.isclose(sum(config[DECISION_KEY].values()), 0, abs_tol=1e-5)
    assert config["dx_decision_rule"]["validation_balanced_accuracy"] == {"ham10000": 1.0} == rule["validation_balanced_accuracy"]
    test_split = _write_validation(tmp_path / "test", "ham10000", labels, probs, y)
    (test_split / "metrics.json").write_text(json.dumps({"split": "test", "data": "x"}))
    with pytest.raises(ValueError, match="validation only"):
        decision_rule_main(["--model", str(model), "--predictions", str(test_split)])


def test_the_verdict_names_both_the_decision_and_the_most_probable_class() -> None:
    """When the rule names a rarer class than the argmax, the page says so and gives both numbers."""
    from model.results import ImageResult, ModelMetadata, Prediction
    from webapp.formatting import verdict_markdown

    probabilities = {"akiec": 0.02, "bcc": 0.03, "bkl": 0.05, "df": 0.01, "mel": 0.30, "nv": 0.58, "vasc": 0.01}

    def result(decision: str | None) -> ImageResult:
        prediction = Prediction(probabilities, decision=decision)
        return ImageResult(name="x.jpg", prediction=prediction, model=ModelMetadata("m", "cnn", 224, 7),
                           label_name={"mel": "Melanoma", "nv": "Melanocytic nevus"}[prediction.label],
                           melanoma_threshold=0.2)

    ruled = verdict_markdown(result("mel"))
    assert "Top class: Melanoma (30.0%), by this model's balanced decision rule" in ruled
    assert "the most probable class is Melanocytic nevus (58.0%)" in ruled
    plain = verdict_markdown(result(None))
    assert "Top class: Melanocytic nevus (58.0%)." in plain and "decision rule" not in plain


def test_decision_rule_picks_its_procedure_by_cross_validation_inside_validation(tmp_path) -> None:
    """The rule records both procedures' held-out balanced accuracy and uses the better one (the
    simpler on a tie); --procedure forces one. On a source whose rare class is separable, both reach
    it on held-out folds."""
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c"]
    y = np.array([0] * 120 + [1] * 30 + [2] * 10)
    probs = rng.dirichlet([1, 1, 1], len(y)) * 0.3
    probs[np.arange(len(y)), y] += 0.3  # informative, but argmax is often wrong
    probs[:, 0] += 0.4  # biased towards the common class
    probs /= probs.sum(1, keepdims=True)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b", "2": "c"}}))
    folder = _write_validation(tmp_path / "val", "ham10000", labels, probs, y)
    rule = decision_rule_main(["--model", str(model), "--predictions", str(folder)])
    cv = rule["cross_validation"]["balanced_accuracy"]
    assert set(cv) == {"tau", "tau + per-class offsets"} and all(0.0 <= v <= 1.0 for v in cv.values())
    better = "tau + per-class offsets" if cv["tau + per-class offsets"] > cv["tau"] else "tau"
    assert rule["procedure"] == better
    assert ("coordinate ascent" in rule["method"]) == (better != "tau")
    forced = decision_rule_main(["--model", str(model), "--predictions", str(folder), "--procedure", "tau + per-class offsets"])
    assert forced["procedure"] == "tau + per-class offsets" and "cross_validation" not in forced
    assert "coordinate ascent" in forced["method"]


def test_validation_rows_are_grouped_by_lesion_else_by_image(tmp_path) -> None:
    from train.decision_rule import read_validation

    labels = ["a", "b"]
    folder = _write_validation(tmp_path / "val", "ham10000", labels, np.full((3, 2), 0.5), np.array([0, 1, 0]))
    table = (folder / "predictions.csv")
    import pandas as pd

    frame = pd.read_csv(table)
    frame["lesion_id"] = ["L1", "L1", None]
    frame.to_csv(table, index=False)
    name, probs, y, groups = read_validation(folder, labels)
    assert name == "ham10000" and probs.shape == (3, 2) and list(y) == [0, 1, 0]
    assert list(groups) == ["L1", "L1", "ham10000_2"]


def test_cross_validation_keeps_a_lesion_in_one_fold_and_refuses_too_few_lesions() -> None:
    from train.decision_rule import cross_validate, group_folds

    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 20)
    probs = rng.dirichlet([1, 1, 1], len(y))
    groups = np.repeat([f"L{i}" for i in range(12)], 5)  # 12 lesions of 5 images
    for seed in (0, 1):
        fold = group_folds("ham10000", groups, 4, seed)
        assert sorted(set(fold)) == [0, 1, 2, 3]
        assert all(len(set(fold[groups == g])) == 1 for g in set(groups))  # a lesion's images share a fold
    assert not np.array_equal(group_folds("ham10000", groups, 4, 0), group_folds("ham10000", groups, 4, 1))
    scores = cross_validate([("ham10000", probs, y, groups)], 3, folds=4, repeats=1)
    assert set(scores) == {"tau", "tau + per-class offsets"} and all(0.0 <= v <= 1.0 for v in scores.values())
    with pytest.raises(ValueError, match="3 lesions in validation, fewer than 5 folds"):
        cross_validate([("ham10000", probs, y, np.repeat(["A", "B", "C"], 20))], 3)
