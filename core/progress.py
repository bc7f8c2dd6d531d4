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
