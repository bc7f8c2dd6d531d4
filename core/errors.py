"""Exceptions that carry a message meant for the user (CLI line, app banner)."""


class RefineryError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class DataError(RefineryError):
    """The input data cannot be used (missing, empty, corrupt, unsafe, wrong shape)."""


class ConfigError(RefineryError):
    """A configuration value is not allowed; the message names the allowed values."""


class RunError(RefineryError):
    """A run directory is missing, incomplete or does not match the data."""


class Cancelled(RefineryError):
    """Long work was stopped through its cancel token."""


CANCELS = (Cancelled, KeyboardInterrupt)
"""Exceptions that mean the user stopped the work (a run is recorded ``cancelled``, not ``failed``)."""


class TrainingError(RefineryError):
    """Representation training diverged (a non-finite loss); the message names where and what to change."""


class StorageError(RefineryError):
    """The disk refused a write (full, read-only, no permission); the message names the cause."""
