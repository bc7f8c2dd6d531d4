"""End to end in a real browser: the studio served by ``streamlit run app.py``, driven by Playwright.

One walk through the studio as a user takes it: the Data page shows the bundled demo, a fit runs
on the Refine page (and survives a page reload while it runs and after), a lasso on the
Embeddings map lists samples, one opens on the Inspect page, a verdict is recorded and the
Results page lists it. Every page is checked for tracebacks and error boundaries, and a
screenshot of each is written to ``docs/screenshots/<page>.png``.

Needs Debian's chromium (``/usr/bin/chromium``) and the ``playwright`` Python package; Playwright's
own browser download is not used. The server runs with ``REFINERY_HOME`` in a temporary folder,
so nothing touches ``~/.refinery``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.studio import CHROMIUM, VIEWPORT, browser_page, launch_chromium, served

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(240)]

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
SERVER_START_S = 60
PAGE_S = 60_000      # ms: a page's first render (the first one imports torch and the engine)
FIT_S = 150_000      # ms: the demo fit, about 20 s on 2 idle cores; generous for a busy machine
MAP_S = 120_000      # ms: the first Embeddings visit computes the UMAP layout (numba compiles first)
DEMO_SAMPLES = 300

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
expect = playwright_api.expect
from studio_pages import assert_clean, goto_page, main_area, query_param  # noqa: E402
expect.set_options(timeout=PAGE_S)  # every expect() below waits this long unless told otherwise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``streamlit run app.py`` on a free port with its own REFINERY_HOME; yields the base URL."""
    with served(tmp_path_factory.mktemp("refinery-home"), SERVER_START_S) as running:
        yield running.url
    server_log = running.log_path.read_text()
    assert "Traceback" not in server_log, server_log[-3000:]


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
    with browser_page(browser, PAGE_S) as opened:
        yield opened


# ----------------------------------------------------------------------------- helpers

def _screenshot(page, name: str) -> None:
    """The whole page: the viewport grows to the main area's scroll height for the shot."""
    page.wait_for_timeout(500)  # let charts finish their transitions
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": min(max(height, VIEWPORT["height"]), 8000)})
    page.wait_for_timeout(500)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    page.set_viewport_size(VIEWPORT)


def _lasso_everything(page) -> None:
    """Press, drag round the plot area's inner border, release: plotly's lasso (the map's drag mode)."""
    area = page.locator(".js-plotly-plot .nsewdrag").first
    expect(area).to_be_visible()
    box = area.bounding_box()
    corners = [(0.02, 0.02), (0.98, 0.02), (0.98, 0.98), (0.02, 0.98), (0.02, 0.03)]
    points = [(box["x"] + box["width"] * x, box["y"] + box["height"] * y) for x, y in corners]
    page.mouse.move(*points[0])
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*point, steps=8)
    page.mouse.up()


# ----------------------------------------------------------------------------- tests

def test_data_page_shows_the_builtin_demo(server, page):
    page.goto(server)
    main = main_area(page)
    expect(page.get_by_role("heading", name="Data", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Use this data set")).to_be_enabled()
    samples = page.get_by_test_id("stMetric").filter(has_text="Samples")
    expect(samples.get_by_test_id("stMetricValue")).to_have_text(str(DEMO_SAMPLES))
    expect(main.get_by_text("fashion-mnist-sneakers")).to_be_visible()
    expect(main.get_by_test_id("stImage").first).to_be_visible()
    assert_clean(page)
    _screenshot(page, "data")


def test_refine_explore_inspect_and_results(server, page):
    page.goto(server)
    expect(page.get_by_role("button", name="Use this data set")).to_be_visible()

    # Refine: start the demo fit, reload while it runs, wait for the finished run.
    goto_page(page, "Refine")
    expect(main_area(page).get_by_text(f"Training data: {DEMO_SAMPLES} images")).to_be_visible()
    page.get_by_role("button", name="Start refinement").click()
    expect(page.get_by_test_id("stProgress")).to_be_visible()
    assert "job=" in page.url
    job_url = page.url
    page.reload()
    assert page.url == job_url
    finished = page.get_by_text(re.compile(r"^Finished in \d+ s: run \w+ saved"))
    expect(page.get_by_test_id("stProgress").or_(finished).first).to_be_visible()
    expect(finished).to_be_visible(timeout=FIT_S)
    run = query_param(page, "run")
    assert run is not None and Path(run).is_dir(), page.url
    for round_number in (1, 2, 3):
        expect(page.get_by_role("tab", name=f"Round {round_number}")).to_be_visible()
    assert_clean(page)
    _screenshot(page, "refine")

    # A reload after the job keeps the run (the URL holds it) and shows its rounds again.
    page.reload()
    expect(page.get_by_role("heading", name=re.compile(r"^Run \w+$"))).to_be_visible()
    expect(page.get_by_role("tab", name="Round 1")).to_be_visible()
    assert query_param(page, "run") == run

    # Embeddings: the map renders; a lasso round all points lists them with Inspect buttons.
    goto_page(page, "Embeddings")
    expect(page.locator(".js-plotly-plot .scatterlayer .point").first).to_be_attached(timeout=MAP_S)
    assert page.locator(".js-plotly-plot .scatterlayer .point").count() == DEMO_SAMPLES
    assert query_param(page, "run") == run
    _lasso_everything(page)
    expect(page.get_by_role("heading", name=re.compile(r"^\d+ selected"))).to_be_visible()
    selected = int(page.get_by_role("heading", name=re.compile(r"^\d+ selected")).inner_text().split()[0])
    assert selected > DEMO_SAMPLES // 2  # the lasso ran round the plot area's border
    inspect_buttons = main_area(page).get_by_role("button", name="Inspect", exact=True)
    expect(inspect_buttons.first).to_be_visible()
    first_caption = main_area(page).get_by_test_id("stImageCaption").first.inner_text()
    first_id = first_caption.split(" · ")[0]
    assert_clean(page)
    _screenshot(page, "embeddings")

    # Inspect: the clicked sample opens; an Anomaly verdict is stored and shown.
    inspect_buttons.first.click()
    expect(page.get_by_role("heading", name="Inspect", exact=True)).to_be_visible()
    expect(page.get_by_role("heading", name=first_id, exact=True)).to_be_visible()
    assert query_param(page, "run") == run
    page.get_by_role("button", name=re.compile("^Anomaly")).click()
    expect(page.get_by_test_id("stToast").filter(has_text=f"{first_id}: anomaly")).to_be_visible()
    expect(main_area(page).get_by_text("Your verdict: anomaly")).to_be_visible()
    assert_clean(page)
    _screenshot(page, "inspect")

    # Results: the run's metrics and the verdict just recorded.
    goto_page(page, "Results")
    expect(page.get_by_role("heading", name="Expert verdicts")).to_be_visible()
    expect(page.get_by_text("No verdicts yet")).to_have_count(0)
    expect(page.get_by_test_id("stMetric").filter(has_text="AUROC")).to_be_visible()
    expect(page.get_by_role("heading", name="Downloads")).to_be_visible()
    assert query_param(page, "run") == run
    assert_clean(page)
    expect(page.get_by_test_id("stToast")).to_have_count(0, timeout=20_000)  # the verdict's toast has gone
    _screenshot(page, "results")
