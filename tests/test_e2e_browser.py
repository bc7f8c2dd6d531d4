"""End to end in a real browser: the studio served by ``streamlit run app.py``, driven by Playwright.

Three walks through the studio as a user takes them (:mod:`bench.studio_walk`), and two users at
once on one server (:mod:`concurrent_sessions`, collected here). The walks: the Data page shows
the bundled demo; an expert's review of data of their own (:func:`bench.studio_walk.review_walk`):
a zip is uploaded, refined (the page reloaded mid-fit keeps the data and the job), lassoed on the
Embeddings map, judged on the Inspect page with the keys N / A / U over a readable localization map,
re-run with the verdicts from Results, and its scores downloaded and read; and a table whose own id
column keys its downloaded scores (:func:`bench.studio_walk.roles_walk`). Every page is checked for
tracebacks and error boundaries, plotly axes that cut their data and a run named two ways. The tests
take no screenshots (a full-page shot in a software renderer costs seconds, and the checks on the
page already prove it rendered); the README's come from ``python bench/screenshots.py``.

Timeouts: each test's pytest timeout is the sum of everything that may wait in it: the server's
start, chromium's launch, the walk's budget (which bounds all the walk's waits together, see
:class:`bench.studio_walk.Budget`), the server's stop and a margin for the work between waits.
Module fixtures count against the test that sets them up or tears them down, so every test gets
the whole sum. The Score page and the report read one demo run fitted by the engine in the server's
home (``demo_run``), as the command line would fit it: the walks already fit through the Refine page.

Needs Debian's chromium (``/usr/bin/chromium``) and the ``playwright`` Python package; Playwright's
own browser download is not used. The server runs with ``REFINERY_HOME`` in a temporary folder,
so nothing touches ``~/.refinery``.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlencode

import pytest

from available import require_path
from bench.studio import CHROMIUM, LAUNCH_TIMEOUT_S, STOP_TIMEOUT_S, browser_page, launch_chromium, served

SERVER_START_S = 60
MARGIN_S = 60  # page.content() reads, closing contexts: work outside any wait


def _timeout(walk_s: float) -> float:
    """pytest's timeout of a test whose walk has a budget of ``walk_s`` seconds."""
    return SERVER_START_S + LAUNCH_TIMEOUT_S + walk_s + 2 * STOP_TIMEOUT_S + MARGIN_S


pytestmark = [pytest.mark.browser, pytest.mark.slow]

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
require_path(CHROMIUM, "apt-get install chromium")
from bench import studio_walk  # noqa: E402  (imports playwright)
from bench.studio_walk import DATA_PAGE_S, PAGE_MS, REVIEW_S, ROLES_S, Budget  # noqa: E402
from app_fixtures import fit_demo_run  # noqa: E402
from sample_data import fraud_table  # noqa: E402
# Two users on one server: collected here, beside the other browser tests, so that no two studio servers
# and chromiums run at once (see concurrent_sessions.py).
from concurrent_sessions import test_two_sessions_keep_their_data_and_runs_to_themselves_and_their_fits_queue  # noqa: E402,F401,E501


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The server's REFINERY_HOME."""
    return tmp_path_factory.mktemp("refinery-home").resolve()


@pytest.fixture(scope="module")
def server(home):
    """``streamlit run app.py`` with its own REFINERY_HOME; yields the base URL."""
    with served(home, SERVER_START_S) as running:
        yield running.url
    server_log = running.log_path.read_text()
    assert "Traceback" not in server_log, server_log[-3000:]


@pytest.fixture(scope="module")
def demo_run(home) -> Path:
    """The bundled demo fitted with the suggested config (localization maps included) into the server's
    home, as the command line's run: every studio session sees it. Tests read it; the Score page adds a
    batch of its own to it, which the report does not show."""
    return fit_demo_run(home)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        launched = launch_chromium(playwright)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser):
    with browser_page(browser, PAGE_MS) as opened:
        yield opened


@pytest.mark.timeout(_timeout(DATA_PAGE_S))
def test_data_page_shows_the_builtin_demo(server, page):
    studio_walk.data_page(page, server, Budget(DATA_PAGE_S), None)


@pytest.mark.timeout(_timeout(REVIEW_S))
def test_an_experts_review_from_upload_to_download(server, page, tmp_path):
    """Upload a zip, refine it (reloading mid-fit), lasso on the map, judge with the keys on Inspect,
    re-run with the verdicts from Results, download the scores (:func:`bench.studio_walk.review_walk`)."""
    rerun = studio_walk.review_walk(page, server, tmp_path, Budget(REVIEW_S), None)
    assert Path(rerun).is_dir()


@pytest.mark.timeout(_timeout(ROLES_S))
def test_a_tables_own_ids_key_its_downloaded_scores(server, page, tmp_path):
    """Upload a csv whose ``record`` column names its rows (``REC-000100``...): the Columns panel gives it
    the role id, and the scores downloaded after a fit are keyed by it (:func:`bench.studio_walk.roles_walk`)."""
    table = fraud_table()
    path = tmp_path / "payments.csv"
    table.to_csv(path, index=False)
    rows = studio_walk.roles_walk(page, server, path, "record", len(table), Budget(ROLES_S), None)
    assert sorted(row["id"] for row in rows) == sorted(table["record"])


DEMO_FIT_S = 240  # the demo's fit (``demo_run``) and its report on a busy 2-core machine (about 15 s alone)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + DEMO_FIT_S + MARGIN_S)
def test_the_run_report_opens_offline_and_shows_every_image(demo_run, page, tmp_path):
    """The demo run's HTML report, opened from ``file://`` with the network cut (offline, and any request
    that is not file: or data: aborted): every image decodes, every section is there, nothing was asked for."""
    from core.report import write_report

    report = write_report(demo_run, tmp_path / "report.html", top=8)
    asked = []

    def only_local(route):
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            asked.append(route.request.url)
            route.abort()

    page.context.set_offline(True)
    page.route("**/*", only_local)
    page.goto(report.as_uri(), wait_until="load")
    widths = page.eval_on_selector_all("img", "images => images.map(image => image.complete ? image.naturalWidth : 0)")
    assert len(widths) == 2 * 8 + 1 and all(width > 0 for width in widths), widths
    assert page.locator("section").count() == 7 and page.locator("svg").count() == 3  # histogram, ROC, PR
    assert asked == []


SCORE_S = studio_walk.DATA_PAGE_S + 6 * PAGE_MS / 1000
"""Budget of the scoring walk: the demo run opened, then the Score page's job (seconds) and a few page changes."""


@pytest.mark.timeout(_timeout(SCORE_S) + DEMO_FIT_S)
def test_a_new_batch_is_scored_on_the_score_page_and_opens_on_inspect(server, demo_run, page, tmp_path):
    """Open the demo run from a link, score six new images from a server folder on the Score page (issue 17),
    and open the batch on Inspect: its most anomalous image with its saved localization map."""
    from app_fixtures import new_images

    folder = new_images(tmp_path / "new-batch", good=4, other=2)
    budget = Budget(SCORE_S)
    run = str(demo_run)
    page.goto(f"{server}/?{urlencode({'run': run})}", timeout=budget.ms())
    sidebar = page.get_by_test_id("stSidebarUserContent")
    playwright_api.expect(sidebar.get_by_text(demo_run.name, exact=True)).to_be_visible(timeout=budget.ms())
    studio_walk.goto_page(page, "Score", budget)
    main = studio_walk.main_area(page)
    main.get_by_role("tab", name="Folder or file on the server").click(timeout=budget.ms())
    path_box = main.get_by_label("Path of a folder of images, a .zip or a table on this server")
    path_box.fill(str(folder))
    path_box.press("Enter")  # Streamlit takes a text field's value on Enter (or when it loses focus)
    main.get_by_role("button", name="Score this path").click(timeout=budget.ms())
    saved = main.get_by_text(re.compile(r"Saved as batch [\w-]+"))
    playwright_api.expect(saved).to_be_visible(timeout=budget.ms())
    name = re.search(r"Saved as batch ([\w-]+)", saved.inner_text()).group(1)
    assert "new-batch" in name and studio_walk.query_param(page, "batch") == name
    playwright_api.expect(main.get_by_text("only a large change would show")).to_be_visible(timeout=budget.ms())
    studio_walk.assert_clean(page, budget)
    studio_walk.goto_page(page, "Inspect", budget)
    playwright_api.expect(main.get_by_text(f"Batch {name}")).to_be_visible(timeout=budget.ms())
    playwright_api.expect(main.get_by_text("of 6", exact=False).first).to_be_visible(timeout=budget.ms())
    playwright_api.expect(main.get_by_text(re.compile("^localization map"))).to_be_visible(timeout=budget.ms())
    assert studio_walk.query_param(page, "run") == run
    studio_walk.assert_clean(page, budget)
