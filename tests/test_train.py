"""train/train.py: parameter groups, freezing, schedules, imbalance, real runs (accelerate,
SIGKILL + resume, distillation) on the fixture images with tiny MelanomaViTs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file
from accelerate.utils import set_seed
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessor

from model import MelanomaViTConfig, MelanomaViTForImageClassification
from model.baselines import create_resnet
from model.labels import DX_CODES
from train.balance import class_counts
from train.data import load_image_dataset
from train.losses import make_criterion
from train.splits import read_manifest
from train.train import (
    TRAINER_STATE,
    EpochSeededSampler,
    ModelArgs,
    TrainConfig,
    apply_freezing,
    complete_checkpoints,
    create_model,
    create_scheduler,
    imbalance_weights,
    load_config,
    main,
    parameter_blocks,
    parse_args,
    resolve_checkpoint,
    trainable_block_count,
    weight_decay_groups,
    write_trainer_state,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train" / "train.py"
from conftest import TINY_VIT, tiny_vit  # noqa: E402


@pytest.fixture()
def tiny_config(tmp_path: Path, ham_dir: Path) -> Path:
    """A tiny MelanomaViT recipe on the 12 fixture images (5 train / 5 validation / 2 test)."""
    cfg = {
        "model": {"name": "melanoma_vit", "kwargs": {**TINY_VIT, "drop_path_rate": 0.1}},
        "data": str(ham_dir),
        "val_size": 0.25,
        "test_size": 0.2,
        "epochs": 2,
        "batch_size": 2,
        "eval_batch_size": 4,
        "learning_rate": 3e-3,
        "warmup_steps": 1,
        "report_to": "none",
        "checkpointing_steps": 1,
        "checkpoints_total_limit": 3,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------ config
def test_config_overrides_and_errors(tiny_config: Path) -> None:
    cfg = load_config(tiny_config, ["learning_rate=1e-4", "model.kwargs.hidden_size=64", "distillation.kind=soft"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.learning_rate == 1e-4 and cfg.model.kwargs["hidden_size"] == 64 and cfg.distillation.kind == "soft"
    assert cfg.model.kwargs["patch_size"] == 8  # untouched keys survive
    with pytest.raises(ValueError, match="unknown key"):
        load_config(tiny_config, ["lr=1e-4"])
    with pytest.raises(ValueError, match="scheduler must be one of"):
        load_config(tiny_config, ["scheduler=exponential"])
    with pytest.raises(ValueError, match="imbalance must be one of"):
        load_config(tiny_config, ["imbalance=oversample"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(tiny_config, ["learning_rate"])


@pytest.mark.parametrize("flag", ["--output_dir", "--output-dir"])
def test_output_dir_flag_in_both_spellings(flag: str, capsys) -> None:
    assert parse_args([flag, "runs/x"]).output_dir == "runs/x"
    with pytest.raises(SystemExit):
        parse_args(["--config", "c.yaml"])
    assert "required: --output_dir" in capsys.readouterr().err  # the documented spelling


def test_help_answers_before_torch_is_imported(script_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", str(TRAIN_PY), "--help"], env=script_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--output_dir" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in imported  # -X importtime did report
    assert imported.isdisjoint({"torch", "transformers", "timm", "accelerate", "sklearn", "model"})


def test_recipe_configs_load() -> None:
    recipes = {p.stem: load_config(p) for p in sorted((ROOT / "train" / "configs").glob("*.yaml"))}
    names = {"melanoma_vit_scratch", "melanoma_vit_distill", "resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite2"}
    assert names <= set(recipes)
    assert recipes["melanoma_vit_distill"].model.kwargs["use_distillation_token"] is True
    assert recipes["melanoma_vit_distill"].distillation.teacher
    assert recipes["efficientnet_lite0"].model.pretrained is True
    assert recipes["efficientnet_lite2"].model.image_size == 260 and recipes["efficientnet_lite2"].model.pretrained is True


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_create_model_dispatches_efficientnet_lite_names(variant: str) -> None:
    id2label = dict(enumerate(DX_CODES))
    model, processor = create_model(ModelArgs(name=f"efficientnet_{variant}", image_size=64, pretrained=False), id2label)
    assert model.config.architecture == f"tf_efficientnet_{variant}"
    assert processor.data_config["input_size"] == (3, 64, 64) and processor.data_config["mean"] == (0.5, 0.5, 0.5)
    assert model(torch.zeros(2, 3, 64, 64)).logits.shape == (2, len(DX_CODES))


# ------------------------------------------------------------------------------------ optimizer
def _group_names(model: torch.nn.Module, groups: list[dict]) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


def test_weight_decay_groups() -> None:
    model = tiny_vit(use_distillation_token=True)
    model.vit.embeddings.requires_grad_(False)  # frozen parameters are grouped too (unfreezing keeps the optimizer)
    decay, no_decay = weight_decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decay_names, no_decay_names = _group_names(model, [decay, no_decay])
    every = {n for n, _ in model.named_parameters()}
    assert decay_names.isdisjoint(no_decay_names) and decay_names | no_decay_names == every
    # Exactly the model's no_weight_decay() (cls/dist tokens, position embeddings) and 1-D tensors.
    one_d = {n for n, p in model.named_parameters() if p.ndim <= 1}
    assert no_decay_names == one_d | model.no_weight_decay()
    assert model.no_weight_decay() == {"vit.embeddings.cls_token", "vit.embeddings.dist_token", "vit.embeddings.pos_embed"}
    assert {"vit.norm.weight", "head.bias"} <= no_decay_names
    assert "vit.encoder.blocks.0.attn.qkv.weight" in decay_names and "head.weight" in decay_names
    assert "vit.embeddings.patch_embed.proj.weight" in decay_names

    # Wrapped (multi-source training's MultiHeadNet): the same parameters under the wrapper's prefix.
    wrapper = torch.nn.ModuleDict({"model": model, "aux": torch.nn.Linear(4, 2)})
    wrapped_decay, wrapped_no_decay = _group_names(wrapper, weight_decay_groups(wrapper, 0.05))
    assert wrapped_no_decay == {f"model.{n}" for n in no_decay_names} | {"aux.bias"}
    assert wrapped_decay == {f"model.{n}" for n in decay_names} | {"aux.weight"}


def test_weight_decay_groups_use_timm_no_weight_decay() -> None:
    resnet = create_resnet("resnet18", pretrained=False)  # timm ResNet: no no_weight_decay(), 1-D tensors only
    decay, no_decay = _group_names(resnet, weight_decay_groups(resnet, 0.05))
    assert no_decay == {n for n, p in resnet.named_parameters() if p.ndim <= 1} and "timm_model.conv1.weight" in decay
    # A timm model with its own no_weight_decay() (e.g. a ViT): its patterns under TimmWrapper's prefix.
    resnet.timm_model.no_weight_decay = lambda: {"conv1.weight", "layer4.*.conv2.weight"}  # fnmatch, as timm reads them
    decay, no_decay = _group_names(resnet, weight_decay_groups(resnet, 0.05))
    assert {"timm_model.conv1.weight", "timm_model.layer4.0.conv2.weight", "timm_model.layer4.1.conv2.weight"} <= no_decay
    assert "timm_model.layer4.0.conv1.weight" in decay and "timm_model.layer3.0.conv2.weight" in decay


def test_schedulers() -> None:
    def lrs(**kw) -> list[float]:
        cfg = TrainConfig(learning_rate=1.0, **kw)
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = create_scheduler(cfg, opt, max_steps=10, updates_per_epoch=2)
        out = []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cos = lrs(scheduler="cosine", warmup_steps=2)
    assert cos[0] == 0.0 and cos[1] == pytest.approx(0.5) and cos[2] == pytest.approx(1.0)
    assert cos[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    step = lrs(scheduler="step", step_size_epochs=2, step_gamma=0.1)  # decays every 4 updates
    assert step[:4] == [1.0] * 4 and step[4] == pytest.approx(0.1) and step[8] == pytest.approx(0.01)
    restarts = lrs(scheduler="cosine_with_restarts", restart_cycles=2)
    assert restarts[0] == pytest.approx(1.0) and restarts[5] == pytest.approx(1.0) and restarts[4] < 0.2


# ------------------------------------------------------------------------------------ freezing
HYBRID = dict(patch_size=16, patch_embedding_type="hybrid", backbone="tf_efficientnet_lite0", backbone_stage=4,
              backbone_channels=112)  # fmt: skip


@pytest.mark.parametrize("variant", [{}, HYBRID], ids=["linear", "hybrid"])
def test_parameter_blocks_order(variant: dict) -> None:
    vit = tiny_vit(use_distillation_token=True, extra_heads={"streaks": ["absent", "present"]}, **variant)
    blocks = parameter_blocks(vit)
    names = [n for b in blocks for n in b]
    assert sorted(names) == sorted(n for n, _ in vit.named_parameters()) and len(set(names)) == len(names)
    assert [len(b) > 0 for b in blocks] == [True] * 4  # head, block 1, block 0, stem
    assert set(blocks[0]) == {n for n, _ in vit.named_parameters() if n.startswith(("head", "extra_heads.", "vit.norm."))}
    assert all(n.startswith("vit.encoder.blocks.1.") for n in blocks[1])
    assert all(n.startswith("vit.encoder.blocks.0.") for n in blocks[2])
    assert all(n.startswith("vit.embeddings.") for n in blocks[3])  # the hybrid CNN stem's blocks.N too
    assert {"vit.embeddings.cls_token", "vit.embeddings.dist_token", "vit.embeddings.pos_embed"} <= set(blocks[3])

    resnet = create_resnet("resnet18", pretrained=False)
    blocks = parameter_blocks(resnet)
    assert len(blocks) == 6  # fc, layer4 .. layer1, stem
    assert set(blocks[0]) == {"timm_model.fc.weight", "timm_model.fc.bias"}
    assert all(n.startswith("timm_model.layer4.") for n in blocks[1])
    assert "timm_model.conv1.weight" in blocks[-1]


def test_unfreezing_schedule_and_frozen_params_unchanged() -> None:
    # warm-up of 2 (epochs or steps) head-only, then one more block every 3.
    counts = [trainable_block_count(p, n_blocks=4, freeze_backbone=2, unfreeze_every=3) for p in range(12)]
    assert counts == [1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4]
    assert trainable_block_count(5, 4, freeze_backbone=2, unfreeze_every=0) == 4  # all at once
    assert trainable_block_count(0, 4, freeze_backbone=0, unfreeze_every=3) == 4  # off

    model = tiny_vit().train()
    blocks = parameter_blocks(model)
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=1e-2)  # every param, frozen ones too
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 4])
    for n_trainable in (1, 2):
        apply_freezing(model, blocks, n_trainable)
        trainable = {n for b in blocks[:n_trainable] for n in b}
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        F.cross_entropy(model(x).logits, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            if n in trainable:
                assert not torch.equal(p, before[n]), n  # trained (weight decay alone would move it too)
            else:
                assert torch.equal(p, before[n]), n  # frozen: no gradient, no decay, no update


def test_frozen_batchnorm_stats_stay() -> None:
    resnet = create_resnet("resnet18", pretrained=False).train()
    apply_freezing(resnet, parameter_blocks(resnet), 1)
    stem_bn = resnet.timm_model.bn1
    head_side_bn = resnet.timm_model.layer4[1].bn2
    assert not stem_bn.training and not head_side_bn.training  # only fc trains: every BN frozen
    apply_freezing(resnet, parameter_blocks(resnet), 2)
    assert head_side_bn.training and not stem_bn.training


# ------------------------------------------------------------------------------------ imbalance
def test_imbalance_selection(ham_dir: Path) -> None:
    ds = load_image_dataset(ham_dir)
    counts = torch.tensor(class_counts(ds), dtype=torch.float64)  # nv 4, mel 3, others 1
    class_w, sample_w = imbalance_weights("class_weights", ds)
    assert sample_w is None
    torch.testing.assert_close(class_w.double(), counts.sum() / (len(counts) * counts))  # sklearn "balanced"
    criterion = make_criterion(0.0, 0.0, class_w)
    assert isinstance(criterion, torch.nn.CrossEntropyLoss) and torch.equal(criterion.weight, class_w)

    class_w, sample_w = imbalance_weights("sampler", ds)
    assert class_w is None and sample_w.shape == (len(ds),)
    labels = torch.tensor(ds["label"])
    sampler = EpochSeededSampler(len(ds), seed=0, weights=sample_w)
    drawn = torch.cat([labels[[i for _, _, i in sampler]] for sampler.epoch in range(300)])  # 3600 draws
    share = torch.bincount(drawn, minlength=7).double() / len(drawn)
    torch.testing.assert_close(share, torch.full((7,), 1 / 7, dtype=torch.float64), atol=0.03, rtol=0)
    assert imbalance_weights("none", ds) == (None, None)


def test_epoch_seeded_sampler_is_replayable() -> None:
    sampler = EpochSeededSampler(20, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert [(e, pos) for e, pos, _ in first] == [(1, pos) for pos in range(20)]
    assert sorted(i for _, _, i in first) == list(range(20))
    sampler.set_epoch(2)
    assert list(sampler) != first
    sampler.set_epoch(1)
    assert list(sampler) == first  # a resumed epoch sees the same order


# ------------------------------------------------------------------------------------ checkpoints
class _Killed(BaseException):
    """The process dying mid-write (SIGKILL runs no handler; nothing after it executes)."""


def _checkpoint(out: Path, index: int) -> Path:
    folder = out / "checkpoints" / f"checkpoint_{index}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")  # accelerator.save_state's files come first
    return folder


def test_trainer_state_killed_mid_write_leaves_latest_on_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    first = _checkpoint(tmp_path, 0)
    write_trainer_state(first, {"completed_steps": 2})
    assert json.loads((first / TRAINER_STATE).read_text()) == {"completed_steps": 2}
    assert sorted(p.name for p in first.iterdir()) == ["model.safetensors", TRAINER_STATE]  # no temp file left

    second = _checkpoint(tmp_path, 1)
    real_write_text = Path.write_text

    def killed_after_open(self: Path, data: str, *args, **kwargs) -> int:
        real_write_text(self, "", *args, **kwargs)  # the file exists, truncated, when the kill lands
        raise _Killed

    monkeypatch.setattr(Path, "write_text", killed_after_open)
    with pytest.raises(_Killed):
        write_trainer_state(second, {"completed_steps": 4})
    monkeypatch.undo()
    assert not (second / TRAINER_STATE).exists()  # never an empty trainer_state.json
    assert complete_checkpoints(tmp_path) == [first]
    assert resolve_checkpoint("latest", tmp_path) == first
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_checkpoint(str(second), tmp_path)

    write_trainer_state(second, {"completed_steps": 4})  # the next save over the leftover temp file
    assert resolve_checkpoint("latest", tmp_path) == second
    assert not (second / f"{TRAINER_STATE}.tmp").exists()


def test_latest_skips_an_empty_trainer_state_of_an_older_run(tmp_path: Path) -> None:
    first = _checkpoint(tmp_path, 0)
    write_trainer_state(first, {"completed_steps": 2})
    second = _checkpoint(tmp_path, 1)
    (second / TRAINER_STATE).write_text("")  # what a kill during a plain write_text left before
    assert resolve_checkpoint("latest", tmp_path) == first
    with pytest.raises(ValueError, match="no readable trainer_state.json"):
        resolve_checkpoint(str(second), tmp_path)


# ------------------------------------------------------------------------------------ real runs
def _train_args(config: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--output_dir", str(out), "--num_workers", "0", *extra]


def _accelerate_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", str(TRAIN_PY), *args]


def _env(script_env: dict[str, str]) -> dict[str, str]:
    return {**script_env, "OMP_NUM_THREADS": "1"}


@pytest.fixture()
def one_thread():
    """Tiny runs are dominated by thread synchronisation on a shared 2-core machine; one thread is
    faster and gives in-process and subprocess runs the same arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_accelerate_launch_two_steps_then_load_and_predict(tiny_config: Path, tmp_path: Path, ham_image_paths,
                                                          script_env) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        _accelerate_cmd(*_train_args(tiny_config, out, "--max_steps", "2", "--set", "report_to=tensorboard")),
        cwd=ROOT, env=_env(script_env), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "split_manifest.json",
                 "val_metrics.json", "train_config.yaml", "training_args.json", "command.txt"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "val_metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["labels"] == list(DX_CODES)
    assert set(metrics["final"]) >= {"loss", "accuracy", "balanced_accuracy", "melanoma_auc"}
    assert "accelerate launch" in (out / "command.txt").read_text()
    # TensorBoard logs where the README says: runs/X/runs/events.out.tfevents.* (not runs/X/runs/runs/).
    assert list((out / "runs").glob("events.out.tfevents.*")), sorted((out / "runs").rglob("*"))
    assert not (out / "runs" / "runs").exists()
    manifest = read_manifest(out / "split_manifest.json")
    assert len(manifest["train"]) == 5 and set(manifest["train"]).isdisjoint(manifest["validation"])

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(DX_CODES))
    inputs = processor(images=Image.open(ham_image_paths[0]).convert("RGB"), return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        probs = model(**inputs).logits.softmax(-1)
    assert probs.shape == (1, 7) and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))

    # H4's evaluation CLI reads the exported folder and the run's split manifest.
    eval_dir = tmp_path / "eval"
    data = yaml.safe_load(tiny_config.read_text())["data"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train" / "evaluate.py"), "--model", str(out), "--data", data,
         "--output-dir", str(eval_dir), "--manifest", str(out / "split_manifest.json"), "--split", "validation",
         "--bootstrap", "20"],
        cwd=ROOT, env=_env(script_env), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((eval_dir / "metrics.json").read_text())
    assert result["n"] == 5 and 0.0 <= result["accuracy"] <= 1.0


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tiny_config: Path, tmp_path: Path, one_thread,
                                                                 script_env) -> None:
    # 4 epochs x 2 updates (5 train images, batch 2, last partial batch dropped), a checkpoint after every
    # update; class-balanced sampler, augmentation, drop path and EMA all draw on RNG state that must resume.
    extra = ["--set", "epochs=4", "--set", "ema=true", "--set", "ema_decay=0.5"]
    reference = tmp_path / "reference"
    main(_train_args(tiny_config, reference, *extra))

    out = tmp_path / "killed"
    # Own session: SIGKILL goes to every process of the run, as when a job is killed.
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY), *_train_args(tiny_config, out, *extra)], cwd=ROOT, env=_env(script_env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while True:
            done = complete_checkpoints(out)
            if done and json.loads((done[-1] / TRAINER_STATE).read_text())["completed_steps"] >= 3:
                break
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint after step 3"
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model.safetensors").exists()  # killed before the export
    state = json.loads((complete_checkpoints(out)[-1] / TRAINER_STATE).read_text())
    assert 3 <= state["completed_steps"] < 8

    main(_train_args(tiny_config, out, *extra, "--resume_from_checkpoint", "latest"))
    ref_metrics = json.loads((reference / "val_metrics.json").read_text())
    got_metrics = json.loads((out / "val_metrics.json").read_text())
    assert got_metrics["steps"] == ref_metrics["steps"] == 8
    assert len(got_metrics["history"]) == 4
    for ref_epoch, got_epoch in zip(ref_metrics["history"], got_metrics["history"]):
        for key in ("loss", "accuracy", "balanced_accuracy"):
            assert got_epoch[key] == pytest.approx(ref_epoch[key], abs=1e-5), (key, ref_epoch["epoch"])
    ref_w, got_w = _weights(reference), _weights(out)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], atol=1e-5, rtol=1e-4, msg=name)


def test_freeze_warmup_run_keeps_backbone_at_init(tiny_config: Path, tmp_path: Path, one_thread) -> None:
    out = tmp_path / "frozen"
    # Head only for all 3 updates: everything but the head must equal its initial value.
    main(_train_args(tiny_config, out, "--max_steps", "3", "--set", "freeze_backbone=10", "--set", "freeze_unit=steps",
                     "--set", "checkpointing_steps=null"))
    trained = _weights(out)
    set_seed(42)  # main() seeds 42 before creating the model
    init = MelanomaViTForImageClassification(MelanomaViTConfig(**TINY_VIT, drop_path_rate=0.1))
    head = set(parameter_blocks(init)[0])
    changed = {n for n, p in init.named_parameters() if not torch.equal(trained[n], p.detach())}
    assert changed and changed <= head and "head.weight" in changed


def test_distillation_run_with_saved_teacher(tiny_config: Path, tmp_path: Path, one_thread) -> None:
    teacher_dir = tmp_path / "teacher"
    teacher = tiny_vit(image_size=48)  # another resolution: the student's pixels are resized for it
    teacher.save_pretrained(teacher_dir)
    ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(teacher_dir)
    out = tmp_path / "student"
    metrics = main(_train_args(
        tiny_config, out, "--max_steps", "2",
        "--set", "model.kwargs.use_distillation_token=true",
        "--set", f"distillation.teacher={teacher_dir}",
        "--set", "distillation.kind=soft", "--set", "distillation.temperature=2.0",
    ))
    assert math.isfinite(metrics["loss"])
    student = AutoModelForImageClassification.from_pretrained(out)
    assert student.config.use_distillation_token and student.head_dist is not None


def test_max_train_and_eval_samples_cut_the_splits_not_the_manifest(tiny_config: Path, tmp_path: Path, one_thread) -> None:
    out = tmp_path / "smoke"
    main(_train_args(tiny_config, out, "--max_train_samples", "3", "--max_eval_samples", "2",
                     "--set", "checkpointing_steps=null"))
    metrics = json.loads((out / "val_metrics.json").read_text())
    # 3 train images at batch 2 (last partial batch dropped) = 1 update per epoch, 2 epochs; 5 images give 4.
    assert metrics["steps"] == 2
    assert metrics["final"]["n"] == 2 and all(h["n"] == 2 for h in metrics["history"])
    manifest = read_manifest(out / "split_manifest.json")
    assert len(manifest["train"]) == 5 and len(manifest["validation"]) == 5  # the split itself, unchanged
    with pytest.raises(ValueError, match="max_train_samples"):
        load_config(tiny_config, ["max_train_samples=0"])
