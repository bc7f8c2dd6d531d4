"""Shared fixtures: the real-data folder (never copied into the repo; see ``available.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from available import shared_data_path


@pytest.fixture
def shared_data() -> Callable[..., Path]:
    """``shared_data("mvtec_ad_bottle_256", "bottle")``: the path; skip (fail under CI=true) when it is missing."""
    return shared_data_path
