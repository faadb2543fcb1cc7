"""Shared fixtures.

Browser tests (marker `ui`) drive Debian's chromium through pytest-playwright
against ONE real `panel serve app/main.py` started per test session on port 0
(the OS picks a free port; we read it from the server log). Each test opens a
new browser context, which is a new Panel session.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RUNNING_AT = re.compile(r"Bokeh app running at: (http://\S+?)/main\b")


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}; `make test` installs Debian's chromium, "
                    f"or set CHROMIUM_PATH", pytrace=False)
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1280, "height": 800}}


@pytest.fixture
def context(context):
    context.set_default_timeout(30_000)
    yield context


def wait_until_served(url: str, timeout_s: float = 60.0) -> bool:
    """Poll GET url until it answers 200 (the server is up) or timeout_s passes."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=60).ok:
                return True
        except requests.ConnectionError:
            time.sleep(0.1)
    return False


class _Drain(threading.Thread):
    """Read the server's output so a full pipe never blocks it."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self):
        for line in iter(self.stream.readline, ""):
            self.lines.append(line)


SERVER_LOG: list[str] = []       # the session server's output lines, read as they come (see app_url)
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")   # the start of a server log line


@pytest.fixture(autouse=True)
def no_server_traceback(request):
    """A browser test fails when the served app logs a traceback while it runs: a callback that
    raised on the server can leave the page looking almost right (the lab's Train once did nothing)."""
    if "app_url" not in request.fixturenames:
        yield
        return
    start = len(SERVER_LOG)
    yield
    time.sleep(0.2)                                    # a callback that raised as the test ended
    new = SERVER_LOG[start:]
    at = next((i for i, line in enumerate(new) if "Traceback" in line and not _closed_page_write(new, i)), None)
    if at is not None:
        pytest.fail("the server logged a traceback during this test:\n" + "".join(new[max(0, at - 1):at + 40]),
                    pytrace=False)


def _closed_page_write(lines: list[str], at: int) -> bool:
    """The traceback at lines[at] is tornado failing to send a message to a page that had already closed
    (a page of a test that just ended): asyncio logs the unretrieved WebSocketClosedError of
    `WebSocketProtocol13.write_message`. Nothing of the app raised; the load test counts these apart as
    teardown tracebacks too. It spans two "Traceback" blocks (StreamClosedError, then WebSocketClosedError)."""
    for line in reversed(lines[max(0, at - 12):at]):
        if line.startswith("future: <Task finished"):
            return "WebSocketProtocol13.write_message" in line and "exception=WebSocketClosedError()" in line
        if LOG_RECORD.match(line):                     # another log record in between: not this one's
            return False
    return False


@pytest.fixture(scope="session")
def app_url():
    # through the Procfile's launcher (app/allocator.py), so the browser tests run the allocator that is served
    cmd = [sys.executable, "-m", "app.allocator", "panel", "serve", "app/main.py", "--address", "127.0.0.1",
           "--port", "0", "--allow-websocket-origin", "*", "--liveness", "--num-procs", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOKEH_", "PANEL_"))}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    log = _Drain(proc.stdout)
    log.lines = SERVER_LOG
    log.start()
    base = None
    deadline = time.monotonic() + 60
    try:
        while base is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("panel serve exited:\n" + "".join(log.lines))
            for line in list(log.lines):
                if m := RUNNING_AT.search(line):
                    base = m.group(1)
            time.sleep(0.05)
        if base is None:
            raise RuntimeError("panel serve did not start:\n" + "".join(log.lines))
        wait_until_served(f"{base}/liveness", max(1.0, deadline - time.monotonic()))
        yield f"{base}/main"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)          # the whole group: never leave a server behind
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "panel_serve.log").write_text("".join(log.lines))
        tracebacks = [line for line in log.lines if "Traceback" in line]
        if tracebacks:
            print(f"\npanel serve logged {len(tracebacks)} traceback(s); see artifacts/panel_serve.log")
