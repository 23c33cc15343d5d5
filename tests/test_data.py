"""train/data.py, splits.py, transforms.py and balance.py on the real fixture images: every layout,
label schemes, lesion-grouped splits and manifests, corrupt files, transforms and class weights."""

import logging
import os
import pickle
import shutil
import datasets
import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from transformers import TimmWrapperImageProcessor, ViTImageProcessor

from model.geometry import processor_geometry
from model.imageio import load_image
from model.labels import BINARY_LABELS, DX_CODES
from model.modeling_melanoma_vit import IGNORE_INDEX
from train.balance import balanced_sampler_weights, class_counts, class_weights
from train.data import load_image_dataset, verify_images
from train.splits import apply_manifest, check_no_leakage, read_manifest, split_by_lesion, write_manifest
from torchvision import tv_tensors

from train.transforms import (
    AugmentConfig,
    RandomNoise,
    RandomZoomOut,
    build_batch_mixer,
    build_transforms,
    train_pipeline,
    with_image_transform,
)

MEL, NV, BKL = DX_CODES.index("mel"), DX_CODES.index("nv"), DX_CODES.index("bkl")
# Fixture rows (tests/fixtures/ham10000/HAM10000_metadata.csv).
HAM_MEL = {"ISIC_0033902", "ISIC_0032774", "ISIC_0028878"}
TWO_IMAGE_LESIONS = {"HAM_0000048": {"ISIC_0033902", "ISIC_0032774"}, "HAM_0000057": {"ISIC_0026391", "ISIC_0025122"}}


def by_id(ds: datasets.Dataset, column: str = "label") -> dict:
    return dict(zip(ds["image_id"], ds[column]))


@pytest.fixture(scope="module")
def ham(ham_dir):
    return load_image_dataset(str(ham_dir))


@pytest.fixture(scope="module")
def vit_processor():
    return ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


# ------------------------------------------------------------------------------------ layouts


def test_ham_layout_columns_and_labels(ham, ham_dir):
    meta = pd.read_csv(ham_dir / "HAM10000_metadata.csv")
    assert len(ham) == len(meta) == 12
    assert isinstance(ham.features["image"], datasets.Image)
    assert ham.features["label"].names == list(DX_CODES)
    labels = by_id(ham)
    assert {i for i, y in labels.items() if y == MEL} == HAM_MEL
    assert labels == {r.image_id: DX_CODES.index(r.dx) for r in meta.itertuples()}
    assert by_id(ham, "lesion_id") == dict(zip(meta.image_id, meta.lesion_id))
    row = ham[0]
    assert row["image"].mode == "RGB" and row["image"].size == (200, 150)


def test_ham_binary_scheme(ham_dir):
    ds = load_image_dataset(str(ham_dir), label_scheme="binary")
    assert ds.features["label"].names == list(BINARY_LABELS)
    labels = by_id(ds)
    assert {i for i, y in labels.items() if y == 1} == HAM_MEL
    assert sum(labels.values()) == 3
    assert by_id(ds, "dx")["ISIC_0026391"] == "nv"  # the dx code survives the binary scheme


def test_ham_kaggle_layout(ham_dir, tmp_path):
    shutil.copy(ham_dir / "HAM10000_metadata.csv", tmp_path)
    images = sorted((ham_dir / "images").glob("*.jpg"))
    for i, p in enumerate(images):
        part = tmp_path / f"HAM10000_images_part_{1 + i % 2}"
        part.mkdir(exist_ok=True)
        shutil.copy(p, part)
    ds = load_image_dataset(str(tmp_path))
    assert sorted(ds["image_id"]) == sorted(p.stem for p in images)
    assert {i for i, y in by_id(ds).items() if y == MEL} == HAM_MEL


def test_isic2017_layout_split_and_names(isic2017_dir):
    ds = load_image_dataset(str(isic2017_dir), split="test")
    assert by_id(ds) == {"ISIC_0012258": MEL, "ISIC_0012356": MEL, "ISIC_0012092": NV, "ISIC_0012086": BKL}
    assert ds["lesion_id"] == [None] * 4
    binary = load_image_dataset(str(isic2017_dir), label_scheme="binary", split="test")
    assert by_id(binary) == {"ISIC_0012258": 1, "ISIC_0012356": 1, "ISIC_0012092": 0, "ISIC_0012086": 0}
    with pytest.raises(ValueError, match="no rows with split='train'"):
        load_image_dataset(str(isic2017_dir), split="train")


def test_csv_layout(ham_dir, tmp_path):
    images = sorted((ham_dir / "images").glob("*.jpg"))[:4]
    meta = pd.read_csv(ham_dir / "HAM10000_metadata.csv").set_index("image_id")
    rows = pd.DataFrame(
        {
            # relative to the CSV's folder, and one absolute path
            "path": [os.path.relpath(p, tmp_path) for p in images[:3]] + [str(images[3])],
            "dx": [meta.loc[p.stem, "dx"] for p in images],
            "lesion_id": [meta.loc[p.stem, "lesion_id"] for p in images],
        }
    )
    rows.to_csv(tmp_path / "list.csv", index=False)
    ds = load_image_dataset(str(tmp_path / "list.csv"))
    assert ds["image_id"] == [p.stem for p in images]  # image_id from the file name
    assert ds["label"] == [DX_CODES.index(meta.loc[p.stem, "dx"]) for p in images]
    assert ds["lesion_id"] == list(rows["lesion_id"])
    assert ds[3]["image"].size == (200, 150)


def test_image_folder_layout_with_isic_names(ham_dir, tmp_path):
    meta = pd.read_csv(ham_dir / "HAM10000_metadata.csv")
    folder_name = {"mel": "melanoma", "nv": "nevus", "bkl": "seborrheic_keratosis"}  # ISIC names
    for r in meta.itertuples():
        sub = tmp_path / "data" / folder_name.get(r.dx, r.dx)
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(ham_dir / "images" / f"{r.image_id}.jpg", sub)
    (tmp_path / "data" / "notes").mkdir()  # not a class: ignored
    ds = load_image_dataset(str(tmp_path / "data"))
    assert by_id(ds) == {r.image_id: DX_CODES.index(r.dx) for r in meta.itertuples()}
    assert set(ds["lesion_id"]) == {None}


def test_image_folder_with_split_folders(ham_dir, tmp_path):
    for split, ids in {"train": ["ISIC_0033902", "ISIC_0026391"], "test": ["ISIC_0028878"]}.items():
        for image_id, dx in zip(ids, ("mel", "nv")):
            sub = tmp_path / split / dx
            sub.mkdir(parents=True, exist_ok=True)
            shutil.copy(ham_dir / "images" / f"{image_id}.jpg", sub)
    assert by_id(load_image_dataset(str(tmp_path), split="train")) == {"ISIC_0033902": MEL, "ISIC_0026391": NV}
    assert by_id(load_image_dataset(str(tmp_path), split="test")) == {"ISIC_0028878": MEL}
    with pytest.raises(ValueError, match="pass split="):
        load_image_dataset(str(tmp_path))


def test_save_to_disk_round_trip(ham, ham_dir, tmp_path):
    ham.save_to_disk(str(tmp_path / "saved"))
    ds = load_image_dataset(str(tmp_path / "saved"))
    assert ds.features == ham.features
    assert by_id(ds) == by_id(ham) and by_id(ds, "lesion_id") == by_id(ham, "lesion_id")
    assert ds[0]["image"].size == (200, 150)
    # a binary-scheme dataset keeps its dx codes, so it reloads under either scheme
    load_image_dataset(str(ham_dir), label_scheme="binary").save_to_disk(str(tmp_path / "binary"))
    assert by_id(load_image_dataset(str(tmp_path / "binary"))) == by_id(ham)
    assert sum(load_image_dataset(str(tmp_path / "binary"), label_scheme="binary")["label"]) == 3


def test_hub_style_dataset_with_class_names(ham_image_paths, tmp_path):
    """A Hub-like DatasetDict: `img` column, ClassLabel with ISIC names, no ids."""
    names = ["melanoma", "nevus", "seborrheic_keratosis"]
    features = datasets.Features({"img": datasets.Image(), "labels": datasets.ClassLabel(names=names)})
    part = datasets.Dataset.from_dict(
        {"img": [str(p) for p in ham_image_paths[:3]], "labels": [0, 1, 2]}, features=features
    )
    datasets.DatasetDict({"train": part, "test": part.select([0])}).save_to_disk(str(tmp_path / "hub"))
    ds = load_image_dataset(str(tmp_path / "hub"), split="train")
    assert ds["label"] == [MEL, NV, BKL]
    assert ds["image_id"] == [p.stem for p in ham_image_paths[:3]]
    assert len(load_image_dataset(str(tmp_path / "hub"), split="test")) == 1
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_image_dataset(str(tmp_path / "hub"), split="validation")


def test_local_copy_of_a_hub_repo_goes_through_load_dataset(ham, tmp_path):
    """Parquet shards under data/ (how Hub image datasets are stored), images embedded as bytes."""
    from datasets.table import embed_table_storage

    embedded = ham.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    embedded.select(range(9)).to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    embedded.select(range(9, 12)).to_parquet(str(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet"))
    ds = load_image_dataset(str(tmp_path / "repo"), split="test")
    assert ds["image_id"] == ham["image_id"][9:12] and ds["label"] == ham["label"][9:12]
    assert ds[0]["image"].size == (200, 150)
    with pytest.raises(ValueError, match='Unknown split "validation"'):
        load_image_dataset(str(tmp_path / "repo"), split="validation")


def test_integer_labels_without_names_are_refused(ham_image_paths, tmp_path):
    datasets.Dataset.from_dict({"image": [str(ham_image_paths[0])], "label": [4]}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(str(tmp_path / "ints"))
    with pytest.raises(ValueError, match="without class names"):
        load_image_dataset(str(tmp_path / "ints"))


def test_layouts_share_one_schema_and_concatenate(ham, isic2017_dir):
    isic = load_image_dataset(str(isic2017_dir), split="test")
    both = datasets.concatenate_datasets([ham, isic])
    assert len(both) == 16 and class_counts(both)[MEL] == 3 + 2


def test_dataset_without_label_column_is_refused(ham_image_paths, tmp_path):
    datasets.Dataset.from_dict(
        {"image": [str(ham_image_paths[0])], "note": ["x"]},
        features=datasets.Features({"image": datasets.Image(), "note": datasets.Value("string")}),
    ).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(ValueError, match="no usable label column"):
        load_image_dataset(str(tmp_path / "nolabel"))


def test_bad_specs_raise_clear_errors(ham_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    pd.DataFrame({"file": ["a.jpg"], "dx": ["mel"]}).to_csv(tmp_path / "nopath.csv", index=False)
    an_image = str(next((ham_dir / "images").glob("*.jpg")))
    pd.DataFrame({"path": [an_image], "dx": ["cat"]}).to_csv(tmp_path / "cat.csv", index=False)
    with pytest.raises(ValueError, match="HAM10000 folder"):
        load_image_dataset(str(tmp_path / "does_not_exist"))
    with pytest.raises(ValueError, match="unsupported data file"):
        load_image_dataset(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="'path' column"):
        load_image_dataset(str(tmp_path / "nopath.csv"))
    with pytest.raises(ValueError, match=r"\['cat'\] are not dermoscopy classes"):
        load_image_dataset(str(tmp_path / "cat.csv"))
    with pytest.raises(ValueError, match="label_scheme"):
        load_image_dataset(str(ham_dir), label_scheme="multiclass")
    with pytest.raises(ValueError, match="could not load"):
        load_image_dataset(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="could not load 'nobody/no-such-dataset'"):
        load_image_dataset("nobody/no-such-dataset")  # conftest keeps the Hub offline


# ------------------------------------------------------------------------- images / corrupt


def test_corrupt_files_are_skipped_and_counted(ham_image_paths, tmp_path, caplog):
    folder = tmp_path / "data" / "mel"
    folder.mkdir(parents=True)
    for p in ham_image_paths[:3]:
        shutil.copy(p, folder)
    jpeg = ham_image_paths[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    with caplog.at_level(logging.WARNING, logger="train.data"):
        ds = load_image_dataset(str(tmp_path / "data"))
    assert sorted(ds["image_id"]) == sorted(p.stem for p in ham_image_paths[:3])
    assert "skipped 3 unreadable image(s) of 6" in caplog.text
    assert all(name in caplog.text for name in ("truncated.jpg", "empty.jpg", "text.jpg"))

    unverified = load_image_dataset(str(tmp_path / "data"), verify=False)
    clean, n_bad = verify_images(unverified)
    assert (len(unverified), len(clean), n_bad) == (6, 3, 3)


def test_decode_failure_at_training_time_is_ignored_not_fatal(ham_image_paths, tmp_path, vit_processor, caplog):
    folder = tmp_path / "data" / "nv"
    folder.mkdir(parents=True)
    for p in ham_image_paths[:3]:
        shutil.copy(p, folder)
    ds = load_image_dataset(str(tmp_path / "data"))
    (folder / ham_image_paths[1].name).write_bytes(b"broken after loading")  # file goes bad mid-run
    for train in (True, False):
        transform = build_transforms(vit_processor, train=train)
        with caplog.at_level(logging.WARNING, logger="train.transforms"):
            batch = with_image_transform(ds, transform)[:3]
        assert batch["labels"].tolist() == [NV, IGNORE_INDEX, NV]
        assert batch["pixel_values"].shape == (3, 3, 32, 32)
        assert torch.all(batch["pixel_values"][1] == 0) and transform.n_failed == 1
    loss = torch.nn.functional.cross_entropy(torch.randn(3, 7), batch["labels"])
    assert torch.isfinite(loss)  # the ignored sample does not poison the loss


def test_training_decodes_like_the_app(ham_image_paths, tmp_path, vit_processor):
    """Training goes through model.imageio: transparency is composited on white (it used to be
    dropped, showing whatever colour the transparent pixels held), 16-bit greyscale is rescaled and
    EXIF orientation is applied, so the eval transform gives the processor's pixels of the app's image."""
    rgb = np.asarray(PIL.Image.open(ham_image_paths[0]).convert("RGB"))  # (450, 600, 3)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :300, 3] = 0  # left half fully transparent
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    grey16 = (np.asarray(PIL.Image.fromarray(rgb).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    folder = tmp_path / "data" / "nv"
    folder.mkdir(parents=True)
    PIL.Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    PIL.Image.fromarray(grey16).save(folder / "grey16.png")
    PIL.Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif.tobytes())
    ds = load_image_dataset(str(tmp_path / "data"))
    batch = with_image_transform(ds, build_transforms(vit_processor, train=False))[:3]
    for name, pixels in zip(ds["image_id"], batch["pixel_values"]):
        app_image = load_image(folder / f"{name}{'.jpg' if name == 'rotated' else '.png'}")
        expected = vit_processor(images=app_image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(pixels, expected, rtol=0, atol=0)
    rgba_pixels = batch["pixel_values"][ds["image_id"].index("rgba")]
    assert torch.all(rgba_pixels[:, :, :10] == 1.0)  # white, normalised with mean = std = 0.5


# ---------------------------------------------------------------------------------- splits


def test_split_by_lesion_on_fixtures(ham):
    dd = split_by_lesion(ham, val_size=0.15, test_size=0.15, seed=42)
    assert list(dd) == ["train", "validation", "test"]
    assert all(len(part) > 0 for part in dd.values())
    assert sum(len(part) for part in dd.values()) == len(ham)
    check_no_leakage(dd)
    for images in TWO_IMAGE_LESIONS.values():
        homes = [name for name, part in dd.items() if images & set(part["image_id"])]
        assert len(homes) == 1 and images <= set(dd[homes[0]]["image_id"])


def test_split_is_deterministic_per_seed(ham):
    def ids(dd):
        return {name: part["image_id"][:] for name, part in dd.items()}

    assert ids(split_by_lesion(ham, seed=3)) == ids(split_by_lesion(ham, seed=3))
    assert ids(split_by_lesion(ham, seed=3)) != ids(split_by_lesion(ham, seed=4))


def synthetic(n_lesions: int = 300, seed: int = 0) -> datasets.Dataset:
    """Labels and lesion ids only (split_by_lesion never decodes images): 1-3 images per lesion,
    20% mel lesions, a fifth of the images without lesion_id."""
    rng = np.random.default_rng(seed)
    rows = {"image": [], "label": [], "image_id": [], "lesion_id": [], "dx": []}
    for k in range(n_lesions):
        dx = "mel" if k % 5 == 0 else "nv"
        for j in range(int(rng.integers(1, 4))):
            rows["image"].append("unused.jpg")
            rows["label"].append(DX_CODES.index(dx))
            rows["image_id"].append(f"IMG_{k:04d}_{j}")
            rows["lesion_id"].append(None if k % 7 == 0 else f"L{k:04d}")
            rows["dx"].append(dx)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DX_CODES)),
         "image_id": datasets.Value("string"), "lesion_id": datasets.Value("string"), "dx": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(rows, features=features)


def test_split_is_grouped_stratified_and_sized():
    ds = synthetic()
    dd = split_by_lesion(ds, val_size=0.2, test_size=0.1, seed=0)
    check_no_leakage(dd)
    lesions = {name: set(part["lesion_id"]) - {None} for name, part in dd.items()}
    assert not lesions["train"] & lesions["validation"]
    assert not lesions["train"] & lesions["test"]
    assert not lesions["validation"] & lesions["test"]
    share = {name: len(part) / len(ds) for name, part in dd.items()}
    assert share["validation"] == pytest.approx(0.2, abs=0.05) and share["test"] == pytest.approx(0.1, abs=0.04)
    for part in dd.values():  # stratified: every split keeps the ~20% melanoma share
        counts = class_counts(part)
        assert counts[MEL] / len(part) == pytest.approx(class_counts(ds)[MEL] / len(ds), abs=0.07)


def test_split_rejects_bad_sizes(ham):
    with pytest.raises(ValueError, match="val_size and test_size"):
        split_by_lesion(ham, val_size=0.6, test_size=0.5)
    with pytest.raises(ValueError, match="cannot fill 3 non-empty splits"):
        split_by_lesion(ham.select([0, 1]))  # one lesion: HAM_0000048
    assert len(split_by_lesion(ham, val_size=0.0)["validation"]) == 0


def test_manifest_round_trip_and_apply(ham, ham_dir, tmp_path):
    dd = split_by_lesion(ham, seed=7)
    written = write_manifest(dd, tmp_path / "m" / "split.json")
    manifest = read_manifest(tmp_path / "m" / "split.json")
    assert manifest == written
    assert manifest["seed"] == 7 and manifest["sizes"] == {name: len(part) for name, part in dd.items()}
    assert sum(manifest["class_counts"]["train"].values()) == len(dd["train"])
    rebuilt = apply_manifest(load_image_dataset(str(ham_dir)), tmp_path / "m" / "split.json")
    assert {n: p["image_id"][:] for n, p in rebuilt.items()} == {n: p["image_id"][:] for n, p in dd.items()}
    assert {n: p["label"][:] for n, p in rebuilt.items()} == {n: p["label"][:] for n, p in dd.items()}
    (tmp_path / "bad.json").write_text('{"seed": 1}')
    with pytest.raises(ValueError, match="not a split manifest"):
        read_manifest(tmp_path / "bad.json")


def test_check_no_leakage_raises_on_leaky_splits(ham):
    # One image of lesion HAM_0000048 in train, the other in test.
    ids = ham["image_id"]
    leaky = datasets.DatasetDict(
        {
            "train": ham.select([ids.index("ISIC_0033902"), ids.index("ISIC_0026391")]),
            "test": ham.select([ids.index("ISIC_0032774")]),
        }
    )
    with pytest.raises(ValueError, match="lesion_id 'HAM_0000048' is in both"):
        check_no_leakage(leaky)
    with pytest.raises(ValueError, match="image_id 'ISIC_0026391'"):
        check_no_leakage(datasets.DatasetDict({"train": ham.select([3]), "test": ham.select([3])}))


def test_split_argument_on_a_layout_without_splits_uses_the_default_split(ham_dir, ham):
    test_part = load_image_dataset(str(ham_dir), split="test")
    assert test_part["image_id"][:] == split_by_lesion(ham, 0.15, 0.15, seed=42)["test"]["image_id"][:]


# ------------------------------------------------------------------------------ transforms


def test_eval_transform_matches_processor_and_is_deterministic(ham, vit_processor):
    transform = build_transforms(vit_processor, train=False)
    ds = with_image_transform(ham, transform)
    a, b = ds[:4], ds[:4]
    assert a["pixel_values"].shape == (4, 3, 32, 32) and a["pixel_values"].dtype == torch.float32
    assert a["labels"].dtype == torch.long and a["labels"].tolist() == ham["label"][:4]
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    expected = vit_processor(images=[ham[i]["image"] for i in range(4)], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(a["pixel_values"], expected)
    single = ds[0]
    assert single["pixel_values"].shape == (3, 32, 32) and int(single["labels"]) == ham[0]["label"]
    # DataLoader workers receive a pickled copy of the transform
    copy = pickle.loads(pickle.dumps(transform))
    torch.testing.assert_close(with_image_transform(ham, copy)[:4]["pixel_values"], a["pixel_values"])


def test_transforms_normalise_with_the_processor_statistics(vit_processor):
    """A constant colour survives every geometric augmentation, so the expected normalised
    values are known exactly: (c / 255 - mean) / std."""
    colour = (255, 0, 128)
    batch = {"image": [PIL.Image.new("RGB", (50, 40), colour)] * 2, "label": [MEL, NV]}
    geometric_only = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0, "blur": 0, "erasing": 0}
    expected = torch.tensor([(c / 255 - 0.5) / 0.5 for c in colour]).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    for transform in (build_transforms(vit_processor, False), build_transforms(vit_processor, True, geometric_only)):
        out = transform(batch)
        torch.testing.assert_close(out["pixel_values"], expected, atol=2e-2, rtol=0)
        assert out["labels"].tolist() == [MEL, NV]


def test_train_transform_varies_and_is_seedable(ham, vit_processor):
    ds = with_image_transform(ham, build_transforms(vit_processor, train=True))
    torch.manual_seed(0)
    first = ds[:4]["pixel_values"]
    second = ds[:4]["pixel_values"]
    torch.manual_seed(0)
    again = ds[:4]["pixel_values"]
    assert first.shape == (4, 3, 32, 32) and torch.isfinite(first).all()
    assert not torch.allclose(first, second)
    torch.testing.assert_close(first, again)


def test_orientation_augmentations_reach_all_eight_symmetries():
    cfg = {"crop_scale": None, "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0, "blur": 0, "erasing": 0}
    processor = ViTImageProcessor(size={"height": 2, "width": 2}, image_mean=[0] * 3, image_std=[1] * 3)
    pipeline = train_pipeline(processor, cfg)
    image = PIL.Image.fromarray(np.array([[[0] * 3, [60] * 3], [[120] * 3, [180] * 3]], dtype=np.uint8))
    torch.manual_seed(0)
    seen = {tuple((pipeline(image)[0] * 255).round().flatten().tolist()) for _ in range(200)}
    assert len(seen) == 8  # the dihedral group of the square


def test_zoom_out_shrinks_the_image_onto_its_border_colour():
    """The lesion keeps its shape at the drawn scale, the canvas is the border's median colour, and
    the mask lands on the same pixels."""
    pixels = torch.zeros(3, 40, 40, dtype=torch.uint8)
    pixels[:] = torch.tensor([200, 150, 120], dtype=torch.uint8).view(3, 1, 1)  # skin
    pixels[:, 10:30, 10:30] = 30  # a dark square lesion
    lesion = torch.zeros(40, 40)
    lesion[10:30, 10:30] = 1
    torch.manual_seed(0)
    for _ in range(10):
        image, mask = RandomZoomOut((0.5, 0.5))(tv_tensors.Image(pixels), tv_tensors.Mask(lesion))
        assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
        assert image.shape == (3, 40, 40) and image.dtype == torch.uint8 and mask.shape == (40, 40)
        assert mask.sum() == 100  # a 20 x 20 lesion at half the side: 10 x 10
        dark = image.float().mean(0) < 100
        assert torch.equal(dark, mask.bool())
        near = torch.nn.functional.max_pool2d(mask[None, None].float(), 5, stride=1, padding=2)[0, 0] > 0
        skin = torch.tensor([200.0, 150.0, 120.0]).view(3, 1)  # away from the lesion's blended edge
        assert (image.float().reshape(3, -1)[:, ~near.flatten()] - skin).abs().max() <= 1
    with pytest.raises(ValueError, match="zoom_out_scale"):
        RandomZoomOut((0.0, 0.5))


def test_noise_is_drawn_per_image_and_stays_in_range():
    image = torch.full((3, 32, 32), 0.5)
    torch.manual_seed(0)
    noisy = RandomNoise(1.0, (0.04, 0.04))(image)
    assert 0.03 < float((noisy - image).std()) < 0.05 and noisy.min() >= 0 and noisy.max() <= 1
    assert torch.equal(RandomNoise(0.0, (0.04, 0.04))(image), image)
    bright = RandomNoise(1.0, (0.2, 0.2))(torch.ones(3, 8, 8))
    assert bright.max() <= 1 and bright.min() < 1  # clamped to the image range


def test_pipeline_zooms_out_with_its_probability():
    """zoom_out = p: about p of the views show the whole image shrunk (a border of canvas), the rest a crop."""
    cfg = {"crop_scale": [0.9, 1.0], "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0, "blur": 0,
           "erasing": 0, "zoom_out": 0.5, "zoom_out_scale": [0.5, 0.5]}
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0] * 3, image_std=[1] * 3)
    pipeline = train_pipeline(processor, cfg)
    yy, xx = np.mgrid[0:64, 0:64]
    image = PIL.Image.fromarray(np.stack([yy * 4, xx * 4, (yy + xx) * 2], -1).astype(np.uint8))  # no flat border
    torch.manual_seed(0)
    flat_corners = 0
    for _ in range(200):
        out = pipeline(image)
        corner = out[:, :4, :4].reshape(3, -1)
        flat_corners += bool((corner - corner[:, :1]).abs().max() < 1e-6)
    assert 70 <= flat_corners <= 130  # binomial(200, 0.5) within about 4 sd


def test_timm_processor_geometry_and_shapes(ham):
    processor = TimmWrapperImageProcessor(
        pretrained_cfg={
            "input_size": (3, 48, 40),
            "mean": (0.4, 0.5, 0.6),
            "std": (0.2, 0.25, 0.3),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
        }
    )
    geo = processor_geometry(processor)
    assert geo.size == (48, 40) and geo.mean == (0.4, 0.5, 0.6) and geo.std == (0.2, 0.25, 0.3)
    assert geo.interpolation == "bicubic" and not geo.crops
    for train in (True, False):
        out = with_image_transform(ham, build_transforms(processor, train))[:2]
        assert out["pixel_values"].shape == (2, 3, 48, 40)


def test_augment_config_from_dict_rejects_unknown_keys(vit_processor):
    assert AugmentConfig.from_any({"crop_scale": [0.8, 1.0]}).crop_scale == (0.8, 1.0)
    with pytest.raises(ValueError, match="unknown augmentation option"):
        build_transforms(vit_processor, True, {"hflipp": 0.5})


def test_batch_mixer():
    assert build_batch_mixer(AugmentConfig(), 7) is None
    mixer = build_batch_mixer({"mixup_alpha": 0.4, "cutmix_alpha": 1.0}, num_classes=7)
    batch = {"pixel_values": torch.randn(4, 3, 8, 8), "labels": torch.tensor([MEL, NV, IGNORE_INDEX, BKL])}
    out = mixer(batch)
    assert out["pixel_values"].shape == (3, 3, 8, 8) and out["labels"].shape == (3, 7)
    torch.testing.assert_close(out["labels"].sum(-1), torch.ones(3))
    assert set(out["labels"].nonzero()[:, 1].tolist()) <= {MEL, NV, BKL}
    never = build_batch_mixer({"mixup_alpha": 0.4, "mix_prob": 0.0}, num_classes=7)
    out = pickle.loads(pickle.dumps(never))(batch)  # picklable, for use in a collate_fn
    torch.testing.assert_close(out["labels"], torch.nn.functional.one_hot(torch.tensor([MEL, NV, BKL]), 7).float())
    torch.testing.assert_close(out["pixel_values"], batch["pixel_values"][[0, 1, 3]])


# ------------------------------------------------------------------------------- balance


def test_class_weights_hand_computed():
    counts = [6, 2, 0]  # N = 8
    torch.testing.assert_close(class_weights(counts, "inverse"), torch.tensor([2 / 3, 2.0, 0.0]))
    present = compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array([0] * 6 + [1] * 2))
    torch.testing.assert_close(class_weights(counts, "inverse")[:2], torch.tensor(present, dtype=torch.float32))
    k = 8 / (6 / 6**0.5 + 2 / 2**0.5)
    torch.testing.assert_close(class_weights(counts, "sqrt_inverse"), torch.tensor([k / 6**0.5, k / 2**0.5, 0.0]))
    # beta = 0.5: effective numbers (1 - 0.5^n) / 0.5 = 63/32 (n=6) and 3/2 (n=2)
    effective = class_weights(counts, "effective_number", beta=0.5)
    torch.testing.assert_close(effective, torch.tensor([1344 / 1449, 28 / 23, 0.0]))
    with pytest.raises(ValueError, match="scheme must be"):
        class_weights(counts, "focal")


def test_class_counts_and_sampler_weights(ham):
    counts = class_counts(ham)
    assert counts == [1, 1, 1, 1, 3, 4, 1]
    weights = balanced_sampler_weights(ham)
    assert weights.shape == (12,)
    per_class = torch.zeros(7, dtype=torch.float64).index_add_(0, torch.tensor(ham["label"][:]), weights)
    torch.testing.assert_close(per_class, torch.full((7,), 12 / 7, dtype=torch.float64))  # each class drawn equally
