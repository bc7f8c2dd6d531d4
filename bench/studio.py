"""The studio as a browser sees it: ``streamlit run app.py`` on a port of its own, and Debian's chromium.

Shared by the browser end-to-end tests (``tests/test_e2e_*.py``), ``bench/app.py`` and
``bench/screenshots.py``. Playwright drives the system chromium (``playwright install`` cannot
download browsers here).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 900}
LAUNCH_TIMEOUT_S = 30  # chromium's start (Playwright's own default)
STOP_TIMEOUT_S = 15    # the server's stop after terminate, and again after kill: at most twice this
SERVED_URL = re.compile(r"URL: (http://[^\s/]+:(\d+))")
"""The line Streamlit prints once it listens ("URL: http://localhost:PORT", or "Local URL: ...")."""
FINISHED = re.compile(r"^Finished in \d+ s: run (\S+) saved")
"""The live view's line once a fit job has saved its run; the group is the run's name."""


@dataclass(frozen=True)
class Server:
    url: str
    health_s: float  # process launch to /_stcore/health answering "ok"
    log_path: Path   # the server's stdout and stderr
    pid: int         # the server process (``python -m streamlit run``), e.g. for /proc/<pid>/status


def healthy(url: str) -> bool:
    """Whether the server at ``url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
            return answer.read().decode().strip() == "ok"
    except (OSError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def served(home: Path, start_timeout_s: float = 60, options: Sequence[str] = ()) -> Iterator[Server]:
    """``streamlit run app.py`` with ``REFINERY_HOME=home``, on a port the system gives it; terminated on exit.

    ``options`` are more of Streamlit's command-line options (``("--runner.postScriptGC", "true")``); they
    override ``.streamlit/config.toml``.

    The server is started with ``--server.port 0``: it binds a port of the system's choosing itself and
    prints the URL it serves, which is read from its log. Nothing here picks a free port, releases it and
    hands its number over: another process could take that port in between, making the server fail to
    bind, or worse, answering the health check in its place. The server is taken as started only once
    its own log names its URL and that URL answers ``/_stcore/health``.

    Raises RuntimeError with the end of the server log when the server exits, or does not answer
    within ``start_timeout_s``; the server is then stopped. Stopping takes at most ``2 *
    STOP_TIMEOUT_S`` (terminate, then kill).
    """
    Path(home).mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="server-", suffix=".log", dir=home)
    log_path = Path(name)
    env = {**os.environ, "REFINERY_HOME": str(home), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    started = time.perf_counter()
    with os.fdopen(handle, "wb") as output:  # not ``log``: that is the module's logger
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", "0",
             "--server.headless", "true", "--server.fileWatcherType", "none", *options],
            cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
        )
    try:
        url = None
        while url is None or not healthy(url):
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode}:\n{_log_tail(log_path)}")
            if time.perf_counter() - started > start_timeout_s:
                raise RuntimeError(f"the server did not answer within {start_timeout_s} s "
                                   f"({url or 'no URL in its log yet'}):\n{_log_tail(log_path)}")
            url = url or _served_url(log_path)
            time.sleep(0.05)
        yield Server(url, time.perf_counter() - started, log_path, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
        if "Traceback" in log_path.read_text(errors="replace"):
            log.warning("the studio server logged a traceback; see %s", log_path)


def _served_url(log_path: Path) -> str | None:
    """The URL the server's log says it serves, once it says so; None before."""
    found = SERVED_URL.search(log_path.read_text(errors="replace"))
    if found is None:
        return None
    if int(found.group(2)) == 0:
        raise RuntimeError("this Streamlit does not report the port the system gave it (it printed port 0); "
                           "serving on a port of the system's choosing needs Streamlit's uvicorn server")
    return found.group(1)


def _log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


def launch_chromium(playwright):
    """Debian's chromium, headless, through a started ``sync_playwright()``."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                                      timeout=LAUNCH_TIMEOUT_S * 1000)


@contextlib.contextmanager
def browser_page(browser, timeout_ms: float) -> Iterator[object]:
    """A fresh browser context (its own Streamlit session) and page; every wait defaults to ``timeout_ms``."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(timeout_ms)
    try:
        yield context.new_page()
    finally:
        context.close()
