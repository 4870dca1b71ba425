"""`cyborg annotate` in a real browser: headless Chromium (Debian's `chromium` package) driven by
Playwright's Python API. Open the page, judge an image, paint a stroke, reload mid-session and resume,
check the stored mask's pixels; name an annotator in the form; check a photo through the gRPC server.

Needs `apt-get install chromium` (CI's .ci/run installs it) and the `playwright` pip package (the dev
extra); never `playwright install`. Skipped, saying which is missing, without them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = os.environ.get("CYBORG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("no Chromium: `apt-get install chromium` (Debian) or set CYBORG_CHROMIUM to a Chromium binary", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (dev extra): pip install -e '.[dev]'")
pytest.importorskip("aiohttp", reason="the annotate extra (aiohttp): pip install -e '.[annotate]'")

from annotate.app import AppConfig, PhotoChecker, create_app, start  # noqa: E402
from tests.datasets import make_plain_dataset  # noqa: E402
from training.annotations import Session  # noqa: E402

SIZE = 64
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]  # fmt: skip
TIMEOUT_MS = 15_000


class RunningApp:
    """The web app on a loopback port, served by an event loop on a background thread."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="annotate-app", daemon=True)

    def __enter__(self) -> RunningApp:
        self.thread.start()
        self.runner, self.port = asyncio.run_coroutine_threadsafe(start(create_app(self.config)), self.loop).result(30)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        # launch() gives every run a fresh temporary profile (--user-data-dir).
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS, timeout=60_000)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], errors


@pytest.fixture
def session(tmp_path):
    data = make_plain_dataset(tmp_path, n_real=2, n_fake=2, size=SIZE, maps=False)
    return Session.create_or_open(tmp_path / "session", data, seed=0)


def wait_ready(page, position: int) -> None:
    page.wait_for_selector(f"#stage[data-ready='{position}']")


def paint_line(page, start: tuple[float, float], end: tuple[float, float], steps: int = 12) -> None:
    """Drag the mouse across the painting canvas between two points given as fractions of the image."""
    box = page.locator("#paint").bounding_box()
    point = lambda f: (box["x"] + f[0] * box["width"], box["y"] + f[1] * box["height"])  # noqa: E731
    page.mouse.move(*point(start))
    page.mouse.down()
    page.mouse.move(*point(end), steps=steps)
    page.mouse.up()


def test_judge_paint_reload_resume_and_the_stored_mask(page, session, tmp_path):
    with RunningApp(AppConfig(session)) as app:
        page.goto(f"{app.url}/?annotator=alice")
        wait_ready(page, 0)
        assert page.locator("#progress").inner_text() == "0 / 4 done"
        assert page.locator("#save").is_disabled()
        first = session.queue("alice")[0].item
        page.click("#fake")
        paint_line(page, (0.25, 0.5), (0.75, 0.5))
        page.click("#undo")  # undo the stroke, paint it again: only the second one is kept
        paint_line(page, (0.25, 0.5), (0.75, 0.5))
        if os.environ.get("CYBORG_SCREENSHOTS"):
            page.screenshot(path=str(Path(os.environ["CYBORG_SCREENSHOTS"]) / "annotate-test.png"))
        page.click("#save")
        wait_ready(page, 1)
        assert page.locator("#progress").inner_text() == "1 / 4 done"

        # Mid-session: the second image judged, a stroke painted, not saved; the page reloads.
        page.keyboard.press("r")
        paint_line(page, (0.1, 0.1), (0.2, 0.2))
        page.reload()
        wait_ready(page, 1)  # resumes at the first unanswered image
        assert page.locator("#progress").inner_text() == "1 / 4 done"
        assert page.locator("#real").get_attribute("aria-pressed") == "false"  # nothing of the unsaved answer
        page.keyboard.press("r")
        page.keyboard.press("Enter")  # an answer with no stroke is allowed (an empty mask)
        wait_ready(page, 2)

    answers = session.log("alice").answers()
    assert [(a["position"], a["image"], a["decision"]) for a in answers] == [(0, first.id, "fake"), (1, session.queue("alice")[1].item.id, "real")]
    assert 0 < answers[0]["time_ms"] < 60_000
    mask = np.asarray(Image.open(session.root / answers[0]["mask"]))
    assert mask.shape == (SIZE, SIZE)
    row = SIZE // 2
    assert mask[row, int(0.3 * SIZE) : int(0.7 * SIZE)].min() == 255  # along the stroke
    assert mask[: row - 8].max() == 0 and mask[row + 8 :].max() == 0  # nowhere else
    assert 0.02 < answers[0]["marked_fraction"] < 0.2
    assert np.asarray(Image.open(session.root / answers[1]["mask"])).max() == 0


def test_name_form_zoom_and_finish(page, tmp_path):
    data = make_plain_dataset(tmp_path, n_real=1, n_fake=0, size=SIZE, maps=False)
    session = Session.create_or_open(tmp_path / "one", data, seed=0, show_label=True)
    with RunningApp(AppConfig(session)) as app:
        page.goto(app.url)
        page.fill("#name", "bob")
        page.click("#name-form button")
        wait_ready(page, 0)
        assert page.locator("#who").inner_text() == "annotator: bob"
        assert page.locator("#label-hint").inner_text() == "(labelled real)"
        page.click("#zoom-full")
        assert page.locator("#zoom-level").inner_text() == "100%"
        assert page.locator("#stage").bounding_box()["width"] == pytest.approx(SIZE, abs=1)
        page.click("#zoom-in")
        assert page.locator("#zoom-level").inner_text() == "125%"
        page.click("#real")
        page.click("#save")
        page.wait_for_selector("#finished:not([hidden])")
        page.reload()  # the name is remembered in this browser; still finished
        page.wait_for_selector("#finished:not([hidden])")
    assert session.log("bob").answers()[0]["label_shown"] is True


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory):
    pytest.importorskip("onnx", reason="onnx builds the tiny test model")
    from tests.serving_fixtures import RunningServer, build_model_repository

    repository = build_model_repository(tmp_path_factory.mktemp("repo"), name="tiny", versions=(1,), size=32)
    with RunningServer(repository) as running:
        yield running


def test_check_a_photo_page(page, session, grpc_server, tmp_path):
    photo = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(photo)
    checker = PhotoChecker(grpc_server.address, timeout=20, input_kind="aligned")
    try:
        with RunningApp(AppConfig(session, checker=checker)) as app:
            page.goto(f"{app.url}/check")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#result:not([hidden])")
            label = page.locator("#verdict").get_attribute("data-label")
            assert label in ("real", "fake") and "% fake" in page.locator("#verdict").inner_text()
            assert "model tiny v1" in page.locator("#details").inner_text()
            assert page.locator("#heatmap").get_attribute("src").startswith("data:image/png;base64,")
            assert page.locator("#heatmap").evaluate("image => image.naturalWidth") > 0
            if os.environ.get("CYBORG_SCREENSHOTS"):
                page.screenshot(path=str(Path(os.environ["CYBORG_SCREENSHOTS"]) / "check-test.png"))
            page.set_input_files("#file", {"name": "bad.png", "mimeType": "image/png", "buffer": b"not an image"})
            sync_api.expect(page.locator("#check-status")).to_contain_text("failed: ")  # (the page's CSP forbids eval'd waits)
            assert "INVALID_ARGUMENT" in page.locator("#check-status").inner_text()
    finally:
        checker.close()
