"""Ray itself: importing it, checking a cluster's address, quieting Ray Data, and errors from the cluster."""
from __future__ import annotations

import logging
import socket
from contextlib import contextmanager
from typing import Iterator

from core.errors import ConfigError, RefineryError

INSTALL_HINT = "pip install 'refinery[distributed]'"
CONNECT_TIMEOUT_S = 5.0
"""How long to wait for a cluster's address to accept a connection before calling it unreachable."""


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError(f"the Ray engine needs Ray: {INSTALL_HINT}") from None
    return ray


def check_reachable(address: str | None) -> None:
    """A clear ConfigError, within :data:`CONNECT_TIMEOUT_S`, for a cluster address nothing answers at.

    ``None``, ``local`` and ``auto`` are left to Ray; ``[ray://]HOST:PORT`` must accept a connection.
    """
    if address in (None, "local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"Ray address must be auto, HOST:PORT or ray://HOST:PORT; got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"cannot reach a Ray cluster at {address} ({reason}); start one with "
                          "'ray start --head', or check the address") from None


def configure_ray_data(ray) -> None:
    """Ray Data's progress bars and console messages off (progress is reported through the monitor,
    errors reach the caller as exceptions; Ray's session log keeps the messages), and an error in
    an actor raised as itself, so that a Refinery error reaches the caller as one."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.raise_original_map_exception = True
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL)


@contextmanager


def refinery_errors(ray) -> Iterator[None]:
    """A Refinery error raised on the cluster re-raised as itself, not wrapped in Ray's remote traceback."""
    try:
        yield
    except ray.exceptions.RayError as error:
        cause = error
        while cause is not None and (isinstance(cause, ray.exceptions.RayError)
                                     or not isinstance(cause, RefineryError)):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is None:
            raise
        raise cause from None
