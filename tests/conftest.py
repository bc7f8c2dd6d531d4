"""Shared fixtures: the real-data folder (never copied into the repo; see ``available.py``); the order the
two xdist workers take the test files in."""
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


LONGEST_FILES = ("test_e2e_browser.py", "test_ray_compute.py", "test_faults.py", "test_app_pages.py",
                 "test_distributed_training.py", "test_hostile_input.py")
"""The test files that run longest (``pytest --durations=0``), longest first."""


def pytest_collection_modifyitems(config, items):
    """Collect the longest test files first. With ``--dist loadfile --no-loadscope-reorder`` (pyproject) the
    workers take whole files in collection order, so the longest start at once and the short ones fill in
    behind them: both workers finish at about the same time (xdist's own order, by test count, left the
    six-test browser file to run alone at the end)."""
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
