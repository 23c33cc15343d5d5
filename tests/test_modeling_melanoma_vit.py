"""Behaviour of MelanomaViT: shapes, gradients, save/load, interpolation, attention paths,
distillation, stochastic depth, gradient checkpointing, config errors, Auto classes, remote code."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, ViTImageProcessor

import model
from model import MelanomaViTConfig, MelanomaViTForImageClassification, MelanomaViTModel
from model.configuration_melanoma_vit import DEFAULT_DX_CODES
from model.labels import DX_CODES

from conftest import TINY_VIT as TINY, edit_config_json, tiny_vit, tiny_vit_config

NUM_PATCHES = (32 // 8) ** 2


tiny_config = tiny_vit_config


def tiny_model(**overrides) -> MelanomaViTForImageClassification:
    return tiny_vit(**overrides).eval()


@pytest.fixture()
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_config_defaults_follow_label_scheme_and_vit_names():
    config = MelanomaViTConfig()
    assert DEFAULT_DX_CODES == DX_CODES  # the remote-code copy must not drift from model/labels.py
    assert [config.id2label[i] for i in range(7)] == list(DX_CODES)
    assert config.label2id["mel"] == 4
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.num_prefix_tokens == 1 and tiny_config(use_distillation_token=True).num_prefix_tokens == 2
    assert config.folded_temperature is None and config.melanoma_threshold is None
    assert not hasattr(config, "temperature") and not hasattr(config, "head_temperatures")  # one calibration form


def test_config_roundtrip_keeps_calibration_fields(tmp_path):
    tiny_config(folded_temperature=1.7, melanoma_threshold=0.25, image_size=(32, 48)).save_pretrained(tmp_path)
    loaded = MelanomaViTConfig.from_pretrained(tmp_path)
    assert loaded.folded_temperature == 1.7 and loaded.melanoma_threshold == 0.25
    assert loaded.grid_size == (4, 6) and loaded.id2label[4] == "mel"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_size=30), "divisible by num_attention_heads"),
        (dict(image_size=30), "divisible by patch_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive int"),
        (dict(intermediate_size=-4), "intermediate_size must be a positive int"),
        (dict(drop_path_rate=-0.1), "drop_path_rate must be a probability"),
        (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob must be a probability"),
        (dict(temperature=0.0), "temperature .* must be a float > 0"),  # an older config's, to migrate
        (dict(folded_temperature=-1.0), "folded_temperature must be None or a float > 0"),
        (dict(melanoma_threshold=1.5), "melanoma_threshold must be None or a probability"),
        (dict(hidden_act="gelu_typo"), "hidden_act must be one of"),
        (dict(layer_norm_eps=0), "layer_norm_eps must be > 0"),
        (dict(patch_size=(8, 8, 8)), "patch_size must be an int or a pair"),
    ],
)
def test_invalid_config_raises_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_forward_shapes_and_finite(pixels):
    out = tiny_model()(pixels, output_hidden_states=True)
    assert out.logits.shape == (3, 7) and torch.isfinite(out.logits).all()
    assert out.loss is None and out.attentions is None and out.distillation_logits is None
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert all(h.shape == (3, 1 + NUM_PATCHES, 32) for h in out.hidden_states)
    base = MelanomaViTModel(tiny_config()).eval()(pixels)
    assert base.last_hidden_state.shape == (3, 1 + NUM_PATCHES, 32) and base.pooler_output.shape == (3, 32)
    assert isinstance(tiny_model()(pixels, return_dict=False), tuple)


def test_every_parameter_gets_a_gradient(pixels):
    from train.losses import classification_loss  # the training loss: trains the distillation head too

    for distilled in (False, True):
        model_ = tiny_model(use_distillation_token=distilled).train()
        out = model_(pixels)
        loss = classification_loss(torch.nn.CrossEntropyLoss(), out.logits, torch.tensor([0, 4, 6]), out.distillation_logits)
        assert loss.ndim == 0 and torch.isfinite(loss)
        # forward(labels=...) follows the same rule (no dropout configured: the same logits)
        torch.testing.assert_close(model_(pixels, labels=torch.tensor([0, 4, 6])).loss, loss)
        loss.backward()
        missing = [n for n, p in model_.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"no gradient for {missing}"


def test_loss_is_cross_entropy_and_accepts_soft_labels(pixels):
    model_ = tiny_model(problem_type="single_label_classification")
    labels = torch.tensor([1, 4, 5])
    out = model_(pixels, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    soft = torch.nn.functional.one_hot(labels, 7).float()
    torch.testing.assert_close(model_(pixels, labels=soft).loss, out.loss)
    with pytest.raises(ValueError, match=r"class indices in \[0, 6\]"):
        model_(pixels, labels=torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match=r"labels must be \(batch,\)"):
        model_(pixels, labels=torch.tensor([0, 1]))


def test_save_load_gives_equal_logits(tmp_path, pixels):
    model_ = tiny_model(use_distillation_token=True, folded_temperature=2.0)
    model_.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = MelanomaViTForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(pixels).logits, model_(pixels).logits, rtol=0, atol=0)
    assert loaded.config.folded_temperature == 2.0  # for the record: nothing is divided at load or inference


def test_position_embedding_interpolation():
    model_ = tiny_model()
    other = torch.randn(2, 3, 48, 40)
    out = model_(other, output_attentions=True)
    n_tokens = 1 + (48 // 8) * (40 // 8)
    assert out.logits.shape == (2, 7) and torch.isfinite(out.logits).all()
    assert out.attentions[0].shape == (2, 4, n_tokens, n_tokens)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model_(other, interpolate_pos_encoding=False)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model_(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        model_(torch.randn(1, 1, 32, 32))


def test_interpolation_matches_timm_resample():
    from timm.layers import resample_abs_pos_embed

    from model.modeling_melanoma_vit import resample_pos_embed

    pos = torch.randn(1, 2 + 16, 32)
    ours = resample_pos_embed(pos, (6, 5), (4, 4), num_prefix_tokens=2)
    torch.testing.assert_close(ours, resample_abs_pos_embed(pos, (6, 5), (4, 4), num_prefix_tokens=2))
    assert resample_pos_embed(pos, (4, 4), (4, 4), 2) is pos


def test_attentions_shape_rows_and_sdpa_parity(pixels):
    for distilled in (False, True):
        model_ = tiny_model(use_distillation_token=distilled)
        n_tokens = (2 if distilled else 1) + NUM_PATCHES
        explicit = model_(pixels, output_attentions=True)
        assert len(explicit.attentions) == TINY["num_hidden_layers"]
        for weights in explicit.attentions:
            assert weights.shape == (3, 4, n_tokens, n_tokens)
            assert (weights >= 0).all()
            torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, n_tokens))
        torch.testing.assert_close(explicit.logits, model_(pixels).logits, atol=1e-5, rtol=1e-5)


def test_distillation_heads_train_vs_eval(pixels):
    model_ = tiny_model(use_distillation_token=True)
    assert model_.vit.embeddings.pos_embed.shape[1] == 2 + NUM_PATCHES
    model_.eval()
    eval_out = model_(pixels)
    tokens = model_.vit(pixels).last_hidden_state
    cls_logits, dist_logits = model_.head(tokens[:, 0]), model_.head_dist(tokens[:, 1])
    assert not torch.allclose(cls_logits, dist_logits)
    torch.testing.assert_close(eval_out.logits, (cls_logits + dist_logits) / 2)
    torch.testing.assert_close(eval_out.distillation_logits, dist_logits)

    model_.train()  # no dropout/drop-path configured, so train-mode tokens equal eval-mode tokens
    labels = torch.tensor([0, 1, 2])
    train_out = model_(pixels, labels=labels)
    torch.testing.assert_close(train_out.logits, cls_logits)
    torch.testing.assert_close(train_out.distillation_logits, dist_logits)
    # In training both heads learn the labels (train/losses.py's rule without a teacher); in eval the loss is
    # that of the averaged logits.
    both = (F.cross_entropy(cls_logits, labels) + F.cross_entropy(dist_logits, labels)) / 2
    torch.testing.assert_close(train_out.loss, both)
    model_.eval()
    torch.testing.assert_close(model_(pixels, labels=labels).loss, F.cross_entropy(eval_out.logits, labels))


def test_drop_path_only_active_in_training(pixels):
    model_ = tiny_model(drop_path_rate=0.5)
    assert model_.vit.encoder.blocks[0].drop_path1.__class__.__name__ == "Identity"  # rate 0 for block 0
    assert model_.vit.encoder.blocks[1].drop_path1.drop_prob == pytest.approx(0.5)
    torch.testing.assert_close(model_(pixels).logits, model_(pixels).logits, rtol=0, atol=0)
    model_.train()
    torch.manual_seed(0)
    runs = [model_(pixels).logits for _ in range(4)]
    assert any(not torch.allclose(runs[0], r) for r in runs[1:])


def _count_block_starts(model_) -> list[int]:
    """Pre-hooks on every block's first module: checkpointing reruns the block in backward, so calls double.
    (A pre-hook, as the recompute stops early once it has regenerated the saved tensors.)"""
    calls = []
    for block in model_.vit.encoder.blocks:
        block.norm1.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_disable` is deprecated:FutureWarning")
def test_gradient_checkpointing_same_loss_and_gradients(pixels):
    model_ = tiny_model(drop_path_rate=0.1, hidden_dropout_prob=0.1).train()
    reference = tiny_model(drop_path_rate=0.1, hidden_dropout_prob=0.1).train()
    model_.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model_.is_gradient_checkpointing
    assert all(block.gradient_checkpointing for block in model_.vit.encoder.blocks)
    calls, ref_calls = _count_block_starts(model_), _count_block_starts(reference)
    labels = torch.tensor([0, 4, 6])
    torch.manual_seed(3)
    loss = model_(pixels, labels=labels).loss
    loss.backward()
    torch.manual_seed(3)
    ref_loss = reference(pixels, labels=labels).loss
    ref_loss.backward()
    layers = TINY["num_hidden_layers"]
    assert (len(calls), len(ref_calls)) == (2 * layers, layers)  # each block recomputed once in backward
    torch.testing.assert_close(loss, ref_loss)  # same RNG: checkpoint replays dropout identically
    for (name, p), (_, q) in zip(model_.named_parameters(), reference.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4)

    model_.gradient_checkpointing_disable()
    assert not any(block.gradient_checkpointing for block in model_.vit.encoder.blocks)
    calls.clear()
    model_(pixels, labels=labels).loss.backward()
    assert len(calls) == layers


# The hybrid variant of test_hybrid_vit.py: tiny transformer on tf_efficientnet_lite0's stride-16 stage (2x2 grid).
HYBRID = dict(patch_size=16, patch_embedding_type="hybrid", backbone="tf_efficientnet_lite0", backbone_stage=4,
              backbone_channels=112)  # fmt: skip


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": False}, {"use_reentrant": True}],
                         ids=["no-checkpointing", "checkpointing", "checkpointing-reentrant"])  # fmt: skip
@pytest.mark.parametrize("variant", [{}, HYBRID], ids=["linear", "hybrid"])
def test_training_step_with_labels_reaches_every_parameter(pixels, variant, checkpointing):
    """transformers' common `test_training` / `test_training_gradient_checkpointing`: `loss.backward()` of a
    `labels` step gives every trainable parameter a finite gradient, the distillation head included. The extra
    heads (trained by train/losses.py's `masked_head_loss` on `head_logits`) are the documented exception."""
    model_ = heads_model(use_distillation_token=True, drop_path_rate=0.1, **variant).train()
    assert model_.supports_gradient_checkpointing
    calls = _count_block_starts(model_)
    if checkpointing is not None:
        model_.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        assert all(block.gradient_checkpointing for block in model_.vit.encoder.blocks)
    loss = model_(pixels, labels=torch.tensor([0, 4, 6])).loss
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    layers = TINY["num_hidden_layers"]
    assert len(calls) == (layers if checkpointing is None else 2 * layers)  # checkpointed blocks rerun in backward
    grads = {n: p.grad for n, p in model_.named_parameters() if p.requires_grad}
    extra = {n for n in grads if n.startswith("extra_heads.")}
    assert extra and all(grads[n] is None for n in extra)
    missing = [n for n, g in grads.items() if n not in extra and (g is None or not torch.isfinite(g).all())]
    assert not missing, f"no finite gradient for {missing}"
    assert model_.head_dist.weight.grad.abs().sum() > 0 and model_.vit.embeddings.dist_token.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", [{}, HYBRID], ids=["linear", "hybrid"])
def test_no_weight_decay_and_group_matcher_follow_timm(variant):
    from timm.models import group_parameters

    model_ = tiny_model(use_distillation_token=True, extra_heads={"streaks": ["absent", "present"]}, **variant)
    plain = tiny_model(**variant)
    for module, prefix in ((model_, "vit."), (model_.vit, "")):
        names = [n for n, _ in module.named_parameters()]
        assert module.no_weight_decay() == {f"{prefix}embeddings.{t}" for t in ("cls_token", "dist_token", "pos_embed")}
        assert module.no_weight_decay() <= set(names)
        groups = group_parameters(module, module.group_matcher(coarse=True))
        assert sorted(n for g in groups.values() for n in g) == sorted(names)  # each parameter exactly once
        ordered = [groups[k] for k in sorted(groups)]  # timm's order: stem first
        assert len(ordered) == 1 + TINY["num_hidden_layers"] + 1
        assert all(n.startswith(f"{prefix}embeddings.") for n in ordered[0])  # tokens, pos_embed, patch/CNN stem
        assert f"{prefix}embeddings.patch_embed.{'stem.conv_stem' if variant else 'proj'}.weight" in ordered[0]
        for i in range(TINY["num_hidden_layers"]):
            assert all(n.startswith(f"{prefix}encoder.blocks.{i}.") for n in ordered[1 + i])
        heads = {"head.weight", "head_dist.weight", "extra_heads.streaks.weight"} if prefix else set()
        assert {f"{prefix}norm.weight"} | heads <= set(ordered[-1])  # unmatched: timm's last group
    assert plain.no_weight_decay() == {"vit.embeddings.cls_token", "vit.embeddings.pos_embed"}  # only what exists


def test_builds_on_the_meta_device():
    with torch.device("meta"):
        model_ = MelanomaViTForImageClassification(tiny_config(drop_path_rate=0.2, num_hidden_layers=3))
    assert model_.head.weight.is_meta
    assert [b.drop_path1.drop_prob for b in model_.vit.encoder.blocks[1:]] == pytest.approx([0.1, 0.2])


def test_input_embeddings_are_the_patch_embeddings(pixels):
    model_ = tiny_model()
    assert model_.get_input_embeddings() is model_.vit.embeddings.patch_embed
    assert model_.vit.get_input_embeddings() is model_.vit.embeddings.patch_embed
    model_.requires_grad_(False)
    model_.head.requires_grad_(True)  # e.g. an adapter after frozen embeddings
    seen = []
    model_.vit.encoder.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].requires_grad))
    model_(pixels)
    assert seen == [False]
    model_.enable_input_require_grads()
    model_(pixels)
    assert seen == [False, True]
    model_.disable_input_require_grads()


REGRESSION_1 = ("regression", 1, lambda: torch.tensor([0.5, -1.0, 2.0]), lambda out, y: F.mse_loss(out.squeeze(), y))
SINGLE = ("single_label_classification", 3, lambda: torch.tensor([0, 2, 1]), F.cross_entropy)
MULTI = ("multi_label_classification", 3, lambda: torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 1]]),
         F.binary_cross_entropy_with_logits)


@pytest.mark.parametrize(
    ("configured", "case"),
    [
        ("regression", REGRESSION_1),
        ("regression", ("regression", 3, lambda: torch.randn(3, 3), F.mse_loss)),
        ("single_label_classification", SINGLE),
        ("multi_label_classification", MULTI),
        (None, REGRESSION_1),  # inferred as ViT does: num_labels 1 -> regression,
        (None, SINGLE),  # int64 labels -> single-label,
        (None, MULTI),  # float labels -> multi-label
    ],
)  # fmt: skip
def test_problem_types_like_vit(pixels, configured, case):
    _, num_labels, make_labels, loss_fn = case
    model_ = tiny_model(num_labels=num_labels, problem_type=configured)
    labels = make_labels()
    out = model_(pixels, labels=labels)
    torch.testing.assert_close(out.loss, loss_fn(out.logits, labels))
    assert model_.config.problem_type == configured  # inferring does not write into the config


def test_attn_implementation_eager_and_sdpa(tmp_path, pixels, monkeypatch):
    model_ = tiny_model()
    assert model_.config._attn_implementation == "sdpa"
    sdpa_logits = model_(pixels).logits
    model_.set_attn_implementation("eager")
    assert model_.config._attn_implementation == "eager"

    def no_sdpa(*args, **kwargs):
        raise AssertionError("scaled_dot_product_attention called on the eager path")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    eager_logits = model_(pixels).logits  # the eager path never calls SDPA
    torch.testing.assert_close(eager_logits, sdpa_logits, atol=1e-5, rtol=1e-5)

    model_.save_pretrained(tmp_path)
    loaded = MelanomaViTForImageClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config._attn_implementation == "eager"
    torch.testing.assert_close(loaded(pixels).logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    loaded.set_attn_implementation("sdpa")
    with pytest.raises(AssertionError, match="eager path"):  # proves the patch above would have caught SDPA
        loaded(pixels)
    out = loaded(pixels, output_attentions=True)  # weights come from the eager path whatever the setting
    assert len(out.attentions) == TINY["num_hidden_layers"] and out.attentions[0].shape == (3, 4, 17, 17)


def test_predict_proba_is_the_plain_softmax(pixels):
    """The calibration is in the head weights (folded): no config value divides the logits."""
    model_ = tiny_model(folded_temperature=2.5)
    logits = model_(pixels).logits
    torch.testing.assert_close(model_.predict_proba(pixels), torch.softmax(logits, dim=-1))
    torch.testing.assert_close(model_.predict_proba(pixels).sum(-1), torch.ones(3))


def test_auto_classes_registered(tmp_path, pixels):
    config = AutoConfig.for_model("melanoma_vit", **TINY)
    assert isinstance(config, MelanomaViTConfig)
    assert isinstance(AutoModel.from_config(config), MelanomaViTModel)
    model_ = tiny_model()
    model_.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_melanoma_vit.MelanomaViTConfig",
        "AutoModelForImageClassification": "modeling_melanoma_vit.MelanomaViTForImageClassification",
    }
    assert {"configuration_melanoma_vit.py", "modeling_melanoma_vit.py"} <= {p.name for p in tmp_path.iterdir()}
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MelanomaViTForImageClassification)
    torch.testing.assert_close(loaded(pixels).logits, model_(pixels).logits)


def _imports(nodes) -> tuple[set[str], set[str]]:
    absolute, relative = set(), set()
    for node in nodes:
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            (relative if node.level else absolute).add(node.module.split(".")[0])
    return absolute, relative


def test_remote_code_files_are_self_contained():
    """The Hub copy of these files must import nothing from this project by absolute import, and timm only
    lazily inside a `try` (transformers' remote-code import check skips those), for hybrid models."""
    root = Path(model.__file__).parent
    stdlib = {"__future__", "collections", "dataclasses", "math", "re", "typing"}
    for name in ("configuration_melanoma_vit.py", "modeling_melanoma_vit.py"):
        tree = ast.parse((root / name).read_text())
        absolute, relative = _imports(ast.walk(tree))
        top_level, _ = _imports(tree.body)
        in_try = {n for t in ast.walk(tree) if isinstance(t, ast.Try) for n in _imports(ast.walk(t))[0]}
        assert absolute <= stdlib | {"torch", "transformers", "timm"}, (name, absolute)
        assert "timm" not in top_level and ("timm" not in absolute or "timm" in in_try), name
        assert relative <= {"configuration_melanoma_vit"}, (name, relative)


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline
    folder, image_path, pixels_path = sys.argv[1:4]
    assert not any(name == "model" or name.startswith("model.") for name in sys.modules)
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(torch.load(pixels_path, weights_only=True)).logits
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True, device="cpu")
    preds = classifier(Image.open(image_path), top_k=7)
    print(json.dumps({"class": type(model).__module__, "logits": logits.tolist(), "preds": preds,
                      "leaked": sorted(m for m in sys.modules if m == "model" or m.startswith("model."))}))
    """
)


@pytest.mark.slow
def test_fresh_process_trust_remote_code_and_pipeline(tmp_path, ham_image_paths):
    """The Hub's view: remote code only. The folder is in the older calibration form (a temperature still to
    apply in config.json): the remote code's `from_pretrained` folds it, so logits and pipeline are calibrated."""
    folder = tmp_path / "melanoma-vit-tiny"
    model_ = tiny_model(use_distillation_token=True)
    model_.save_pretrained(folder)
    edit_config_json(folder, temperature=2.0)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    image_path = ham_image_paths[0]
    from PIL import Image

    pixels = processor(Image.open(image_path), return_tensors="pt")["pixel_values"]
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = model_(pixels).logits / 2.0

    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(folder), str(image_path), str(tmp_path / "pixels.pt")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["leaked"] == []
    assert "transformers_modules" in report["class"]  # the copied remote code, not this project
    torch.testing.assert_close(torch.tensor(report["logits"]), expected, atol=1e-5, rtol=1e-5)
    probs = torch.softmax(expected[0], dim=-1)
    by_label = {p["label"]: p["score"] for p in report["preds"]}
    assert set(by_label) == set(DX_CODES)
    for i, code in enumerate(DX_CODES):
        assert by_label[code] == pytest.approx(probs[i].item(), abs=1e-5)


# --- extra heads (multi-source training: one head per dataset / seven-point-checklist criterion) ---

HEADS = {
    "isic2017": ["melanoma", "nevus", "seborrheic_keratosis"],
    "pigment_network": ["absent", "typical", "atypical"],
    "streaks": ["absent", "present"],
}


def heads_model(**overrides) -> MelanomaViTForImageClassification:
    return tiny_model(extra_heads=HEADS, **overrides)


def test_extra_heads_config_roundtrip_and_output(tmp_path, pixels):
    model_ = heads_model(folded_head_temperatures={"streaks": 2.0})
    out = model_(pixels)
    assert out.logits.shape == (3, 7)  # the main (dx) head, unchanged for pipeline / Auto classes / exports
    assert list(out.head_logits) == list(HEADS)
    assert [t.shape for t in out.head_logits.values()] == [(3, 3), (3, 3), (3, 2)]
    tokens = model_.vit(pixels).last_hidden_state
    torch.testing.assert_close(out.head_logits["streaks"], model_.extra_heads["streaks"](tokens[:, 0]))
    assert tiny_model()(pixels).head_logits is None
    assert not [k for k in tiny_model().state_dict() if "extra_heads" in k]  # existing checkpoints unchanged

    model_.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["extra_heads"] == HEADS and saved["folded_head_temperatures"] == {"streaks": 2.0}
    assert "head_temperatures" not in saved
    loaded = MelanomaViTForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.extra_heads == HEADS and list(loaded.extra_heads) == list(HEADS)
    again = loaded(pixels)
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
    for name in HEADS:
        torch.testing.assert_close(again.head_logits[name], out.head_logits[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(extra_heads={"dx": ["a", "b"]}), "name 'dx' is not allowed"),
        (dict(extra_heads={"logits": ["a", "b"]}), "name 'logits' is not allowed"),
        (dict(extra_heads={"pigment-network": ["a", "b"]}), "is not allowed: use an identifier"),
        (dict(extra_heads={"items": ["a", "b"]}), "name 'items' is not allowed"),
        (dict(extra_heads={"streaks": ["present"]}), "at least 2 distinct label names"),
        (dict(extra_heads={"streaks": ["a", "a"]}), "at least 2 distinct label names"),
        (dict(extra_heads={"streaks": ["a", "b"]}, head_temperatures={"other": 1.0}), "not in extra_heads"),
        (dict(extra_heads={"streaks": ["a", "b"]}, head_temperatures={"streaks": 0.0}), "must be a float > 0"),
        (dict(extra_heads={"streaks": ["a", "b"]}, folded_head_temperatures={"other": 1.0}), "folded_head_temperatures names"),
        (dict(extra_heads={"streaks": ["a", "b"]}, folded_head_temperatures={"streaks": 0}), "must be a float > 0"),
    ],
)
def test_invalid_extra_heads_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_all_labels_masked_gives_a_zero_loss_that_backpropagates(pixels):
    model_ = heads_model().train()
    out = model_(pixels, labels=torch.full((3,), -100))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert model_.head.weight.grad is not None and not model_.head.weight.grad.any()
    # Masked labels are left out of the mean.
    plain = tiny_model()
    loss = plain(pixels, labels=torch.tensor([3, -100, 6])).loss
    torch.testing.assert_close(loss, F.cross_entropy(plain(pixels).logits[[0, 2]], torch.tensor([3, 6])))


def test_predict_heads_are_each_heads_softmax(pixels):
    model_ = heads_model(folded_temperature=1.5, folded_head_temperatures={"isic2017": 3.0})
    probs = model_.predict_heads(pixels)
    assert list(probs) == ["dx", *HEADS]
    out = model_(pixels)
    torch.testing.assert_close(probs["dx"], torch.softmax(out.logits, -1))
    for name in HEADS:  # folded or not, a head's calibrated probabilities are its softmax
        torch.testing.assert_close(probs[name], torch.softmax(out.head_logits[name], -1))
    for name, p in probs.items():
        torch.testing.assert_close(p.sum(-1), torch.ones(3), msg=name)
        assert not p.requires_grad


def test_vit_export_keeps_only_the_main_head(pixels, caplog):
    from model.convert import export_to_vit

    model_ = heads_model()
    with caplog.at_level("WARNING", logger="model.convert"):
        exported = export_to_vit(model_)
    assert "extra heads" in caplog.text and "isic2017" in caplog.text
    torch.testing.assert_close(exported(pixels).logits, model_(pixels).logits, atol=1e-5, rtol=1e-5)


HEADS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForImageClassification
    folder, pixels_path = sys.argv[1:3]
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(torch.load(pixels_path, weights_only=True))
    print(json.dumps({"class": type(model).__module__, "logits": out.logits.tolist(),
                      "head_logits": {k: v.tolist() for k, v in out.head_logits.items()},
                      "leaked": sorted(m for m in sys.modules if m == "model" or m.startswith("model."))}))
    """
)


@pytest.mark.slow
def test_fresh_process_remote_code_returns_head_logits(tmp_path, pixels):
    model_ = heads_model()
    model_.save_pretrained(tmp_path / "folder")
    torch.save(pixels, tmp_path / "pixels.pt")
    expected = model_(pixels)
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", HEADS_SCRIPT, str(tmp_path / "folder"), str(tmp_path / "pixels.pt")],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["leaked"] == [] and "transformers_modules" in report["class"]
    torch.testing.assert_close(torch.tensor(report["logits"]), expected.logits, atol=1e-5, rtol=1e-5)
    assert list(report["head_logits"]) == list(HEADS)
    for name, values in report["head_logits"].items():
        torch.testing.assert_close(torch.tensor(values), expected.head_logits[name], atol=1e-5, rtol=1e-5)
