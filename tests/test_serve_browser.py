"""The web page of `keras-sd3 serve`, in a real browser against a real server on the embedded model.

Needs Chromium (Debian: `apt-get install -y chromium`) and Playwright for Python (`pip install playwright`;
its own browser download is not used). Not collected by a plain `python -m pytest` (see pyproject.toml):

    KERAS_BACKEND=torch python -m pytest -q tests/test_serve_browser.py

Steps: start `keras-sd3 serve` on a free port, open the page, write a prompt, set 40 steps, press Generate,
record the progress bar's values, wait for the picture in the gallery and read its pixels from the page;
"use these settings" fills the form back; then the inpainting tab: upload a picture, paint the top right
of it with the mouse, Generate, and check the mask that was sent, the result inside and outside it, and
the job's parameters.
"""

import base64
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a red circle on a blue background"
INPAINT_PROMPT = "a small red square in the top right on a white background"
TIMEOUT_MS = 180_000  # the first job loads the model; the machine may be busy
STEPS = 40  # enough that the 0.1 s progress polling sees the job between its first and last step


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def server(tmp_path):
    """A `keras-sd3 serve` process (torch backend) on a free port; its URL. Killed at teardown."""
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    env = dict(os.environ, KERAS_BACKEND="torch")
    process = subprocess.Popen([sys.executable, "-m", "keras_sd3.cli", "serve", "--port", str(port),
                                "--outputs", str(tmp_path / "outputs")], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{(tmp_path / 'server.log').read_text()}")
            try:
                if get_json(f"{url}/api/v1/health")["status"] == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer from {url}/api/v1/health in 120 s:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@contextlib.contextmanager
def chromium_page():
    """A Chromium page (Debian's chromium through Playwright) at 1280 x 800; JavaScript errors fail the test."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Chromium is not installed: install it with `sudo apt-get install -y chromium` (Debian / Ubuntu); "
                    "this test drives it through Playwright and does not use Playwright's own browser download")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is not installed: pip install playwright (no `playwright install` needed)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(TIMEOUT_MS)
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page
        finally:
            browser.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def decode_data_url(text):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[1]))))


def image_pixels(page, selector):
    """The RGB pixels of an <img> on the page, drawn on a canvas at its natural size."""
    width, height, data = page.evaluate("""(selector) => {
        const img = document.querySelector(selector);
        const canvas = document.createElement("canvas");
        canvas.width = img.naturalWidth;
        canvas.height = img.naturalHeight;
        const context = canvas.getContext("2d");
        context.drawImage(img, 0, 0);
        return [canvas.width, canvas.height, Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)];
    }""", selector)
    return np.asarray(data, np.uint8).reshape(height, width, 4)[..., :3]


def record_progress(page):
    """Records every value given to a progress bar in the running-jobs panel into window.progressSeen."""
    page.evaluate("""() => {
        window.progressSeen = [];
        const observer = new MutationObserver(() => {
            for (const bar of document.querySelectorAll("#active progress")) {
                const status = bar.parentElement.querySelector(".job-status").textContent;
                window.progressSeen.push([bar.value, bar.max, status]);
            }
        });
        observer.observe(document.getElementById("active"),
                         {subtree: true, childList: true, attributes: true, characterData: true});
    }""")


def card_meta(page, card):
    """The name -> value pairs under a gallery card's picture."""
    return page.eval_on_selector(f"{card} .card-meta", """(dl) => Object.fromEntries(
        [...dl.querySelectorAll("dt")].map((dt) => [dt.textContent, dt.nextElementSibling.textContent]))""")


def test_page_generates_then_inpaints(server, tmp_path):
    with chromium_page() as page:
        check_page(page, server, tmp_path)


def check_page(page, server, tmp_path):
    page.goto(server)
    page.wait_for_function("document.getElementById('model-info').textContent.includes('sd3_tiny_shapes')")
    assert "circle" in page.inner_text("#vocabulary")  # the embedded model's words
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"

    # --- text to image, with the progress bar watched
    page.fill("#prompt", PROMPT)
    page.fill("#num_steps", str(STEPS))
    page.uncheck("#seed-random")
    page.fill("#seed", "3")
    record_progress(page)
    with page.expect_response("**/api/v1/generate") as response:
        page.click("#generate")
    assert response.value.status == 202, response.value.text()
    job_id = response.value.json()["id"]
    card = f"#gallery .card[data-job='{job_id}']"
    page.wait_for_selector(f"{card}[data-state='done'] img")
    page.wait_for_function("(s) => document.querySelector(s).complete", arg=f"{card} img")

    seen = page.evaluate("window.progressSeen")
    fractions = sorted({value / maximum for value, maximum, _ in seen})
    assert len(fractions) > 1 and any(0 < f < 1 for f in fractions), seen
    assert any(re.fullmatch(rf"step ([1-9]\d*) / {STEPS}", status) and 0 < value < STEPS
               for value, _, status in seen), seen

    pixels = image_pixels(page, f"{card} img")
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 10, "the picture in the gallery is blank"
    red, blue = pixels[24:40, 24:40].mean((0, 1)), pixels[:6, :6].mean((0, 1))
    assert red[0] > red[2] and blue[2] > blue[0], (red, blue)  # a red circle on a blue background
    meta = card_meta(page, card)
    assert meta["seed"] == "3" and meta["steps"] == str(STEPS) and meta["size"] == "64 × 64", meta
    assert meta["task"] == "text-to-image" and page.inner_text(f"{card} .card-prompt") == PROMPT
    assert page.get_attribute(f"{card} a[download]", "href").startswith("/api/v1/images/")

    # "use these settings" puts the job's parameters back into the form
    page.fill("#prompt", "something else")
    page.check("#seed-random")
    page.click(f"{card} .use")
    assert page.input_value("#prompt") == PROMPT and page.input_value("#num_steps") == str(STEPS)
    assert page.input_value("#seed") == "3" and not page.is_checked("#seed-random")

    # --- inpainting: upload a picture, paint its top right with the mouse
    picture = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(picture).ellipse((4, 36, 24, 56), fill=(20, 60, 220))  # a small blue circle, bottom left
    picture.save(tmp_path / "input.png")
    original = np.asarray(picture).astype(int)

    page.click(".tab[data-task='inpaint']")
    page.fill("#prompt", INPAINT_PROMPT)
    page.set_input_files("#picture", str(tmp_path / "input.png"))
    page.wait_for_selector("#mask-canvas", state="visible")
    page.eval_on_selector("#brush", "(el) => { el.value = 48; el.dispatchEvent(new Event('input')); }")
    box = page.locator("#mask-canvas").bounding_box()
    for row in np.linspace(0.15, 0.35, 5):
        page.mouse.move(box["x"] + 0.62 * box["width"], box["y"] + row * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.85 * box["width"], box["y"] + row * box["height"], steps=6)
        page.mouse.up()

    with page.expect_request("**/api/v1/generate") as request, page.expect_response("**/api/v1/generate") as response:
        page.click("#generate")
    assert response.value.status == 202, response.value.text()
    body = request.value.post_data_json
    assert body["task"] == "inpaint" and body["prompt"] == INPAINT_PROMPT
    sent = decode_data_url(body["image"])
    assert sent.shape[:2] == (64, 64) and np.abs(sent[..., :3].astype(int) - original).max() <= 2
    mask = decode_data_url(body["mask"])
    mask = (mask if mask.ndim == 2 else mask[..., 0]) > 127  # white where painted, black elsewhere
    assert mask.shape == (64, 64)
    assert mask[12:20, 42:52].all() and not mask[32:].any() and not mask[:, :32].any(), mask.astype(int)

    job_id = response.value.json()["id"]
    card = f"#gallery .card[data-job='{job_id}']"
    page.wait_for_selector(f"{card}[data-state='done'] img")
    page.wait_for_function("(s) => document.querySelector(s).complete", arg=f"{card} img")
    result = image_pixels(page, f"{card} img").astype(int)
    inside = np.abs(result - original)[mask].mean()
    assert inside > 20, f"the painted area hardly changed (mean difference {inside:.1f})"
    far = np.abs(result - original)[40:, :32].mean()  # the bottom left, far from the mask
    assert far < 2, f"the picture changed outside the mask (mean difference {far:.1f})"
    assert card_meta(page, card)["task"] == "inpaint"

    job = get_json(f"{server}/api/v1/jobs/{job_id}")
    assert job["state"] == "done" and job["parameters"]["task"] == "inpaint"
    assert job["parameters"]["prompt"] == INPAINT_PROMPT and len(job["images"]) == 1
    assert page.locator("#gallery .card[data-state='done']").count() == 2
