"""Shared pytest set-up: offline Hub, fixture paths (pyproject's `pythonpath` puts the checkout first)."""

import os
from pathlib import Path

# Tests never touch the network: every Hub code path must work on local paths.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

FIXTURES = ROOT / "tests" / "fixtures"


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
