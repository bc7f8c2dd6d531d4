"""What every patch-level localizer shares: maps at each image's own size, the border gain and the display
scale, normalising, parameter checking, the saved files, and image-level scores from maps.

**Border gain of the map score.** Patches at an image's edge see the backbone's zero padding, so their
features vary more than inner ones and lie farther from the normal patches: normal maps run hot along
the border (on the granite demo every normal map peaked within 28 px of it, bench/border_gain.py), and a map score that
reads a map's highs (``core.image_score``) then ranks images by their borders. At fit, the held-out
normal maps give the highs of the map values at each distance from the edge (:func:`border_gain`); a
border ring whose highs are above the inner half's is scaled down to them, for the map score only
(:meth:`MapLocalizer.score_weights`): the maps themselves stay as computed, since real defects also
sit at edges (magnetic tiles' breaks and frays).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from core.arrays import read_arrays, write_arrays
from core.config import DEVICES
from core.errors import DataError, RunError
from core.explain.smoothing import resize_map
from core.files import read_json, write_json
from core.models.device import resolve_device
from core.params import Interval, Options, check_params
from core.progress import QUIET, Monitor

DISPLAY_SAMPLE = 16384
"""Map values drawn per held-out image when estimating the display scale."""

REDUCTIONS = ("max", "topk_mean")
BORDER_QUANTILE = 0.99
"""The highs of normal map values that :func:`border_gain` evens out across the distances to the edge (the
map score reads the top 1%, ``core.image_score.MAP_TOP_SHARE``; chosen on the granite demo and the tiles'
dev split, docs/benchmarks.md "Issue 18: the border gain")."""


class MapLocalizer(BaseEstimator):
    """Base class: public map API on top of a subclass's ``_map_batches``."""

    _param_constraints = {
        "device": [Options(*DEVICES)],
        "display_quantile": [Interval(float, 0.0, 1.0, closed="neither")],
        "display_holdout": [Interval(float, 0.0, 0.5)],
        "seed": [Interval(int, 0, None)],
    }
    """The allowed values of the parameters every localizer has; a subclass adds its own."""

    _state_file: str
    """JSON file :meth:`_save_state` writes the parameters and fitted values to."""
    _arrays_file: str
    """safetensors file it writes the fitted tensors (:meth:`_array_names`) to."""
    _state_format: int
    """Version of that layout; a file of another version is refused."""

    device: str
    display_quantile: float
    display_holdout: float
    seed: int
    display_scale_: float

    def iter_anomaly_maps(
        self,
        paths: Sequence[Path | str],
        output_size: int | tuple[int, int] | None = None,
        monitor: Monitor = QUIET,
    ) -> Iterator[np.ndarray]:
        """Yield one anomaly map per image, in order, holding one batch at a time.

        Parameters
        ----------
        paths : sequence of image paths
        output_size : None, int or (height, width)
            None (default): each map has its input image's own height and width (read from the
            file). An int ``S`` gives ``(S, S)`` maps; a pair gives that size.
        monitor : Monitor
            Reports ``"maps"`` (images done of all) per batch; checked for cancellation between batches.

        Yields
        ------
        (H, W) float32 array, finite and >= 0; higher = more anomalous, unnormalised.
        """
        for (anomaly_map,) in self.iter_anomaly_maps_at(paths, [output_size], monitor):
            yield anomaly_map

    def iter_anomaly_maps_at(
        self,
        paths: Sequence[Path | str],
        output_sizes: Sequence[int | tuple[int, int] | None],
        monitor: Monitor = QUIET,
    ) -> Iterator[tuple[np.ndarray, ...]]:
        """Yield each image's map at every size of ``output_sizes``, all resized from one computation of it.

        Each size is an ``output_size`` of :meth:`iter_anomaly_maps`; one tuple of ``(H, W) float32``
        arrays per image, in that order. A score taken at the working size and a map kept at the
        image's own size thus cost one map (:func:`core.image_score.iter_scored_maps`).
        """
        self._check_fitted()
        output_sizes = [(size, size) if isinstance(size, int) else size for size in output_sizes]
        for sizes, maps in self._map_batches([Path(p) for p in paths], "maps", monitor):
            for anomaly_map, size in zip(maps, sizes):
                yield tuple(resize_map(anomaly_map, *(output_size or size)) for output_size in output_sizes)

    def anomaly_maps(
        self,
        paths: Sequence[Path | str],
        output_size: int | tuple[int, int] | None = None,
        monitor: Monitor = QUIET,
    ) -> list[np.ndarray]:
        """Anomaly maps of ``paths`` as a list of ``(H, W) float32`` arrays (see :meth:`iter_anomaly_maps`)."""
        return list(self.iter_anomaly_maps(paths, output_size, monitor))

    def normalize(self, anomaly_map: np.ndarray) -> np.ndarray:
        """``anomaly_map / display_scale_``: 1.0 is the ``display_quantile`` of held-out normal pixels."""
        self._check_fitted()
        return (np.asarray(anomaly_map, dtype=np.float32) / np.float32(self.display_scale_)).astype(np.float32)

    @property
    def _torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def _check_params(self) -> None:
        """Raise :class:`~core.errors.ConfigError` naming the first parameter outside ``_param_constraints``;
        a subclass adds the checks that relate one parameter to another."""
        check_params(type(self).__name__, self.get_params(), self._param_constraints)

    def _check_fitted(self) -> None:
        if not hasattr(self, "display_scale_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(paths) with normal images first")

    def _start_fit(self, paths: Sequence[Path | str]) -> tuple[np.random.Generator, list[Path], list[Path]]:
        """Begin ``fit``: check the parameters, forget an earlier fit, and split ``paths`` (at least 2
        images) into the images to fit on and the held-out ones that set the display scale.

        Returns ``(rng, fitted, holdout)``: the seeded generator the rest of the fit draws from, and
        both lists in the order of ``paths``.
        """
        self._check_params()
        for name in [name for name in vars(self) if name.endswith("_")]:
            delattr(self, name)
        paths = [Path(p) for p in paths]
        if len(paths) < 2:
            raise DataError(f"a patch model needs at least 2 normal images; got {len(paths)}")
        rng = np.random.default_rng(self.seed)
        n_holdout = self._holdout_count(len(paths))
        order = rng.permutation(len(paths))
        holdout = [paths[i] for i in np.sort(order[:n_holdout])]
        fitted = [paths[i] for i in np.sort(order[n_holdout:])]
        return rng, fitted, holdout

    def _holdout_count(self, n: int) -> int:
        """Images held out for the display scale: ``display_holdout`` of ``n``, at least 1, at most 100,
        always leaving 2 to fit on; none below 3 images."""
        if self.display_holdout == 0 or n < 3:
            return 0
        return int(min(max(1, round(self.display_holdout * n)), 100, n - 2))

    def score_weights(self) -> np.ndarray:
        """``(S, S) float32`` weights a working-size map is multiplied by before a map score reads it: the
        border gain (:func:`border_gain`) on each pixel's ring; all ones for a localizer saved before it."""
        self._check_fitted()
        return ring_values(self.border_gain_, self.image_size).numpy()

    def _calibrate(self, paths: list[Path], rng: np.random.Generator, monitor: Monitor) -> None:
        """Set ``display_scale_``, the ``display_quantile`` of the map values of ``paths`` (held-out normal
        images), and ``border_gain_`` (:func:`border_gain`) from the same maps, computed once."""
        maps = torch.cat([batch.float().cpu() for _, batch in self._map_batches(paths, "display_scale", monitor)])
        self.border_gain_ = border_gain(maps)
        samples = []
        for anomaly_map in maps.numpy():
            values = anomaly_map.ravel()
            if values.size > DISPLAY_SAMPLE:
                values = values[rng.choice(values.size, DISPLAY_SAMPLE, replace=False)]
            samples.append(values)
        scale = float(np.quantile(np.concatenate(samples), self.display_quantile))
        self.display_scale_ = scale if scale > 0 and np.isfinite(scale) else 1.0

    def _array_names(self) -> tuple[str, ...]:
        """The fitted tensors :meth:`save` writes to the arrays file: attribute names without the ``_``."""
        raise NotImplementedError

    def _save_state(self, directory: Path | str, **state) -> Path:
        """Write the tensors of :meth:`_array_names` into ``_arrays_file`` (safetensors) and the format, the
        parameters, the fitted values every localizer has and ``state`` into ``_state_file`` (JSON), in
        ``directory`` (created if needed); returns it."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_arrays(directory / self._arrays_file,
                     {name: getattr(self, f"{name}_").cpu().numpy() for name in (*self._array_names(), "border_gain")})
        write_json(directory / self._state_file, {
            "format": self._state_format,
            "params": self.get_params(),
            "grid_shape": list(self.grid_shape_),
            "n_features": self.n_features_,
            "n_train_images": self.n_train_images_,
            "display_scale": self.display_scale_,
            **state,
        })
        return directory

    @classmethod
    def _load_state(cls, directory: Path, device: str | None) -> tuple["MapLocalizer", dict]:
        """Read what :meth:`_save_state` wrote: a localizer built from the saved parameters (``device``
        overriding the saved one) with the common fitted values and tensors set, and the state dict.
        Errors are RunErrors that say what to do."""
        state_path, arrays_path = directory / cls._state_file, directory / cls._arrays_file
        if not state_path.is_file():
            raise RunError(f"{directory} holds no {cls._state_file}; save a fitted {cls.__name__} there first")
        state = read_json(state_path)
        if state.get("format") != cls._state_format:
            raise RunError(f"{state_path} has format {state.get('format')}; expected {cls._state_format}")
        params = {name: tuple(value) if isinstance(value, list) else value  # JSON keeps tuples as lists
                  for name, value in state["params"].items()}
        unknown = sorted(set(params) - set(cls().get_params()))
        if unknown:
            raise RunError(f"{state_path} has unknown parameters: {', '.join(unknown)}")
        if device is not None:
            params["device"] = device
        localizer = cls(**params)
        localizer._check_params()
        arrays = read_arrays(arrays_path)
        missing = [name for name in localizer._array_names() if name not in arrays]
        if missing:
            raise RunError(f"{arrays_path} lacks {', '.join(missing)}; fit and save again")
        for name in localizer._array_names():
            setattr(localizer, f"{name}_", torch.from_numpy(arrays[name].copy()))
        # Saved before the border gain existed: no gain, the map scores those runs were fitted with.
        localizer.border_gain_ = torch.from_numpy(arrays["border_gain"].copy()) if "border_gain" in arrays else None
        localizer.grid_shape_ = tuple(state["grid_shape"])
        localizer.n_features_ = int(state["n_features"])
        localizer.n_train_images_ = int(state["n_train_images"])
        localizer.display_scale_ = float(state["display_scale"])
        return localizer, state


def ring_index(size: int) -> torch.Tensor:
    """``(size, size) int64``: each pixel's distance in pixels to the nearest edge of a square map."""
    steps = torch.arange(size)
    to_edge = torch.minimum(steps, size - 1 - steps)
    return torch.minimum(to_edge[:, None], to_edge[None, :])


def border_gain(maps: torch.Tensor, quantile: float = BORDER_QUANTILE) -> torch.Tensor:
    """``((size + 1) // 2,) float32`` gain per distance to the edge, from ``(N, size, size)`` normal maps.

    With ``h[k]`` the ``quantile`` of the maps' values at distance ``k`` from the edge and ``r`` the median
    of ``h`` over the inner half of the distances, the gain of the outer quarter's rings is
    ``min(1, r / h[k])`` (1 inside): a border ring whose normal highs are higher than the inside's is
    scaled down to them; a cooler one (a dark background around an object) is left as it is. The highs,
    not the means, are evened out, because the highs are what a map score reads.
    """
    size = maps.shape[-1]
    rings = ring_index(size).flatten()
    values = maps.double().flatten(1)
    highs = torch.stack([torch.quantile(values[:, rings == k].flatten(), quantile)
                         for k in range((size + 1) // 2)])
    reference = highs[size // 4:].median()
    gain = torch.ones((size + 1) // 2, dtype=torch.float64)
    if reference > 0:
        outer = torch.arange(len(gain)) < size // 4
        gain = torch.where(outer & (highs > reference), reference / highs, gain)
    return gain.float()


def ring_values(gain: torch.Tensor | None, size: int) -> torch.Tensor:
    """``(size, size)`` map of ``gain`` (:func:`border_gain`) spread over each pixel's ring; all ones for no gain."""
    if gain is None:
        return torch.ones(size, size)
    if len(gain) != (size + 1) // 2:
        raise RunError(f"the border gain has {len(gain)} rings; a {size}-pixel map needs {(size + 1) // 2}")
    return gain[ring_index(size)]


def image_scores_from_maps(
    maps: Sequence[np.ndarray], reduce: str = "max", topk_fraction: float = 0.01
) -> np.ndarray:
    """Image-level ``anomaly_score (N,) float64`` from anomaly maps.

    Parameters
    ----------
    maps : sequence of (H, W) arrays
    reduce : {"max", "topk_mean"}
        ``max``: the map's largest value. ``topk_mean``: the mean of its largest
        ``ceil(topk_fraction * H * W)`` values (less sensitive to one hot pixel).
    topk_fraction : float in (0, 1]
        Share of pixels averaged by ``topk_mean``.
    """
    check_params("image_scores_from_maps", {"reduce": reduce, "topk_fraction": topk_fraction},
                 {"reduce": [Options(*REDUCTIONS)], "topk_fraction": [Interval(float, 0.0, 1.0, closed="right")]})
    scores = np.empty(len(maps), dtype=np.float64)
    for index, anomaly_map in enumerate(maps):
        values = np.asarray(anomaly_map, dtype=np.float64).ravel()
        if reduce == "max":
            scores[index] = values.max()
        else:
            k = max(1, math.ceil(topk_fraction * values.size))
            scores[index] = np.partition(values, values.size - k)[values.size - k:].mean()
    return scores
