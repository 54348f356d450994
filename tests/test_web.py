"""cxrgen serve: the upload page in headless Chromium, the JSON API and the upload limits.

The server runs as a subprocess on a free port of 127.0.0.1 with the small trained
workspace. Chromium and chromium-driver come from Debian (``apt-get install chromium
chromium-driver``; .ci/run installs them). Set CXRGEN_SCREENSHOT=PATH to save a
screenshot of the page with its report.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import REPO_ROOT
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1100,1250",
]
MAX_UPLOAD_MB = 2
MAX_PIXELS = 4_000_000
STARTUP_SECONDS = 240


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_workspace, tmp_path_factory):
    """Start ``cxrgen serve`` on 127.0.0.1 and return its base URL once /health responds."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--repo", str(trained_workspace), "--port", str(port),
               "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-pixels", str(MAX_PIXELS)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, process, log_path)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_for_health(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"cxrgen serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"cxrgen serve did not answer within {STARTUP_SECONDS} s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def radiographs(shared_data) -> list[Path]:
    return sorted((shared_data / "nih-cxr-sample").glob("*.png"))[-2:]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _raw_post(url: str, headers: str) -> str:
    """Send a POST with the given header lines and no body; return the response's status line."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(f"POST /api/report HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
        return connection.recv(4096).decode("latin-1").split("\r\n", 1)[0]


def test_busy_port_is_an_error():
    import click

    from pipeline.cli import _require_free_port

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(click.ClickException, match=f"cannot listen on 127.0.0.1:{port} .*choose another --port"):
            _require_free_port("127.0.0.1", port)
    _require_free_port("127.0.0.1", port)  # free again once the listener has closed


def test_health_names_model(server):
    assert requests.get(f"{server}/health", timeout=10).json() == {"status": "ok", "model": "spatial", "attention": True}


def test_api_report_matches_predict(server, predictor, radiographs):
    files = {name: (path.name, path.read_bytes(), "image/png") for name, path in zip(("frontal", "lateral"), radiographs, strict=True)}
    response = requests.post(f"{server}/api/report", files=files, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["report"] == predictor.predict(*radiographs).report
    assert body["single_view"] is False
    assert any("RANDOM WEIGHTS" in warning for warning in body["warnings"])


def test_empty_lateral_field_means_single_view(server, radiographs):
    files = {"frontal": ("f.png", radiographs[0].read_bytes(), "image/png"), "lateral": ("", b"", "application/octet-stream")}
    response = requests.post(f"{server}/", files=files, timeout=120)
    assert response.status_code == 200, response.text[-2000:]
    assert 'id="report"' in response.text
    assert "single view: the one radiograph is used for both views" in response.text


@pytest.mark.parametrize(("upload", "status", "message"), [
    (b"", 400, "frontal view: the file is empty"),
    (b"GIF89a" + bytes(64), 415, "upload a PNG or JPEG file"),
    (_png(2100, 2000), 422, "2100x2000 is 4.2 megapixels, over the limit of 4 megapixels"),
    (b"\x89PNG" + bytes(MAX_UPLOAD_MB * 2**20 + 10), 413, "over the limit of 2 MiB per image"),
])
def test_rejected_uploads(server, upload, status, message):
    files = {"frontal": ("upload.png", upload, "image/png")}
    page = requests.post(f"{server}/", files=files, timeout=120)
    api = requests.post(f"{server}/api/report", files=files, timeout=120)
    assert page.status_code == api.status_code == status
    assert message in page.text
    assert message in api.json()["error"]


def test_form_without_frontal_rejected(server, radiographs):
    files = {"lateral": ("l.png", radiographs[1].read_bytes(), "image/png")}
    page = requests.post(f"{server}/", files=files, timeout=120)
    api = requests.post(f"{server}/api/report", files=files, timeout=120)
    assert page.status_code == api.status_code == 422
    assert "the form lacks a valid frontal" in page.text
    assert "the form lacks a valid frontal" in api.json()["error"]


def test_undecodable_png_named_by_view(server):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    files = {"frontal": ("scan.png", buffer.getvalue()[:300], "image/png")}
    response = requests.post(f"{server}/api/report", files=files, timeout=120)
    assert response.status_code in (415, 422), response.text
    error = response.json()["error"]
    assert error.startswith("frontal view"), error
    assert "cxrgen-upload-" not in error


def test_gif_image_is_rejected(server):
    buffer = io.BytesIO()
    Image.new("L", (64, 64)).save(buffer, format="GIF")
    response = requests.post(f"{server}/api/report", files={"frontal": ("a.gif", buffer.getvalue(), "image/gif")}, timeout=60)
    assert response.status_code == 415
    assert "GIF images are not accepted" in response.json()["error"]


def test_oversized_request_rejected_before_reading(server):
    status = _raw_post(server, "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 50000000\r\n")
    assert status == "HTTP/1.1 413 Request Entity Too Large"


def test_request_without_length_rejected(server):
    status = _raw_post(server, "Content-Type: multipart/form-data; boundary=x\r\nTransfer-Encoding: chunked\r\n")
    assert status == "HTTP/1.1 411 Length Required"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium driven by chromium-driver, with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found; install them with apt-get install -y chromium chromium-driver")
    folder = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={folder / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(folder / "chromedriver.log")),
                              options=options)
    yield driver
    driver.quit()


def test_browser_upload_shows_report(server, browser, predictor, radiographs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/")
    assert browser.title == "cxrgen: chest X-ray report"
    browser.find_element(By.ID, "frontal").send_keys(str(radiographs[0]))
    browser.find_element(By.ID, "lateral").send_keys(str(radiographs[1]))
    browser.find_element(By.ID, "submit").click()
    report = WebDriverWait(browser, 120).until(expected_conditions.presence_of_element_located((By.ID, "report")))

    expected = predictor.predict(*radiographs)
    assert report.text == expected.report
    maps = browser.find_elements(By.CSS_SELECTOR, "#attention img")
    assert len(maps) == len(expected.words)
    assert browser.execute_script("return arguments[0].naturalWidth", maps[0]) > 0
    assert "RANDOM WEIGHTS" in browser.find_element(By.TAG_NAME, "body").text
    if os.environ.get("CXRGEN_SCREENSHOT"):
        browser.save_screenshot(os.environ["CXRGEN_SCREENSHOT"])


def test_browser_shows_upload_error(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    browser.get(f"{server}/")
    browser.find_element(By.ID, "frontal").send_keys(str(text_file))
    browser.find_element(By.ID, "submit").click()
    error = WebDriverWait(browser, 60).until(expected_conditions.presence_of_element_located((By.ID, "error")))
    assert "frontal view: not an image that can be read; upload a PNG or JPEG file" in error.text
