"""A walk through the studio in a real browser, step by step: shared by the browser tests and the screenshots.

Three walks. :func:`walk`, the one the README's screenshots show: the Data page shows the bundled demo;
a fit runs on the Refine page (and survives a page reload while it runs and after); a lasso on the
Embeddings map lists samples; one opens on the Inspect page, where a verdict is recorded; the
Results page lists it. :func:`review_walk`, an expert's review of data of their own: a zip is
uploaded, refined with the defaults (the page reloaded mid-fit still names the uploaded data),
lassoed on the map, judged on Inspect with the keys N / A / U over a readable localization map,
re-run with the verdicts from Results (the new run removes the confirmed anomaly first and lists the
verdicts), and its scores downloaded and read. :func:`roles_walk`: a table is uploaded, its id column
shows the role id in the Data page's Columns panel, and the scores downloaded after a fit are keyed by it.

Every page is checked for tracebacks and error boundaries (:func:`assert_clean`), pages with charts for
a plotly axis that cuts its data (:func:`assert_axes_whole`), and pages that name the run for a run
named two ways (:func:`assert_one_run_name`). Each step leaves a full-page screenshot in the folder it
is given (none when it is given None, as in the tests). A failed check raises ``AssertionError`` (Playwright's ``expect``), in a test and in
``bench/screenshots.py`` alike.

Used by ``tests/test_e2e_browser.py`` (no screenshots),
``tests/concurrent_sessions.py`` (the page helpers and :class:`Budget`) and ``bench/screenshots.py``
(screenshots into ``docs/screenshots/``). Needs the ``playwright`` package: the tests import this
module only after skipping themselves without it.

Time: every wait is given ``budget.ms(limit)``, the smaller of its own limit and what is left of the
walk's :class:`Budget`. However many waits a walk holds, together they cannot outlast its budget, so
a caller's own timeout (pytest's) is set to the budget plus what happens outside the walk (server
start, browser launch, server stop) and never cuts a walk short: a slow walk fails on the wait that
ran out, named by Playwright.
"""
from __future__ import annotations

import csv
import json
import math
import random
import re
import time
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from playwright.sync_api import expect

from bench.studio import FINISHED, REPO, VIEWPORT

PAGE_MS = 60_000   # a page's first render (the first one imports torch and the engine); any other wait's limit
FIT_MS = 150_000   # the demo fit, about 20 s on 2 idle cores; generous for a busy machine
MAP_MS = 120_000   # the first Embeddings visit computes the UMAP layout (numba compiles first)
TOAST_MS = 20_000  # a toast fades by itself after a few seconds
SETTLE_MS = 500    # charts finish their transitions before a screenshot
OPEN_TRY_MS = 10_000  # a selectbox's list shows this soon after a click that lands, or the click is repeated
OPEN_ATTEMPTS = 3
DEMO_SAMPLES = 300
DEMO_NAME = "fashion-mnist-sneakers"
DEMO_DIR = REPO / "assets" / "demo" / DEMO_NAME
SELECTION_SHOWN = 48  # the Embeddings page lists at most this many selected samples
"""The Refine page's finished view; the group is the run's name (its folder's)."""

DATA_PAGE_S = 2 * PAGE_MS / 1000
"""Budget of :func:`data_page`: the first render, then a few checks that each take a moment."""
FIT_TO_RESULTS_S = (FIT_MS + MAP_MS) / 1000 + 4 * PAGE_MS / 1000
"""Budget of the steps from :func:`refine` to :func:`results`: the fit, the map, and page changes."""
WALK_S = DATA_PAGE_S + FIT_TO_RESULTS_S
"""Budget of :func:`walk`."""

REVIEW_NORMAL, REVIEW_ANOMALIES = 72, 6
REVIEW_SAMPLES = REVIEW_NORMAL + REVIEW_ANOMALIES
REVIEW_ZIP = "parts-review.zip"
VERDICT_KEYS = (("n", "normal"), ("a", "anomaly"), ("u", "unsure"))
"""The Inspect page's verdict keys, pressed on the first three samples the review judges."""
READABLE_MAP_PX = 128
"""The least height of a localization map with its colour bar at which the bar's labels can be read."""
CONFIRMED = "confirmed anomaly (expert)"
"""What the Refine page's round view says of a sample the expert's verdict removed."""
SCORE_COLUMNS = ["id", "anomaly_score", "is_anomaly", "kept", "round_removed", "verdict", "verdict_note"]
"""The scores download of a run on unlabelled data."""
LABELLED_SCORE_COLUMNS = [*SCORE_COLUMNS[:3], "label", *SCORE_COLUMNS[3:]]
"""The scores download of a run on labelled data."""
REVIEW_S = DATA_PAGE_S + (2 * FIT_MS + MAP_MS) / 1000 + 10 * PAGE_MS / 1000
"""Budget of :func:`review_walk`: the upload, two fits, the map, and page changes and checks."""
ROLES_S = DATA_PAGE_S + FIT_MS / 1000 + 4 * PAGE_MS / 1000
"""Budget of :func:`roles_walk`: the upload, one fit, and page changes and checks."""

RUN_FOLDER = re.compile(r"\d{8}-\d{6}-[\w-]+-[0-9a-f]{6}")
"""A run folder's name (``core.engine.new_run_dir``): what the studio calls a run."""
RUN_NAMED = re.compile(r"\b(?:[Rr]un|fit):? ([\w-]+)")
"""A run named in a text ("Run NAME", "run NAME saved", "fit NAME")."""
NAMING_ELEMENTS = ", ".join(f"[data-testid={area}] [data-testid={element}]" for area in ("stSidebarUserContent", "stMain")
                            for element in ("stHeading", "stCaptionContainer", "stAlertContainer", "stMarkdownContainer"))
"""Where the pages name runs: headings, captions, messages and text, in the sidebar and the main area."""


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


def _shot(shots: Path | None, name: str) -> Path | None:
    """Where the screenshot ``name`` goes: into ``shots``, or nowhere (None) when the walk takes none."""
    return None if shots is None else shots / name


def screenshot(page, path: Path | None, budget: Budget) -> None:
    """The whole page into ``path`` (PNG): the viewport grows to the main area's scroll height for the shot.
    Nothing when ``path`` is None: the browser tests take no screenshots (slow in a software renderer)."""
    if path is None:
        return
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

def data_page(page, url: str, budget: Budget, shots: Path | None) -> None:
    """The studio's first page shows the bundled demo: its sample count, its name and preview images."""
    page.goto(url, timeout=budget.ms())
    main = main_area(page)
    expect(page.get_by_role("heading", name="Data", exact=True)).to_be_visible(timeout=budget.ms())
    expect(page.get_by_role("button", name="Use this data set")).to_be_enabled(timeout=budget.ms())
    expect(samples_metric(page)).to_have_text(str(DEMO_SAMPLES), timeout=budget.ms())
    expect(main.get_by_text(DEMO_NAME)).to_be_visible(timeout=budget.ms())
    expect(main.get_by_test_id("stImage").first).to_be_visible(timeout=budget.ms())
    assert_clean(page, budget)
    screenshot(page, _shot(shots, "data.png"), budget)


def refine(page, url: str, budget: Budget, shots: Path | None) -> str:
    """Start the demo fit on the Refine page, reload while it runs, wait for the saved run; its folder."""
    page.goto(url, timeout=budget.ms())
    expect(page.get_by_role("button", name="Use this data set")).to_be_visible(timeout=budget.ms())
    return fit(page, DEMO_NAME, DEMO_SAMPLES, budget, _shot(shots, "refine.png"))


def fit(page, data_name: str, samples: int, budget: Budget, shot: Path | None) -> str:
    """On the Refine page, start a fit of the active data (``samples`` images named ``data_name`` in the
    sidebar) with the form's defaults; see :func:`watch_fit`. The run's folder."""
    goto_page(page, "Refine", budget)
    expect(main_area(page).get_by_text(f"Training data: {samples} images")).to_be_visible(timeout=budget.ms())
    page.get_by_role("button", name="Start refinement").click(timeout=budget.ms())
    return watch_fit(page, data_name, samples, budget, shot)


def watch_fit(page, data_name: str, samples: int, budget: Budget, shot: Path | None) -> str:
    """A fit just started from this page: reload while it runs, wait for the saved run; its folder.

    The reload keeps the job and the data (the URL holds them): the sidebar still names ``data_name``
    and the page the fit's ``samples`` images. A reload after the job keeps the run and shows its
    rounds again. Every place that names the run names it by its folder (:func:`assert_one_run_name`).
    """
    expect(page.get_by_test_id("stProgress")).to_be_visible(timeout=budget.ms())
    assert "job=" in page.url
    job_url = page.url
    page.reload(timeout=budget.ms())
    assert page.url == job_url
    main = main_area(page)
    finished = page.get_by_text(FINISHED)
    expect(page.get_by_test_id("stProgress").or_(finished).first).to_be_visible(timeout=budget.ms())
    named = re.compile(rf"^(Fitting|Training data): {samples} images from \S*{re.escape(Path(data_name).stem)}")
    expect(main.get_by_text(named)).to_be_visible(timeout=budget.ms())
    assert sidebar_fact(page, "Data", budget) == data_name
    expect(finished).to_be_visible(timeout=budget.ms(FIT_MS))
    run = query_param(page, "run")
    assert run is not None and Path(run).is_dir(), page.url
    for round_number in (1, 2, 3):
        expect(page.get_by_role("tab", name=f"Round {round_number}")).to_be_visible(timeout=budget.ms())
    assert_clean(page, budget)
    assert_one_run_name(page, run, budget)
    assert_axes_whole(page, budget)
    screenshot(page, shot, budget)

    page.reload(timeout=budget.ms())
    expect(page.get_by_role("heading", name=f"Run {Path(run).name}", exact=True)).to_be_visible(timeout=budget.ms())
    expect(page.get_by_role("tab", name="Round 1")).to_be_visible(timeout=budget.ms())
    assert query_param(page, "run") == run
    assert sidebar_fact(page, "Data", budget) == data_name
    return run


def embeddings(page, run: str, budget: Budget, shots: Path | None, samples: int = DEMO_SAMPLES,
               shot: str = "embeddings.png") -> str:
    """The run's map renders every sample; a lasso round all points lists them with Inspect buttons.

    Returns the id of the first sample listed, whose Inspect button :func:`inspect` presses.
    """
    goto_page(page, "Embeddings", budget)
    points = page.locator(".js-plotly-plot .scatterlayer .point")
    expect(points.first).to_be_attached(timeout=budget.ms(MAP_MS))
    expect(points).to_have_count(samples, timeout=budget.ms())
    assert query_param(page, "run") == run
    assert_axes_whole(page, budget)
    lasso_everything(page, budget)
    heading = page.get_by_role("heading", name=re.compile(r"^\d+ selected"))
    expect(heading).to_be_visible(timeout=budget.ms())
    selected = int(heading.inner_text(timeout=budget.ms()).split()[0])
    assert selected > samples // 2  # the lasso ran round the plot area's border
    buttons = main_area(page).get_by_role("button", name="Inspect", exact=True)
    expect(buttons.first).to_be_visible(timeout=budget.ms())
    expect(buttons).to_have_count(min(selected, SELECTION_SHOWN), timeout=budget.ms())  # one per listed sample
    first_caption = main_area(page).get_by_test_id("stImageCaption").first.inner_text(timeout=budget.ms())
    assert_clean(page, budget)
    assert_one_run_name(page, run, budget)
    screenshot(page, _shot(shots, shot), budget)
    return first_caption.split(" · ")[0]


def inspect(page, run: str, sample_id: str, budget: Budget, shots: Path | None) -> None:
    """From the Embeddings selection, open ``sample_id`` (the first listed); record an Anomaly verdict."""
    open_from_selection(page, run, sample_id, budget)
    page.get_by_role("button", name=re.compile("^Anomaly")).click(timeout=budget.ms())
    expect_verdict(page, sample_id, "anomaly", budget)
    assert_clean(page, budget)
    screenshot(page, _shot(shots, "inspect.png"), budget)


def open_from_selection(page, run: str, sample_id: str, budget: Budget) -> None:
    """Press the first Inspect button of the Embeddings selection: the Inspect page shows ``sample_id``."""
    main_area(page).get_by_role("button", name="Inspect", exact=True).first.click(timeout=budget.ms())
    expect(page.get_by_role("heading", name="Inspect", exact=True)).to_be_visible(timeout=budget.ms())
    expect(page.get_by_role("heading", name=sample_id, exact=True)).to_be_visible(timeout=budget.ms())
    assert query_param(page, "run") == run


def expect_verdict(page, sample_id: str, verdict: str, budget: Budget) -> None:
    """The verdict just recorded on ``sample_id``: its toast, and the page showing it as the sample's."""
    expect(page.get_by_test_id("stToast").filter(has_text=f"{sample_id}: {verdict}")).to_be_visible(timeout=budget.ms())
    expect(main_area(page).get_by_text(f"Your verdict: {verdict}")).to_be_visible(timeout=budget.ms())


def results(page, run: str, budget: Budget, shots: Path | None) -> None:
    """The Results page shows the run's metrics, downloads and the verdict just recorded."""
    goto_page(page, "Results", budget)
    expect(page.get_by_role("heading", name="Expert verdicts")).to_be_visible(timeout=budget.ms())
    expect(page.get_by_text("No verdicts yet")).to_have_count(0, timeout=budget.ms())
    expect(page.get_by_test_id("stMetric").filter(has_text="AUROC")).to_be_visible(timeout=budget.ms())
    expect(page.get_by_role("heading", name="Downloads")).to_be_visible(timeout=budget.ms())
    assert query_param(page, "run") == run
    assert_clean(page, budget)
    assert_one_run_name(page, run, budget)
    assert_axes_whole(page, budget)
    expect(page.get_by_test_id("stToast")).to_have_count(0, timeout=budget.ms(TOAST_MS))  # the verdict's toast went
    screenshot(page, _shot(shots, "results.png"), budget)


def walk(page, url: str, budget: Budget, shots: Path | None) -> str:
    """Every step above in order on the studio at ``url``; the run folder of the fit it made."""
    data_page(page, url, budget, shots)
    run = refine(page, url, budget, shots)
    sample_id = embeddings(page, run, budget, shots)
    inspect(page, run, sample_id, budget, shots)
    results(page, run, budget, shots)
    return run


# ----------------------------------------------------------------------------- the expert's review

def review_zip(folder: Path) -> Path:
    """A zip of ``REVIEW_NORMAL`` demo sneakers and ``REVIEW_ANOMALIES`` other garments (one of each kind
    the demo holds, as far as they go), shuffled under neutral names (``part-000.png``...): no folder or
    name tells them apart, as with data an expert reviews. Written into ``folder``; its path."""
    normal = sorted((DEMO_DIR / "good").glob("*.png"))[:REVIEW_NORMAL]
    odd = sorted((DEMO_DIR / "other").glob("*.png"))[::5][:REVIEW_ANOMALIES]
    files = normal + odd
    assert len(files) == REVIEW_SAMPLES, f"the bundled demo folder {DEMO_DIR} is incomplete"
    random.Random(0).shuffle(files)
    archive = Path(folder) / REVIEW_ZIP
    with zipfile.ZipFile(archive, "w") as written:
        for number, source in enumerate(files):
            written.write(source, f"part-{number:03d}.png")
    return archive


def upload(page, url: str, archive: Path, samples: int, budget: Budget, shot: Path | None) -> None:
    """Open the studio at ``url``, upload ``archive`` (a zip of ``samples`` images, or a table of
    ``samples`` rows) and use it: the Data page shows it, the sidebar and the URL name it."""
    page.goto(url, timeout=budget.ms())
    expect(page.get_by_role("heading", name="Data", exact=True)).to_be_visible(timeout=budget.ms())
    page.get_by_role("tab", name="Upload").click(timeout=budget.ms())
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(str(archive), timeout=budget.ms())
    use = page.get_by_role("button", name="Use the uploaded files")
    expect(use).to_be_enabled(timeout=budget.ms())  # the uploader commits once the file has arrived
    use.click(timeout=budget.ms())
    expect(main_area(page).get_by_role("heading", name=archive.name, exact=True)).to_be_visible(timeout=budget.ms())
    expect(samples_metric(page)).to_have_text(str(samples), timeout=budget.ms())
    assert sidebar_fact(page, "Data", budget) == archive.name
    assert (query_param(page, "data") or "").startswith("upload:"), page.url
    assert_clean(page, budget)
    screenshot(page, shot, budget)


def judge_with_keys(page, run: str, sample_id: str, budget: Budget, shots: Path | None) -> dict[str, str]:
    """Open ``sample_id`` from the Embeddings selection, check its map reads (:func:`assert_readable_map`),
    then judge it and the next samples of the ranked list with the keys N, A and U, paging with the
    Right key. Each sample's "Model says" matches the run's scores. The verdicts given, by sample id."""
    open_from_selection(page, run, sample_id, budget)
    ranked = ranked_ids(run)
    position = ranked.index(sample_id)
    assert position + len(VERDICT_KEYS) <= len(ranked), "the selection's first sample has too few after it"
    calls = model_calls(run)
    main = main_area(page)
    verdicts = {}
    for step, (key, verdict) in enumerate(VERDICT_KEYS):
        current = ranked[position + step]
        if step:
            page.keyboard.press("ArrowRight")  # the pager's Next
        expect(page.get_by_role("heading", name=current, exact=True)).to_be_visible(timeout=budget.ms())
        model_says = page.get_by_test_id("stMetric").filter(has_text="Model says").get_by_test_id("stMetricValue")
        expect(model_says).to_have_text(calls[current], timeout=budget.ms())
        if step == 0:
            assert_readable_map(page, budget)
            screenshot(page, _shot(shots, "review-inspect.png"), budget)
        no_verdict = main.get_by_test_id("stMarkdownContainer").filter(has_text=re.compile(r"^Your verdict$"))
        expect(no_verdict).to_be_visible(timeout=budget.ms())  # none yet
        page.keyboard.press(key)
        expect_verdict(page, current, verdict, budget)
        verdicts[current] = verdict
    assert_clean(page, budget)
    assert_one_run_name(page, run, budget)
    return verdicts


def assert_readable_map(page, budget: Budget) -> None:
    """The localization map is drawn over the image with its colour bar beside it, tall enough to read.

    The overlay is the image, a gap and the colour bar side by side: wider for its height than the image
    itself. Its height in pixels (``READABLE_MAP_PX`` at least) keeps the bar's labels legible.
    """
    main = main_area(page)
    source = main.get_by_test_id("stImage").filter(has=page.get_by_test_id("stImageCaption").filter(
        has_text=re.compile(r"^image$"))).locator("img")
    shown = main.get_by_test_id("stImage").filter(has=page.get_by_test_id("stImageCaption").filter(
        has_text="localization map")).locator("img")
    for image in (source, shown):
        expect(image).to_be_visible(timeout=budget.ms(MAP_MS))
        expect(image).to_have_js_property("complete", True, timeout=budget.ms())
    size = "image => [image.naturalWidth, image.naturalHeight]"
    (source_w, source_h), (shown_w, shown_h) = source.evaluate(size), shown.evaluate(size)
    assert shown_w / shown_h > 1.2 * source_w / source_h, ("no colour bar beside the map", (shown_w, shown_h))
    assert shown_h >= READABLE_MAP_PX, f"the map with its colour bar is {shown_h} px tall: its labels cannot be read"


def review_results(page, run: str, verdicts: dict[str, str], budget: Budget, shot: Path | None) -> None:
    """The Results page of ``run`` lists the ``verdicts``, and exactly the samples on which the expert and
    the run's model disagree, each with an Inspect button that opens it; its histogram is whole."""
    goto_page(page, "Results", budget)
    main = main_area(page)
    expect(page.get_by_role("heading", name="Expert verdicts")).to_be_visible(timeout=budget.ms())
    expect(main.get_by_text(f"{len(verdicts)} samples judged")).to_be_visible(timeout=budget.ms())
    assert query_param(page, "run") == run
    calls = model_calls(run)
    disagreeing = {i: v for i, v in verdicts.items() if v in ("normal", "anomaly") and v != calls[i]}
    rows = main.get_by_test_id("stHorizontalBlock").filter(has_text=re.compile(r": expert \w+, model \w+"))
    expect(rows).to_have_count(len(disagreeing), timeout=budget.ms())
    for sample_id, verdict in disagreeing.items():
        row = rows.filter(has_text=f"{sample_id}: expert {verdict}, model {calls[sample_id]}")
        expect(row.get_by_role("button", name=re.compile("Inspect$"))).to_be_visible(timeout=budget.ms())
    if not disagreeing:
        expect(main.get_by_text("The model's call agrees with every normal and anomaly verdict.")).to_be_visible(
            timeout=budget.ms())
    assert_clean(page, budget)
    assert_one_run_name(page, run, budget)
    assert_axes_whole(page, budget, at_least=1)
    expect(page.get_by_test_id("stToast")).to_have_count(0, timeout=budget.ms(TOAST_MS))  # the verdicts' toasts went
    screenshot(page, shot, budget)
    if disagreeing:  # the first one's Inspect button opens it, with its verdict
        sample_id, verdict = next(iter(disagreeing.items()))
        rows.filter(has_text=f"{sample_id}: expert").get_by_role("button").click(timeout=budget.ms())
        expect(page.get_by_role("heading", name="Inspect", exact=True)).to_be_visible(timeout=budget.ms())
        expect(page.get_by_role("heading", name=sample_id, exact=True)).to_be_visible(timeout=budget.ms())
        expect(main.get_by_text(f"Your verdict: {verdict}")).to_be_visible(timeout=budget.ms())
        goto_page(page, "Results", budget)


def rerun_with_verdicts(page, run: str, data_name: str, samples: int, verdicts: dict[str, str], budget: Budget,
                        shots: Path | None) -> str:
    """From the Results page of ``run``, re-run refinement with the verdicts (:func:`watch_fit`): every
    sample judged an anomaly is removed before round 1, as the Refine page's round 1 shows, and the
    new run's Results compare it with ``run``. The new run's folder."""
    page.get_by_role("button", name="Re-run refinement using the verdicts").click(timeout=budget.ms())
    expect(page.get_by_role("heading", name="Refine", exact=True)).to_be_visible(timeout=budget.ms())
    rerun = watch_fit(page, data_name, samples, budget, _shot(shots, "review-rerun.png"))
    assert rerun != run
    scores = _scores(rerun)
    removed_in = dict(zip(scores["id"], scores["round_removed"]))
    for sample_id, verdict in verdicts.items():
        if verdict == "anomaly":
            assert removed_in[sample_id] == "1", (sample_id, removed_in[sample_id])
            expect(main_area(page).get_by_test_id("stImageCaption").filter(
                has_text=f"{sample_id} · {CONFIRMED}")).to_be_visible(timeout=budget.ms())
    review_results(page, rerun, verdicts, budget, _shot(shots, "review-rerun-results.png"))
    expect(page.get_by_role("heading", name="Compare with another run on the same data")).to_be_visible(
        timeout=budget.ms())
    return rerun


def download_scores(page, run: str, samples: int, verdicts: dict[str, str], budget: Budget,
                    columns: list[str] = SCORE_COLUMNS) -> list[dict[str, str]]:
    """The Results page's scores download: one row per sample, the run's ``columns`` plus the verdicts.
    Its rows, as read."""
    button = main_area(page).get_by_test_id("stDownloadButton").filter(has_text="Scores and verdicts (CSV)")
    with page.expect_download(timeout=budget.ms()) as started:
        button.get_by_role("button").click(timeout=budget.ms())
    download = started.value
    assert download.suggested_filename == f"{Path(run).name}-scores.csv"
    with open(download.path(), newline="") as opened:
        reader = csv.DictReader(opened)
        rows = list(reader)
    assert reader.fieldnames == columns, reader.fieldnames
    assert [row["id"] for row in rows] == list(_scores(run)["id"])
    assert len(rows) == samples
    assert all(math.isfinite(float(row["anomaly_score"])) for row in rows)
    assert {row["id"]: row["verdict"] for row in rows if row["verdict"]} == verdicts
    return rows


def review_walk(page, url: str, folder: Path, budget: Budget, shots: Path | None) -> str:
    """An expert's review, end to end: upload a zip (built in ``folder``), refine it with the defaults
    (reloading mid-fit), lasso on the map, judge samples on Inspect with the keys, re-run with the
    verdicts from Results, download the scores. The re-run's folder."""
    archive = review_zip(folder)
    upload(page, url, archive, REVIEW_SAMPLES, budget, _shot(shots, "review-data.png"))
    run = fit(page, archive.name, REVIEW_SAMPLES, budget, _shot(shots, "review-refine.png"))
    sample_id = embeddings(page, run, budget, shots, REVIEW_SAMPLES, "review-embeddings.png")
    verdicts = judge_with_keys(page, run, sample_id, budget, shots)
    review_results(page, run, verdicts, budget, _shot(shots, "review-results.png"))
    rerun = rerun_with_verdicts(page, run, archive.name, REVIEW_SAMPLES, verdicts, budget, shots)
    download_scores(page, rerun, REVIEW_SAMPLES, verdicts, budget)
    return rerun


# ----------------------------------------------------------------------------- a table's column roles

def roles_walk(page, url: str, table: Path, id_column: str, rows: int, budget: Budget,
               shots: Path | None) -> list[dict[str, str]]:
    """Upload ``table`` (a labelled csv of ``rows`` rows), see ``id_column`` take the role id in the Data
    page's Columns panel, fit it from the Refine page with the defaults and download its scores from
    Results. The downloaded rows."""
    upload(page, url, table, rows, budget, _shot(shots, "roles-data.png"))
    main = main_area(page)
    expect(main.get_by_role("heading", name="Columns", exact=True)).to_be_visible(timeout=budget.ms())
    # The editor draws on a canvas; its cells are read from the table inside it (for screen readers).
    roles = main.get_by_test_id("stDataFrame").filter(has_text="why / problem")
    named = page.locator("td[aria-colindex='1']", has_text=re.compile(rf"^{re.escape(id_column)}$"))
    row = roles.locator("tr", has=named)
    expect(row.locator("td[aria-colindex='2']")).to_have_text("id", timeout=budget.ms())
    goto_page(page, "Refine", budget)
    expect(main.get_by_text(f"Training data: {rows} rows")).to_be_visible(timeout=budget.ms())
    page.get_by_role("button", name="Start refinement").click(timeout=budget.ms())
    expect(page.get_by_text(FINISHED)).to_be_visible(timeout=budget.ms(FIT_MS))
    run = query_param(page, "run")
    assert run is not None and Path(run).is_dir(), page.url
    assert_clean(page, budget)
    screenshot(page, _shot(shots, "roles-refine.png"), budget)
    goto_page(page, "Results", budget)
    expect(page.get_by_role("heading", name="Downloads")).to_be_visible(timeout=budget.ms())
    assert_clean(page, budget)
    return download_scores(page, run, rows, {}, budget, LABELLED_SCORE_COLUMNS)


# ----------------------------------------------------------------------------- checks and facts

def samples_metric(page):
    """The Data page's sample count."""
    return page.get_by_test_id("stMetric").filter(has_text="Samples").get_by_test_id("stMetricValue")


def sidebar_fact(page, label: str, budget: Budget) -> str:
    """What the sidebar says under ``label`` (``Data``, ``Run``, ``Device``, ``Job``)."""
    sidebar = page.get_by_test_id("stSidebarUserContent")
    expect(sidebar.get_by_text(label, exact=True)).to_be_visible(timeout=budget.ms())
    lines = [line.strip() for line in sidebar.inner_text(timeout=budget.ms()).splitlines() if line.strip()]
    return lines[lines.index(label) + 1]


def assert_one_run_name(page, run: str, budget: Budget) -> None:
    """Every place that names the active run, names it by its folder: the sidebar, headings, captions
    and messages ("run NAME", "fit NAME"). The run's registry id may appear only as "id ..."."""
    name = Path(run).name
    run_id = json.loads((Path(run) / "run.json").read_text())["run_id"]
    texts = page.locator(NAMING_ELEMENTS).all_inner_texts()
    named = {sidebar_fact(page, "Run", budget)}
    named |= {token for text in texts for token in RUN_NAMED.findall(text)
              if RUN_FOLDER.fullmatch(token) or token == run_id}
    assert named == {name}, f"the run {name} is named {sorted(named)}"


def assert_axes_whole(page, budget: Budget, at_least: int = 1) -> None:
    """No plotly chart on the page cuts its data: every drawn trace's points (bars with their width,
    stacked bars with their totals) lie within its axes' ranges. Reads each chart's figure as drawn
    (``_fullData``, ``_fullLayout``); at least ``at_least`` charts must be drawn."""
    charts = page.locator(".js-plotly-plot")
    expect(charts.nth(at_least - 1)).to_be_attached(timeout=budget.ms())
    checked, problems = page.evaluate(AXES_JS)
    assert checked >= at_least, f"only {checked} charts drawn"
    assert not problems, problems


def ranked_ids(run: str) -> list[str]:
    """The run's sample ids, most anomalous first (the Inspect page's default list)."""
    scores = _scores(run)
    return [i for _, i in sorted(zip((-float(s) for s in scores["anomaly_score"]), scores["id"]),
                                 key=lambda pair: pair[0])]


def model_calls(run: str) -> dict[str, str]:
    """The run's call on each sample (``normal`` / ``anomaly``), by id."""
    scores = _scores(run)
    return {i: "anomaly" if int(flag) else "normal" for i, flag in zip(scores["id"], scores["is_anomaly"])}


def _scores(run: str) -> dict[str, list[str]]:
    """The run's ``scores.csv``, column by column, as written."""
    with open(Path(run) / "scores.csv", newline="") as opened:
        rows = list(csv.DictReader(opened))
    return {column: [row[column] for row in rows] for column in rows[0]}


AXES_JS = """() => {
  const problems = [];
  let checked = 0;
  for (const chart of document.querySelectorAll('.js-plotly-plot')) {
    const layout = chart._fullLayout, data = chart._fullData;
    if (!layout || !data) continue;
    checked += 1;
    const title = (layout.title && layout.title.text) || 'untitled chart';
    const extent = {};   // axis name -> [low, high] of what the traces put on it
    const stacks = {};   // value axis name -> position -> stacked total
    const cover = (axis, value) => {
      if (!Number.isFinite(value)) return;
      const seen = extent[axis._name] || (extent[axis._name] = [value, value]);
      seen[0] = Math.min(seen[0], value); seen[1] = Math.max(seen[1], value);
    };
    for (const trace of data) {
      if (trace.visible !== true || !trace.x || !trace.y) continue;
      const xa = layout['xaxis' + (trace.xaxis || 'x').slice(1)], ya = layout['yaxis' + (trace.yaxis || 'y').slice(1)];
      if (!xa || !ya) continue;
      const horizontal = trace.type === 'bar' && trace.orientation === 'h';
      const [at, atAxis, val, valAxis] = horizontal ? [trace.y, ya, trace.x, xa] : [trace.x, xa, trace.y, ya];
      const positions = Array.from(at, value => atAxis.d2l(value));
      const values = Array.from(val, value => valAxis.d2l(value));
      if (trace.type !== 'bar') {
        positions.forEach(value => cover(atAxis, value));
        values.forEach(value => cover(valAxis, value));
        continue;
      }
      const widths = Array.isArray(trace.width) || ArrayBuffer.isView(trace.width) ? Array.from(trace.width)
        : positions.map(() => (typeof trace.width === 'number' ? trace.width : 0));
      positions.forEach((p, i) => { cover(atAxis, p - widths[i] / 2); cover(atAxis, p + widths[i] / 2); });
      cover(valAxis, 0);
      if (layout.barmode === 'stack') {
        const totals = stacks[valAxis._name] || (stacks[valAxis._name] = {axis: valAxis, at: {}});
        positions.forEach((p, i) => { totals.at[p] = (totals.at[p] || 0) + values[i]; });
      } else {
        values.forEach(value => cover(valAxis, value));
      }
    }
    for (const {axis, at} of Object.values(stacks)) Object.values(at).forEach(total => cover(axis, total));
    for (const [name, [low, high]] of Object.entries(extent)) {
      const range = layout[name].range.map(Number);
      const [from, to] = [Math.min(...range), Math.max(...range)];
      const slack = 1e-6 * Math.max(to - from, 1e-12);
      if (low < from - slack || high > to + slack) {
        problems.push(`${title}: ${name} range [${from}, ${to}] cuts the data [${low}, ${high}]`);
      }
    }
  }
  return [checked, problems];
}"""
