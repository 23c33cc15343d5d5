"""The Hub-ready folders under models/: what a user downloads must load, predict and match its card.

Each classifier folder is loaded in a fresh Python process that never imports this project
(cwd = a temp dir, no repo on sys.path), exactly as `from_pretrained` of a Hub id would, and must
give the app's calibrated probabilities through `pipeline` and the card's snippet.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from hub_cards.render import PLACEHOLDER_REPO_ID, render_model_card
from model.calibration import folded_temperature, unfolded_temperatures
from model.labels import DX_CODES
from model.classifier import Classifier

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CLASSIFIERS = sorted(
    p.parent for p in MODELS.glob("*/config.json") if "architectures" in json.loads(p.read_text())
)
IDS = [p.name for p in CLASSIFIERS]
MB = 1024 * 1024


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_models_dir_ships_classifiers_within_size_limits():
    assert CLASSIFIERS, "models/ has no classifier folder: the app would have nothing to serve"
    for folder in CLASSIFIERS:
        assert _folder_size(folder) <= 50 * MB, f"{folder.name} is over 50 MB"
        assert not [f for f in folder.rglob("*") if f.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}], (
            f"{folder.name}: weights must be safetensors only"
        )
    assert _folder_size(MODELS) <= 150 * MB, "models/ is over 150 MB"


def test_calibrated_folders_have_their_temperature_folded_into_the_head():
    """Plain softmax (pipeline, Hub widget, card snippet) is the calibrated path: nothing left to divide by."""
    for folder in CLASSIFIERS:
        config = json.loads((folder / "config.json").read_text())
        if config.get("melanoma_threshold") is not None:  # calibrated on validation data
            assert folded_temperature(config) is not None, f"{folder.name}: temperature not folded"
        assert unfolded_temperatures(config) == {}, f"{folder.name}: a temperature is still to apply"
        assert not {"temperature", "head_temperatures", "calibration_temperature"} & set(config), folder.name


# The card's first snippet as a user runs it, then `pipeline` with the default image processor and
# with the PIL-backend one the app uses (transformers defaults to torchvision, whose bicubic resize
# differs slightly from PIL's).
LOAD_AND_PREDICT = r"""
import contextlib, io, json, sys
from transformers import AutoImageProcessor, pipeline
folder, image, snippet = sys.argv[1:4]
namespace = {}
with contextlib.redirect_stdout(io.StringIO()):
    exec(snippet, namespace)
labels = [namespace["model"].config.id2label[i] for i in range(namespace["probs"].shape[-1])]
card = dict(zip(labels, namespace["probs"].tolist()))
classify = pipeline("image-classification", model=folder, trust_remote_code=True)
pil = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, backend="pil")
classify_pil = pipeline("image-classification", model=folder, trust_remote_code=True, image_processor=pil)
leaked = sorted(m for m in sys.modules if m == "model" or m.startswith(("model.", "train", "hub_cards")))
# top_k=None means the default top 5 in transformers 5: ask for every label
print(json.dumps({"labels": labels, "card": card, "leaked": leaked,
                  "pipeline": {p["label"]: p["score"] for p in classify(image, top_k=len(labels))},
                  "pipeline_pil": {p["label"]: p["score"] for p in classify_pil(image, top_k=len(labels))}}))
"""


def _card_snippet(folder: Path, image: Path) -> str:
    """The card's first Python snippet with the folder and image filled in."""
    code = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S)[0]
    code, n_id = re.subn(r'^model_id = ".*"$', f"model_id = {str(folder)!r}", code, flags=re.M)
    code, n_image = re.subn(r'^image_path = ".*?"', f"image_path = {str(image)!r}", code, flags=re.M)
    assert n_id == 1 and n_image == 1
    return code


@pytest.mark.slow
@pytest.mark.parametrize("folder", CLASSIFIERS, ids=IDS)
def test_pipeline_card_snippet_and_app_give_the_same_calibrated_probabilities(folder, tmp_path, ham_image_paths):
    image = ham_image_paths[0]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, str(folder), str(image), _card_snippet(folder, image)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["labels"] == list(DX_CODES)
    assert result["leaked"] == [], "the folder must not need this project's code"
    # The PyTorch backend: the app's ONNX ones are held to it in test_onnx_export.py (fp32 within 1e-4;
    # int8 by the accuracy bar in onnx/export.json).
    app = Classifier(folder, model_id=folder.name, backend="torch").predict([Image.open(image).convert("RGB")])[0].probabilities
    assert abs(sum(app.values()) - 1.0) < 1e-5
    for code in DX_CODES:
        # same preprocessing: pipeline == the app (calibrated, temperature folded) and pipeline == the card
        assert result["pipeline_pil"][code] == pytest.approx(app[code], abs=1e-5), code
        assert result["card"][code] == pytest.approx(result["pipeline"][code], abs=1e-5), code
        # transformers' default (torchvision) resize vs the app's PIL one: not calibration, and small
        assert result["pipeline"][code] == pytest.approx(app[code], abs=1e-3), code


@pytest.mark.parametrize("folder", CLASSIFIERS, ids=IDS)
def test_card_matches_the_kept_metrics(folder):
    """The committed card is exactly what the renderer makes from the kept metrics.json files."""
    readme = folder / "README.md"
    assert readme.is_file(), f"{folder.name} has no model card"
    committed = ModelCard.load(readme)
    rendered = render_model_card(folder, model_name=folder.name, repo_id=_repo_id_in(committed.content, folder.name))
    assert rendered.data.to_dict() == committed.data.to_dict()
    assert rendered.text == committed.text
    metrics_files = sorted(folder.glob("eval/*/metrics.json"))
    assert metrics_files, f"{folder.name} has no kept evaluation"
    text = committed.text.lower()
    assert "not a diagnostic device" in text or "not a medical device" in text
    for path in metrics_files:
        auc = json.loads(path.read_text())["melanoma_auc"]
        assert f"{auc:.3f}" in committed.text, f"{path} AUC {auc:.3f} missing from the card"


def _repo_id_in(content: str, name: str) -> str | None:
    import re

    match = re.search(r'model_id = "([^"]+)"', content)
    return match.group(1) if match and match.group(1) != PLACEHOLDER_REPO_ID.format(name=name) else None


@pytest.mark.parametrize("folder", [f for f in CLASSIFIERS if (f / "modeling_melanoma_vit.py").is_file()],
                         ids=lambda f: f.name)
def test_shipped_remote_code_is_the_current_model_code(folder):
    """trust_remote_code runs the copies in the folder: they must not drift from model/."""
    for name in ("configuration_melanoma_vit.py", "modeling_melanoma_vit.py"):
        assert (folder / name).read_text() == (ROOT / "model" / name).read_text(), (
            f"{folder.name}/{name} differs from model/{name}: re-save the folder with save_pretrained"
        )


# timm made unimportable (as if not installed): the stock folder must not need it.
WITHOUT_TIMM = r"""
import json, sys
sys.modules["timm"] = None
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline
folder, image = sys.argv[1:3]
model = AutoModelForImageClassification.from_pretrained(folder)
top = pipeline("image-classification", model=folder)(Image.open(image), top_k=1)[0]
print(json.dumps({"class": type(model).__name__, "top": top,
                  "leaked": sorted(m for m in sys.modules if m == "model" or m.startswith(("model.", "train")))}))
"""


@pytest.mark.slow
def test_resnet18_is_a_stock_transformers_resnet_served_without_timm(tmp_path, ham_image_paths):
    """The ResNet baseline ships as transformers' own ResNetForImageClassification (export_command.txt):
    `AutoModelForImageClassification` and `pipeline` serve it with timm unimportable, and pipeline's
    top class is the app's."""
    folder, image = MODELS / "resnet18", ham_image_paths[0]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", WITHOUT_TIMM, str(folder), str(image)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["class"] == "ResNetForImageClassification" and result["leaked"] == []
    app = Classifier(folder).predict([Image.open(image).convert("RGB")])[0]
    assert result["top"]["label"] == app.label
    # transformers' default (torchvision) resize vs the app's PIL one
    assert result["top"]["score"] == pytest.approx(app.probabilities[app.label], abs=1e-3)


def test_readme_results_table_is_rendered_from_the_kept_metrics():
    """The README's table is what hub_cards.results_table makes from models/*/eval today."""
    from hub_cards.results_table import END, START, replace_block, results_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count(START) == 1 and readme.count(END) == 1
    assert replace_block(readme, results_table(MODELS)) == readme, (
        "README results table is stale: python -m hub_cards.results_table models --write README.md"
    )
    with pytest.raises(ValueError, match="no results-table markers"):
        replace_block("# a README without the table\n", "| x |")


def test_app_default_is_the_best_measured_model(monkeypatch):
    """The app serves the folder with the highest mean melanoma AUC over the three kept test sets."""
    from hub_cards.results_table import SETS
    from model.catalogue import ModelCatalogue

    monkeypatch.delenv("MELANOMA_DEFAULT_MODEL", raising=False)

    def mean_auc(folder: Path) -> float:
        aucs = [json.loads((folder / "eval" / key / "metrics.json").read_text())["melanoma_auc"] for key in SETS]
        return sum(aucs) / len(aucs)

    evaluated = [f for f in CLASSIFIERS if all((f / "eval" / key / "metrics.json").is_file() for key in SETS)]
    assert evaluated, "no shipped model is evaluated on all three test sets"
    best = max(evaluated, key=mean_auc)
    assert ModelCatalogue(MODELS, hub_ids=[]).default_id == best.name


TRAINED = sorted(p.name for p in MODELS.iterdir() if (p / "train_config.yaml").is_file())


@pytest.mark.parametrize("name", TRAINED)
def test_shipped_recipe_is_a_config_file_run_without_overrides(name: str) -> None:
    """Each trained folder's command.txt is `accelerate launch train/train.py --config
    train/configs/<file> --output_dir ...` (infrastructure flags only, no --set or hyperparameter
    flags), and its train_config.yaml is that file, key for key."""
    import dataclasses
    import shlex

    from train.train import load_config, parse_args

    folder = MODELS / name
    argv = shlex.split((folder / "command.txt").read_text())
    assert argv[:3] == ["accelerate", "launch", "train/train.py"], argv
    args = parse_args(argv[3:])
    assert args.overrides == [], f"{name}: --set {args.overrides}"
    hyper = {k: getattr(args, k) for k in ("data", "max_steps", "max_train_samples", "max_eval_samples", "seed")}
    assert all(v is None for v in hyper.values()), hyper
    assert args.config.startswith("train/configs/") and (ROOT / args.config).is_file(), args.config
    assert dataclasses.asdict(load_config(folder / "train_config.yaml")) == dataclasses.asdict(load_config(ROOT / args.config))


@pytest.mark.parametrize("folder", CLASSIFIERS, ids=lambda p: p.name)
def test_rescoring_the_isic2017_fixtures_gives_the_kept_predictions(folder: Path, isic2017_dir: Path) -> None:
    """The kept evaluation is this folder's: the four ISIC 2017 test images under tests/fixtures (the
    same files as in the dataset) re-scored now give the probabilities its predictions.csv kept."""
    import pandas as pd

    eval_dir = folder / "eval" / "isic2017_test"
    tta = json.loads((eval_dir / "metrics.json").read_text())["tta"]
    kept = pd.read_csv(eval_dir / "predictions.csv").set_index("image_id")
    rows = pd.read_csv(isic2017_dir / "labels.csv")
    assert set(rows["image_id"]) <= set(kept.index)
    images = [Image.open(isic2017_dir / path).convert("RGB") for path in rows["path"]]
    for image_id, prediction in zip(rows["image_id"], Classifier(folder, backend="torch").predict(images, tta=tta)):
        for code, p in prediction.probabilities.items():
            assert p == pytest.approx(kept.loc[image_id, f"p_{code}"], abs=2e-5), (image_id, code)
