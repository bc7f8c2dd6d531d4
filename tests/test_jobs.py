"""Background jobs: one at a time in submission order, cancel, failures, published outputs, ETA."""
import dataclasses
import logging
import threading
import time

import numpy as np
import pytest

from core import jobs
from core.errors import DataError
from core.jobs import JobRunner
from core.progress import ProgressEvent

TIMEOUT = 10.0


@pytest.fixture
def runner():
    return JobRunner()


class FakeClock:
    """A clock that moves only when told to: ``advance(seconds)``."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def blocked_job():
    """A job that runs until its ``release`` event is set; ``started`` is set when it begins."""
    started, release = threading.Event(), threading.Event()

    def work(context):
        started.set()
        while not release.wait(0.01):
            context.cancel.raise_if_cancelled()

    return work, started, release


def test_jobs_run_one_at_a_time_in_submission_order(runner):
    log = []

    def work(name):
        def run(context):
            log.append(("start", name))
            time.sleep(0.05)  # room for a wrongly concurrent worker to interleave its own start
            log.append(("end", name))
            return name
        return run

    ids = [runner.submit(f"job {name}", work(name)) for name in "abcd"]
    results = [runner.wait(job_id, TIMEOUT) for job_id in ids]
    assert [status.state for status in results] == ["done"] * 4
    assert [status.result for status in results] == list("abcd")
    assert log == [(kind, name) for name in "abcd" for kind in ("start", "end")], (
        "each job ends before the next one starts"
    )


def test_a_queued_job_waits_and_active_is_the_running_one(runner):
    first, first_started, release_first = blocked_job()
    second, second_started, release_second = blocked_job()
    first_released_when_second_started = []

    def second_after_first(context):
        first_released_when_second_started.append(release_first.is_set())
        second(context)

    first_id = runner.submit("first", first)
    second_id = runner.submit("second", second_after_first)
    assert first_started.wait(TIMEOUT)
    assert runner.status(first_id).state == "running" and runner.status(second_id).state == "queued"
    assert runner.status(second_id).started is None and runner.status(second_id).elapsed_s == 0.0
    assert runner.active().job_id == first_id
    assert [status.job_id for status in runner.jobs()] == [second_id, first_id], "newest first"

    release_first.set()
    assert second_started.wait(TIMEOUT)
    assert first_released_when_second_started == [True], "the second job waits for the first"
    assert runner.wait(first_id, TIMEOUT).state == "done"
    assert runner.active().job_id == second_id
    release_second.set()
    assert runner.wait(second_id, TIMEOUT).state == "done"
    assert runner.active() is None


def test_active_is_the_oldest_queued_job_when_none_runs(runner):
    hold = threading.Event()
    idle_worker = threading.Thread(target=hold.wait, daemon=True)
    idle_worker.start()
    runner._worker = idle_worker  # a live worker that takes nothing from the queue: jobs stay queued
    queued = [runner.submit(f"queued {i}", lambda context, i=i: i) for i in range(3)]
    assert [runner.status(job_id).state for job_id in queued] == ["queued"] * 3
    assert runner.active().job_id == queued[0]
    hold.set()
    idle_worker.join(TIMEOUT)
    last = runner.submit("starts a worker", lambda context: None)
    assert [runner.wait(job_id, TIMEOUT).result for job_id in queued] == [0, 1, 2]
    assert runner.wait(last, TIMEOUT).state == "done"


def test_cancel_a_running_job(runner):
    work, started, _ = blocked_job()
    job_id = runner.submit("long", work)
    assert started.wait(TIMEOUT)
    runner.cancel(job_id)
    status = runner.wait(job_id, TIMEOUT)
    assert status.state == "cancelled" and not status.active
    assert status.result is None and status.eta_s is None
    assert status.started is not None and status.finished is not None


def test_a_cancelled_fit_job_is_cancelled_in_the_registry_too(runner, tmp_path):
    from core import engine
    from core.registry import Registry
    from sample_data import write_digits_table

    dataset = engine.load_data(write_digits_table(tmp_path / "digits.csv", n_normal=60, n_anomalous=6),
                               label_column="label")
    registry = Registry(tmp_path / "registry.sqlite")
    fit = engine.fit_work(dataset, engine.suggested_config(dataset), tmp_path / "run", registry=registry)
    started, release = threading.Event(), threading.Event()

    def work(context):  # the fit starts once the user has pressed Cancel
        started.set()
        release.wait(TIMEOUT)
        return fit(context)

    job_id = runner.submit("fit", work)
    assert started.wait(TIMEOUT)
    runner.cancel(job_id)
    release.set()
    assert runner.wait(job_id, 60).state == "cancelled"
    [record] = registry.runs()
    assert (record.status, record.message) == ("cancelled", "cancelled by the user")
    assert not (tmp_path / "run").exists()


def test_cancel_a_queued_job_before_it_starts(runner):
    gate, gate_started, release = blocked_job()
    ran = threading.Event()
    gate_id = runner.submit("gate", gate)
    queued_id = runner.submit("never", lambda context: ran.set())
    after_id = runner.submit("after", lambda context: "after")
    assert gate_started.wait(TIMEOUT)
    runner.cancel(queued_id)
    release.set()
    status = runner.wait(queued_id, TIMEOUT)
    assert status.state == "cancelled" and status.started is None
    assert "before it started" in status.message
    assert runner.wait(after_id, TIMEOUT).result == "after", "later jobs still run"
    assert not ran.is_set(), "the cancelled job's work never ran"
    assert runner.status(gate_id).state == "done"


def test_refinery_error_fails_the_job_with_its_message(runner):
    def work(context):
        raise DataError("the table has no rows; add some")

    status = runner.wait(runner.submit("bad data", work), TIMEOUT)
    assert status.state == "failed" and status.message == "the table has no rows; add some"
    assert status.result is None and status.finished is not None


def test_unexpected_error_fails_the_job_and_the_worker_keeps_running(runner, caplog, monkeypatch):
    def work(context):
        raise ZeroDivisionError("division by zero")

    server_log = logging.getLogger("core.jobs")  # whatever earlier tests in this process did to logging
    monkeypatch.setattr(server_log, "disabled", False)
    monkeypatch.setattr(server_log, "propagate", True)
    caplog.set_level(logging.ERROR, logger="core.jobs")
    status = runner.wait(runner.submit("crash", work), TIMEOUT)
    assert status.state == "failed"
    assert "ZeroDivisionError" in status.message and "division by zero" in status.message
    assert any(record.exc_info for record in caplog.records), "the traceback goes to the server log"
    later = runner.wait(runner.submit("later", lambda context: 42), TIMEOUT)
    assert later.state == "done" and later.result == 42


def test_published_outputs_are_visible_while_running(runner):
    seen = {}
    published, release = threading.Event(), threading.Event()

    def work(context):
        context.publish("rounds", (1,))
        context.publish("rounds", (1, 2))
        context.publish("dataset", "digits")
        published.set()
        release.wait(TIMEOUT)
        return "done"

    job_id = runner.submit("publisher", work)
    assert published.wait(TIMEOUT)
    seen.update(runner.status(job_id).outputs)
    release.set()
    final = runner.wait(job_id, TIMEOUT)
    assert seen == {"rounds": (1, 2), "dataset": "digits"}, "the latest value of each name"
    assert dict(final.outputs) == seen and final.result == "done"


def test_progress_and_eta_from_the_pace_of_the_stage():
    clock = FakeClock()
    runner = JobRunner(clock=clock)
    observed = []

    def report(context, event, seconds_before):
        clock.advance(seconds_before)
        context.on_progress(event)
        observed.append(runner.status(job_id))

    def work(context):
        report(context, ProgressEvent("embed", 1, 4, "batch 1"), 2.0)
        report(context, ProgressEvent("embed", 2, 4, "batch 2"), 2.0)
        report(context, ProgressEvent("embed", 4, 4, "all"), 0.0)
        report(context, ProgressEvent("refine", 1, 2, "round 1"), 1.0)

    job_id = runner.submit("progress", work)
    assert runner.wait(job_id, TIMEOUT).state == "done"
    first, second, finished, next_stage = observed
    assert (first.stage, first.done, first.total, first.message) == ("embed", 1, 4, "batch 1")
    assert first.fraction == 0.25
    assert first.eta_s == 6.0, "three more units at 2 s each, paced from the job's start"
    assert second.eta_s == 4.0, "two more units at 2 s each"
    assert finished.eta_s is None and finished.fraction == 1.0
    assert next_stage.stage == "refine"
    assert next_stage.eta_s == 1.0, "a new stage is paced from its own start (1 s), not the job's (5 s)"


def test_snapshots_are_immutable(runner):
    published, release = threading.Event(), threading.Event()

    def work(context):
        context.publish("a", 1)
        published.set()
        release.wait(TIMEOUT)
        context.publish("b", 2)
        return "result"

    job_id = runner.submit("snap", work)
    assert published.wait(TIMEOUT)
    early = runner.status(job_id)
    with pytest.raises(dataclasses.FrozenInstanceError):
        early.state = "done"
    with pytest.raises(TypeError):
        early.outputs["a"] = 99
    release.set()
    final = runner.wait(job_id, TIMEOUT)
    assert early.state == "running" and dict(early.outputs) == {"a": 1}, "an old snapshot does not change"
    assert dict(final.outputs) == {"a": 1, "b": 2}


def test_old_finished_jobs_are_forgotten(runner, monkeypatch):
    monkeypatch.setattr(jobs, "MAX_FINISHED_JOBS", 3)
    ids = [runner.submit(f"job {i}", lambda context, i=i: i) for i in range(5)]
    for job_id in ids:
        runner.wait(job_id, TIMEOUT)
    newest = runner.submit("newest", lambda context: "new")
    runner.wait(newest, TIMEOUT)
    assert runner.status(ids[0]) is None and runner.status(ids[1]) is None
    assert [runner.status(job_id).result for job_id in ids[2:]] == [2, 3, 4]
    assert len(runner.jobs()) == 4
    with pytest.raises(KeyError):
        runner.wait(ids[0], 0.1)


def test_active_jobs_are_never_forgotten(runner, monkeypatch):
    monkeypatch.setattr(jobs, "MAX_FINISHED_JOBS", 0)
    work, started, release = blocked_job()
    running = runner.submit("running", work)
    assert started.wait(TIMEOUT)
    queued = runner.submit("queued", lambda context: "q")
    runner.submit("another", lambda context: None)
    assert runner.status(running).state == "running" and runner.status(queued).state == "queued"
    release.set()
    assert runner.wait(queued, TIMEOUT).result == "q"


def test_wait_returns_the_active_snapshot_on_timeout(runner):
    work, started, release = blocked_job()
    job_id = runner.submit("slow", work)
    assert started.wait(TIMEOUT)
    status = runner.wait(job_id, timeout=0.2)
    assert status.active and status.state == "running" and status.finished is None
    release.set()
    assert runner.wait(job_id, TIMEOUT).state == "done"


def test_unknown_job_id(runner):
    assert runner.status("job-0-0") is None
    runner.cancel("job-0-0")  # a no-op, not an error
    with pytest.raises(KeyError):
        runner.wait("job-0-0", timeout=0.1)


def test_job_ids_are_distinct_and_titles_kept(runner):
    ids = [runner.submit("same title", lambda context: None) for _ in range(3)]
    assert len(set(ids)) == 3
    assert all(runner.wait(job_id, TIMEOUT).title == "same title" for job_id in ids)


def test_jobs_remember_who_submitted_them():
    runner = JobRunner()
    mine = runner.submit("mine", lambda context: 1, owner="alice")
    theirs = runner.submit("theirs", lambda context: 2, owner="bob")
    anonymous = runner.submit("cli", lambda context: 3)
    assert runner.status(mine).owner == "alice" and runner.status(anonymous).owner is None
    assert [job.job_id for job in runner.jobs(owner="alice")] == [mine]
    assert [job.job_id for job in runner.jobs(owner="bob")] == [theirs]
    assert [job.job_id for job in runner.jobs()] == [anonymous, theirs, mine]
    assert runner.wait(theirs, TIMEOUT).owner == "bob"  # a finished job keeps its owner


def run_events(events, plan=None):
    """Run a job that reports ``events`` ((seconds before, ProgressEvent), ...) on a fake clock; its snapshots."""
    clock = FakeClock()
    runner = JobRunner(clock=clock)
    observed = []

    def work(context):
        if plan:
            context.plan(plan)
        for seconds_before, event in events:
            clock.advance(seconds_before)
            context.on_progress(event)
            observed.append(runner.status(job_id))

    job_id = runner.submit("events", work)
    assert runner.wait(job_id, TIMEOUT).state == "done"
    return observed


def test_a_slow_first_batch_does_not_inflate_the_stage_eta():
    # 30 s of setting up before the first of 11 units, then 1 s per unit (the coreset stage).
    observed = run_events([(31.0, ProgressEvent("coreset", 1, 11))]
                          + [(1.0, ProgressEvent("coreset", done, 11)) for done in range(2, 11)])
    assert observed[0].eta_s == 310.0, "one event: paced from the stage's start, setup included"
    assert [status.eta_s for status in observed[1:]] == [float(11 - done) for done in range(2, 11)]


def test_the_stage_eta_is_smoothed_against_an_uneven_pace():
    paces = [0.5, 1.5] * 6  # seconds per unit, alternating
    observed = run_events([(1.0, ProgressEvent("embed", 1, 20))]
                          + [(pace, ProgressEvent("embed", done, 20)) for done, pace in enumerate(paces, start=2)])
    elapsed = np.cumsum(paces)
    raw = [elapsed[i] / (i + 1) * (20 - done) for i, done in enumerate(range(2, 2 + len(paces)))]
    smoothed = [status.eta_s for status in observed[1:]]

    def jumps(etas):  # how far each estimate moves beyond the time that passed
        return sum(abs(later - (earlier - pace)) for earlier, later, pace in zip(etas, etas[1:], paces[1:]))

    assert jumps(smoothed) < 0.5 * jumps(raw)


def test_the_stage_and_the_job_eta_never_rise_when_the_pace_wanders():
    """A fit on a shared CPU: every batch takes 0.2-4 s at random, so raw estimates go up and down;
    the ETA shown for a stage, and for the whole job, may only go down."""
    rng = np.random.default_rng(0)
    stages = [("embed", 10), ("patch_fit", 10), ("coreset", 40), ("display_scale", 3)]
    events = [(float(rng.uniform(0.2, 4.0)), ProgressEvent(stage, done, total))
              for stage, total in stages for done in range(1, total + 1)]
    observed = run_events(events, [(stage, total / 10) for stage, total in stages])  # a plan true on average

    def never_rise(etas):
        return all(later <= earlier for earlier, later in zip(etas, etas[1:]))

    for stage, total in stages:
        etas = [status.eta_s for status in observed if status.stage == stage and status.eta_s is not None]
        assert len(etas) == total - 1 and never_rise(etas), stage
    overall = [status.overall_eta_s for status in observed if status.overall_eta_s is not None]
    assert len(overall) >= len(events) - 2 and never_rise(overall)
    assert overall[len(overall) // 2] > 0, "a wandering pace must not simply zero the estimate"


def test_a_planned_job_reports_its_whole_progress_and_eta():
    plan = [("embed", 1.0), ("refine", 2.0), ("project", 1.0)]
    events = [(1.0, ProgressEvent("embed", 5, 10)), (1.0, ProgressEvent("embed", 10, 10)),
              (2.0, ProgressEvent("refine", 1, 2)), (1.0, ProgressEvent("embed", 10, 10)),  # re-embedding in a round
              (2.0, ProgressEvent("refine", 2, 2)), (1.0, ProgressEvent("project", 1, 1))]
    observed = run_events(events, plan)
    assert [status.overall for status in observed] == [0.125, 0.25, 0.5, 0.5, 0.75, 1.0]
    assert all(status.overall_eta_s is not None for status in observed)
    assert observed[-1].overall_eta_s < observed[0].overall_eta_s
    assert all(status.overall is None and status.overall_eta_s is None for status in run_events(events))
