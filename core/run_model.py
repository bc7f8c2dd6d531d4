"""A saved run with its models loaded: it scores new data, draws anomaly maps and Grad-CAM, explains rows.

:class:`RunModel` loads the encoder, the final detector and the localizer of a run directory
(:mod:`core.run_dir`); reading a run for display only, without models, is :class:`core.results.RunResults`.
"""
from __future__ import annotations

import copy
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

from core.compute import Compute, LocalCompute, check_finite, fit_rows, score_rows
from core.data import IMAGES, Dataset
from core.data.columns import ColumnChoice
from core.detectors import make_detector
from core.errors import DataError, RunError
from core.explain.attribution import RowExplanation, explain_table_rows
from core.explain.cutpaste_patch import CutPastePatchLocalizer
from core.explain.gradcam import ScoreExplainer
from core.explain.patch import PatchLocalizer
from core.image_score import iter_scored_maps, map_scores
from core.models.pretrained import weights_digest, weights_path
from core.models.encoder import load_encoder
from core.progress import QUIET, Monitor
from core.run_dir import (
    Scores, check_artifacts, read_config, read_embeddings, read_image_score, read_info, saved_column_choice,
    write_maps,
)

SCORE_TOLERANCE = 1e-4
"""How far the re-fitted detector's training scores may be from the saved ones before the run is refused."""


class RunModel:
    """A saved run, ready to score new data.

    The final detector is re-fitted on the run's saved kept embeddings (deterministic under the
    run's seed), then checked against the training scores saved at fit time: any difference
    means the artifacts were damaged or tampered with, and opening fails.
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.info = read_info(self.run_dir)
        check_artifacts(self.run_dir, self.info.get("artifacts", {}))  # runs saved before manifests have none
        self.config = read_config(self.run_dir)
        arrays = read_embeddings(self.run_dir)  # streamed from the file, not read into memory
        self._train, self._kept = arrays["train"], np.flatnonzero(arrays["kept"])
        self.detector = fit_rows(make_detector(self.config.detector, random_state=self.config.seed), self._train, self._kept)
        check = -score_rows([self.detector], self._train)[0]
        if not np.allclose(check, arrays["train_anomaly_score"], rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE):
            raise RunError(f"{self.run_dir} does not reproduce its saved scores: the run is damaged or was tampered with")
        self._check_weights()
        self.encoder = load_encoder(self.config, self.info["kind"], self.run_dir)
        self.threshold = float(self.info["threshold"])
        self.image_score = read_image_score(self.info)
        self.localizer = None
        if self.info["kind"] == IMAGES and self.config.localization != "none":
            localizer_class = CutPastePatchLocalizer if self.config.localization == "cutpaste" else PatchLocalizer
            self.localizer = localizer_class.load(self.run_dir, device=self.config.device)

    def _check_weights(self) -> None:
        """Refuse a backbone weight file other than the one the run was fitted with (runs record its SHA-256)."""
        expected = self.info.get("weights_sha256")
        if expected and weights_digest(self.config.backbone, self.config.weights) != expected:
            raise RunError(f"the {self.config.backbone} weight file {weights_path(self.config.backbone, self.config.weights)} "
                           "is not the file this run was fitted with (its SHA-256 differs): put that file back, or fit again")

    def column_choice(self) -> ColumnChoice:
        """The table column roles to load new data with (see :func:`core.run_dir.saved_column_choice`)."""
        return saved_column_choice(self.info, self.config)

    @cached_property
    def kept_embeddings(self) -> np.ndarray:
        """``(K, D) float32``: the embeddings of the kept training samples, read when first needed."""
        return np.asarray(self._train[self._kept])

    def score(self, dataset: Dataset, monitor: Monitor = QUIET, compute: Compute | None = None,
              maps: Path | str | None = None) -> Scores:
        """Score every sample of ``dataset`` with this run's image score and threshold.

        The run's encoder and detector score every sample (``compute`` runs the embedding and scoring;
        default: this process, chunk by chunk); a run whose image score is ``map`` or ``both``
        (:attr:`image_score`) then scores each image from its localization map too, and combines the
        two as its training images were (:meth:`core.image_score.ImageScoreChoice.combine`).
        ``maps``: a folder to also write each image's map into, at its own size
        (:func:`core.run_dir.write_maps`); each map is computed once, for its file and its score.
        Nothing is written when maps are impossible.
        """
        if dataset.kind != self.info["kind"]:
            raise DataError(f"this run was fitted on {self.info['kind']} but the data is {dataset.kind}")
        needs_maps = self.image_score.used != "pooled"
        if maps is not None or needs_maps:
            self._check_localizer()
        compute = compute or LocalCompute()
        normality = compute.score_dataset(self.encoder, self.detector, dataset, monitor=monitor)
        map_score = None
        if maps is not None:
            map_score = self._write_maps(dataset, Path(maps), monitor)
        elif needs_maps:
            map_score = map_scores(self.localizer, dataset.paths, monitor=monitor)
        anomaly_score = self.image_score.combine(-np.asarray(normality, dtype=np.float64), map_score)
        monitor.report("score", len(dataset), len(dataset), "scored")
        return Scores(dataset.ids, anomaly_score, anomaly_score > self.threshold, self.threshold, dataset.labels)

    def iter_anomaly_maps(self, dataset: Dataset, monitor: Monitor = QUIET) -> Iterator[tuple[str, np.ndarray]]:
        """``(id, (H, W) float32 map)`` per image, lazily, at the image's own size; higher = more anomalous.

        Checks that maps are possible before returning, so a caller can fail before writing anything.
        """
        self._check_localizer()
        if dataset.kind != IMAGES:
            raise DataError("anomaly maps are for images; this data is a table")
        return zip(dataset.ids, self.localizer.iter_anomaly_maps(dataset.paths, monitor=monitor))

    def iter_gradcam_maps(
        self, dataset: Dataset, method: str = "gradcam", monitor: Monitor = QUIET,
    ) -> Iterator[tuple[str, np.ndarray]]:
        """``(id, (H, W) float32 map)``: Grad-CAM of each image's anomaly score, at the image's own size.

        The target is the squared Mahalanobis distance of the pooled embedding under the run's GDE
        (for runs with another detector, a GDE fitted on the same kept embeddings stands in), so the
        map shows which regions raised the score. ``method`` is ``gradcam`` or ``gradcam++``.
        """
        if dataset.kind != IMAGES:
            raise DataError("Grad-CAM explanations are for images; for tables use explain_rows")
        return self._gradcam_batches(self._explainer(method), dataset, monitor)

    def anomaly_map(self, image_path: Path) -> np.ndarray:
        """``(H, W) float32`` localization map of one image file, at its own size."""
        self._check_localizer()
        return next(iter(self.localizer.iter_anomaly_maps([Path(image_path)])))

    def gradcam_map(self, image_path: Path, method: str = "gradcam") -> np.ndarray:
        """``(H, W) float32`` Grad-CAM of one image file's anomaly score (see :meth:`iter_gradcam_maps`)."""
        with self._explainer(method) as explainer:
            return explainer.explain([Path(image_path)], self.config.image_size)[0]

    def explain_rows(self, dataset: Dataset, ids: list[str] | None = None, k: int = 5) -> list[RowExplanation]:
        """Top deviating features of table rows (all rows, or those with ``ids``), most anomalous first."""
        if self.info["kind"] != "table" or dataset.kind != "table":
            raise DataError("feature explanations are for tables; for images use localization maps")
        if self.config.objective != "none":
            raise RunError("feature explanations need a run on the columns themselves (objective 'none'); "
                           "this run scores a learned representation")
        if ids is not None:
            position = {sample_id: index for index, sample_id in enumerate(dataset.ids)}
            unknown = [i for i in ids if i not in position]
            if unknown:
                raise DataError(f"no row with id {', '.join(unknown[:5])} (ids are the table's id column, or 0-based row numbers without one)")
            dataset = dataset.subset(np.array([position[i] for i in ids]))
        encoded = check_finite(self.encoder.embed(dataset))
        state = self.encoder.state_
        explanations = explain_table_rows(
            encoded, self.kept_embeddings, self.encoder.feature_names, self.detector,
            medians=state.medians, scales=state.scales, ids=dataset.ids, k=k,
        )
        return sorted(explanations, key=lambda row: -row.anomaly_score)

    def _check_localizer(self) -> None:
        if self.localizer is None:
            raise RunError("this run has no localization model (tables, or fitted with localization 'none')")

    def _write_maps(self, dataset: Dataset, folder: Path, monitor: Monitor) -> np.ndarray:
        """Write each image's map into ``folder``; return the ``(N,) float64`` map scores of those same maps."""
        scores = np.empty(len(dataset), dtype=np.float64)
        scored = iter_scored_maps(self.localizer, dataset.paths, monitor=monitor)
        for index, (sample_id, (score, anomaly_map)) in enumerate(zip(dataset.ids, scored)):
            scores[index] = score
            write_maps([(sample_id, anomaly_map)], folder)
        return scores

    def _explainer(self, method: str) -> ScoreExplainer:
        if self.info["kind"] != IMAGES:
            raise DataError("Grad-CAM explanations are for image runs; for tables use explain_rows")
        gde = self.detector if hasattr(self.detector, "precision_") else make_detector("gde").fit(self.kept_embeddings)
        return ScoreExplainer(self._gradcam_model, self.config.feature_layers, gde.location_, gde.precision_, method=method)

    @cached_property
    def _gradcam_model(self):
        """A private copy of the backbone: Grad-CAM hooks must not touch the process-wide shared one,
        which a background job may be running at the same moment."""
        return copy.deepcopy(self.encoder.model)

    def _gradcam_batches(self, explainer, dataset: Dataset, monitor: Monitor) -> Iterator[tuple[str, np.ndarray]]:
        batch = self.config.batch_size
        with explainer:
            for start in range(0, len(dataset), batch):
                monitor.check()
                paths = dataset.paths[start : start + batch]
                yield from zip(dataset.ids[start : start + batch], explainer.explain(paths, self.config.image_size))
                monitor.report("gradcam", min(start + batch, len(dataset)), len(dataset))


def open_run(run_dir: Path | str) -> RunModel:
    """Open a saved run for scoring (see :class:`RunModel`)."""
    return RunModel(run_dir)
