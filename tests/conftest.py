"""Shared test helpers: the real-data folder beside the project (never copied into the repo)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _shared_data_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is missing")
    return path


@pytest.fixture
def shared_data() -> Callable[..., Path]:
    """``shared_data("mvtec_ad_bottle_256", "bottle")``: the path, or skip the test when it is missing."""
    return _shared_data_path
