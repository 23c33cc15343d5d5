"""Multi-source training: source loading and splits, the source-balanced
sampler, the seven-point score, cached stem features, and a real run (train, resume, export) of an
EfficientNet-Lite0 with auxiliary heads on the fixture images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, TimmWrapperForImageClassification

from model.baselines import create_efficientnet_lite, create_image_processor
from model.calibration import unfolded_temperatures
from model.labels import CRITERIA_LABELS, DERM7PT_LABELS, DX_CODES
from model.sevenpoint import SEVEN_POINT, seven_point_score, seven_point_score_from_labels
from model.modeling_melanoma_vit import IGNORE_INDEX
from model.stem import stem_bypassed
from train.data import load_image_dataset
from train.features import build_cache, efficientnet_stem, load_cache
from train.multisource import MultiHeadNet, sampler_weights
from train.sources import SourceSpec, derm7pt_diagnosis, head_labels, load_sources
from train.train import complete_checkpoints, main

# Criteria values in Derm7pt's raw vocabulary (grouped by train.sources), one row per image.
DERM7PT_ROWS = [
    # split, diagnosis, dx, pigment_network, streaks, pigmentation, regression, dots, veil, vascular
    ("train", "melanoma (in situ)", "mel", "atypical", "irregular", "diffuse irregular", "blue areas", "irregular", "present", "dotted"),
    ("train", "clark nevus", "nv", "typical", "absent", "diffuse regular", "absent", "regular", "absent", "absent"),
    ("train", "basal cell carcinoma", "bcc", "absent", "absent", "absent", "absent", "absent", "absent", "arborizing"),
    ("train", "melanosis", "", "absent", "regular", "localized regular", "white areas", "absent", "absent", "comma"),
    ("val", "melanoma (0.76 to 1.5 mm)", "mel", "atypical", "absent", "localized irregular", "combinations", "irregular", "present", "linear irregular"),
    ("val", "seborrheic keratosis", "bkl", "absent", "absent", "absent", "absent", "absent", "absent", "hairpin"),
    ("test", "reed or spitz nevus", "nv", "typical", "regular", "absent", "absent", "regular", "absent", "absent"),
    ("test", "melanoma", "mel", "atypical", "irregular", "diffuse irregular", "absent", "irregular", "absent", "absent"),
]
CRITERIA = ("pigment_network", "streaks", "pigmentation", "regression_structures", "dots_and_globules",
            "blue_whitish_veil", "vascular_structures")


def initial_model(name: str, image_size: int):
    """(model, processor) as train.py creates them for a recipe of `name` at `image_size` px: it seeds
    with cfg.seed (42) right before creating the model, so this is the run's initial model."""
    from train.train import ModelArgs, create_model


    torch.manual_seed(42)
    return create_model(ModelArgs(name=name, image_size=image_size, pretrained=False), dict(enumerate(DX_CODES)))


@pytest.fixture()
def derm7pt_dir(tmp_path: Path, ham_image_paths: list[Path]) -> Path:
    """Derm7pt's labels.csv layout (the real column names and vocabulary) over real fixture images."""
    folder = tmp_path / "derm7pt"
    (folder / "images").mkdir(parents=True)
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "lesion_group", "split", "path", "diagnosis", "dx", *CRITERIA])
        for i, (row, image) in enumerate(zip(DERM7PT_ROWS, ham_image_paths)):
            shutil.copy(image, folder / "images" / f"d{i}.jpg")
            writer.writerow([f"derm7pt_{i:04d}", f"g{i}", row[0], f"images/d{i}.jpg", *row[1:]])
    return folder


@pytest.fixture()
def isic_dir(tmp_path: Path, isic2017_dir: Path) -> Path:
    """ISIC 2017's labels.csv layout with train / val / test rows over the 4 fixture images."""
    folder = tmp_path / "isic2017"
    shutil.copytree(isic2017_dir, folder)
    rows = list(csv.DictReader(open(isic2017_dir / "labels.csv")))
    for row, split in zip(rows, ("train", "train", "val", "test")):
        row["split"] = split
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture()
def specs(ham_dir: Path, isic_dir: Path, derm7pt_dir: Path) -> list[SourceSpec]:
    return [
        SourceSpec(name="ham10000", data=str(ham_dir), val_size=0.2, test_size=0.2),
        SourceSpec(name="isic2017", data=str(isic_dir)),
        SourceSpec(name="derm7pt", data=str(derm7pt_dir), weight=0.5),
    ]


def test_derm7pt_diagnosis_groups() -> None:
    assert derm7pt_diagnosis("melanoma (in situ)") == "melanoma"
    assert derm7pt_diagnosis("melanosis") == "misc"
    assert derm7pt_diagnosis("reed or spitz nevus") == "nevus"
    assert derm7pt_diagnosis("seborrheic keratosis") == "seborrheic_keratosis"
    assert derm7pt_diagnosis("lentigo") == "misc"


def test_load_sources_labels_and_masks(specs: list[SourceSpec]) -> None:
    dd = load_sources(specs)
    heads = head_labels(specs)
    assert list(heads) == ["isic2017", "derm7pt", *CRITERIA]
    assert sum(len(ds) for ds in dd.values()) == 12 + 4 + 8
    rows = {r["image_id"]: r for split in dd.values() for r in split.remove_columns("image")}
    mel = rows["derm7pt/derm7pt_0000"]
    assert mel["label"] == DX_CODES.index("mel") and mel["derm7pt"] == DERM7PT_LABELS.index("melanoma")
    assert mel["pigment_network"] == CRITERIA_LABELS["pigment_network"].index("atypical")
    assert mel["pigmentation"] == CRITERIA_LABELS["pigmentation"].index("irregular")
    assert mel["regression_structures"] == CRITERIA_LABELS["regression_structures"].index("present")
    assert mel["vascular_structures"] == CRITERIA_LABELS["vascular_structures"].index("irregular")
    assert mel["isic2017"] == IGNORE_INDEX
    # melanosis has no dx code: masked, never guessed
    assert rows["derm7pt/derm7pt_0003"]["label"] == IGNORE_INDEX
    assert rows["derm7pt/derm7pt_0003"]["vascular_structures"] == CRITERIA_LABELS["vascular_structures"].index("regular")
    isic = rows["isic2017/ISIC_0012086"]
    assert isic["label"] == DX_CODES.index("bkl") and isic["isic2017"] == 2 and isic["streaks"] == IGNORE_INDEX
    ham = rows["ham10000/ISIC_0033902"]
    assert ham["isic2017"] == IGNORE_INDEX and all(ham[c] == IGNORE_INDEX for c in CRITERIA)
    # official splits kept; HAM split by lesion (both images of HAM_0000048 in one split)
    assert {r["image_id"] for r in dd["test"] if r["source"] == "derm7pt"} == {"derm7pt/derm7pt_0006", "derm7pt/derm7pt_0007"}
    where = {r["image_id"]: split for split, ds in dd.items() for r in ds.remove_columns("image")}
    assert where["ham10000/ISIC_0033902"] == where["ham10000/ISIC_0032774"]


def test_source_heads_subset_and_errors(ham_dir: Path, derm7pt_dir: Path) -> None:
    specs = [SourceSpec(name="ham10000", data=str(ham_dir), val_size=0.2, test_size=0.2),
             SourceSpec(name="d7", kind="derm7pt", data=str(derm7pt_dir), heads=["dx", "blue_whitish_veil"])]
    assert list(head_labels(specs)) == ["blue_whitish_veil"]
    with pytest.raises(ValueError, match="has no labels for heads"):
        SourceSpec(name="ham10000", data=str(ham_dir), heads=["dx", "streaks"])
    with pytest.raises(ValueError, match="kind must be one of"):
        SourceSpec(name="mystery", data=str(ham_dir))
    with pytest.raises(ValueError, match="unique names"):
        load_sources([specs[0], specs[0]])


def test_sampler_weights_give_each_source_its_share() -> None:
    specs = [SourceSpec(name="ham10000", data="x", weight=3.0), SourceSpec(name="derm7pt", data="y", weight=1.0)]
    sources = ["ham10000"] * 8 + ["derm7pt"] * 2
    dx = [5, 5, 5, 5, 5, 5, 4, 4, 4, IGNORE_INDEX]
    w = sampler_weights(sources, dx, specs).numpy()
    assert w[:8].sum() == pytest.approx(0.75) and w[8:].sum() == pytest.approx(0.25)
    # sqrt balancing inside HAM: a melanoma row weighs sqrt(6/2) times a nevus row
    assert w[6] / w[0] == pytest.approx(np.sqrt(3))


def test_seven_point_score_hand_computed() -> None:
    labels = {"pigment_network": "atypical", "blue_whitish_veil": "absent", "vascular_structures": "irregular",
              "streaks": "irregular", "pigmentation": "regular", "dots_and_globules": "absent",
              "regression_structures": "present"}
    assert seven_point_score_from_labels(labels) == 2 + 2 + 1 + 1
    # one-hot probabilities reproduce the label score; soft ones give the expected value
    onehot = {name: np.eye(len(CRITERIA_LABELS[name]))[[CRITERIA_LABELS[name].index(labels[name])]] for name in SEVEN_POINT}
    assert seven_point_score(onehot)[0] == pytest.approx(6.0)
    half = {name: np.full((1, len(CRITERIA_LABELS[name])), 1 / len(CRITERIA_LABELS[name])) for name in SEVEN_POINT}
    expected = 2 * (1 / 3) + 2 * (1 / 2) + 2 * (1 / 3) + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 2
    assert seven_point_score(half)[0] == pytest.approx(expected)
    with pytest.raises(KeyError, match="streaks"):
        seven_point_score({k: v for k, v in half.items() if k != "streaks"})


def test_stem_bypass_gives_the_same_logits(ham_image_paths: list[Path]) -> None:
    torch.manual_seed(0)
    model = create_efficientnet_lite("lite0", pretrained=False).eval()
    net = MultiHeadNet(model, {"isic2017": ["melanoma", "nevus", "seborrheic_keratosis"]}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = net(x)
        cached = efficientnet_stem(model)(x)
        with stem_bypassed(net, net.stem_names()):
            bypassed = net(cached)
    assert cached.shape == (2, 112, 4, 4)
    for name in full:
        torch.testing.assert_close(bypassed[name], full[name])
    assert not isinstance(model.timm_model.conv_stem, torch.nn.Identity)  # restored


def test_build_cache_views_and_resume(tmp_path: Path, ham_dir: Path) -> None:
    model = create_efficientnet_lite("lite0", pretrained=True).eval()  # random init zeroes the blocks' outputs
    pc = dict(model.config.pretrained_cfg)
    pc.update(input_size=[3, 64, 64], crop_pct=1.0, crop_mode="squash")
    model.config.pretrained_cfg = pc
    ds = load_image_dataset(ham_dir)
    out = build_cache(ds, efficientnet_stem(model), create_image_processor(model), tmp_path / "c", views=2, batch_size=5, num_workers=0)
    feats = load_cache(out)
    assert feats.shape == (2, 12, 112, 4, 4) and feats.dtype == torch.float16
    assert not torch.equal(feats[0], feats[1])  # view 1 is augmented
    stamp = (out / "view_1.safetensors").stat().st_mtime_ns
    build_cache(ds, efficientnet_stem(model), create_image_processor(model), out, views=2, num_workers=0)
    assert (out / "view_1.safetensors").stat().st_mtime_ns == stamp  # existing views are kept


@pytest.mark.slow
def test_multisource_run_resume_and_export(tmp_path: Path, specs: list[SourceSpec]) -> None:
    recipe = {
        "model": {"name": "efficientnet_lite0", "image_size": 64, "pretrained": False},
        "sources": [{k: v for k, v in vars(s).items() if k not in ("kind",)} for s in specs],
        "feature_cache": {"dir": str(tmp_path / "cache"), "views": 2},
        "head_loss_weights": {"derm7pt": 0.5}, "metric_for_best_model": "melanoma_auc_mean",
        "batch_size": 4, "eval_batch_size": 8, "epochs": 2, "learning_rate": 1e-3, "report_to": "none",
    }
    config = tmp_path / "ms.yaml"
    config.write_text(json.dumps(recipe))
    out = tmp_path / "run"
    args = ["--config", str(config), "--output_dir", str(out), "--num_workers", "0"]
    main([*args, "--max_steps", "2"])  # stops after 2 steps: one (short) epoch of 2
    state = json.loads((complete_checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert state["completed_steps"] == 2 and state["epoch"] == 1
    main([*args, "--resume_from_checkpoint", "latest"])
    result = json.loads((out / "val_metrics.json").read_text())
    manifest = json.loads((out / "split_manifest.json").read_text())
    steps_per_epoch = manifest["sizes"]["train"] // 4
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    assert result["history"][-1]["step"] == 2 + steps_per_epoch  # resumed at epoch 1, not from scratch
    assert {s["name"] for s in manifest["sources"]} == {"ham10000", "isic2017", "derm7pt"}
    assert not set(manifest["train"]) & set(manifest["test"])
    # the shipped folder is a stock TimmWrapper with the dx head only, its temperature folded into the head
    net = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(net, TimmWrapperForImageClassification)
    assert [net.config.id2label[i] for i in range(7)] == list(DX_CODES)
    assert net.config.folded_temperature == pytest.approx(result["calibration"]["temperatures"]["dx"])
    assert unfolded_temperatures(net.config) == {} and net.config.melanoma_threshold is not None
    assert not any("aux_heads" in k for k in load_file(out / "model.safetensors"))
    # frozen stem: the exported stem equals the initial (random, seeded) one, the top was trained
    from train.features import efficientnet_stem_names

    initial, _ = initial_model("efficientnet_lite0", 64)
    stem = tuple(f"timm_model.{n}." for n in efficientnet_stem_names(initial))
    exported = load_file(out / "model.safetensors")
    init = initial.state_dict()
    stem_keys = [k for k in exported if k.startswith(stem)]
    assert stem_keys and all(torch.equal(exported[k], init[k]) for k in stem_keys)
    top = [k for k in exported if not k.startswith(stem) and k.endswith("weight") and "bn" not in k]
    assert not torch.equal(exported["timm_model.classifier.weight"], init["timm_model.classifier.weight"])
    changed = [k for k in top if not torch.equal(exported[k], init[k])]
    assert len(changed) > len(top) // 2, (len(changed), len(top))
    # the best epoch's weights (kept for export) include the training-only auxiliary heads
    best = load_file(out / "best.safetensors")
    assert any(k.startswith("aux_heads.") for k in best)


def test_build_cache_refuses_other_augmentation(tmp_path: Path, ham_dir: Path) -> None:
    model = create_efficientnet_lite("lite0", pretrained=False).eval()
    pc = dict(model.config.pretrained_cfg)
    pc.update(input_size=[3, 32, 32], crop_pct=1.0, crop_mode="squash")
    model.config.pretrained_cfg = pc
    ds = load_image_dataset(ham_dir)
    stem, processor = efficientnet_stem(model), create_image_processor(model)
    build_cache(ds, stem, processor, tmp_path / "c", views=1, augment={"hue": 0.0}, num_workers=0)
    with pytest.raises(ValueError, match="augment"):
        build_cache(ds, stem, processor, tmp_path / "c", views=2, augment={"hue": 0.1}, num_workers=0)


@pytest.mark.slow
def test_multisource_hybrid_vit_ships_every_head(tmp_path: Path, specs: list[SourceSpec], derm7pt_dir: Path) -> None:
    """A tiny hybrid MelanomaViT: trained on cached Lite0 stem features, exported with all heads and
    their temperatures; evaluate.py reports the seven-point criteria on the Derm7pt layout."""
    import subprocess
    import sys

    recipe = {
        "model": {"name": "melanoma_vit", "kwargs": {
            "image_size": 64, "patch_size": 16, "patch_embedding_type": "hybrid", "backbone": "tf_efficientnet_lite0",
            "backbone_stage": 4, "backbone_channels": 112, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 37}},
        "sources": [{k: v for k, v in vars(s).items() if k != "kind"} for s in specs],
        "feature_cache": {"dir": str(tmp_path / "cache"), "views": 2},
        "batch_size": 4, "eval_batch_size": 8, "epochs": 1, "learning_rate": 1e-3, "report_to": "none",
    }
    config = tmp_path / "hybrid.yaml"
    config.write_text(json.dumps(recipe))
    out = tmp_path / "run"
    main(["--config", str(config), "--output_dir", str(out), "--num_workers", "0"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "melanoma_vit" and cfg["patch_embedding_type"] == "hybrid"
    assert set(cfg["extra_heads"]) == {"isic2017", "derm7pt", *CRITERIA}
    assert set(cfg["folded_head_temperatures"]) == set(cfg["extra_heads"]) and cfg["melanoma_threshold"] is not None
    assert cfg["folded_temperature"] > 0 and unfolded_temperatures(cfg) == {} and "head_temperatures" not in cfg
    # the stem kept its ImageNet weights (frozen, never trained) and ships in the safetensors
    stem_keys = [k for k in load_file(out / "model.safetensors") if k.startswith("vit.embeddings.patch_embed.stem.")]
    assert stem_keys
    # remote code in a fresh process that never imports the project: every head comes back
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForImageClassification\n"
        f"net = AutoModelForImageClassification.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "probs = net.predict_heads(torch.randn(2, 3, 64, 64))\n"
        "print(json.dumps({k: list(v.shape) for k, v in probs.items()}))\n"
    )
    shapes = json.loads(subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, capture_output=True,
                                       text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout.strip().splitlines()[-1])
    assert shapes["dx"] == [2, 7] and shapes["pigment_network"] == [2, 3] and shapes["isic2017"] == [2, 3]
    # evaluate.py: criteria AUCs and the checklist score on the Derm7pt layout (rows without dx skipped)
    from train.evaluate import main as evaluate_main

    metrics = evaluate_main(["--model", str(out), "--data", str(derm7pt_dir), "--split", "all",
                             "--output-dir", str(tmp_path / "eval"), "--bootstrap", "20"])
    assert metrics["n"] == 7  # 8 rows, melanosis has no dx
    seven = metrics["seven_point"]
    assert set(seven["criteria"]) == set(CRITERIA)
    assert seven["criteria"]["pigment_network"]["n_positive"] == 3
    assert 0.0 <= seven["seven_point_score_melanoma_auc"] <= 1.0
    # per-dataset heads: each head's own "melanoma" class scored against the same labels, by hand
    from sklearn.metrics import roc_auc_score

    from model.imageio import load_image
    from model.loading import load_classifier

    assert set(metrics["heads"]) == {"isic2017", "derm7pt"}
    # one epoch leaves the derm7pt head near-uniform (AUC from float noise): give it distinct outputs first
    net, processor = load_classifier(out)
    torch.manual_seed(0)
    torch.nn.init.normal_(net.extra_heads["derm7pt"].weight, std=1.0)
    net.save_pretrained(tmp_path / "spread")
    processor.save_pretrained(tmp_path / "spread")
    metrics = evaluate_main(["--model", str(tmp_path / "spread"), "--data", str(derm7pt_dir), "--split", "all",
                             "--output-dir", str(tmp_path / "eval"), "--bootstrap", "20"])
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    paths = pd.read_csv(derm7pt_dir / "labels.csv").set_index("case_id").loc[preds["image_id"], "path"]
    pixels = processor(images=[load_image(derm7pt_dir / p) for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        head = net(pixel_values=pixels).head_logits["derm7pt"].softmax(-1)[:, cfg["extra_heads"]["derm7pt"].index("melanoma")]
    expected = roc_auc_score((preds["label"] == "mel").astype(int), head.numpy())
    assert metrics["heads"]["derm7pt"]["melanoma_auc"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_multisource_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path: Path, specs: list[SourceSpec],
                                                                           script_env: dict[str, str]) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    recipe = {
        "model": {"name": "efficientnet_lite0", "image_size": 64, "pretrained": False},
        "sources": [{k: v for k, v in vars(s).items() if k != "kind"} for s in specs],
        "feature_cache": {"dir": str(tmp_path / "cache"), "views": 2},
        "batch_size": 2, "eval_batch_size": 8, "epochs": 2, "learning_rate": 1e-3, "checkpointing_steps": 1,
        "metric_for_best_model": "melanoma_auc_mean", "report_to": "none",
    }
    config = tmp_path / "ms.yaml"
    config.write_text(json.dumps(recipe))

    def args(out: Path) -> list[str]:
        return ["--config", str(config), "--output_dir", str(out), "--num_workers", "0", "--num_threads", "1"]

    reference = tmp_path / "reference"
    main(args(reference))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(root / "train" / "train.py"), *args(out)], cwd=root, env=script_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while True:
            done = complete_checkpoints(out)
            if done:
                state = json.loads((done[-1] / "trainer_state.json").read_text())
                if state["epoch"] == 0 and state["batches_in_epoch"] >= 2:
                    break
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no mid-epoch checkpoint"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model.safetensors").exists()  # killed before the export
    main([*args(out), "--resume_from_checkpoint", "latest"])
    ref = json.loads((reference / "val_metrics.json").read_text())
    got = json.loads((out / "val_metrics.json").read_text())
    assert [h["step"] for h in got["history"]] == [h["step"] for h in ref["history"]]
    for ref_epoch, got_epoch in zip(ref["history"], got["history"]):
        assert got_epoch["melanoma_auc_mean"] == pytest.approx(ref_epoch["melanoma_auc_mean"], abs=1e-6)
    ref_w, got_w = load_file(reference / "best.safetensors"), load_file(out / "best.safetensors")
    assert got["best"] == ref["best"]
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_pure_vit_distilled_from_a_teacher_on_its_cached_features(tmp_path: Path, specs: list[SourceSpec]) -> None:
    """A tiny pure MelanomaViT on a pixel cache, distilled from a Lite0 that reads its own stem cache:
    the distillation targets equal the teacher's full forward on its processor view; the pixel cache
    holds the student's processor view; a teacher cache of other rows is refused."""
    from model.loading import load_classifier
    from train.multisource import TEACHER_LOGITS

    sources = [{k: v for k, v in vars(s).items() if k != "kind"} for s in specs]
    teacher = {
        "model": {"name": "efficientnet_lite0", "image_size": 64, "pretrained": False},
        "sources": sources, "feature_cache": {"dir": str(tmp_path / "teacher_cache"), "views": 1},
        "batch_size": 4, "eval_batch_size": 8, "epochs": 1, "report_to": "none",
    }
    (tmp_path / "teacher.yaml").write_text(json.dumps(teacher))
    main(["--config", str(tmp_path / "teacher.yaml"), "--output_dir", str(tmp_path / "teacher"), "--num_workers", "0"])

    student = {
        "model": {"name": "melanoma_vit", "kwargs": {
            "image_size": 32, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 37, "use_distillation_token": True}},
        "distillation": {"teachers": [{"model": str(tmp_path / "teacher"), "cache": str(tmp_path / "teacher_cache")}],
                         "kind": "soft", "alpha": 0.5, "temperature": 2.0},
        "sources": sources, "feature_cache": {"dir": str(tmp_path / "pixels"), "views": 2, "dihedral": True},
        "batch_size": 4, "eval_batch_size": 8, "epochs": 1, "report_to": "none",
    }
    (tmp_path / "student.yaml").write_text(json.dumps(student))
    out = tmp_path / "student"
    main(["--config", str(tmp_path / "student.yaml"), "--output_dir", str(out), "--num_workers", "0"])

    train_ds = load_sources(specs)["train"]
    images = [img.convert("RGB") for img in train_ds["image"]]
    net, processor = load_classifier(tmp_path / "teacher")
    with torch.no_grad():
        expected = torch.log_softmax(net(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]).logits, -1)
    targets = load_file(out / TEACHER_LOGITS)["logits"]
    assert targets.shape == (len(train_ds), len(DX_CODES))
    assert torch.allclose(targets, expected, atol=2e-2)  # the cache is fp16

    vit, vit_processor = load_classifier(out)
    assert vit.config.model_type == "melanoma_vit" and vit.config.patch_embedding_type == "linear"
    assert vit.config.use_distillation_token and vit.config.melanoma_threshold is not None
    pixels = load_cache(tmp_path / "pixels" / "train")
    assert pixels.shape[:3] == (2, len(train_ds), 3) and pixels.shape[-1] == 32
    view0 = vit_processor(images=images, return_tensors="pt")["pixel_values"]
    diff = (pixels[0].float() - view0).abs()
    assert float(diff.mean()) < 1e-3 and float(diff.max()) < 0.05, (float(diff.mean()), float(diff.max()))

    # the targets record their teachers: a rerun with another teacher list recomputes them
    from safetensors import safe_open

    with safe_open(str(out / TEACHER_LOGITS), "pt") as f:
        assert json.loads(f.metadata()["teachers"]) == student["distillation"]["teachers"]
    # a teacher cache built for other rows is refused with the reason
    student["distillation"]["teachers"][0]["cache"] = str(tmp_path / "pixels")
    (tmp_path / "bad.yaml").write_text(json.dumps(student))
    with pytest.raises(ValueError, match="does not fit"):
        main(["--config", str(tmp_path / "bad.yaml"), "--output_dir", str(tmp_path / "bad"), "--num_workers", "0"])
    with pytest.raises(ValueError, match="does not fit"):  # not the old targets of the same folder either
        main(["--config", str(tmp_path / "bad.yaml"), "--output_dir", str(out), "--num_workers", "0"])


def test_resnet_trains_whole_on_a_pixel_cache(tmp_path: Path, specs: list[SourceSpec]) -> None:
    """A ResNet (no ImageNet weights, so nothing frozen) caches processor-sized pixels, trains every
    layer from conv1 up, and ships as a stock TimmWrapper whose processor makes the cached view 0."""
    from model.loading import load_classifier

    recipe = {
        "model": {"name": "resnet18", "image_size": 32, "pretrained": False},
        "sources": [{k: v for k, v in vars(s).items() if k != "kind"} for s in specs],
        "feature_cache": {"dir": str(tmp_path / "pixels"), "views": 2, "dihedral": True},
        "batch_size": 4, "eval_batch_size": 8, "epochs": 1, "learning_rate": 1e-2, "report_to": "none",
    }
    (tmp_path / "resnet.yaml").write_text(json.dumps(recipe))
    out = tmp_path / "run"
    initial, _ = initial_model("resnet18", 32)
    main(["--config", str(tmp_path / "resnet.yaml"), "--output_dir", str(out), "--num_workers", "0"])

    net, processor = load_classifier(out)
    assert isinstance(net, TimmWrapperForImageClassification) and net.config.architecture == "resnet18"
    assert MultiHeadNet(net, {}).stem_names() == ()
    assert not torch.equal(net.timm_model.conv1.weight, initial.timm_model.conv1.weight)  # the stem trained
    train_ds = load_sources(specs)["train"]
    pixels = load_cache(tmp_path / "pixels" / "train")
    assert pixels.shape[:3] == (2, len(train_ds), 3) and pixels.shape[-2:] == (32, 32)
    view0 = processor(images=[img.convert("RGB") for img in train_ds["image"]], return_tensors="pt")["pixel_values"]
    diff = (pixels[0].float() - view0).abs()
    assert float(diff.mean()) < 1e-3 and float(diff.max()) < 0.05, (float(diff.mean()), float(diff.max()))


@pytest.mark.slow
def test_two_cpu_processes_give_the_metrics_of_one(tmp_path: Path, specs: list[SourceSpec], script_env: dict[str, str]) -> None:
    """The same multi-source recipe on cached features in 2 processes (batch 2 each) and in 1 process
    (batch 2, 2 accumulation steps): the same images per update (accelerate shards whole batches:
    3 per process and epoch against 6), so the same validation metrics."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    recipe = {
        "model": {"name": "efficientnet_lite0", "image_size": 64, "pretrained": False},
        "sources": [{k: v for k, v in vars(s).items() if k != "kind"} for s in specs],
        "feature_cache": {"dir": str(tmp_path / "cache"), "views": 2},
        "batch_size": 2, "eval_batch_size": 4, "epochs": 4, "learning_rate": 2e-2, "report_to": "none",
    }
    config = tmp_path / "ms.yaml"
    config.write_text(json.dumps(recipe))
    runs = {}
    for processes, accumulation in ((1, 2), (2, 1)):
        out = tmp_path / f"p{processes}"
        launch = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", str(root / "train" / "train.py"), "--config", str(config),
               "--output_dir", str(out), "--num_workers", "0", "--num_threads", "1",
               "--set", f"gradient_accumulation_steps={accumulation}"]
        proc = subprocess.run(cmd, cwd=root, env={**script_env, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for rank in range(processes):  # every rank ran and read its share of the batches
            assert f"process {rank} of {processes}:" in proc.stderr, proc.stderr[-3000:]
        runs[processes] = json.loads((out / "val_metrics.json").read_text())
        assert runs[processes]["num_processes"] == processes
    one, two = runs[1], runs[2]
    assert [h["step"] for h in one["history"]] == [h["step"] for h in two["history"]]
    assert one["history"][-1]["loss"] < one["history"][0]["loss"] - 0.02  # it learnt: the match is not of a constant
    for a, b in zip(one["history"], two["history"]):
        assert b["n"] == a["n"]  # every validation image once, none doubled by the padding of a shard
        # measured: equal to the last digit (2026-12-05); the tolerance allows reduction-order noise
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), (a, b)
        assert b["melanoma_auc_mean"] == pytest.approx(a["melanoma_auc_mean"], abs=0.05), (a, b)


def test_full_fine_tuning_on_image_batches_unfreezes_the_backbone(tmp_path: Path, specs: list[SourceSpec]) -> None:
    """No feature_cache: image batches, every head, the whole network trained after a head-only
    warm-up (freeze_backbone, unfreeze_every in steps); no cache is written."""

    recipe = {
        "model": {"name": "efficientnet_lite0", "image_size": 64, "pretrained": False},
        "sources": [{k: v for k, v in vars(s).items() if k != "kind"} for s in specs],
        "augmentation": {"crop_scale": [0.5, 1.0]},
        "freeze_backbone": 2, "unfreeze_every": 0, "freeze_unit": "steps",  # head only for 2 steps, then all
        "batch_size": 4, "eval_batch_size": 8, "max_steps": 8, "learning_rate": 1e-2, "report_to": "none",
    }
    (tmp_path / "full.yaml").write_text(json.dumps(recipe))
    out = tmp_path / "full"
    initial, _ = initial_model("efficientnet_lite0", 64)
    main(["--config", str(tmp_path / "full.yaml"), "--output_dir", str(out), "--num_workers", "0"])
    assert not list(out.rglob("view_*.safetensors"))
    result = json.loads((out / "val_metrics.json").read_text())
    assert result["steps"] == 8 and set(result["heads"]) == {"dx", "isic2017", "derm7pt", *CRITERIA}
    trained = load_file(out / "model.safetensors")
    assert not torch.equal(trained["timm_model.conv_stem.weight"], initial.timm_model.conv_stem.weight)  # the stem trained
    assert not any(k.startswith("aux_heads") for k in trained)


@pytest.mark.parametrize(("change", "message"), [
    ({"data": "../shared/data/isic2017"}, r"\['data'\] are single-source keys"),
    ({"max_train_samples": 10}, r"max_train_samples'\] are single-source keys"),
    ({"augmentation": {"mixup_alpha": 0.2}}, "mixup_alpha / cutmix_alpha"),
    ({"feature_cache": {"dir": "x", "view": 2}}, r"unknown feature_cache key\(s\) \['view'\]"),
    ({"distillation": {"teacher": "models/efficientnet-lite2"}}, "distillation.teachers"),
    ({"head_loss_weights": {"streak": 0.2}}, r"head_loss_weights \['streak'\]: no source"),
])
def test_multisource_recipe_refuses_keys_it_would_ignore(change: dict, message: str, specs: list[SourceSpec]) -> None:
    from train.train import _build, _validate, TrainConfig

    raw = {"sources": [{k: v for k, v in vars(s).items() if k != "kind"} for s in specs], **change}
    with pytest.raises(ValueError, match=message):
        _validate(_build(TrainConfig, raw, "recipe"))


@pytest.mark.parametrize("key", ["feature_cache", "head_loss_weights"])
def test_single_source_recipe_refuses_multisource_keys(key: str) -> None:
    from train.train import _build, _validate, TrainConfig

    with pytest.raises(ValueError, match=f"{key} is for multi-source recipes"):
        _validate(_build(TrainConfig, {key: {"dir": "x"} if key == "feature_cache" else {"dx": 1.0}}, "recipe"))


def test_logit_adjusted_training_ships_calibrated_logits_and_the_balanced_decision(tmp_path: Path, specs: list[SourceSpec],
                                                                                   ham_image_paths: list[Path]) -> None:
    """logit_adjustment: the head trains on logits + tau * log prior; the export puts the prior back
    into the bias (logits = (f + offset) / T) and stores offset / T as dx_decision_offsets, so
    logits - offsets = f / T: the balanced scores the head learnt."""
    from PIL import Image

    from model.classifier import Classifier

    recipe = {
        "model": {"name": "efficientnet_lite0", "image_size": 64, "pretrained": False},
        "sources": [{k: v for k, v in vars(s).items() if k != "kind"} for s in specs],
        "feature_cache": {"dir": str(tmp_path / "cache"), "views": 1}, "logit_adjustment": 1.0,
        "metric_for_best_model": "melanoma_auc_mean",
        "batch_size": 4, "eval_batch_size": 8, "epochs": 1, "learning_rate": 1e-3, "report_to": "none",
    }
    (tmp_path / "la.yaml").write_text(json.dumps(recipe))
    out = tmp_path / "la"
    main(["--config", str(tmp_path / "la.yaml"), "--output_dir", str(out), "--num_workers", "0"])
    result = json.loads((out / "val_metrics.json").read_text())
    temperature = result["calibration"]["temperatures"]["dx"]
    exported = AutoModelForImageClassification.from_pretrained(out).eval()
    offsets = torch.tensor([exported.config.dx_decision_offsets[c] for c in DX_CODES])
    # the trained weights before export: best.safetensors (the stem was bypassed, so it is the seeded init's)
    trained, processor = initial_model("efficientnet_lite0", 64)
    best = {k.removeprefix("model."): v for k, v in load_file(out / "best.safetensors").items() if k.startswith("model.")}
    trained.load_state_dict({**trained.state_dict(), **best})
    raw = MultiHeadNet(trained, {})
    pixels = processor(images=[Image.open(p).convert("RGB") for p in ham_image_paths[:4]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        f = raw.eval()(pixels)["dx"]
        z = exported(pixel_values=pixels).logits
    torch.testing.assert_close(z - offsets, f / temperature, atol=1e-4, rtol=1e-4)
    assert float((offsets - offsets.mean()).abs().max()) > 0.1  # the prior is not flat: the rule changes something
    # the app's top class is the balanced decision, P(mel) the calibrated softmax
    prediction = Classifier(out).predict([Image.open(ham_image_paths[0]).convert("RGB")])[0]
    assert prediction.label == DX_CODES[int((z[0] - offsets).argmax())]
    assert prediction.probabilities["mel"] == pytest.approx(float(z[0].softmax(-1)[DX_CODES.index("mel")]), abs=1e-5)
