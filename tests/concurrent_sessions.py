"""Two users on one studio server at once, in a real browser (issue 6, "Concurrent users").

Collected from ``tests/test_e2e_browser.py``, which imports the test: one test file holds every
browser test, so the two xdist workers (``--dist loadfile``) never run two studio servers and two
chromiums at once on two cores. It uses that module's chromium (the ``browser`` fixture).

One ``streamlit run app.py`` (its own ``REFINERY_HOME``) and two Playwright browser contexts, i.e.
two browsers, each with a studio session of its own (a different key in its URL):

- Session B uploads its own small image set on the Data page; session A keeps the built-in demo.
  The upload goes into B's own uploads folder; A still sees the demo's 300 samples and nothing of
  B's upload (not in its uploader, not in its list of earlier uploads), B sees its own count.
- Both fit with one refinement round: what is checked here is how two fits share the studio,
  which one round shows as well as three (the walks beside this test see three).
- Both press "Start refinement" at nearly the same time (A's press scheduled 5 ms before B's;
  either may land first, which changes nothing below). Neither session sees the other's job, so
  both presses start a job; the studio has one worker thread, so the second job queues behind the
  first and two fits never run at once. Each session follows its own job to its own run; while it
  waits for it, its page offers no second start (the states its Start button went through are
  recorded in the page, so the check does not depend on when it is made).
- Each session's Results page and sidebar show only its own run. A link to B's run opened in A's
  session shows a message instead of the run; once B shares the run on its Results page, the same
  link opens it for A (without the share switch, which only B has) and A's run list holds both.
- The registry then holds two finished runs on different data, each recorded with its session,
  whose fit intervals do not overlap; the server's peak resident memory stays bounded, and neither
  page nor the server log shows a traceback.

Timeouts: every wait takes its timeout from one :class:`bench.studio_walk.Budget`, so together they
cannot outlast it; pytest's timeout is that budget plus the server's start, chromium's launch, the
server's stop and a margin for the work between waits.

Needs Debian's chromium (``/usr/bin/chromium``) and the ``playwright`` Python package.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from available import require_path
from bench.studio import CHROMIUM, LAUNCH_TIMEOUT_S, STOP_TIMEOUT_S, browser_page, served
from core.data.builtin import DEMO_DIR
from core.registry import Registry
from pages.components.services import FOREIGN_RUN
from pages.components.state import session_id_of

SERVER_START_S = 60
MARGIN_S = 60            # page.content() reads, closing contexts, the registry checks: work outside any wait
UPLOAD_GOOD, UPLOAD_OTHER = 34, 6
UPLOAD_SAMPLES = UPLOAD_GOOD + UPLOAD_OTHER
PEAK_RSS_LIMIT = 3 * 1024**3  # bytes: generous; two small fits at 64 px need well under half of it
START_LEAD_MS = 1500     # both presses are scheduled this far ahead...
START_GAP_MS = 5         # ...B's this much after A's
QUEUED_LABEL = "A job is running; start another when it is done"
EARLIER_UPLOADS = "Or an earlier upload of this session"
SHARE_LABEL = "Share this run with other sessions"
SHARED_MS = 30_000       # the share switch's callback reaching the registry

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
require_path(CHROMIUM, "apt-get install chromium")
expect = playwright_api.expect
from bench.studio_walk import (  # noqa: E402  (imports playwright)
    DEMO_SAMPLES,
    FINISHED,
    FIT_MS,
    PAGE_MS,
    Budget,
    assert_clean,
    goto_page,
    main_area,
    query_param,
    selectbox_options,
)

BUDGET_S = 2 * FIT_MS / 1000 + 6 * PAGE_MS / 1000
"""Every wait of the test together: two fits one after the other, and page changes and checks."""
TIMEOUT_S = SERVER_START_S + LAUNCH_TIMEOUT_S + BUDGET_S + 2 * STOP_TIMEOUT_S + MARGIN_S

# Records every distinct state ("label|disabled") the fit form's submit button goes through, in the
# page itself and from now on: Streamlit redraws in place, so the observer lives as long as the page.
RECORD_START_BUTTON = """() => {
    window.startButtonStates = [];
    const record = () => {
        const button = document.querySelector('[data-testid=stFormSubmitButton] button');
        const state = button && `${button.textContent.trim()}|${button.disabled}`;
        if (state && window.startButtonStates.at(-1) !== state) window.startButtonStates.push(state);
    };
    new MutationObserver(record).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                         characterData: true});
    record();
}"""


# ----------------------------------------------------------------------------- helpers

def _samples_metric(page):
    return page.get_by_test_id("stMetric").filter(has_text="Samples").get_by_test_id("stMetricValue")


def _upload_set(folder: Path) -> list[Path]:
    """A small image set of B's own: copies of demo images under flat, new names."""
    folder.mkdir()
    chosen = ([("good", path) for path in sorted((DEMO_DIR / "good").glob("*.png"))[:UPLOAD_GOOD]]
              + [("other", path) for path in sorted((DEMO_DIR / "other").glob("*.png"))[:UPLOAD_OTHER]])
    assert len(chosen) == UPLOAD_SAMPLES, "the bundled demo folder is incomplete"
    files = []
    for kind, source in chosen:
        files.append(folder / f"b-{kind}-{source.name}")
        shutil.copyfile(source, files[-1])
    return files


def _choose(page, label: str, option: str, budget: Budget) -> None:
    """Pick ``option`` in the selectbox labelled ``label`` (inside the fit form: no rerun)."""
    box = page.get_by_test_id("stSelectbox").filter(has_text=label)
    combobox = box.get_by_role("combobox")
    combobox.click(timeout=budget.ms())
    page.get_by_role("option", name=option, exact=True).click(timeout=budget.ms())
    expect(combobox).to_have_value(option, timeout=budget.ms())


def _set_number(page, label: str, value: int, budget: Budget) -> None:
    """Type ``value`` into the number field labelled ``label`` (inside the fit form: no rerun). Tab leaves
    the field, which commits the value: the scheduled press of Start does not move the focus."""
    field = page.get_by_test_id("stNumberInput").filter(has_text=label).get_by_role("spinbutton")
    field.fill(str(value), timeout=budget.ms())
    field.press("Tab", timeout=budget.ms())
    expect(field).to_have_value(str(value), timeout=budget.ms())


def _prepare_fit_form(page, samples: int, budget: Budget) -> None:
    """On the Refine page: the session's own data, 64 px images, no localization maps and one refinement
    round (speed)."""
    goto_page(page, "Refine", budget)
    expect(main_area(page).get_by_text(f"Training data: {samples} images")).to_be_visible(timeout=budget.ms())
    expect(page.get_by_test_id("stSlider").filter(has_text="Image size (px)")).to_contain_text("64", timeout=budget.ms())
    _choose(page, "Localization maps", "none", budget)
    _set_number(page, "Rounds", 1, budget)


def _press_start_at(page, when_ms: float, budget: Budget) -> None:
    """Press "Start refinement" at ``when_ms`` (epoch ms), scheduled in the page, so that two sessions
    press within a few milliseconds of each other (Playwright's own clicks are seconds apart on a
    busy machine). The button is looked up when the timer fires; which session's press lands first
    changes nothing below."""
    expect(page.get_by_role("button", name="Start refinement")).to_be_enabled(timeout=budget.ms())
    page.evaluate(
        """when => setTimeout(() => [...document.querySelectorAll('button')]
             .find(button => button.innerText.trim() === 'Start refinement').click(), when - Date.now())""",
        when_ms,
    )


def _wait_for_param(page, name: str, budget: Budget) -> str:
    page.wait_for_function(f"() => new URLSearchParams(window.location.search).has({name!r})", timeout=budget.ms())
    return query_param(page, name)


def _wait_finished(page, budget: Budget) -> str:
    """Wait for the page's finished view; the run id it names. Either session's job may be the queued one,
    which finishes only after both fits (each with the map layout its job prepares)."""
    finished = page.get_by_text(FINISHED)
    expect(finished).to_be_visible(timeout=budget.ms(2 * FIT_MS))
    return FINISHED.match(finished.inner_text(timeout=budget.ms())).group(1)


def _wait_shared(registry: Registry, run_dir: str, budget: Budget) -> None:
    wait_s = budget.ms(SHARED_MS) / 1000
    deadline = time.monotonic() + wait_s
    while not registry.run_at(run_dir).shared:
        assert time.monotonic() < deadline, f"{run_dir} is not shared {wait_s:.0f} s after the switch was clicked"
        time.sleep(0.1)


def _peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


# ----------------------------------------------------------------------------- the test

@pytest.mark.timeout(TIMEOUT_S)
def test_two_sessions_keep_their_data_and_runs_to_themselves_and_their_fits_queue(tmp_path, browser):
    home = tmp_path / "refinery-home"
    home.mkdir()
    registry = Registry(path=home / "registry.sqlite")
    upload = _upload_set(tmp_path / "b-images")
    timings: dict[str, float] = {}
    started = time.perf_counter()

    with served(home, SERVER_START_S) as server:
        budget = Budget(BUDGET_S)
        with browser_page(browser, PAGE_MS) as page_a, browser_page(browser, PAGE_MS) as page_b:
            # Both browsers open the studio on the built-in demo, each in a studio session of its own.
            for page in (page_a, page_b):
                page.goto(server.url, timeout=budget.ms())
                expect(page.get_by_role("heading", name="Data", exact=True)).to_be_visible(timeout=budget.ms())
                expect(_samples_metric(page)).to_have_text(str(DEMO_SAMPLES), timeout=budget.ms())
            keys = {"A": _wait_for_param(page_a, "session", budget), "B": _wait_for_param(page_b, "session", budget)}
            assert keys["A"] != keys["B"]

            # B uploads its own images into its own folder; A keeps the demo.
            page_b.get_by_role("tab", name="Upload").click(timeout=budget.ms())
            page_b.get_by_test_id("stFileUploaderDropzoneInput").set_input_files([str(p) for p in upload],
                                                                                 timeout=budget.ms())
            use_upload = page_b.get_by_role("button", name="Use the uploaded files")
            expect(use_upload).to_be_enabled(timeout=budget.ms())  # the uploader commits once every file has arrived
            use_upload.click(timeout=budget.ms())
            expect(_samples_metric(page_b)).to_have_text(str(UPLOAD_SAMPLES), timeout=budget.ms())
            uploads = list((home / "workspace" / "uploads").glob("*/*"))
            assert len(uploads) == 1 and len(list(uploads[0].iterdir())) == UPLOAD_SAMPLES, uploads
            assert uploads[0].parent.name == session_id_of(keys["B"])  # a hash of B's key, never the key
            upload_name = uploads[0].name
            expect(main_area(page_b).get_by_role("heading", name=upload_name)).to_be_visible(timeout=budget.ms())
            expect(page_b.get_by_text(EARLIER_UPLOADS)).to_be_visible(timeout=budget.ms())
            assert_clean(page_b, budget)
            timings["upload_s"] = time.perf_counter() - started

            # A's session reruns (a page change and back) and still works on the demo only.
            goto_page(page_a, "Refine", budget)
            expect(main_area(page_a).get_by_text(f"Training data: {DEMO_SAMPLES} images")).to_be_visible(
                timeout=budget.ms())
            goto_page(page_a, "Data", budget)
            expect(_samples_metric(page_a)).to_have_text(str(DEMO_SAMPLES), timeout=budget.ms())
            expect(main_area(page_a).get_by_role("heading", name=DEMO_DIR.name)).to_be_visible(timeout=budget.ms())
            page_a.get_by_role("tab", name="Upload").click(timeout=budget.ms())
            # B's files are not here, nor among A's earlier uploads
            expect(page_a.get_by_test_id("stFileUploaderFile")).to_have_count(0, timeout=budget.ms())
            expect(page_a.get_by_text(EARLIER_UPLOADS)).to_have_count(0, timeout=budget.ms())
            assert upload_name not in page_a.content()
            assert_clean(page_a, budget)

            # Both prepare a fit of their own data, then press Start: A first, B right after.
            _prepare_fit_form(page_a, DEMO_SAMPLES, budget)
            _prepare_fit_form(page_b, UPLOAD_SAMPLES, budget)
            for page in (page_a, page_b):
                page.evaluate(RECORD_START_BUTTON)
            fit_started = time.perf_counter()
            press_at = time.time() * 1000 + START_LEAD_MS  # one clock: the browsers run on this machine
            _press_start_at(page_a, press_at, budget)
            _press_start_at(page_b, press_at + START_GAP_MS, budget)
            job_a, job_b = _wait_for_param(page_a, "job", budget), _wait_for_param(page_b, "job", budget)
            assert job_a != job_b  # neither page saw the other's job: two jobs, the second queued
            sessions = {"A": (page_a, DEMO_SAMPLES), "B": (page_b, UPLOAD_SAMPLES)}
            own_runs = {name: _wait_finished(page, budget) for name, (page, _) in sessions.items()}
            assert (query_param(page_a, "job"), query_param(page_b, "job")) == (job_a, job_b)
            timings["fits_s"] = time.perf_counter() - fit_started

            # While its job ran or waited, each page offered no second start: between the press and
            # the finished view, its Start button was the disabled "job running" one.
            for name, (page, _) in sessions.items():
                states = page.evaluate("() => window.startButtonStates")
                assert states == ["Start refinement|false", f"{QUEUED_LABEL}|true", "Start refinement|false"], (
                    name, states)

            # Each session ends on its own run, trained on its own data, and lists only that run.
            run_dirs = {}
            for name, (page, samples) in sessions.items():
                expect(main_area(page).get_by_text(f"Training data: {samples} images")).to_be_visible(
                    timeout=budget.ms())
                expect(page.get_by_role("heading", name=f"Run {own_runs[name]}")).to_be_visible(timeout=budget.ms())
                run_dirs[name] = query_param(page, "run")
                goto_page(page, "Results", budget)
                sidebar = page.get_by_test_id("stSidebar")
                expect(sidebar.get_by_text(Path(run_dirs[name]).name, exact=True)).to_be_visible(timeout=budget.ms())
                assert selectbox_options(page, "Open a run", budget) == [Path(run_dirs[name]).name]
                expect(page.get_by_test_id("stButton").filter(has_text=re.compile("^Open$"))).to_have_count(
                    0, timeout=budget.ms())
                assert_clean(page, budget)
            for name, other in (("A", "B"), ("B", "A")):
                assert Path(run_dirs[other]).name not in sessions[name][0].content()

            # A link to B's run, opened in A's session, shows a message instead of the run.
            link_to_b = f"{server.url}/results?{urlencode({'session': keys['A'], 'run': run_dirs['B']})}"
            page_a.goto(link_to_b, timeout=budget.ms())
            expect(main_area(page_a).get_by_text(FOREIGN_RUN)).to_be_visible(timeout=budget.ms())
            expect(page_a.get_by_text(f"Run {own_runs['B']}:")).to_have_count(0, timeout=budget.ms())
            assert_clean(page_a, budget)

            # B shares its run: the same link now opens it for A, without the share switch.
            page_b.get_by_text(SHARE_LABEL).click(timeout=budget.ms())
            _wait_shared(registry, run_dirs["B"], budget)
            page_a.reload(timeout=budget.ms())
            b_caption = re.compile(rf"^Run {re.escape(own_runs['B'])} \(id \w+\): {UPLOAD_SAMPLES} images")
            expect(main_area(page_a).get_by_text(b_caption)).to_be_visible(timeout=budget.ms())
            expect(page_a.get_by_text(SHARE_LABEL)).to_have_count(0, timeout=budget.ms())
            both = sorted(Path(run_dir).name for run_dir in run_dirs.values())
            assert sorted(selectbox_options(page_a, "Open a run", budget)) == both
            assert_clean(page_a, budget)
            assert_clean(page_b, budget)
            peak_rss = _peak_rss_bytes(server.pid)

    server_log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in server_log, server_log[-3000:]
    timings["total_s"] = time.perf_counter() - started

    # The registry: two finished runs on different data, each with its session, fitted one after the other.
    runs = sorted(registry.runs(), key=lambda run: run.created)
    assert [run.status for run in runs] == ["done", "done"], [(run.run_id, run.status, run.message) for run in runs]
    by_name = {Path(run.path).name: run for run in runs}  # the studio names a run by its folder
    run_a, run_b = by_name[own_runs["A"]], by_name[own_runs["B"]]
    assert (run_a.n_samples, Path(run_a.data_source)) == (DEMO_SAMPLES, DEMO_DIR)
    assert (run_b.n_samples, Path(run_b.data_source)) == (UPLOAD_SAMPLES, uploads[0])
    assert (run_a.session, run_a.shared) == (session_id_of(keys["A"]), False)
    assert (run_b.session, run_b.shared) == (session_id_of(keys["B"]), True)
    assert runs[0].fingerprint != runs[1].fingerprint
    first, second = runs
    first_finished = (Path(first.path) / "run.json").stat().st_mtime  # written as the fit's last step
    second_finished = (Path(second.path) / "run.json").stat().st_mtime
    assert first.created < first_finished <= second.created < second_finished, (
        f"the fits overlap: {first.run_id} ran {first.created:.3f}..{first_finished:.3f}, "
        f"{second.run_id} ran {second.created:.3f}..{second_finished:.3f}")
    assert peak_rss < PEAK_RSS_LIMIT, f"the server's peak RSS was {peak_rss / 1024**3:.2f} GiB"
    print(f"first={first.n_samples} samples, gap between fits {second.created - first_finished:.2f} s, "
          f"peak RSS {peak_rss / 1024**2:.0f} MiB, "
          + ", ".join(f"{key} {value:.1f}" for key, value in timings.items()))
