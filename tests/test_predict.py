"""train/predict.py (with train/stream.py, train/report.py, model/records.py): folder, CSV, save_to_disk
and load_dataset inputs, error rows, ranking, TTA, extra heads, resume, the HTML report and
2-process == 1-process, on the fixture images with the tiny real models of test_classifier.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from test_classifier import MULTISOURCE, bad_image_files, shared_tiny_models

from model.imageio import InvalidImageError, load_image
from model.records import csv_safe, result_columns
from model.classifier import Classifier
from model.tta import tta_views
from train.predict import PARTS, PATIENT_CONTEXT_COLUMNS, PREDICTIONS, main
from train.stream import RecordSource

ROOT = Path(__file__).resolve().parents[1]
PREDICT_PY = ROOT / "train" / "predict.py"
VIT = "melanoma-vit-tiny"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, fixtures_dir) -> Path:
    return shared_tiny_models(tmp_path_factory, fixtures_dir)


@pytest.fixture(scope="module")
def images(ham_image_paths, isic2017_dir) -> list[Path]:
    """The 16 fixture images: 12 HAM10000 + 4 ISIC 2017."""
    return ham_image_paths + sorted((isic2017_dir / "test").glob("*.jpg"))


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(model: Path, data: Path | str, out: Path, *extra: str) -> pd.DataFrame:
    """predict.py in-process (no OOD check, no workers unless asked); the written predictions.csv."""
    main(["--model", str(model), "--data", str(data), "--output_dir", str(out), "--num_workers", "0",
          "--ood", "none", "--batch_size", "5", *extra])
    return read(out)


def read(out: Path) -> pd.DataFrame:
    text = {"id": "", "path": "", "label": "", "error": ""}
    return pd.read_csv(out / PREDICTIONS, dtype=dict.fromkeys(text, str)).fillna(text)


def expected_probabilities(entry: Classifier, paths: list[Path]) -> dict[str, dict[str, float]]:
    """What the app's path gives: load_image(max_side=1024) -> Classifier.predict, by file stem."""
    predictions = entry.predict([load_image(p, max_side=1024) for p in paths])
    return {p.stem: prediction.probabilities for p, prediction in zip(paths, predictions)}


def assert_ranked(table: pd.DataFrame) -> None:
    scored = table[table["error"] == ""]
    assert list(scored["rank"]) == list(range(1, len(scored) + 1))
    assert np.all(np.diff(scored["melanoma_probability"].to_numpy(dtype=float)) <= 0)
    assert (table["error"] != "").to_numpy().tolist() == sorted((table["error"] != "").tolist())  # errors last


# ----------------------------------------------------------------------------------- CSV cells


def test_csv_safe_neutralises_formula_cells_only():
    for text in ("=HYPERLINK(\"http://x\")", "+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd"):
        assert csv_safe(text) == "'" + text
    for value in ("ISIC_0012258", "melanoma (in situ)", "", 0.5, -0.25, True, None, 3):
        assert csv_safe(value) == value


def test_images_that_are_clearly_not_dermoscopy_are_not_ranked():
    """Ranked: lesions by P(mel); then images clearly not dermoscopy (no rank, whatever their P(mel));
    then unreadable files. A possibly-not-dermoscopy image keeps its rank (its score stands)."""
    from train.predict import rank_predictions

    parts = pd.DataFrame({
        "index": ["0", "1", "2", "3", "4", "5"],
        "melanoma_probability": ["0.2", "0.99", "0.5", "", "0.7", "0.9"],
        "ood_level": ["dermoscopy", "not_dermoscopy", "possibly_not_dermoscopy", "", "dermoscopy", "not_dermoscopy"],
        "error": ["", "", "", "unreadable", "", ""],
    })
    ranked = rank_predictions(parts)
    assert list(ranked["index"]) == ["4", "2", "0", "1", "5", "3"]
    assert list(ranked["rank"]) == ["1", "2", "3", "", "", ""]


# --------------------------------------------------------------------------------- the command


def test_folder_with_bad_images_gives_ranked_rows_and_the_decoders_errors(models_dir, images, tmp_path, one_thread):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name)
    bad = bad_image_files(folder, images[0])
    formula = folder / "=cmd()+1.jpg"
    formula.write_bytes(b"")
    table = run(models_dir / VIT, folder, tmp_path / "out")

    bad_images = [p for p in [*bad.values(), formula] if p.suffix in (".jpg", ".png")]  # .txt/.svg are not listed
    assert len(table) == len(images) + len(bad_images)
    assert_ranked(table)
    errors = table[table["error"] != ""].set_index("path")["error"].to_dict()
    for path in bad_images:
        with pytest.raises(InvalidImageError) as raised:
            load_image(path, max_side=1024)
        assert errors[csv_safe(str(path))] == str(raised.value)  # the app's own message
    assert table.loc[table["path"] == csv_safe(str(formula)), "id"].item() == "'=cmd()+1"

    entry = Classifier(models_dir / VIT, model_id=VIT)
    expected = expected_probabilities(entry, images)
    scored = table[table["error"] == ""].set_index("id")
    for image_id, probabilities in expected.items():
        row = scored.loc[image_id]
        for code, p in probabilities.items():
            assert row[f"p_{code}"] == pytest.approx(p, abs=1e-6)
        assert row["melanoma_probability"] == pytest.approx(probabilities["mel"], abs=1e-6)
        assert row["above_threshold"] == (probabilities["mel"] >= entry.melanoma_threshold)
        assert row["top_class"] == max(probabilities, key=probabilities.get)
    assert np.allclose(scored[[f"p_{c}" for c in entry.id2label.values()]].sum(axis=1), 1.0, atol=1e-5)
    assert set(scored["label"]) == {""}  # a plain folder has no labels


def test_csv_saved_dataset_and_load_dataset_inputs_agree(models_dir, images, tmp_path, one_thread):
    csv_path = tmp_path / "list.csv"
    rel = [os.path.relpath(p, tmp_path) for p in images]  # paths relative to the CSV
    pd.DataFrame({"path": rel, "dx": ["mel"] * 2 + ["nv"] * (len(images) - 2)}).to_csv(csv_path, index=False)
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in images], "image_id": [p.stem for p in images]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(tmp_path / "saved")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")  # image bytes embedded

    tables = {}
    for name, data in {"csv": csv_path, "saved": tmp_path / "saved", "hub": tmp_path / "hub"}.items():
        assert RecordSource(data).kind == {"csv": "csv", "saved": "saved", "hub": "dataset"}[name]
        tables[name] = run(models_dir / VIT, data, tmp_path / name).set_index("id")
    csv_table = tables["csv"]
    assert len(csv_table) == len(images) and (csv_table["error"] == "").all()
    assert csv_table.loc[images[0].stem, "label"] == "mel" and csv_table.loc[images[-1].stem, "label"] == "nv"
    probs = [f"p_{c}" for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")]
    for name in ("saved", "hub"):
        other = tables[name].loc[csv_table.index]
        np.testing.assert_allclose(other[probs].to_numpy(float), csv_table[probs].to_numpy(float), atol=1e-6)
    # save_to_disk embedded the bytes and kept only file names: the images were decoded from the Arrow data.
    assert set(tables["saved"]["path"]) == {p.name for p in images}


def test_layouts_labels_split_limit_and_tta(models_dir, isic2017_dir, tmp_path, one_thread):
    table = run(models_dir / VIT, isic2017_dir, tmp_path / "isic", "--split", "test", "--tta", "2")
    labels = pd.read_csv(isic2017_dir / "labels.csv").set_index("image_id")["label"]
    assert set(table["id"]) == set(labels.index)
    assert {i: table.set_index("id").loc[i, "label"] for i in labels.index} == {
        i: {"melanoma": "mel", "nevus": "nv", "seborrheic_keratosis": "bkl"}[name] for i, name in labels.items()
    }
    # TTA: the mean of the calibrated probabilities of the identity and horizontal-flip views.
    entry = Classifier(models_dir / VIT, model_id=VIT)
    path = isic2017_dir / "test" / "ISIC_0012086.jpg"
    pixel_values = entry.processor(images=[load_image(path, max_side=1024)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        views = [torch.softmax(entry.model(pixel_values=view).logits, -1)
                 for view in tta_views(pixel_values, 2)]
    mean = torch.stack(views).mean(0)[0]
    row = table.set_index("id").loc["ISIC_0012086"]
    assert row["p_mel"] == pytest.approx(float(mean[entry.config.label2id["mel"]]), abs=1e-6)
    assert not torch.allclose(views[0], views[1])  # the views differ, so the check has teeth

    limited = run(models_dir / VIT, isic2017_dir / "labels.csv", tmp_path / "limit", "--limit", "3", "--split", "test")
    assert sorted(limited["index"]) == [0, 1, 2]
    assert len(RecordSource(isic2017_dir / "labels.csv", "test")) == 4
    assert list(RecordSource(isic2017_dir / "labels.csv", "val")) == []  # the fixture CSV has test rows only


def test_extra_heads_become_columns(models_dir, ham_image_paths, tmp_path, one_thread):
    table = run(models_dir / MULTISOURCE, ham_image_paths[0].parent, tmp_path / "ms", "--limit", "4")
    entry = Classifier(models_dir / MULTISOURCE, model_id=MULTISOURCE)
    assert list(table.columns)[6:-1] == result_columns(entry)
    assert {"p_isic2017_melanoma", "p_pigment_network_atypical", "seven_point_score"} <= set(table.columns)
    (expected,) = entry.predict([load_image(ham_image_paths[0], max_side=1024)])
    row = table.set_index("id").loc[ham_image_paths[0].stem]
    assert row["seven_point_score"] == pytest.approx(expected.heads.seven_point.score, abs=1e-5)
    for label, p in expected.heads.probabilities["isic2017"].items():
        assert row[f"p_isic2017_{label}"] == pytest.approx(p, abs=1e-6)


def test_resume_scores_only_missing_rows(models_dir, ham_dir, tmp_path, one_thread):
    fresh = run(models_dir / VIT, ham_dir, tmp_path / "fresh")
    out = tmp_path / "resumed"
    run(models_dir / VIT, ham_dir, out, "--limit", "5")
    with pytest.raises(FileExistsError, match="--resume"):
        run(models_dir / VIT, ham_dir, out)
    part = out / PARTS / "rank-0.csv"
    with part.open("a") as f:
        f.write("7,ISIC_half_writ")  # a row a killed run left half-written
    run(models_dir / VIT, ham_dir, out, "--resume")
    lines = part.read_text().splitlines()
    assert len(lines) == 1 + len(fresh) and len({line.split(",")[1] for line in lines[1:]}) == len(fresh)
    resumed = read(out)
    assert list(resumed["id"]) == list(fresh["id"])
    np.testing.assert_allclose(resumed["p_mel"], fresh["p_mel"], atol=1e-6)
    with pytest.raises(ValueError, match="other columns"):
        run(models_dir / MULTISOURCE, ham_dir, out, "--resume")


def test_bad_specs_fail_clearly(tmp_path, models_dir):
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("file,dx\na.jpg,mel\n")
    with pytest.raises(ValueError, match="'path' column"):
        RecordSource(no_path)
    with pytest.raises(ValueError, match="could not read"):
        list(RecordSource(tmp_path / "missing-folder"))
    plain_csv = tmp_path / "plain.csv"
    plain_csv.write_text("path\na.jpg\n")
    with pytest.raises(ValueError, match="no 'split' column"):
        RecordSource(plain_csv, "test")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no splits"):
        RecordSource(folder, "test")
    with pytest.raises(SystemExit):
        main(["--model", str(models_dir / VIT), "--data", ".", "--output_dir", str(tmp_path), "--tta", "9"])


def test_csv_source_streams_in_flat_memory(tmp_path):
    csv_path = tmp_path / "big.csv"
    n = 100_000
    pd.DataFrame({"path": [f"images/img_{i:06d}.jpg" for i in range(n)], "dx": "nv"}).to_csv(csv_path, index=False)
    source = RecordSource(csv_path)
    tracemalloc.start()
    count = sum(1 for _ in source)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == n == len(source)
    assert peak < 5e6, peak  # read whole, the table alone takes ~20 MB; chunked, ~1 MB whatever the length


def test_report_is_self_contained_with_overlays_and_roc(models_dir, ham_dir, tmp_path, one_thread):
    out = tmp_path / "report"
    table = run(models_dir / VIT, ham_dir, out, "--report", "--top_k", "6", "--explain", "2")
    html = (out / "report.html").read_text()
    assert "<script" not in html and not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)
    assert html.count('class="thumb"') == 6 and html.count('class="overlay"') == 2
    assert html.count("data:image/") == 6 + 2 + 1  # thumbnails, overlays, ROC
    assert len(list((out / "explanations").glob("rank0000[12]_*.png"))) == 2
    auc = roc_auc_score(table["label"] == "mel", table["melanoma_probability"])
    assert f"ROC AUC <b>{auc:.3f}</b>" in html
    top = table.iloc[0]
    assert html.index(str(top["id"])) < html.index(str(table.iloc[1]["id"]))  # ranked order


def test_ood_columns_are_the_detectors_verdicts(models_dir, isic2017_dir, tmp_path, one_thread):
    from model.ood import load_ood_detector

    out = tmp_path / "ood"
    main(["--model", str(models_dir / VIT), "--data", str(isic2017_dir / "labels.csv"), "--output_dir", str(out),
          "--num_workers", "0"])
    table = read(out).set_index("id")
    detector = load_ood_detector()
    for image_id in table.index:
        (verdict,) = detector.score([load_image(isic2017_dir / "test" / f"{image_id}.jpg", max_side=1024)])
        assert table.loc[image_id, "ood_score"] == pytest.approx(verdict.score, rel=1e-4)
        assert table.loc[image_id, "ood"] == verdict.is_ood


# ------------------------------------------------------------------------------- distributed


def _predict_cmd(processes: int) -> list[str]:
    """1 process: plain python; 2: accelerate's torchrun launcher with CPU processes (gloo). accelerate
    launch --cpu alone starts one process unless MPI is configured."""
    if processes == 1:
        return [sys.executable, str(PREDICT_PY)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(PREDICT_PY)]


def _launch(processes: int, model: Path, data: Path, out: Path, script_env: dict[str, str]) -> None:
    cmd = [*_predict_cmd(processes), "--cpu", "--model", str(model), "--data", str(data), "--output_dir", str(out),
           "--ood", "none", "--batch_size", "3", "--num_workers", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**script_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"predict ({processes} process(es))" in proc.stderr


@pytest.mark.slow
def test_two_processes_write_the_same_csv_as_one(models_dir, ham_dir, tmp_path, script_env):
    _launch(1, models_dir / VIT, ham_dir, tmp_path / "one", script_env)
    _launch(2, models_dir / VIT, ham_dir, tmp_path / "two", script_env)
    one, two = read(tmp_path / "one"), read(tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two" / PARTS).iterdir()) == ["rank-0.csv", "rank-1.csv"]
    assert all(len(pd.read_csv(p)) == 6 for p in (tmp_path / "two" / PARTS).iterdir())  # 12 rows split 6 / 6
    assert list(one.columns) == list(two.columns) and len(one) == len(two) == 12
    assert list(one["id"]) == list(two["id"]) and list(one["rank"]) == list(two["rank"])
    numeric = [c for c in one.columns if c.startswith("p_") or c == "melanoma_probability"]
    np.testing.assert_allclose(one[numeric].to_numpy(float), two[numeric].to_numpy(float), atol=1e-5)
    text = [c for c in one.columns if c not in numeric]
    pd.testing.assert_frame_equal(one[text], two[text])


def test_patient_column_adds_each_lesions_place_among_its_patients_lesions(models_dir, ham_image_paths, tmp_path,
                                                                          one_thread):
    """A `patient_id` column: per ranked lesion, its patient's lesion count, its rank among them by
    P(mel) and its logit P(mel) minus the median logit of the patient's other lesions, by hand."""
    patients = ["p1", "p1", "p1", "p2", "p2", "p3"]
    csv_path = tmp_path / "visits.csv"
    pd.DataFrame({"path": [str(p) for p in ham_image_paths[:6]], "patient_id": patients}).to_csv(csv_path, index=False)
    table = run(models_dir / VIT, csv_path, tmp_path / "out")
    columns = list(table.columns)
    assert columns.index("patient_relative_logit") == len(columns) - 2  # the context sits before `error`
    table["stem"] = [Path(p).stem for p in table["path"]]
    for patient, rows in table.groupby("patient"):
        rows = rows.sort_values("melanoma_probability", ascending=False)
        assert list(rows["patient_lesions"]) == [len(rows)] * len(rows)
        assert list(rows["patient_rank"]) == list(range(1, len(rows) + 1))
        z = np.log(rows["melanoma_probability"] / (1 - rows["melanoma_probability"])).to_numpy()
        for i, got in enumerate(rows["patient_relative_logit"]):
            if len(rows) == 1:
                assert pd.isna(got)
            else:
                assert got == pytest.approx(z[i] - np.median(np.delete(z, i)), abs=2e-3)
    assert set(table["patient"]) == {"p1", "p2", "p3"}
    plain = run(models_dir / VIT, ham_image_paths[0].parent, tmp_path / "plain", "--limit", "3")
    assert not set(PATIENT_CONTEXT_COLUMNS) & set(plain.columns)  # no patients named: no context columns
