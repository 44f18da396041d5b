"""The dashboard end to end in headless Chromium, driven over the Chrome DevTools Protocol.

`edp serve` runs for real (uvicorn on 127.0.0.1, a free port); the test posts a MinIO
notification to open a batch, loads the dashboard in Debian's ``chromium`` and
asserts: no console errors or uncaught exceptions, the open batch is on the page,
its detail page lists its file, and a screenshot is written (to ``tmp_path``, and to
``$EDP_ARTIFACTS_DIR`` when set). Skipped without Chromium, except under ``CI=true``.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("CI"):  # under CI a missing piece is a failure, not a skip
    import starlette  # noqa: F401
    import websocket
else:
    pytest.importorskip("starlette", reason="the web extra is not installed")
    websocket = pytest.importorskip("websocket", reason="websocket-client (dev extra) is missing")

from edp.config import Settings
from edp.web.server import ServeStack
from edp_testing import missing

pytestmark = pytest.mark.timeout(120)
TOKEN = "browser-test-token"
PREFIX = "lab/exp-browser/"
KEY = PREFIX + "image 001.tif"


def chromium_path() -> str:
    """Debian's chromium, or skip (fail under CI)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing("chromium is not installed (apt-get install -y chromium)")
    return path


class DevTools:
    """A minimal CDP client over one page's websocket: commands, and the events seen so far."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self.ids)
        self.ws.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == number:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self.events.append(message)

    def wait_event(self, method: str, timeout: float = 20.0, after: int = 0) -> dict[str, Any]:
        """The first ``method`` event at index ``after`` or later, waiting for it."""
        deadline = time.monotonic() + timeout
        seen = after
        while time.monotonic() < deadline:
            for event in self.events[seen:]:
                if event.get("method") == method:
                    return event
            seen = len(self.events)
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                break
            finally:
                self.ws.settimeout(30)
        raise AssertionError(f"no {method} within {timeout}s")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except AssertionError as exc:  # a navigation in progress: ask the new page
                if "navigated" not in str(exc):
                    raise
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"{expression} stayed falsy for {timeout}s")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors seen so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params.get('exceptionDetails')}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"log: {entry.get('text')} {entry.get('url', '')}")
        return found

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeStack]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'browser.db'}", serve_token=TOKEN,
                        bucket_threshold_event_count=10, bucket_threshold_duration=600.0)
    stack = ServeStack(settings, port=0, sample_interval=0.5)
    stack.start_background()
    yield stack
    stack.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-default-apps", "--window-size=1280,1000",
         f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.is_file() and active.read_text().strip()):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = active.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Page"):
            tools.call(f"{domain}.enable")
        yield tools
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def post_minio_event(stack: ServeStack) -> None:
    body = json.loads((Path(__file__).parents[1] / "events/minio-notification.json").read_text())
    body["Records"][0]["s3"]["object"]["key"] = KEY.replace(" ", "+")
    request = urllib.request.Request(f"{stack.url}/ingest", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {TOKEN}"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_the_dashboard_shows_the_open_batch_without_console_errors(
    server: ServeStack, browser: DevTools, tmp_path: Path
) -> None:
    # Given an open batch, created through the ingest endpoint
    post_minio_event(server)
    # When the dashboard is opened
    mark = len(browser.events)
    browser.call("Page.navigate", url=f"{server.url}/")
    browser.wait_event("Page.loadEventFired", after=mark)
    # Then the open batch is on the page, with its file count and the trigger due next
    row = browser.wait_for(
        "[...document.querySelectorAll('#open-batches tbody tr')].map(r => r.innerText)"
        f".find(t => t.includes('{PREFIX}'))"
    )
    assert "minio-bucket" in row and "duration" in row
    assert browser.wait_for("document.querySelectorAll('#chart-flow svg polyline').length") == 2
    assert browser.evaluate("document.getElementById('status').classList.contains('bad')") is False
    # (a deadline that passed unfired reads as such, not as a negative wait)
    assert browser.evaluate("firesIn(-6)") == "passed 6.0s ago"
    assert browser.evaluate("firesIn(90)") == "90s"
    # And a screenshot is taken
    shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    screenshot = tmp_path / "dashboard.png"
    screenshot.write_bytes(shot)
    assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 10_000
    if os.environ.get("EDP_ARTIFACTS_DIR"):
        target = Path(os.environ["EDP_ARTIFACTS_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, target / "dashboard.png")
    # When the batch's link is followed, its page lists the file
    mark = len(browser.events)
    browser.evaluate("document.querySelector('#open-batches a[href^=\"/batches/\"]').click()")
    browser.wait_event("Page.loadEventFired", after=mark)
    listed = browser.wait_for("document.querySelector('#files tbody')?.innerText || ''")
    assert KEY in listed
    # And nothing went wrong in the browser on the way
    time.sleep(0.5)
    browser.call("Runtime.evaluate", expression="1")  # drain the events that are queued
    assert browser.errors() == []
