"""The real app in a real browser: headless Chromium (Debian's /usr/bin/chromium) via Playwright.

Serves app.py in-process on 127.0.0.1 with tiny real models (built by test_classifier's
`make_tiny_model_folders`, found through MELANOMA_MODELS_DIR) and the shipped OOD detector, then:
single image -> class probabilities + explanation heat map; batch of 5 -> ranked gallery whose
order matches the zoo's P(mel), with the natural photo marked "not dermoscopy?".
Screenshots go to artifacts/browser/ (git-ignored); the path is printed.

Chromium missing -> the test FAILS (CI installs it in .ci/run); set MELANOMA_SKIP_BROWSER=1 to skip.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect
from servers import serve_in_thread

from model.imageio import load_image
from model.labels import DX_NAMES

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("MELANOMA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "artifacts" / "browser"
GRACE_HOPPER = Path(np.__file__).resolve().parents[1] / "matplotlib" / "mpl-data" / "sample_data" / "grace_hopper.jpg"
TIMEOUT_MS = 90_000
CAPTION = re.compile(r"^#(\d+) · ([\d.]+)% · (above threshold|below threshold)(, caution)?$")
UNRANKED = "not ranked · not dermoscopy"  # an image that is clearly not dermoscopy: no rank, no score


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("MELANOMA_SKIP_BROWSER") == "1":
        pytest.skip("MELANOMA_SKIP_BROWSER=1")
    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it (`apt-get install -y chromium`, as .ci/run does), "
            "point MELANOMA_CHROMIUM at a Chromium binary, or set MELANOMA_SKIP_BROWSER=1 to skip this test."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def live_app(tmp_path_factory, fixtures_dir):
    """app.build_app() from the environment (MELANOMA_MODELS_DIR), served on a free local port."""
    from test_classifier import make_tiny_model_folders

    import app as app_module

    models_dir = tmp_path_factory.mktemp("browser_models")
    make_tiny_model_folders(models_dir, fixtures_dir, cnn=False)
    saved = {k: os.environ.get(k) for k in ("MELANOMA_MODELS_DIR", "MELANOMA_HUB_MODELS", "MELANOMA_DEFAULT_MODEL")}
    os.environ["MELANOMA_MODELS_DIR"] = str(models_dir)
    os.environ["MELANOMA_HUB_MODELS"] = ""
    os.environ["MELANOMA_DEFAULT_MODEL"] = "melanoma-vit-tiny"
    try:
        _, fastapi_app = app_module.build_app()
        zoo = fastapi_app.state.zoo
        assert zoo.ood_detector is not None, zoo.ood_note  # the shipped models/ood-detector
        port = app_module.free_port()
        server, thread = serve_in_thread(fastapi_app, port=port)
        yield f"http://127.0.0.1:{port}/", zoo
        server.should_exit = True
        thread.join(timeout=30)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture()
def page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    page.close()


# The element's text colour and the first opaque background behind it, as [r, g, b] lists.
CONTRAST_JS = """el => {
  const rgb = c => c.match(/[\\d.]+/g).map(Number);
  let bg = el, colour = null;
  while (bg) {
    const c = rgb(getComputedStyle(bg).backgroundColor);
    if (c.length < 4 || c[3] > 0.9) { colour = c.slice(0, 3); break; }
    bg = bg.parentElement;
  }
  return [rgb(getComputedStyle(el).color).slice(0, 3), colour || [255, 255, 255]];
}"""


def _contrast(fg: list[float], bg: list[float]) -> float:
    """WCAG 2 contrast ratio of two sRGB colours (0-255)."""
    def luminance(rgb: list[float]) -> float:
        c = [v / 255 for v in rgb]
        c = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
    high, low = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def _shot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_single_image_shows_probabilities_and_heatmap(browser, live_app, page, ham_image_paths):
    url, zoo = live_app
    page.goto(url)
    page.get_by_role("button", name="Classify", exact=True).wait_for()
    page.locator("input[type=file]").first.set_input_files(str(ham_image_paths[0]))
    page.get_by_role("button", name="Classify", exact=True).click()

    # The verdict appears with the melanoma probability, and the explanation image gets its new label.
    page.get_by_text("Melanoma probability:").wait_for()
    expect(page.get_by_text(re.compile(r"Explanation: attention rollout"))).to_be_visible()  # in the verdict
    heatmap = page.locator("#explanation-overlay img").first
    heatmap.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle())
    # The browser shows a real overlay: the lesion, visibly recoloured by the heat map.
    response = page.request.get(heatmap.get_attribute("src"))
    assert response.ok, response.status
    overlay = Image.open(io.BytesIO(response.body())).convert("RGB")
    original = load_image(ham_image_paths[0]).convert("RGB")
    assert overlay.size == original.size  # drawn over the whole upload at its own geometry, not a square crop
    # Recoloured where the map weighs (low weights are transparent, so most of the image stays).
    diff = np.abs(np.asarray(overlay, np.float32) - np.asarray(original, np.float32)).sum(-1)
    assert diff.mean() > 3.0 and np.percentile(diff, 95) > 30.0, (diff.mean(), np.percentile(diff, 95))
    expect(page.locator("#explanation-legend")).to_be_visible()  # the colour bar: low -> high
    # The first screen at 1400 px holds the result: the image, its explanation and the verdict.
    page.evaluate("window.scrollTo(0, 0)")
    for locator in (page.locator("#verdict"), heatmap, page.locator("img").filter(has_not=page.locator("#explanation-overlay")).first):
        box = locator.bounding_box()
        assert box is not None and box["y"] + min(box["height"], 100) <= 1000, box
    assert page.locator("#explanation-overlay").bounding_box()["y"] + 200 <= 1000
    # Moving the opacity slider redraws the overlay without another click on Classify.
    old_src = heatmap.get_attribute("src")
    opacity = page.locator("#overlay-opacity input[type=number]")
    opacity.fill("1")
    opacity.press("Enter")
    page.wait_for_function("([img, src]) => img.src !== src && img.complete", arg=[heatmap.element_handle(), old_src])
    opaque = Image.open(io.BytesIO(page.request.get(heatmap.get_attribute("src")).body())).convert("RGB")
    assert opaque.size == original.size
    assert np.abs(np.asarray(opaque, np.float32) - np.asarray(original, np.float32)).mean() > np.abs(
        np.asarray(overlay, np.float32) - np.asarray(original, np.float32)
    ).mean() + 5.0

    # The class list shows every class name in percent with one decimal; P(mel) matches the zoo's own
    # prediction, and the class list and the verdict show the same text.
    class_table = page.locator("table", has=page.get_by_text("Melanocytic nevus")).first
    cells = [row.split("\t") for row in class_table.locator("tbody tr").all_inner_texts()]
    assert sorted(name for name, _ in cells) == sorted(DX_NAMES.values()), cells
    assert all(re.fullmatch(r"\d+\.\d%", p) for _, p in cells), cells
    expected = zoo.get(None).predict([load_image(ham_image_paths[0], max_side=1024)])[0].probabilities["mel"]
    shown = page.get_by_text(re.compile(r"Melanoma probability: [\d.]+%")).inner_text()
    assert float(re.search(r"([\d.]+)%", shown).group(1)) == pytest.approx(100 * expected, abs=0.051)
    assert re.search(r"([\d.]+%)", shown).group(1) == dict(cells)["Melanoma"]
    assert "chosen on validation for 95% melanoma sensitivity" in page.get_by_text(re.compile("threshold of")).inner_text()
    # Model details are folded at first (the classifier comes first on a phone); opened, they are a
    # table whose threshold is the verdict's, in the same unit.
    assert not page.locator("table", has=page.get_by_text("Melanoma threshold")).first.is_visible()
    page.get_by_text("Model details", exact=True).click()
    verdict_threshold = re.search(r"threshold of ([\d.]+%)", page.get_by_text(re.compile("threshold of")).inner_text())
    details = page.locator("table", has=page.get_by_text("Melanoma threshold")).first
    details.wait_for(state="visible")  # the accordion opens asynchronously (empty rows on a busy machine)
    threshold_row = details.locator("tr", has=page.get_by_text("Melanoma threshold")).locator("td").all_inner_texts()
    assert threshold_row[1].startswith(f"{verdict_threshold.group(1)} on P(mel)"), threshold_row
    assert details.locator("tr", has=page.get_by_text("Architecture")).locator("td").all_inner_texts()[1] == "melanoma_vit"
    # WCAG AA contrast: the primary button and the small grey texts at least 4.5:1.
    for selector in ("button.primary", "[data-testid=block-label]", "#explanation-legend span"):
        colours = page.locator(selector).first.evaluate(CONTRAST_JS)
        assert _contrast(*colours) >= 4.5, (selector, colours, _contrast(*colours))
    # Headings never skip a level on the way down (h1 title, h2 verdict, h3 class table).
    levels = page.evaluate(
        "() => [...document.querySelectorAll('h1,h2,h3,h4,h5,h6')].filter(h => h.offsetParent)"
        ".map(h => +h.tagName[1])"
    )
    assert levels[0] == 1 and all(b <= a + 1 for a, b in zip(levels, levels[1:])), levels
    _shot(page, "single_image")
    # Phone width: the same result, readable without sideways scrolling of the page.
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_text("Melanoma probability:").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1
    _shot(page, "single_image_390px")
    # The model-details table goes below the dropdown and fits the width, names unbroken.
    box = details.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390, box
    name_cell = details.locator("td", has_text="Architecture").bounding_box()
    assert name_cell["height"] < 60, name_cell
    # The verdict names its model; choosing another model clears it (it would stand under the new name).
    page.set_viewport_size({"width": 1400, "height": 1000})
    expect(page.get_by_text(re.compile(r"Model: melanoma-vit-tiny\."))).to_be_visible()
    page.get_by_label("Model", exact=True).click()
    options = page.get_by_role("option")
    options.filter(has_not_text="melanoma-vit-tiny ·").first.click()
    expect(page.get_by_text("Melanoma probability:")).to_have_count(0)
    expect(page.get_by_text(re.compile(r"Model: melanoma-vit-tiny\."))).to_have_count(0)


def test_batch_is_ranked_by_melanoma_probability(browser, live_app, page, ham_image_paths, fixtures_dir):
    url, zoo = live_app
    files = [*ham_image_paths[:3], sorted((fixtures_dir / "isic2017" / "test").glob("*.jpg"))[0], GRACE_HOPPER]
    page.goto(url)
    page.get_by_role("tab", name="Batch").click()
    batch_button = page.get_by_role("button", name="Classify all")
    batch_button.wait_for()
    page.locator("input[type=file][multiple]").set_input_files([str(p) for p in files])
    # The upload finishes before the click counts: wait for every file in the File component's list,
    # which then folds away (its accordion names the count).
    for path in files:
        page.locator(f'[aria-label="{path.name}"]').first.wait_for(state="attached")
    page.get_by_text(f"Images: {len(files)} files (open to change)").wait_for()
    batch_button.click()

    captions = page.locator(".caption-label")
    expect(captions).to_have_count(len(files), timeout=TIMEOUT_MS)
    texts = captions.all_inner_texts()
    # The natural photo is clearly not dermoscopy: last, with neither rank nor score nor flag.
    assert texts[-1] == UNRANKED and UNRANKED not in texts[:-1], texts
    lesions = files[:-1]
    shown = [CAPTION.match(t).groups() for t in texts[:-1]]
    ranks = [int(rank) for rank, *_ in shown]
    probs = [float(p) for _, p, *_ in shown]
    assert ranks == list(range(1, len(lesions) + 1))
    assert probs == sorted(probs, reverse=True), probs
    # Captions are shown whole (not cut off with an ellipsis) at desktop and phone width.
    assert captions.evaluate_all("els => els.filter(e => e.scrollWidth > e.clientWidth + 1).length") == 0
    # The results table names the files in the same order and shows the same percentages.
    table = page.locator(".block", has=page.locator("th[title='P(melanoma) %']")).first
    # gr.Dataframe's body is a virtual grid: cell r, c is [data-testid=cell-r-c].
    rows = [[table.get_by_test_id(f"cell-{r}-{c}").inner_text().strip() for c in range(4)] for r in range(len(files))]
    # P(melanoma) % first, then Rank and File.
    names = [row[2] for row in rows[:-1]]
    assert [float(row[0]) for row in rows[:-1]] == probs
    assert rows[-1][2] == GRACE_HOPPER.name and rows[-1][1] in ("", "NaN", "<NA>") and rows[-1][0] in ("", "NaN")

    # Same order as ranking the zoo's own P(mel) (the app ranks records by it, highest first).
    entry = zoo.get(None)
    p_mel = {p.name: entry.predict([load_image(p, max_side=1024)])[0].probabilities["mel"] for p in lesions}
    assert names == sorted(p_mel, key=lambda n: -p_mel[n])
    for name, p in zip(names, probs):
        assert p == pytest.approx(100 * p_mel[name], abs=0.051)
    _shot(page, "batch_ranked")
    page.set_viewport_size({"width": 390, "height": 844})
    captions.first.wait_for()
    assert captions.evaluate_all("els => els.filter(e => e.scrollWidth > e.clientWidth + 1).length") == 0
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1
    _shot(page, "batch_ranked_390px")


# Elements in, or around, the gallery that scroll on their own: [tag, class, scrollHeight, clientHeight].
NESTED_SCROLLERS_JS = """g => {
  const scrolls = el => /(auto|scroll)/.test(getComputedStyle(el).overflowY) && el.scrollHeight > el.clientHeight + 1;
  const around = [];
  for (let el = g; el && el !== document.body && el !== document.documentElement; el = el.parentElement) around.push(el);
  return [...around, ...g.querySelectorAll('*')].filter(scrolls)
    .map(el => [el.tagName, String(el.className).slice(0, 60), el.scrollHeight, el.clientHeight]);
}"""


@pytest.mark.parametrize("width, height", [(1400, 1000), (390, 844)])
def test_batch_of_24_folds_the_upload_list_and_shows_the_whole_gallery(browser, live_app, ham_image_paths, fixtures_dir, tmp_path, width, height):
    """After a batch of 24 the upload list is folded away: the results start within one screen of the
    batch tab (not a page of file names further down), at desktop and phone width. The gallery grows
    with its rows: no scroll box inside the page's scroll (Gradio's own cut 24 images to two and a
    half rows), the last thumbnail and its whole caption are reached by scrolling the page."""
    url, _ = live_app
    sources = ham_image_paths + sorted((fixtures_dir / "isic2017" / "test").glob("*.jpg"))
    files = [shutil.copy(sources[i % len(sources)], tmp_path / f"patient_{i:02d}_{sources[i % len(sources)].name}")
             for i in range(24)]
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(url)
        page.get_by_role("tab", name="Batch").click()
        page.locator("input[type=file][multiple]").set_input_files([str(f) for f in files])
        page.get_by_text("Images: 24 files (open to change)").wait_for()  # every upload done, the list folded
        page.get_by_role("button", name="Classify all").click()
        expect(page.locator(".caption-label")).to_have_count(24, timeout=TIMEOUT_MS)
        # The upload list's rows are folded away (the names are in the results table).
        listed = page.locator(f'td.filename[aria-label="{Path(files[10]).name}"]')
        expect(listed).to_have_count(1)
        expect(listed).to_be_hidden()
        page.get_by_role("tab", name="Batch").evaluate("tab => tab.scrollIntoView({block: 'start'})")
        gallery = page.locator("#ranked-gallery")
        box = gallery.bounding_box()
        assert 0 <= box["y"] < height - 100, box  # the gallery's top (first thumbnails) on this screen
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1
        assert gallery.evaluate(NESTED_SCROLLERS_JS) == []
        # The last thumbnail, scrolled to by the page alone, is whole on the screen and not covered.
        items = gallery.locator(".thumbnail-item")
        expect(items).to_have_count(24)
        last = items.last
        page.evaluate("el => window.scrollTo(0, el.getBoundingClientRect().bottom + window.scrollY - window.innerHeight + 8)",
                      last.element_handle())
        box = last.bounding_box()
        assert 0 <= box["y"] and box["y"] + box["height"] <= height, box
        centre = [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2]
        assert last.evaluate("(el, [x, y]) => el.contains(document.elementFromPoint(x, y))", centre)
        # ...and shows its image (thumbnails load lazily, once scrolled to).
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=last.locator("img").element_handle())
        # Every caption whole (no ellipsis, no clipped line) and under its image, not over the lesion.
        captions = gallery.locator(".caption-label")
        assert captions.evaluate_all(
            "els => els.filter(e => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1).length"
        ) == 0
        assert last.evaluate(
            "el => el.querySelector('.caption-label').getBoundingClientRect().top >= el.querySelector('img').getBoundingClientRect().bottom - 1"
        )
        # The results table: every row without a scroll box of its own; on a desktop every column fits.
        table = page.locator("#batch-table")
        expect(table.get_by_text(Path(files[23]).name, exact=True)).to_be_visible()  # every row rendered
        assert table.evaluate(NESTED_SCROLLERS_JS) == []
        if width >= 1000:
            overflowing = table.evaluate("t => [...t.querySelectorAll('*')].filter(e => e.scrollWidth > e.clientWidth + 1 "
                                         "&& /(auto|scroll|hidden)/.test(getComputedStyle(e).overflowX)).length")
            assert overflowing == 0
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        table.screenshot(path=str(SCREENSHOTS / f"batch_24_table_{width}px.png"))
        gallery.screenshot(path=str(SCREENSHOTS / f"batch_24_gallery_{width}px.png"))
        page.screenshot(path=str(SCREENSHOTS / f"batch_24_{width}px.png"), full_page=True)
    finally:
        page.close()


def test_on_a_phone_the_page_scrolls_to_the_verdict_after_classify(browser, live_app, ham_image_paths):
    url, _ = live_app
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(str(ham_image_paths[0]))
        button = page.get_by_role("button", name="Classify", exact=True)
        page.wait_for_timeout(500)
        button.click()
        page.get_by_text("Melanoma probability:").wait_for()
        page.wait_for_function("() => window.scrollY > 0")
        box = page.locator("#verdict").bounding_box()
        assert -2 <= box["y"] < 844 / 2, box  # the verdict starts at the top half of the screen
        _shot(page, "single_image_390px_after_classify")
    finally:
        page.close()
