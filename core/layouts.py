"""UMAP 2-D layouts of a run's training samples, aligned across refinement rounds.

A run's samples are laid out once per refinement *state*: state 0 is the data before
refinement, state ``r`` the data after round ``r``. While every round works on one embedding
(no self-supervised retraining) a single layout serves all states; when rounds have their own
embeddings, :class:`umap.AlignedUMAP` ties each sample to itself in the neighbouring states so
that a sample keeps roughly its place from round to round and the expert can follow it.

Layouts are computed once per run and cached in the run folder (:data:`core.run_dir.LAYOUTS`).

Example
-------
>>> layouts = run_layouts("runs/bottle")            # doctest: +SKIP
>>> xy = layouts.for_round(2)                       # (N, 2) float32  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from core.arrays import read_arrays, write_arrays
from core.errors import ConfigError, DataError, RunError
from core.progress import QUIET, Monitor
from core.run_dir import LAYOUTS, check_run_dir, read_config, read_embeddings, round_count

log = logging.getLogger(__name__)

MIN_SAMPLES = 5
# umap-learn warns on every fit with a seed that it runs single-threaded; that is the price of
# reproducibility (convention 6), so the warning says nothing a user can act on.
_SEEDED_N_JOBS_WARNING = r"n_jobs value .* overridden to 1 by setting random_state"


@dataclass(frozen=True)
class RunLayouts:
    """2-D layouts of a run's training samples, one per refinement state.

    Attributes
    ----------
    layouts : (S, N, 2) float32 array
        ``layouts[0]`` is the state before refinement (round 0), ``layouts[r]`` the state after
        round ``r``. When every round shares one embedding there is one state (S == 1).
    """

    layouts: np.ndarray

    def for_round(self, round: int) -> np.ndarray:
        """``(N, 2) float32`` layout of the samples as seen after ``round`` (0 = before refinement).

        Rounds past the last state get the last state's layout; with S == 1 every round gets
        ``layouts[0]``.
        """
        if round < 0:
            raise ConfigError(f"round must be 0 (before refinement) or a later round number, got {round}")
        return self.layouts[min(round, len(self.layouts) - 1)]


def round_layouts(
    embeddings: Sequence[np.ndarray],
    *,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    max_fit_points: int = 20_000,
    monitor: Monitor = QUIET,
) -> np.ndarray:
    """2-D UMAP layouts of S embeddings of the same N samples, aligned with each other.

    Each embedding is standardised per feature (zero mean, unit variance over the N samples;
    constant features become 0) and laid out with the Euclidean metric. Euclidean, because the
    detectors judge samples by magnitude-sensitive distances (kNN distance on tables, Gaussian
    density on image features): cosine distance ignores a vector's norm, so a sample that
    differs from its neighbours only in scale (an over-exposed image, a row with every value
    doubled) would sit among them on the map. Standardised, because otherwise a few
    high-variance features decide the layout (the comparison on sklearn digits is in
    docs/benchmarks.md, "Figures that left the docstrings").

    Parameters
    ----------
    embeddings : sequence of S (N, D_s) float arrays
        The same N samples in each state's representation (row i is sample i everywhere;
        D may differ between states).
    seed : int
        Seeds UMAP's initialisation, optimisation and the subsample; same seed, same layouts.
    n_neighbors : int
        Size of the neighbourhood UMAP preserves: small values keep fine local structure,
        large values more of the global arrangement. Clamped to the number of fitted samples - 1.
    min_dist : float
        How tightly UMAP may pack points together in 2-D (0 = dense clumps, up to 1 = even spread).
    max_fit_points : int
        Above this many samples UMAP is fitted on a seeded random subsample of this size and the
        other samples are placed with ``transform`` (in each state, around the aligned layout of
        the fitted samples), which keeps time and memory bounded.
    monitor : Monitor
        Hears ``("project", done, S)`` at the start and at the end; checked for a cancel before
        each expensive step.

    Returns
    -------
    (S', N, 2) float32 array
        S' = 1 when every embedding equals the first (one plain UMAP layout), else S' = S
        (AlignedUMAP with each sample related to itself in consecutive states).

    Raises
    ------
    DataError
        Fewer than 5 samples, mismatched sample counts, or NaN/infinite values.
    ConfigError
        A parameter outside its allowed range.
    """
    states = _check_embeddings(embeddings)
    if n_neighbors < 2:
        raise ConfigError(f"n_neighbors must be at least 2, got {n_neighbors}")
    if not 0.0 <= min_dist <= 1.0:
        raise ConfigError(f"min_dist must be between 0 and 1, got {min_dist}")
    if max_fit_points < MIN_SAMPLES:
        raise ConfigError(f"max_fit_points must be at least {MIN_SAMPLES}, got {max_fit_points}")
    states = _distinct_states(states)
    n, total = len(states[0]), len(states)
    monitor.report("project", 0, total, f"laying out {n} samples in {total} state(s)")
    states = [_standardise(state) for state in states]
    fitted = np.arange(n)
    if n > max_fit_points:
        fitted = np.sort(np.random.default_rng(seed).choice(n, max_fit_points, replace=False))
    params = dict(
        n_components=2, n_neighbors=min(n_neighbors, len(fitted) - 1), min_dist=min_dist,
        random_state=seed, transform_seed=seed,
    )
    monitor.check()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SEEDED_N_JOBS_WARNING, category=UserWarning)
        mappers = _fit_mappers([state[fitted] for state in states], params)
        layouts = np.empty((total, n, 2), dtype=np.float32)
        layouts[:, fitted] = np.stack([mapper.embedding_ for mapper in mappers])
        if len(fitted) < n:
            rest = np.setdiff1d(np.arange(n), fitted)
            for index, (mapper, state) in enumerate(zip(mappers, states)):
                monitor.check()
                layouts[index, rest] = mapper.transform(state[rest])
    if not np.all(np.isfinite(layouts)):
        raise DataError("UMAP left some samples without a position (disconnected from every neighbour)")
    monitor.report("project", total, total, f"{total} layout(s) of {n} samples")
    return layouts


def run_layouts(
    run_dir: Path | str,
    *,
    seed: int | None = None,
    monitor: Monitor = QUIET,
) -> RunLayouts:
    """Layouts of a saved run's training samples, computed once and cached in the run folder.

    State 0 (before refinement) is laid out in the representation round 1 worked on, state r
    in the one the samples kept after round r were seen in next: ``round_{r+1}`` of
    ``embeddings.safetensors`` when present (self-supervised retraining), ``train`` (the final
    embeddings) otherwise and for the last state. Without per-round embeddings this is one
    layout of ``train`` for every round.

    The result is cached in the run folder (:data:`core.run_dir.LAYOUTS`, key ``layouts``, with the seed
    under ``seed``); a cache that is damaged, laid out with another seed or whose shape does
    not fit the run's embeddings is recomputed.

    Parameters
    ----------
    run_dir : path
        A run folder written by :func:`core.pipeline.fit`.
    seed : int, optional
        UMAP seed; defaults to the run's config seed.
    monitor : Monitor
        As in :func:`round_layouts` (no events when the cache is read).

    Returns
    -------
    RunLayouts
    """
    run_dir = check_run_dir(run_dir)
    if seed is None:
        seed = read_config(run_dir).seed
    states = _run_states(run_dir)
    cache = run_dir / LAYOUTS
    cached = _read_cache(cache, seed, (len(_distinct_states(states)), len(states[0]), 2))
    if cached is not None:
        return RunLayouts(cached)
    layouts = round_layouts(states, seed=seed, monitor=monitor)
    write_arrays(cache, {"layouts": layouts, "seed": np.array([seed], dtype=np.int64)})
    return RunLayouts(layouts)


PLACE_NEIGHBOURS = 10
"""Training samples whose map positions place a new sample (:func:`place_on_layout`)."""


def place_on_layout(run_dir: Path | str, embeddings: np.ndarray, *, k: int = PLACE_NEIGHBOURS,
                    monitor: Monitor = QUIET) -> np.ndarray:
    """``(M, 2) float32`` places on a run's map (its last layout) for new samples embedded by the run's encoder.

    Each new sample goes to the distance-weighted mean position of its ``k`` nearest training samples,
    measured as the map was laid out (features standardised with the training samples' mean and
    spread, Euclidean); weights are ``1 / distance**2``, so an exact copy of a training sample lands on
    it. Why not ``umap.UMAP.transform``: it needs the fitted mapper (its neighbour graph and search
    index), which the run does not keep, and refitting one costs as much as the layout itself while
    moving the training points the user already knows. ``transform`` itself starts each new point at
    the membership-weighted mean of its nearest training points' positions and then nudges it for a
    few epochs; this keeps that start, which is deterministic, instant and leaves the map unchanged.
    The limit, shared with ``transform``: a sample unlike every training sample is still drawn among
    its nearest ones; its anomaly score, not its place, says how unusual it is.

    Parameters
    ----------
    run_dir : path
        A finished run; its layout is computed (and cached) first if needed (:func:`run_layouts`).
    embeddings : (M, D) float array
        New samples in the run's final representation (``RunModel.encoder``), D as the run's ``train``.
    k : int
        Neighbours averaged (clamped to the number of training samples).
    monitor : Monitor
        Passed to :func:`run_layouts`; checked for a cancel.
    """
    from sklearn.neighbors import NearestNeighbors

    layout = run_layouts(run_dir, monitor=monitor).layouts[-1]
    train = np.asarray(read_embeddings(Path(run_dir))["train"], dtype=np.float32)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != train.shape[1]:
        raise DataError(f"new embeddings of shape {embeddings.shape} do not match the run's "
                        f"{train.shape[1]}-dimensional representation")
    if len(embeddings) == 0:
        return np.empty((0, 2), dtype=np.float32)
    mean, scale = train.mean(axis=0), train.std(axis=0)
    scale[scale == 0] = 1.0
    monitor.check()
    search = NearestNeighbors(n_neighbors=min(k, len(train))).fit((train - mean) / scale)
    distance, nearest = search.kneighbors((embeddings - mean) / scale)
    weights = 1.0 / np.maximum(distance, 1e-12) ** 2
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("mk,mkd->md", weights, layout[nearest]).astype(np.float32)


def _check_embeddings(embeddings: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The states as ``(N, D) float32`` arrays, or a DataError saying what is wrong with them."""
    if len(embeddings) == 0:
        raise DataError("no embeddings to lay out")
    states = [np.asarray(state, dtype=np.float32) for state in embeddings]
    for index, state in enumerate(states):
        if state.ndim != 2:
            raise DataError(f"embedding {index} has shape {state.shape}; expected (N samples, D features)")
        if len(state) != len(states[0]):
            raise DataError(f"embedding {index} has {len(state)} samples but embedding 0 has {len(states[0])}")
        if not np.all(np.isfinite(state)):
            raise DataError(f"embedding {index} holds NaN or infinite values; a layout needs finite embeddings")
    if len(states[0]) < MIN_SAMPLES:
        raise DataError(f"a 2-D layout needs at least {MIN_SAMPLES} samples, got {len(states[0])}")
    return states


def _distinct_states(states: list[np.ndarray]) -> list[np.ndarray]:
    """``states`` itself, or only its first state when every state equals it."""
    if all(state is states[0] or np.array_equal(state, states[0]) for state in states[1:]):
        return states[:1]
    return states


def _standardise(state: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per feature; constant features become 0."""
    scale = state.std(axis=0)
    scale[scale == 0] = 1.0
    return ((state - state.mean(axis=0)) / scale).astype(np.float32)


def _fit_mappers(states: list[np.ndarray], params: dict) -> list:
    """One fitted UMAP per state whose ``embedding_`` is that state's (aligned) layout.

    ``transform`` of each mapper then places new samples around the aligned layout.
    """
    import umap  # deferred: importing umap-learn takes seconds (numba)

    _cache_umap_compilation()
    if len(states) == 1:
        return [umap.UMAP(n_jobs=1, **params).fit(states[0])]
    identity = {i: i for i in range(len(states[0]))}
    aligned = umap.AlignedUMAP(**params).fit(states, relations=[identity] * (len(states) - 1))
    for mapper, layout in zip(aligned.mappers_, aligned.embeddings_):
        mapper.embedding_ = np.asarray(layout, dtype=np.float32)
    return aligned.mappers_


@functools.cache
def _cache_umap_compilation() -> None:
    """Keep umap-learn's compiled functions on disk, once per process (call it after importing umap).

    Most of umap-learn's numba functions are compiled without ``cache=True``, so every new process
    (each studio server, each CLI call) spent about 14 s compiling them before its first layout;
    with numba's own disk cache only the first process on a machine does. Where no cache folder is
    writable numba refuses, and the functions compile in memory as before.
    """
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    libraries = [module for name, module in list(sys.modules.items())
                 if module is not None and name.split(".")[0] in ("umap", "pynndescent")]
    try:
        for module in libraries:
            for function in list(vars(module).values()):
                if isinstance(function, Dispatcher) and isinstance(function._cache, NullCache):
                    function.enable_caching()
    except RuntimeError as error:  # numba found no writable cache location
        log.info("umap-learn's compiled functions are not cached on disk: %s", error)


def _run_states(run_dir: Path) -> list[np.ndarray]:
    """The run's embedding for each state 0..R (see :func:`run_layouts`)."""
    arrays = read_embeddings(run_dir)
    n_rounds = round_count(run_dir)
    train = arrays["train"]
    return [arrays.get(f"round_{r + 1}", train) for r in range(n_rounds)] + [train]


def _read_cache(path: Path, seed: int, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The cached layouts when they exist, are intact, used ``seed`` and have ``shape``."""
    if not path.is_file():
        return None
    try:
        arrays = read_arrays(path)
    except RunError as error:
        log.warning("recomputing layouts: %s", error)
        return None
    layouts = arrays.get("layouts")
    cached_seed = arrays.get("seed")
    if layouts is None or layouts.shape != shape or cached_seed is None or int(cached_seed[0]) != seed:
        log.info("recomputing layouts: %s was made for other embeddings or another seed", path.name)
        return None
    return layouts
