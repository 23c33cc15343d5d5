"""The Hub-ready folders under models/: what a user downloads must load, predict and match its card.

Each classifier folder is loaded in a fresh Python process that never imports this project
(cwd = a temp dir, no repo on sys.path), exactly as `from_pretrained` of a Hub id would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hub_cards.render import PLACEHOLDER_REPO_ID, render_model_card
from model.labels import DX_CODES

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


LOAD_AND_PREDICT = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification
folder, image = sys.argv[1], sys.argv[2]
net = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
with torch.inference_mode():
    logits = net(**processor(Image.open(image).convert("RGB"), return_tensors="pt")).logits
leaked = sorted(m for m in sys.modules if m == "model" or m.startswith(("model.", "train", "hub_cards")))
print(json.dumps({"labels": [net.config.id2label[i] for i in range(logits.shape[-1])],
                  "probs": logits.softmax(-1)[0].tolist(), "leaked": leaked}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("folder", CLASSIFIERS, ids=IDS)
def test_folder_loads_with_auto_classes_in_a_fresh_process(folder, tmp_path, ham_image_paths):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, str(folder), str(ham_image_paths[0])],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["labels"] == list(DX_CODES)
    assert abs(sum(result["probs"]) - 1.0) < 1e-4
    assert result["leaked"] == [], "the folder must not need this project's code"


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
