"""Studio fit: how much longer a fit takes in the studio, watched live, than the same fit headless.

A studio fit runs in a thread of the Streamlit server, beside the script reruns of every open page. The
Refine page's live view and the sidebar's job line rerun every ``LIVE_REFRESH_S``; by default Streamlit
also forces a full garbage collection after every rerun (``runner.postScriptGC``), which holds the GIL for
a quarter of a second once torch is loaded. Refinery's ``.streamlit/config.toml`` turns that off; this
script measures both settings side by side in one run.

For each setting, ``--repeats`` times, alternating: a fresh ``streamlit run app.py`` (its own
``REFINERY_HOME``), ``--watchers`` browser sessions (Debian's chromium through Playwright) that open the
studio, and the first one starts the built-in demo's fit (300 Fashion-MNIST images) from the Refine page
with the form's defaults; the others open the job's page and watch it too. Measured: the fit's own time
(from the run's registry record to its ``run.json``, the fit's last write) and the seconds from the click
to the page's "Finished" line (which includes the map layout the job computes after the fit). The same
configuration, read back from the first studio run, is then fitted here headless with ``core.engine.fit``.

Run: ``python bench/studio_fit.py --out bench/results/studio_fit.txt`` (about 2 minutes on 2 cores; with
``--watchers 2`` about 8).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Report, base_parser, machine_footer, machine_header, progress, setup_logging
from bench.studio import CHROMIUM, FINISHED, browser_page, launch_chromium, served
from bench.studio_walk import DEMO_SAMPLES, PAGE_MS, Budget, goto_page, main_area, query_param

SETTINGS = {"Streamlit's default: collect after every rerun": "true", "Refinery's config: no forced collection": "false"}
FIT_WAIT_MS = 600_000  # Streamlit's default setting with two watchers took over 150 s (bench/studio_walk.FIT_MS)
BUDGET_S = (FIT_WAIT_MS + 4 * PAGE_MS) / 1000


def studio_fit(post_script_gc: str, watchers: int, home: Path, browser) -> tuple[float, float, Path]:
    """One demo fit in a fresh studio; (fit seconds from the registry, click-to-finished seconds, run folder)."""
    from playwright.sync_api import expect

    from core.registry import Registry

    budget = Budget(BUDGET_S)
    with served(home, options=("--runner.postScriptGC", post_script_gc)) as server, ExitStack() as pages:
        first = pages.enter_context(browser_page(browser, PAGE_MS))
        first.goto(server.url, timeout=budget.ms())
        goto_page(first, "Refine", budget)
        expect(main_area(first).get_by_text(f"Training data: {DEMO_SAMPLES} images")).to_be_visible(
            timeout=budget.ms())
        clicked = time.perf_counter()
        first.get_by_role("button", name="Start refinement").click(timeout=budget.ms())
        first.wait_for_function("() => new URLSearchParams(window.location.search).has('job')", timeout=budget.ms())
        for _ in range(watchers - 1):  # the job's page, opened in sessions of their own
            pages.enter_context(browser_page(browser, PAGE_MS)).goto(first.url, timeout=budget.ms())
        expect(first.get_by_text(FINISHED)).to_be_visible(timeout=budget.ms(FIT_WAIT_MS))
        to_finished = time.perf_counter() - clicked
        run_dir = Path(query_param(first, "run"))
    record = Registry(path=home / "registry.sqlite").runs()[0]
    return (run_dir / "run.json").stat().st_mtime - record.created, to_finished, run_dir


def headless_fit(run_dir: Path, out: Path) -> float:
    """The studio run's configuration fitted on the same data in this process; seconds."""
    from core import engine
    from core.data.builtin import DEMO_DIR
    from core.run_dir import read_config

    dataset = engine.load_data(DEMO_DIR)
    started = time.perf_counter()
    engine.fit(dataset, read_config(run_dir), out)
    return time.perf_counter() - started


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], default_seeds=[0])
    parser.add_argument("--repeats", type=int, default=2, help="fits per setting, alternating (default 2)")
    parser.add_argument("--watchers", type=int, default=1, help="browser sessions watching the fit (default 1)")
    args = parser.parse_args()
    setup_logging(args.verbose)
    from playwright.sync_api import sync_playwright

    report = Report(args.out)
    machine_header(report, "Studio fit: the demo fit watched live in the studio, against the same fit headless")
    report.line(f"chromium {CHROMIUM}; {args.watchers} watching session(s); {args.repeats} fit(s) per setting, "
                "alternating, each on a fresh server")
    started = time.perf_counter()
    fits: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as scratch, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        first_run = None
        for repeat in range(args.repeats):
            for name, value in SETTINGS.items():
                progress(f"studio fit {repeat + 1}/{args.repeats}: {name}")
                home = Path(scratch) / f"home-{value}-{repeat}"
                fit_s, finished_s, run_dir = studio_fit(value, args.watchers, home, browser)
                fits[name].append((fit_s, finished_s))
                first_run = first_run or run_dir
        browser.close()
        progress("the same fit headless")
        headless = [headless_fit(first_run, Path(scratch) / f"headless-{i}") for i in range(args.repeats)]

    headless_s = statistics.median(headless)
    rows = [[name, *(statistics.median(column) for column in zip(*values)),
             statistics.median(fit for fit, _ in values) / headless_s, ", ".join(f"{fit:.1f}" for fit, _ in values)]
            for name, values in fits.items()]
    rows.append(["headless (core.engine.fit, this process)", headless_s, None, 1.0,
                 ", ".join(f"{value:.1f}" for value in headless)])
    report.line()
    report.table(["setting", "fit s (median)", "click to 'Finished' s (median)", "fit / headless", "every fit s"],
                 rows)
    machine_footer(report, time.perf_counter() - started)


if __name__ == "__main__":
    main()
