"""Where the tests find what the project does not ship: the real-data folder, Debian's packages.

The real-data folder is ``$REFINERY_SHARED_DATA`` when set, else ``../shared/data`` beside the checkout.
A test that needs something missing skips with the path it looked for; under ``CI=true`` (where CI provides
the data, Debian's Fashion-MNIST and chromium) the absence is a failure instead, so a misplaced folder
cannot pass CI by skipping.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("REFINERY_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def require_path(path: Path, hint: str) -> Path:
    """``path``; when it is missing, skip the test saying ``hint`` (how to get it), or fail under ``CI=true``.

    Also usable at module level (a missing path then skips, or fails, the whole module).
    """
    if not path.exists():
        message = f"{path} is missing ({hint})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, where this must be present: {message}")
        pytest.skip(message, allow_module_level=True)
    return path


def shared_data_path(*parts: str) -> Path:
    """The path of ``parts`` inside the real-data folder (see :func:`require_path`)."""
    return require_path(SHARED_DATA.joinpath(*parts), "real data: set REFINERY_SHARED_DATA to the data folder")
