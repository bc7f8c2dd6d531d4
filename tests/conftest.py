"""Shared fixtures: the real-data folder (never copied into the repo; see ``available.py``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from available import shared_data_path

# Two xdist workers, and the studio servers and subprocesses some tests start, already share the cores:
# one OpenMP / BLAS thread per process (torch's intra-op threads follow OMP_NUM_THREADS) keeps them from
# oversubscribing a 2-core machine, where spinning threads made small fits many times slower. Set before
# any test imports torch; a value the caller set is kept.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")


def pytest_configure(config: pytest.Config) -> None:
    """In the controller, before the xdist workers start: lay out a few random points once, so that
    umap-learn's numba functions for a run's map are compiled and kept in numba's disk cache
    (``core.layouts``). In a fresh virtual environment every worker and every studio server of the browser
    tests otherwise compiled them at its first layout, all at once: 42 s alone on this box, against 1.6 s
    once cached. The aligned layouts of self-trained runs compile more functions, at their first use."""
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        return  # a worker, or a single process (-n 0): its first layout compiles and caches them itself
    from core.layouts import round_layouts

    round_layouts([np.random.default_rng(0).normal(size=(40, 4))])


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


LONGEST_FILES_FIRST = (  # seconds of work, measured with --junitxml on 2 cores on 2026-12-07
    "test_e2e_browser.py",            # ~140 s: a studio server and chromium
    "test_app_pages.py",              # ~130 s: in-process AppTests, beside the browser on the other worker
    "test_ray_compute.py",            # ~150 s: Ray instances and actors
    "test_faults.py",                 # ~110 s: fits in subprocesses
    "test_distributed_training.py",   # ~70 s: torchrun
)
"""Test files that take the longest, handed to the two xdist workers first, alternately (the rest follow in
collection order). pytest-xdist's own order (``--loadscope-reorder``) puts the files with most tests first,
which left the browser file, six long tests, to run alone on one worker at the end; ``--no-loadscope-reorder``
in pyproject.toml keeps this order instead."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the other files, the collection order stays
