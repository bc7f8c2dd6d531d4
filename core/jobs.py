"""Background jobs: long engine work runs on one worker thread while the UI polls its status.

There is one worker per process, so jobs queue instead of oversubscribing the CPU cores or the
one GPU: a second job waits until the first has finished. A job is a callable that receives a
:class:`JobContext` (progress callback, cancel token, ``publish`` for partial results such as
finished refinement rounds) and returns its result. Pages read immutable :class:`JobStatus`
snapshots; the worker never touches the UI.

Example
-------
>>> runner = JobRunner()
>>> job_id = runner.submit("add", lambda context: 1 + 1)
>>> runner.wait(job_id, timeout=5).result
2
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from core.errors import Cancelled, RefineryError
from core.progress import CancelToken, Monitor, ProgressEvent, stage_text

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED_STATES = (DONE, FAILED, CANCELLED)
MAX_FINISHED_JOBS = 50
ETA_SMOOTHING = 0.3
"""Weight of a new estimate against the previous one, counted down by the time since, in a job's ETAs."""
MIN_OVERALL_FRACTION = 0.02
"""The overall ETA is left out until this share of a planned job is done (too early to say)."""


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of one job, safe to read from any thread.

    Attributes
    ----------
    job_id, title : str
    state : {"queued", "running", "done", "failed", "cancelled"}
    stage : str
        The stage of the latest progress event (``""`` before the first).
    done, total : int
        Progress within the stage (``total`` 0 when unknown).
    message : str
        The latest progress message, or the error message of a failed job.
    eta_s : float or None
        Estimated seconds left in the current stage, from its pace since its first event, smoothed;
        within a stage it never rises (see :meth:`JobContext.on_progress`).
    overall : float or None
        Share of the whole job done, 0..1, when the job declared its plan (:meth:`JobContext.plan`).
    overall_eta_s : float or None
        Estimated seconds left in the whole job (all its stages), smoothed and never rising; None
        without a plan or before :data:`MIN_OVERALL_FRACTION` of it is done.
    submitted, started, finished : float or None
        ``time.time()`` stamps.
    outputs : mapping
        Partial results the job published, by name (the latest value of each).
    result : object
        What the job returned (``done`` jobs only).
    owner : str or None
        Who submitted the job (the studio passes its session's id); None when not said.
    """

    job_id: str
    title: str
    state: str = QUEUED
    stage: str = ""
    done: int = 0
    total: int = 0
    message: str = ""
    eta_s: float | None = None
    overall: float | None = None
    overall_eta_s: float | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    outputs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    result: Any = None
    owner: str | None = None

    @property
    def active(self) -> bool:
        """True while the job is queued or running."""
        return self.state not in FINISHED_STATES

    @property
    def elapsed_s(self) -> float:
        """Seconds the job has been running (0 while queued)."""
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    @property
    def fraction(self) -> float:
        """Progress within the current stage, 0..1."""
        return min(self.done / self.total, 1.0) if self.total > 0 else 0.0

    @property
    def stage_text(self) -> str:
        """The current stage in plain words with its counts (:func:`core.progress.stage_text`)."""
        return stage_text(self.stage, self.done, self.total)


Clock = Callable[[], float]


class JobContext:
    """What a running job uses to report progress, publish partial results and notice a cancel.

    Parameters
    ----------
    runner : JobRunner
        The runner whose status of ``job_id`` the context updates.
    job_id : str
    cancel : CancelToken
        Set when the user cancels the job.
    clock : callable returning float, default time.monotonic
        Seconds on a clock that never goes back; the ETA of a stage is paced by it.
    """

    def __init__(self, runner: "JobRunner", job_id: str, cancel: CancelToken, clock: Clock = time.monotonic) -> None:
        self._runner = runner
        self._job_id = job_id
        self.cancel = cancel
        self._clock = clock
        self._stage = ""
        self._started = self._stage_started = self._last_event = clock()
        self._first: tuple[float, int] | None = None  # (time, done) of the stage's first event
        self._eta: tuple[float, float] | None = None  # (time, estimate) of the stage's last smoothed ETA
        self._shown: tuple[float, float] | None = None  # (time, estimate) of the stage's last ETA shown
        self._overall_eta: tuple[float, float] | None = None
        self._plan: dict[str, float] = {}
        self._plan_position = -1
        self._within = 0.0  # share done of the plan's current stage

    @property
    def monitor(self) -> Monitor:
        """This job's progress and cancel token as the one :class:`~core.progress.Monitor` the engine takes."""
        return Monitor(self.on_progress, self.cancel)

    def plan(self, stages: Sequence[tuple[str, float]]) -> None:
        """Declare the stages the job will run, in order, with their expected relative cost.

        The status then shows the share of the whole job done and an ETA for all of it. A stage
        reported again after a later one (retraining inside refinement rounds) counts as part of
        the later one; stages left out of the plan count as part of the planned stage before them.
        """
        self._plan = {stage: float(weight) for stage, weight in stages}

    def on_progress(self, event: ProgressEvent) -> None:
        """A ``ProgressCallback``: records the event and estimates the time left in its stage and job.

        A stage is taken to have started at the previous event (or at the job's start): its first
        event already reports work done since then. Once a second event has come, the pace is
        measured from the first, so a slow start (setting up, compiling) does not inflate the
        estimate; from then on each estimate is blended with the previous one counted down
        (:data:`ETA_SMOOTHING`), so that it does not jump with every batch.

        Neither ETA ever rises (:func:`_never_higher`): the stage's, from one event of the stage to the
        next, and the whole job's, over the job. A slower pace than expected holds the ETA counting
        down with the clock (at worst to 0) instead of pushing it back up.
        """
        now = self._clock()
        if event.stage != self._stage:
            self._stage, self._stage_started = event.stage, self._last_event
            self._first, self._eta, self._shown = None, None, None
        self._last_event = now
        eta = None
        if 0 < event.done < event.total:
            if self._first is not None and event.done > self._first[1]:
                pace = (now - self._first[0]) / (event.done - self._first[1])
                self._eta = _smoothed(self._eta, pace * (event.total - event.done), now)
                eta = self._eta[1]
            else:  # one event so far: its pace includes the stage's start, so it is not smoothed into later ones
                eta = (now - self._stage_started) / event.done * (event.total - event.done)
            self._shown = _never_higher(self._shown, eta, now)
            eta = self._shown[1]
        if self._first is None:
            self._first = (now, event.done)
        overall = self._overall(event)
        overall_eta = None
        if overall is not None and overall >= MIN_OVERALL_FRACTION:
            raw = (now - self._started) * (1.0 - overall) / overall
            self._overall_eta = _never_higher(self._overall_eta, _smoothed(self._overall_eta, raw, now)[1], now)
            overall_eta = self._overall_eta[1]
        self._runner._update(
            self._job_id, stage=event.stage, done=event.done, total=event.total, message=event.message, eta_s=eta,
            overall=overall, overall_eta_s=overall_eta,
        )

    def _overall(self, event: ProgressEvent) -> float | None:
        """Share of the planned job done at ``event``; None without a plan."""
        if not self._plan:
            return None
        stages, weights = list(self._plan), list(self._plan.values())
        if event.stage in self._plan and stages.index(event.stage) > self._plan_position:
            self._plan_position, self._within = stages.index(event.stage), 0.0
        if self._plan_position < 0:
            return 0.0
        if event.stage == stages[self._plan_position] and event.total > 0:
            self._within = min(event.done / event.total, 1.0)
        done = sum(weights[: self._plan_position]) + weights[self._plan_position] * self._within
        return min(done / sum(weights), 1.0) if sum(weights) > 0 else None

    def publish(self, name: str, value: Any) -> None:
        """Make ``value`` visible to the UI as ``status.outputs[name]`` (replacing an earlier value)."""
        self._runner._publish(self._job_id, name, value)


def _smoothed(previous: tuple[float, float] | None, estimate: float, now: float) -> tuple[float, float]:
    """(now, ``estimate`` blended with the ``previous`` one counted down to ``now``)."""
    if previous is not None:
        counted_down = max(previous[1] - (now - previous[0]), 0.0)
        estimate = counted_down + ETA_SMOOTHING * (estimate - counted_down)
    return now, estimate


def _never_higher(previous: tuple[float, float] | None, estimate: float, now: float) -> tuple[float, float]:
    """(now, ``estimate``, or the ``previous`` (time, estimate) counted down to ``now`` where that is lower):
    the next value of an ETA that never rises."""
    if previous is not None:
        estimate = min(estimate, max(previous[1] - (now - previous[0]), 0.0))
    return now, estimate


Work = Callable[[JobContext], Any]


class JobRunner:
    """Runs submitted jobs one at a time, in submission order, on a daemon worker thread.

    Parameters
    ----------
    clock : callable returning float, default time.monotonic
        The clock that paces each job's ETA (see :class:`JobContext`); a test passes a fake one
        to get exact estimates. ``wait`` timeouts and the ``time.time()`` stamps do not use it.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._statuses: dict[str, JobStatus] = {}
        self._cancels: dict[str, CancelToken] = {}
        self._queue: queue.Queue[tuple[str, Work]] = queue.Queue()
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None

    def submit(self, title: str, work: Work, *, owner: str | None = None) -> str:
        """Queue ``work`` and return its job id; it starts when the jobs before it have finished.

        ``owner`` is recorded in the job's status (see :meth:`jobs`)."""
        job_id = f"job-{next(self._ids)}-{int(time.time())}"
        with self._lock:
            self._statuses[job_id] = JobStatus(job_id, title, owner=owner)
            self._cancels[job_id] = CancelToken()
            self._forget_old_jobs()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work_forever, name="refinery-jobs", daemon=True)
                self._worker.start()
        self._queue.put((job_id, work))
        return job_id

    def status(self, job_id: str) -> JobStatus | None:
        """The job's latest snapshot, or None for an unknown (or long forgotten) id."""
        with self._lock:
            return self._statuses.get(job_id)

    def jobs(self, *, owner: str | None = None) -> list[JobStatus]:
        """Remembered jobs, newest first: all of them, or those submitted by ``owner``."""
        with self._lock:
            statuses = list(self._statuses.values())[::-1]  # dicts keep submission order
        return statuses if owner is None else [status for status in statuses if status.owner == owner]

    def active(self) -> JobStatus | None:
        """The job running now, else the oldest queued one, else None."""
        pending = [status for status in self.jobs() if status.active]
        running = [status for status in pending if status.state == RUNNING]
        return (running or pending[::-1] or [None])[0]

    def cancel(self, job_id: str) -> None:
        """Ask a job to stop at its next check; a queued job is cancelled before it starts."""
        with self._lock:
            token = self._cancels.get(job_id)
            if token is None:
                return
            token.cancel()
            status = self._statuses[job_id]
            if status.state == QUEUED:
                self._statuses[job_id] = replace(
                    status, state=CANCELLED, finished=time.time(), message="cancelled before it started"
                )

    def wait(self, job_id: str, timeout: float) -> JobStatus:
        """Block until the job has finished or ``timeout`` seconds passed; returns its snapshot."""
        deadline = time.monotonic() + timeout
        status = self.status(job_id)
        while status is not None and status.active and time.monotonic() < deadline:
            time.sleep(0.05)
            status = self.status(job_id)
        if status is None:
            raise KeyError(job_id)
        return status

    # ------------------------------------------------------------------ worker side

    def _work_forever(self) -> None:
        while True:
            job_id, work = self._queue.get()
            try:
                self._run(job_id, work)
            finally:
                self._queue.task_done()

    def _run(self, job_id: str, work: Work) -> None:
        with self._lock:
            cancel = self._cancels.get(job_id)
        if cancel is None or cancel.cancelled:  # cancelled (and maybe forgotten) while queued
            return
        self._update(job_id, state=RUNNING, started=time.time())
        try:
            result = work(JobContext(self, job_id, cancel, self._clock))
        except Cancelled:
            self._update(job_id, state=CANCELLED, finished=time.time(), message="cancelled", eta_s=None, overall_eta_s=None)
        except RefineryError as error:
            self._update(job_id, state=FAILED, finished=time.time(), message=str(error), eta_s=None, overall_eta_s=None)
        except Exception as error:  # noqa: BLE001 - a job must never take the worker down
            log.exception("job %s failed", job_id)
            self._update(
                job_id, state=FAILED, finished=time.time(), eta_s=None, overall_eta_s=None,
                message=f"unexpected error ({type(error).__name__}: {error}); the server log has the details",
            )
        else:
            self._update(job_id, state=DONE, finished=time.time(), result=result, eta_s=None, overall_eta_s=None)

    def _update(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            self._statuses[job_id] = replace(self._statuses[job_id], **changes)

    def _publish(self, job_id: str, name: str, value: Any) -> None:
        with self._lock:
            status = self._statuses[job_id]
            outputs = MappingProxyType({**status.outputs, name: value})
            self._statuses[job_id] = replace(status, outputs=outputs)

    def _forget_old_jobs(self) -> None:
        finished = [status for status in self._statuses.values() if not status.active]  # oldest first
        for status in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self._statuses[status.job_id]
            del self._cancels[status.job_id]
