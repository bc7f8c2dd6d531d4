"""App: the studio's responsiveness, measured in a real browser (Debian's chromium through Playwright).

Issue 4, "Tests" (bench/app.py), measured in one run against ``streamlit run app.py`` servers started here,
each with its own ``REFINERY_HOME`` in a temporary folder:

(a) start-up, ``--repeats`` times, each on a fresh server: seconds from launching the process to
    ``/_stcore/health`` answering ``ok``, then from there to the first page being interactive (the
    Data page's "Use this data set" button enabled and its first metric drawn; the first session
    of a server pays Streamlit's and the data loaders' imports; the engine, torch included, loads
    in a background thread meanwhile). A second browser session on the same server
    gives the warm figure. Target: under 3 s each.
(b) the live view of a running fit: the Fashion-MNIST set (1,000 images, Debian's
    ``dataset-fashion-mnist``) is chosen on the Data page and fitted from the Refine page at
    ``--image-size`` px (default 128, so that the job lasts; the other fields keep the form's
    defaults; cancelled after 240 s). Every 0.2 s the page's progress text (``st.progress``) and
    the job's "running for N s" caption are read; the seconds between observed changes are
    reported. The caption changes on every refresh of the live fragment (it shows whole seconds,
    so about 1 s is the finest step it can show); the progress text changes only when the job
    reports new progress. Target: a change at least every 2 s. Where the progress bar is drawn
    when it first appears is recorded too (issue 14): target, inside the 1400 x 900 viewport with
    the page not scrolled.
(c) the Embeddings map of a 10,000-sample run: a table run is fitted here (16 gaussian features,
    3% uniform outliers, ``core.engine.fit``) and its UMAP layout computed beforehand with
    ``core.layouts.run_layouts`` (reported separately), so what is timed is the page: seconds from
    clicking "Embeddings" in the sidebar until the plotly WebGL scatter holds all points and its
    canvas is drawn, ``--repeats`` visits. Target: under 2 s.

Run: ``python bench/app.py --out bench/results/app.txt`` (1.5-3 minutes on 2 cores) or ``--quick``.
"""
from __future__ import annotations

import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import Report, base_parser, machine_footer, machine_header, progress, setup_logging, timed
from bench.studio import CHROMIUM, FINISHED, VIEWPORT, browser_page, launch_chromium, served
from core.config import FIT_PARAMS

STARTUP_TARGET_S = 2.0
REFRESH_TARGET_S = 2.0
MAP_TARGET_S = 2.0
SAMPLE_EVERY_S = 0.2
LIVE_DATA = "Fashion-MNIST sneakers (1,000 images)"
QUICK_LIVE_DATA = "Demo: Fashion-MNIST sneakers (300 images)"
DEMO_DATA, DEMO_SAMPLES = QUICK_LIVE_DATA, 300
IMAGE_SIZES = FIT_PARAMS["image_size"].form_values  # the Refine form's choices
MAX_JOB_S = 240
WAIT_MS = 120_000

# The Data page is interactive: its button is enabled and the first metric is drawn.
DATA_PAGE_READY = """() => {
    const button = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Use this data set');
    return Boolean(button && !button.disabled && document.querySelector('[data-testid=stMetric]'));
}"""
# The Embeddings map holds all n points and has drawn them: its WebGL canvas (scattergl, from 2,000
# points) or its SVG markers (fewer points).
MAP_DRAWN = """(n) => {
    const plot = document.querySelector('.js-plotly-plot');
    if (!plot || !plot._fullData) return false;
    const points = plot._fullData.reduce((total, trace) => total + (trace.x ? trace.x.length : 0), 0);
    return points === n && Boolean(plot.querySelector('canvas.gl-canvas-context, .scatterlayer .point'));
}"""
# One read of the live view: [progress text, "running for" caption, finished?].
LIVE_STATE = """() => {
    const bar = document.querySelector('[data-testid=stProgress]');
    const caption = [...document.querySelectorAll('[data-testid=stCaptionContainer]')]
        .map(e => e.innerText).find(t => t.includes('running for'));
    const main = document.querySelector('[data-testid=stMain]');
    const finished = Boolean(main && /Finished in|The job failed|The job was cancelled/.test(main.innerText));
    return [bar ? bar.innerText : null, caption || null, finished];
}"""
# Where the progress bar is drawn: [top, bottom] in viewport pixels, and the page's vertical scroll.
PROGRESS_PLACE = """() => {
    const box = document.querySelector('[data-testid=stProgress]').getBoundingClientRect();
    const scroller = document.querySelector('[data-testid=stMain]');
    return [box.top, box.bottom, Math.max(window.scrollY, scroller ? scroller.scrollTop : 0)];
}"""



# ----------------------------------------------------------------------------- server and browser

def open_data_page(page, url: str) -> float:
    """Seconds from navigating to ``url`` until the Data page is interactive."""
    started = time.perf_counter()
    page.goto(url)
    page.wait_for_function(DATA_PAGE_READY, polling="raf", timeout=WAIT_MS)
    return time.perf_counter() - started


def go_to(page, title: str) -> None:
    page.get_by_test_id("stSidebarNavLink").filter(has_text=title).click()
    page.get_by_role("heading", name=title, exact=True).wait_for()


# ----------------------------------------------------------------------------- (a) start-up

def startup(browser, home: Path, repeats: int) -> list[tuple[float, float, float]]:
    """(health s, first session interactive s, second session interactive s) per fresh server."""
    rows = []
    for repeat in range(repeats):
        with served(home) as server:
            with browser_page(browser, WAIT_MS) as page:
                first = open_data_page(page, server.url)
            with browser_page(browser, WAIT_MS) as page:
                second = open_data_page(page, server.url)
        progress(f"start-up {repeat + 1}/{repeats}: health {server.health_s:.2f} s, first page {first:.2f} s, "
                 f"second session {second:.2f} s")
        rows.append((server.health_s, first, second))
    return rows


# ----------------------------------------------------------------------------- (b) live view

@dataclass
class LiveTrace:
    job_s: float                 # Start pressed -> finished view
    first_progress_s: float      # Start pressed -> progress bar drawn
    progress_place: tuple[float, float, float]  # the bar's top and bottom px when first drawn; page scroll px
    progress_changes: list[float]
    progress_texts: list[str]    # the text shown from each progress change on
    caption_changes: list[float]
    samples: int
    finished: bool


def set_image_size(page, size: int) -> None:
    """Move the Refine form's "Image size (px)" slider to ``size`` with the keyboard."""
    thumb = page.get_by_test_id("stSlider").filter(has_text="Image size").get_by_role("slider")
    thumb.focus()
    for _ in range(len(IMAGE_SIZES)):
        shown = int(thumb.get_attribute("aria-valuetext"))
        if shown == size:
            return
        thumb.press("ArrowRight" if shown < size else "ArrowLeft")
    raise RuntimeError(f"could not set the image size to {size}; the form offers {IMAGE_SIZES}")


def live_view(browser, home: Path, data_title: str, image_size: int) -> LiveTrace:
    """Fit ``data_title`` at ``image_size`` px from the Refine page; read the live view every SAMPLE_EVERY_S."""
    with served(home) as server, browser_page(browser, WAIT_MS) as page:
        open_data_page(page, server.url)
        page.get_by_text(data_title, exact=True).click()
        page.get_by_role("button", name="Use this data set").click()
        size = re.search(r"\(([\d,]+) images\)", data_title).group(1).replace(",", "")
        samples_metric = page.get_by_test_id("stMetric").filter(has_text="Samples")
        samples_metric.get_by_test_id("stMetricValue").filter(has_text=re.compile(f"^{size}$")).wait_for()
        go_to(page, "Refine")
        set_image_size(page, image_size)
        progress(f"live view: {page.get_by_text('Training data:').inner_text()}, {image_size} px")
        started = time.perf_counter()
        page.get_by_role("button", name="Start refinement").click()
        page.get_by_test_id("stProgress").wait_for()
        first_progress = time.perf_counter() - started
        place = tuple(page.evaluate(PROGRESS_PLACE))
        last = (None, None)
        progress_changes, progress_texts, caption_changes, samples, finished = [], [], [], 0, False
        while time.perf_counter() - started < MAX_JOB_S:
            bar, caption, finished = page.evaluate(LIVE_STATE)
            samples += 1
            now = time.perf_counter() - started
            if finished:
                break
            if bar is not None and bar != last[0]:
                progress_changes.append(now)
                progress_texts.append(bar)
            if caption is not None and caption != last[1]:
                caption_changes.append(now)
            last = (bar or last[0], caption or last[1])
            time.sleep(max(0.0, SAMPLE_EVERY_S - (time.perf_counter() - started - now)))
        job_s = time.perf_counter() - started
        if not finished:
            page.get_by_role("button", name="Cancel").click()
        return LiveTrace(job_s, first_progress, place, progress_changes, progress_texts, caption_changes, samples, finished)


def interval_stats(changes: list[float]) -> tuple[float | None, float | None, float | None]:
    """(median, p90, max) of the seconds between consecutive changes; None without two changes."""
    gaps = np.diff(changes)
    if len(gaps) == 0:
        return None, None, None
    return float(np.median(gaps)), float(np.percentile(gaps, 90)), float(np.max(gaps))


# ----------------------------------------------------------------------------- (c) Embeddings map

def table_run(home: Path, rows: int, seed: int) -> tuple[float, float]:
    """Fit a table run of ``rows`` samples under ``home`` and lay it out; (fit s, UMAP layout s)."""
    import pandas as pd

    from core import engine
    from core.layouts import run_layouts
    from core.registry import Registry

    rng = np.random.default_rng(seed)
    outliers = int(rows * 0.03)
    features = np.concatenate([rng.normal(size=(rows - outliers, 16)), rng.uniform(-6, 6, size=(outliers, 16))])
    labels = np.r_[np.zeros(rows - outliers, np.int8), np.ones(outliers, np.int8)]
    order = rng.permutation(rows)
    frame = pd.DataFrame(features[order], columns=[f"x{i:02d}" for i in range(16)]).assign(label=labels[order])
    source = home / "workspace" / f"synthetic-{rows}.csv"
    source.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(source, index=False)

    dataset = engine.load_data(source, label_column="label", workspace=home / "workspace")
    config = engine.suggested_config(dataset).with_changes(seed=seed, label_column="label")
    with timed() as fit_watch:
        result = engine.fit(dataset, config, engine.new_run_dir(source.stem, home / "runs"),
                            registry=Registry(home / "registry.sqlite"))
    with timed() as umap_watch:
        run_layouts(result.run_dir)
    return fit_watch.seconds, umap_watch.seconds


def map_render(browser, home: Path, rows: int, repeats: int) -> list[float]:
    """Seconds from clicking "Embeddings" until the map holds ``rows`` points, per visit."""
    times = []
    with served(home) as server, browser_page(browser, WAIT_MS) as page:
        open_data_page(page, server.url)
        for visit in range(repeats):
            started = time.perf_counter()
            page.get_by_test_id("stSidebarNavLink").filter(has_text="Embeddings").click()
            page.wait_for_function(MAP_DRAWN, arg=rows, polling="raf", timeout=WAIT_MS)
            page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
            times.append(time.perf_counter() - started)
            progress(f"map visit {visit + 1}/{repeats}: {times[-1]:.2f} s")
            go_to(page, "Data")
    return times


def map_after_studio_fit(browser, home: Path) -> tuple[float, float]:
    """Fit the demo from the Refine page (the form's defaults); (fit s, first Embeddings visit s)."""
    with served(home) as server, browser_page(browser, WAIT_MS) as page:
        open_data_page(page, server.url)  # a new session starts on the demo: nothing to choose (a "Use this
        go_to(page, "Refine")             # data set" click reruns the page, and a click during it can be lost)
        page.get_by_text(re.compile(f"^Training data: {DEMO_SAMPLES} images")).wait_for()
        started = time.perf_counter()
        page.get_by_role("button", name="Start refinement").click()
        page.get_by_text(FINISHED).wait_for(timeout=MAX_JOB_S * 1000)
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        page.get_by_test_id("stSidebarNavLink").filter(has_text="Embeddings").click()
        page.wait_for_function(MAP_DRAWN, arg=DEMO_SAMPLES, polling="raf", timeout=WAIT_MS)
        page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
        return fit_s, time.perf_counter() - started


# ----------------------------------------------------------------------------- report

def met(value: float | None, target: float) -> str:
    return "-" if value is None else ("MET" if value < target else "NOT met")


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=(0,))
    parser.add_argument("--repeats", type=int, default=3, help="fresh servers in (a), map visits in (c)")
    parser.add_argument("--rows", type=int, default=10_000, help="samples of the table run in (c)")
    parser.add_argument("--image-size", type=int, default=128, choices=IMAGE_SIZES,
                        help="image size of the fit in (b); larger sizes make the job last longer")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not CHROMIUM.is_file():
        raise SystemExit(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    repeats = 1 if args.quick else args.repeats
    rows = 3_000 if args.quick else args.rows
    live_data = QUICK_LIVE_DATA if args.quick else LIVE_DATA
    image_size = 64 if args.quick else args.image_size
    seed = args.seeds[0]

    report = Report(args.out)
    machine_header(report, "App: the studio in a real browser")
    import streamlit

    with timed() as total, tempfile.TemporaryDirectory(prefix="refinery-bench-app-") as scratch, \
            sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        report.line(f"- streamlit {streamlit.__version__}; chromium {browser.version} (headless, --disable-gpu: "
                    f"WebGL in software); viewport {VIEWPORT['width']}x{VIEWPORT['height']}")
        report.line()

        progress("(a) start-up")
        starts = startup(browser, Path(scratch), repeats)
        rows_a = [[i + 1, h, f, s] for i, (h, f, s) in enumerate(starts)]
        medians = np.median(np.array(starts), axis=0)
        rows_a.append(["median", *medians])
        report.table(["server", "launch -> health ok s", "health -> first page interactive s (first session)",
                      "second session s"], rows_a,
                     title=f"(a) Start-up, {repeats} fresh servers (interactive: 'Use this data set' enabled "
                           "and the first metric drawn)")
        report.line(f"- launch -> health: median {medians[0]:.2f} s, target < {STARTUP_TARGET_S:.0f} s: "
                    f"{met(medians[0], STARTUP_TARGET_S)}")
        report.line(f"- health -> first page interactive, first session (Streamlit and data-loader imports; the engine loads in the background): median "
                    f"{medians[1]:.2f} s, target < {STARTUP_TARGET_S:.0f} s: {met(medians[1], STARTUP_TARGET_S)}")
        report.line(f"- later sessions: median {medians[2]:.2f} s: {met(medians[2], STARTUP_TARGET_S)}")
        report.line()

        progress(f"(b) live view while fitting {live_data}")
        live_home = Path(scratch) / "live"
        live_home.mkdir()
        trace = live_view(browser, live_home, live_data, image_size)
        live_rows = []
        for name, changes in (("progress text (st.progress)", trace.progress_changes),
                              ("'running for N s' caption (every refresh)", trace.caption_changes)):
            median, p90, longest = interval_stats(changes)
            live_rows.append([name, len(changes), median, p90, longest, met(longest, REFRESH_TARGET_S)])
        report.table(["what changed", "changes seen", "median s between", "p90 s", "max s",
                      f"target: max < {REFRESH_TARGET_S:.0f} s"], live_rows,
                     title=f"(b) Live view during a fit of {live_data} at {image_size} px (other fields: "
                           f"the form's defaults), read every {SAMPLE_EVERY_S} s")
        gaps = np.diff(trace.progress_changes)
        for index in np.argsort(-gaps)[:3]:
            report.line(f"- progress text unchanged for {gaps[index]:.1f} s (from "
                        f"{trace.progress_changes[index]:.1f} s after Start) while showing: "
                        f"{trace.progress_texts[index]!r}")
        report.line(f"- job {'finished' if trace.finished else 'cancelled after'} {trace.job_s:.1f} s after Start "
                    f"was pressed; progress bar drawn after {trace.first_progress_s:.2f} s; {trace.samples} reads")
        top, bottom, scrolled = trace.progress_place
        visible = top >= 0 and bottom <= VIEWPORT["height"] and scrolled == 0
        report.line(f"- the progress bar, when first drawn: {top:.0f}-{bottom:.0f} px from the top of the "
                    f"{VIEWPORT['width']}x{VIEWPORT['height']} viewport, page scrolled {scrolled:.0f} px; "
                    f"visible without scrolling: {'MET' if visible else 'NOT met'}")
        report.line()

        progress(f"(c) Embeddings map of {rows} samples")
        map_home = Path(scratch) / "map"
        map_home.mkdir()
        fit_s, umap_s = table_run(map_home, rows, seed)
        visits = map_render(browser, map_home, rows, repeats)
        report.table(["visit", "click 'Embeddings' -> map drawn s", f"target < {MAP_TARGET_S:.0f} s"],
                     [[i + 1, t, met(t, MAP_TARGET_S)] for i, t in enumerate(visits)]
                     + [["median", float(np.median(visits)), met(float(np.median(visits)), MAP_TARGET_S)]],
                     title=f"(c) Embeddings page, {rows} samples (plotly WebGL scatter, layout precomputed)")
        report.line(f"- the run: {rows} rows x 16 features, 3% outliers, seed {seed}; engine.fit {fit_s:.1f} s; "
                    f"UMAP layout (core.layouts.run_layouts, computed before the visits) {umap_s:.1f} s")
        report.line()

        progress("(d) the demo fitted in the studio, then the first Embeddings visit")
        demo_home = Path(scratch) / "demo"
        demo_home.mkdir()
        demo_fit_s, first_visit_s = map_after_studio_fit(browser, demo_home)
        report.table(["data", "Start -> finished view s", "click 'Embeddings' -> map drawn s",
                      f"target < {MAP_TARGET_S:.0f} s"],
                     [[DEMO_DATA, demo_fit_s, first_visit_s, met(first_visit_s, MAP_TARGET_S)]],
                     title="(d) The first Embeddings visit after a fit in the studio (the form's defaults)")
        report.line()
        browser.close()
    machine_footer(report, total.seconds)


if __name__ == "__main__":
    main()
