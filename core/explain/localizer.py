"""What every patch-level localizer shares: maps at each image's own size, the display scale, normalising.

A localizer subclasses :class:`MapLocalizer` and provides ``_map_batches(paths, stage, on_progress,
cancel)``, which yields ``(original (H, W) sizes, (B, S, S) maps)`` per batch of images at its
working size ``S``, plus ``_check_fitted()`` and the ``display_quantile`` parameter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from core.errors import DataError, RunError
from core.explain.smoothing import resize_map
from core.progress import CancelToken, ProgressCallback, ignore_progress
from core.store import read_json

DISPLAY_SAMPLE = 16384
"""Map values drawn per held-out image when estimating the display scale."""


class MapLocalizer:
    """Mixin: public map API on top of a subclass's ``_map_batches``."""

    param_names: tuple[str, ...]
    """The constructor's parameters, in order (set by each localizer)."""
    display_quantile: float
    display_holdout: float
    seed: int
    display_scale_: float

    def get_params(self) -> dict:
        """The constructor's parameters (JSON-serialisable)."""
        return {name: getattr(self, name) for name in self.param_names}

    def iter_anomaly_maps(
        self,
        paths: Sequence[Path | str],
        output_size: int | tuple[int, int] | None = None,
        on_progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield one anomaly map per image, in order, holding one batch at a time.

        Parameters
        ----------
        paths : sequence of image paths
        output_size : None, int or (height, width)
            None (default): each map has its input image's own height and width (read from the
            file). An int ``S`` gives ``(S, S)`` maps; a pair gives that size.
        on_progress, cancel
            ``ProgressEvent("maps", images_done, images_total)`` per batch; cancel checked between batches.

        Yields
        ------
        (H, W) float32 array, finite and >= 0; higher = more anomalous, unnormalised.
        """
        self._check_fitted()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        for sizes, maps in self._map_batches([Path(p) for p in paths], "maps", on_progress, cancel):
            for anomaly_map, size in zip(maps, sizes):
                height, width = output_size or size
                yield resize_map(anomaly_map, height, width)

    def anomaly_maps(
        self,
        paths: Sequence[Path | str],
        output_size: int | tuple[int, int] | None = None,
        on_progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
    ) -> list[np.ndarray]:
        """Anomaly maps of ``paths`` as a list of ``(H, W) float32`` arrays (see :meth:`iter_anomaly_maps`)."""
        return list(self.iter_anomaly_maps(paths, output_size, on_progress, cancel))

    def normalize(self, anomaly_map: np.ndarray) -> np.ndarray:
        """``anomaly_map / display_scale_``: 1.0 is the ``display_quantile`` of held-out normal pixels."""
        self._check_fitted()
        return (np.asarray(anomaly_map, dtype=np.float32) / np.float32(self.display_scale_)).astype(np.float32)

    def _start_fit(self, paths: Sequence[Path | str]) -> tuple[np.random.Generator, list[Path], list[Path]]:
        """Begin ``fit``: check the parameters, forget an earlier fit, and split ``paths`` (at least 2
        images) into the images to fit on and the held-out ones that set the display scale.

        Returns ``(rng, fitted, holdout)``: the seeded generator the rest of the fit draws from, and
        both lists in the order of ``paths``.
        """
        self._validate()
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

    def _display_scale(self, paths, rng: np.random.Generator, on_progress, cancel) -> float:
        """The ``display_quantile`` of the map values of ``paths`` (held-out normal images)."""
        samples = []
        for _, maps in self._map_batches(paths, "display_scale", on_progress, cancel):
            for anomaly_map in maps.cpu().numpy():
                values = anomaly_map.ravel()
                if values.size > DISPLAY_SAMPLE:
                    values = values[rng.choice(values.size, DISPLAY_SAMPLE, replace=False)]
                samples.append(values)
        scale = float(np.quantile(np.concatenate(samples), self.display_quantile))
        return scale if scale > 0 and np.isfinite(scale) else 1.0

    @classmethod
    def _restore(cls, directory: Path, state_file: str, state_format: int, device: str | None):
        """Read ``state_file`` written by ``save``: returns (its state dict, an unfitted localizer built from
        the saved parameters, ``device`` overriding the saved one). Errors are RunErrors that say what to do."""
        if not (directory / state_file).is_file():
            raise RunError(f"{directory} holds no {state_file}; save a fitted {cls.__name__} there first")
        state = read_json(directory / state_file)
        if state.get("format") != state_format:
            raise RunError(f"{directory / state_file} has format {state.get('format')}; expected {state_format}")
        params = dict(state["params"])
        unknown = sorted(set(params) - set(cls.param_names))
        if unknown:
            raise RunError(f"{directory / state_file} has unknown parameters: {', '.join(unknown)}")
        if device is not None:
            params["device"] = device
        localizer = cls(**params)
        localizer._validate()
        return state, localizer
