"""hub_cards.publish: folder validation, dry run, and failing safely without a token or network.

No test reaches the Hub: offline mode, an empty HF_HOME, or a closed local port stand in for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants

from hub_cards import publish
from hub_cards.publish import PublishError, validate_model_folder
from hub_cards.render import render_model_card
from model.labels import DX_CODES, dx_id2label, dx_label2id

ROOT = Path(__file__).resolve().parents[1]
from conftest import TINY_VIT as TINY  # noqa: E402


@pytest.fixture(scope="session")
def carded_vit_dir(tmp_path_factory) -> Path:
    """A tiny stock ViT folder with its rendered card (SYNTHETIC metrics.json as test input), built once."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    d = tmp_path_factory.mktemp("carded") / "tiny"
    ViTForImageClassification(ViTConfig(**TINY, id2label=dx_id2label(), label2id=dx_label2id())).save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    (d / "eval" / "ham10000_test").mkdir(parents=True)
    # SYNTHETIC TEST INPUT, not a measurement.
    (d / "eval" / "ham10000_test" / "metrics.json").write_text(json.dumps(
        {"split": "test", "n": 12, "labels": list(DX_CODES), "melanoma_auc": 0.75, "melanoma_auc_ci95": [0.5, 0.9],
         "balanced_accuracy": 0.5, "threshold_val95": None, "command": "python train/evaluate.py ..."}))
    render_model_card(d, model_name="tiny", repo_id="me/tiny").save(d / "README.md")
    return d


@pytest.fixture
def folder(carded_vit_dir, tmp_path) -> Path:
    return Path(shutil.copytree(carded_vit_dir, tmp_path / "tiny"))


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")}


def test_dry_run_lists_files_with_sizes_and_the_card(folder, capsys):
    before = _snapshot(folder)
    assert publish.main([str(folder), "--repo-id", "me/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for rel in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                "eval/ham10000_test/metrics.json"):
        size = (folder / rel).stat().st_size
        assert f"{size:>12,d}  {rel}" in out, rel
    assert "would create me/tiny (public)" in out
    assert (folder / "README.md").read_text(encoding="utf-8").strip() in out
    assert _snapshot(folder) == before


def test_validation_reports_files_card_and_size(folder):
    report = validate_model_folder(folder, repo_id="me/tiny")
    files = dict(report.files)
    assert files["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    assert report.total_bytes == sum(files.values())
    assert report.card.data.license == "cc-by-nc-sa-4.0" and report.card.data.eval_results
    assert report.warnings == []


def _remove_config(d: Path) -> None:
    (d / "config.json").unlink()


def _add_bin(d: Path) -> None:
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really weights")


def _card_without_metadata(d: Path) -> None:
    (d / "README.md").write_text("# tiny\n\nA card with no YAML front matter.\n")


def _card_without_license(d: Path) -> None:
    (d / "README.md").write_text("---\ntags:\n- vision\n---\n# tiny\n")


def _remove_card(d: Path) -> None:
    (d / "README.md").unlink()


def _remove_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _remove_processor(d: Path) -> None:
    (d / "preprocessor_config.json").unlink()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_remove_config, "has no config.json"),
        (_add_bin, r"pickle-based weight files \['pytorch_model.bin'\]"),
        (_card_without_metadata, "has no YAML metadata"),
        (_card_without_license, "has no license"),
        (_remove_card, "has no README.md"),
        (_remove_weights, "no .safetensors weights"),
        (_remove_processor, "no loadable image processor"),
    ],
)
def test_invalid_folders_are_refused_with_what_to_fix(folder, breakage, message, capsys):
    breakage(folder)
    with pytest.raises(ValueError, match=message):
        validate_model_folder(folder)
    assert publish.main([str(folder), "--repo-id", "me/tiny", "--dry-run"]) == 2
    assert "error:" in capsys.readouterr().err


def test_oversized_folder_is_refused(folder):
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    validate_model_folder(folder, max_mb=total / 1e6 + 0.001)  # just fits
    with pytest.raises(ValueError, match="over the .* MB limit"):
        validate_model_folder(folder, max_mb=total / 1e6 - 0.001)


def test_default_limit_is_50_mb(folder):
    with open(folder / "predictions.npy", "wb") as f:
        f.truncate(50 * 10**6 + 1)  # sparse: a 50 MB file without writing 50 MB
    with pytest.raises(ValueError, match="over the 50 MB limit"):
        validate_model_folder(folder)


def test_bad_repo_id_is_refused(folder):
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        publish.publish(folder, "not a repo id!")


class RecordingApi:
    """Stands in for the Hub (unreachable here); records the calls publish makes, in order."""

    def __init__(self, whoami_error: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.whoami_error = whoami_error

    def whoami(self):
        self.calls.append(("whoami", {}))
        if self.whoami_error:
            raise self.whoami_error
        return {"name": "me"}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "https://huggingface.co/me/tiny/commit/abc"


def test_publish_validates_then_creates_then_uploads(folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = RecordingApi()
    url = publish.publish(folder, "me/tiny", private=True, token="hf_test", api=api)
    assert url.endswith("/commit/abc")
    assert [name for name, _ in api.calls] == ["whoami", "create_repo", "upload_folder"]
    create, upload = api.calls[1][1], api.calls[2][1]
    assert create == {"repo_id": "me/tiny", "private": True, "exist_ok": True, "repo_type": "model"}
    assert upload["repo_id"] == "me/tiny" and Path(upload["folder_path"]) == folder
    assert "__pycache__/*" in upload["ignore_patterns"]


def test_publish_adds_the_hub_convention_onnx_files(folder, monkeypatch, tmp_path):
    """A folder with model.onnx (weights in model.safetensors) gets onnx/model.onnx + onnx/model.onnx_data
    on the Hub, and that pair runs in ONNX Runtime as a downloaded snapshot lays it out."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import ViTForImageClassification

    from model.onnx_export import export_fp32

    model = ViTForImageClassification.from_pretrained(folder).eval()
    export_fp32(model, folder, (32, 32))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = RecordingApi()
    commits = []
    api.create_commit = lambda **kwargs: commits.append(kwargs) or "https://huggingface.co/me/tiny/commit/def"
    assert publish.publish(folder, "me/tiny", token="hf_test", api=api).endswith("/commit/def")
    (operations,) = [c["operations"] for c in commits]
    assert [op.path_in_repo for op in operations] == ["onnx/model.onnx", "onnx/model.onnx_data"]
    snapshot = tmp_path / "snapshot" / "onnx"
    snapshot.mkdir(parents=True)
    (snapshot / "model.onnx").write_bytes(operations[0].path_or_fileobj)
    shutil.copy(operations[1].path_or_fileobj, snapshot / "model.onnx_data")
    assert Path(operations[1].path_or_fileobj) == folder / "model.safetensors"
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (logits,) = ort.InferenceSession(str(snapshot / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x})
    with torch.inference_mode():
        expected = model(pixel_values=torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_invalid_folder_never_reaches_the_hub(folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _add_bin(folder)
    api = RecordingApi()
    with pytest.raises(ValueError):
        publish.publish(folder, "me/tiny", token="hf_test", api=api)
    assert api.calls == []


def test_offline_fails_before_anything_is_created(folder):
    assert constants.is_offline_mode()  # conftest sets HF_HUB_OFFLINE=1
    before = _snapshot(folder)
    api = RecordingApi()
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set"):
        publish.publish(folder, "me/tiny", token="hf_test", api=api)
    assert api.calls == [] and _snapshot(folder) == before


def test_unreachable_hub_fails_with_a_clear_message(folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = HfApi(endpoint="http://127.0.0.1:9", token="hf_not_a_real_token")  # closed local port
    with pytest.raises(PublishError, match="could not verify the token with the Hub"):
        publish.publish(folder, "me/tiny", api=api)


def _run_cli(folder: Path, tmp_path: Path, **env_overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    hf_home = tmp_path / "empty_hf_home"
    hf_home.mkdir(exist_ok=True)
    env.update(HF_HOME=str(hf_home), HF_HUB_DISABLE_IMPLICIT_TOKEN="1", **env_overrides)
    env.pop("HF_TOKEN_PATH", None)
    return subprocess.run([sys.executable, "-m", "hub_cards.publish", str(folder), "--repo-id", "me/tiny"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_offline_without_token_exits_nonzero_and_changes_nothing(folder, tmp_path):
    before = _snapshot(folder)
    result = _run_cli(folder, tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 3, result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr and "Nothing was created or uploaded" in result.stderr
    assert _snapshot(folder) == before
    assert list((tmp_path / "empty_hf_home").rglob("token")) == []


def test_no_token_fails_before_any_network_call(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_stored_tokens"))
    api = RecordingApi()
    with pytest.raises(PublishError, match="no Hugging Face token found"):
        publish.publish(folder, "me/tiny", api=api)
    assert api.calls == []
    # the CLI: same failure, exit code 3, nothing created
    before = _snapshot(folder)
    assert publish.main([str(folder), "--repo-id", "me/tiny"]) == 3
    assert "no Hugging Face token found" in capsys.readouterr().err
    assert _snapshot(folder) == before


def test_melanoma_vit_folder_validates_with_its_remote_code(tmp_path):
    import model

    from transformers import ViTImageProcessor

    d = tmp_path / "mvit"
    config = model.MelanomaViTConfig(**TINY, id2label=dx_id2label(), label2id=dx_label2id())
    model.MelanomaViTForImageClassification(config).save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    render_model_card(d, model_name="mvit", repo_id="me/mvit").save(d / "README.md")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "modeling_melanoma_vit.cpython-311.pyc").write_bytes(b"cache")
    report = validate_model_folder(d, repo_id="me/mvit")
    names = [rel for rel, _ in report.files]
    assert report.model_type == "melanoma_vit"
    assert {"configuration_melanoma_vit.py", "modeling_melanoma_vit.py", "model.safetensors"} <= set(names)
    assert not any("__pycache__" in n for n in names)
    assert report.warnings == ["the card has no model-index: the model is not evaluated yet"]
