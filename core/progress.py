"""Progress events and cancellation shared by every long-running step.

Long work takes one :class:`Monitor` (``monitor=QUIET`` by default): it calls
``monitor.report(stage, done, total)`` after each batch and ``monitor.check()`` between batches,
which raises :class:`~core.errors.Cancelled` once the user has cancelled.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from core.errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report.

    Attributes
    ----------
    stage : str
        What is running, e.g. ``"load"``, ``"embed"``, ``"refine"``, ``"score"``.
    done, total : int
        Units finished and units in all for this stage (``total`` 0 when unknown).
    message : str
        A short human-readable note.
    """

    stage: str
    done: int
    total: int
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]

STAGE_NAMES = {
    "load": "checking the images",
    "extract": "unpacking the archive",
    "prepare": "preparing the data set",
    "materialize": "preparing the data set",
    "decode": "reading images for training",
    "train": "training the encoder",
    "embed": "embedding the samples",
    "score": "scoring the samples",
    "patch_read": "reading images for the localization maps",
    "patch_train": "training the localization model",
    "patch_fit": "learning what normal patches look like",
    "coreset": "learning what normal patches look like (keeping representative patches)",
    "display_scale": "calibrating the anomaly map colours",
    "maps": "drawing anomaly maps",
    "image_score": "scoring the training images from their maps",
    "gradcam": "drawing Grad-CAM maps",
    "project": "laying out the map of the samples",
    "export": "copying the kept samples",
}
"""Each stage of :class:`ProgressEvent` in plain words, for the studio and the logs."""


def stage_text(stage: str, done: int, total: int) -> str:
    """``stage`` in plain words with its counts, e.g. ``"refinement round 2 of 3"`` or
    ``"embedding the samples (64/300)"``; a stage without a plain name keeps its own."""
    if stage == "refine" and total > 0:  # reported after each round: ``done`` rounds are finished
        return f"refinement round {min(done + 1, total)} of {total}"
    name = STAGE_NAMES.get(stage, stage.replace("_", " ") or "starting")
    return f"{name} ({done}/{total})" if total > 0 else name


def ignore_progress(event: ProgressEvent) -> None:
    """Default callback: drop the event."""


class CancelToken:
    """Thread-safe flag that a UI or signal handler sets to stop long work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


class Monitor:
    """Where long work reports its progress and learns that it was cancelled: one argument for both.

    Parameters
    ----------
    on_progress : callable, optional
        Receives each :class:`ProgressEvent`; events are dropped when None.
    cancel : CancelToken, optional
        Checked by :meth:`check`; work cannot be cancelled when None.

    The do-nothing monitor is :data:`QUIET`. A monitor for a part of the work (a chunk, a stage
    reported under another name) is derived with :meth:`offset` or :meth:`renamed` and shares the
    cancel token.
    """

    def __init__(self, on_progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> None:
        self.on_progress = on_progress or ignore_progress
        self.cancel = cancel

    def report(self, stage: str, done: int, total: int, message: str = "") -> None:
        """Report ``done`` of ``total`` units of ``stage`` (``total`` 0 when unknown)."""
        self.on_progress(ProgressEvent(stage, done, total, message))

    def check(self) -> None:
        """Raise :class:`~core.errors.Cancelled` when the work has been cancelled."""
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.cancelled

    def offset(self, start: int, total: int) -> "Monitor":
        """This monitor for a chunk that starts at unit ``start`` of ``total``: it reports over the whole."""

        def whole(event: ProgressEvent) -> None:
            self.on_progress(ProgressEvent(event.stage, start + event.done, total, event.message))

        return Monitor(whole, self.cancel)

    def renamed(self, stage: str) -> "Monitor":
        """This monitor with every event reported as ``stage`` (a step run inside another stage)."""

        def as_stage(event: ProgressEvent) -> None:
            self.on_progress(ProgressEvent(stage, event.done, event.total, event.message))

        return Monitor(as_stage, self.cancel)


QUIET = Monitor()
"""The do-nothing monitor: progress is dropped and the work cannot be cancelled."""


HOLD_AT_VARIABLE = "REFINERY_HOLD_AT"
"""Environment variable ``STAGE:DONE`` that makes :func:`holding_at` stop the process at a known point."""


def holding_at(on_progress: ProgressCallback, spec: str | None) -> ProgressCallback:
    """``on_progress``, which stops the process for good once ``spec`` (``"embed:64"``) is reached.

    Fault injection for the kill-and-resume tests: when an event of stage ``STAGE`` reports ``DONE``
    units or more, the callback logs ``holding at STAGE DONE`` (once, on the ``core.progress`` logger)
    and blocks the calling thread forever, so a test can kill the process at exactly that point instead
    of after a delay that a faster or slower machine would miss. ``spec`` None or empty: no hold.
    """
    if not spec:
        return on_progress
    stage, _, done = spec.partition(":")
    if not stage or not done.isdigit():
        raise ValueError(f"{HOLD_AT_VARIABLE} must look like 'embed:64' (a stage, a colon, a count), not {spec!r}")

    def hold(event: ProgressEvent) -> None:
        on_progress(event)
        if event.stage == stage and event.done >= int(done):
            logging.getLogger(__name__).warning("holding at %s %d", event.stage, event.done)
            threading.Event().wait()

    return hold
