"""The web page, driven end to end in headless Chromium against the real server.

One ``flashtts serve --demo`` process (tiny random-weight Spark checkpoint, torch backend, ``--api_key``) serves
the page; the test enters the key, then synthesises in every tab (role voice, cloning from an uploaded file and
from a fake-microphone recording, a streamed two-voice dialogue), adds, previews and deletes a voice, and checks
that errors from the server and from the form are shown. Needs the Debian ``chromium`` package and the Python
``playwright`` package (never ``playwright install``); skipped when either is missing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("FLASHTTS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # A fake microphone (a beep) and no permission prompt, for the recording test.
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]
API_KEY = "page-test-key"
SCREENSHOT = Path("/tmp/flashtts_page.png")
START_TIMEOUT = 240.0  # s: first start builds the tiny checkpoint and imports torch on a busy machine
SYNTH_TIMEOUT = 180_000  # ms

sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package 'playwright' is not installed")
if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
    pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_wav(path: Path, seconds: float = 2.0, rate: int = 16000) -> Path:
    """A voiced-sounding test signal: a gliding harmonic tone with a little noise, 16-bit mono WAV."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    x = 0.3 * x / np.max(np.abs(x)) + 0.01 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``flashtts serve --demo --api_key ...`` on a free local port; yields the base URL."""
    root = tmp_path_factory.mktemp("web-page")
    roles = root / "roles"
    roles.mkdir()
    port = _free_port()
    log = (root / "server.log").open("wb")
    cmd = [
        sys.executable, "-m", "flashtts_core", "serve",
        "--demo", "--backend", "torch",
        "--host", "127.0.0.1", "--port", str(port),
        "--role_dir", str(roles), "--state_dir", str(root / "state"),
        "--api_key", API_KEY, "--no_warmup", "--log_level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.fail(f"server exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                tail = (root / "server.log").read_text()[-4000:]
                pytest.fail(f"server did not start in {START_TIMEOUT:.0f} s:\n{tail}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def chromium_browser() -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def web_page(chromium_browser, live_server):  # type: ignore[no-untyped-def]
    context = chromium_browser.new_context(locale="en-US", viewport={"width": 1280, "height": 900})
    context.grant_permissions(["microphone"], origin=live_server.rstrip("/"))
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.set_default_timeout(30_000)
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _wait_ready(page) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_function("document.body.dataset.ready === '1' && document.body.dataset.busy !== '1'")


def _wait_result(page, filename: str, mode: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    """Wait until the result player holds ``filename`` with a positive duration; return what the page reports."""
    page.wait_for_function(
        """([name, mode]) => {
            const r = document.querySelector('#result');
            const a = document.querySelector('#result-audio');
            if (document.body.dataset.busy === '1' || r.hidden || r.dataset.filename !== name) return false;
            if (mode && r.dataset.mode !== mode) return false;
            return a.readyState >= 1 && Number.isFinite(a.duration) && a.duration > 0;
        }""",
        arg=[filename, mode],
        timeout=SYNTH_TIMEOUT,
    )
    return page.evaluate(
        """() => {
            const r = document.querySelector('#result');
            const a = document.querySelector('#result-audio');
            const link = document.querySelector('#download-link');
            return {duration: a.duration, mode: r.dataset.mode, samples: Number(r.dataset.samples),
                    download: link.getAttribute('download'), href: link.href};
        }"""
    )


def _alert(page, panel: str):  # type: ignore[no-untyped-def]
    return page.locator(f"#panel-{panel} .alert").first


def test_web_page_end_to_end(web_page, live_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page = web_page
    ref = _reference_wav(tmp_path / "reference.wav")

    # --- the page and its assets are public; the API is locked until the key is entered ------------------------
    page.goto(live_server)
    _wait_ready(page)
    assert page.title().startswith("FlashTTS")
    assert page.locator("#engine-badge").get_attribute("data-state") == "locked"
    assert "API key" in page.locator("#global-alert").inner_text()

    page.fill("#api-key", "not-the-key")
    page.press("#api-key", "Enter")
    page.wait_for_function("document.querySelector('#global-alert').innerText.includes('invalid API key')")
    assert page.locator("#engine-badge").get_attribute("data-state") == "locked"

    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    page.wait_for_function("document.querySelector('#engine-badge').dataset.state === 'ok'")
    assert "spark" in page.locator("#engine-badge").inner_text()
    assert page.evaluate("localStorage.getItem('flashtts.apiKey')") == API_KEY

    # The key survives a reload and is sent without typing it again.
    page.reload()
    _wait_ready(page)
    assert page.locator("#api-key").input_value() == API_KEY
    assert page.locator("#engine-badge").get_attribute("data-state") == "ok"
    # Spark: cloning and pitch/speed are offered, the MegaTTS latent upload is not.
    assert page.locator("#tab-clone").is_visible()
    assert page.locator("#clone-pitch").is_visible()
    assert not page.locator("#clone-latent").is_visible()

    # --- role voice (non-streamed mp3 in an <audio> element) ------------------------------------------------------
    page.click("#tab-role")
    page.wait_for_function("[...document.querySelectorAll('#role-name option')].some(o => o.value === 'female')")
    page.select_option("#role-name", "female")
    page.select_option("#role-pitch", "high")
    page.fill("#role-text", "Hello from the role voice tab.")
    page.click("#form-role button[type=submit]")
    page.wait_for_selector("#progress:not([hidden])")
    result = _wait_result(page, "role_voice.mp3", "file")
    assert result["duration"] > 0
    assert result["download"] == "role_voice.mp3" and result["href"].startswith("blob:")
    assert _alert(page, "role").get_attribute("data-type") == "success"
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # Form validation happens before any request.
    page.fill("#role-text", "")
    page.click("#form-role button[type=submit]")
    assert _alert(page, "role").get_attribute("data-type") == "warning"

    # --- voice cloning from an uploaded wav file (non-streamed wav) -------------------------------------------------
    page.select_option("#opt-format", "wav")
    page.click("#tab-clone")
    page.set_input_files("#clone-file", str(ref))
    assert page.locator("#panel-clone .dropzone").evaluate("el => el.classList.contains('has-file')")
    assert "reference.wav" in page.locator("#panel-clone .dropzone-file").inner_text()
    page.fill("#clone-text", "Cloned from an uploaded file.")
    page.fill("#clone-ref-text", "A test tone.")
    page.click("#form-clone button[type=submit]")
    result = _wait_result(page, "cloned_voice.wav", "file")
    assert result["duration"] > 0

    # ... and from a microphone recording (Chromium's fake device), converted to WAV in the page.
    page.click("#panel-clone .record-btn")
    page.wait_for_function("document.querySelector('#panel-clone .record-btn').getAttribute('aria-pressed') === 'true'")
    page.wait_for_timeout(1200)
    page.click("#panel-clone .record-btn")
    page.wait_for_function(
        "document.querySelector('#panel-clone .dropzone-file').innerText.includes('recording.wav')", timeout=15_000
    )
    page.select_option("#opt-format", "flac")
    page.click("#form-clone button[type=submit]")
    assert _wait_result(page, "cloned_voice.flac", "file")["duration"] > 0

    # --- multi-role dialogue, streamed (PCM scheduled with Web Audio, then kept as WAV) ----------------------------
    page.check("#opt-stream")
    page.click("#tab-dialogue")
    page.wait_for_selector("#role-chips .chip[data-role='male']")
    page.fill("#dialogue-text", "")
    page.click("#role-chips .chip[data-role='female']")
    page.keyboard.type("Good morning!")
    page.select_option("#tag-speed", "high")
    page.click("#role-chips .chip[data-role='male']")
    page.keyboard.type("Good morning to you.")
    text = page.locator("#dialogue-text").input_value()
    assert text == "<role:female>Good morning! <role:male,speed:high>Good morning to you."
    page.click("#form-dialogue button[type=submit]")
    result = _wait_result(page, "multi_role_voice.wav", "stream")
    assert result["samples"] > 0 and result["duration"] > 0
    page.uncheck("#opt-stream")

    # A server-side error is shown with the message of the error envelope.
    page.fill("#dialogue-text", "<role:nobody>Who is this?")
    page.click("#form-dialogue button[type=submit]")
    alert = _alert(page, "dialogue")
    page.wait_for_function(
        "document.querySelector('#panel-dialogue .alert').dataset.type === 'error'", timeout=SYNTH_TIMEOUT
    )
    assert "nobody" in alert.inner_text()

    # --- voice library: add, preview, delete ---------------------------------------------------------------------
    page.click("#tab-voices")
    page.wait_for_selector("#voice-list li[data-voice='female']")
    page.fill("#add-name", "page_tester")
    page.set_input_files("#add-file", str(ref))
    page.fill("#add-ref-text", "A test tone.")
    page.click("#form-add-voice button[type=submit]")
    item = page.locator("#voice-list li[data-voice='page_tester']")
    item.wait_for(timeout=SYNTH_TIMEOUT)
    assert page.locator("#voices-alert").get_attribute("data-type") == "success"
    assert page.locator("#voice-list li[data-voice='female'] .delete-btn").count() == 0  # built-ins stay

    item.locator(".preview-btn").click()
    page.wait_for_function(
        """() => {
            const a = document.querySelector('#preview-player');
            return a.dataset.voice === 'page_tester' && a.readyState >= 1 && a.duration > 0;
        }""",
        timeout=SYNTH_TIMEOUT,
    )

    # The new voice is offered in the other tabs.
    assert page.locator("#role-name option[value='page_tester']").count() == 1
    assert page.locator("#role-chips .chip[data-role='page_tester']").count() == 1

    # Cancel keeps it, confirm deletes it.
    item.locator(".delete-btn").click()
    page.locator("#confirm-dialog").wait_for(state="visible")
    page.locator("#confirm-dialog button[value='cancel']").click()
    assert item.count() == 1
    item.locator(".delete-btn").click()
    page.locator("#confirm-ok").click()
    item.wait_for(state="detached", timeout=30_000)
    assert page.locator("#voices-alert").get_attribute("data-type") == "success"

    # --- language toggle -----------------------------------------------------------------------------------------
    page.click("#lang-toggle")
    assert page.evaluate("document.documentElement.lang") == "zh-CN"
    assert page.locator("#tab-clone").inner_text() == "声音克隆"
    assert page.locator("#tab-dialogue").inner_text() == "多角色合成"
    page.click("#lang-toggle")
    assert page.locator("#tab-clone").inner_text() == "Voice cloning"


def test_web_page_keyboard_tabs(web_page, live_server) -> None:  # type: ignore[no-untyped-def]
    """Tabs follow the WAI-ARIA pattern: arrow keys move between them and select the panel."""
    page = web_page
    page.goto(live_server)
    _wait_ready(page)
    page.focus("#tab-clone")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-role"
    assert page.locator("#panel-role").is_visible() and not page.locator("#panel-clone").is_visible()
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.id") == "tab-voices"
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-clone"
    assert page.locator("#tab-clone").get_attribute("aria-selected") == "true"


def test_web_page_hides_what_the_engine_cannot_do(web_page, live_server) -> None:  # type: ignore[no-untyped-def]
    """An engine without cloning or pitch/speed (Orpheus-like /server_info) gets no clone tab, no add-voice form
    and no pitch/speed selects; a MegaTTS-like one asks for the latent file."""
    page = web_page

    def fake_info(info: dict):  # type: ignore[no-untyped-def]
        def handler(route) -> None:  # type: ignore[no-untyped-def]
            body = {
                "success": True,
                "info": {
                    "model": "x",
                    "model_name": "x",
                    "backend": "torch",
                    "roles": ["tara", "leo"],
                    "builtin_voices": ["tara", "leo"],
                    "default_voice": "tara",
                    "sample_rate": 24000,
                    "supports_cloning": False,
                    "requires_latent": False,
                    "controls": [],
                    "response_formats": ["mp3", "wav", "pcm"],
                    "max_text_chars": 4096,
                    "max_upload_bytes": 1 << 20,
                    "version": "0",
                    **info,
                },
            }
            route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

        return handler

    page.route("**/server_info", fake_info({"model": "orpheus"}))
    page.goto(live_server)
    _wait_ready(page)
    assert not page.locator("#tab-clone").is_visible()
    assert page.locator("#tab-role").get_attribute("aria-selected") == "true"
    assert not page.locator("#role-pitch").is_visible() and not page.locator("#role-speed").is_visible()
    offered = page.locator("#opt-format option:not([disabled])").evaluate_all("os => os.map(o => o.value)")
    assert sorted(offered) == ["mp3", "pcm", "wav"]
    page.click("#tab-voices")
    assert not page.locator("#form-add-voice").is_visible()
    assert page.locator("#panel-voices p[data-needs='no-cloning']").is_visible()
    assert "orpheus" in page.locator("#engine-badge").inner_text()

    page.unroute("**/server_info")
    page.route("**/server_info", fake_info({"model": "mega", "supports_cloning": True, "requires_latent": True}))
    page.reload()
    _wait_ready(page)
    assert page.locator("#tab-clone").is_visible()
    assert page.locator("#clone-latent").is_visible() and page.locator("#add-latent").count() == 1
    assert not page.locator("#clone-pitch").is_visible()
