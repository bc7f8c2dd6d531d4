"""Progress events and cancellation shared by every long-running step.

Long work takes ``on_progress(event)`` and a :class:`CancelToken`; it reports after each
batch and calls ``cancel.raise_if_cancelled()`` between batches.
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
    "gradcam": "drawing Grad-CAM maps",
    "project": "laying out the map of the samples",
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
