"""The studio as a browser sees it: ``streamlit run app.py`` on a free port, and Debian's chromium.

Shared by the browser end-to-end test (``tests/test_e2e_browser.py``) and ``bench/app.py``.
Playwright drives the system chromium (``playwright install`` cannot download browsers here).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 900}


@dataclass(frozen=True)
class Server:
    url: str
    health_s: float  # process launch to /_stcore/health answering "ok"
    log_path: Path   # the server's stdout and stderr
    pid: int         # the server process (``python -m streamlit run``), e.g. for /proc/<pid>/status


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def healthy(url: str) -> bool:
    """Whether the server at ``url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
            return answer.read().decode().strip() == "ok"
    except (OSError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def served(home: Path, start_timeout_s: float = 60) -> Iterator[Server]:
    """``streamlit run app.py`` on a free port with ``REFINERY_HOME=home``; terminated on exit.

    Raises RuntimeError with the end of the server log when it does not answer in time.
    """
    port = free_port()
    url = f"http://localhost:{port}"
    log_path = Path(home) / f"server-{port}.log"
    env = {**os.environ, "REFINERY_HOME": str(home), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.headless", "true", "--server.fileWatcherType", "none"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        while not healthy(url):
            if process.poll() is not None or time.perf_counter() - started > start_timeout_s:
                raise RuntimeError(f"the server did not answer on {url}/_stcore/health:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        yield Server(url, time.perf_counter() - started, log_path, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        if "Traceback" in log_path.read_text(errors="replace"):
            log.warning("the studio server logged a traceback; see %s", log_path)


def launch_chromium(playwright):
    """Debian's chromium, headless, through a started ``sync_playwright()``."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


@contextlib.contextmanager
def browser_page(browser, timeout_ms: float) -> Iterator[object]:
    """A fresh browser context (its own Streamlit session) and page; every wait defaults to ``timeout_ms``."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(timeout_ms)
    try:
        yield context.new_page()
    finally:
        context.close()
