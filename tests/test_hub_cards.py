"""Model, dataset and Space cards (hub_cards/): metadata, tables from metrics.json, runnable snippets.

The metrics.json files written here are SYNTHETIC TEST INPUT (hand-made values with the schema
of train/evaluate.py), used only to check that the card reports exactly what the file says.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard, SpaceCard
from PIL import Image

from hub_cards import dataset_card, render, space_card
from hub_cards.render import MODEL_CARD_TEMPLATE, render_model_card
from model.labels import DX_CODES, dx_id2label, dx_label2id

from conftest import TINY_VIT as TINY, edit_config_json  # noqa: E402

# SYNTHETIC TEST INPUT: not a measurement of any model.
SYNTHETIC_METRICS = {
    "model": "models/tiny", "data": "tests/fixtures/ham10000", "split": "test", "n": 12, "tta": 1,
    "labels": list(DX_CODES),
    "melanoma_auc": 0.8123, "melanoma_auc_ci95": [0.6512, 0.9377],
    "threshold_default": 0.5, "sensitivity_default": 0.6667, "specificity_default": 0.8889,
    "threshold_val95": 0.2134, "sensitivity_val95": 0.9412, "specificity_val95": 0.5278,
    "balanced_accuracy": 0.6142, "accuracy": 0.7083, "macro_f1": 0.5021,
    "per_class_recall": {"akiec": 0.25, "bcc": 0.5, "bkl": 0.4286, "df": 0.0, "mel": 0.6667, "nv": 0.9123,
                         "vasc": 1.0},
    "ece": 0.1134, "ece_temperature_scaled": 0.0421, "temperature": 1.7312, "rollout_mask_share": 0.5813,
    "command": "python train/evaluate.py --model models/tiny --data tests/fixtures/ham10000 --split test "
               "--output-dir models/tiny/eval/ham10000_test",
}


def _save_tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(**TINY, id2label=dx_id2label(), label2id=dx_label2id())
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _save_tiny_melanoma_vit(folder: Path) -> Path:
    import model
    from transformers import ViTImageProcessor

    from model.calibration import fold_temperature

    config = model.MelanomaViTConfig(**TINY, id2label=dx_id2label(), label2id=dx_label2id(), melanoma_threshold=0.3)
    fold_temperature(model.MelanomaViTForImageClassification(config), 1.5).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A stock transformers ViT folder (7 dx labels, 32x32), built once."""
    return _save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


@pytest.fixture(scope="session")
def tiny_melanoma_vit_dir(tmp_path_factory) -> Path:
    """A MelanomaViT folder (remote-code files + auto_map), built once."""
    return _save_tiny_melanoma_vit(tmp_path_factory.mktemp("tiny_melanoma_vit"))


def _add_eval(model_dir: Path, key: str = "ham10000_test", metrics: dict | None = None) -> Path:
    folder = model_dir / "eval" / key
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics or SYNTHETIC_METRICS))
    for name in ("roc.png", "reliability.png"):
        Image.new("RGB", (4, 4)).save(folder / name)
    return folder


@pytest.fixture
def evaluated_dir(tiny_vit_dir, tmp_path) -> Path:
    """Tiny ViT + synthetic eval + training files, as train/ and evaluate.py lay them out."""
    d = shutil.copytree(tiny_vit_dir, tmp_path / "tiny")
    _add_eval(d)
    (d / "train_config.yaml").write_text("learning_rate: 0.0003\nnum_epochs: 3\naugment:\n  hflip: true\n")
    (d / "command.txt").write_text("accelerate launch train/train.py --config train/configs/vit.yaml\n")
    (d / "val_metrics.json").write_text(json.dumps({"melanoma_auc": 0.7777, "loss": 1.2345}))
    (d / "split_manifest.json").write_text(json.dumps(
        {"seed": 42, "splits": ["train", "validation", "test"], "sizes": {"train": 99},
         "train": ["a", "b", "c"], "validation": ["d"], "test": ["e", "f"]}))
    return d


def _metric_map(card: ModelCard) -> dict[str, float]:
    return {r.metric_type: r.metric_value for r in card.data.eval_results}


def test_model_index_holds_exactly_the_metrics_of_metrics_json(evaluated_dir):
    card = render_model_card(evaluated_dir, model_name="tiny")
    reloaded = ModelCard(str(card))  # what the Hub parses
    assert reloaded.data.license == "cc-by-nc-sa-4.0"
    assert reloaded.data.pipeline_tag == "image-classification"
    assert reloaded.data.model_name == "tiny"
    m = SYNTHETIC_METRICS
    assert _metric_map(reloaded) == {
        "roc_auc": m["melanoma_auc"], "balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"],
        "f1": m["macro_f1"], "recall": m["sensitivity_val95"], "specificity": m["specificity_val95"], "ece": m["ece"],
    }
    for r in reloaded.data.eval_results:
        assert (r.task_type, r.dataset_name, r.dataset_type, r.dataset_split) == (
            "image-classification", "HAM10000", "ham10000", "test")
    recall = next(r for r in reloaded.data.eval_results if r.metric_type == "recall")
    assert recall.metric_args == {"threshold": m["threshold_val95"]}


def test_card_tables_report_metrics_json_values_and_link_existing_plots(evaluated_dir):
    text = render_model_card(evaluated_dir, model_name="tiny").text
    m = SYNTHETIC_METRICS
    assert "| Melanoma ROC AUC (mel vs rest) | 0.812 (95% CI 0.651 to 0.938) |" in text
    assert "| Balanced accuracy | 0.614 |" in text
    assert "| Melanoma sensitivity at P(mel) >= 0.213 | 0.941 |" in text
    assert "| Melanoma threshold (chosen on validation data for 95% melanoma sensitivity) | 0.213 |" in text
    assert "| Melanoma specificity at P(mel) >= 0.500 | 0.889 |" in text
    assert "| Expected calibration error (ECE) | 0.113 |" in text
    assert "| ECE after temperature scaling (T = 1.731) | 0.042 |" in text
    assert "| Attention-rollout mass inside the lesion mask | 0.581 |" in text
    assert "| Images (n) | 12 |" in text
    for code, r in m["per_class_recall"].items():
        assert re.search(rf"\| `{code}` \| [^|]+ \| {r:.3f} \|", text), code
    assert f"```bash\n{m['command']}\n```" in text
    assert "ECE 0.113 before and 0.042 after temperature scaling (T = 1.731)" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["eval/ham10000_test/roc.png", "eval/ham10000_test/reliability.png"]
    assert all((evaluated_dir / link).is_file() for link in links)
    # training files
    assert "| learning_rate | 0.000300 |" in text and "| augment.hflip | True |" in text
    assert "accelerate launch train/train.py --config train/configs/vit.yaml" in text
    assert "| melanoma_auc | 0.778 |" in text
    # split sizes are counted from the id lists, not copied from a "sizes" key
    assert "| train | 3 |" in text and "| test | 2 |" in text and "| train | 99 |" not in text


def test_card_has_every_section_and_the_required_statements(evaluated_dir):
    text = render_model_card(evaluated_dir, model_name="tiny").text
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == ["Model description", "Intended use", "Out-of-scope use", "Training data",
                        "Training procedure", "Evaluation", "Calibration", "Limitations and bias", "How to use",
                        "About this card", "Citation"]
    for phrase in ("NOT a medical device", "Clinical or smartphone photographs",
                   "CC BY-NC-SA 4.0", "non-commercial use only", "Fitzpatrick", "Vienna", "Queensland",
                   "ISIC 2017 has a different label space", "tschandl2018ham10000", "codella2017isic",
                   "melanoma_vit", "HAM10000 (test split)"):
        assert phrase in text, phrase


def test_unevaluated_model_says_so_and_has_no_model_index(tiny_vit_dir):
    card = render_model_card(tiny_vit_dir, model_name="tiny")
    assert "**not evaluated yet**" in card.text
    assert card.data.eval_results is None
    assert "model-index" not in str(card) and "metrics:" not in str(card).split("---")[1]
    assert "Split sizes" not in card.text and "not listed" in card.text
    assert "no calibration" in card.text


def test_missing_metrics_are_left_out_not_invented(tiny_vit_dir, tmp_path):
    d = shutil.copytree(tiny_vit_dir, tmp_path / "partial")
    partial = {k: v for k, v in SYNTHETIC_METRICS.items() if k not in ("ece", "ece_temperature_scaled", "macro_f1")}
    partial.update(threshold_val95=None, sensitivity_val95=None, specificity_val95=None, rollout_mask_share=None,
                   split="test")
    _add_eval(d, "isic2017_test", partial)
    card = ModelCard(str(render_model_card(d, model_name="partial")))
    assert set(_metric_map(card)) == {"roc_auc", "balanced_accuracy", "accuracy"}
    assert card.data.eval_results[0].dataset_name == "ISIC 2017 Part 3"
    text = card.text
    assert "not available (no validation data" in text
    for absent in ("ECE", "Macro F1", "rollout", "Melanoma threshold"):
        assert absent not in text.split("## Evaluation")[1].split("## Limitations")[0], absent


def test_template_holds_no_hard_coded_numbers():
    template = MODEL_CARD_TEMPLATE.read_text()
    body = re.sub(r"\{% raw %\}.*?\{% endraw %\}", "", template, flags=re.S)  # citations
    body = re.sub(r"```python.*?```", "", body, flags=re.S)  # code (identity temperature 1.0)
    body = re.sub(r"CC BY-NC-(SA|ND) 4\.0|by-nc-(sa|nd)/4\.0", "", body)  # the licences' versions
    body = body.replace("CI includes 0.5", "")  # chance level: a definition, not a result
    assert re.findall(r"\d+\.\d+", body) == []
    assert re.findall(r"\d+\.\d+", template) != []  # the pattern does catch numbers


def _run_snippets(text: str, model_dir: Path, image: Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    outputs = []
    for code in blocks:
        code, n_id = re.subn(r'^model_id = ".*"$', f"model_id = {str(model_dir)!r}", code, flags=re.M)
        code, n_img = re.subn(r'^image_path = ".*?"', f"image_path = {str(image)!r}", code, flags=re.M)
        assert n_id == 1 and n_img == 1
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, "<model card snippet>", "exec"), {})
        outputs.append(buf.getvalue())
    return outputs


def _check_snippet_output(outputs: list[str]) -> None:
    probs = dict(re.findall(r"^(\w+): (\d\.\d{3})$", outputs[0], flags=re.M))
    assert set(probs) == set(DX_CODES)
    assert sum(float(p) for p in probs.values()) == pytest.approx(1.0, abs=0.01)
    assert re.search(r"P\(mel\) = \d\.\d{3}", outputs[0])
    predictions = eval(outputs[1])  # the pipeline's printed list of {"label", "score"}
    assert len(predictions) == 3 and {p["label"] for p in predictions} <= set(DX_CODES)


def test_card_code_snippets_run_offline_on_a_real_image(tiny_vit_dir, ham_image_paths):
    text = render_model_card(tiny_vit_dir, model_name="tiny", repo_id="someone/tiny").text
    assert 'model_id = "someone/tiny"' in text and "trust_remote_code" not in text
    _check_snippet_output(_run_snippets(text, tiny_vit_dir, ham_image_paths[0]))


def test_melanoma_vit_card_snippets_use_remote_code_and_run(tiny_melanoma_vit_dir, ham_image_paths):
    card = render_model_card(tiny_melanoma_vit_dir, model_name="melanoma-vit-tiny")
    text = card.text
    assert text.count("trust_remote_code=True") == 2
    assert "`folded_temperature` = 1.500" in text and "`melanoma_threshold` = 0.300" in text
    assert "| model_type | melanoma_vit |" in text
    assert "melanoma_vit" in card.data.tags
    outputs = _run_snippets(text, tiny_melanoma_vit_dir, ham_image_paths[3])
    _check_snippet_output(outputs)
    assert "decision threshold: 0.3" in outputs[0]


def test_card_describes_the_onnx_files_from_their_record_and_its_onnx_snippet_runs(evaluated_dir, ham_image_paths):
    """With model.onnx + onnx/export.json (train/export_onnx.py) the card says what the files are, the int8
    check per test split, and an ONNX Runtime snippet that gives the PyTorch probabilities."""
    import numpy as np
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from model.onnx_export import EXPORT_RECORD, export_fp32

    model = AutoModelForImageClassification.from_pretrained(evaluated_dir).eval()
    export_fp32(model, evaluated_dir, (32, 32))
    check = {"n": 10, "melanoma_auc_fp32": 0.8125, "melanoma_auc_int8": 0.6, "auc_difference": -0.2125,
             "top_class_agreement": 0.9, "max_p_mel_difference": 0.1, "passed": False}  # SYNTHETIC TEST INPUT
    (evaluated_dir / "onnx").mkdir()
    (evaluated_dir / EXPORT_RECORD).write_text(json.dumps({
        "command": "python train/export_onnx.py models --write", "default_backend": "onnx",
        "fp32": {"file": "model.onnx", "outputs": ["logits"], "opset": 17, "exporter": "torch.onnx.export",
                 "max_probability_difference_vs_torch": 3e-7},
        "int8": {"mode": "dynamic", "weights": "int8", "checks": {"ham10000": check}, "passed": False, "shipped": False,
                 "why": "missed the accuracy bar", "bar": "the bar"}}))
    text = render_model_card(evaluated_dir, model_name="tiny", repo_id="someone/tiny").text
    assert "### With ONNX Runtime (CPU)" in text and "There is no int8 graph: dynamic quantization missed the accuracy bar" in text
    assert "| ham10000 | 10 | 0.8125 | 0.6000 | 90.0% | no |" in text and "3.0e-07" in text
    assert "model_quantized.onnx" not in text
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[-1]
    code = code.replace('snapshot_download("someone/tiny")', repr(str(evaluated_dir)))
    code = code.replace('Image.open("lesion.jpg")', f"Image.open({str(ham_image_paths[0])!r})")
    scope: dict = {}
    exec(compile(code, "<onnx snippet>", "exec"), scope)
    processor = AutoImageProcessor.from_pretrained(evaluated_dir)
    with torch.no_grad():
        x = processor(images=Image.open(ham_image_paths[0]).convert("RGB"), return_tensors="pt")["pixel_values"]
        expected = model(pixel_values=x).logits.softmax(-1).numpy()
    np.testing.assert_allclose(scope["probs"], expected, atol=1e-5)


def test_timm_baseline_card_reads_label_names_and_its_snippets_run(tmp_path, ham_image_paths):
    """TimmWrapper folders (the CNN baselines) store labels as `label_names` and preprocessing in config.json."""
    import timm
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    pretrained_cfg = timm.get_pretrained_cfg("test_resnet").to_dict()
    pretrained_cfg.pop("num_classes", None)
    pretrained_cfg["input_size"] = (3, 64, 64)
    config = TimmWrapperConfig(architecture="test_resnet", id2label=dx_id2label(), label2id=dx_label2id(),
                               pretrained_cfg=pretrained_cfg)
    TimmWrapperForImageClassification(config).save_pretrained(tmp_path / "cnn")
    assert "id2label" not in json.loads((tmp_path / "cnn" / "config.json").read_text())
    text = render_model_card(tmp_path / "cnn", model_name="cnn").text
    assert "| 4 | `mel` | Melanoma |" in text and "| Input size | 64x64 |" in text
    assert "| timm architecture | test_resnet |" in text and "trust_remote_code" not in text
    _check_snippet_output(_run_snippets(text, tmp_path / "cnn", ham_image_paths[5]))


def test_render_cli_writes_a_loadable_readme(evaluated_dir):
    assert render.main([str(evaluated_dir), "--write", "--repo-id", "me/tiny"]) == 0
    card = ModelCard.load(evaluated_dir / "README.md")
    assert card.data.model_name == "tiny" and 'model_id = "me/tiny"' in card.text
    assert len(card.data.eval_results) == 7


def test_render_errors_clearly_without_config(tmp_path, capsys):
    with pytest.raises(ValueError, match="no config.json"):
        render_model_card(tmp_path, model_name="x")
    assert render.main([str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_eval_folder_without_metrics_is_an_error(tiny_vit_dir, tmp_path):
    (tmp_path / "empty_eval").mkdir()
    with pytest.raises(ValueError, match="has no metrics.json"):
        render_model_card(tiny_vit_dir, model_name="x", eval_dirs={"ham10000_test": tmp_path / "empty_eval"})


# --------------------------------------------------------------------------------------------
# Dataset card


def _fixture_manifest(ham_dir: Path, path: Path) -> dict:
    """A real manifest: the 12 fixture images split by lesion with train/splits.py."""
    from train import data, splits

    ds = data.load_image_dataset(str(ham_dir))
    dd = splits.split_by_lesion(ds, val_size=0.25, test_size=0.25, seed=0)
    return splits.write_manifest(dd, path)


def test_dataset_card_counts_splits_classes_and_lesions(ham_dir, tmp_path):
    manifest = _fixture_manifest(ham_dir, tmp_path / "split_manifest.json")
    card = dataset_card.render_dataset_card(tmp_path / "split_manifest.json",
                                            metadata_csv=ham_dir / "HAM10000_metadata.csv")
    reloaded = DatasetCard(str(card))
    assert reloaded.data.license == "cc-by-nc-sa-4.0"
    assert reloaded.data.task_categories == ["image-classification"]
    info = reloaded.data.dataset_info
    assert [f["name"] for f in info["features"]] == ["image", "label", "image_id", "lesion_id"]
    assert list(info["features"][1]["dtype"]["class_label"]["names"].values()) == list(DX_CODES)
    sizes = {s["name"]: s["num_examples"] for s in info["splits"]}
    assert sizes == {name: len(manifest[name]) for name in manifest["splits"]}
    assert sum(sizes.values()) == 12
    text = card.text
    for name, n in sizes.items():
        assert f"| {name} | {n} |" in text
    assert "Lesions that appear in more than one split: 0." in text
    # the class table's columns sum to the split sizes
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \|((?: \d+ \|)+)$", text, flags=re.M)
    assert [code for code, _ in rows] == list(DX_CODES)
    columns = list(zip(*[[int(c) for c in re.findall(r"\d+", cells)] for _, cells in rows]))
    assert [sum(col) for col in columns] == list(sizes.values())
    assert "tschandl2018ham10000" in text and "lesion_id" in text


def test_dataset_card_rejects_ids_missing_from_metadata(ham_dir, tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"train": ["ISIC_0025122", "ISIC_9999999"], "seed": 1}))
    with pytest.raises(ValueError, match="not in the metadata CSV"):
        dataset_card.render_dataset_card(tmp_path / "m.json", metadata_csv=ham_dir / "HAM10000_metadata.csv")


def test_dataset_card_cli_writes_readme(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"train": ["a", "b"], "test": ["c"], "seed": 7}))
    assert dataset_card.main(["--manifest", str(tmp_path / "m.json"), "--output-dir", str(tmp_path / "out")]) == 0
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert {s["name"]: s["num_examples"] for s in card.data.dataset_info["splits"]} == {"train": 2, "test": 1}
    assert "- `seed`: 7" in card.text
    assert "python -m hub_cards.dataset_card --manifest" in card.text


# --------------------------------------------------------------------------------------------
# Space card


def _space_models_dir(tmp_path: Path) -> Path:
    models_dir = tmp_path / "models"
    for name in ("vit-small", "resnet18"):
        (models_dir / name).mkdir(parents=True)
        (models_dir / name / "config.json").write_text(json.dumps({"architectures": ["ViTForImageClassification"]}))
    (models_dir / "ood-detector").mkdir()  # an artifact with a config but no classifier: not a Hub model
    (models_dir / "ood-detector" / "config.json").write_text("{}")
    (models_dir / "not-a-model").mkdir()
    return models_dir


def test_space_card_front_matter(tmp_path):
    models_dir = _space_models_dir(tmp_path)
    out = tmp_path / "space" / "README.md"
    assert space_card.main(["--output", str(out), "--models-dir", str(models_dir), "--owner", "me"]) == 0
    card = SpaceCard.load(out)
    data = card.data.to_dict()
    assert data["sdk"] == "gradio" and data["sdk_version"] == version("gradio")
    assert data["app_file"] == "app.py" and data["license"] == "cc-by-nc-sa-4.0"
    assert data["models"] == ["me/resnet18", "me/vit-small"]
    assert data["title"] and data["emoji"] and len(data["short_description"]) <= 60
    assert "NOT a medical device" in card.text and "`me/vit-small`" in card.text


def test_space_card_models_are_hub_ids(tmp_path):
    models_dir = _space_models_dir(tmp_path)
    out = tmp_path / "README.md"
    assert space_card.main(["--output", str(out), "--models-dir", str(models_dir)]) == 0
    owner = render.DEFAULT_OWNER
    assert SpaceCard.load(out).data.models == [f"{owner}/resnet18", f"{owner}/vit-small"]
    assert space_card.hub_model_ids(["resnet18", "someone/vit"], "me") == ["me/resnet18", "someone/vit"]
    with pytest.raises(ValueError, match="not a Hub model id"):
        space_card.hub_model_ids(["a/b/c"])
    with pytest.raises(ValueError, match="not a Hub model id"):
        space_card.render_space_card(["bad name"], sdk_version="5.0.0")


def test_space_card_front_matter_only_keeps_the_body(tmp_path):
    out = tmp_path / "README.md"
    out.write_text("---\ntitle: old\nmodels:\n- resnet18\n---\n\n# The project README\n\nBody text.\n")
    assert space_card.main(["--output", str(out), "--models", "resnet18", "--front-matter-only"]) == 0
    card = SpaceCard.load(out)
    assert card.data.models == [f"{render.DEFAULT_OWNER}/resnet18"] and card.data.sdk == "gradio"
    assert card.text == "\n# The project README\n\nBody text.\n"


def test_repository_readme_front_matter_lists_the_shipped_classifiers_as_hub_ids():
    """README.md is also the Space's README: its `models:` are the app's classifiers, as Hub ids."""
    root = Path(__file__).resolve().parents[1]
    models = SpaceCard.load(root / "README.md").data.models
    assert models == space_card.hub_model_ids(space_card.discover_models(root / "models")), (
        "re-render: python -m hub_cards.space_card --output README.md --front-matter-only"
    )
    assert all(m.count("/") == 1 for m in models)


# --------------------------------------------------------------------------------------------
# End to end: a real metrics.json from train/evaluate.py on the fixture images


@pytest.mark.slow
def test_card_from_a_real_evaluation_reports_its_metrics_json(tiny_melanoma_vit_dir, ham_dir, tmp_path):
    from train import evaluate

    d = Path(shutil.copytree(tiny_melanoma_vit_dir, tmp_path / "mvit"))
    _fixture_manifest(ham_dir, d / "split_manifest.json")
    out = d / "eval" / "ham10000_test"
    evaluate.main(["--model", str(d), "--data", str(ham_dir), "--manifest", str(d / "split_manifest.json"),
                   "--output-dir", str(out), "--bootstrap", "50", "--device", "cpu"])
    m = json.loads((out / "metrics.json").read_text())
    card = ModelCard(str(render_model_card(d, model_name="mvit")))
    expected = {"roc_auc": "melanoma_auc", "balanced_accuracy": "balanced_accuracy", "accuracy": "accuracy",
                "f1": "macro_f1", "recall": "sensitivity_val95", "specificity": "specificity_val95", "ece": "ece"}
    assert _metric_map(card) == {t: m[k] for t, k in expected.items() if m.get(k) is not None}
    text = card.text
    assert f"| Images (n) | {m['n']} |" in text
    assert f"| Balanced accuracy | {m['balanced_accuracy']:.3f} |" in text
    if m["melanoma_auc"] is not None:
        assert f"| Melanoma ROC AUC (mel vs rest) | {m['melanoma_auc']:.3f}" in text
    for code, r in m["per_class_recall"].items():
        assert re.search(rf"\| `{code}` \| [^|]+ \| {r:.3f} \|", text), code
    assert f"```bash\n{m['command']}\n```" in text
    assert m["notes"]["ece"] in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 4 and all((d / link).is_file() for link in links)


def _card_p_mel(model_dir: Path, image: Path, temperature: float) -> str:
    """P(mel) as the card snippet prints it, computed here: softmax(logits / temperature), 3 decimals."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
    inputs = AutoImageProcessor.from_pretrained(model_dir)(images=Image.open(image).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        probs = (model(**inputs).logits / temperature).softmax(-1)[0]
    return f"{probs[model.config.label2id['mel']].item():.3f}"


def test_folded_temperature_card_uses_plain_softmax_everywhere(tmp_path, ham_image_paths):
    """Stored calibrations are folded into the head: snippet and pipeline are calibrated without dividing."""
    from transformers import ViTImageProcessor

    from model import MelanomaViTConfig, MelanomaViTForImageClassification
    from model.calibration import fold_temperature

    torch.manual_seed(0)
    model = MelanomaViTForImageClassification(MelanomaViTConfig(**TINY, id2label=dx_id2label(), label2id=dx_label2id(),
                                                                melanoma_threshold=0.3))
    with torch.no_grad():
        model.head.weight.mul_(10)  # spread the probabilities so that T shows in 3 decimals
    raw_dir, folded_dir = tmp_path / "raw", tmp_path / "folded"
    model.save_pretrained(raw_dir)
    fold_temperature(model, 0.25).save_pretrained(folded_dir)
    for folder in (raw_dir, folded_dir):
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    image = ham_image_paths[2]
    calibrated = _card_p_mel(raw_dir, image, 0.25)
    assert calibrated != _card_p_mel(raw_dir, image, 1.0)

    text = render_model_card(folded_dir, model_name="folded").text
    assert "`folded_temperature` = 0.250" in text and "do not divide by it again" in text
    assert "probs = logits.softmax(dim=-1)[0]  # calibrated" in text and "logits / " not in text
    assert "With a pipeline (the same calibrated probabilities)" in text
    outputs = _run_snippets(text, folded_dir, image)
    _check_snippet_output(outputs)
    assert f"P(mel) = {calibrated};" in outputs[0]
    printed = dict(re.findall(r"^(\w+): (\d\.\d{3})$", outputs[0], flags=re.M))
    for prediction in eval(outputs[1]):  # the pipeline's top 3: the snippet's calibrated numbers
        assert f"{prediction['score']:.3f}" == printed[prediction["label"]]

    # an older, unfolded folder: loads migrated (the same calibrated P(mel)), but its card is refused with the
    # one-line command that stores the one form (the card's snippets say: a plain softmax)
    edit_config_json(raw_dir, temperature=0.25)
    assert _card_p_mel(raw_dir, image, 1.0) == calibrated
    with pytest.raises(ValueError, match=r"temperature still to apply \({'temperature': 0.25}\).*python -m model.calibration"):
        render_model_card(raw_dir, model_name="raw")


def test_unfolded_timm_card_is_refused_until_folded(tmp_path):
    """TimmWrapper configs kept an unfolded temperature as `calibration_temperature`: refused with the command
    that folds it, and fine once folded."""
    import timm
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    from model.calibration import main

    pretrained_cfg = timm.get_pretrained_cfg("test_resnet").to_dict()
    pretrained_cfg.pop("num_classes", None)
    pretrained_cfg["input_size"] = (3, 64, 64)
    config = TimmWrapperConfig(architecture="test_resnet", id2label=dx_id2label(), label2id=dx_label2id(),
                               pretrained_cfg=pretrained_cfg, calibration_temperature=0.05)
    net = TimmWrapperForImageClassification(config)
    net.save_pretrained(tmp_path / "cnn")
    with pytest.raises(ValueError, match=r"\{'calibration_temperature': 0.05\}"):
        render_model_card(tmp_path / "cnn", model_name="cnn")
    with pytest.raises(ValueError, match=f"python -m model.calibration {tmp_path / 'cnn'}"):
        render_model_card(tmp_path / "cnn", model_name="cnn")
    assert main([str(tmp_path / "cnn")]) == 0  # the command the error names
    text = render_model_card(tmp_path / "cnn", model_name="cnn").text
    assert "`folded_temperature` = 0.050" in text and "calibration_temperature" not in text


def test_multi_source_card_lists_sources_licences_criteria_subgroups_and_chance(tiny_vit_dir, tmp_path):
    d = shutil.copytree(tiny_vit_dir, tmp_path / "multi")
    # SYNTHETIC TEST INPUT: a multi-source manifest as train/sources.py writes it.
    sources = [
        {"name": "ham10000", "kind": "ham10000", "heads": ["dx"], "weight": 0.45, "split": "split_by_lesion",
         "sizes": {"train": 70, "validation": 15, "test": 15}},
        {"name": "derm7pt", "kind": "derm7pt", "heads": ["dx", "derm7pt", "streaks"], "weight": 0.2,
         "split": "official split column", "sizes": {"train": 6, "validation": 2, "test": 3}},
    ]
    (d / "split_manifest.json").write_text(json.dumps({"method": "multi_source", "splits": ["train"],
                                                       "sources": sources, "train": ["a", "b"]}))
    _add_eval(d, "ham10000_test", {**SYNTHETIC_METRICS, "n_melanoma": 3, "subgroups": {"sex": {
        "male": {"n": 9, "n_melanoma": 3, "melanoma_auc": 0.7321, "melanoma_auc_ci95": [0.4012, 0.9501],
                 "sensitivity_val95": 1.0, "specificity_val95": 0.5},
        "female": {"n": 3, "n_melanoma": 0, "melanoma_auc": None, "melanoma_auc_ci95": None,
                   "sensitivity_val95": None, "specificity_val95": 0.6667}},
        "age_band": {"unknown": {"n": 12, "n_melanoma": 3, "melanoma_auc": 0.8123, "melanoma_auc_ci95": None,
                                 "sensitivity_val95": None, "specificity_val95": None}}}})
    _add_eval(d, "derm7pt_test", {**SYNTHETIC_METRICS, "split": "test", "n_melanoma": 4,
                                  "melanoma_auc_ci95": [0.4711, 0.9377], "seven_point": {
        "criteria": {"streaks": {"label": "irregular", "points": 1, "n_positive": 5, "n": 12, "auc": 0.6543,
                                 "auc_ci95": [0.5512, 0.7834]}},
        "seven_point_score_melanoma_auc": 0.7777, "seven_point_score_melanoma_auc_ci95": [0.6001, 0.9002],
        "seven_point_score_threshold": 3.0, "seven_point_score_sensitivity": 0.75,
        "seven_point_score_specificity": 0.625},
                                  "heads": {"derm7pt": {"melanoma_auc": 0.8011, "melanoma_auc_ci95": [0.7012, 0.8893]}}})
    text = render_model_card(d, model_name="multi").text
    training = text.split("## Training data")[1].split("## Training procedure")[0]
    assert "| HAM10000 | 70 / 15 / 15 | split_by_lesion | 0.450 | `dx` | CC BY-NC-SA 4.0 |" in training
    assert "| Derm7pt | 6 / 2 / 3 | official split column | 0.200 | `dx`, `derm7pt`, `streaks` | CC BY-NC-ND 4.0 |" in training
    evaluation = text.split("## Evaluation")[1].split("## Calibration")[0]
    # overview: HAM first, the Derm7pt AUC's CI includes 0.5 -> at chance (once in the table, once as a note)
    assert evaluation.index("| HAM10000 test | 12 (3) | 0.812 (0.651 to 0.938) |") < evaluation.index("| Derm7pt test |")
    assert "| Derm7pt test | 12 (4) | 0.812 (0.471 to 0.938), at chance |" in evaluation
    assert evaluation.count("The melanoma AUC is at chance on this set") == 1
    assert "| `derm7pt` | 0.801 (0.701 to 0.889) |" in evaluation
    assert "| streaks | irregular | 1 | 5 / 12 | 0.654 (0.551 to 0.783) |" in evaluation
    assert "| Melanoma AUC of the expected checklist score (95% CI) | 0.778 (0.600 to 0.900) |" in evaluation
    assert "| Sensitivity of score >= 3.000 | 0.750 |" in evaluation
    assert "| male | 9 | 3 | 0.732 (0.401 to 0.950), at chance | 1.000 | 0.500 |" in evaluation
    assert "| female | 3 | 0 | undefined (one class only) | - | 0.667 |" in evaluation
    assert "Subgroup: Sex" in evaluation and "Age band" not in evaluation  # only "unknown": no table
    limits = text.split("## Limitations and bias")[1]
    assert "HAM10000, Derm7pt come from a" in limits.replace("\n  ", " ") and "Fitzpatrick" in limits


def test_export_folder_card_quotes_its_export_command(evaluated_dir, tmp_path):
    d = shutil.copytree(evaluated_dir, tmp_path / "export")
    assert "export_command.txt" not in render_model_card(d, model_name="tiny").text
    (d / "export_command.txt").write_text("python -c 'save_vit_export(...)'\n")
    text = render_model_card(d, model_name="tiny").text
    assert "from `export_command.txt`" in text and "python -c 'save_vit_export(...)'" in text
    assert text.index("from `command.txt`") < text.index("from `export_command.txt`")


def test_card_lists_a_recipes_sources_and_teachers_by_index(tiny_vit_dir, tmp_path):
    import yaml

    d = shutil.copytree(tiny_vit_dir, tmp_path / "distilled")
    recipe = {"sources": [{"name": "ham10000", "weight": 0.45}, {"name": "isic2017", "weight": 0.35}],
              "distillation": {"teachers": [{"model": "models/a", "cache": "runs/cache/a"}], "kind": "soft"}}
    (d / "train_config.yaml").write_text(yaml.safe_dump(recipe))
    text = render_model_card(d, model_name="tiny").text
    for row in ("| sources.1.name | isic2017 |", "| distillation.teachers.0.model | models/a |",
                "| distillation.teachers.0.cache | runs/cache/a |", "| distillation.kind | soft |"):
        assert row in text, row
