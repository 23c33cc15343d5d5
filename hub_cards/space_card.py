"""Render the README.md (front matter + short body) of the Gradio Space that hosts app.py.

CLI::

    python -m hub_cards.space_card --output PATH [--models ID ...] [--models-dir models] [--owner OWNER]
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

from huggingface_hub import SpaceCard, SpaceCardData

from hub_cards.render import LICENSE, TEMPLATE_DIR

logger = logging.getLogger(__name__)

SPACE_CARD_TEMPLATE = TEMPLATE_DIR / "space_card.md.j2"


def installed_gradio_version() -> str:
    """Version of the installed gradio package (the Space's `sdk_version`)."""
    try:
        return version("gradio")
    except PackageNotFoundError as err:
        raise ValueError("gradio is not installed: pass sdk_version explicitly.") from err


def discover_models(models_dir: Path, owner: str | None = None) -> list[str]:
    """Names of the model folders under `models_dir` (those with a config.json), as `owner/name` if given."""
    names = sorted(p.parent.name for p in Path(models_dir).glob("*/config.json"))
    return [f"{owner}/{n}" if owner else n for n in names]


def render_space_card(
    models: Sequence[str],
    *,
    title: str = "Melanoma ViT explorer",
    emoji: str = "🔬",
    sdk_version: str | None = None,
    app_file: str = "app.py",
    template: Path = SPACE_CARD_TEMPLATE,
) -> SpaceCard:
    """Render the Space README: front matter (title, emoji, sdk gradio + version, app_file, models,
    license) and a short body with the not-a-diagnostic-device statement.

    Args:
        models: model folder names or Hub repo ids the app serves (Space `models:` metadata).
        sdk_version: gradio version; default the installed one.
    """
    card_data = SpaceCardData(
        title=title,
        emoji=emoji,
        colorFrom="indigo",
        colorTo="pink",
        sdk="gradio",
        sdk_version=sdk_version or installed_gradio_version(),
        app_file=app_file,
        pinned=False,
        license=LICENSE,
        models=list(models) or None,
        tags=["dermoscopy", "melanoma", "vision-transformer", "explainability", "research-only"],
        short_description="Skin-lesion research demo; not a diagnostic device",
    )
    return SpaceCard.from_template(card_data, template_path=str(template), title=title, models=list(models))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the Gradio Space README (front matter + body).")
    parser.add_argument("--output", type=Path, required=True, help="path of the README.md to write")
    parser.add_argument("--models", nargs="*", help="model folder names / Hub ids (default: discover --models-dir)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--owner", help="prefix discovered folder names with OWNER/ (Hub ids)")
    parser.add_argument("--title", default="Melanoma ViT explorer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    models = args.models if args.models is not None else discover_models(args.models_dir, args.owner)
    if not models:
        logger.warning("no models given or found under %s; the card lists none", args.models_dir)
    card = render_space_card(models, title=args.title)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    card.save(args.output)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
