"""Shared pytest set-up: offline Hub, fixture paths, the tiny-model factories every test module uses
(pyproject's `pythonpath` puts the checkout first; test modules import the factories with
`from conftest import ...`, pytest puts tests/ on sys.path)."""

import os
from pathlib import Path

# Tests never touch the network: every Hub code path must work on local paths.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from model import MelanomaViTConfig, MelanomaViTForImageClassification  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

FIXTURES = ROOT / "tests" / "fixtures"

# The house tiny MelanomaViT: image 32, patch 8, hidden 32, 2 layers, 4 heads, intermediate 37.
TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37)


def tiny_vit_config(**overrides) -> MelanomaViTConfig:
    """`TINY_VIT` with `overrides` (any MelanomaViTConfig field)."""
    return MelanomaViTConfig(**{**TINY_VIT, **overrides})


def tiny_vit(**overrides) -> MelanomaViTForImageClassification:
    """A tiny MelanomaViT initialised from seed 0 (train mode, as constructed)."""
    torch.manual_seed(0)
    return MelanomaViTForImageClassification(tiny_vit_config(**overrides))


@pytest.fixture(scope="session")
def script_env() -> dict[str, str]:
    """Environment for running this checkout's scripts (`python train/train.py`) in a subprocess.

    PYTHONPATH is the checkout, as pyproject's `pythonpath` is for pytest itself: the child imports
    the code under test whether the environment has no `pip install -e .` or one of another checkout.
    """
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    """HAM10000 layout: HAM10000_metadata.csv + images/ + masks/ (12 real images)."""
    return FIXTURES / "ham10000"


@pytest.fixture(scope="session")
def isic2017_dir() -> Path:
    """ISIC 2017 layout: labels.csv + test/ (4 real images)."""
    return FIXTURES / "isic2017"


@pytest.fixture(scope="session")
def ham_image_paths(ham_dir: Path) -> list[Path]:
    return sorted((ham_dir / "images").glob("*.jpg"))


def edit_config_json(folder: Path, **keys) -> None:
    """Set `keys` in a saved model folder's config.json as is (None removes a key), e.g. to write the
    older calibration form (`temperature` / `head_temperatures` / `calibration_temperature` still to apply)."""
    import json

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    for key, value in keys.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))
