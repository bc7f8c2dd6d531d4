"""A walk through the studio in a real browser, step by step: shared by the browser tests and the screenshots.

The walk a user takes: the Data page shows the bundled demo; a fit runs on the Refine page (and
survives a page reload while it runs and after); a lasso on the Embeddings map lists samples; one
opens on the Inspect page, where a verdict is recorded; the Results page lists it. Every page is
checked for tracebacks and error boundaries, and each step leaves a full-page screenshot
``<page>.png`` in the folder it is given. A failed check raises ``AssertionError`` (Playwright's
``expect``), in a test and in ``bench/screenshots.py`` alike.

Used by ``tests/test_e2e_browser.py`` (screenshots into pytest's temporary folder),
``tests/test_e2e_concurrent.py`` (the page helpers and :class:`Budget`) and ``bench/screenshots.py``
(screenshots into ``docs/screenshots/``). Needs the ``playwright`` package: the tests import this
module only after skipping themselves without it.

Time: every wait is given ``budget.ms(limit)``, the smaller of its own limit and what is left of the
walk's :class:`Budget`. However many waits a walk holds, together they cannot outlast its budget, so
a caller's own timeout (pytest's) is set to the budget plus what happens outside the walk (server
start, browser launch, server stop) and never cuts a walk short: a slow walk fails on the wait that
ran out, named by Playwright.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from playwright.sync_api import expect

from bench.studio import VIEWPORT

PAGE_MS = 60_000   # a page's first render (the first one imports torch and the engine); any other wait's limit
FIT_MS = 150_000   # the demo fit, about 20 s on 2 idle cores; generous for a busy machine
MAP_MS = 120_000   # the first Embeddings visit computes the UMAP layout (numba compiles first)
TOAST_MS = 20_000  # a toast fades by itself after a few seconds
SETTLE_MS = 500    # charts finish their transitions before a screenshot
OPEN_TRY_MS = 10_000  # a selectbox's list shows this soon after a click that lands, or the click is repeated
OPEN_ATTEMPTS = 3
DEMO_SAMPLES = 300
FINISHED = re.compile(r"^Finished in \d+ s: run (\w+) saved")
"""The Refine page's finished view; the group is the run id."""

DATA_PAGE_S = 2 * PAGE_MS / 1000
"""Budget of :func:`data_page`: the first render, then a few checks that each take a moment."""
FIT_TO_RESULTS_S = (FIT_MS + MAP_MS) / 1000 + 4 * PAGE_MS / 1000
"""Budget of the steps from :func:`refine` to :func:`results`: the fit, the map, and page changes."""
WALK_S = DATA_PAGE_S + FIT_TO_RESULTS_S
"""Budget of :func:`walk`."""


class Budget:
    """The seconds a walk may take, shared out among its waits (see the module's docstring).

    Parameters
    ----------
    seconds : float
        The whole walk's time, counted from the budget's creation.

    Examples
    --------
    >>> budget = Budget(120)
    >>> expect(page.get_by_text("Data")).to_be_visible(timeout=budget.ms())  # doctest: +SKIP
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def ms(self, limit_ms: float = PAGE_MS) -> float:
        """The timeout of the next wait in milliseconds: ``limit_ms``, or less when less is left.

        Raises TimeoutError once nothing is left (Playwright would read a timeout of 0 as no limit).
        """
        left_ms = (self._end - time.monotonic()) * 1000
        if left_ms < 1:
            raise TimeoutError(f"the walk used up its budget of {self.seconds:.0f} s")
        return min(limit_ms, left_ms)


# ----------------------------------------------------------------------------- page helpers

def main_area(page):
    return page.get_by_test_id("stMain")


def assert_clean(page, budget: Budget) -> None:
    """No traceback, exception block or error boundary message anywhere on the page."""
    content = page.content()
    assert "Traceback" not in content
    assert "Something went wrong" not in content
    expect(page.get_by_test_id("stException")).to_have_count(0, timeout=budget.ms())


def goto_page(page, title: str, budget: Budget) -> None:
    """Open a page through the sidebar navigation and wait for its title."""
    page.get_by_test_id("stSidebarNavLink").filter(has_text=title).click(timeout=budget.ms())
    expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible(timeout=budget.ms())


def query_param(page, name: str) -> str | None:
    """A parameter of the page's URL (``run``, ``job``), or None."""
    return parse_qs(urlparse(page.url).query).get(name, [None])[0]


def selectbox_options(page, label: str, budget: Budget) -> list[str]:
    """The options of the selectbox labelled ``label``, read by opening its list and closing it again."""
    combobox = page.get_by_test_id("stSelectbox").filter(has_text=label).get_by_role("combobox")
    options = page.get_by_role("option")
    # A click that lands while the page is still redrawing opens no list (seen once in five CI runs): click
    # again until the list shows, each try bounded, all of them within the budget.
    for attempt in range(OPEN_ATTEMPTS):
        combobox.scroll_into_view_if_needed(timeout=budget.ms())  # clicked where the click itself scrolls to
        combobox.click(timeout=budget.ms())                        # (the bottom edge), a selectbox opens no list
        try:
            expect(options.first).to_be_visible(timeout=budget.ms(OPEN_TRY_MS))
            break
        except AssertionError:
            if attempt == OPEN_ATTEMPTS - 1:
                raise
            page.keyboard.press("Escape")
    names = options.all_inner_texts()
    page.keyboard.press("Escape")
    expect(options).to_have_count(0, timeout=budget.ms())
    return names


def screenshot(page, path: Path, budget: Budget) -> None:
    """The whole page into ``path`` (PNG): the viewport grows to the main area's scroll height for the shot."""
    page.wait_for_timeout(SETTLE_MS)
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": min(max(height, VIEWPORT["height"]), 8000)})
    page.wait_for_timeout(SETTLE_MS)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True, timeout=budget.ms())
    page.set_viewport_size(VIEWPORT)


def lasso_everything(page, budget: Budget) -> None:
    """Press, drag round the plot area's inner border, release: plotly's lasso (the map's drag mode)."""
    area = page.locator(".js-plotly-plot .nsewdrag").first
    expect(area).to_be_visible(timeout=budget.ms())
    box = area.bounding_box(timeout=budget.ms())
    corners = [(0.02, 0.02), (0.98, 0.02), (0.98, 0.98), (0.02, 0.98), (0.02, 0.03)]
    points = [(box["x"] + box["width"] * x, box["y"] + box["height"] * y) for x, y in corners]
    page.mouse.move(*points[0])
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*point, steps=8)
    page.mouse.up()


# ----------------------------------------------------------------------------- the walk

def data_page(page, url: str, budget: Budget, shots: Path) -> None:
    """The studio's first page shows the bundled demo: its sample count, its name and preview images."""
    page.goto(url, timeout=budget.ms())
    main = main_area(page)
    expect(page.get_by_role("heading", name="Data", exact=True)).to_be_visible(timeout=budget.ms())
    expect(page.get_by_role("button", name="Use this data set")).to_be_enabled(timeout=budget.ms())
    samples = page.get_by_test_id("stMetric").filter(has_text="Samples")
    expect(samples.get_by_test_id("stMetricValue")).to_have_text(str(DEMO_SAMPLES), timeout=budget.ms())
    expect(main.get_by_text("fashion-mnist-sneakers")).to_be_visible(timeout=budget.ms())
    expect(main.get_by_test_id("stImage").first).to_be_visible(timeout=budget.ms())
    assert_clean(page, budget)
    screenshot(page, shots / "data.png", budget)


def refine(page, url: str, budget: Budget, shots: Path) -> str:
    """Start the demo fit on the Refine page, reload while it runs, wait for the saved run; its folder.

    A reload after the job keeps the run (the URL holds it) and shows its rounds again.
    """
    page.goto(url, timeout=budget.ms())
    expect(page.get_by_role("button", name="Use this data set")).to_be_visible(timeout=budget.ms())
    goto_page(page, "Refine", budget)
    expect(main_area(page).get_by_text(f"Training data: {DEMO_SAMPLES} images")).to_be_visible(timeout=budget.ms())
    page.get_by_role("button", name="Start refinement").click(timeout=budget.ms())
    expect(page.get_by_test_id("stProgress")).to_be_visible(timeout=budget.ms())
    assert "job=" in page.url
    job_url = page.url
    page.reload(timeout=budget.ms())
    assert page.url == job_url
    finished = page.get_by_text(FINISHED)
    expect(page.get_by_test_id("stProgress").or_(finished).first).to_be_visible(timeout=budget.ms())
    expect(finished).to_be_visible(timeout=budget.ms(FIT_MS))
    run = query_param(page, "run")
    assert run is not None and Path(run).is_dir(), page.url
    for round_number in (1, 2, 3):
        expect(page.get_by_role("tab", name=f"Round {round_number}")).to_be_visible(timeout=budget.ms())
    assert_clean(page, budget)
    screenshot(page, shots / "refine.png", budget)

    page.reload(timeout=budget.ms())
    expect(page.get_by_role("heading", name=re.compile(r"^Run \S+$"))).to_be_visible(timeout=budget.ms())
    expect(page.get_by_role("tab", name="Round 1")).to_be_visible(timeout=budget.ms())
    assert query_param(page, "run") == run
    return run


def embeddings(page, run: str, budget: Budget, shots: Path) -> str:
    """The run's map renders every sample; a lasso round all points lists them with Inspect buttons.

    Returns the id of the first sample listed, whose Inspect button :func:`inspect` presses.
    """
    goto_page(page, "Embeddings", budget)
    points = page.locator(".js-plotly-plot .scatterlayer .point")
    expect(points.first).to_be_attached(timeout=budget.ms(MAP_MS))
    expect(points).to_have_count(DEMO_SAMPLES, timeout=budget.ms())
    assert query_param(page, "run") == run
    lasso_everything(page, budget)
    heading = page.get_by_role("heading", name=re.compile(r"^\d+ selected"))
    expect(heading).to_be_visible(timeout=budget.ms())
    selected = int(heading.inner_text(timeout=budget.ms()).split()[0])
    assert selected > DEMO_SAMPLES // 2  # the lasso ran round the plot area's border
    expect(main_area(page).get_by_role("button", name="Inspect", exact=True).first).to_be_visible(timeout=budget.ms())
    first_caption = main_area(page).get_by_test_id("stImageCaption").first.inner_text(timeout=budget.ms())
    assert_clean(page, budget)
    screenshot(page, shots / "embeddings.png", budget)
    return first_caption.split(" · ")[0]


def inspect(page, run: str, sample_id: str, budget: Budget, shots: Path) -> None:
    """From the Embeddings selection, open ``sample_id`` (the first listed); record an Anomaly verdict."""
    main_area(page).get_by_role("button", name="Inspect", exact=True).first.click(timeout=budget.ms())
    expect(page.get_by_role("heading", name="Inspect", exact=True)).to_be_visible(timeout=budget.ms())
    expect(page.get_by_role("heading", name=sample_id, exact=True)).to_be_visible(timeout=budget.ms())
    assert query_param(page, "run") == run
    page.get_by_role("button", name=re.compile("^Anomaly")).click(timeout=budget.ms())
    expect(page.get_by_test_id("stToast").filter(has_text=f"{sample_id}: anomaly")).to_be_visible(timeout=budget.ms())
    expect(main_area(page).get_by_text("Your verdict: anomaly")).to_be_visible(timeout=budget.ms())
    assert_clean(page, budget)
    screenshot(page, shots / "inspect.png", budget)


def results(page, run: str, budget: Budget, shots: Path) -> None:
    """The Results page shows the run's metrics, downloads and the verdict just recorded."""
    goto_page(page, "Results", budget)
    expect(page.get_by_role("heading", name="Expert verdicts")).to_be_visible(timeout=budget.ms())
    expect(page.get_by_text("No verdicts yet")).to_have_count(0, timeout=budget.ms())
    expect(page.get_by_test_id("stMetric").filter(has_text="AUROC")).to_be_visible(timeout=budget.ms())
    expect(page.get_by_role("heading", name="Downloads")).to_be_visible(timeout=budget.ms())
    assert query_param(page, "run") == run
    assert_clean(page, budget)
    expect(page.get_by_test_id("stToast")).to_have_count(0, timeout=budget.ms(TOAST_MS))  # the verdict's toast went
    screenshot(page, shots / "results.png", budget)


def walk(page, url: str, budget: Budget, shots: Path) -> str:
    """Every step above in order on the studio at ``url``; the run folder of the fit it made."""
    data_page(page, url, budget, shots)
    run = refine(page, url, budget, shots)
    sample_id = embeddings(page, run, budget, shots)
    inspect(page, run, sample_id, budget, shots)
    results(page, run, budget, shots)
    return run
