"""The web demo page: served files, and a headless-Chromium run that uploads an image and sees a drawn box."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch

from vlmkit.infer.api import ServerConfig
from vlmkit.infer.generate import Predictor
from vlmkit.infer.server import create_app
from vlmkit.infer.web import STATIC_FILES, static_text

from conftest import random_image
from serving import ServerThread

ANSWER = "<ref>the red circle</ref><box>(100,200),(500,700)</box>"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


class ScriptedPredictor(Predictor):
    """The real Predictor (template, preprocessing, decode-diff, box mapping) whose model always says ANSWER."""

    def _decode(self, batch, config, streamer) -> None:
        tokens = self.model.tokenizer.encode(ANSWER, add_special_tokens=False)
        tokens.append(self.model.llm.eos_token_ids[0])
        for token in tokens[: config.max_new_tokens]:
            streamer(torch.full((batch["input_ids"].shape[0],), token))


@pytest.fixture(scope="module")
def server(tiny_vlm):
    config = ServerConfig(model_name="scripted", continuous_batching=False)  # the script runs in `generate`
    with ServerThread(create_app(ScriptedPredictor(tiny_vlm), config)) as srv:
        yield srv


def test_page_and_assets_are_served(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text and 'id="image-input"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in STATIC_FILES:
        assert static_text(name)  # packaged with the library
    script = httpx.get(f"{server.url}/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "vlm-box" in script.text and "/v1/chat/completions" in script.text
    assert httpx.get(f"{server.url}/static/app.css").text == static_text("app.css")
    for bad in ("/static/server.py", "/static/..%2Fserver.py", "/static/index.html"):
        response = httpx.get(f"{server.url}{bad}")
        assert response.status_code == 404 and "error" in response.json()
    assert "/" not in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_boxes_come_back_in_original_pixels(server):
    import base64
    import io

    buf = io.BytesIO()
    random_image(0, (1200, 900)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "where?"},
                ],
            }
        ]
    }
    message = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0][
        "message"
    ]
    assert message["content"] == ANSWER
    assert message["boxes"] == [{"ref": "the red circle", "box": [120.0, 180.0, 600.0, 630.0], "image": 0}]


def _driver(profile: Path):
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(
            "needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def test_browser_draws_the_box_over_the_uploaded_image(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image_path = tmp_path / "scene.png"
    random_image(7, (1200, 900)).save(image_path)
    driver = _driver(tmp_path / "profile")
    try:
        driver.get(f"{server.url}/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "model-name").text == "scripted")
        driver.find_element(By.ID, "image-input").send_keys(str(image_path))
        wait.until(lambda d: d.execute_script("return document.getElementById('image').naturalWidth") == 1200)
        driver.find_element(By.ID, "prompt").send_keys("Where is the red circle?")
        driver.find_element(By.ID, "send").click()
        box = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay .vlm-box"))[0]
        wait.until(lambda d: ANSWER in d.find_element(By.ID, "log").text)
        geometry = driver.execute_script(
            """const img = document.getElementById('image').getBoundingClientRect();
               const box = arguments[0].getBoundingClientRect();
               return {ix: img.left, iy: img.top, iw: img.width, ih: img.height,
                       bx: box.left, by: box.top, bw: box.width, bh: box.height};""",
            box,
        )
        driver.save_screenshot(str(tmp_path / "web_demo.png"))
        label = box.find_element(By.CLASS_NAME, "vlm-box-label").text
        data = box.get_attribute("data-box")
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)

    assert data == "120,180,600,630"  # original-image pixels from the server
    assert label == "the red circle"
    scale_x, scale_y = geometry["iw"] / 1200, geometry["ih"] / 900
    assert 0.1 < scale_x < 1.0 and scale_x == pytest.approx(scale_y, rel=0.02)  # scaled down to fit
    assert geometry["bx"] - geometry["ix"] == pytest.approx(120 * scale_x, abs=1.5)
    assert geometry["by"] - geometry["iy"] == pytest.approx(180 * scale_y, abs=1.5)
    assert geometry["bw"] == pytest.approx(480 * scale_x, abs=1.5)
    assert geometry["bh"] == pytest.approx(450 * scale_y, abs=1.5)
    screenshot = tmp_path / "web_demo.png"
    assert screenshot.stat().st_size > 1000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
