"""Validate a Hub-ready model folder and push it to the Hugging Face Hub.

Everything is checked before anything is created: the folder loads with the Auto classes, weights
are safetensors only, the card's metadata parses, the folder is small enough, the Hub is online
and a token is available and valid. Only then is the repo created and the folder uploaded.

CLI::

    python -m hub_cards.publish models/<name> --repo-id OWNER/NAME [--private] [--dry-run] [--token TOKEN]

Exit codes: 0 success, 2 invalid folder, 3 no token / offline / Hub unreachable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

logger = logging.getLogger(__name__)

#: Pickle-based or opaque checkpoint formats: refused, the Hub folder ships safetensors only.
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
#: Files never uploaded (local caches).
IGNORE_PATTERNS = ["__pycache__/*", "*/__pycache__/*", "*.pyc", ".cache/*", ".git/*", ".DS_Store"]
DEFAULT_MAX_MB = 50.0
#: Custom architectures whose code ships in the folder (loaded with trust_remote_code).
REMOTE_CODE_MODEL_TYPES = ("melanoma_vit",)


class PublishError(RuntimeError):
    """The Hub cannot be reached or no valid token is available (nothing was created)."""


@dataclass
class FolderReport:
    """What `validate_model_folder` found: the files to upload (relative path, bytes) and the card."""

    files: list[tuple[str, int]]
    total_bytes: int
    card: ModelCard
    model_type: str
    warnings: list[str]


def upload_files(folder: Path) -> list[tuple[str, int]]:
    """Files `upload_folder` will send (relative posix path, size in bytes), caches excluded."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(fnmatch(rel, pat) for pat in IGNORE_PATTERNS):
            continue
        out.append((rel, path.stat().st_size))
    return out


def _load_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    remote = config.get("model_type") in REMOTE_CODE_MODEL_TYPES or "auto_map" in config
    if config.get("model_type") in REMOTE_CODE_MODEL_TYPES:
        try:
            import model  # noqa: F401  (registers MelanomaViT with the Auto classes)
        except ImportError as err:
            if "auto_map" not in config:
                raise ValueError(
                    f"config.json has model_type {config['model_type']!r} but neither the project's `model` "
                    "package imports nor auto_map is set: save the model after `import model`."
                ) from err
    return {"trust_remote_code": remote}


def validate_model_folder(folder: Path, *, max_mb: float = DEFAULT_MAX_MB, repo_id: str | None = None) -> FolderReport:
    """Check that `folder` is ready to push; raise ValueError saying what to fix.

    Checks: config.json loads with AutoConfig; no pickle checkpoints (.bin/.pt/.pth/.pkl/...),
    at least one .safetensors file; the model loads with AutoModelForImageClassification and an
    image processor with AutoImageProcessor; README.md exists and its metadata parses
    (license + model-index, via ModelCard.load); total size <= `max_mb` megabytes (10**6 bytes).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: pass models/<name>.")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json: save the model with save_pretrained(folder).")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}): re-save the model.") from err

    files = upload_files(folder)
    forbidden = [rel for rel, _ in files if rel.lower().endswith(FORBIDDEN_SUFFIXES)]
    if forbidden:
        raise ValueError(
            f"{folder} contains pickle-based weight files {forbidden}: delete them and ship safetensors only "
            "(save_pretrained writes model.safetensors)."
        )
    if not any(rel.endswith(".safetensors") for rel, _ in files):
        raise ValueError(f"{folder} has no .safetensors weights: save the model with save_pretrained(folder).")
    total = sum(size for _, size in files)
    if total > max_mb * 1e6:
        raise ValueError(
            f"{folder} holds {total / 1e6:.1f} MB, over the {max_mb:g} MB limit: remove large files "
            "(predictions, checkpoints) or raise --max-mb deliberately."
        )

    kwargs = _load_kwargs(config)
    try:
        AutoConfig.from_pretrained(folder, **kwargs)
    except Exception as err:  # transformers raises many types for a bad config
        raise ValueError(f"config.json in {folder} does not load with AutoConfig: {err}") from err
    try:
        AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True, **kwargs)
    except Exception as err:
        raise ValueError(f"{folder} does not load with AutoModelForImageClassification: {err}") from err
    try:
        AutoImageProcessor.from_pretrained(folder, **kwargs)
    except Exception as err:
        raise ValueError(
            f"{folder} has no loadable image processor ({err}): save one with image_processor.save_pretrained(folder)."
        ) from err

    readme = folder / "README.md"
    if not readme.is_file():
        raise ValueError(f"{folder} has no README.md: run `python -m hub_cards.render {folder} --write`.")
    try:
        card = ModelCard.load(readme)
    except Exception as err:
        raise ValueError(f"{readme} metadata does not parse ({err}): re-render it with hub_cards.render.") from err
    if not card.data.to_dict():
        raise ValueError(f"{readme} has no YAML metadata: re-render it with `python -m hub_cards.render {folder} --write`.")
    if not card.data.license:
        raise ValueError(f"{readme} metadata has no license: the models inherit HAM10000's cc-by-nc-sa-4.0.")
    warnings = []
    if not card.data.eval_results:
        warnings.append("the card has no model-index: the model is not evaluated yet")
    if repo_id and repo_id not in card.text:
        warnings.append(f"the card's code snippets do not mention {repo_id}: re-render with --repo-id {repo_id}")
    for w in warnings:
        logger.warning(w)
    return FolderReport(files=files, total_bytes=total, card=card, model_type=str(config.get("model_type")),
                        warnings=warnings)


def resolve_token(token: str | None = None) -> str:
    """The token to push with (argument, else HF_TOKEN / stored login); checks offline mode first.

    Raises PublishError (before any network call) when offline or without a token.
    """
    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE is set: publishing needs the Hub. Unset HF_HUB_OFFLINE "
                           "(and TRANSFORMERS_OFFLINE) on a machine with network access.")
    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass --token "
                           "(a token with write access).")
    return token


def publish(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    max_mb: float = DEFAULT_MAX_MB,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Validate `folder`, check the token against the Hub, create `repo_id` and upload the folder.

    Returns the commit URL. Raises ValueError (bad folder / repo id) or PublishError (offline, no or
    invalid token, Hub unreachable) before anything is created.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"--repo-id {repo_id!r} is not a valid Hub repo id (OWNER/NAME): {err}") from err
    validate_model_folder(folder, max_mb=max_mb, repo_id=repo_id)
    token = resolve_token(token or getattr(api, "token", None))
    api = api or HfApi(token=token)
    try:
        user = api.whoami()
    except Exception as err:  # connection errors, 401s: nothing has been created yet
        raise PublishError(f"could not verify the token with the Hub ({type(err).__name__}: {err}); "
                           "check the network connection and the token.") from err
    logger.info("authenticated as %s", user.get("name") if isinstance(user, dict) else user)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info("repo %s ready", url)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        ignore_patterns=IGNORE_PATTERNS,
        commit_message=commit_message or f"Upload {Path(folder).name} (hub_cards.publish)",
    )
    extra = hub_onnx_operations(Path(folder))
    if extra:
        info = api.create_commit(repo_id=repo_id, repo_type="model", operations=extra,
                                 commit_message=f"{Path(folder).name}: onnx/model.onnx + model.onnx_data (hub_cards.publish)")
    return str(getattr(info, "commit_url", info))


def hub_onnx_operations(folder: Path) -> list[CommitOperationAdd]:
    """The Hub convention's fp32 ONNX files for a folder that has `model.onnx` (`model.onnx_export`):
    `onnx/model.onnx` and `onnx/model.onnx_data`, a byte copy of model.safetensors that the Hub's
    content-addressed storage keeps once. Locally the graph sits beside model.safetensors instead,
    because ONNX Runtime refuses external data outside a graph's own folder."""
    from model.onnx_export import FP32_FILE, HUB_FP32_DATA, HUB_FP32_FILE, WEIGHTS_FILE, hub_fp32_graph

    if not (folder / FP32_FILE).is_file():
        return []
    return [CommitOperationAdd(HUB_FP32_FILE, hub_fp32_graph(folder)),
            CommitOperationAdd(HUB_FP32_DATA, str(folder / WEIGHTS_FILE))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate a model folder and push it to the Hugging Face Hub.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--repo-id", required=True, help="OWNER/NAME on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="validate, list files and card; no network")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB, help="folder size limit in MB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.dry_run:
            validate_repo_id(args.repo_id)
            report = validate_model_folder(args.model_dir, max_mb=args.max_mb, repo_id=args.repo_id)
            print(f"Dry run: would create {args.repo_id} ({'private' if args.private else 'public'}) "
                  f"and upload {len(report.files)} files, {report.total_bytes / 1e6:.3f} MB:")
            for rel, size in report.files:
                print(f"  {size:>12,d}  {rel}")
            print("\n----- README.md -----")
            print(report.card)
            return 0
        url = publish(args.model_dir, args.repo_id, private=args.private, token=args.token, max_mb=args.max_mb)
    except (ValueError, HFValidationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PublishError as err:
        print(f"error: {err} Nothing was created or uploaded.", file=sys.stderr)
        return 3
    print(f"Uploaded {args.model_dir} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
