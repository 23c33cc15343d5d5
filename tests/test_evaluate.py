"""Tests for train/metrics.py (hand-computed values) and train/evaluate.py (end to end)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from model.calibration import unfolded_temperatures
from model.metrics_schema import METRIC_KEYS
from train.metrics import (
    bootstrap_auc_ci,
    expected_calibration_error,
    fit_temperature,
    mask_share,
    melanoma_auc,
    multiclass_metrics,
    sensitivity_specificity,
    tempered_probabilities,
    threshold_for_sensitivity,
)

# ----------------------------------------------------------------------------- binary metrics


def test_auc_hand_computed():
    # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4
    assert melanoma_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # with a tie (counts 1/2): pos {0.2, 0.9, 0.4} vs neg {0.2, 0.5}: 0.5 + 0 + 1 + 1 + 1 + 0 = 3.5 of 6
    assert melanoma_auc([0, 1, 0, 1, 1], [0.2, 0.2, 0.5, 0.9, 0.4]) == pytest.approx(3.5 / 6)


def test_auc_undefined_for_one_class_and_bad_input():
    assert melanoma_auc([0, 0, 0], [0.1, 0.2, 0.3]) is None
    with pytest.raises(ValueError, match="binary"):
        melanoma_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one score per label"):
        melanoma_auc([0, 1], [0.1, 0.2, 0.3])


def test_sensitivity_specificity_at_threshold():
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.5, 0.3, 0.6, 0.2, 0.1, 0.4]
    sens, spec = sensitivity_specificity(y, s, 0.5)  # 0.5 counts as positive
    assert sens == pytest.approx(2 / 3)
    assert spec == pytest.approx(3 / 4)
    assert sensitivity_specificity([0, 0], [0.1, 0.9], 0.5) == (None, 0.5)


def test_threshold_for_sensitivity():
    y = [1, 1, 1, 1, 0, 0, 0]
    s = [0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1]
    # 95% of 4 melanomas needs all 4: highest threshold catching 0.2
    t95 = threshold_for_sensitivity(y, s, 0.95)
    assert t95 == pytest.approx(0.2) and threshold_for_sensitivity(y, s) == t95  # the project's rule: 95%
    assert sensitivity_specificity(y, s, t95) == (pytest.approx(1.0), pytest.approx(1 / 3))
    assert threshold_for_sensitivity(y, s, 0.75) == pytest.approx(0.7)
    assert threshold_for_sensitivity(y, s, 0.5) == pytest.approx(0.8)
    assert threshold_for_sensitivity([0, 0], [0.1, 0.2]) is None
    with pytest.raises(ValueError, match="target"):
        threshold_for_sensitivity(y, s, 1.5)


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    y = (rng.random(80) < 0.3).astype(int)
    s = rng.random(80) + 0.4 * y
    auc = melanoma_auc(y, s)
    ci = bootstrap_auc_ci(y, s, n_resamples=200, seed=7)
    assert ci[0] < auc < ci[1]
    assert 0.0 <= ci[0] <= ci[1] <= 1.0
    assert bootstrap_auc_ci(y, s, n_resamples=200, seed=7) == ci
    assert bootstrap_auc_ci(y, s, n_resamples=200, seed=8) != ci
    assert bootstrap_auc_ci([1, 1], [0.2, 0.3]) is None


# ------------------------------------------------------------------------- multiclass metrics


def test_multiclass_metrics_hand_computed():
    y = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 0, 1]
    m = multiclass_metrics(y, p, ["a", "b", "c"])
    # recalls a 2/3, b 1/2, c 0; F1 a 2/3, b 2*(1/3*1/2)/(1/3+1/2) = 0.4, c 0
    assert m["per_class_recall"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 0.0})
    assert m["balanced_accuracy"] == pytest.approx(7 / 18)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 0.0) / 3)
    assert m["labels"] == ["a", "b", "c"]


def test_multiclass_metrics_over_present_classes_only():
    names = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    y = [4, 4, 5, 2]  # ISIC 2017: mel, mel, nv, bkl
    p = [4, 1, 5, 2]  # one melanoma called bcc: a class with no samples, still an error
    m = multiclass_metrics(y, p, names)
    assert m["labels"] == ["bkl", "mel", "nv"]
    assert m["per_class_recall"] == pytest.approx({"bkl": 1.0, "mel": 0.5, "nv": 1.0})
    assert m["balanced_accuracy"] == pytest.approx(2.5 / 3)
    assert m["accuracy"] == pytest.approx(0.75)
    # F1: bkl 1, mel P=1 R=1/2 -> 2/3, nv 1 (bcc not averaged in)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)


# ------------------------------------------------------------------------------- calibration


def test_ece_hand_computed():
    # bin of 0.95: acc 1/2 -> |0.5-0.95| * 2/4; bin of 0.55: acc 1/2 -> |0.5-0.55| * 2/4
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    y = np.array([0, 1, 0, 0])
    assert expected_calibration_error(probs, y, n_bins=15) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)
    # perfectly calibrated: confidence 0.75, 3 of 4 right
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="N, C"):
        expected_calibration_error(probs, np.array([0, 1]))


def _calibrated_logits(n: int = 2000, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2.0
    y = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=g).squeeze(1)
    return z, y


def test_temperature_scaling_recovers_known_temperature():
    z, y = _calibrated_logits()
    t = fit_temperature(z * 3.0, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(z / 2.0, y) == pytest.approx(0.5, rel=0.1)
    # scaling brings ECE down
    probs_raw = tempered_probabilities(z * 3.0)
    probs_cal = tempered_probabilities(z * 3.0, t)
    assert expected_calibration_error(probs_cal, y.numpy()) < expected_calibration_error(probs_raw, y.numpy()) / 2


def test_temperature_with_views_and_grouped_labels():
    z, y = _calibrated_logits(c=7, seed=3)
    t = fit_temperature(z * 3.0, y)
    # identical views model the same probabilities -> the same temperature
    assert fit_temperature(torch.stack([z * 3.0, z * 3.0], dim=1), y) == pytest.approx(t, rel=1e-4)
    # binary labels (class 4 vs rest) for a 7-class model: still calibrated at T = 1 for z
    groups = np.zeros((2, 7))
    groups[1, 4] = 1
    groups[0, [0, 1, 2, 3, 5, 6]] = 1
    y_bin = (y == 4).long()
    assert fit_temperature(z * 3.0, y_bin, groups=groups) == pytest.approx(3.0, rel=0.2)


# --------------------------------------------------------------------- explanation quality


def test_mask_share_hand_computed():
    assert mask_share(np.array([[1.0, 3.0], [0.0, 0.0]]), np.array([[1, 0], [1, 1]])) == pytest.approx(0.25)
    # uniform map: share = mask area
    mask = np.zeros((4, 4))
    mask[:2, :2] = 1
    mask[3, 3] = 1
    assert mask_share(np.ones((2, 2)), mask) == pytest.approx(5 / 16)
    # bilinear 2 -> 4 upsampling of columns [1, 0] gives [1, 0.75, 0.25, 0]; left half mask
    left = np.zeros((4, 4))
    left[:, :2] = 1
    assert mask_share(np.array([[1.0, 0.0], [1.0, 0.0]]), left) == pytest.approx(1.75 / 2)
    assert mask_share(np.zeros((2, 2)), left) is None
    with pytest.raises(ValueError, match="non-negative"):
        mask_share(-np.ones((2, 2)), left)


# ------------------------------------------------------------------------------ train/evaluate.py

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# What the cards, the model-index and the app read (model/metrics_schema.py), plus the run's context.
REQUIRED_KEYS = {"model", "data", "split", "labels", "per_class_recall", "temperature", "command", *METRIC_KEYS}
PLOTS = ("roc.png", "confusion_matrix.png", "reliability.png", "confidence_hist.png")


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A tiny random MelanomaViT (dx labels) saved with its ViTImageProcessor."""
    from transformers import ViTImageProcessor

    from model import MelanomaViTConfig, MelanomaViTForImageClassification
    from model.labels import dx_id2label

    torch.manual_seed(0)
    config = MelanomaViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=37, id2label=dx_id2label())
    folder = tmp_path_factory.mktemp("tiny_vit")
    MelanomaViTForImageClassification(config).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _assert_outputs(out: Path, n: int) -> tuple[dict, pd.DataFrame]:
    metrics = json.loads((out / "metrics.json").read_text())
    assert REQUIRED_KEYS <= set(metrics)
    assert metrics["n"] == n
    assert 0.0 <= metrics["melanoma_auc"] <= 1.0
    lo, hi = metrics["melanoma_auc_ci95"]
    assert lo <= metrics["melanoma_auc"] <= hi
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "ece", "sensitivity_default", "specificity_default"):
        assert 0.0 <= metrics[key] <= 1.0, key
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == n
    prob_cols = [c for c in preds.columns if c.startswith("p_")]
    np.testing.assert_allclose(preds[prob_cols].sum(axis=1), 1.0, atol=1e-4)
    for name in PLOTS:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 100
            img.verify()
    return metrics, preds


@pytest.mark.slow
def test_evaluate_script_on_ham_fixture(tiny_vit_dir, ham_dir, tmp_path, script_env):
    out = tmp_path / "eval"
    cmd = [sys.executable, "train/evaluate.py", "--model", str(tiny_vit_dir), "--data", str(ham_dir),
           "--output-dir", str(out), "--tta", "2", "--bootstrap", "100"]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_images = len(list((ham_dir / "images").glob("*.jpg")))
    metrics, preds = _assert_outputs(out, n_images)
    assert metrics["tta"] == 2 and metrics["split"] is None
    assert set(metrics["labels"]) == set(pd.read_csv(ham_dir / "HAM10000_metadata.csv")["dx"])
    # no validation data: nothing fitted
    assert metrics["threshold_val95"] is None and metrics["temperature"] is None
    assert metrics["ece_temperature_scaled"] is None
    # 4 fixture images have masks; the uniform baseline is their mean lesion area
    masks = sorted((ham_dir / "masks").glob("*_segmentation.png"))
    assert metrics["rollout_mask_n"] == len(masks) == 4
    assert 0.0 <= metrics["rollout_mask_share"] <= 1.0
    areas = [(np.asarray(Image.open(m).convert("L")) >= 128).mean() for m in masks]
    assert metrics["rollout_mask_share_uniform"] == pytest.approx(np.mean(areas))
    assert metrics["command"].startswith("python train/evaluate.py --model")
    assert set(preds["image_id"]) == {p.stem for p in ham_dir.glob("images/*.jpg")}
    # Subgroups from HAM10000_metadata.csv, recomputed from predictions.csv by hand.
    meta = pd.read_csv(ham_dir / "HAM10000_metadata.csv").set_index("image_id").loc[preds["image_id"]]
    p_mel = preds["p_mel"].to_numpy()
    y_mel = (meta["dx"] == "mel").to_numpy().astype(int)
    sex = metrics["subgroups"]["sex"]
    assert {k: v["n"] for k, v in sex.items()} == meta["sex"].value_counts().to_dict() == {"male": 9, "female": 3}
    male = (meta["sex"] == "male").to_numpy()
    assert sex["male"]["n_melanoma"] == 3 and sex["female"]["n_melanoma"] == 0
    assert sex["male"]["melanoma_auc"] == pytest.approx(roc_auc_score(y_mel[male], p_mel[male]), abs=1e-5)
    assert sex["female"]["melanoma_auc"] is None  # no melanoma among the women: AUC undefined, not 0.5
    bands = metrics["subgroups"]["age_band"]
    assert {k: v["n"] for k, v in bands.items()} == {"50-69": 4, "30-49": 4, ">=70": 4}
    site = metrics["subgroups"]["site"]
    assert site["unknown"]["n"] == 2 and site["face"]["n"] == 2 and sum(v["n"] for v in site.values()) == 12


def _model_p_mel(folder: Path, image_paths: list[Path], temperature: float) -> np.ndarray:
    from model.imageio import load_image
    from model.loading import load_classifier

    net, processor = load_classifier(folder)
    images = [load_image(p) for p in image_paths]
    with torch.no_grad():
        logits = net(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]).logits
    return torch.softmax(logits / temperature, dim=-1)[:, net.config.label2id["mel"]].numpy()


def test_evaluate_and_the_app_give_the_same_p_mel_for_unusual_files(tiny_vit_dir, ham_image_paths, tmp_path):
    """One decoder (model.imageio) and one loading rule (model.loading): for an RGBA PNG with
    transparent pixels, a 16-bit greyscale PNG and a JPEG with an EXIF rotation, evaluate.py's
    prediction path and the app's (its decoder, then Classifier.predict) give the same P(mel)."""
    from webapp.scoring import WORKING_SIDE
    from model.classifier import Classifier
    from model.imageio import MAX_BYTES, load_image
    from train.data import load_image_dataset
    from train.evaluate import predict

    rgb = np.asarray(Image.open(ham_image_paths[0]).convert("RGB"))  # (H, W, 3)
    folder = tmp_path / "data" / "mel"
    folder.mkdir(parents=True)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, : rgb.shape[1] // 2, 3] = 0  # left half transparent, its colours still stored
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey.astype(np.uint16)).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode.startswith("I")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif.tobytes())
    files = {p.stem: p for p in folder.iterdir()}

    entry = Classifier(tiny_vit_dir, model_id="tiny")
    pred = predict(entry, load_image_dataset(str(tmp_path / "data")), 1, 8)
    mel = entry.label2id["mel"]
    p_eval = dict(zip(pred["image_ids"], tempered_probabilities(pred["logits"], entry.folded_temperature or 1.0)[:, mel]))

    p_app = {name: entry.predict([load_image(path, max_bytes=MAX_BYTES, max_side=WORKING_SIDE)])[0].probabilities["mel"]
             for name, path in files.items()}
    assert set(p_eval) == set(p_app) == {"rgba", "grey16", "rotated"}
    for name in files:
        assert abs(p_eval[name] - p_app[name]) <= 1e-6, name
    assert len({round(p, 6) for p in p_app.values()}) == 3  # three different images, not one path


def test_evaluate_isic2017_with_validation_and_write_config(tiny_vit_dir, ham_dir, isic2017_dir, tmp_path):
    import shutil

    from transformers import AutoConfig

    from train.evaluate import main

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_vit_dir, model_dir)
    out = tmp_path / "eval"
    metrics = main(["--model", str(model_dir), "--data", str(isic2017_dir), "--split", "test",
                    "--val-data", str(ham_dir), "--val-split", "all", "--output-dir", str(out),
                    "--bootstrap", "100", "--write-config"])
    assert metrics == json.loads((out / "metrics.json").read_text())
    _, preds = _assert_outputs(out, 4)
    # ISIC 2017 has 3 of the 7 classes: multiclass metrics over those only
    assert metrics["labels"] == ["bkl", "mel", "nv"] and set(metrics["per_class_recall"]) == {"bkl", "mel", "nv"}
    assert metrics["n_melanoma"] == 2 and metrics["rollout_mask_share"] is None  # no masks for ISIC 2017
    assert metrics["temperature_source"] == "validation" and metrics["temperature"] > 0
    assert "passed" in metrics["leakage_check"]

    # T is folded into the written head: a plain softmax of the saved model gives the evaluated P(mel)
    t = metrics["temperature"]
    assert abs(t - 1.0) > 0.01  # a real temperature, so folding it changes the head
    paths = [isic2017_dir / "test" / f"{i}.jpg" for i in preds["image_id"]]
    np.testing.assert_allclose(preds["p_mel"], _model_p_mel(model_dir, paths, 1.0), atol=1e-5)
    # the threshold catches every validation melanoma (3 of 3 >= 95%) and is the lowest melanoma P(mel)
    meta = pd.read_csv(ham_dir / "HAM10000_metadata.csv")
    val_p = _model_p_mel(model_dir, [ham_dir / "images" / f"{i}.jpg" for i in meta["image_id"]], 1.0)
    assert metrics["threshold_val95"] == pytest.approx(val_p[(meta["dx"] == "mel").to_numpy()].min(), abs=1e-5)
    # recorded in the config: folded, nothing left to divide by
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    assert config.folded_temperature == pytest.approx(t) and unfolded_temperatures(config) == {}
    assert config.melanoma_threshold == pytest.approx(metrics["threshold_val95"])

    # evaluating the folded folder again without validation data: the same metrics (raw logits recovered)
    again = main(["--model", str(model_dir), "--data", str(isic2017_dir), "--split", "test",
                  "--output-dir", str(tmp_path / "again"), "--bootstrap", "50"])
    assert again["temperature_source"] == "model_config" and again["temperature"] == pytest.approx(t)
    assert again["threshold_val95_source"] == "model_config"
    for key in ("melanoma_auc", "ece", "ece_temperature_scaled", "sensitivity_val95"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
    np.testing.assert_allclose(pd.read_csv(tmp_path / "again" / "predictions.csv")["p_mel"], preds["p_mel"], atol=1e-6)

    # calibrating the folded folder again refits on raw logits and replaces the fold, never stacks it
    refit = main(["--model", str(model_dir), "--data", str(isic2017_dir), "--split", "test",
                  "--val-data", str(ham_dir), "--val-split", "all", "--output-dir", str(tmp_path / "refit"),
                  "--bootstrap", "20", "--write-config"])
    assert refit["temperature"] == pytest.approx(t, rel=1e-4)
    assert AutoConfig.from_pretrained(model_dir, trust_remote_code=True).folded_temperature == pytest.approx(t, rel=1e-4)
    np.testing.assert_allclose(_model_p_mel(model_dir, paths, 1.0), preds["p_mel"], atol=1e-5)


def test_evaluate_with_manifest_uses_its_test_split_and_refuses_leaks(tiny_vit_dir, ham_dir, tmp_path):
    from train.evaluate import main

    meta = pd.read_csv(ham_dir / "HAM10000_metadata.csv")
    ids = list(meta["image_id"])
    manifest = {"splits": ["train", "validation", "test"], "train": ids[5:], "validation": ids[2:5], "test": ids[:2]}
    path = tmp_path / "split_manifest.json"
    path.write_text(json.dumps(manifest))
    metrics = main(["--model", str(tiny_vit_dir), "--data", str(ham_dir), "--manifest", str(path),
                    "--output-dir", str(tmp_path / "eval"), "--bootstrap", "20"])
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert metrics["split"] == "test" and list(preds["image_id"]) == ids[:2]
    assert metrics["n_validation"] == 3 and metrics["temperature_source"] == "validation"
    # ids[0] and ids[1] are two images of one lesion: putting one into training is a leak
    manifest.update(train=ids[1:2] + ids[5:], test=ids[:1])
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="leakage"):
        main(["--model", str(tiny_vit_dir), "--data", str(ham_dir), "--manifest", str(path),
              "--output-dir", str(tmp_path / "leak")])


def test_label_groups_and_bad_arguments(tmp_path):
    from model.labels import BINARY_LABELS, DX_CODES
    from train.evaluate import label_groups, main

    np.testing.assert_array_equal(label_groups(list(DX_CODES), list(DX_CODES)), np.eye(7))
    groups = label_groups(list(DX_CODES), list(BINARY_LABELS))  # 7-class model on melanoma-vs-rest data
    np.testing.assert_array_equal(groups[1], np.eye(7)[DX_CODES.index("mel")])
    np.testing.assert_array_equal(groups[0], 1 - groups[1])
    with pytest.raises(ValueError, match="--label-scheme binary"):
        label_groups(["other", "mel", "unknown"], list(DX_CODES))
    with pytest.raises(ValueError, match="--tta"):
        main(["--model", "x", "--data", "y", "--output-dir", str(tmp_path), "--tta", "9"])
    with pytest.raises(ValueError, match="--write-config needs validation"):
        main(["--model", "x", "--data", "y", "--output-dir", str(tmp_path), "--write-config"])


@pytest.mark.parametrize("flag", ["--output-dir", "--output_dir"])
def test_output_dir_flag_in_both_spellings(flag):
    from train.evaluate import build_parser

    parser = build_parser()
    assert parser.parse_args(["--model", "m", "--data", "d", flag, "out"]).output_dir == "out"
    assert "--output-dir OUTPUT_DIR" in parser.format_usage()  # usage shows the documented spelling


def test_write_calibration_folds_into_a_timm_wrapper_head(tmp_path):
    from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

    from model.calibration import folded_temperature
    from train.evaluate import write_calibration

    torch.manual_seed(0)
    net = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_resnet", num_labels=7)).eval()
    net.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw = net(pixel_values=x).logits
    write_calibration(tmp_path, net, temperature=1.7, threshold=0.12)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert unfolded_temperatures(loaded.config) == {} and folded_temperature(loaded.config) == pytest.approx(1.7)
    assert loaded.config.melanoma_threshold == pytest.approx(0.12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, raw / 1.7)


def test_older_temperatures_to_apply_are_found_under_every_key():
    """What `migrate` folds and the card renderer refuses: MelanomaViT's `temperature` / `head_temperatures`,
    the baselines' `calibration_temperature` (transformers drops an undeclared `temperature`)."""
    from transformers import TimmWrapperConfig

    from model.configuration_melanoma_vit import MelanomaViTConfig

    assert unfolded_temperatures(MelanomaViTConfig()) == {}
    assert unfolded_temperatures(MelanomaViTConfig(temperature=1.7)) == {"temperature": 1.7}
    timm_cfg = TimmWrapperConfig(architecture="resnet18", calibration_temperature=2.5)
    assert unfolded_temperatures(TimmWrapperConfig.from_dict(timm_cfg.to_dict())) == {"calibration_temperature": 2.5}
    assert unfolded_temperatures({"calibration_temperature": 1.3}) == {"calibration_temperature": 1.3}
    assert unfolded_temperatures({"temperature": 1.0, "head_temperatures": None, "folded_temperature": 0.8}) == {}
    assert unfolded_temperatures({"head_temperatures": {"streaks": 2.0}}) == {"head_temperatures": {"streaks": 2.0}}


def test_rollout_mask_share_equal_for_distilled_model_and_its_stock_deit_export(ham_dir, tmp_path):
    """Stock exports carry no num_prefix_tokens: DeiT's CLS + DIST tokens come from model.loading's rule."""
    from transformers import ViTImageProcessor

    from model import MelanomaViTConfig, MelanomaViTForImageClassification
    from model.convert import save_vit_export
    from model.labels import dx_id2label
    from train.data import load_image_dataset
    from model.classifier import Classifier
    from train.evaluate import predict

    torch.manual_seed(0)
    config = MelanomaViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=37, id2label=dx_id2label(),
                               use_distillation_token=True)
    ours = MelanomaViTForImageClassification(config).eval()
    save_vit_export(ours, tmp_path / "export")
    ours.save_pretrained(tmp_path / "ours")
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    for name in ("export", "ours"):
        processor.save_pretrained(tmp_path / name)  # the same pixels for both
    export = Classifier(tmp_path / "export")
    assert export.config.model_type == "deit"

    ds = load_image_dataset(str(ham_dir))
    a = predict(Classifier(tmp_path / "ours"), ds, 1, 8, ham_dir / "masks")
    b = predict(export, ds, 1, 8, ham_dir / "masks")
    assert len(a["mask_shares"]) == 4
    np.testing.assert_allclose(a["mask_shares"], b["mask_shares"], atol=1e-5)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------- any data, manifests, --limit


def _fixture_csv(ham_dir: Path, isic2017_dir: Path, path: Path) -> Path:
    """A plain `path,dx` CSV of the 16 fixture images (12 HAM10000, 4 ISIC 2017)."""
    ham = pd.read_csv(ham_dir / "HAM10000_metadata.csv")
    isic = pd.read_csv(isic2017_dir / "labels.csv")
    rows = [(ham_dir / "images" / f"{i}.jpg", dx) for i, dx in zip(ham["image_id"], ham["dx"])]
    rows += [(isic2017_dir / p, {"melanoma": "mel", "nevus": "nv", "seborrheic_keratosis": "bkl"}[label])
             for p, label in zip(isic["path"], isic["label"])]
    pd.DataFrame(rows, columns=["path", "dx"]).to_csv(path, index=False)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "efficientnet-lite2", "melanoma-vit"])
def test_a_path_dx_csv_evaluates_with_any_model(name, tiny_vit_dir, ham_dir, isic2017_dir, tmp_path):
    """No Derm7pt labels.csv beside the CSV, no criteria columns: the criteria are skipped, not looked up.
    A shipped model's own split_manifest.json did not split this CSV: the evaluated images are checked
    against its train and validation splits (all 12 HAM10000 fixtures are training images of the
    shipped models, the 4 ISIC 2017 ones test images)."""
    from train.evaluate import main

    model_dir = tiny_vit_dir if name == "tiny" else ROOT / "models" / name
    csv = _fixture_csv(ham_dir, isic2017_dir, tmp_path / "my.csv")
    out = tmp_path / "eval"
    metrics = main(["--model", str(model_dir), "--data", str(csv), "--output-dir", str(out), "--bootstrap", "20",
                    "--device", "cpu"])
    _assert_outputs(out, 16)
    assert metrics["split"] is None and "seven_point" not in metrics
    if name == "tiny":
        assert metrics["leakage_check"].startswith("not checked: no split manifest")
    else:
        assert metrics["manifest"] == str(model_dir / "split_manifest.json") and "manifest_source" not in metrics
        assert metrics["leakage_overlap"] == {"train": 12, "validation": 0}
        assert metrics["leakage_check"].startswith("FAILED: of the 16 evaluated images, 12 in its train split")


def _multisource_manifest(ham_dir: Path, model_dir: Path, **splits: list[str]) -> None:
    """The model folder's split_manifest.json as train/sources.py writes it: ids prefixed by source."""
    manifest = {"method": "multi_source", "splits": list(splits),
                "sources": [{"name": "ham10000", "kind": "ham10000", "data": str(ham_dir)},
                            {"name": "isic2017", "kind": "isic2017", "data": "elsewhere/isic2017"}]}
    manifest.update({k: [f"ham10000/{i}" for i in ids] + ["isic2017/ISIC_0000000"] for k, ids in splits.items()})
    (model_dir / "split_manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_the_model_folders_manifest_picks_the_test_images_and_a_missing_id_is_an_error(tiny_vit_dir, ham_dir, tmp_path):
    import shutil

    from train.evaluate import main

    model_dir = Path(shutil.copytree(tiny_vit_dir, tmp_path / "model"))
    ids = list(pd.read_csv(ham_dir / "HAM10000_metadata.csv")["image_id"])
    # ids[0] and ids[1] are one lesion, as are ids[3] and ids[4]: kept within a split
    _multisource_manifest(ham_dir, model_dir, train=ids[5:], validation=ids[2:5], test=ids[:2])
    metrics = main(["--model", str(model_dir), "--data", str(ham_dir), "--output-dir", str(tmp_path / "eval"),
                    "--bootstrap", "20"])
    assert list(pd.read_csv(tmp_path / "eval" / "predictions.csv")["image_id"]) == ids[:2]
    assert metrics["split"] == "test" and metrics["manifest_source"] == "ham10000"
    assert metrics["manifest_sizes"] == {"train": 7, "validation": 3, "test": 2}
    assert metrics["leakage_check"].startswith("passed: no image_id or lesion_id shared by the splits of source 'ham10000'")
    # the default manifest gives no validation split: the model's own calibration is evaluated
    assert metrics["n_validation"] is None
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["leakage_check"] == metrics["leakage_check"]

    _multisource_manifest(ham_dir, model_dir, train=ids[5:], validation=ids[2:5], test=ids[:2] + ["ISIC_9999999"])
    with pytest.raises(ValueError, match=r"split 'test': 1 of its 3 image_ids are not in the data, e\.g\. \['ISIC_9999999'\]"):
        main(["--model", str(model_dir), "--data", str(ham_dir), "--output-dir", str(tmp_path / "missing")])
    # --manifest none: every row, nothing checked
    metrics = main(["--model", str(model_dir), "--data", str(ham_dir), "--manifest", "none",
                    "--output-dir", str(tmp_path / "none"), "--bootstrap", "20"])
    assert metrics["n"] == 12 and metrics["leakage_check"].startswith("not checked")


def test_unlabelled_rows_of_the_data_are_not_missing_ids(tmp_path, ham_image_paths):
    """Derm7pt lists cases without a dx code; load_image_dataset skips them, the manifest still names them."""
    from train.data import load_image_dataset, unlabelled_image_ids
    from train.splits import apply_manifest

    table = pd.DataFrame({"case_id": ["a", "b", "c"], "path": [str(p) for p in ham_image_paths[:3]],
                          "dx": ["mel", "", "nv"]})
    table.to_csv(tmp_path / "labels.csv", index=False)
    assert unlabelled_image_ids(tmp_path) == unlabelled_image_ids(tmp_path / "labels.csv") == {"b"}
    ds = load_image_dataset(tmp_path)
    dd = apply_manifest(ds, {"splits": ["test"], "test": ["a", "b", "c"]}, unlabelled={"b"})
    assert list(dd["test"]["image_id"]) == ["a", "c"]
    with pytest.raises(ValueError, match="not in the data"):
        apply_manifest(ds, {"splits": ["test"], "test": ["a", "b", "c"]})


def test_stratified_sample_keeps_each_class_share():
    import datasets

    from train.splits import stratified_sample

    dx = ["nv"] * 70 + ["mel"] * 20 + ["bcc"] * 10
    ds = datasets.Dataset.from_dict({"image_id": [f"i{k}" for k in range(100)], "dx": dx, "label": [0] * 100})
    sample = stratified_sample(ds, 10, seed=3)
    assert len(sample) == 10
    assert pd.Series(sample["dx"]).value_counts().to_dict() == {"nv": 7, "mel": 2, "bcc": 1}
    ids = [int(i[1:]) for i in sample["image_id"]]
    assert ids == sorted(ids)  # data order kept
    assert stratified_sample(ds, 10, seed=3)["image_id"] == sample["image_id"]
    assert stratified_sample(ds, 10, seed=4)["image_id"] != sample["image_id"]
    # shares 3.5 / 1 / 0.5: remainders go to the largest fractions, ties to the larger class
    assert pd.Series(stratified_sample(ds, 5, seed=0)["dx"]).value_counts().to_dict() == {"nv": 4, "mel": 1}
    assert stratified_sample(ds, 500) is ds
    with pytest.raises(ValueError, match="n >= 1"):
        stratified_sample(ds, 0)


@pytest.mark.slow
def test_limit_evaluates_a_stratified_sample_of_the_asked_size(tiny_vit_dir, ham_dir, tmp_path):
    from train.evaluate import main

    metrics = main(["--model", str(tiny_vit_dir), "--data", str(ham_dir), "--limit", "6", "--seed", "1",
                    "--output-dir", str(tmp_path / "eval"), "--bootstrap", "20"])
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert metrics["n"] == len(preds) == 6
    assert metrics["sample"] == {"n": 6, "of": 12, "seed": 1, "stratified_by": "dx"}
    # 12 images: nv 4, mel 3, five classes of 1 -> shares nv 2, mel 1.5, 0.5 each: nv 2, mel 2, two singles
    counts = preds["label"].value_counts()
    assert counts["nv"] == 2 and counts["mel"] == 2 and len(counts) == 4


def test_help_answers_without_the_heavy_imports(script_env):
    import time

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train/evaluate.py", "--help"], cwd=ROOT, env=script_env,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and "--limit" in proc.stdout
    # 0.07 s measured (python startup + argparse); the torch/transformers imports took ~9 s
    assert elapsed < 3.0, f"--help took {elapsed:.2f} s"
