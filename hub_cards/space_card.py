"""Render the README.md (front matter + short body) of the Gradio Space that hosts app.py.

CLI::

    python -m hub_cards.space_card --output PATH [--models ID ...] [--models-dir models] [--owner OWNER]
        [--front-matter-only]

The Space's `models:` metadata links Hub models, so every entry is a Hub id (owner/name): bare
folder names get `--owner` (default `DEFAULT_OWNER`, the placeholder the model cards use too).
This repository's README.md is also the Space's README: `--output README.md --front-matter-only`
re-renders its front matter and keeps its body.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

from huggingface_hub import SpaceCard, SpaceCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hub_cards.render import DEFAULT_OWNER, LICENSE, TEMPLATE_DIR
from model.catalogue import is_classifier_folder

logger = logging.getLogger(__name__)

SPACE_CARD_TEMPLATE = TEMPLATE_DIR / "space_card.md.j2"


def installed_gradio_version() -> str:
    """Version of the installed gradio package (the Space's `sdk_version`)."""
    try:
        return version("gradio")
    except PackageNotFoundError as err:
        raise ValueError("gradio is not installed: pass sdk_version explicitly.") from err


def discover_models(models_dir: Path) -> list[str]:
    """Names of the classifier folders under `models_dir`, by the zoo's rule (what the app serves)."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir() if is_classifier_folder(p))


def hub_model_ids(models: Sequence[str], owner: str = DEFAULT_OWNER) -> list[str]:
    """Hub ids (owner/name) for the Space's `models:`: bare folder names get `owner/`, ids stay.

    Raises ValueError on a name that is not a valid Hub repo id.
    """
    ids = [m if "/" in m else f"{owner}/{m}" for m in models]
    for repo_id in ids:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            raise ValueError(f"{repo_id!r} is not a Hub model id (owner/name): {err}") from err
    return ids


def render_space_card(
    models: Sequence[str],
    *,
    owner: str = DEFAULT_OWNER,
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
        owner: Hub owner of the bare folder names (see `hub_model_ids`).
        sdk_version: gradio version; default the installed one.
    """
    models = hub_model_ids(models, owner)
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
    parser.add_argument("--owner", default=DEFAULT_OWNER,
                        help=f"Hub owner of bare model folder names (default {DEFAULT_OWNER}, as in the model cards)")
    parser.add_argument("--title", default="Melanoma ViT explorer")
    parser.add_argument("--front-matter-only", action="store_true",
                        help="replace only the front matter of an existing --output and keep its body (README.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    models = args.models if args.models is not None else discover_models(args.models_dir)
    if not models:
        logger.warning("no models given or found under %s; the card lists none", args.models_dir)
    card = render_space_card(models, owner=args.owner, title=args.title)
    if args.front_matter_only:
        existing = SpaceCard.load(args.output)
        existing.data = card.data
        card = existing
    args.output.parent.mkdir(parents=True, exist_ok=True)
    card.save(args.output)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
