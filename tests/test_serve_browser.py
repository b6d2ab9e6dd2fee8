"""``parauni serve`` end to end: the Gradio app on a localhost port, driven in headless Chromium by Playwright.

A tiny random model is saved to a folder and served as ``--model tiny=DIR`` would serve it. The test types a
prompt, generates, fetches the gallery's image and checks it is a PNG of the requested size; uploads a text
file named ``.png`` and checks the error in the page; then checks the server still answers (a real
reconstruction and the last-layer vs all-layer comparison), and that the page asked nothing of the network.

Needs Gradio, the playwright package and a Chromium binary (Debian's ``chromium`` at /usr/bin/chromium, or
$PARAUNI_CHROMIUM); it skips, saying which is missing, otherwise. Playwright's own browser download is never
used.
"""

from __future__ import annotations

import io
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="parauni serve needs Gradio: pip install -e '.[serve]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs `pip install playwright`"
)

from parauni.serve import ServeSettings, build_app, launch, load_served  # noqa: E402

CHROMIUM = os.environ.get("PARAUNI_CHROMIUM", "/usr/bin/chromium")
# Headless as root, and none of Chromium's own calls home (this machine's network is closed).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The app serving the tiny model on a free localhost port; yields its URL."""
    folder = tmp_path_factory.mktemp("serve") / "tiny"
    tiny_model.save_pretrained(folder)
    settings = ServeSettings(port=_free_port(), max_steps=8, max_scale=2)
    app = build_app(load_served([f"tiny={folder}"], []), settings)
    launch(app, settings, block=False)
    yield f"http://127.0.0.1:{settings.port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set PARAUNI_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _gallery_pngs(page, gallery: str, count: int) -> list[Image.Image]:
    """Wait for `count` images in the gallery, fetch each one and open it as a PNG."""
    images = page.locator(f"{gallery} img")
    sync_api.expect(images).to_have_count(count, timeout=TIMEOUT_MS)
    out = []
    for i in range(count):
        body = page.request.get(images.nth(i).get_attribute("src")).body()
        assert body[:8] == b"\x89PNG\r\n\x1a\n", f"{gallery} image {i} is not a PNG: {body[:16]!r}"
        out.append(Image.open(io.BytesIO(body)))
    return out


def test_serve_in_a_browser(browser, server, tmp_path):
    page = browser.new_page()
    external = []
    host = urlparse(server).netloc
    page.on("request", lambda r: None if urlparse(r.url).netloc in (host, "") else external.append(r.url))
    expect = sync_api.expect
    page.goto(server)

    # (1) text to image at a non-square size
    page.locator("#t2i-prompt textarea").fill("a photo of a red circle")
    page.locator("#t2i-width input").fill("96")
    page.locator("#t2i-generate").click()
    expect(page.locator("#t2i-status textarea")).to_have_value("1 image(s) from tiny", timeout=TIMEOUT_MS)
    [image] = _gallery_pngs(page, "#t2i-gallery", 1)
    assert image.size == (96, 64)

    # (2) a text file named .png is answered in the page, not by a crash
    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file, not a picture")
    page.get_by_role("tab", name="Image to image").click()
    upload = page.locator("#i2i-upload")
    upload.locator("input[type=file]").set_input_files(fake)
    expect(upload.get_by_label("notes.png")).to_be_visible(timeout=TIMEOUT_MS)
    page.locator("#i2i-generate").click()
    expect(page.locator("#i2i-status textarea")).to_have_value(
        re.compile(r"^Error: the upload notes\.png is not an image"), timeout=TIMEOUT_MS
    )

    # (3) the server still answers: a real image is reconstructed ...
    real = tmp_path / "real.png"
    Image.new("RGB", (50, 40), (30, 90, 200)).save(real)
    upload.get_by_role("button", name="Clear").click()
    upload.locator("input[type=file]").set_input_files(real)
    expect(upload.get_by_label("real.png")).to_be_visible(timeout=TIMEOUT_MS)
    page.locator("#i2i-generate").click()
    expect(page.locator("#i2i-status textarea")).to_have_value("reconstructed by tiny", timeout=TIMEOUT_MS)
    assert [im.size for im in _gallery_pngs(page, "#i2i-gallery", 2)] == [(64, 64), (64, 64)]

    # ... and the comparison renders the masked last-layer and the all-layer columns with one seed
    page.get_by_role("tab", name="Last layer vs all layers").click()
    expect(page.get_by_text("No last-layer model is served")).to_be_visible()
    page.locator("#cmp-prompt textarea").fill("two blue squares")
    page.locator("#cmp-generate").click()
    expect(page.locator("#cmp-status textarea")).to_have_value("2 columns, seed 0", timeout=TIMEOUT_MS)
    assert len(_gallery_pngs(page, "#cmp-gallery", 2)) == 2

    assert page.request.get(server).ok
    assert external == [], f"the page reached beyond {host}: {external}"
    page.close()
