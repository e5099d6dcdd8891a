"""The demo page (GET /) and the API docs (/api/docs) in a real browser: Debian's chromium,
driven by Playwright, against a real `bentoml serve`. Every request to a host other than the
server is blocked and recorded, so the page and the docs are proven to need nothing else.
Screenshots go to build/screenshots (kept as CI artifacts)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image
from serving import ROOT, start_server, stop_server

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "build" / "screenshots"


@pytest.fixture(scope="module")
def page_server(
    default_stored,
    imagenet_stored,
    detector_stored,
    siamese_stored,
    stylizer_stored,
    bentoml_home,
    tmp_path_factory,
):
    log = tmp_path_factory.mktemp("page") / "server.log"
    # What `make serve` serves, and a model of each other task.
    models = (
        "fashion-lenet5:latest,imagenet-efficientnet-lite0:latest,fashion-detector:latest,"
        "fashion-siamese:latest,styletransfer-multistyle26:latest"
    )
    proc, url = start_server(bentoml_home, log, models=models)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "chromium is not installed (make test installs it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, page_server):
    """A page whose every request off the server's host is aborted and recorded."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    blocked: list[str] = []
    allowed = urlparse(page_server).netloc

    def gate(route):
        url = route.request.url
        if urlparse(url).netloc == allowed or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    page.route("**/*", gate)
    page.blocked = blocked  # type: ignore[attr-defined]
    yield page
    context.close()


def _png_file(tmp_path: Path, name: str, pixels) -> Path:
    path = tmp_path / name
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return path


def test_uploading_a_test_image_shows_its_label_with_bars_and_latency(
    page, page_server, fashion_test, tmp_path
):
    boot = _png_file(tmp_path, "ankle-boot.png", fashion_test.images[0])  # label 9: Ankle boot
    trouser = _png_file(tmp_path, "trouser.png", fashion_test.images[2])  # label 1: Trouser
    page.goto(page_server + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    assert page.input_value("#model") == "fashion-lenet5"
    page.set_input_files("#files", [str(boot), str(trouser)])
    page.wait_for_selector(".card >> nth=1")
    cards = page.locator(".card")
    first = cards.nth(0).locator(".bar").first.inner_text()
    second = cards.nth(1).locator(".bar").first.inner_text()
    assert first.startswith("Ankle boot") and second.startswith("Trouser"), (first, second)
    assert cards.nth(0).locator(".bar").count() == 3  # top-k bars, 3 by default
    status = page.inner_text("#status")
    assert "2 image(s) by fashion-lenet5:" in status and " ms " in status
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "demo-page.png"), full_page=True)
    assert page.blocked == []  # type: ignore[attr-defined]


def test_a_dropped_colour_photo_is_classified_by_the_imagenet_model(
    page, page_server, photos, tmp_path
):
    cat = tmp_path / "chelsea.png"
    cat.write_bytes(photos["chelsea.png"])
    page.goto(page_server + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 1")
    page.select_option("#model", "imagenet-efficientnet-lite0")
    assert "shorter side to 256, centre crop 224x224" in page.inner_text("#task")
    # A real drop: a DataTransfer holding the file, dispatched on the drop zone.
    page.evaluate_handle(
        """async (bytes) => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], "chelsea.png", {type: "image/png"}));
            document.getElementById("single").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        list(cat.read_bytes()),
    )
    page.wait_for_selector(".card")
    top = page.locator(".card .bar").first.inner_text()
    assert top.split("\n")[0] in {"Egyptian Mau", "tabby cat", "a cat having a striped coat"}, top
    assert "by imagenet-efficientnet-lite0:" in page.inner_text("#status")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "demo-page-photo.png"), full_page=True)
    assert page.blocked == []  # type: ignore[attr-defined]


def _open(page, page_server, model: str) -> None:
    page.goto(page_server + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 4")
    page.select_option("#model", model)


def test_the_detect_view_draws_each_box_with_its_label_and_score(page, page_server, tmp_path):
    from convserve.models.data import load_scenes

    scene = _png_file(tmp_path, "scene.png", load_scenes("test", 4).images[2])
    expected = httpx.post(
        f"{page_server}/detect",
        params={"score_threshold": 0.25},
        files=[("images", ("scene.png", scene.read_bytes()))],
    ).json()
    found = expected["results"][0]["detections"]
    _open(page, page_server, "fashion-detector")
    assert page.is_visible("#score") and not page.is_visible("#topk")
    page.set_input_files("#files", str(scene))
    page.wait_for_selector(".card .scene")
    page.wait_for_function(f"document.querySelectorAll('.box').length === {len(found)}")
    labels = page.locator(".box span").all_inner_texts()
    assert labels == [f"{d['label']} {d['score']:.2f}" for d in found]
    assert f"{len(found)} object(s) in 1 image(s)" in page.inner_text("#status")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "demo-page-detect.png"), full_page=True)
    assert page.blocked == []  # type: ignore[attr-defined]


def test_the_verify_view_compares_two_images(page, page_server, fashion_test, tmp_path):
    a = _png_file(tmp_path, "a.png", fashion_test.images[0])
    _open(page, page_server, "fashion-siamese")
    assert page.is_visible("#pair") and not page.is_visible("#single")
    page.set_input_files("#file-a", str(a))
    page.set_input_files("#file-b", str(a))  # the same image twice: distance 0, "same"
    page.wait_for_selector(".verdict")
    assert page.inner_text(".verdict") == "same"
    assert "squared distance 0.0000" in page.inner_text(".card")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "demo-page-verify.png"), full_page=True)
    assert page.blocked == []  # type: ignore[attr-defined]


def test_the_stylize_view_shows_the_result_beside_the_upload(page, page_server, photos, tmp_path):
    photo = tmp_path / "coffee.jpg"
    img = Image.open(io.BytesIO(photos["coffee.png"])).convert("RGB").resize((240, 160))
    img.save(photo, "JPEG")
    _open(page, page_server, "styletransfer-multistyle26")
    page.fill("#style", "3:0.5,12:0.5")
    page.set_input_files("#files", str(photo))
    page.wait_for_function(
        "document.getElementById('stylized') && "
        "document.getElementById('stylized').naturalWidth > 0"
    )
    size = page.evaluate(
        "[document.getElementById('stylized').naturalWidth, "
        "document.getElementById('stylized').naturalHeight]"
    )
    assert size == [240, 160]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "demo-page-stylize.png"), full_page=True)
    assert page.blocked == []  # type: ignore[attr-defined]


def test_a_corrupt_file_shows_the_api_error_message(page, page_server, fashion_test, tmp_path):
    good = _png_file(tmp_path, "x.png", fashion_test.images[0]).read_bytes()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good[:60])
    expected = httpx.post(
        f"{page_server}/classify", files=[("images", ("corrupt.png", corrupt.read_bytes()))]
    ).json()["error"]
    page.goto(page_server + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.set_input_files("#files", str(corrupt))
    page.wait_for_selector("#status.error")
    shown = page.inner_text("#status")
    assert shown == f"400 {expected['code']}: {expected['message']}", shown
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "demo-page-error.png"))
    assert page.blocked == []  # type: ignore[attr-defined]


def test_api_docs_render_the_classify_operation_offline(page, page_server):
    page.goto(page_server + "/api/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=20_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any(p.strip().replace("\u200b", "") == "/classify" for p in paths), paths
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "api-docs.png"))
    assert page.blocked == []  # type: ignore[attr-defined]


def test_the_page_and_docs_reference_no_external_url(page_server):
    for path in ("/", "/api/docs"):
        html = httpx.get(page_server + path).text
        assert "http://" not in html and "https://" not in html, path


TOKEN = "page-token-5d1e9a7c"


@pytest.fixture(scope="module")
def token_server(default_stored, bentoml_home, tmp_path_factory):
    log = tmp_path_factory.mktemp("page-token") / "server.log"
    proc, url = start_server(bentoml_home, log, models="fashion-lenet5:latest", api_token=TOKEN)
    yield url
    stop_server(proc)


def test_the_page_asks_for_the_token_once_when_the_server_needs_one(
    browser, token_server, fashion_test, tmp_path
):
    """The page loads without a token; the API's 401 makes it ask, once, and the answer
    (kept for the tab) goes with every request after."""
    boot = _png_file(tmp_path, "ankle-boot.png", fashion_test.images[0])
    context = browser.new_context()
    page = context.new_page()
    asked: list[str] = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.accept(TOKEN)

    page.on("dialog", answer)
    sent: dict[str, str | None] = {}  # the last request to each API path: its Authorization
    page.on(
        "request", lambda r: sent.update({urlparse(r.url).path: r.headers.get("authorization")})
    )
    page.goto(token_server + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.set_input_files("#files", [str(boot)])
    page.wait_for_selector(".card")
    assert page.locator(".card .bar").first.inner_text().startswith("Ankle boot")
    assert len(asked) == 1 and "CONVSERVE_API_TOKEN" in asked[0]
    assert sent["/classify"] == sent["/models"] == f"Bearer {TOKEN}"
    context.close()
