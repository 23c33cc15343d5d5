"""Shared pytest set-up: offline Hub, project root on sys.path, fixture paths."""

import os
import sys
from pathlib import Path

# Tests never touch the network: every Hub code path must work on local paths.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures"


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
