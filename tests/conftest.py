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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: small convolutions on a shared CPU are far slower with two
    spinning threads, and results stay bit-exact."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
