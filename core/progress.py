"""Progress events and cancellation shared by every long-running step.

Long work takes ``on_progress(event)`` and a :class:`CancelToken`; it reports after each
batch and calls ``cancel.raise_if_cancelled()`` between batches.
"""
from __future__ import annotations

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
