"""app.py end to end: the real app (Gradio UI + REST) served in-process on a free port, driven
through gradio_client and HTTP, on tiny real models trained from the fixture images."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw

from bench.bench_app import big_pngs, reset_peak, server_memory_mib
from model.imageio import load_image
from model.ood import OODResult
from model.sevenpoint import SEVEN_POINT
from servers import serve_in_thread
from test_classifier import MULTISOURCE, _png_bytes, bad_image_files, shared_tiny_models

MAX_UPLOAD = 1_000_000  # small limit so the over-size test uploads little
MAX_REQUEST = 3_000_000  # bulk request body limit, small for the same reason
PARTNER = "https://partner.example"  # an allowed foreign origin
QUEUE = 120  # REST queue size in images (the slow bulk test sends 104)


@pytest.fixture(scope="module")
def live(tmp_path_factory, fixtures_dir):
    """The app served on 127.0.0.1:<free port>; yields (base url, gradio client, zoo, fastapi app)."""
    import app as app_module
    from model.catalogue import ModelCatalogue

    models_dir = shared_tiny_models(tmp_path_factory, fixtures_dir)
    zoo = ModelCatalogue(models_dir=models_dir, hub_ids=["nobody/unreachable-model"], ood_path="none")
    demo, fastapi_app = app_module.build_app(
        zoo, max_queued_images=QUEUE, max_upload_bytes=MAX_UPLOAD, max_request_bytes=MAX_REQUEST, allowed_origins=[PARTNER]
    )
    port = app_module.free_port()
    server, thread = serve_in_thread(fastapi_app, port=port)
    url = f"http://127.0.0.1:{port}/"
    client = Client(url, verbose=False)
    yield url, client, zoo, fastapi_app
    client.close()
    server.should_exit = True
    thread.join(timeout=30)


def _expected(zoo, model_id: str, path) -> dict[str, float]:
    """Probabilities computed directly through the zoo, for comparison with the app's."""
    return zoo.get(model_id).predict([load_image(path, max_side=1024)])[0].probabilities


def _poll(url: str, task_uuid: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}from_task/{task_uuid}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] != "pending":
            return body
        time.sleep(0.1)
    raise AssertionError(f"task {task_uuid} still pending after {timeout} s")


# ---------------------------------------------------------------------------------- Gradio


def test_gradio_predict_endpoint(live, ham_image_paths):
    url, client, zoo, _ = live
    path = ham_image_paths[0]
    probs, verdict, heatmap, plain, record = client.predict(
        handle_file(str(path)), "melanoma-vit-tiny", "mean", 0.9, 0, api_name="/predict"
    )
    expected = _expected(zoo, "melanoma-vit-tiny", path)
    assert record["probabilities"] == pytest.approx(expected, abs=1e-5)
    # One unit on the page: every class in percent with one decimal, highest first, readable names;
    # the class list and the verdict show the same P(mel) text.
    entry = zoo.get("melanoma-vit-tiny")
    rows = re.findall(r"^\| (.+?) \| ([\d.]+)% \|$", probs, flags=re.M)
    shown = record["probabilities"]  # the app's own values, so that rounding is compared exactly
    ranked = sorted(shown, key=lambda code: -shown[code])
    assert rows == [(entry.labels[code], f"{100 * shown[code]:.1f}") for code in ranked]
    assert sum(float(p) for _, p in rows) == pytest.approx(100.0, abs=0.05 * len(rows))
    mel_row = dict(rows)["Melanoma"]
    assert f"Melanoma probability: {mel_row}%" in verdict
    assert record["prediction"]["melanoma"] == (expected["mel"] >= entry.melanoma_threshold)
    metadata = {"model_id": "melanoma-vit-tiny", "net_type": "melanoma_vit", "img_size": 32, "out_dim": 7}
    assert record["metadata"] == metadata
    assert f"Melanoma probability: {expected['mel']:.1%}" in verdict
    assert ("Above" in verdict) == record["prediction"]["melanoma"]
    overlay = np.asarray(Image.open(heatmap["value"] if isinstance(heatmap, dict) else heatmap))
    assert overlay.ndim == 3 and overlay.shape[2] == 3 and "rollout" in record["explanation"]
    assert Image.open(plain).size == Image.open(path).size

    # Default model when none is chosen; Grad-CAM for the CNN.
    *_, default_record = client.predict(handle_file(str(path)), None, "mean", 0.9, 0, api_name="/predict")
    assert default_record["metadata"]["model_id"] == "melanoma-vit-tiny"
    *_, cnn_record = client.predict(handle_file(str(path)), "resnet18-tiny", "mean", 0.9, 0, api_name="/predict")
    assert "Grad-CAM" in cnn_record["explanation"] and cnn_record["metadata"]["net_type"] == "timm/resnet18"


def test_one_oversize_file_does_not_drop_the_batch(live, tmp_path, ham_image_paths):
    url, client, _, _ = live
    big = tmp_path / "big.jpg"
    big.write_bytes(ham_image_paths[0].read_bytes() + b"\0" * MAX_UPLOAD)  # over the 1 MB file limit
    uploads = [handle_file(str(p)) for p in (ham_image_paths[1], big, ham_image_paths[2])]
    gallery, _, csv_path, errors_md = client.predict(uploads, None, api_name="/predict_batch")
    assert len(gallery) == 2 and "big.jpg" in errors_md and "the limit is 1 MB" in errors_md
    with pytest.raises(AppError, match="the limit is 1 MB"):  # one image alone: the same message
        client.predict(handle_file(str(big)), None, "mean", 0.9, 0, api_name="/predict")


def test_gradio_predict_errors_and_exif(live, tmp_path, ham_image_paths):
    url, client, zoo, _ = live
    files = bad_image_files(tmp_path, ham_image_paths[0])
    for kind, message in [("truncated", "truncated or corrupt"), ("svg", "not a raster image"), ("tiny", "at least 8")]:
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(files[kind])), None, "mean", 0.9, 0, api_name="/predict")
    with pytest.raises(AppError, match="nope is not in the list of choices"):
        client.predict(handle_file(str(ham_image_paths[0])), "nope", "mean", 0.9, 0, api_name="/predict")
    # Not decodable at all (no image header): the project's decoder judges it, with the same friendly
    # message as REST, never Pillow's text or the server path.
    for kind, message in [("empty", "The file is empty"), ("text", "Not a recognised image"), ("html", "not a raster image")]:
        with pytest.raises(AppError, match=message) as refused:
            client.predict(handle_file(str(files[kind])), None, "mean", 0.9, 0, api_name="/predict")
        assert "/tmp" not in str(refused.value) and files[kind].name not in str(refused.value)  # no server paths
    with pytest.raises(AppError) as refused:
        client.predict(handle_file(str(files["truncated"])), None, "mean", 0.9, 0, api_name="/predict")
    assert "truncated or corrupt" in str(refused.value) and "not processed" not in str(refused.value)  # no Pillow text

    # EXIF orientation 6 on an 80x60 JPEG: the model sees (and the UI shows) a 60x80 image.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "rotated.jpg"
    Image.open(ham_image_paths[0]).convert("RGB").resize((80, 60)).save(rotated, exif=exif.tobytes())
    _, _, _, plain, record = client.predict(handle_file(str(rotated)), None, "mean", 0.9, 0, api_name="/predict")
    assert Image.open(plain).size == (60, 80)
    # The server still answers after the errors.
    assert httpx.get(url + "public_models").status_code == 200


def _raw_gradio_call(url: str, endpoint: str, data: list) -> tuple[int, str]:
    """A Gradio call through the raw HTTP API, as an attacker sends it (gradio_client would upload
    the files first): POST /gradio_api/call/<endpoint>, then read its event stream.
    Returns (status of the POST, its body or the stream's text)."""
    response = httpx.post(f"{url}gradio_api/call/{endpoint}", json={"data": data}, timeout=30)
    if response.status_code != 200:
        return response.status_code, response.text
    event_id = response.json()["event_id"]
    return 200, httpx.get(f"{url}gradio_api/call/{endpoint}/{event_id}", timeout=60).text


def _file_ref(path) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def test_gradio_endpoints_read_only_files_uploaded_to_this_app(live, tmp_path, ham_image_paths):
    """A raw Gradio call naming a server path is refused for every endpoint, before the file is
    touched (/dev/zero used to pin a core), with one answer whatever exists there."""
    from gradio.utils import get_upload_folder

    url, _, _, _ = live
    outside = tmp_path / "outside.jpg"
    shutil.copy(ham_image_paths[0], outside)
    upload_dir = Path(get_upload_folder())
    upload_dir.mkdir(parents=True, exist_ok=True)
    link_dir = Path(tempfile.mkdtemp(dir=upload_dir))  # a symlink inside the upload folder, to outside
    (link_dir / "link.jpg").symlink_to(outside)
    hostile = [
        "/dev/zero",  # never-ending
        str(outside),  # a real image on the server
        str(tmp_path / "missing.jpg"),  # missing
        str(tmp_path),  # a folder
        str(upload_dir / ".." / outside.relative_to("/")),  # `..` out of the upload folder
        str(link_dir / "link.jpg"),
        f"{url}public_models",  # a URL: the server would fetch it
        "",
        123,
    ]
    answers = set()
    try:
        for path in hostile:
            for endpoint, data in [
                ("predict", [_file_ref(path), None, "mean", 0.9, 0, None, "unknown", "unknown"]),
                ("predict_batch", [[_file_ref(str(ham_image_paths[1])), _file_ref(path)], None]),
            ]:
                start = time.monotonic()
                status, body = _raw_gradio_call(url, endpoint, data)
                assert status == 403 and time.monotonic() - start < 10, (endpoint, path, status, body[:300])
                answers.add(body)
        # What a browser page sends (the queue), and a file reference nested anywhere in the body.
        response = httpx.post(f"{url}gradio_api/queue/join", json={
            "data": [_file_ref("/dev/zero"), None, "mean", 0.9, 0, None, "unknown", "unknown"], "fn_index": 0, "session_hash": "x1"})
        answers.add(response.text)
        response = httpx.post(f"{url}gradio_api/call/predict", json={
            "data": [None, None, "mean", 0.9, 0, None, "unknown", "unknown"], "event_data": {"value": {"image": _file_ref(str(outside))}}})
        answers.add(response.text)
    finally:
        shutil.rmtree(link_dir)
    assert len(answers) == 1 and "uploaded to this app" in answers.pop()  # no existence oracle
    # Gradio's own upload then the path it returns: scored as before; the server kept serving.
    uploaded = httpx.post(f"{url}gradio_api/upload", files={"files": ("a.jpg", ham_image_paths[0].read_bytes())})
    status, body = _raw_gradio_call(url, "predict", [_file_ref(uploaded.json()[0]), None, "mean", 0.9, 0, None, "unknown", "unknown"])
    assert status == 200 and "event: complete" in body and "Melanoma probability" in body
    assert httpx.get(url + "public_models", timeout=5).status_code == 200
    assert httpx.get(f"{url}gradio_api/file={outside}").status_code == 403  # and it was never cached


def _overlay_array(heatmap) -> np.ndarray:
    return np.asarray(Image.open(heatmap["value"] if isinstance(heatmap, dict) else heatmap).convert("RGB"), np.float32)


@pytest.mark.parametrize("model_id", ["melanoma-vit-tiny", "resnet18-tiny"])
def test_explanation_overlay_has_the_uploads_geometry_and_opacity_reblends_it(
    live, tmp_path, ham_image_paths, model_id
):
    """Rollout (ViT) and Grad-CAM (CNN) are drawn over the whole upload at its own size, not a square
    crop; /explanation_opacity re-blends the kept heat map (no image, no model: no new prediction)."""
    _, client, _, _ = live
    portrait = tmp_path / "portrait.png"
    Image.open(ham_image_paths[2]).convert("RGB").transpose(Image.Transpose.ROTATE_90).save(portrait)  # 150x200
    upload = load_image(portrait, max_side=1024)
    _, _, heatmap, _, record = client.predict(handle_file(str(portrait)), model_id, "mean", 0.9, 0, api_name="/predict")
    assert upload.size == (150, 200)
    at_half = _overlay_array(heatmap)
    assert at_half.shape == (200, 150, 3)  # the upload's geometry: portrait, full size
    image = np.asarray(upload, np.float32)
    if record["explanation"].endswith("no region raises the melanoma score"):
        # The tiny CNN's last stage is 1x1 here and has no positive melanoma evidence: nothing is
        # drawn (low weights are transparent), rather than a wash over the whole image.
        assert model_id == "resnet18-tiny"
        np.testing.assert_array_equal(at_half, image)
        return
    assert np.abs(at_half - image).mean() > 5.0  # the heat map is drawn over it

    endpoint = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/explanation_opacity"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == ["opacity"] and len(endpoint["returns"]) == 1
    np.testing.assert_array_equal(_overlay_array(client.predict(0.0, api_name="/explanation_opacity")), image)
    np.testing.assert_array_equal(_overlay_array(client.predict(0.5, api_name="/explanation_opacity")), at_half)
    at_full = _overlay_array(client.predict(1.0, api_name="/explanation_opacity"))
    assert at_full.shape == at_half.shape and np.abs(at_full - image).mean() > np.abs(at_half - image).mean() + 5.0
    assert record["explanation"].startswith("attention rollout" if model_id.startswith("melanoma") else "Grad-CAM")


def test_explanation_settings_re_explain_the_kept_image(live, ham_image_paths):
    """The page's handlers (module level, no server): new rollout options explain the image kept
    from the last prediction again, same image, same model; opacity only re-blends."""
    import gradio as gr

    from webapp import ui

    ctx = live[3].state.ctx
    *_, record, explained = ui.predict(ctx, str(ham_image_paths[1]), "melanoma-vit-tiny", "mean", 0.9, 0)
    overlay, again = ui.re_explain(ctx, explained, "max", 0.5, 1, 0.5)
    assert again.image is explained.image and again.model_id == explained.model_id == "melanoma-vit-tiny"
    assert again.method != explained.method == record["explanation"]
    before, after = ctx.scoring.overlay(explained, 0.5), ctx.scoring.overlay(again, 0.5)
    np.testing.assert_array_equal(overlay, after)
    assert before.shape == after.shape == (150, 200, 3) and not np.array_equal(before, after)
    assert again.result.probabilities == pytest.approx(explained.result.probabilities, abs=1e-6)
    # Before any prediction there is nothing to redraw: the outputs are left as they are.
    assert ui.explanation_opacity(ctx, None, 0.3) == gr.skip()
    assert ui.re_explain(ctx, None, "mean", 0.9, 0, 0.5) == (gr.skip(),) * 2


def _thumbnail_border(path: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(Image.open(path).convert("RGB"))[2, 2])


def test_gradio_batch_ranking_gallery_csv(live, tmp_path, fixtures_dir, ham_image_paths):
    url, client, zoo, _ = live
    images = ham_image_paths + sorted((fixtures_dir / "isic2017" / "test").glob("*.jpg"))
    bad = bad_image_files(tmp_path, ham_image_paths[0])
    uploads = [handle_file(str(p)) for p in images + [bad["truncated"], bad["text"]]]
    gallery, table, csv_path, errors_md = client.predict(uploads, "melanoma-vit-tiny", api_name="/predict_batch")

    entry = zoo.get("melanoma-vit-tiny")
    expected = {p.name: _expected(zoo, "melanoma-vit-tiny", p)["mel"] for p in images}
    ranked_names = sorted(expected, key=lambda n: -expected[n])
    csv = pd.read_csv(csv_path)
    ok = csv[csv["error"].isna()]
    assert list(ok["file"]) == ranked_names  # highest P(mel) first
    assert list(ok["rank"]) == list(range(1, len(images) + 1))
    np.testing.assert_allclose(ok["melanoma_probability"], [expected[n] for n in ranked_names], atol=1e-5)
    assert (ok["above_threshold"] == (ok["melanoma_probability"] >= entry.melanoma_threshold)).all()
    assert ok["above_threshold"].any() and not ok["above_threshold"].all()  # both colours shown
    np.testing.assert_allclose(ok[[f"p_{c}" for c in entry.labels]].sum(axis=1), 1.0, atol=1e-4)
    failed = csv[csv["error"].notna()].set_index("file")["error"]
    assert "truncated or corrupt" in failed["truncated.jpg"] and "Not a recognised image" in failed["notes.txt"]
    assert "truncated.jpg" in errors_md and "notes.txt" in errors_md
    assert "seven_point_score" not in csv  # a model without criterion heads: the columns of before

    assert len(gallery) == len(images)
    # Captions: rank, P(mel) in the page's unit and the flag, short (the name is in the table).
    for rank, (item, p) in enumerate(zip(gallery, ok["melanoma_probability"]), start=1):
        colour = _thumbnail_border(item["image"])
        if p >= entry.melanoma_threshold:
            assert item["caption"] == f"#{rank} · {100 * p:.1f}% · above threshold"
            assert colour[0] > 180 and colour[2] < 80  # red
        else:
            assert item["caption"] == f"#{rank} · {100 * p:.1f}% · below threshold"
            assert colour[2] > 180 and colour[0] < 80  # blue
        assert len(item["caption"]) <= 30
    # The table shows the page's unit (percent, one decimal, as the verdict); the CSV above keeps 0-1.
    assert table["headers"][:4] == ["P(melanoma) %", "Rank", "File", "Flagged"]
    assert [row[0] for row in table["data"][: len(images)]] == [round(100 * p, 1) for p in ok["melanoma_probability"]]


# ------------------------------------------------------------------------------------ REST


def test_rest_docs_models_and_predict(live, ham_image_paths):
    url, _, zoo, _ = live
    docs = httpx.get(url + "docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = httpx.get(url + "openapi.json").json()
    assert {"/public_models", "/predict", "/predict_bulk", "/from_task/{task_uuid}"} <= set(spec["paths"])
    assert "NOT A MEDICAL DEVICE" in spec["info"]["description"]

    models = httpx.get(url + "public_models").json()
    assert [m["model_id"] for m in models["models"]] == ["melanoma-vit-tiny", MULTISOURCE, "resnet18-tiny", "vit-tiny"]
    assert models["default"] == "melanoma-vit-tiny"
    assert "nobody/unreachable-model" in models["skipped"]
    assert models["models"][0]["license"] == "cc-by-nc-sa-4.0"

    path = ham_image_paths[3]
    upload = {"file": (path.name, path.read_bytes(), "image/jpeg")}
    response = httpx.post(url + "predict", params={"model_id": "vit-tiny"}, files=upload)
    assert response.status_code == 200, response.text
    body = _poll(url, response.json()["task_uuid"])
    assert body["status"] == "done" and "NOT A MEDICAL DEVICE" in body["disclaimer"]
    (result,) = body["results"]
    assert result["name"] == path.name
    assert result["metadata"] == {"model_id": "vit-tiny", "net_type": "vit", "img_size": 32, "out_dim": 7}
    assert result["probabilities"] == pytest.approx(_expected(zoo, "vit-tiny", path), abs=1e-5)
    pred = result["prediction"]
    assert pred["label"] == max(result["probabilities"], key=result["probabilities"].get)
    assert pred["melanoma_probability"] == result["probabilities"]["mel"]
    assert pred["melanoma"] == (pred["melanoma_probability"] >= 0.5)
    assert result["ood"] is None and result["warning"] is None  # detector disabled here
    assert "heads" not in result and "seven_point" not in result  # no extra heads: the record of before


def _assert_heads_match(result: dict, expected) -> None:
    """A JSON result's `heads` / `seven_point` equal the zoo's own `Prediction` of the image."""
    assert list(result["heads"]) == list(expected.heads.probabilities)
    for name, probs in expected.heads.probabilities.items():
        assert result["heads"][name] == pytest.approx(probs, abs=1e-5)
    seven = expected.heads.seven_point
    assert result["seven_point"]["score"] == pytest.approx(seven.score, abs=1e-5)
    assert result["seven_point"]["criteria"] == pytest.approx(seven.criteria, abs=1e-5)
    assert result["seven_point"]["threshold"] == 3
    assert result["seven_point"]["suggests_melanoma"] == (result["seven_point"]["score"] >= 3)


def test_multisource_model_criteria_in_ui_csv_and_rest(live, ham_image_paths):
    url, client, zoo, _ = live
    entry = zoo.get(MULTISOURCE)
    path = ham_image_paths[0]
    (expected,) = entry.predict([load_image(path, max_side=1024)])

    _, verdict, _, _, record = client.predict(handle_file(str(path)), MULTISOURCE, "mean", 0.9, 0, api_name="/predict")
    _assert_heads_match(record, expected)
    seven = record["seven_point"]
    assert "Melanoma probability:" in verdict and "#### Dermoscopic criteria (seven-point checklist)" in verdict
    for criterion, (label, points) in SEVEN_POINT.items():
        row = f"| {criterion.replace('_', ' ').capitalize()}: {label} | {seven['criteria'][criterion]:.1%} | {points} |"
        assert row in verdict
    side = "at or above" if seven["suggests_melanoma"] else "below"
    assert f"score **{seven['score']:.2f}** of 10: {side} the checklist's melanoma cut-off of 3" in verdict
    isic = ", ".join(f"{label.replace('_', ' ')} {p:.1%}" for label, p in record["heads"]["isic2017"].items())
    assert f"`isic2017`: {isic}" in verdict and "`derm7pt`: bcc " in verdict
    assert "`pigment_network`" not in verdict  # criteria are in the table, not among the other heads
    assert "not a dermatologist's reading" in verdict and "not a diagnosis" in verdict

    upload = {"file": (path.name, path.read_bytes(), "image/jpeg")}
    response = httpx.post(url + "predict", params={"model_id": MULTISOURCE}, files=upload)
    assert response.status_code == 200, response.text
    (result,) = _poll(url, response.json()["task_uuid"])["results"]
    _assert_heads_match(result, expected)
    assert list(result) == ["name", "probabilities", "metadata", "prediction", "heads", "seven_point", "ood", "warning", "caution"]

    paths = ham_image_paths[:3]
    _, _, csv_path, _ = client.predict([handle_file(str(p)) for p in paths], MULTISOURCE, api_name="/predict_batch")
    csv = pd.read_csv(csv_path).set_index("file")
    for p in paths:
        (prediction,) = entry.predict([load_image(p, max_side=1024)])
        assert csv.loc[p.name, "seven_point_score"] == pytest.approx(prediction.heads.seven_point.score, abs=1e-5)


def test_rest_bad_inputs_give_4xx_json(live, tmp_path, ham_image_paths):
    url, _, _, _ = live
    files = bad_image_files(tmp_path, ham_image_paths[0])
    expected = {
        "empty": "empty", "truncated": "truncated or corrupt", "text": "Not a recognised image",
        "html": "not a raster image", "svg": "not a raster image", "bomb": "decompression", "tiny": "at least 8",
    }
    for kind, message in expected.items():
        response = httpx.post(url + "predict", files={"file": (files[kind].name, files[kind].read_bytes())})
        assert response.status_code == 400, (kind, response.text)
        assert message in response.json()["detail"], (kind, response.json())
    too_big = ham_image_paths[0].read_bytes() + b"\0" * MAX_UPLOAD
    response = httpx.post(url + "predict", files={"file": ("big.jpg", too_big)})
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    upload = {"file": ("a.jpg", ham_image_paths[0].read_bytes())}
    response = httpx.post(url + "predict", params={"model_id": "nope"}, files=upload)
    assert response.status_code == 404 and "Unknown model 'nope'" in response.json()["detail"]
    response = httpx.get(url + "from_task/00000000-0000-4000-8000-000000000000")
    assert response.status_code == 404 and "Unknown or expired task" in response.json()["detail"]
    response = httpx.post(url + "predict")  # no file at all
    assert response.status_code == 422 and "detail" in response.json()
    response = httpx.post(url + "predict_bulk", files=[("files", ("a.txt", b"hello")), ("files", ("b.jpg", b""))])
    assert response.status_code == 400 and len(response.json()["errors"]) == 2
    detail = response.json()["detail"]
    assert "a.txt: Not a recognised image" in detail and "b.jpg: The file is empty" in detail
    assert httpx.get(url + "public_models").status_code == 200  # still serving


def _unusual_images(ham_jpeg: Path) -> dict[str, bytes]:
    rgb = Image.open(ham_jpeg).convert("RGB")
    out = {"grey16.png": _png_bytes(Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)))}
    out["rgba.png"] = _png_bytes(rgb.convert("RGBA"))
    out["palette.png"] = _png_bytes(rgb.quantize(64))
    out["grey.png"] = _png_bytes(rgb.convert("L"))
    buffer = io.BytesIO()
    rgb.convert("CMYK").save(buffer, format="JPEG")
    out["cmyk.jpg"] = buffer.getvalue()
    buffer = io.BytesIO()
    rgb.save(buffer, format="GIF", save_all=True, append_images=[rgb.rotate(90)], duration=100)
    out["animated.gif"] = buffer.getvalue()
    return out


def test_rest_bulk_mixed_and_unusual_inputs(live, ham_image_paths):
    url, _, zoo, _ = live
    unusual = _unusual_images(ham_image_paths[0])
    uploads = [("files", (name, data)) for name, data in unusual.items()] + [("files", ("bad.html", b"<html></html>"))]
    response = httpx.post(url + "predict_bulk", files=uploads)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["num_images"] == len(unusual)
    assert [e["name"] for e in body["errors"]] == ["bad.html"]
    done = _poll(url, body["task_uuid"])
    assert [r["name"] for r in done["results"]] == list(unusual)
    for result in done["results"]:
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert done["errors"][0]["name"] == "bad.html"


def test_rest_queue_is_bounded_in_images_and_admits_before_decoding(live, ham_image_paths, tmp_path):
    from webapp.tasks import QueueFullError

    url, _, _, fastapi_app = live
    tasks, release = fastapi_app.state.tasks, threading.Event()
    jpeg = ham_image_paths[0].read_bytes()
    truncated = ("truncated.jpg", jpeg[: len(jpeg) // 3])
    try:
        tasks.reserve(QUEUE - 1)  # one big task holds all places but one
        blocker = tasks.submit(lambda: {"waited": release.wait(30)}, QUEUE - 1)
        with pytest.raises(QueueFullError):
            tasks.reserve(2)
        two = [("files", ("a.jpg", jpeg)), ("files", ("b.jpg", jpeg))]
        response = httpx.post(url + "predict_bulk", files=two)
        assert response.status_code == 503 and "retry" in response.json()["detail"].lower()
        assert f"{QUEUE - 1} of at most {QUEUE} images" in response.json()["detail"]
        tasks.reserve(1)  # now full
        # Admission comes before decoding: a broken file gets the 503, not a 400 from its decode.
        response = httpx.post(url + "predict", files={"file": truncated})
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        tasks.release(1)
        assert httpx.get(url + f"from_task/{blocker}").json() == {"task_uuid": blocker, "status": "pending"}
        too_many = [("files", (f"{i}.jpg", b"x")) for i in range(QUEUE + 1)]  # more than the whole queue holds
        response = httpx.post(url + "predict_bulk", files=too_many)
        assert response.status_code == 413 and f"at most {QUEUE} images" in response.json()["detail"]
    finally:
        release.set()
    assert _poll(url, blocker)["waited"] is True
    assert tasks.queued_images == 0  # every claim returned
    response = httpx.post(url + "predict", files={"file": ("a.jpg", jpeg)})
    assert response.status_code == 200 and _poll(url, response.json()["task_uuid"])["status"] == "done"
    response = httpx.post(url + "predict", files={"file": truncated})
    assert response.status_code == 400 and tasks.queued_images == 0  # a refused file returns its claim
    # Bounded in bytes too, of the decoded images the queue holds (4 bytes a pixel in Pillow's RGB):
    # a bulk that does not fit now is refused whole (503, retry) and returns every claim; a bulk
    # bigger than the whole queue gets a 413 (no retry helps).
    held = 4 * load_image(jpeg, max_side=1024).width * load_image(jpeg, max_side=1024).height
    two = [("files", ("a.jpg", jpeg)), ("files", ("b.jpg", jpeg))]
    tasks.max_bytes = 2 * held + 10
    try:
        tasks.reserve_bytes(20)
        response = httpx.post(url + "predict_bulk", files=two)
        assert response.status_code == 503 and "of images; retry" in response.json()["detail"]
        tasks.release(0, 20)
        assert tasks.queued_images == 0 and tasks.queued_bytes == 0
        tasks.max_bytes = held + 10
        response = httpx.post(url + "predict_bulk", files=two)
        assert response.status_code == 413 and "send fewer images per request" in response.json()["detail"]
        assert tasks.queued_images == 0 and tasks.queued_bytes == 0
        response = httpx.post(url + "predict", files={"file": ("a.jpg", jpeg)})
        assert response.status_code == 200 and _poll(url, response.json()["task_uuid"])["status"] == "done"
        assert tasks.queued_bytes == 0
    finally:
        tasks.max_bytes = 512 * 2**20


def test_rest_decodes_each_image_once(live, ham_image_paths, monkeypatch):
    """Every REST image is decoded once, on admission (where a bad file is named in the POST's
    answer), and the worker scores that decoded image: the one decoder runs once per file."""
    import webapp.scoring

    url, _, zoo, fastapi_app = live
    decoded: list[int] = []

    def counting_load_image(source, **kwargs):
        decoded.append(len(source))
        return load_image(source, **kwargs)

    monkeypatch.setattr(webapp.scoring, "load_image", counting_load_image)
    paths = ham_image_paths[:3]
    response = httpx.post(url + "predict", files={"file": (paths[0].name, paths[0].read_bytes())})
    assert response.status_code == 200, response.text
    assert _poll(url, response.json()["task_uuid"])["status"] == "done"
    assert decoded == [paths[0].stat().st_size]
    decoded.clear()
    uploads = [("files", (p.name, p.read_bytes())) for p in paths] + [("files", ("bad.jpg", b"not an image"))]
    response = httpx.post(url + "predict_bulk", params={"model_id": "vit-tiny"}, files=uploads)
    assert response.status_code == 200 and [e["name"] for e in response.json()["errors"]] == ["bad.jpg"]
    done = _poll(url, response.json()["task_uuid"])
    assert sorted(decoded) == sorted([p.stat().st_size for p in paths] + [len(b"not an image")])  # once each
    for path, result in zip(paths, done["results"]):  # the admitted image is what was scored
        assert result["probabilities"] == pytest.approx(_expected(zoo, "vit-tiny", path), abs=1e-5)
    assert fastapi_app.state.tasks.queued_bytes == 0  # every decoded image's claim returned


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _wait_done(store, task_uuid: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (result := store.get(task_uuid)) is not None and result["status"] == "pending":
        assert time.monotonic() < deadline, f"task {task_uuid} still pending"
        time.sleep(0.005)
    return result


def test_task_store_ttl_failures_and_bytes():
    from webapp.tasks import QueueFullError, TaskStore

    clock = FakeClock()
    store = TaskStore(max_images=2, ttl_s=60, max_bytes=100, clock=clock)
    try:
        store.reserve(1)
        store.reserve_bytes(60)
        done = store.submit(lambda: {"i": 0}, 1, 60)
        assert _wait_done(store, done) == {"status": "done", "i": 0}
        assert store.queued_images == 0 and store.queued_bytes == 0  # the claim was returned
        clock.now += 59
        assert store.get(done) == {"status": "done", "i": 0}
        clock.now += 2
        assert store.get(done) is None  # expired: 61 s after it finished
        store.reserve(1)
        failing = store.submit(lambda: 1 / 0, 1)
        assert _wait_done(store, failing) == {"status": "failed", "detail": "division by zero"}
        # Bounded in bytes as well as images.
        store.reserve_bytes(80)
        with pytest.raises(QueueFullError, match="80 bytes of at most 100 bytes"):
            store.reserve_bytes(30)
        store.release(0, 80)
    finally:
        store.shutdown()


def test_task_store_serves_clients_in_turn_and_evicts_only_a_clients_own_results():
    from webapp.tasks import TaskStore

    clock = FakeClock()
    store = TaskStore(max_images=100, ttl_s=60, max_results_per_client=3, clock=clock)
    order: list[str] = []
    gate = threading.Event()

    def chunks(name: str, n: int):
        def work():
            for i in range(n):
                gate.wait(10)
                order.append(f"{name}{i}")
                yield i
            return {"name": name}
        return work

    try:
        store.reserve(12)
        big = store.submit(chunks("a", 10), 10, client="A")  # one client's big batch first
        small = store.submit(chunks("b", 1), 1, client="B")  # then another's single image
        other = store.submit(chunks("c", 1), 1, client="A")
        gate.set()
        assert _wait_done(store, big) == {"status": "done", "name": "a"}
        assert _wait_done(store, small)["name"] == "b" and _wait_done(store, other)["name"] == "c"
        # B waited one chunk of A's, not all ten; A's second task waits behind its first.
        assert order.index("b0") <= 2 and order.index("c0") == len(order) - 1, order
        # A's many quick results never evict B's unexpired one: A loses its own oldest.
        quick = []
        for i in range(4):
            store.reserve(1)
            quick.append(store.submit(lambda i=i: {"i": i}, 1, client="A"))
            _wait_done(store, quick[-1])
        assert store.get(small)["name"] == "b"
        kept = [store.get(t) is not None for t in [big, other, *quick]]
        assert kept == [False, False, False, True, True, True], kept  # A's newest 3
    finally:
        store.shutdown()


@pytest.mark.slow
def test_rest_bulk_of_104_images_completes(live, tmp_path, ham_image_paths, fixtures_dir):
    url, _, zoo, _ = live
    sources = ham_image_paths + sorted((fixtures_dir / "isic2017" / "test").glob("*.jpg"))
    copies = list(enumerate(sources * 7))[:104]
    uploads = [("files", (f"copy{i:03d}_{p.name}", p.read_bytes(), "image/jpeg")) for i, p in copies]
    response = httpx.post(url + "predict_bulk", params={"model_id": "melanoma-vit-tiny"}, files=uploads, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["num_images"] == 104
    done = _poll(url, response.json()["task_uuid"], timeout=120)
    assert done["status"] == "done" and len(done["results"]) == 104
    assert [r["name"] for r in done["results"]] == [u[1][0] for u in uploads]
    by_source: dict[str, float] = {}
    for result in done["results"]:  # copies of one image get the same probability
        source = result["name"].split("_", 1)[1]
        p = result["prediction"]["melanoma_probability"]
        assert by_source.setdefault(source, p) == pytest.approx(p, abs=1e-5)


@pytest.mark.slow
def test_ood_warning_replaces_the_flag(live, tmp_path, ham_image_paths):
    """A real OOD detector (EfficientNet-Lite0 features + PPCA) fitted on the fixture images."""
    from model import ood

    url, client, zoo, _ = live
    backbone = ood.create_feature_extractor()
    ham = [Image.open(p).convert("RGB") for p in ham_image_paths]
    features = ood.extract_features(backbone, ham, 64)
    detector = ood.fit_ood_detector(features, features, 64, n_components=2, percentile=100.0, backbone=backbone)
    checkerboard = Image.fromarray((np.indices((150, 200)).sum(0) // 20 % 2 * 255).astype(np.uint8)).convert("RGB")
    ImageDraw.Draw(checkerboard).text((10, 10), "not a skin lesion", fill=(255, 0, 0))
    s_lesion, s_board = (r.score for r in detector.score([ham[0], checkerboard]))
    assert s_board > s_lesion  # a checkerboard is further from dermoscopy than a fitted lesion
    detector.threshold = (s_lesion + s_board) / 2
    detector.clear_ratio = 1.0  # every image above the threshold is clearly out of distribution here
    tmp = tmp_path / "checkerboard.png"
    checkerboard.save(tmp)
    threshold = zoo.get(None).melanoma_threshold
    try:
        zoo.ood_detector = detector
        probs, verdict, _, _, record = client.predict(handle_file(str(tmp)), None, "mean", 0.9, 0, api_name="/predict")
        assert record["ood"]["is_ood"] and record["warning"]
        assert "probably not a dermoscopic" in verdict and "Melanoma probability" not in verdict
        assert not probs  # the class scores are collapsed
        lesion = handle_file(str(ham_image_paths[0]))
        _, verdict, _, _, record = client.predict(lesion, None, "mean", 0.9, 0, api_name="/predict")
        assert record["ood"]["is_ood"] is False and record["warning"] is None
        assert "Melanoma probability" in verdict
        response = httpx.post(url + "predict", files={"file": ("board.png", tmp.read_bytes())})
        result = _poll(url, response.json()["task_uuid"])["results"][0]
        assert result["ood"]["is_ood"] and "does not look like" in result["warning"]
        # One verdict everywhere: no flag (REST), no rank, no "above threshold", no score on the page.
        assert result["ood"]["level"] == "not_dermoscopy" and result["prediction"]["melanoma"] is None
        # The board scores above every lesion here, so a rank by P(mel) alone would put it first.
        zoo.get(None).melanoma_threshold = 0.0
        gallery, table, csv_file, _ = client.predict(
            [handle_file(str(tmp)), *(handle_file(str(p)) for p in ham_image_paths[:3])], None,
            api_name="/predict_batch",
        )
        captions = [item["caption"] for item in gallery]
        assert captions[-1] == "not ranked · not dermoscopy" and all(c.startswith("#") for c in captions[:-1])
        assert all("above threshold" in c for c in captions[:-1])  # threshold 0: every lesion is flagged
        shown = pd.DataFrame(table["data"], columns=table["headers"])
        board = shown[shown["File"] == "checkerboard.png"].iloc[0]
        blank = [v for v in (board["P(melanoma) %"], board["Rank"], board["Flagged"]) if v == "" or pd.isna(v)]
        assert board["Dermoscopy check"] == "not_dermoscopy" and len(blank) == 3, board.to_dict()
        rows = pd.read_csv(csv_file, dtype=str, keep_default_na=False)
        board = rows[rows["file"] == "checkerboard.png"].iloc[0]
        assert board["rank"] == "" and board["above_threshold"] == "" and board["ood_level"] == "not_dermoscopy"
        assert list(rows["rank"][:3]) == ["1", "2", "3"] and set(rows["above_threshold"][:3]) == {"True"}
    finally:
        zoo.ood_detector = None
        zoo.get(None).melanoma_threshold = threshold


def _blocks_fn(demo, name: str):
    return next(f.fn for f in demo.fns.values() if f.name == name)


def _details_rows(details: str) -> dict[str, str]:
    """The model-details table as {row name: cell}; every line of it is a two-cell row."""
    lines = [line for line in details.splitlines() if line.startswith("|")]
    assert lines[1] == "|---|---|" and len(lines) >= 10, details
    cells = [re.fullmatch(r"\| (.+?) \| (.+?) \|", line) for line in lines[:1] + lines[2:]]
    assert all(cells), lines
    return {m.group(1): m.group(2) for m in cells}


def test_gallery_selection_and_model_switch(live, tmp_path, ham_image_paths):
    """The UI-only events (not API endpoints): per-image detail on gallery selection, and the
    model dropdown switching between rollout controls (ViT) and Grad-CAM (CNN)."""
    import gradio as gr

    import app as app_module
    from webapp.formatting import gallery_caption

    demo, _ = app_module.build_app(live[2])  # a second app on the same (already loaded) zoo
    paths = [str(p) for p in ham_image_paths[:4]]
    # Same file name from another folder (a different image): both must be kept apart.
    twin = tmp_path / ham_image_paths[0].name
    shutil.copy(ham_image_paths[5], twin)
    gallery, _, _, _, state = _blocks_fn(demo, "predict_batch")(
        paths + [str(twin)], "resnet18-tiny", progress=gr.Progress()
    )
    # The gallery and the state (which a selection indexes) are in the same order, highest P(mel) first.
    p_mel = [r.melanoma_probability for r in state.results]
    assert p_mel == sorted(p_mel, reverse=True)
    assert [c for _, c in gallery] == [gallery_caption(k, r) for k, r in enumerate(state.results, start=1)]
    # A possibly-not-dermoscopy image keeps its flag with a short caution; one that is clearly not
    # dermoscopy has neither rank nor score nor flag.
    top = state.results[0]
    flag = "above" if top.melanoma else "below"
    borderline = dataclasses.replace(top, ood=OODResult(True, 1.1, 1.0, "may not be dermoscopy", "possibly_not_dermoscopy"))
    assert gallery_caption(1, borderline) == f"#1 · {100 * p_mel[0]:.1f}% · {flag} threshold, caution"
    clear = dataclasses.replace(top, ood=OODResult(True, 9.0, 1.0, "not a lesion", "not_dermoscopy"))
    assert gallery_caption(None, clear) == "not ranked · not dermoscopy" and clear.melanoma is None
    twins = [i for i, r in enumerate(state.results) if r.name == twin.name]
    assert len(twins) == 2 and {state.paths[i] for i in twins} == {paths[0], str(twin)}
    assert state.results[twins[0]].probabilities != state.results[twins[1]].probabilities
    selected = gr.SelectData(None, {"index": 1, "value": None})
    probs, verdict, heatmap, plain = _blocks_fn(demo, "show_selected")(state, selected)
    second = state.results[1]
    assert second.name in verdict
    assert f"| Melanoma | {100 * second.probabilities['mel']:.1f}% |" in probs and second.name in probs
    assert plain.size == Image.open(ham_image_paths[[Path(p).name for p in paths].index(second.name)]).size
    assert "Explanation: Grad-CAM" in verdict and heatmap.shape[2] == 3

    examples = _blocks_fn(demo, "example_batch")()
    assert len(examples) >= 4 and all(Path(p).is_file() for p in examples)
    details, settings, start = _blocks_fn(demo, "on_model_change")("resnet18-tiny")
    rows = _details_rows(details)
    assert rows["Model"] == "**resnet18-tiny**" and rows["Architecture"] == "`timm/resnet18`"
    assert "Grad-CAM" in rows["Explanation"] and settings.visible is False  # no empty settings panel
    details, settings, start = _blocks_fn(demo, "on_model_change")("melanoma-vit-tiny")
    rows = _details_rows(details)
    entry = live[2].get("melanoma-vit-tiny")
    assert rows["License"] == "cc-by-nc-sa-4.0" and rows["Melanoma AUC (ISIC 2017 fixtures)"] == "0.500"
    assert rows["Melanoma threshold"] == (
        f"{100 * entry.melanoma_threshold:.1f}% on P(mel), chosen on validation for 95% melanoma sensitivity"
    )
    assert rows["Input"] == "32x32 px" and rows["Classes"] == "7" and "Extra heads" not in rows
    assert settings.visible is True and start.maximum == 1
    details, *_ = _blocks_fn(demo, "on_model_change")(MULTISOURCE)
    assert _details_rows(details)["Extra heads"].startswith("the seven-point checklist criteria, `derm7pt`, ")
    # A model change clears every result of the previous model, on both tabs.
    from webapp.ui import cleared

    clear_fn = next(f for f in demo.fns.values() if getattr(f.fn, "func", None) is cleared)
    assert clear_fn.targets[0][1] == "change" and len(clear_fn.outputs) == 14
    assert clear_fn.fn(MULTISOURCE) == (None,) * 14


def test_model_details_headline_the_tables_metrics_of_a_rendered_card(tmp_path_factory, fixtures_dir, tmp_path):
    """One table (model/metrics_schema.py) drives the card's model-index and the app's headline:
    AUC, balanced accuracy and the sensitivity at the validation threshold (named in percent, the
    page's unit, not the card's 0-1 value); not the rest."""
    from webapp.formatting import model_details_markdown
    from hub_cards.render import render_model_card
    from model.catalogue import parse_card
    from model.classifier import Classifier
    from test_hub_cards import SYNTHETIC_METRICS

    folder = tmp_path / "tiny"
    shutil.copytree(shared_tiny_models(tmp_path_factory, fixtures_dir) / "melanoma-vit-tiny", folder)
    (folder / "eval" / "ham10000_test").mkdir(parents=True)
    (folder / "eval" / "ham10000_test" / "metrics.json").write_text(json.dumps(SYNTHETIC_METRICS))
    render_model_card(folder, model_name="tiny").save(folder / "README.md")

    rows = _details_rows(model_details_markdown(Classifier(folder, model_id="tiny", card=parse_card(folder))))
    headline = {name: value for name, value in rows.items() if name.endswith("(HAM10000)")}
    assert headline == {
        "Melanoma ROC AUC (mel vs rest) (HAM10000)": "0.812",
        "Balanced accuracy (HAM10000)": "0.614",
        "Melanoma sensitivity at threshold 21.3% (HAM10000)": "0.941",
    }


def test_model_details_list_a_multisource_models_training_sources(tmp_path_factory, fixtures_dir, tmp_path):
    """A multi-source model without card datasets: "Training data" names its train_config.yaml's
    sources (as models/efficientnet-lite2 and melanoma-vit-hybrid ship), not "see the model card"."""
    from model.catalogue import parse_card
    from model.classifier import Classifier
    from webapp.formatting import model_details_markdown

    folder = shutil.copytree(shared_tiny_models(tmp_path_factory, fixtures_dir) / MULTISOURCE, tmp_path / "multi")
    sources = [{"name": name, "data": f"../shared/data/{name}", "weight": w} for name, w in
               [("ham10000", 0.45), ("isic2017", 0.35), ("derm7pt", 0.2)]]
    (folder / "train_config.yaml").write_text(yaml.safe_dump({"sources": sources}))
    entry = Classifier(folder, model_id="multi", card=parse_card(folder))
    assert entry.card.training_sources == ["ham10000", "isic2017", "derm7pt"]
    assert _details_rows(model_details_markdown(entry))["Training data"] == "HAM10000 + ISIC 2017 Part 3 + Derm7pt"


# ------------------------------------------------------------------- reliability and security


@pytest.mark.slow
def test_big_pngs_decode_within_300_mib_through_rest_and_gradio(live, tmp_path):
    url, client, _, _ = live
    pngs = big_pngs()
    for name, data in pngs.items():
        assert len(data) < MAX_UPLOAD, (name, len(data))  # small files, accepted uploads
        (tmp_path / name).write_bytes(data)
    growth = {}
    for name, data in pngs.items():
        before = reset_peak(os.getpid())  # the peak (VmHWM) restarts at the current RSS
        response = httpx.post(url + "predict", files={"file": (name, data)}, timeout=120)
        assert response.status_code == 200, response.text
        assert _poll(url, response.json()["task_uuid"], timeout=120)["status"] == "done"
        *_, record = client.predict(handle_file(str(tmp_path / name)), None, "mean", 0.9, 0, api_name="/predict")
        assert record["name"] == name
        growth[name] = server_memory_mib(os.getpid())[1] - before
    print(f"peak RSS growth per upload (REST + Gradio): {growth} MiB")
    assert all(g <= 300 for g in growth.values()), growth


@pytest.mark.slow
def test_memory_stays_bounded_over_many_page_sessions(live, ham_image_paths):
    """Each visitor is a new Gradio session; their predictions must not pile up in the server's
    memory (it grew ~8 MiB per session: a per-session copy of the page config, and images freed
    into per-thread malloc arenas). bench/bench_app.py --parts sessions measures the shipped model."""
    url, _, _, _ = live

    def visit(i: int) -> None:
        client = Client(url, verbose=False)
        client.predict(handle_file(str(ham_image_paths[i % 4])), None, "mean", 0.9, 0, api_name="/predict")
        client.close()

    for i in range(5):
        visit(i)
    before = server_memory_mib(os.getpid())[0]
    for i in range(30):
        visit(i)
    growth = server_memory_mib(os.getpid())[0] - before
    print(f"RSS growth over 30 new sessions: {growth} MiB")
    assert growth < 75, growth
    # No session holds its own copy of a page component (what returning gr.Image(label=...) did).
    demo = next(r.app.get_blocks() for r in live[3].routes if hasattr(getattr(r, "app", None), "get_blocks"))
    sessions = list(demo.state_holder.session_data.values())
    assert len(sessions) >= 30
    for session in sessions:
        assert all(session.blocks_config.blocks[i] is block for i, block in demo.default_config.blocks.items())


def test_csv_cells_cannot_be_formulas(live, tmp_path, ham_image_paths):
    _, client, _, _ = live
    names = ['=HYPERLINK("evil.example","x").jpg', "+1.jpg", "-2.jpg", "@sum.jpg", "plain.jpg"]
    uploads = []
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(ham_image_paths[i].read_bytes())
        uploads.append(handle_file(str(tmp_path / name)))
    (tmp_path / "=cmd.txt").write_text("not an image")  # a formula in an error row's file name too
    _, _, csv_path, _ = client.predict(uploads + [handle_file(str(tmp_path / "=cmd.txt"))], None, api_name="/predict_batch")
    files = sorted(pd.read_csv(csv_path)["file"].tolist())  # (Gradio URL-encodes the quotes in names)
    hyperlink = [f for f in files if "HYPERLINK" in f]
    assert len(hyperlink) == 1 and hyperlink[0].startswith("'=HYPERLINK(")
    assert [f for f in files if "HYPERLINK" not in f] == ["'+1.jpg", "'-2.jpg", "'=cmd.txt", "'@sum.jpg", "plain.jpg"]
    assert not any(str(cell).startswith(("=", "+", "-", "@", "\t", "\r")) for cell in pd.read_csv(csv_path).to_numpy().ravel())


def _raw_post(url: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict]:
    """A POST over a plain socket (headers that httpx would correct, e.g. a false Content-Length)."""
    import socket
    from urllib.parse import urlparse

    target = urlparse(url)
    headers = {"Host": target.netloc, **headers}
    lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    with socket.create_connection((target.hostname, target.port), timeout=30) as sock:
        sock.sendall("\r\n".join(lines).encode() + body)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload.decode())


def test_oversized_requests_get_413_before_the_body_is_read(live, ham_image_paths):
    url, _, _, _ = live
    boundary = "b0undary"
    multipart = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    # 300 MB declared, nothing sent: answered from the header alone (reading would hang for the body).
    start = time.monotonic()
    status, body = _raw_post(url, "/predict", {**multipart, "Content-Length": str(300 * 10**6)})
    assert status == 413 and body["detail"] == "File is larger than the 1 MB limit." and time.monotonic() - start < 10
    # Gradio's upload route: its own limit is per file, ours bounds the whole request.
    status, body = _raw_post(url, "/gradio_api/upload", {**multipart, "Content-Length": str(300 * 10**6)})
    assert status == 413 and body["detail"] == "Request body is larger than the 3 MB limit."
    status, body = _raw_post(url, "/predict_bulk", {**multipart, "Content-Length": str(300 * 10**6)})
    assert status == 413 and body["detail"] == "Request body is larger than the 3 MB limit."
    # No Content-Length (chunked): cut off once the stream passes the limit.
    def chunks():
        yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n".encode()
        for _ in range(100):
            yield b"\0" * 100_000  # 10 MB in all
    response = httpx.post(url + "predict_bulk", content=chunks(), headers=multipart, timeout=60)
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    # Over-many files: the app's own 413, not the multipart parser's 400.
    many = [("files", (f"{i}.jpg", b"x")) for i in range(1001)]
    response = httpx.post(url + "predict_bulk", files=many, timeout=60)
    assert response.status_code == 413 and response.json()["detail"] == "At most 1000 files per request."
    assert httpx.get(url + "public_models").status_code == 200  # still serving


def test_echoed_user_text_is_truncated(live, ham_image_paths):
    url, _, _, _ = live
    long_id = "x" * 60_000
    response = httpx.get(url + f"from_task/{long_id}")
    assert response.status_code == 404 and len(response.json()["detail"]) < 120
    response = httpx.post(url + "predict", params={"model_id": long_id}, files={"file": ("a.jpg", b"x")})
    assert response.status_code == 404 and len(response.json()["detail"]) < 400
    response = httpx.post(url + "predict_bulk", files=[("files", ("y" * 60_000 + ".txt", b"not an image"))])
    assert response.status_code == 400 and len(response.text) < 2000, response.text[:300]  # the name is not echoed whole


def test_cross_site_posts_are_refused_unless_allowed(live, ham_image_paths):
    url, _, _, _ = live
    upload = {"file": ("a.jpg", ham_image_paths[0].read_bytes())}
    evil = {"Origin": "https://evil.example"}
    response = httpx.post(url + "predict", files=upload, headers=evil)
    assert response.status_code == 403 and "MELANOMA_ALLOWED_ORIGINS" in response.json()["detail"]
    assert httpx.post(url + "gradio_api/upload", files={"files": ("a.jpg", b"x")}, headers=evil).status_code == 403
    assert httpx.get(url + "public_models", headers=evil).status_code == 200  # reading is not refused
    own = {"Origin": url.rstrip("/")}
    assert httpx.post(url + "predict", files=upload, headers=own).status_code == 200
    assert httpx.post(url + "predict", files=upload, headers={"Origin": PARTNER}).status_code == 200
    assert httpx.post(url + "predict", files=upload).status_code == 200  # no Origin: not a browser page
    # DNS rebinding: a page of evil.example (resolving to 127.0.0.1) sends a Host that matches its
    # Origin; the name is not one this server answers to. And the scheme must be the request's own.
    host = url.split("://", 1)[1].rstrip("/")
    port = host.rsplit(":", 1)[1]
    status, body = _raw_post(url, "/predict", {"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}",
                                               "Content-Length": "0"})
    assert status == 403 and "MELANOMA_ALLOWED_ORIGINS" in body["detail"]
    response = httpx.post(url + "predict", files=upload, headers={"Origin": f"https://{host}"})
    assert response.status_code == 403
    # Every answer forbids content sniffing, REST and Gradio alike.
    for response in (httpx.get(url + "public_models"), httpx.get(url), httpx.post(url + "predict", files=upload)):
        assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.slow
def test_disk_use_stays_flat_over_many_batches(tmp_path_factory, fixtures_dir, ham_image_paths):
    import app as app_module
    from model.catalogue import ModelCatalogue

    zoo = ModelCatalogue(models_dir=shared_tiny_models(tmp_path_factory, fixtures_dir), hub_ids=[], ood_path="none")
    # 4 s: long enough for gradio_client to fetch a batch's outputs on a busy machine before the
    # cleaner deletes them (at 1 s they were sometimes gone first: a 403 on the download).
    demo, fastapi_app = app_module.build_app(zoo, cache_ttl_s=4)
    server, thread = serve_in_thread(fastapi_app, port=app_module.free_port())
    url = f"http://127.0.0.1:{server.config.port}/"
    scratch = fastapi_app.state.scratch.path
    old_batch_dirs = set(Path(tempfile.gettempdir()).glob("melanoma_batch_*"))

    def disk_bytes() -> int:
        cached = [Path(f) for files in demo.temp_file_sets for f in files]
        mine = [p for p in scratch.rglob("*") if p.is_file()]
        return sum(p.stat().st_size for p in cached + mine if p.exists())

    try:
        client = Client(url, verbose=False)
        uploads = [handle_file(str(p)) for p in ham_image_paths[:6]]
        written, used = [], []
        for _ in range(6):
            client.predict(uploads, None, api_name="/predict_batch")
            written.append(disk_bytes())  # right after the batch: its CSV and overlays are on disk
            time.sleep(6.0)  # past the 4 s age and the cleaner's 1 s period
            used.append(disk_bytes())
        client.close()
        assert min(written) > 0, written  # every batch writes files: a cleaner with nothing to clean proves nothing
        assert all(u < w for u, w in zip(used, written)), (written, used)  # and they are removed again
        assert max(used[2:]) <= max(used[:2]) and len(list(scratch.iterdir())) <= 2, used
        assert set(Path(tempfile.gettempdir()).glob("melanoma_batch_*")) == old_batch_dirs  # none per batch
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not scratch.exists()  # removed at shutdown


def test_no_stray_temp_file_per_upload(tmp_path_factory, fixtures_dir, ham_image_paths, tmp_path, monkeypatch):
    """Issue 19: Gradio's file input made an empty temp file in its upload folder per file and call,
    never deleted. After single and batch predictions the folder holds the uploads (one folder each)
    and the outputs, and no loose file; REST leaves nothing in the temp folder either."""
    import app as app_module
    from model.catalogue import ModelCatalogue

    upload_dir = tmp_path / "gradio"  # this app's own, so other processes' uploads cannot interfere
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(upload_dir))
    zoo = ModelCatalogue(models_dir=shared_tiny_models(tmp_path_factory, fixtures_dir), hub_ids=[], ood_path="none")
    demo, fastapi_app = app_module.build_app(zoo)
    server, thread = serve_in_thread(fastapi_app, port=app_module.free_port())
    url = f"http://127.0.0.1:{server.config.port}/"
    try:
        client = Client(url, verbose=False, download_files=False)
        client.predict(handle_file(str(ham_image_paths[0])), None, api_name="/predict")
        client.predict([handle_file(str(p)) for p in ham_image_paths[:4]], None, api_name="/predict_batch")
        client.close()
        names = {p.name for p in ham_image_paths[:4]}
        uploads = [p for p in upload_dir.rglob("*") if p.is_file() and p.name in names]
        assert len(uploads) == 4  # the uploads are there: the check below looked in the right place
        assert [p.name for p in upload_dir.iterdir() if p.is_file()] == []
        assert [p for p in upload_dir.rglob("*") if p.is_file() and p.stat().st_size == 0] == []
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_model_picker_labels_are_plain_and_fit_a_phone():
    """The picker's labels for the shipped folders: what each model is in a word or two, at most 40
    characters (the dropdown's width at 390 px); the stock export says it is a copy."""
    from webapp.formatting import model_label

    root = Path(__file__).resolve().parents[1] / "models"
    labels = {p.name: model_label(p.name, str(p)) for p in sorted(root.iterdir()) if (p / "model.safetensors").is_file()}
    assert labels["efficientnet-lite2"] == "efficientnet-lite2 · CNN"
    assert labels["melanoma-vit"] == "melanoma-vit · ViT, checklist"
    assert labels["melanoma-vit-hf"] == "melanoma-vit-hf · ViT (stock copy)"
    assert labels["melanoma-vit-hybrid"] == "melanoma-vit-hybrid · CNN+ViT, checklist"
    assert labels["resnet18"] == "resnet18 · CNN"  # transformers' own ResNet: the model itself, not a copy
    assert all(len(label) <= 40 for label in labels.values()), labels


def test_partial_files_of_broken_uploads_are_swept(tmp_path_factory, fixtures_dir, ham_image_paths, tmp_path, monkeypatch):
    """Issue 19: an upload whose client goes away mid-body leaves Gradio's partial `tmp*` file in the
    upload folder for good. Once it is stale, the next upload removes it; a completed upload and a
    fresh partial file (an upload still in progress) are kept."""
    import os
    import socket
    import time

    import app as app_module
    from model.catalogue import ModelCatalogue

    upload_dir = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(upload_dir))
    monkeypatch.setenv("MELANOMA_STALE_UPLOAD_S", "2")
    zoo = ModelCatalogue(models_dir=shared_tiny_models(tmp_path_factory, fixtures_dir), hub_ids=[], ood_path="none")
    demo, fastapi_app = app_module.build_app(zoo)
    server, thread = serve_in_thread(fastapi_app, port=app_module.free_port())
    port = server.config.port
    url = f"http://127.0.0.1:{port}/"
    try:
        boundary = "b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode()
        body = head + os.urandom(2 * 2**20)  # 2 MiB of a declared 8 MiB, then the client goes away
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall((f"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                          f"Content-Length: {8 * 2**20}\r\n\r\n").encode() + body)
            time.sleep(1.0)
        deadline = time.monotonic() + 10
        while not (partial := [p for p in upload_dir.glob("tmp*") if p.is_file()]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert partial, "the broken upload left no partial file: nothing to sweep (Gradio changed?)"
        # stale = not written to for 2 s here ($MELANOMA_STALE_UPLOAD_S): wait until the server has
        # stopped writing the partial file (it may still drain what it received) for longer than that
        deadline = time.monotonic() + 60
        while any(time.time() - p.stat().st_mtime < 3 for p in partial) and time.monotonic() < deadline:
            time.sleep(0.5)
        fresh = upload_dir / "tmpinprogress"
        fresh.write_bytes(b"x" * 10)
        done = httpx.post(url + "gradio_api/upload", files={"files": ("a.jpg", ham_image_paths[0].read_bytes())})
        assert done.status_code == 200
        # The sweep runs once the upload's response is on its way: give it a moment.
        deadline = time.monotonic() + 10
        while any(p.exists() for p in partial) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(p.exists() for p in partial)
        assert fresh.exists()
        assert Path(done.json()[0]).is_file()  # the completed upload stays
    finally:
        server.should_exit = True
        thread.join(timeout=30)
